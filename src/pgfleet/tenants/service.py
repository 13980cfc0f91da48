"""Project lifecycle for issue-level callers (API, CLI through the API).

Creating records intent first (a tenant row in `provisioning`), then
provisions; a failure leaves nothing half-created: what was made on the
server is dropped again and the row removed, or, if the server cannot be
reached to clean up, the row stays `failed` with the error for the reconciler.
"""

from __future__ import annotations

import logging
import re
import unicodedata
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgfleet.errors import Conflict, InvalidInput, ProjectNotFound
from pgfleet.platform.core import Platform
from pgfleet.regions import PlacementPolicy, choose_server, get_plan, get_region
from pgfleet.tenants.connections import Mode, check_mode
from pgfleet.tenants.provisioning import ProvisionedDatabase

log = logging.getLogger(__name__)

NAME_MAX = 100
SUBDOMAIN_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Owner:
    id: uuid.UUID
    name: str
    is_admin: bool


# Format characters that are part of ordinary text: joiners in emoji
# sequences and Persian/Indic scripts, and the tag characters of subdivision
# flags. Other format characters (bidi overrides among them) can disguise a
# name and are refused.
_ALLOWED_FORMAT = {"\u200c", "\u200d"} | {chr(c) for c in range(0xE0020, 0xE0080)}


def _forbidden_char(c: str) -> bool:
    cat = unicodedata.category(c)
    if cat == "Cf":
        return c not in _ALLOWED_FORMAT
    return cat in ("Cc", "Cs", "Co", "Cn")


def validate_name(name: str) -> str:
    stripped = name.strip()
    if not stripped:
        raise InvalidInput("name must not be empty", field="name")
    if len(stripped) > NAME_MAX:
        raise InvalidInput(
            f"name is {len(stripped)} characters; at most {NAME_MAX} are allowed", field="name"
        )
    bad = [c for c in stripped if _forbidden_char(c)]
    if bad:
        raise InvalidInput(
            f"name must not contain control or unassigned characters (found {bad[0]!r})",
            field="name",
        )
    return stripped


def validate_subdomain(subdomain: str) -> str:
    if not SUBDOMAIN_RE.match(subdomain):
        raise InvalidInput(
            "subdomain must be 1-63 lowercase letters, digits or hyphens, "
            "starting and ending with a letter or digit",
            field="subdomain",
        )
    return subdomain


def derive_subdomain(name: str, tenant_id: uuid.UUID) -> str:
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:40].strip("-")
    return f"{slug or 'project'}-{tenant_id.hex[:6]}"


_SELECT_PROJECTS = sql.SQL(
    "SELECT t.id, t.name, t.subdomain, t.region, t.plan_type, t.status, t.owner_id, "
    "t.hosted_region, t.placement_reason, t.error, t.created_at, t.updated_at, t.deleted_at, "
    "s.name AS server FROM tenants t LEFT JOIN servers s ON s.id = t.server_id"
)


def get_project(
    platform: Platform, owner: Owner, project_id: str | uuid.UUID, *, include_deleted: bool = False
) -> dict[str, Any]:
    """A project the owner may see (admins see all); anything else is 404."""
    try:
        tid = uuid.UUID(str(project_id))
    except ValueError:
        raise ProjectNotFound(f"project {project_id} not found") from None
    with platform.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(sql.SQL("{} WHERE t.id = %s").format(_SELECT_PROJECTS), (tid,)).fetchone()
    if (
        row is None
        or (not owner.is_admin and row["owner_id"] != owner.id)
        or (row["status"] == "deleted" and not include_deleted)
    ):
        raise ProjectNotFound(f"project {project_id} not found")
    return row


def list_projects(
    platform: Platform, owner: Owner, *, region: str | None = None, include_deleted: bool = False
) -> list[dict[str, Any]]:
    clauses: list[sql.Composable] = [sql.SQL("true")]
    params: list[Any] = []
    if not owner.is_admin:
        clauses.append(sql.SQL("t.owner_id = %s"))
        params.append(owner.id)
    if region is not None:
        get_region(region)
        clauses.append(sql.SQL("t.region = %s"))
        params.append(region)
    if not include_deleted:
        clauses.append(sql.SQL("t.status <> 'deleted'"))
    query = sql.SQL("{} WHERE {} ORDER BY t.created_at DESC, t.id").format(
        _SELECT_PROJECTS, sql.SQL(" AND ").join(clauses)
    )
    with platform.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def start_create_project(
    platform: Platform,
    owner: Owner,
    *,
    name: str,
    region: str,
    plan_type: str,
    subdomain: str | None = None,
) -> tuple[dict[str, Any], uuid.UUID]:
    """Validate, place, record the tenant row and its provision operation in
    one transaction, and queue the operation. Returns (project, operation id)."""
    from pgfleet.operations.service import start_operation

    name = validate_name(name)
    get_region(region)
    plan = get_plan(plan_type)
    tid = uuid.uuid4()
    sub = validate_subdomain(subdomain) if subdomain else derive_subdomain(name, tid)
    placement = choose_server(
        policy=PlacementPolicy(platform.settings.placement),
        region=region,
        plan=plan.id,
        servers=platform.servers.loads(),
        default_region=platform.settings.default_region,
    )
    # A region known to be down is refused at once (503), with nothing recorded.
    with platform.servers.admin_connection(platform.servers.get(placement.server_id)):
        pass

    def insert_tenant(conn: psycopg.Connection[Any]) -> None:
        try:
            with conn.transaction():
                conn.execute(
                    """
                    INSERT INTO tenants (id, name, subdomain, region, plan_type, status, owner_id,
                                         server_id, hosted_region, placement_reason)
                    VALUES (%s, %s, %s, %s, %s, 'provisioning', %s, %s, %s, %s)
                    """,
                    (
                        tid,
                        name,
                        sub,
                        region,
                        plan.id,
                        owner.id,
                        placement.server_id,
                        placement.hosted_region,
                        placement.reason,
                    ),
                )
        except psycopg.errors.UniqueViolation:
            raise Conflict(f"subdomain {sub!r} is already taken", field="subdomain") from None

    op_id = start_operation(
        platform,
        owner,
        type="provision",
        tenant_id=tid,
        tenant_owner=owner.id,
        action="project.create",
        params={"region": region, "plan": plan.id},
        details={"hosted_region": placement.hosted_region, "server": placement.server_name},
        prepare=insert_tenant,
    )
    return get_project(platform, owner, tid), op_id


def provisioned(
    platform: Platform, project: dict[str, Any], op: dict[str, Any]
) -> ProvisionedDatabase:
    """The credentials of a project whose provision operation finished."""
    ep = platform.client.endpoint(project["id"])
    return ProvisionedDatabase(
        tenant_id=project["id"],
        server=project["server"],
        region=ep.region,
        hosted_region=ep.hosted_region,
        host=ep.host,
        port=ep.port,
        database=ep.database,
        user=ep.user,
        sslmode=ep.sslmode,
        sslrootcert=ep.sslrootcert,
        password=ep.password,
        ro_user=ep.ro_user,
        ro_password=ep.ro_password,
        actions=tuple((op.get("result") or {}).get("actions", ())),
    )


def create_project(
    platform: Platform,
    owner: Owner,
    *,
    name: str,
    region: str,
    plan_type: str,
    subdomain: str | None = None,
) -> tuple[dict[str, Any], ProvisionedDatabase]:
    """Create a project and wait for its provision operation; raises the
    operation's error if it failed (nothing is left half-created)."""
    from pgfleet.operations.service import OperationFailed

    project, op_id = start_create_project(
        platform, owner, name=name, region=region, plan_type=plan_type, subdomain=subdomain
    )
    op = platform.ops.wait(op_id, platform.settings.operation_wait_s)
    if op["status"] != "finished":
        raise OperationFailed(op)
    project = get_project(platform, owner, project["id"])
    return project, provisioned(platform, project, op)


def _lifecycle(
    platform: Platform,
    owner: Owner,
    project_id: str | uuid.UUID,
    *,
    type: str,
    action: str,
    allowed: tuple[str, ...],
    params: dict[str, Any] | None = None,
    include_deleted: bool = False,
    expect_status: str | None = None,
) -> uuid.UUID:
    from pgfleet.operations.service import start_operation

    project = get_project(platform, owner, project_id, include_deleted=include_deleted)
    tid = project["id"]

    def check(conn: psycopg.Connection[Any]) -> None:
        row = conn.execute("SELECT status FROM tenants WHERE id = %s FOR UPDATE", (tid,)).fetchone()
        status = row[0] if row else "deleted"
        if expect_status is not None and status != expect_status:
            raise Conflict(f"project {tid} changed to {status} meanwhile; try again", status=status)
        if status not in allowed:
            raise Conflict(
                f"project {tid} is {status}; {type.replace('_', ' ')} needs it to be "
                f"{' or '.join(allowed)}",
                status=status,
            )

    return start_operation(
        platform,
        owner,
        type=type,
        tenant_id=tid,
        tenant_owner=project["owner_id"],
        action=action,
        params=params,
        prepare=check,
    )


def delete_project(platform: Platform, owner: Owner, project_id: str | uuid.UUID) -> dict[str, Any]:
    """Delete and wait: the project row, `deleted`, once its database is gone."""
    op_id = start_delete_project(platform, owner, project_id)
    op = wait_or_raise(platform, op_id)
    return get_project(platform, owner, op["tenant_id"], include_deleted=True)


def start_delete_project(
    platform: Platform, owner: Owner, project_id: str | uuid.UUID
) -> uuid.UUID:
    project = get_project(platform, owner, project_id)
    return _lifecycle(
        platform,
        owner,
        project_id,
        type="delete",
        action="project.delete",
        allowed=("active", "paused", "failed", "provisioning", "deleting"),
        # What a cancelled delete restores (checked again under the row lock).
        params={"previous_status": project["status"]},
        expect_status=project["status"],
    )


ROTATE_ROLES = ("all", "rw", "ro")


MAX_OVERLAP_S = 7 * 24 * 3600


def rotate_password(
    platform: Platform,
    owner: Owner,
    project_id: str | uuid.UUID,
    *,
    role: str = "all",
    overlap_s: int = 0,
) -> uuid.UUID:
    """New passwords. Without an overlap the old ones stop working when the
    operation finishes; with `overlap_s` the new credentials use the other
    login role of the project's main/alternate pair and the old ones keep
    working until the window ends."""
    if role not in ROTATE_ROLES:
        raise InvalidInput(
            f"role must be one of {', '.join(ROTATE_ROLES)}, not {role!r}", field="role"
        )
    if not 0 <= overlap_s <= MAX_OVERLAP_S:
        raise InvalidInput(
            f"overlap_s must be between 0 and {MAX_OVERLAP_S} seconds (7 days), not {overlap_s}",
            field="overlap_s",
        )
    return _lifecycle(
        platform,
        owner,
        project_id,
        type="rotate_password",
        action="project.rotate_password",
        allowed=("active", "paused"),
        params={"role": role, "overlap_s": overlap_s},
    )


def pause_project(platform: Platform, owner: Owner, project_id: str | uuid.UUID) -> uuid.UUID:
    return _lifecycle(
        platform, owner, project_id, type="pause", action="project.pause", allowed=("active",)
    )


def resume_project(platform: Platform, owner: Owner, project_id: str | uuid.UUID) -> uuid.UUID:
    return _lifecycle(
        platform, owner, project_id, type="resume", action="project.resume", allowed=("paused",)
    )


def change_plan(
    platform: Platform, owner: Owner, project_id: str | uuid.UUID, *, plan_type: str
) -> uuid.UUID:
    plan = get_plan(plan_type)
    project = get_project(platform, owner, project_id)
    if project["plan_type"] == plan.id:
        raise Conflict(f"project {project['id']} is already on the {plan.id} plan", field="plan")
    return _lifecycle(
        platform,
        owner,
        project_id,
        type="change_plan",
        action="project.change_plan",
        allowed=("active", "paused"),
        params={"plan": plan.id, "previous_plan": project["plan_type"]},
    )


def wait_or_raise(platform: Platform, op_id: uuid.UUID) -> dict[str, Any]:
    """Wait for an operation (up to the configured wait); raise its error if it failed."""
    from pgfleet.operations.service import OperationFailed

    op = platform.ops.wait(op_id, platform.settings.operation_wait_s)
    if op["status"] in ("failed", "cancelled"):
        raise OperationFailed(op)
    return op


@dataclass(frozen=True)
class ConnectionDetails:
    mode: Mode
    host: str
    port: int
    database: str
    user: str
    password: str
    sslmode: str
    sslrootcert: str | None
    region: str
    hosted_region: str

    @property
    def uri(self) -> str:
        from urllib.parse import quote, urlencode

        query = {"sslmode": self.sslmode}
        if self.sslrootcert:
            query["sslrootcert"] = self.sslrootcert
        return (
            f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(self.database, safe='')}?"
            + urlencode(query, safe="/")
        )


def connection_details(
    platform: Platform, owner: Owner, project_id: str, mode: str = "rw"
) -> ConnectionDetails:
    m = check_mode(mode)
    project = get_project(platform, owner, project_id)
    ep = platform.client.endpoint(project["id"])
    return ConnectionDetails(
        mode=m,
        host=ep.host,
        port=ep.port,
        database=ep.database,
        user=ep.user_for(m),
        password=ep.password_for(m),
        sslmode=ep.sslmode,
        sslrootcert=ep.sslrootcert,
        region=ep.region,
        hosted_region=ep.hosted_region,
    )
