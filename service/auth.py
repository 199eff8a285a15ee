"""Who may change the model: the admin key of PROTOSERVE_ADMIN_KEY, sent as `Authorization: Bearer KEY`.

Routes that change anything (verdicts, revision jobs, promote, rollback) depend on `require_admin`.
With no key configured they are closed (403), not open; a missing or wrong key is a 401 raised
before the route reads or writes anything. The comparison takes constant time (hmac.compare_digest)
and neither the key nor the header is ever logged or echoed.
"""

from __future__ import annotations

import hmac
import os

from fastapi import Header

ENV = "PROTOSERVE_ADMIN_KEY"


class AuthError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def check_key(authorization: str | None, configured: str | None) -> None:
    """Raise AuthError unless `authorization` is "Bearer <configured>"."""
    if not configured:
        raise AuthError(403, "changes_closed", f"changing routes are closed: no {ENV} is configured on the server")
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise AuthError(401, "unauthorized", "this route changes the model: send Authorization: Bearer <admin key>")
    if not hmac.compare_digest(key.strip().encode(), configured.encode()):
        raise AuthError(401, "unauthorized", "the admin key is wrong")


def require_admin(authorization: str | None = Header(default=None, description="Bearer <PROTOSERVE_ADMIN_KEY>")
                  ) -> None:
    """FastAPI dependency: the request carries the admin key (see the module docstring)."""
    check_key(authorization, os.environ.get(ENV))
