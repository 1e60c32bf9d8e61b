"""Exceptions raised by guardit. Every message names the field or file at fault."""


class GuarditError(Exception):
    """Base class for guardit errors that a user can fix (bad input, wrong pack, bad config)."""


class PackError(GuarditError, ValueError):
    """A concept pack is missing, corrupt, inconsistent, or made for another model."""


class PolicyError(GuarditError, ValueError):
    """A policy, tenant config or per-request steering spec is invalid."""


class PolicyForbidden(GuarditError):
    """A request asks for what its tenant's policy forbids (switching off a mandatory pack, choosing
    packs when the tenant may not): HTTP 403 on the server."""
