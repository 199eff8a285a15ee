"""The registry's refusals, shared by the store and its two database engines."""

from __future__ import annotations

from protoserve.errors import ProtoserveError


class RegistryError(ProtoserveError):
    """A registry operation that cannot be done (unknown version, nothing to roll back to, ...)."""


class RegistryUnavailable(RegistryError):
    """The registry's database cannot be reached or used now (down, refused the login, newer schema)."""
