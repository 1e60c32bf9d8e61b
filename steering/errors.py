"""Exceptions raised by guardit. Every message names the field or file at fault."""

ECHO_LIMIT = 64  # characters of a client's value echoed back in an error message


def echo(value: object) -> str:
    """repr of a (client's) value for an error message, cut to ECHO_LIMIT characters."""
    text = repr(value)
    return text if len(text) <= ECHO_LIMIT else text[: ECHO_LIMIT - 3] + "..."


class GuarditError(Exception):
    """Base class for guardit errors that a user can fix (bad input, wrong pack, bad config)."""


class PackError(GuarditError, ValueError):
    """A concept pack is missing, corrupt, inconsistent, or made for another model."""


class PolicyError(GuarditError, ValueError):
    """A policy, tenant config or per-request steering spec is invalid."""


class PolicyForbidden(GuarditError):
    """A request asks for what its tenant's policy forbids (switching off a mandatory pack, choosing
    packs when the tenant may not): HTTP 403 on the server."""
