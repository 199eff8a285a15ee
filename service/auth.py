"""Who may change the model: the admin key of PROTOSERVE_ADMIN_KEY, sent as `Authorization: Bearer KEY`.

Routes that change anything (verdicts, revision jobs, promote, rollback) depend on `require_admin`.
With no key configured they are closed (403), not open; a missing or wrong key is a 401 raised
before the route reads or writes anything. The comparison takes constant time (hmac.compare_digest)
and neither the key nor the header is ever logged or echoed.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from protoserve.settings import settings, variable

ENV = variable("admin_key")


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


# Declared in the OpenAPI document as the changing routes' security scheme; refusals are ours (401/403).
bearer = HTTPBearer(auto_error=False, scheme_name="adminKey",
                    description=f"Authorization: Bearer <{ENV}> (the server's admin key)")


def require_admin(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> None:
    """FastAPI dependency: the request carries the admin key (see the module docstring)."""
    header = f"{credentials.scheme} {credentials.credentials}" if credentials is not None else None
    check_key(header, settings().admin_key)
