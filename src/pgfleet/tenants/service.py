"""Project lifecycle for issue-level callers (API, CLI through the API).

Creating records intent first (a tenant row in `provisioning`), then
provisions; a failure leaves nothing half-created: what was made on the
server is dropped again and the row removed, or, if the server cannot be
reached to clean up, the row stays `failed` with the error for the reconciler.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, urlencode

import psycopg

from pgfleet.crypto import generate_password
from pgfleet.display import when
from pgfleet.errors import (
    Conflict,
    FleetError,
    InvalidInput,
    ProjectNotFound,
    QuotaExceeded,
    RegionUnavailable,
    read_only_refusal,
)
from pgfleet.monitoring.health import known_down
from pgfleet.names import derive_subdomain, validate_name, validate_subdomain
from pgfleet.operations import service as ops_service
from pgfleet.operations.service import start_operation
from pgfleet.operations.store import Operation
from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner
from pgfleet.regions import (
    PlacementPolicy,
    backup_region_of,
    check_residency_rule,
    choose_server,
    get_plan,
    get_region,
    require_residency,
)
from pgfleet.tenants import kinds, spares, store
from pgfleet.tenants.connections import DatabasePlatformClient, Mode, check_mode
from pgfleet.tenants.naming import tenant_db_name
from pgfleet.tenants.provisioning import ProvisionedDatabase
from pgfleet.tenants.store import Tenant

log = logging.getLogger(__name__)
# This domain's operation kinds, registered with the engine on import.
KINDS = kinds


def _visible(owner: Owner, row: Tenant, *, include_deleted: bool = False) -> bool:
    """Whether `owner` may see the project `row`: its own (an admin: any),
    and not deleted unless asked for."""
    return (owner.is_admin or row.owner_id == owner.id) and (
        row.status != "deleted" or include_deleted
    )


def get_project(
    platform: Platform, owner: Owner, project_id: str | uuid.UUID, *, include_deleted: bool = False
) -> Tenant:
    """A project the owner may see (admins see all); anything else is 404."""
    try:
        tid = uuid.UUID(str(project_id))
    except ValueError:
        raise ProjectNotFound(f"project {project_id} not found") from None
    with platform.db.connection() as conn:
        row = store.get(conn, tid)
    if row is None or not _visible(owner, row, include_deleted=include_deleted):
        gone = row is not None and row.status == "deleted"
        if row is not None and gone and _visible(owner, row, include_deleted=True):
            # Its owner is told what became of it, and how it comes back.
            if (row.error or "").startswith("provisioning"):  # undone before it was made
                raise ProjectNotFound(f"project {row.name!r} ({tid}) was never made: {row.error}")
            at = f" at {when(row.deleted_at)}" if row.deleted_at else ""
            raise ProjectNotFound(
                f"project {row.name!r} ({tid}) was deleted{at}; `pgfleet backups restore "
                f"{tid}` brings it back from its backups, within its plan's restore window"
            )
        raise ProjectNotFound(f"project {project_id} not found")
    return row


def list_projects(
    platform: Platform, owner: Owner, *, region: str | None = None, include_deleted: bool = False
) -> list[Tenant]:
    if region is not None:
        region = get_region(region).id
    with platform.db.connection() as conn:
        return store.listing(
            conn,
            owner_id=None if owner.is_admin else owner.id,
            region=region,
            include_deleted=include_deleted,
        )


def start_create_project(
    platform: Platform,
    owner: Owner,
    *,
    name: str,
    region: str,
    plan_type: str,
    subdomain: str | None = None,
    residency: str | None = None,
    restored_from: dict[str, Any] | None = None,
    op_type: str = "provision",
    op_params: dict[str, Any] | None = None,
    action: str = "project.create",
    deadline_s: float | None = None,
    check: Callable[[psycopg.Connection[Any]], None] | None = None,
    wait_for_region: bool = False,
) -> tuple[Tenant, uuid.UUID]:
    """Validate, place, record the tenant row and its provision operation in
    one transaction, and queue the operation. Returns (project, operation id).
    Nothing here touches a regional server: the operation does. When its
    server has a prepared spare ready, the project takes it in that
    transaction: its id and passwords are the spare's (tenants/spares.py). A server the
    health checks know to be down is refused at once (503), unless
    `wait_for_region`: then the operation retries until it is back (or its
    deadline passes).

    A restore makes its new project here too, with `op_type="restore"` (the
    provision steps, then the copy) and what it restores in `op_params`."""
    name = validate_name(name)
    region = get_region(region).id
    plan = get_plan(plan_type)
    residency = check_residency_rule(residency)
    if subdomain:
        subdomain = validate_subdomain(subdomain)
    placement = choose_server(
        policy=PlacementPolicy(platform.settings.placement),
        region=region,
        plan=plan.id,
        servers=platform.servers.loads(),
        default_region=platform.settings.default_region,
        residency=residency,
    )
    if residency is not None:
        # Its backups stay in the jurisdiction too.
        storage = backup_region_of(
            placement.hosted_region, platform.settings.backup_regions, placement.server_name
        )
        require_residency(residency, storage, what="its backups' storage")
    # A region the health checks know to be down is refused at once (503),
    # with nothing recorded.
    if not wait_for_region and known_down(platform, placement.server_id):
        raise RegionUnavailable(
            f"region {placement.hosted_region} is unavailable: server "
            f"{placement.server_name} failed its last health check (see `pgfleet status`); "
            "to queue the create until it is back, ask with wait_for_region=true",
            region=placement.hosted_region,
            server=placement.server_name,
        )

    chosen: list[Tenant] = []  # the row as inserted, by the last attempt

    def insert_tenant(conn: psycopg.Connection[Any]) -> uuid.UUID:
        chosen.clear()
        if check is not None:
            check(conn)
        quota = platform.settings.max_projects_per_owner
        if quota and not owner.is_admin:
            have = store.count_live_of_owner(conn, owner.id)
            if have >= quota:
                raise QuotaExceeded(
                    f"you have {have} projects (deleting ones included); at most {quota} "
                    "per owner are allowed: delete one first, or ask an admin to raise "
                    "PGFLEET_MAX_PROJECTS_PER_OWNER",
                    projects=have,
                    quota=quota,
                )
        # A prepared spare of its server, when one is ready: the project takes
        # its id and passwords, and its server side and routes are made.
        spare = spares.take(conn, placement.server_id)
        tid = spare.id if spare else uuid.uuid4()
        info: dict[str, Any] = (
            {
                "password_enc": spare.password_enc,
                "ro_password_enc": spare.ro_password_enc,
                "spare": True,
            }
            if spare
            else {
                # Its passwords, encrypted, before any server sees them: the
                # provision operation's first step then only reads.
                key: platform.secrets.encrypt(generate_password())
                for key in ("password_enc", "ro_password_enc")
            }
        )
        row = store.insert(
            conn,
            tenant_id=tid,
            name=name,
            # Not from the id: a spare's id may be seen ahead (pg_database
            # lists every database), and its subdomain squatted.
            subdomain=subdomain or derive_subdomain(name, uuid.uuid4()),
            region=region,
            plan=plan.id,
            owner_id=owner.id,
            server_id=placement.server_id,
            hosted_region=placement.hosted_region,
            placement_reason=placement.reason,
            connection_info=info,
            residency=residency,
            restored_from=restored_from,
        )
        chosen.append(row)
        return tid

    op_id = start_operation(
        platform,
        owner,
        type=op_type,
        tenant_id=None,
        tenant_owner=owner.id,
        action=action,
        params={
            "region": region,
            "plan": plan.id,
            # The operation retries an unreachable server until its deadline
            # only then (kinds/provision.py); else it gives up in seconds.
            **({"wait_for_region": True} if wait_for_region else {}),
            **(op_params or {}),
        },
        details={"hosted_region": placement.hosted_region, "server": placement.server_name},
        prepare=insert_tenant,
        deadline_s=deadline_s,
    )
    return chosen[0], op_id


def provisioned(platform: Platform, project: Tenant, op: Operation) -> ProvisionedDatabase:
    """The credentials of a project whose provision operation finished."""
    ep = DatabasePlatformClient.of(platform).endpoint(project.id)
    return ProvisionedDatabase(
        tenant_id=project.id,
        server=project.server or "",
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
        actions=tuple((op.result or {}).get("actions", ())),
    )


def create_project(
    platform: Platform,
    owner: Owner,
    *,
    name: str,
    region: str,
    plan_type: str,
    subdomain: str | None = None,
    residency: str | None = None,
) -> tuple[Tenant, ProvisionedDatabase]:
    """Create a project and wait for its provision operation; raises the
    operation's error if it failed (nothing is left half-created)."""
    project, op_id = start_create_project(
        platform,
        owner,
        name=name,
        region=region,
        plan_type=plan_type,
        subdomain=subdomain,
        residency=residency,
    )
    op = ops_service.wait(platform, op_id)
    if op.status != "finished":
        raise ops_service.operation_failed(op)
    project = get_project(platform, owner, project.id)
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
    project = get_project(platform, owner, project_id, include_deleted=include_deleted)
    tid = project.id

    def check(conn: psycopg.Connection[Any]) -> None:
        status = store.lock_row_status(conn, tid)
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
        tenant_owner=project.owner_id,
        action=action,
        params=params,
        prepare=check,
    )


def delete_project(platform: Platform, owner: Owner, project_id: str | uuid.UUID) -> Tenant:
    """Delete and wait: the project row, `deleted`, once its database is gone."""
    op_id = start_delete_project(platform, owner, project_id)
    ops_service.wait_or_raise(platform, op_id)
    return get_project(platform, owner, project_id, include_deleted=True)


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
        params={"previous_status": project.status},
        expect_status=project.status,
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
    if project.plan_type == plan.id:
        raise Conflict(f"project {project.id} is already on the {plan.id} plan", field="plan")
    return _lifecycle(
        platform,
        owner,
        project_id,
        type="change_plan",
        action="project.change_plan",
        allowed=("active", "paused"),
        params={"plan": plan.id, "previous_plan": project.plan_type},
    )


wait_or_raise = ops_service.wait_or_raise


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
    # "session" or "transaction" through a router; None for the server itself.
    pooling: str | None = None
    direct: bool = False
    # The region whose router the string names (None when direct).
    router_region: str | None = None
    note: str | None = None

    @property
    def uri(self) -> str:
        query = {"sslmode": self.sslmode}
        if self.sslrootcert:
            query["sslrootcert"] = self.sslrootcert
        return (
            f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(self.database, safe='')}?"
            + urlencode(query, safe="/")
        )


POOLINGS = ("session", "transaction")


def connection_details(
    platform: Platform,
    owner: Owner,
    project_id: str | uuid.UUID,
    mode: str = "rw",
    *,
    pooling: str = "session",
    direct: bool = False,
    via: str | None = None,
    project: Tenant | None = None,
) -> ConnectionDetails:
    """Where a client connects: by default the router of the region that
    hosts the project (session pooling), `pooling="transaction"` its
    transaction-pooling port, `via` another region's router (the hop to the
    project's own server is reported), `direct` the server itself.
    `project` is its row when the caller has just read it (as `get_project`
    gives it to this owner)."""
    m = check_mode(mode)
    if owner.read_only and m == "rw":
        raise read_only_refusal(
            "the read-write credentials are not for it: ask for mode=ro (`--mode ro` in the CLI)"
        )
    if pooling not in POOLINGS:
        raise InvalidInput(f"unknown pooling {pooling!r}; valid values are: session, transaction")
    if via is not None:
        get_region(via)  # a clear 422 for a typo
    if project is None or str(project.id) != str(project_id) or not _visible(owner, project):
        project = get_project(platform, owner, project_id)
    ep = DatabasePlatformClient.of(platform).endpoint_from_row(
        {
            "id": project.id,
            "region": project.region,
            "status": project.status,
            "connection_info": project.connection_info,
        }
    )
    server = ConnectionDetails(
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
        direct=True,
        note="direct to the server: for tools that need it (pg_dump, replication); "
        "this address changes if the project moves",
    )
    if direct:
        return server
    routers = platform.routers
    if routers is None:
        return replace(server, note="this fleet has no routers: the server's own address")
    region = via or ep.hosted_region
    try:
        spec = routers.spec(region, pooling)
    except FleetError:
        active = sorted({r.region for r in routers.specs})
        raise InvalidInput(
            f"region {region} has no router; routers run in: {', '.join(active)}",
            valid=active,
        ) from None
    if region == ep.hosted_region:
        note = None
    else:
        note = f"through the {region} router to the project's server in {ep.hosted_region}"
    if pooling == "transaction":
        extra = (
            "transaction pooling: session state (SET, LISTEN, temporary tables, "
            "session advisory locks, WITH HOLD cursors, prepared statements) does not last "
            "beyond a transaction; tell the driver to prepare nothing (psycopg: "
            "prepare_threshold=None; node-postgres: no named queries; JDBC: prepareThreshold=0)"
        )
        note = f"{note}; {extra}" if note else extra
    return replace(
        server,
        host=routers.host,
        port=spec.port,
        sslrootcert=str(routers.ca_file),
        pooling=pooling,
        direct=False,
        router_region=region,
        note=note,
    )


@dataclass(frozen=True)
class Usage:
    database_bytes: int | None
    connections: int | None
    connection_limit: int
    reachable: bool


def project_usage(platform: Platform, owner: Owner, project_id: str | uuid.UUID) -> Usage:
    """The project's database size and open connections, read on its server
    (in the admin database: never inside the project's), and its limit."""
    project = get_project(platform, owner, project_id)
    plan = get_plan(project.plan_type or "free")
    server = None if project.server_id is None else platform.servers.get(project.server_id)
    if server is None or project.status not in ("active", "paused"):
        return Usage(None, None, plan.connection_limit, False)
    name = tenant_db_name(project.id)
    try:
        with platform.servers.admin_connection(server) as conn:
            row = conn.execute(
                "SELECT pg_catalog.pg_database_size(d.oid), (SELECT count(*) FROM "
                "pg_catalog.pg_stat_activity a WHERE a.datid OPERATOR(pg_catalog.=) d.oid) "
                "FROM pg_catalog.pg_database d WHERE d.datname OPERATOR(pg_catalog.=) %s",
                (name,),
            ).fetchone()
    except RegionUnavailable:
        return Usage(None, None, plan.connection_limit, False)
    if row is None:
        return Usage(None, None, plan.connection_limit, True)
    return Usage(int(row[0]), int(row[1]), plan.connection_limit, True)
