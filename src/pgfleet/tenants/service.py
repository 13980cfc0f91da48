"""Project lifecycle for issue-level callers (API, CLI through the API).

Creating records intent first (a tenant row in `provisioning`), then
provisions; a failure leaves nothing half-created: what was made on the
server is dropped again and the row removed, or, if the server cannot be
reached to clean up, the row stays `failed` with the error for the reconciler.
"""

from __future__ import annotations

import logging
import re
import time
import unicodedata
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgfleet.errors import Conflict, InvalidInput, ProjectNotFound, RegionUnavailable
from pgfleet.platform.core import Platform
from pgfleet.regions import PlacementPolicy, choose_server, get_plan, get_region
from pgfleet.tenants.connections import Mode, check_mode
from pgfleet.tenants.provisioning import (
    ProvisionedDatabase,
    drop_on_server,
    ensure_tenant_database_provisioned,
    tenant_db_name,
)

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


def create_project(
    platform: Platform,
    owner: Owner,
    *,
    name: str,
    region: str,
    plan_type: str,
    subdomain: str | None = None,
) -> tuple[dict[str, Any], ProvisionedDatabase]:
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
    try:
        with platform.db.connection() as conn:
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
    t0 = time.perf_counter()
    try:
        result = ensure_tenant_database_provisioned(tid, region, platform=platform)
    except BaseException as e:
        platform.metrics.provisions.labels(placement.hosted_region, type(e).__name__).inc()
        _undo_create(platform, tid, placement.server_id, e)
        raise
    platform.metrics.provisions.labels(placement.hosted_region, "ok").inc()
    platform.metrics.provision_duration.labels(placement.hosted_region).observe(
        time.perf_counter() - t0
    )
    return get_project(platform, owner, tid), result


def _undo_create(platform: Platform, tid: uuid.UUID, server_id: int, err: BaseException) -> None:
    """Leave nothing half-created after a failed create.

    If the server was never reached nothing exists on it and the row goes.
    Otherwise what was made is dropped again; if even that cannot be done,
    the row stays `failed` with the error, for the reconciler.
    """
    reached = not (isinstance(err, RegionUnavailable) and err.details.get("reached") is False)
    if reached:
        try:
            server = platform.servers.get(server_id)
            with platform.servers.admin_connection(server) as aconn:
                drop_on_server(aconn, name=tenant_db_name(tid))
        except Exception as cleanup_err:  # the server may be the thing that is down
            log.warning(
                "project %s: cleanup after failed create did not finish: %s",
                tid,
                type(cleanup_err).__name__,
            )
            with platform.db.connection() as conn:
                conn.execute(
                    "UPDATE tenants SET status = 'failed', error = %s, updated_at = now() "
                    "WHERE id = %s",
                    (str(err)[:500], tid),
                )
            return
    with platform.db.connection() as conn:
        conn.execute("DELETE FROM tenants WHERE id = %s", (tid,))


def delete_project(platform: Platform, owner: Owner, project_id: str) -> dict[str, Any]:
    project = get_project(platform, owner, project_id)
    tid = project["id"]
    with platform.db.connection() as conn:
        conn.execute(
            "UPDATE tenants SET status = 'deleting', updated_at = now() WHERE id = %s", (tid,)
        )
    platform.client.forget(tid)
    with platform.db.connection() as conn:
        server_id = conn.execute("SELECT server_id FROM tenants WHERE id = %s", (tid,)).fetchone()
    if server_id and server_id[0] is not None:
        server = platform.servers.get(server_id[0])
        with platform.servers.admin_connection(server) as aconn:
            drop_on_server(aconn, name=tenant_db_name(tid))
    with platform.db.connection() as conn:
        conn.execute(
            "UPDATE tenants SET status = 'deleted', deleted_at = now(), connection_info = NULL, "
            "updated_at = now() WHERE id = %s",
            (tid,),
        )
    return get_project(platform, owner, tid, include_deleted=True)


@dataclass(frozen=True)
class ConnectionDetails:
    mode: Mode
    host: str
    port: int
    database: str
    user: str
    password: str
    sslmode: str
    region: str
    hosted_region: str

    @property
    def uri(self) -> str:
        from urllib.parse import quote

        uri = (
            f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(self.database, safe='')}?sslmode={self.sslmode}"
        )
        return uri


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
        region=ep.region,
        hosted_region=ep.hosted_region,
    )
