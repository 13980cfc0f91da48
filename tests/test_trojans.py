"""A tenant plants trojans in its own database, then every code path of
pgfleet that touches its server runs: none of them may run the tenant's code
with more privilege than the tenant has.

The trojans (planted as the project's own rw role, with nothing but the
privileges every project has): operators `=`, `<>` and `~~` (LIKE) for the
type pairs catalog queries compare, functions and a `count(*)` aggregate
named like catalog functions, views named like catalog tables, all in the
schemas a privileged session could resolve names in (`evil`, the admin's and
the probe's `$user` schemas, `public`), and the database- and role-level
`search_path` set to reach them first. Each one logs who ran it
(`public.trojan_log`) and tries to make another project's role, and its own,
a superuser and a member of `pg_execute_server_program`.

After every path: the log holds only the tenant's own roles, and no tenant
role on any server has an attribute or membership beyond its project's.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgfleet.fleet.health import check_all
from pgfleet.fleet.registry import PROBE_ROLE
from pgfleet.platform.core import Platform
from pgfleet.tenants import routing
from pgfleet.tenants.provisioning import ensure_tenant_database_provisioned
from pgfleet.tenants.reconcile import reconcile
from pgfleet.tenants.spares import CLAIMED, refill_spares
from tests.helpers import Api, FleetUnderTest, connect, create_ok, finished, tenant_client

REGION = "eu-central-1"
SCHEMAS = ("evil", "pgfleet_admin", "pgfleet_probe", "public")
# (left, right, the comparison done right) for the operators the trojans shadow.
PAIRS = {
    "=": [
        ("oid", "oid", "$1 OPERATOR(pg_catalog.=) $2"),
        ("oid", "regrole", "$1 OPERATOR(pg_catalog.=) $2::oid"),
        ("name", "name", "$1 OPERATOR(pg_catalog.=) $2"),
        ("name", "text", "$1 OPERATOR(pg_catalog.=) $2"),
        ("text", "text", "$1 OPERATOR(pg_catalog.=) $2"),
        ("int4", "int4", "$1 OPERATOR(pg_catalog.=) $2"),
        ("char", "char", "$1 OPERATOR(pg_catalog.=) $2"),
    ],
    "<>": [
        ("name", "text", "$1 OPERATOR(pg_catalog.<>) $2"),
        ("int4", "int4", "$1 OPERATOR(pg_catalog.<>) $2"),
    ],
    "~~": [
        ("name", "text", "$1 OPERATOR(pg_catalog.~~) $2"),
        ("text", "text", "$1 OPERATOR(pg_catalog.~~) $2"),
    ],
}
# Functions named like the catalog's: (name, argument types, return type, body).
FUNCTIONS = [
    ("pg_get_userbyid", "oid", "name", "pg_catalog.pg_get_userbyid($1)"),
    ("format_type", "oid, int4", "text", "pg_catalog.format_type($1, $2)"),
    ("pg_terminate_backend", "int4", "bool", "false"),
    ("pg_database_size", "oid", "int8", "pg_catalog.pg_database_size($1)"),
    ("current_setting", "text", "text", "pg_catalog.current_setting($1)"),
    ("pg_backend_pid", "", "int4", "pg_catalog.pg_backend_pid()"),
    ("quote_ident", "text", "text", "pg_catalog.quote_ident($1)"),
    ("lower", "text", "text", "pg_catalog.lower($1)"),
    ("pg_try_advisory_lock", "int8", "bool", "pg_catalog.pg_try_advisory_lock($1)"),
    ("set_config", "text, text, bool", "text", "pg_catalog.set_config($1, $2, $3)"),
]
VIEWS = [
    "pg_class",
    "pg_namespace",
    "pg_roles",
    "pg_database",
    "pg_stat_activity",
    "pg_auth_members",
    "pg_db_role_setting",
    "pg_settings",
]
OPNAMES = {"=": "eq", "<>": "ne", "~~": "like"}


def direct_connection(api: Api, pid: str) -> dict[str, Any]:
    c: dict[str, Any] = api.get(f"/v1/projects/{pid}/connection", params={"direct": "true"}).json()
    return c


@dataclass
class Trojaned:
    """The attacker's project (trojans planted) and its second project (a
    victim its trojans try to escalate), both on REGION."""

    project: dict[str, Any]
    victim: dict[str, Any]

    @property
    def database(self) -> str:
        return str(self.project["connection"]["database"])

    def roles(self) -> set[str]:
        base = self.database
        return {base, f"{base}_rw", f"{base}_ro", f"{base}_rw_alt", f"{base}_ro_alt"}


def plant(conn: psycopg.Connection[Any], database: str, victims: list[str]) -> None:
    """Every trojan, as the project's own rw role, in its own database."""
    stmts: list[sql.Composable] = [
        sql.SQL(
            "CREATE TABLE public.trojan_log (who text, session_who text, via text, "
            "at timestamptz DEFAULT now()); GRANT ALL ON public.trojan_log TO PUBLIC"
        )
    ]
    escalate = sql.SQL(" ").join(
        sql.SQL(
            "BEGIN EXECUTE {}; EXCEPTION WHEN OTHERS THEN NULL; END; "
            "BEGIN EXECUTE {}; EXCEPTION WHEN OTHERS THEN NULL; END;"
        ).format(
            sql.Literal(
                sql.SQL("ALTER ROLE {} SUPERUSER CREATEROLE")
                .format(sql.Identifier(v))
                .as_string(conn)
            ),
            sql.Literal(
                sql.SQL("GRANT pg_execute_server_program TO {}")
                .format(sql.Identifier(v))
                .as_string(conn)
            ),
        )
        for v in victims
    )
    stmts.append(
        sql.SQL(
            "CREATE SCHEMA evil; GRANT USAGE ON SCHEMA evil TO PUBLIC; "
            "CREATE FUNCTION evil.fire(via text) RETURNS bool LANGUAGE plpgsql AS $f$ BEGIN "
            "BEGIN INSERT INTO public.trojan_log (who, session_who, via) "
            "VALUES (current_user, session_user, via); EXCEPTION WHEN OTHERS THEN NULL; END; "
            "{} RETURN true; END $f$; GRANT EXECUTE ON FUNCTION evil.fire(text) TO PUBLIC; "
            "CREATE FUNCTION evil.tally(int8) RETURNS int8 LANGUAGE plpgsql AS $f$ BEGIN "
            "PERFORM evil.fire('aggregate count(*)'); RETURN $1 + 1; END $f$"
        ).format(escalate)
    )
    for schema in SCHEMAS:
        nsp = sql.Identifier(schema)
        if schema not in ("public", "evil"):
            stmts.append(
                sql.SQL("CREATE SCHEMA {0}; GRANT USAGE ON SCHEMA {0} TO PUBLIC").format(nsp)
            )
        for op, pairs in PAIRS.items():
            for left, right, body in pairs:
                fn = sql.Identifier(f"{OPNAMES[op]}_{left}_{right}")
                stmts.append(
                    sql.SQL(
                        "CREATE FUNCTION {nsp}.{fn}({l}, {r}) RETURNS bool LANGUAGE plpgsql "
                        "AS $f$ BEGIN PERFORM evil.fire({via}); RETURN {body}; END $f$; "
                        "CREATE OPERATOR {nsp}.{op} (leftarg = {l}, rightarg = {r}, "
                        "function = {nsp}.{fn})"
                    ).format(
                        nsp=nsp,
                        fn=fn,
                        l=sql.SQL(left),
                        r=sql.SQL(right),
                        via=sql.Literal(f"operator {schema}.{op} ({left}, {right})"),
                        body=sql.SQL(body),
                        op=sql.SQL(op),
                    )
                )
        for name, args, ret, body in FUNCTIONS:
            stmts.append(
                sql.SQL(
                    "CREATE FUNCTION {nsp}.{fn}({args}) RETURNS {ret} LANGUAGE plpgsql "
                    "AS $f$ BEGIN PERFORM evil.fire({via}); RETURN {body}; END $f$"
                ).format(
                    nsp=nsp,
                    fn=sql.Identifier(name),
                    args=sql.SQL(args),
                    ret=sql.SQL(ret),
                    via=sql.Literal(f"function {schema}.{name}"),
                    body=sql.SQL(body),
                )
            )
        stmts.append(
            sql.SQL(
                "CREATE AGGREGATE {}.count(*) (sfunc = evil.tally, stype = int8, initcond = 0)"
            ).format(nsp)
        )
        for view in VIEWS:
            stmts.append(
                sql.SQL(
                    "CREATE VIEW {nsp}.{v} AS SELECT c.* FROM pg_catalog.{v} c "
                    "WHERE evil.fire({via}); GRANT SELECT ON {nsp}.{v} TO PUBLIC"
                ).format(nsp=nsp, v=sql.Identifier(view), via=sql.Literal(f"view {schema}.{view}"))
            )
    path = sql.SQL("evil, pgfleet_admin, pgfleet_probe, public, pg_catalog")
    stmts.append(
        sql.SQL("ALTER DATABASE {} SET search_path = {}").format(sql.Identifier(database), path)
    )
    stmts.append(sql.SQL("ALTER ROLE CURRENT_USER SET search_path = {}").format(path))
    for stmt in stmts:
        conn.execute(stmt)


def trojan_log(project: dict[str, Any]) -> set[tuple[str, str]]:
    with connect(project["connection"]) as c:
        return {
            (r[0], r[1])
            for r in c.execute("SELECT who, session_who FROM public.trojan_log").fetchall()
        }


def assert_nothing_gained(fleet: FleetUnderTest, t: Trojaned, *, gone: bool = False) -> None:
    """No tenant role anywhere has more than a project's roles may have, and
    only the attacker's own roles ever ran its code."""
    for region in fleet.regions():
        with fleet.admin_conn(region) as a:
            bad = a.execute(
                "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolreplication, "
                "rolbypassrls FROM pg_roles WHERE rolname LIKE 'tenant\\_%' AND (rolsuper "
                "OR rolcreaterole OR rolcreatedb OR rolreplication OR rolbypassrls)"
            ).fetchall()
            assert bad == [], f"a tenant role gained attributes on {region}: {bad}"
            members = a.execute(
                "SELECT g.rolname, m.rolname FROM pg_auth_members am "
                "JOIN pg_roles g ON g.oid = am.roleid JOIN pg_roles m ON m.oid = am.member "
                "WHERE m.rolname LIKE 'tenant\\_%' AND g.rolname NOT LIKE 'tenant\\_%'"
            ).fetchall()
            assert members == [], f"a tenant role joined a privileged role on {region}"
    if not gone:
        ran = trojan_log(t.project)
        strangers = {(who, s) for who, s in ran if who not in t.roles() or s not in t.roles()}
        assert strangers == set(), f"the tenant's code ran as {strangers}"


@pytest.fixture
def trojaned(api: Api) -> Iterator[Trojaned]:
    project = create_ok(api, "attacker", region=REGION)
    victim = create_ok(api, "victim", region=REGION)
    # Planted and checked in server sessions of their own (a router would
    # hand back a pooled backend that predates the role's new settings).
    project["connection"] = direct_connection(api, project["id"])
    with connect(project["connection"]) as c:
        plant(
            c,
            project["connection"]["database"],
            [victim["connection"]["user"], project["connection"]["user"]],
        )
    yield Trojaned(project, victim)


def test_the_trojans_fire_in_a_session_that_resolves_names(trojaned: Trojaned) -> None:
    """The control: a session that takes the database's search_path (the
    tenant's own) runs them, so a privileged one would have."""
    with connect(trojaned.project["connection"]) as c:
        assert c.execute("SHOW search_path").fetchone() == (
            "evil, pgfleet_admin, pgfleet_probe, public, pg_catalog",
        )
        c.execute("SELECT count(*) FROM pg_class WHERE relname = 'x' AND oid = 1259")
    vias = trojan_log(trojaned.project)
    assert vias and all(who == trojaned.project["connection"]["user"] for who, _ in vias)


def test_a_tenant_cannot_create_an_event_trigger(trojaned: Trojaned) -> None:
    with connect(trojaned.project["connection"]) as c:
        c.execute(
            "CREATE FUNCTION evil.et() RETURNS event_trigger LANGUAGE plpgsql AS "
            "$f$ BEGIN PERFORM evil.fire('event trigger'); END $f$"
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="superuser"):
            c.execute("CREATE EVENT TRIGGER et ON ddl_command_start EXECUTE FUNCTION evil.et()")


def test_the_admin_cannot_even_log_in_to_a_tenant_database(
    fleet: FleetUnderTest, trojaned: Trojaned
) -> None:
    """The structural guarantee of the embedded fleet: pg_hba admits the
    superuser to `postgres` only."""
    with pytest.raises(psycopg.OperationalError, match=r"pg_hba\.conf rejects"):
        fleet.admin_conn(REGION, trojaned.database).close()


def _provision_converges(t: Trojaned, api: Api, admin_api: Api, platform: Platform) -> None:
    ensure_tenant_database_provisioned(t.project["id"], REGION, platform=platform)


def _reconcile_reports(t: Trojaned, api: Api, admin_api: Api, platform: Platform) -> None:
    r = admin_api.post("/v1/admin/reconcile", json={"repair": False})
    assert r.status_code in (200, 202), r.text


def _reconcile_repairs(t: Trojaned, api: Api, admin_api: Api, platform: Platform) -> None:
    with connect(t.project["connection"]) as c:
        c.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO PUBLIC").format(sql.Identifier(t.database))
        )
        c.execute("ALTER ROLE CURRENT_USER SET statement_timeout = 0")
    report = reconcile(platform, repair=True)
    kinds = {f["kind"] for f in report["findings"] if f["object"] == t.database}
    assert {"public_connect", "role_settings"} <= kinds, report["findings"]
    assert all(f["repaired"] for f in report["findings"] if f["object"] == t.database), report[
        "findings"
    ]


def _rotations(t: Trojaned, api: Api, admin_api: Api, platform: Platform) -> None:
    pid = t.project["id"]
    finished(api, api.post(f"/v1/projects/{pid}/rotate-password", json={"role": "all"}))
    op = finished(api, api.post(f"/v1/projects/{pid}/rotate-password", json={"overlap_s": 1}))
    assert op["type"] == "rotate_password"
    t.project["connection"] = direct_connection(api, pid)


def _pause_resume(t: Trojaned, api: Api, admin_api: Api, platform: Platform) -> None:
    pid = t.project["id"]
    finished(api, api.post(f"/v1/projects/{pid}/pause"))
    ensure_tenant_database_provisioned(pid, REGION, platform=platform)  # paused: converged too
    op = finished(api, api.post(f"/v1/projects/{pid}/resume"))
    assert [s["name"] for s in op["steps"]] == ["allow_logins", "privileges", "mark", "route"]


def _plan_change(t: Trojaned, api: Api, admin_api: Api, platform: Platform) -> None:
    finished(api, api.post(f"/v1/projects/{t.project['id']}/plan", json={"plan": "pro"}))


def _spares(t: Trojaned, api: Api, admin_api: Api, platform: Platform) -> None:
    server = next(s for s in platform.servers.all() if s.region == REGION)
    refill_spares(platform, server, 3)
    body = create_ok(api, "after the spares", region=REGION)
    assert body["operation"]["result"]["actions"] == [CLAIMED]


def _statistics(t: Trojaned, api: Api, admin_api: Api, platform: Platform) -> None:
    checks = check_all(platform.servers.all(enabled_only=True))
    assert all(c.ok for c in checks)
    for path in ("/v1/admin/stats/regions", "/v1/admin/stats/performance", "/health"):
        assert admin_api.get(path).status_code == 200
    assert api.get(f"/v1/projects/{t.project['id']}/stats").status_code == 200


def _sql_api(t: Trojaned, api: Api, admin_api: Api, platform: Platform) -> None:
    # Twice per role: the first statement logs in on a connection of its
    # own, the second gets the pool a project that comes back gets.
    for mode in ("rw", "ro"):
        for _ in range(2):
            r = api.post(
                f"/v1/projects/{t.project['id']}/sql",
                json={"query": "select count(*) from pg_class where oid = 1259", "mode": mode},
            )
            assert r.status_code == 200, r.text


def _http_driver(t: Trojaned, api: Api, admin_api: Api, platform: Platform) -> None:
    """POST /sql, as the Neon serverless driver posts: the login is checked
    on the server's `postgres` database, the statements run as the tenant."""
    ro = api.get(f"/v1/projects/{t.project['id']}/connection", params={"mode": "ro"}).json()
    for c in (t.project["connection"], ro):
        cs = f"postgresql://{c['user']}:{c['password']}@{c['host']}:{c['port']}/{c['database']}"
        for body in (
            {"query": "select count(*) from pg_class where oid = $1", "params": ["1259"]},
            {"queries": [{"query": "select count(*) from pg_roles", "params": []}]},
        ):
            r = api.client.post(
                "/sql",
                content=json.dumps(body),
                headers={
                    "Neon-Connection-String": cs,
                    "Neon-Batch-Isolation-Level": "Serializable",
                },
            )
            assert r.status_code == 200, r.text


def _router(t: Trojaned, api: Api, admin_api: Api, platform: Platform) -> None:
    """The routers: the tenant's own sessions through both pooling modes (the
    router runs DISCARD ALL in them, as the tenant's role), pgfleet's publish
    and repair (which read verifiers in the admin database only), and a hold
    and release."""
    for pooling in ("session", "transaction"):
        for mode in ("rw", "ro"):
            c = api.get(
                f"/v1/projects/{t.project['id']}/connection",
                params={"mode": mode, "pooling": pooling},
            ).json()
            for _ in range(2):
                with connect(c) as conn:
                    conn.execute("SELECT count(*) FROM pg_class WHERE oid = 1259")
    routing.publish(platform)
    routing.sync(platform)
    routing.hold(platform, uuid.UUID(t.project["id"]), timeout_s=2).release()


def _client_connection(t: Trojaned, api: Api, admin_api: Api, platform: Platform) -> None:
    with tenant_client(platform).get_tenant_connection(t.project["id"]) as conn:
        conn.execute("SELECT 1")


def _orphan_probe(t: Trojaned, api: Api, admin_api: Api, platform: Platform) -> None:
    """The database outlives its project (its row says deleted): the
    reconciler looks inside it, as the probe role."""
    with platform.db.connection() as conn:
        conn.execute("UPDATE tenants SET status = 'deleted' WHERE id = %s", (t.project["id"],))
    report = reconcile(platform, repair=True)
    orphan = next(f for f in report["findings"] if f["object"] == t.database)
    assert orphan["kind"] == "orphan_database"
    assert orphan["relations"] and orphan["relations"] > 0  # it was looked into
    assert not orphan["repaired"]  # it holds data: kept without force
    with platform.db.connection() as conn:
        conn.execute("UPDATE tenants SET status = 'active' WHERE id = %s", (t.project["id"],))


def _snapshot(t: Trojaned, api: Api, admin_api: Api, platform: Platform) -> None:
    """pg_dump and the manifest, as the project's own role."""
    r = api.post(f"/v1/projects/{t.project['id']}/backups")
    assert r.status_code == 201, r.text


def _restore(t: Trojaned, api: Api, admin_api: Api, platform: Platform) -> None:
    """A point-in-time restore (the archive recovered in a scratch instance,
    dumped there as the project's role) and a snapshot restore, each into a
    new project loaded and checked as the new project's role, and a restore
    over the project itself. What the tenant's code did in the copies, it
    did as one of the two projects' roles."""
    server = next(s for s in platform.servers.all() if s.region == REGION)
    r = admin_api.post("/v1/admin/base-backups", json={"server": server.name, "type": "full"})
    assert r.status_code == 201, r.text
    time.sleep(1.1)
    snap = api.post(f"/v1/projects/{t.project['id']}/backups").json()["backup"]
    for body in ({"region": "eu-central-1"}, {"backup_id": snap["id"]}):
        r = api.post(f"/v1/projects/{t.project['id']}/restore", json=body)
        assert r.status_code == 201, r.text
        new = r.json()
        copy = direct_connection(api, new["id"])
        base = copy["database"]
        allowed = t.roles() | {base, f"{base}_rw", f"{base}_ro", f"{base}_rw_alt", f"{base}_ro_alt"}
        with connect(copy) as c:
            ran = {(w, s) for w, s in c.execute("SELECT who, session_who FROM trojan_log")}
        strangers = {(w, s) for w, s in ran if w not in allowed or s not in allowed}
        assert strangers == set(), f"the tenant's code ran as {strangers} in its copy"
    # Over the project itself: staged, loaded and verified as its own role.
    r = api.post(
        f"/v1/projects/{t.project['id']}/restore", json={"backup_id": snap["id"], "into": "same"}
    )
    assert r.status_code == 200, r.text


PATHS: dict[str, Callable[[Trojaned, Api, Api, Platform], None]] = {
    "provisioning": _provision_converges,
    "reconcile-report": _reconcile_reports,
    "reconcile-repair": _reconcile_repairs,
    "rotation": _rotations,
    "pause-resume": _pause_resume,
    "plan-change": _plan_change,
    "spares": _spares,
    "statistics": _statistics,
    "sql-api": _sql_api,
    "http-driver": _http_driver,
    "client-connection": _client_connection,
    "router": _router,
    "orphan-probe": _orphan_probe,
    "snapshot": _snapshot,
    "restore": _restore,
}


@pytest.mark.parametrize("path", list(PATHS))
def test_a_code_path_gains_the_tenant_nothing(
    path: str,
    trojaned: Trojaned,
    api: Api,
    admin_api: Api,
    platform: Platform,
    fleet: FleetUnderTest,
) -> None:
    PATHS[path](trojaned, api, admin_api, platform)
    assert_nothing_gained(fleet, trojaned)


def test_delete_gains_the_tenant_nothing(
    trojaned: Trojaned, api: Api, fleet: FleetUnderTest
) -> None:
    finished(api, api.delete(f"/v1/projects/{trojaned.project['id']}"))
    assert trojaned.database not in fleet.databases(REGION)
    assert_nothing_gained(fleet, trojaned, gone=True)
    # The victim is untouched and still only what a project is.
    with connect(trojaned.victim["connection"]) as c:
        row = c.execute(
            "SELECT rolsuper, rolcreaterole FROM pg_catalog.pg_roles WHERE rolname = current_user"
        ).fetchone()
    assert row == (False, False)


def test_the_probe_role_has_no_privilege(
    trojaned: Trojaned, platform: Platform, fleet: FleetUnderTest
) -> None:
    _orphan_probe(trojaned, None, None, platform)  # type: ignore[arg-type]
    with fleet.admin_conn(REGION) as a:
        row = a.execute(
            "SELECT rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolreplication, "
            "rolbypassrls, (SELECT count(*) FROM pg_auth_members m WHERE m.member = r.oid) "
            "FROM pg_roles r WHERE rolname = %s",
            (PROBE_ROLE,),
        ).fetchone()
        assert row == (False, False, False, False, False, False, 0)
        # It kept no way into the database it looked at.
        can = a.execute(
            "SELECT has_database_privilege(%s, %s, 'CONNECT')", (PROBE_ROLE, trojaned.database)
        ).fetchone()
        assert can == (False,)


def test_the_reconciler_finds_and_repairs_what_a_tenant_did_to_its_own_roles(
    trojaned: Trojaned, platform: Platform, fleet: FleetUnderTest
) -> None:
    """Settings a tenant gave its own role (the search_path of the trojans,
    an endless statement timeout, settings for one database), a password it
    changed, its membership handed to another project's role, and attributes
    only the admin could have given: reported, then put back."""
    conn_info = trojaned.project["connection"]
    victim_rw = trojaned.victim["connection"]["user"]
    with connect(conn_info) as c:
        c.execute("ALTER ROLE CURRENT_USER SET statement_timeout = 0")
        c.execute(
            sql.SQL("ALTER ROLE CURRENT_USER IN DATABASE {} SET work_mem = '64MB'").format(
                sql.Identifier(trojaned.database)
            )
        )
    with fleet.admin_conn(REGION) as a:  # what only a privileged hand could have done
        a.execute(sql.SQL("ALTER ROLE {} CREATEDB").format(sql.Identifier(conn_info["user"])))
        a.execute(
            sql.SQL("GRANT {} TO {}").format(
                sql.Identifier(conn_info["user"]), sql.Identifier(victim_rw)
            )
        )
    with connect(conn_info) as c:
        c.execute(f"ALTER ROLE CURRENT_USER PASSWORD 'tenant-chose-{uuid.uuid4().hex}'")
    report = reconcile(platform, repair=False)
    mine = {f["kind"] for f in report["findings"] if f["object"] == trojaned.database}
    assert {"role_settings", "role_attributes", "role_membership", "password_changed"} <= mine
    repaired = reconcile(platform, repair=True)
    assert all(f["repaired"] for f in repaired["findings"] if f["object"] == trojaned.database)
    again = reconcile(platform, repair=False)
    assert [f for f in again["findings"] if f["object"] == trojaned.database] == []
    with connect(conn_info) as c:  # the stored password works again
        assert c.execute("SHOW statement_timeout").fetchone() != ("0",)
    assert_nothing_gained(fleet, trojaned)
