"""What pgfleet does on a project's regional server: its roles, its
database and the privileges inside it, converged from any state (every
function looks before it acts), and dropped.

Sessions: the admin in the server's admin database for roles and the
database; the project's own rw role inside its database for privileges
(see fleet/registry.py for why never the admin there).

Three roles per project:
- `tenant_<u>`: NOLOGIN, owns and is granted nothing; it only names the
  database, so the pg_hba rule `samerole` admits its members to the
  database `tenant_<u>` and to no other;
- `tenant_<u>_rw`: the login role that owns the database;
- `tenant_<u>_ro`: a login role that reads what `_rw` owns, now and later,
  and can change nothing.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from psycopg import sql

from pgfleet.crypto import MACHINE_SCRAM_ITERATIONS, is_machine_made, scram_sha256_verifier
from pgfleet.operations.failpoints import failpoint
from pgfleet.tenants.naming import (
    alt_role_name,
    login_role_names,
    main_role_name,
    project_roles,
    ro_role_name,
    rw_role_name,
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


def scram_verifier(
    conn: psycopg.Connection[Any], role: str, password: str, *, chosen: bool = False
) -> str:
    """What the server stores: a SCRAM verifier, never the cleartext. A
    password pgfleet made gets few PBKDF2 iterations (its 192 random bits
    are the protection; see crypto.MACHINE_SCRAM_ITERATIONS), one a person
    `chosen` PostgreSQL's 4,096."""
    if not chosen and is_machine_made(password):
        return scram_sha256_verifier(password, MACHINE_SCRAM_ITERATIONS)
    return conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256").decode()


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


def login_role_attributes(
    conn: psycopg.Connection[Any],
    name: str,
    password: str | None,
    *,
    connection_limit: int,
    login: bool | None = True,
    chosen: bool = False,
) -> sql.Composable:
    """What CREATE/ALTER ROLE gives a project's login role: no attribute
    beyond LOGIN, the plan's limit, and the password's SCRAM verifier.
    `password=None` leaves the role's password as it is (a main role whose
    project now logs in through its alternate); `login=None` leaves LOGIN as
    it is (an alternate whose overlap window has not ended)."""
    secret = (
        sql.SQL("PASSWORD {}").format(
            sql.Literal(scram_verifier(conn, name, password, chosen=chosen))
        )
        if password is not None
        else sql.SQL("")
    )
    return sql.SQL(
        "{} NOSUPERUSER INHERIT NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS {} "
        "CONNECTION LIMIT {}"
    ).format(
        sql.SQL("" if login is None else "LOGIN" if login else "NOLOGIN"),
        secret,
        sql.Literal(connection_limit),
    )


def _ensure_login_role(
    conn: psycopg.Connection[Any],
    name: str,
    password: str | None,
    *,
    connection_limit: int,
    login: bool | None = True,
    chosen: bool = False,
    actions: list[str],
) -> None:
    attrs = login_role_attributes(
        conn, name, password, connection_limit=connection_limit, login=login, chosen=chosen
    )
    _create_or_alter_role(conn, name, attrs, actions)


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
    password_chosen: bool = False,
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
            password_chosen=password_chosen,
            actions=actions,
        )


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
    password_chosen: bool = False,
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
    for main, user, secret, chosen in (
        (rw_role_name(name), rw_user, password, password_chosen),
        (ro_role_name(name), ro_user, ro_password, False),
    ):
        _ensure_login_role(
            conn,
            main,
            secret if user == main else None,
            connection_limit=connection_limit,
            login=login,
            chosen=chosen,
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
                chosen=chosen,
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
    chosen: bool = False,
    actions: list[str],
) -> str:
    """The alternate login role of `main`, with `password`: a member of
    `main` and of the gate, acting as `main` from login on."""
    alt = alt_role_name(main)
    _ensure_login_role(
        conn,
        alt,
        password,
        connection_limit=connection_limit,
        login=login,
        chosen=chosen,
        actions=actions,
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
        # What the owner may change about its database but pgfleet needs as
        # it made it: a template cannot be dropped (delete would fail), and no
        # connections or a limit would keep pgfleet's own sessions out.
        wrong = database_attribute_problems(conn, name)
        if wrong:
            conn.execute(
                sql.SQL(
                    "ALTER DATABASE {} IS_TEMPLATE false ALLOW_CONNECTIONS true CONNECTION LIMIT -1"
                ).format(gate)
            )
            actions.append("reset database attributes: " + ", ".join(wrong))
        # Only the project's login roles may connect.
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC, {}").format(gate, gate))
        conn.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(gate, rw))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(gate, ro))


def database_attribute_problems(conn: psycopg.Connection[Any], name: str) -> list[str]:
    """The attributes of database `name` its owner changed from what pgfleet
    made (not a template, connections allowed, no connection limit)."""
    row = conn.execute(
        "SELECT datistemplate, datallowconn, datconnlimit FROM pg_catalog.pg_database "
        "WHERE datname = %s",
        (name,),
    ).fetchone()
    if row is None:
        return []
    wrong = []
    if row[0]:
        wrong.append("is a template")
    if not row[1]:
        wrong.append("refuses connections")
    if row[2] not in (-1, INVALID_DB_CONNLIMIT):
        wrong.append(f"connection limit {row[2]}")
    return wrong


def drop_database(conn: psycopg.Connection[Any], name: str) -> bool:
    """Drop database `name`, its sessions ended, even if its owner made it a
    template (DROP refuses templates). False if there was none."""
    if not conn.execute(
        "SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s", (name,)
    ).fetchone():
        return False
    ident = sql.Identifier(name)
    # (A database a DROP left invalid refuses ALTER, but DROP refuses a
    # template, so an invalid one never is.)
    if conn.execute(
        "SELECT datistemplate FROM pg_catalog.pg_database WHERE datname = %s", (name,)
    ).fetchone() == (True,):
        conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(ident))
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
    return True


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


# A project's role that could not be dropped, made inert and renamed out of
# every project's names (see drop_role); a refill drops it once it can.
GONE_PREFIX = "pgfleet_gone_"


def drop_role(conn: psycopg.Connection[Any], role: str) -> str | None:
    """Drop a project's role (`conn`: an admin session, not in a
    transaction); what was done, or None if it was not there.

    Any tenant may GRANT privileges on its own objects to any role it can
    see in pg_roles, another project's or a prepared spare's among them,
    and PostgreSQL then refuses to drop that role while the grant stands,
    in a database pgfleet's admin does not enter. Such a grant must not
    fail another project's delete, an undo or a refill: the role is made
    unable to log in (NOLOGIN, no password, no connections) and renamed
    out of every project's names instead, and a later refill drops it once
    nothing depends on it (the granting database dropped, or the grant
    revoked). What it was granted stays in the granter's own database."""
    if not role_exists(conn, role):
        return None
    if _drop_if_free(conn, role):
        return f"drop role {role}"
    ident = sql.Identifier(role)
    gone = GONE_PREFIX + uuid.uuid4().hex
    with conn.transaction():
        conn.execute(
            sql.SQL(
                "ALTER ROLE {} NOLOGIN PASSWORD NULL CONNECTION LIMIT 0; "
                "ALTER ROLE {} RESET ALL; ALTER ROLE {} RENAME TO {}"
            ).format(ident, ident, ident, sql.Identifier(gone))
        )
    return f"role {role} kept as {gone} (another database grants it privileges)"


def _drop_if_free(conn: psycopg.Connection[Any], role: str) -> bool:
    """Drop the role unless another database still depends on it."""
    try:
        with conn.transaction():
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    except psycopg.errors.DependentObjectsStillExist:
        return False
    return True


def drop_gone_roles(conn: psycopg.Connection[Any]) -> list[str]:
    """Drop the roles drop_role could not, those that nothing depends on now."""
    roles = conn.execute(
        "SELECT rolname FROM pg_catalog.pg_roles WHERE rolname LIKE %s",
        (GONE_PREFIX.replace("_", "\\_") + "%",),
    ).fetchall()
    return [role for (role,) in roles if _drop_if_free(conn, role)]


def drop_on_server(conn: psycopg.Connection[Any], *, name: str) -> list[str]:
    """Drop the project's database and roles; harmless if any is already gone."""
    actions: list[str] = []
    if drop_database(conn, name):
        actions.append("drop database")
    for role in (*login_role_names(name), name):
        done = drop_role(conn, role)
        if done:
            actions.append(done)
    return actions
