"""Provisioning a project's database on its regional server.

`ensure_tenant_database_provisioned` is the seed's operation. It is idempotent
and converges from any partial state: role without database, database without
role (or owned by someone else), wrong password, a database left invalid by an
interrupted DROP DATABASE. Every step looks before it acts.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgfleet.errors import Conflict, ProjectNotFound
from pgfleet.fleet.registry import ServerRecord
from pgfleet.platform.core import Platform, default_platform
from pgfleet.regions import PlacementPolicy, choose_server, get_plan, get_region

# PostgreSQL marks a database whose DROP was interrupted with this datconnlimit
# (DATCONNLIMIT_INVALID_DB); it can only be dropped.
INVALID_DB_CONNLIMIT = -2


def tenant_db_name(tenant_id: uuid.UUID | str) -> str:
    """The seed's naming: `tenant_<uuid with _>`, also used for the login role."""
    return "tenant_" + str(uuid.UUID(str(tenant_id))).replace("-", "_")


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
    actions: tuple[str, ...] = ()


def converge_on_server(
    conn: psycopg.Connection[Any],
    *,
    name: str,
    password: str,
    connection_limit: int,
    statement_timeout_ms: int,
) -> list[str]:
    """Make role `name` and database `name` exist as they should on this server.

    `conn` is an autocommit admin connection. Returns what it changed.
    """
    actions: list[str] = []
    role = sql.Identifier(name)
    # The server gets a SCRAM verifier, never the cleartext.
    verifier = conn.pgconn.encrypt_password(
        password.encode(), name.encode(), b"scram-sha-256"
    ).decode()
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
    if exists is None:
        try:
            conn.execute(
                sql.SQL(
                    "CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                    "NOBYPASSRLS PASSWORD {} CONNECTION LIMIT {}"
                ).format(role, sql.Literal(verifier), sql.Literal(connection_limit))
            )
            actions.append("create role")
        except psycopg.errors.DuplicateObject:
            exists = (1,)  # created concurrently; converge below
    if exists is not None:
        conn.execute(
            sql.SQL(
                "ALTER ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                "NOBYPASSRLS PASSWORD {} CONNECTION LIMIT {}"
            ).format(role, sql.Literal(verifier), sql.Literal(connection_limit))
        )
        actions.append("set role password")
    conn.execute(
        sql.SQL("ALTER ROLE {} SET statement_timeout = {}").format(
            role, sql.Literal(f"{statement_timeout_ms}ms")
        )
    )

    db = conn.execute(
        "SELECT pg_get_userbyid(datdba), datconnlimit FROM pg_database WHERE datname = %s",
        (name,),
    ).fetchone()
    if db is not None and db[1] == INVALID_DB_CONNLIMIT:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(role))
        actions.append("drop invalid database")
        db = None
    if db is None:
        try:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(role, role))
            actions.append("create database")
        except psycopg.errors.DuplicateDatabase:
            db = (None, None)
    if db is not None and db[0] != name:
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(role, role))
        actions.append("set database owner")
    # Only the project's role may connect (pg_hba limits it to this database too).
    conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(role))
    conn.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(role, role))
    return actions


def drop_on_server(conn: psycopg.Connection[Any], *, name: str) -> list[str]:
    """Drop database and role `name`; harmless if either is already gone."""
    actions: list[str] = []
    ident = sql.Identifier(name)
    if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        actions.append("drop database")
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))
        actions.append("drop role")
    return actions


def _tenant_lock_key(tenant_id: uuid.UUID) -> int:
    return int.from_bytes(tenant_id.bytes[:8], "big", signed=True)


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
    already stored, else a new random one; it is stored encrypted.
    """
    p = platform or default_platform()
    tid = uuid.UUID(str(tenant_id))
    get_region(region)
    name = tenant_db_name(tid)
    with p.db.connection() as pconn:
        pconn.execute("SELECT pg_advisory_lock(%s)", (_tenant_lock_key(tid),))
        try:
            with pconn.cursor(row_factory=dict_row) as cur:
                row = cur.execute(
                    "SELECT id, region, plan_type, status, server_id, connection_info "
                    "FROM tenants WHERE id = %s",
                    (tid,),
                ).fetchone()
            pconn.commit()
            if row is None:
                raise ProjectNotFound(f"project {tid} does not exist")
            if row["status"] == "deleted":
                raise Conflict(f"project {tid} is deleted")
            if (row["region"] or "us-east-1") != region:
                raise Conflict(
                    f"project {tid} is in region {row['region']}, not {region}; "
                    "moving a project between regions is not supported yet"
                )
            plan = get_plan(row["plan_type"] or "free")
            server_id = row["server_id"]
            if server_id is None:
                placement = choose_server(
                    policy=PlacementPolicy(p.settings.placement),
                    region=region,
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
                pconn.commit()
            server = p.servers.get(server_id)
            info = row["connection_info"] or {}
            password = desired_password
            if password is None and info.get("password_enc"):
                password = p.secrets.decrypt(info["password_enc"])
            if password is None:
                from pgfleet.crypto import generate_password

                password = generate_password()

            with p.servers.admin_connection(server) as aconn:
                actions = converge_on_server(
                    aconn,
                    name=name,
                    password=password,
                    connection_limit=plan.connection_limit,
                    statement_timeout_ms=plan.statement_timeout_ms,
                )
            result = ProvisionedDatabase(
                tenant_id=tid,
                server=server.name,
                region=region,
                hosted_region=server.region,
                host=server.host,
                port=server.port,
                database=name,
                user=name,
                sslmode=server.sslmode,
                password=password,
                actions=tuple(actions),
            )
            pconn.execute(
                "UPDATE tenants SET status = 'active', connection_info = %s, error = NULL, "
                "hosted_region = %s, updated_at = now() WHERE id = %s",
                (
                    psycopg.types.json.Jsonb(
                        connection_info(result, server, p.secrets.encrypt(password))
                    ),
                    server.region,
                    tid,
                ),
            )
            pconn.commit()
            return result
        finally:
            pconn.rollback()
            pconn.execute("SELECT pg_advisory_unlock(%s)", (_tenant_lock_key(tid),))
            pconn.commit()


def connection_info(
    result: ProvisionedDatabase, server: ServerRecord, password_enc: str
) -> dict[str, Any]:
    """What `tenants.connection_info` holds: everything but the cleartext."""
    return {
        "host": server.host,
        "port": server.port,
        "database": result.database,
        "user": result.user,
        "sslmode": server.sslmode,
        "server": server.name,
        "server_id": server.id,
        "hosted_region": server.region,
        "password_enc": password_enc,
    }
