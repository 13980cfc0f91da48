"""Prepared spares: whole projects-to-be made ahead, unusable until claimed,
and once claimed the same as a project made the slow way."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from pgfleet import domains
from pgfleet.auth import create_owner
from pgfleet.errors import ProjectNotFound, RegionUnavailable
from pgfleet.fleet.health import check_all, check_server
from pgfleet.fleet.registry import ServerRecord
from pgfleet.monitoring.health import record
from pgfleet.operations.runner import execute_operation
from pgfleet.operations.service import cancel_operation
from pgfleet.operations.store import get_operation
from pgfleet.platform.core import Platform
from pgfleet.tenants import routing
from pgfleet.tenants.naming import project_roles, tenant_db_name
from pgfleet.tenants.provisioning import ProvisionedDatabase
from pgfleet.tenants.reconcile import reconcile
from pgfleet.tenants.service import (
    create_project,
    delete_project,
    get_project,
    start_create_project,
)
from pgfleet.tenants.spares import _SPARE_LOCK as SPARE_LOCK
from pgfleet.tenants.spares import (
    CLAIMED,
    READY,
    claim_prepared,
    drop_spares,
    ready_count,
    refill_all,
    refill_spares,
    spare_target,
)
from tests.helpers import FleetUnderTest
from tests.tenantdb import assert_gate_inert, can_login, connect_as, in_tenant_db

REGION = "eu-central-1"


def server_in(p: Platform, region: str) -> ServerRecord:
    return next(s for s in p.servers.all(enabled_only=True) if s.region == region)


def shape(fleet: FleetUnderTest, prov: ProvisionedDatabase) -> dict[str, Any]:
    """Everything about a project on its server that a user, pgfleet or
    PostgreSQL could tell apart, with the project's name taken out."""
    name = prov.database

    def norm(rows: list[Any]) -> list[str]:
        return sorted(str(tuple(r)).replace(name, "<p>") for r in rows)

    roles = project_roles(name)
    out: dict[str, Any] = {}
    with fleet.admin_conn(REGION) as a:
        out["roles"] = norm(
            a.execute(
                "SELECT rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin, "
                "rolreplication, rolbypassrls, rolconnlimit, rolvaliduntil, "
                "split_part(rolpassword, ':', 1) FROM pg_authid WHERE rolname = ANY(%s)",
                (roles,),
            ).fetchall()
        )
        out["settings"] = norm(
            a.execute(
                "SELECT coalesce(d.datname, '*'), r.rolname, s.setconfig::text "
                "FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole "
                "LEFT JOIN pg_database d ON d.oid = s.setdatabase "
                "WHERE r.rolname = ANY(%s) OR d.datname = %s",
                (roles, name),
            ).fetchall()
        )
        out["members"] = norm(
            a.execute(
                "SELECT r.rolname, m.rolname, am.admin_option, g.rolname FROM pg_auth_members am "
                "JOIN pg_roles r ON r.oid = am.roleid JOIN pg_roles m ON m.oid = am.member "
                "JOIN pg_roles g ON g.oid = am.grantor "
                "WHERE r.rolname = ANY(%s) OR m.rolname = ANY(%s)",
                (roles, roles),
            ).fetchall()
        )
        out["database"] = norm(
            a.execute(
                "SELECT pg_get_userbyid(datdba), datistemplate, datallowconn, datconnlimit, "
                "datacl::text, pg_encoding_to_char(encoding), datcollate, datctype, "
                "shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                (name,),
            ).fetchall()
        )
    with in_tenant_db(prov) as t:
        out["default_acl"] = norm(
            t.execute(
                "SELECT pg_get_userbyid(defaclrole), coalesce(defaclnamespace::regnamespace::text,"
                " '-'), defaclobjtype, defaclacl::text FROM pg_default_acl"
            ).fetchall()
        )
        out["schemas"] = norm(
            t.execute(
                "SELECT nspname, pg_get_userbyid(nspowner), nspacl::text FROM pg_namespace "
                "WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'"
            ).fetchall()
        )
        out["objects"] = t.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'"
        ).fetchone()
    return out


def test_a_claimed_spare_is_the_same_as_a_project_made_the_slow_way(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    slow_p: Platform = platform_factory(spare_databases=0)
    fast_p: Platform = platform_factory(spare_databases=1)
    drop_spares(slow_p, server_in(slow_p, REGION))
    _, slow = create_project(
        slow_p, create_owner(slow_p, "slow")[0], name="slow", region=REGION, plan_type="pro"
    )
    assert CLAIMED not in slow.actions and "create database" in slow.actions
    refill_spares(fast_p, server_in(fast_p, REGION), 1)
    _, fast = create_project(
        fast_p, create_owner(fast_p, "fast")[0], name="fast", region=REGION, plan_type="pro"
    )
    assert fast.actions == (CLAIMED,)
    assert shape(fleet, fast) == shape(fleet, slow)
    for prov in (slow, fast):
        assert can_login(prov) and can_login(prov, ro=True)
        assert_gate_inert(fleet, REGION, prov)
        # What _rw makes, _ro reads: the default privileges came with the spare.
        with in_tenant_db(prov) as t:
            t.execute("CREATE TABLE public.t (x int); INSERT INTO public.t VALUES (1)")
            t.commit()
        with connect_as(prov, ro=True) as r:
            assert r.execute("SELECT x FROM public.t").fetchall() == [(1,)]


def ready_spares(p: Platform, server: ServerRecord) -> list[tuple[str, str, str]]:
    """(name, rw password, ro password) of `server`'s ready spares."""
    with p.db.connection() as conn:
        rows = conn.execute(
            "SELECT id, password_enc, ro_password_enc FROM spares "
            "WHERE server_id = %s AND state = 'ready'",
            (server.id,),
        ).fetchall()
    return [(tenant_db_name(i), p.secrets.decrypt(a), p.secrets.decrypt(b)) for i, a, b in rows]


def login_error(host: str, port: int, db: str, user: str, password: str, **tls: Any) -> str:
    try:
        with psycopg.connect(
            host=host, port=port, dbname=db, user=user, password=password, connect_timeout=5, **tls
        ):
            return "logged in"
    except psycopg.OperationalError as e:
        return str(e)


def test_ready_spares_are_routed_and_unusable_even_with_their_passwords(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    """A ready spare is in every router, with its login roles' verifiers, so
    a create has nothing to publish; but its roles are NOLOGIN, so its own
    passwords log in nowhere, through a router or straight to the server."""
    p: Platform = platform_factory(spare_databases=0)
    server = server_in(p, REGION)
    refill_spares(p, server, 2)
    spares = ready_spares(p, server)
    assert len(spares) == 2
    assert p.routers is not None
    logins = p.routers.current_logins()
    eu = next(s for s in p.routers.specs if s.region == REGION)
    tls = {"sslmode": "verify-ca", "sslrootcert": str(p.routers.ca_file)}
    with fleet.admin_conn(REGION) as a:
        for name, rw_password, ro_password in spares:
            assert name.startswith("tenant_")
            rows = a.execute(
                "SELECT rolname, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, "
                "rolreplication, rolbypassrls, rolpassword IS NULL FROM pg_authid "
                "WHERE rolname = ANY(%s) ORDER BY rolname",
                (project_roles(name),),
            ).fetchall()
            assert [r[0] for r in rows] == [name, f"{name}_ro", f"{name}_rw"], rows
            assert all(r[1:7] == (False,) * 6 for r in rows), rows
            assert [r[7] for r in rows] == [True, False, False]  # the gate has no password
            public = a.execute(
                "SELECT has_database_privilege('public', %s, 'CONNECT')", (name,)
            ).fetchone()
            assert public == (False,)
            assert a.execute(
                "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                (name,),
            ).fetchone() == (READY,)
            for spec in p.routers.specs:
                assert name in p.routers.databases(spec), spec.name
            assert {f"{name}_rw", f"{name}_ro"} <= set(logins)
            for user, password in ((f"{name}_rw", rw_password), (f"{name}_ro", ro_password)):
                direct = login_error(server.host, server.port, name, user, password, **server.tls())
                assert "is not permitted to log in" in direct, direct
                routed = login_error(p.routers.host, eu.port, name, user, password, **tls)
                assert "is not permitted to log in" in routed, routed
    # The periodic sync keeps them: nothing to repair, no drift.
    assert routing.drift(p) == {}
    assert routing.publish(p, repair=True).changed is False
    # The reconciler knows them for spares, not orphans.
    report = reconcile(p, record=False)
    assert not [f for f in report["findings"] if f["object"] in {s[0] for s in spares}], report


def test_an_unfinished_spare_is_never_claimed_and_a_refill_drops_it_once_stale(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    """A spare a refill was killed while making stays `making`: it is never
    taken by a create, nor routed; a refill drops it (on the server and its
    row) once it is stale, and leaves alone one another refill is making
    now. Spares of earlier versions (placeholder names) are dropped too. A
    spare left `made` (a refill killed before it told the routers) is
    published and made ready by the next."""
    # No refill but the test's: no worker, whose periodic pass would drop the
    # stale spare too, holding the server's refill lock when the test asks.
    p: Platform = platform_factory(spare_databases=0, embedded_workers=0)
    server = server_in(p, REGION)
    drop_spares(p, server)
    dead, busy = uuid.uuid4(), uuid.uuid4()
    with p.db.connection() as conn:
        for sid, age in ((dead, "11 minutes"), (busy, "0 seconds")):
            conn.execute(
                "INSERT INTO spares (id, server_id, password_enc, ro_password_enc, created_at) "
                "VALUES (%s, %s, %s, %s, now() - %s::interval)",
                (sid, server.id, p.secrets.encrypt("x" * 32), p.secrets.encrypt("y" * 32), age),
            )
    legacy = "pgfleet_spare_" + uuid.uuid4().hex
    names = [tenant_db_name(dead), tenant_db_name(busy), legacy]
    with p.servers.admin_connection(server) as a:
        for name in names:
            a.execute(f'CREATE ROLE "{name}_rw" NOLOGIN')
            a.execute(f'CREATE DATABASE "{name}" OWNER "{name}_rw"')
        # Not marked ready on the server either: no claim takes it.
        assert not claim_prepared(a, names[0], connection_limit=5, statement_timeout_ms=1000)
    routing.publish(p, repair=True)
    assert p.routers is not None
    assert all(not set(names) & set(p.routers.databases(spec)) for spec in p.routers.specs)
    slow, op_id = start_create_project(
        p, create_owner(p, "someone")[0], name="not it", region=REGION, plan_type="free"
    )
    assert execute_operation(p, op_id, worker="test") == "finished"
    with p.db.connection() as conn:
        actions = get_operation(conn, op_id).result["actions"]
    assert tenant_db_name(slow.id) not in names and CLAIMED not in actions
    assert refill_spares(p, server, 1) == 1
    with fleet.admin_conn(REGION) as a:
        left = {
            r[0]
            for r in a.execute(
                "SELECT datname FROM pg_database WHERE datname = ANY(%s) "
                "UNION ALL SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)",
                (names, [f"{n}_rw" for n in names]),
            )
        }
    assert left == {names[1], f"{names[1]}_rw"}  # only the one being made now
    with p.db.connection() as conn:
        states = dict(conn.execute("SELECT id, state FROM spares").fetchall())
    assert dead not in states and states[busy] == "making"
    (made,) = [sid for sid, state in states.items() if state == "ready"]
    # Killed after it was made and before the routers were told: the next
    # refill tells them, and only then is it ready.
    with p.db.connection() as conn:
        conn.execute("UPDATE spares SET state = 'made' WHERE id = %s", (made,))
    p.routers.write([], [])  # as if they never learned it
    assert refill_spares(p, server, 1) == 0
    with p.db.connection() as conn:
        assert conn.execute("SELECT state FROM spares WHERE id = %s", (made,)).fetchone() == (
            "ready",
        )
    assert all(tenant_db_name(made) in p.routers.databases(spec) for spec in p.routers.specs)
    drop_spares(p, server)
    assert names[1] not in fleet.databases(REGION)


def one_spare(platform_factory: Any) -> tuple[Platform, ServerRecord, str]:
    """A platform with no worker, whose server in REGION has one ready spare
    (its name returned)."""
    p: Platform = platform_factory(spare_databases=1, embedded_workers=0)
    server = server_in(p, REGION)
    drop_spares(p, server)
    refill_spares(p, server, 1)
    ((name, _, _),) = ready_spares(p, server)
    return p, server, name


def refilled_without(p: Platform, fleet: FleetUnderTest, server: ServerRecord, name: str) -> None:
    """The next refill makes a new spare and drops the given-back `name`
    from the server and the routers."""
    assert refill_spares(p, server, 1) == 1
    assert name not in fleet.databases(REGION)
    assert p.routers is not None
    assert all(name not in p.routers.databases(spec) for spec in p.routers.specs)
    assert [s[0] for s in ready_spares(p, server)] != [name]


def test_a_refill_stands_aside_while_creates_claim_and_when_it_cannot_tell(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    """Above its reserve a refill makes no spare while creates are taking
    them (making one costs several claims' work); a pass that does not know
    what the last one saw (another process made it, or too long ago) only
    looks. It once took another process's old count for the truth and made
    10 spares in a 200-create burst."""
    p: Platform = platform_factory(spare_databases=4, embedded_workers=0)
    server = server_in(p, REGION)
    drop_spares(p, server)
    owner = create_owner(p, "burst")[0]
    memory: dict[int, Any] = p.component("spares_seen", dict)

    def claim(*names: str) -> None:
        for name in names:
            project, op_id = start_create_project(
                p, owner, name=name, region=REGION, plan_type="free"
            )
            assert execute_operation(p, op_id, worker="test") == "finished"
            assert get_project(p, owner, project.id).status == "active"

    assert refill_spares(p, server, 4, reserve=1) == 4  # under the reserve: it fills
    claim("a", "b")
    assert len(ready_spares(p, server)) == 2
    assert refill_spares(p, server, 4, reserve=1) == 0  # creates claimed since its last pass
    assert refill_spares(p, server, 4, reserve=1) == 2  # none since: it fills up
    claim("c")
    memory.clear()  # what the last pass saw is unknown here
    assert refill_spares(p, server, 4, reserve=1) == 0
    assert refill_spares(p, server, 4, reserve=1) == 1
    assert len(ready_spares(p, server)) == 4
    # Passes stretched (say by a server that does not answer, visited in
    # the same pass): a look 20 s old, 15 s after the one before, still
    # tells. Measured in heartbeats alone, this server never refilled.
    claim("d")
    count, _, _ = memory[server.id]
    memory[server.id] = (count, time.monotonic() - 20, 15.0)
    assert refill_spares(p, server, 4, reserve=1) == 0  # claimed since: stands aside
    memory[server.id] = (memory[server.id][0], time.monotonic() - 20, 15.0)
    assert refill_spares(p, server, 4, reserve=1) == 1
    # Another process at work here: what this one saw is old, it forgets.
    claim("e")
    with fleet.admin_conn(REGION) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (SPARE_LOCK,))
        assert refill_spares(p, server, 4, reserve=1) == 0
    assert server.id not in memory
    assert refill_spares(p, server, 4, reserve=1) == 0  # not known: it only looks
    assert refill_spares(p, server, 4, reserve=1) == 1


def test_a_create_cancelled_before_it_started_gives_its_spare_back_to_be_dropped(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    p, server, name = one_spare(platform_factory)
    owner = create_owner(p, "quitter")[0]
    project, op_id = start_create_project(p, owner, name="quitter", region=REGION, plan_type="free")
    assert tenant_db_name(project.id) == name  # the spare's id is the project's
    assert cancel_operation(p, owner, str(op_id)).status == "cancelled"
    refilled_without(p, fleet, server, name)


def test_a_create_whose_server_just_went_down_gives_up_in_seconds_and_leaves_nothing(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    """The server stopped before a health check noticed: the create's
    operation gives up on it after UNREACHABLE_GIVE_UP_S, not at its
    deadline (21 attempts over 2 minutes, seen), with a 503 naming the
    region. The project is deleted, not left `failed` for someone to clean
    up: its spare goes back, and the refill drops it once the server is back."""
    from tests.test_sql_errors import server_down

    p, server, name = one_spare(platform_factory)
    owner = create_owner(p, "unlucky")[0]
    with server_down(fleet, REGION):
        project, op_id = start_create_project(
            p, owner, name="unlucky", region=REGION, plan_type="free"
        )
        assert tenant_db_name(project.id) == name
        t0 = time.monotonic()
        assert execute_operation(p, op_id, worker="test") == "failed"
        assert time.monotonic() - t0 < 30
        with p.db.connection() as conn:
            op = get_operation(conn, op_id)
        assert op.error is not None and re.search(r"could not be reached for 1\d s", op.error), (
            op.error
        )
        assert "undoing its steps failed" not in op.error, op.error
        assert (op.result or {}).get("error_status") == 503, op.result
        with p.db.connection() as conn:
            row = conn.execute("SELECT status FROM tenants WHERE id = %s", (project.id,)).fetchone()
            assert row == ("deleted",)
            given = conn.execute("SELECT state FROM spares WHERE id = %s", (project.id,)).fetchone()
            assert given == ("drop",)
        # Asked for afterwards, it says it was never made (not how to restore it).
        with pytest.raises(ProjectNotFound, match="was never made: provisioning failed"):
            get_project(p, owner, project.id)
    refilled_without(p, fleet, server, name)


def test_a_spare_that_cannot_be_finished_is_dropped_at_once(
    platform_factory: Any, fleet: FleetUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New logins to the server failing while its admin session works (a
    frozen postmaster, a full server): a refill's spare cannot be finished.
    It is dropped there and then; left `making`, one more stayed behind at
    every pass until stale (found by an attack: 22 in two minutes)."""
    p, server, _ = one_spare(platform_factory)
    drop_spares(p, server)
    before = set(fleet.databases(REGION))

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise RegionUnavailable("no new login", region=REGION, server=server.name)

    monkeypatch.setattr(p.servers, "tenant_session", refused)
    for _ in range(3):
        with pytest.raises(RegionUnavailable):
            refill_spares(p, server, 1)
    with p.db.connection() as conn:
        left = conn.execute(
            "SELECT count(*) FROM spares WHERE server_id = %s", (server.id,)
        ).fetchone()
    assert left == (0,)
    assert set(fleet.databases(REGION)) == before


def test_a_slow_create_rides_out_a_postmaster_that_takes_no_logins_for_a_while(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    """A frozen postmaster: the admin's pooled session still answers, new
    logins time out. The privileges step's login timing out was read from
    the catalog as 'credentials refused' and failed the create at once
    (found by an attack, with and without wait_for_region); it is the
    server unreachable, retried, and the create finishes once it is back."""
    from tests.helpers import postmaster_pid

    p: Platform = platform_factory(spare_databases=0, embedded_workers=0, connect_timeout_s=1)
    server = server_in(p, REGION)
    drop_spares(p, server)
    owner = create_owner(p, "patient")[0]
    _, first = start_create_project(p, owner, name="first", region=REGION, plan_type="free")
    assert execute_operation(p, first, worker="test") == "finished"  # the admin's pool is warm
    project, op_id = start_create_project(p, owner, name="later", region=REGION, plan_type="free")
    postmaster = postmaster_pid(fleet, REGION)
    os.kill(postmaster, signal.SIGSTOP)
    thaw = threading.Timer(4.0, os.kill, (postmaster, signal.SIGCONT))
    thaw.start()
    try:
        assert execute_operation(p, op_id, worker="test") == "finished"
    finally:
        thaw.cancel()
        os.kill(postmaster, signal.SIGCONT)
    with p.db.connection() as conn:
        op = get_operation(conn, op_id)
    assert op.error is None and any("attempt" in (s.error or "") for s in op.steps), op.steps
    assert get_project(p, owner, project.id).status == "active"


def test_each_server_keeps_its_own_number_of_spares_and_metrics_show_it(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    """PGFLEET_SPARE_DATABASES_BY_SERVER sizes one server's pool over the
    default; /metrics shows each server's target and what its last health
    check found ready (with the made/claimed counters: whether the refill
    keeps up)."""
    p: Platform = platform_factory(spare_databases=0)
    server = server_in(p, REGION)
    others = [s for s in p.servers.all(enabled_only=True) if s.id != server.id]
    for s in [server, *others]:
        drop_spares(p, s)
    p = platform_factory(spare_databases=0, spare_databases_by_server={server.name: 2})
    assert spare_target(p.settings, server.name) == 2
    assert all(spare_target(p.settings, s.name) == 0 for s in others)
    domains.attach(p)
    refill_all(p)
    with fleet.admin_conn(REGION) as a:
        assert ready_count(a) == 2
    # A pass stops making spares at its deadline (a worker asked to stop
    # is never held up by a long refill).
    assert refill_spares(p, server, 5, until=time.monotonic()) == 0
    for s in others:
        with p.servers.admin_connection(s) as a:
            assert ready_count(a) == 0
    record(p, check_all(p.servers.all(enabled_only=True)))
    text = p.metrics.render().decode()
    assert f'pgfleet_spares_ready{{region="{REGION}",server="{server.name}"}} 2.0' in text, text
    assert f'pgfleet_spares_target{{region="{REGION}",server="{server.name}"}} 2.0' in text
    for s in others:
        assert f'pgfleet_spares_ready{{region="{s.region}",server="{s.name}"}} 0.0' in text
    assert 'pgfleet_spares_made_total{region="' + REGION + '"} 2.0' in text


def test_a_tenant_cannot_pass_its_database_off_as_a_spare(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    """A database owner may comment its own database, even with the spares'
    mark: the server still counts it as a project, not a spare (a spare's
    owner cannot log in). And a project made from a spare does not take its
    subdomain from its id, which tenants can see ahead in pg_database."""
    p: Platform = platform_factory(spare_databases=0)
    server = server_in(p, REGION)
    drop_spares(p, server)
    refill_spares(p, server, 1)
    ((spare, _, _),) = ready_spares(p, server)
    before = check_server(server)
    project, prov = create_project(
        p, create_owner(p, "faker")[0], name="faker", region=REGION, plan_type="free"
    )
    assert prov.database == spare and prov.actions == (CLAIMED,)
    assert not project.subdomain.endswith(project.id.hex[:6]), project.subdomain
    with in_tenant_db(prov) as t:
        t.execute(f"COMMENT ON DATABASE {prov.database} IS '{READY}'")
        t.commit()
    after = check_server(server)
    assert after.spares_ready == (before.spares_ready or 0) - 1
    assert after.tenant_databases == (before.tenant_databases or 0) + 1


def gone_roles(fleet: FleetUnderTest) -> list[tuple[Any, ...]]:
    with fleet.admin_conn(REGION) as a:
        return a.execute(
            "SELECT rolname, rolcanlogin, rolpassword IS NULL, rolconnlimit FROM pg_authid "
            "WHERE rolname LIKE 'pgfleet\\_gone\\_%'"
        ).fetchall()


def test_another_tenants_grant_to_a_spare_fails_no_delete_and_no_refill(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    """A tenant may GRANT on its own objects to any role it sees in pg_roles,
    a spare's too (its name is the next project's), and PostgreSQL then
    refuses to drop that role. The victim's delete and the refill still
    finish: such a role is made inert and renamed out of the projects'
    names, and dropped by a refill once nothing depends on it."""
    p: Platform = platform_factory(spare_databases=0)
    server = server_in(p, REGION)
    drop_spares(p, server)
    _, mallory = create_project(
        p, create_owner(p, "mallory")[0], name="mallory", region=REGION, plan_type="free"
    )
    refill_spares(p, server, 2)
    spares = [s[0] for s in ready_spares(p, server)]
    with in_tenant_db(mallory) as t:
        t.execute("CREATE TABLE public.bait (x int)")
        for name in spares:
            t.execute(f'GRANT ALL ON public.bait TO "{name}", "{name}_rw", "{name}_ro"')
        t.commit()
    victim_owner = create_owner(p, "victim")[0]
    victim, prov = create_project(p, victim_owner, name="victim", region=REGION, plan_type="free")
    assert prov.database in spares and prov.actions == (CLAIMED,)
    assert delete_project(p, victim_owner, victim.id).status == "deleted"
    # A spare leaving with the grant on it: no error either.
    assert drop_spares(p, server) == 1
    with fleet.admin_conn(REGION) as a:
        left = a.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE ANY(%s)",
            ([f"{n}%" for n in spares],),
        ).fetchall()
    assert left == [] and not set(spares) & fleet.databases(REGION)
    gone = gone_roles(fleet)
    assert len(gone) == 6, gone  # three roles of each, kept under other names
    assert all(g[1:] == (False, True, 0) for g in gone), gone
    # Nothing depends on them once the grant is gone: a refill drops them.
    with in_tenant_db(mallory) as t:
        t.execute("DROP TABLE public.bait")
        t.commit()
    refill_spares(p, server, 0)
    assert gone_roles(fleet) == []
