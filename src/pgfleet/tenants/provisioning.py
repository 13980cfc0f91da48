"""Provisioning a project's database on its regional server.

`ensure_tenant_database_provisioned` is the seed's operation. It is idempotent
and converges from any partial state: role without database, database without
role (or owned by someone else), wrong password, a database left invalid by an
interrupted DROP DATABASE. Every step looks before it acts.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from psycopg import sql

from pgfleet.crypto import generate_password
from pgfleet.errors import Conflict, ProjectNotFound
from pgfleet.fleet.registry import ServerRecord
from pgfleet.operations.failpoints import failpoint
from pgfleet.operations.locks import resource_lock_key
from pgfleet.platform.core import Platform, default_platform
from pgfleet.regions import PlacementPolicy, Plan, choose_server, get_plan, get_region
from pgfleet.tenants import routing, store
from pgfleet.tenants.naming import project_roles, ro_role_name, rw_role_name, tenant_db_name
from pgfleet.tenants.server import converge_database, converge_privileges, converge_roles
from pgfleet.tenants.spares import CLAIMED, claim_prepared
from pgfleet.tenants.template import ensure_template


@dataclass(frozen=True)
class ProvisionedDatabase:
    tenant_id: uuid.UUID
    server: str
    region: str
    hosted_region: str
    host: str
    port: int
    database: str
    user: str
    sslmode: str
    password: str = field(repr=False)
    sslrootcert: str | None = None
    ro_user: str = ""
    ro_password: str = field(default="", repr=False)
    actions: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProvisionTarget:
    """What converging one project works towards: where, with which
    passwords and limits."""

    tenant_id: uuid.UUID
    name: str
    region: str
    plan: Plan
    server: ServerRecord
    status: str
    password: str = field(repr=False)
    ro_password: str = field(repr=False)
    rw_user: str = ""
    ro_user: str = ""
    # A person chose the rw password (the seed's desired_password): its
    # verifier keeps PostgreSQL's 4,096 iterations.
    password_chosen: bool = False
    # Made from a prepared spare (tenants/spares.py): its roles and database
    # exist under its names, with its passwords, and the routers know it.
    spare: bool = False

    @property
    def login(self) -> bool:
        return self.status != "paused"


def prepare_provision(
    p: Platform,
    tenant_id: uuid.UUID | str,
    region: str | None = None,
    desired_password: str | None = None,
) -> ProvisionTarget:
    """Check the tenant row, place it if it has no server yet, and store its
    passwords (encrypted) before any server sees them, so a retry after a
    crash converges to the same credentials. Idempotent."""
    tid = uuid.UUID(str(tenant_id))
    default = p.settings.default_region
    if region is not None:
        get_region(region)
    if desired_password is None:
        # Usually everything is in place already: a plain read, no row lock
        # (whose commit would wait for a WAL flush).
        with p.db.connection() as pconn:
            row = store.get(pconn, tid)
        if (
            row is not None
            and row.server_id is not None
            and row.status not in ("deleted", "deleting")
            and row.info.get("password_enc")
            and row.info.get("ro_password_enc")
            and (region is None or (row.region or default) == region)
        ):
            return _target(p, row, row.info)
    with p.db.connection() as pconn, pconn.transaction():
        row = store.get(pconn, tid, for_update=True)
        if row is None:
            raise ProjectNotFound(f"project {tid} does not exist")
        if row.status in ("deleted", "deleting"):
            raise Conflict(f"project {tid} is {row.status}", status=row.status)
        if region is not None and (row.region or default) != region:
            raise Conflict(
                f"project {tid} is in region {row.region}, not {region}; "
                "moving a project between regions is not supported yet"
            )
        server_id = row.server_id
        if server_id is None:
            placement = choose_server(
                policy=PlacementPolicy(p.settings.placement),
                region=row.region or default,
                plan=get_plan(row.plan_type or "free").id,
                servers=p.servers.loads(),
                default_region=default,
            )
            server_id = placement.server_id
            store.set_placement(
                pconn,
                tid,
                server_id=server_id,
                hosted_region=placement.hosted_region,
                reason=placement.reason,
            )
        info = dict(row.info)
        changed = False
        if desired_password is not None:
            info["password_enc"] = p.secrets.encrypt(desired_password)
            info["password_chosen"] = True
            info.pop("spare", None)  # not the spare's password: the slow path sets it
            changed = True
        for key in ("password_enc", "ro_password_enc"):
            if not info.get(key):
                info[key] = p.secrets.encrypt(generate_password())
                changed = True
        if changed:
            store.set_connection_info(pconn, tid, info)
    return _target(p, replace(row, server_id=server_id), info)


def _target(p: Platform, row: store.Tenant, info: dict[str, Any]) -> ProvisionTarget:
    assert row.server_id is not None
    return ProvisionTarget(
        tenant_id=row.id,
        name=tenant_db_name(row.id),
        region=row.region or p.settings.default_region,
        plan=get_plan(row.plan_type or "free"),
        server=p.servers.get(row.server_id),
        status=row.status,
        password=p.secrets.decrypt(info["password_enc"]),
        ro_password=p.secrets.decrypt(info["ro_password_enc"]),
        rw_user=info.get("user") or rw_role_name(tenant_db_name(row.id)),
        ro_user=info.get("ro_user") or ro_role_name(tenant_db_name(row.id)),
        password_chosen=bool(info.get("password_chosen")),
        spare=bool(info.get("spare")),
    )


def converge_target_on_server(p: Platform, t: ProvisionTarget, part: str) -> list[str]:
    """One part ("roles", "database", "privileges") of converging `t` on its server."""
    actions: list[str] = []
    if part == "privileges":
        if not t.login:
            # A paused project's roles cannot log in; resuming runs this part.
            return ["privileges deferred: the project is paused"]
        with p.servers.tenant_session(
            t.server,
            t.name,
            t.rw_user,
            t.password,
            act_as=rw_role_name(t.name),
            evict=project_roles(t.name),
        ) as tconn:
            converge_privileges(tconn, t.name)
        return actions
    with p.servers.admin_connection(t.server, evict=project_roles(t.name)) as aconn:
        if part == "roles":
            if _claim(p, t, aconn):
                return [CLAIMED]
            converge_roles(
                aconn,
                t.name,
                password=t.password,
                ro_password=t.ro_password,
                connection_limit=t.plan.connection_limit,
                statement_timeout_ms=t.plan.statement_timeout_ms,
                login=t.login,
                rw_user=t.rw_user,
                ro_user=t.ro_user,
                password_chosen=t.password_chosen,
                actions=actions,
            )
        elif part == "database":
            if ensure_template(p, t.server, aconn):
                actions.append("template1: large objects made by the database owner only")
            converge_database(aconn, t.name, actions)
            if t.spare:  # made from a spare, converged the slow way: no longer one
                aconn.execute(
                    sql.SQL("COMMENT ON DATABASE {} IS NULL").format(sql.Identifier(t.name))
                )
        else:
            raise ValueError(f"unknown part {part!r}")
    return actions


def _claim(p: Platform, t: ProvisionTarget, aconn: psycopg.Connection[Any]) -> bool:
    """A project made from a prepared spare claims it: roles, database and
    privileges are in place, and one transaction lets it log in (see
    spares.py). False sends it down the slow path, which converges what is
    there (and sets its passwords again)."""
    fresh = t.login and (t.rw_user, t.ro_user) == (rw_role_name(t.name), ro_role_name(t.name))
    if not (t.spare and fresh and not t.password_chosen):
        return False
    if not claim_prepared(
        aconn,
        t.name,
        connection_limit=t.plan.connection_limit,
        statement_timeout_ms=t.plan.statement_timeout_ms,
    ):
        return False
    p.metrics.spares_claimed.labels(t.server.region).inc()
    failpoint("provision.roles.claimed")
    return True


def activate(p: Platform, t: ProvisionTarget, actions: tuple[str, ...] = ()) -> ProvisionedDatabase:
    """Record the finished database: connection info, and status `active`
    (a paused project stays paused)."""
    result = ProvisionedDatabase(
        tenant_id=t.tenant_id,
        server=t.server.name,
        region=t.region,
        hosted_region=t.server.region,
        host=t.server.host,
        port=t.server.port,
        database=t.name,
        user=t.rw_user,
        sslmode=t.server.sslmode,
        sslrootcert=t.server.sslrootcert,
        password=t.password,
        ro_user=t.ro_user,
        ro_password=t.ro_password,
        actions=actions,
    )
    info = connection_info(result, t.server, p.secrets.encrypt)
    if t.password_chosen:
        info["password_chosen"] = True
    with p.db.connection() as pconn:
        store.activate(pconn, t.tenant_id, info, t.server.region)
    return result


def ensure_tenant_database_provisioned(
    tenant_id: uuid.UUID | str,
    region: str,
    desired_password: str | None = None,
    *,
    platform: Platform | None = None,
    publish_routes: bool = True,
) -> ProvisionedDatabase:
    """Provision (or re-converge) the project's database on its regional server.

    The tenant row must exist. If it has no placement yet, one is chosen with
    the configured policy. The password is `desired_password`, else the one
    already stored, else a new random one; it is stored encrypted. The
    provision operation runs the same parts as its steps. The routers learn
    the result (a password set again gets a new salt, which they must hold),
    unless `publish_routes` is False (a caller converging many does it once).
    """
    p = platform or default_platform()
    tid = uuid.UUID(str(tenant_id))
    get_region(region)
    with p.db.connection() as lconn:
        # The lock an operation on the project holds: never interleaved.
        lconn.execute("SELECT pg_advisory_lock(%s)", (resource_lock_key(tid),))
        try:
            target = prepare_provision(p, tid, region, desired_password)
            actions: list[str] = []
            for part in ("roles", "database", "privileges"):
                if CLAIMED in actions:
                    break  # a prepared spare: everything is in place
                actions += converge_target_on_server(p, target, part)
            done = activate(p, target, tuple(actions))
        finally:
            lconn.execute("SELECT pg_advisory_unlock(%s)", (resource_lock_key(tid),))
    if publish_routes:
        # A convergence may have set passwords again (new salts): its
        # verifiers are read afresh.
        routing.publish(p, projects=[tid])
    return done


def connection_info(
    result: ProvisionedDatabase, server: ServerRecord, encrypt: Callable[[str], str]
) -> dict[str, Any]:
    """What `tenants.connection_info` holds: everything but cleartext passwords."""
    return {
        "host": server.host,
        "port": server.port,
        "database": result.database,
        "user": result.user,
        "sslmode": server.sslmode,
        "sslrootcert": server.sslrootcert,
        "server": server.name,
        "server_id": server.id,
        "hosted_region": server.region,
        "password_enc": encrypt(result.password),
        "ro_user": result.ro_user,
        "ro_password_enc": encrypt(result.ro_password),
    }
