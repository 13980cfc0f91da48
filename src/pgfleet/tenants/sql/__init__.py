"""The SQL API: one statement for a project, run logged in as the
project's own role, with pgfleet's timeouts and caps (see gateway.py)."""

from pgfleet.tenants.sql.gateway import SqlGateway, visible_project
from pgfleet.tenants.sql.limits import SqlRequest, SqlResult, plan_limits
from pgfleet.tenants.sql.values import to_json

__all__ = ["SqlGateway", "SqlRequest", "SqlResult", "plan_limits", "to_json", "visible_project"]
