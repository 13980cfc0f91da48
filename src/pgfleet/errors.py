"""One exception tree for the whole product; mapped to HTTP in one place (api.app)."""

from __future__ import annotations


class PgfleetError(Exception):
    """Something went wrong in pgfleet."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str | None = None, **details: object) -> None:
        self.message = message or (self.__doc__ or "").strip()
        self.details = details
        super().__init__(self.message)


class InvalidInput(PgfleetError):
    """The request is not valid."""

    status_code = 422
    code = "invalid_input"


class UnknownRegion(InvalidInput):
    """Unknown region."""

    code = "unknown_region"


class UnknownPlan(InvalidInput):
    """Unknown plan."""

    code = "unknown_plan"


class NotAuthenticated(PgfleetError):
    """A valid bearer token is required."""

    status_code = 401
    code = "not_authenticated"


class Forbidden(PgfleetError):
    """This token may not do that."""

    status_code = 403
    code = "forbidden"


class NotFound(PgfleetError):
    """Not found."""

    status_code = 404
    code = "not_found"


class ProjectNotFound(NotFound):
    """Project not found."""

    code = "project_not_found"


class OperationNotFound(NotFound):
    """Operation not found."""

    code = "operation_not_found"


class Conflict(PgfleetError):
    """The resource is not in a state that allows this."""

    status_code = 409
    code = "conflict"


class RegionUnavailable(PgfleetError):
    """The region's server cannot be reached right now."""

    status_code = 503
    code = "region_unavailable"


class ConnectionLimitReached(PgfleetError):
    """The project's role has as many connections open as its plan allows."""

    status_code = 429
    code = "connection_limit_reached"


class PlatformUnavailable(PgfleetError):
    """The platform database cannot be reached."""

    status_code = 503
    code = "platform_unavailable"


class NoCapacity(PgfleetError):
    """No server in the region has capacity left."""

    status_code = 503
    code = "no_capacity"


class BodyTooLarge(PgfleetError):
    """The request body is over 4 MiB, the most any call takes."""

    status_code = 413
    code = "body_too_large"


class RateLimited(PgfleetError):
    """Too many requests; retry after the time in Retry-After."""

    status_code = 429
    code = "rate_limited"


class InternalError(PgfleetError):
    """Something went wrong inside pgfleet; it is in the API's log."""


class FleetError(PgfleetError):
    """The embedded fleet could not be managed."""

    code = "fleet_error"


class ConfigError(PgfleetError):
    """The configuration is not valid."""

    code = "config_error"


def error_content(exc: PgfleetError) -> dict[str, object]:
    """The JSON body every API error has: {"error": {"code", "message", ...}}."""
    return {"error": {"code": exc.code, "message": exc.message, **exc.details}}
