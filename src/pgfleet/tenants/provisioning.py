"""Provisioning a project's database on its regional server.

`ensure_tenant_database_provisioned` is the seed's operation. It is idempotent
and converges from any partial state: role without database, database without
role (or owned by someone else), wrong password, a database left invalid by an
interrupted DROP DATABASE. Every step looks before it acts.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgfleet.crypto import generate_password
from pgfleet.errors import Conflict, ProjectNotFound
from pgfleet.fleet.registry import ServerRecord
from pgfleet.operations.failpoints import failpoint
from pgfleet.platform.core import Platform, default_platform
from pgfleet.regions import PlacementPolicy, Plan, choose_server, get_plan, get_region
from pgfleet.tenants.naming import (
    alt_role_name,
    login_role_names,
    main_role_name,
    project_roles,
    ro_role_name,
    rw_role_name,
    tenant_db_name,
    tenant_lock_key,
)
from pgfleet.tenants.roles import (
    WantedRole,
    existing_alternates,
    read_role_states,
    role_settings,
    wanted_roles,
)

# PostgreSQL marks a database whose DROP was interrupted with this datconnlimit
# (DATCONNLIMIT_INVALID_DB); it can only be dropped.
INVALID_DB_CONNLIMIT = -2


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


def scram_verifier(conn: psycopg.Connection[Any], role: str, password: str) -> str:
    """What the server stores: a SCRAM verifier, never the cleartext."""
    return conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256").decode()


def _ensure_login_role(
    conn: psycopg.Connection[Any],
    name: str,
    password: str | None,
    *,
    connection_limit: int,
    login: bool | None = True,
    actions: list[str],
) -> None:
    """`password=None` leaves the role's password as it is (a main role whose
    project now logs in through its alternate); `login=None` leaves LOGIN as
    it is (an alternate whose overlap window has not ended)."""
    secret = (
        sql.SQL("PASSWORD {}").format(sql.Literal(scram_verifier(conn, name, password)))
        if password is not None
        else sql.SQL("")
    )
    attrs = sql.SQL(
        "{} NOSUPERUSER INHERIT NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS {} "
        "CONNECTION LIMIT {}"
    ).format(
        sql.SQL("" if login is None else "LOGIN" if login else "NOLOGIN"),
        secret,
        sql.Literal(connection_limit),
    )
    _create_or_alter_role(conn, name, attrs, actions)


def role_exists(conn: psycopg.Connection[Any], role: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


def _create_or_alter_role(
    conn: psycopg.Connection[Any], name: str, attrs: sql.Composable, actions: list[str]
) -> None:
    role = sql.Identifier(name)
    if not role_exists(conn, name):
        try:
            with conn.transaction():  # a savepoint inside the caller's transaction
                conn.execute(sql.SQL("CREATE ROLE {} {}").format(role, attrs))
            actions.append(f"create role {name}")
            return
        except psycopg.errors.DuplicateObject:
            pass  # created concurrently; converge below
    conn.execute(sql.SQL("ALTER ROLE {} {}").format(role, attrs))


def converge_roles(
    conn: psycopg.Connection[Any],
    name: str,
    *,
    password: str,
    ro_password: str,
    connection_limit: int,
    statement_timeout_ms: int,
    login: bool = True,
    rw_user: str | None = None,
    ro_user: str | None = None,
    actions: list[str],
) -> None:
    """The roles, in one transaction (each DDL commit waits for a WAL flush).

    `rw_user`/`ro_user` are the login roles the project's credentials use
    now (the main ones unless a rotation moved them to the alternates); the
    passwords go to those."""
    with conn.transaction():
        _converge_roles(
            conn,
            name,
            password=password,
            ro_password=ro_password,
            connection_limit=connection_limit,
            statement_timeout_ms=statement_timeout_ms,
            login=login,
            rw_user=rw_user or rw_role_name(name),
            ro_user=ro_user or ro_role_name(name),
            actions=actions,
        )


def converge_database(conn: psycopg.Connection[Any], name: str, actions: list[str]) -> None:
    """The database, owned by `_rw`, reachable only by the project's login roles."""
    gate, rw, ro = (sql.Identifier(n) for n in (name, rw_role_name(name), ro_role_name(name)))
    db = conn.execute(
        "SELECT pg_get_userbyid(datdba), datconnlimit FROM pg_database WHERE datname = %s",
        (name,),
    ).fetchone()
    if db is not None and db[1] == INVALID_DB_CONNLIMIT:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(gate))
        actions.append("drop invalid database")
        db = None
    if db is None and claim_spare(conn, name):
        actions.append("claim spare database")
        failpoint("provision.database.created")
        db = (None, None)  # owned by the admin: the owner is set below
    if db is None:
        try:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(gate, rw))
            actions.append("create database")
            failpoint("provision.database.created")
        except psycopg.errors.DuplicateDatabase:
            db = (None, None)
    with conn.transaction():
        if db is not None and db[0] != rw_role_name(name):
            conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(gate, rw))
            actions.append("set database owner")
        # Only the project's login roles may connect.
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC, {}").format(gate, gate))
        conn.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(gate, rw))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(gate, ro))


SPARE_PREFIX = "pgfleet_spare_"
_SPARE_LOCK = 0x7370617265  # "spare": one refiller per server at a time


def claim_spare(conn: psycopg.Connection[Any], name: str) -> bool:
    """Rename a spare database to `name`, if the server has one.

    CREATE DATABASE copies a template and waits for its files and WAL to
    reach the disk: most of a provision's time. Spares are made ahead of time
    by the workers (`refill_spares`), off the request path; renaming one is a
    catalog change. Nobody can log in to a spare (pg_hba admits a tenant role
    only to its own database), and it gets the project's owner and ACL right
    after, in the same step."""
    spares = conn.execute(
        "SELECT datname FROM pg_database WHERE datname LIKE %s AND datallowconn "
        "AND datconnlimit <> %s ORDER BY datname LIMIT 4",
        (SPARE_PREFIX.replace("_", "\\_") + "%", INVALID_DB_CONNLIMIT),
    ).fetchall()
    for (spare,) in spares:
        try:
            conn.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(spare), sql.Identifier(name)
                )
            )
            return True
        except (
            psycopg.errors.InvalidCatalogName,  # another worker took it
            psycopg.errors.ObjectInUse,  # someone is connected to it
            psycopg.errors.DuplicateDatabase,  # `name` appeared meanwhile
        ):
            continue
    return False


def refill_spares(conn: psycopg.Connection[Any], target: int) -> int:
    """Bring the server's spare databases up to `target`; returns how many
    were made. One refiller per server at a time (advisory lock)."""
    got = conn.execute("SELECT pg_try_advisory_lock(%s)", (_SPARE_LOCK,)).fetchone()
    if not (got and got[0]):
        return 0
    made = 0
    try:
        row = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname LIKE %s",
            (SPARE_PREFIX.replace("_", "\\_") + "%",),
        ).fetchone()
        for _ in range(target - (int(row[0]) if row else 0)):
            spare = SPARE_PREFIX + uuid.uuid4().hex
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(spare)))
            made += 1
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_SPARE_LOCK,))
    return made


def converge_privileges(tconn: psycopg.Connection[Any], name: str) -> None:
    """Inside the project's database, in a session logged in as the project's
    own `_rw` role (never as an admin: what the tenant planted there runs
    with the tenant's privileges only): the gate owns nothing, and `_ro`
    reads what `_rw` owns, now and later. The session resolves names in
    pg_catalog only; what this reads is schema-qualified anyway."""
    gate, rw, ro = (sql.Identifier(n) for n in (name, rw_role_name(name), ro_role_name(name)))
    with tconn.transaction():
        # The gate must own nothing and hold no privilege, or its members would
        # inherit them: hand what it owns to _rw, then drop its grants and
        # default privileges (_rw may: it is a member of the gate). First, so
        # the schema list below sees the result.
        tconn.execute(sql.SQL("REASSIGN OWNED BY {} TO {}").format(gate, rw))
        tconn.execute(sql.SQL("DROP OWNED BY {}").format(gate))
        schemas = [
            r[0]
            for r in tconn.execute(
                "SELECT n.nspname FROM pg_catalog.pg_namespace n "
                "WHERE n.nspowner OPERATOR(pg_catalog.=) %s::pg_catalog.regrole "
                "OR n.nspname OPERATOR(pg_catalog.=) 'public'",
                (rw_role_name(name),),
            )
        ]
        stmts: list[sql.Composable] = [
            sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} GRANT SELECT ON TABLES TO {}").format(
                rw, ro
            ),
            sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} GRANT SELECT ON SEQUENCES TO {}").format(
                rw, ro
            ),
            sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} GRANT USAGE ON SCHEMAS TO {}").format(
                rw, ro
            ),
        ]
        for schema in schemas:
            nsp = sql.Identifier(schema)
            stmts += [
                sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(nsp, ro),
                sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(nsp, ro),
                sql.SQL("GRANT SELECT ON ALL SEQUENCES IN SCHEMA {} TO {}").format(nsp, ro),
            ]
        tconn.execute(sql.SQL("; ").join(stmts))


def _converge_roles(
    conn: psycopg.Connection[Any],
    name: str,
    *,
    password: str,
    ro_password: str,
    connection_limit: int,
    statement_timeout_ms: int,
    login: bool = True,
    rw_user: str,
    ro_user: str,
    actions: list[str],
) -> None:
    states = read_role_states(conn, project_roles(name))
    _create_or_alter_role(
        conn,
        name,
        sql.SQL(
            "NOLOGIN NOSUPERUSER INHERIT NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
            "PASSWORD NULL"
        ),
        actions,
    )
    for main, user, secret in (
        (rw_role_name(name), rw_user, password),
        (ro_role_name(name), ro_user, ro_password),
    ):
        _ensure_login_role(
            conn,
            main,
            secret if user == main else None,
            connection_limit=connection_limit,
            login=login,
            actions=actions,
        )
        alt = alt_role_name(main)
        if user != main:
            ensure_alternate(
                conn,
                main,
                secret,
                connection_limit=connection_limit,
                statement_timeout_ms=statement_timeout_ms,
                login=login,
                actions=actions,
            )
        elif alt in states:  # not in use: its attributes and limit, its login as it is
            _ensure_login_role(
                conn, alt, None, connection_limit=connection_limit, login=None, actions=actions
            )
    alternates = existing_alternates(name, states) | {
        u for u in (rw_user, ro_user) if u.endswith("_alt")
    }
    wanted = wanted_roles(
        name,
        login=login,
        connection_limit=connection_limit,
        statement_timeout_ms=statement_timeout_ms,
        alternates=alternates,
    )
    _converge_settings_and_members(conn, name, wanted, actions)


def _converge_settings_and_members(
    conn: psycopg.Connection[Any], name: str, wanted: dict[str, WantedRole], actions: list[str]
) -> None:
    """Per-role settings exactly pgfleet's, memberships exactly the project's
    own (the server's admin aside). Looks before it acts: an ALTER only for
    what differs."""
    states = read_role_states(conn, list(wanted))
    admin = conn.info.user
    for role, want in wanted.items():
        have = states.get(role)
        if have is None:
            continue
        ident = sql.Identifier(role)
        for db in have.database_settings:
            conn.execute(
                sql.SQL("ALTER ROLE {} IN DATABASE {} RESET ALL").format(ident, sql.Identifier(db))
            )
            actions.append(f"reset settings of {role} in database {db}")
        if have.settings != want.settings:
            if have.settings:
                conn.execute(sql.SQL("ALTER ROLE {} RESET ALL").format(ident))
                if set(have.settings) - set(want.settings):
                    actions.append(f"reset settings of {role}")
            for pair in want.settings:
                key, _, value = pair.partition("=")
                conn.execute(
                    sql.SQL("ALTER ROLE {} SET {} = {}").format(
                        ident, sql.Identifier(key), sql.Literal(value)
                    )
                )
        for group in sorted(want.member_of - have.member_of):
            conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), ident))
        for group in sorted(have.member_of - want.member_of):
            conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(group), ident))
            actions.append(f"remove {role} from {group}")
        for member in sorted(have.members - want.members - {admin}):
            conn.execute(sql.SQL("REVOKE {} FROM {}").format(ident, sql.Identifier(member)))
            actions.append(f"remove {member} from {role}")


def ensure_alternate(
    conn: psycopg.Connection[Any],
    main: str,
    password: str,
    *,
    connection_limit: int,
    statement_timeout_ms: int,
    login: bool,
    actions: list[str],
) -> str:
    """The alternate login role of `main`, with `password`: a member of
    `main` and of the gate, acting as `main` from login on."""
    alt = alt_role_name(main)
    _ensure_login_role(
        conn, alt, password, connection_limit=connection_limit, login=login, actions=actions
    )
    name = main_role_name(main).removesuffix("_rw").removesuffix("_ro")
    gate = sql.Identifier(name)
    for group in (sql.Identifier(main), gate):
        conn.execute(sql.SQL("GRANT {} TO {}").format(group, sql.Identifier(alt)))
    ident = sql.Identifier(alt)
    for key, value in role_settings(alt, statement_timeout_ms, name=name).items():
        conn.execute(
            sql.SQL("ALTER ROLE {} SET {} = {}").format(
                ident, sql.Identifier(key), sql.Literal(value)
            )
        )
    return alt


def drop_on_server(conn: psycopg.Connection[Any], *, name: str) -> list[str]:
    """Drop the project's database and roles; harmless if any is already gone."""
    actions: list[str] = []
    ident = sql.Identifier(name)
    if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        actions.append("drop database")
    for role in (*login_role_names(name), name):
        if role_exists(conn, role):
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
            actions.append(f"drop role {role}")
    return actions


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
    if region is not None:
        get_region(region)
    if desired_password is None:
        # Usually everything is in place already: a plain read, no row lock
        # (whose commit would wait for a WAL flush).
        with p.db.connection() as pconn, pconn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                "SELECT id, region, plan_type, status, server_id, connection_info "
                "FROM tenants WHERE id = %s",
                (tid,),
            ).fetchone()
        info = (row or {}).get("connection_info") or {}
        if (
            row is not None
            and row["server_id"] is not None
            and row["status"] not in ("deleted", "deleting")
            and info.get("password_enc")
            and info.get("ro_password_enc")
            and (region is None or (row["region"] or "us-east-1") == region)
        ):
            return _target(p, row, info)
    with p.db.connection() as pconn, pconn.transaction():
        with pconn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                "SELECT id, region, plan_type, status, server_id, connection_info "
                "FROM tenants WHERE id = %s FOR UPDATE",
                (tid,),
            ).fetchone()
        if row is None:
            raise ProjectNotFound(f"project {tid} does not exist")
        if row["status"] in ("deleted", "deleting"):
            raise Conflict(f"project {tid} is {row['status']}", status=row["status"])
        if region is not None and (row["region"] or "us-east-1") != region:
            raise Conflict(
                f"project {tid} is in region {row['region']}, not {region}; "
                "moving a project between regions is not supported yet"
            )
        plan = get_plan(row["plan_type"] or "free")
        server_id = row["server_id"]
        if server_id is None:
            placement = choose_server(
                policy=PlacementPolicy(p.settings.placement),
                region=row["region"] or "us-east-1",
                plan=plan.id,
                servers=p.servers.loads(),
                default_region=p.settings.default_region,
            )
            server_id = placement.server_id
            pconn.execute(
                "UPDATE tenants SET server_id = %s, hosted_region = %s, "
                "placement_reason = %s, updated_at = now() WHERE id = %s",
                (server_id, placement.hosted_region, placement.reason, tid),
            )
        info = dict(row["connection_info"] or {})
        changed = False
        if desired_password is not None:
            info["password_enc"] = p.secrets.encrypt(desired_password)
            changed = True
        for key in ("password_enc", "ro_password_enc"):
            if not info.get(key):
                info[key] = p.secrets.encrypt(generate_password())
                changed = True
        if changed:
            pconn.execute(
                "UPDATE tenants SET connection_info = %s, updated_at = now() WHERE id = %s",
                (psycopg.types.json.Jsonb(info), tid),
            )
    return _target(p, {**row, "server_id": server_id}, info)


def _target(p: Platform, row: dict[str, Any], info: dict[str, Any]) -> ProvisionTarget:
    return ProvisionTarget(
        tenant_id=row["id"],
        name=tenant_db_name(row["id"]),
        region=row["region"] or "us-east-1",
        plan=get_plan(row["plan_type"] or "free"),
        server=p.servers.get(row["server_id"]),
        status=row["status"],
        password=p.secrets.decrypt(info["password_enc"]),
        ro_password=p.secrets.decrypt(info["ro_password_enc"]),
        rw_user=info.get("user") or rw_role_name(tenant_db_name(row["id"])),
        ro_user=info.get("ro_user") or ro_role_name(tenant_db_name(row["id"])),
    )


def converge_target_on_server(p: Platform, t: ProvisionTarget, part: str) -> list[str]:
    """One part ("roles", "database", "privileges") of converging `t` on its server."""
    actions: list[str] = []
    if part == "privileges":
        if not t.login:
            # A paused project's roles cannot log in; resuming runs this part.
            return ["privileges deferred: the project is paused"]
        with p.servers.tenant_session(
            t.server, t.name, t.rw_user, t.password, act_as=rw_role_name(t.name)
        ) as tconn:
            converge_privileges(tconn, t.name)
        return actions
    with p.servers.admin_connection(t.server) as aconn:
        if part == "roles":
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
                actions=actions,
            )
        elif part == "database":
            converge_database(aconn, t.name, actions)
        else:
            raise ValueError(f"unknown part {part!r}")
    return actions


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
    with p.db.connection() as pconn:
        pconn.execute(
            "UPDATE tenants SET status = CASE WHEN status = 'paused' THEN 'paused' "
            "ELSE 'active' END, connection_info = %s, error = NULL, "
            "hosted_region = %s, updated_at = now() WHERE id = %s AND status <> 'deleted'",
            (
                psycopg.types.json.Jsonb(connection_info(result, t.server, p.secrets.encrypt)),
                t.server.region,
                t.tenant_id,
            ),
        )
    return result


def ensure_tenant_database_provisioned(
    tenant_id: uuid.UUID | str,
    region: str,
    desired_password: str | None = None,
    *,
    platform: Platform | None = None,
) -> ProvisionedDatabase:
    """Provision (or re-converge) the project's database on its regional server.

    The tenant row must exist. If it has no placement yet, one is chosen with
    the configured policy. The password is `desired_password`, else the one
    already stored, else a new random one; it is stored encrypted. The
    provision operation runs the same parts as its steps.
    """
    p = platform or default_platform()
    tid = uuid.UUID(str(tenant_id))
    get_region(region)
    with p.db.connection() as lconn:
        lconn.execute("SELECT pg_advisory_lock(%s)", (tenant_lock_key(tid),))
        try:
            target = prepare_provision(p, tid, region, desired_password)
            actions: list[str] = []
            for part in ("roles", "database", "privileges"):
                actions += converge_target_on_server(p, target, part)
            return activate(p, target, tuple(actions))
        finally:
            lconn.execute("SELECT pg_advisory_unlock(%s)", (tenant_lock_key(tid),))


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
