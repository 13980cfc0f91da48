"""One exception tree for the whole product, and the one function that turns
an error into an HTTP answer (`to_http`), which the API, the SQL fast path
and the console all use."""

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


class QuotaExceeded(PgfleetError):
    """An owner is at its limit of projects."""

    status_code = 403
    code = "quota_exceeded"


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


class ResidencyViolation(Conflict):
    """A project's data would leave the jurisdiction its residency rule names."""

    code = "residency_violation"


class BackupNotFound(NotFound):
    code = "backup_not_found"


class BackupUnusable(Conflict):
    """A backup failed its check (a damaged or missing file, a damaged archive)."""

    code = "backup_unusable"


class RegionUnavailable(PgfleetError):
    """The region's server cannot be reached right now."""

    status_code = 503
    code = "region_unavailable"


class RegionStayedDown(PgfleetError):
    """The region's server could not be reached for as long as the work
    waits for it: the work was given up (not retried, unlike
    RegionUnavailable)."""

    status_code = 503
    code = "region_unavailable"


class ConnectionLimitReached(PgfleetError):
    """The project's role has as many connections open as its plan allows."""

    status_code = 429
    code = "connection_limit_reached"


class CredentialsRejected(PgfleetError):
    """The server refused the project's stored credentials."""

    status_code = 409
    code = "credentials_rejected"


class TooManyStatements(PgfleetError):
    """The project's SQL API connections in this process are all busy."""

    status_code = 429
    code = "too_many_statements"


class SqlError(PgfleetError):
    """The statement failed."""

    status_code = 400
    code = "sql_error"


class IdempotencyKeyReused(InvalidInput):
    """The Idempotency-Key was used with a different request."""

    code = "idempotency_key_reused"


class DeadlineExceeded(PgfleetError):
    """The operation did not finish before its deadline."""

    status_code = 504
    code = "deadline_exceeded"


class OperationFailed(PgfleetError):
    """The operation failed (or was cancelled); it carries the status and code
    of what made it fail (a region that stayed down is 503, not 500)."""

    def __init__(self, message: str, *, status_code: int, code: str, **details: object) -> None:
        self.status_code = status_code
        self.code = code
        super().__init__(message, **details)


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


def to_http(exc: PgfleetError) -> tuple[int, dict[str, object], dict[str, str]]:
    """(status, JSON body, headers) of the answer an error gets."""
    headers: dict[str, str] = {}
    if exc.status_code in (429, 503):
        retry = exc.details.get("retry_after_s", 1 if exc.status_code == 429 else 5)
        headers["Retry-After"] = str(retry)
    return exc.status_code, error_content(exc), headers


def read_only_refusal(what: str) -> Forbidden:
    """403 for a token whose scope is `read`."""
    return Forbidden(
        f"this token is read-only (scope read): it may list, show and query; {what}. "
        "Use a token with scope all"
    )
