"""Prepared spares: whole projects-to-be made ahead, unusable until claimed,
and once claimed the same as a project made the slow way."""

from __future__ import annotations

import time
import uuid
from typing import Any

from pgfleet import domains
from pgfleet.auth import create_owner
from pgfleet.fleet.health import check_all
from pgfleet.fleet.registry import ServerRecord
from pgfleet.monitoring.health import record
from pgfleet.platform.core import Platform
from pgfleet.tenants.naming import project_roles, tenant_db_name
from pgfleet.tenants.provisioning import ProvisionedDatabase
from pgfleet.tenants.service import create_project
from pgfleet.tenants.spares import (
    CLAIMED,
    READY,
    SPARE_PREFIX,
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


def test_ready_spares_are_unusable(platform_factory: Any, fleet: FleetUnderTest) -> None:
    p: Platform = platform_factory(spare_databases=0)
    server = server_in(p, REGION)
    refill_spares(p, server, 2)
    with fleet.admin_conn(REGION) as a:
        spares = [
            r[0]
            for r in a.execute(
                "SELECT datname FROM pg_database d JOIN pg_shdescription s ON s.objoid = d.oid "
                "WHERE s.description = %s",
                (READY,),
            )
        ]
        assert len(spares) >= 2
        for spare in spares:
            assert spare.startswith(SPARE_PREFIX)
            rows = a.execute(
                "SELECT rolname, rolcanlogin, rolpassword IS NULL, rolsuper, rolcreaterole, "
                "rolcreatedb, rolreplication, rolbypassrls FROM pg_authid WHERE rolname = ANY(%s)",
                (project_roles(spare),),
            ).fetchall()
            assert len(rows) == 3, rows  # the gate, _rw and _ro
            assert all(r[1:] == (False, True, False, False, False, False, False) for r in rows)
            public = a.execute(
                "SELECT has_database_privilege('public', %s, 'CONNECT')", (spare,)
            ).fetchone()
            assert public == (False,)


def test_an_unfinished_spare_is_never_claimed_and_the_next_refill_drops_it(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    p: Platform = platform_factory(spare_databases=0)
    server = server_in(p, REGION)
    drop_spares(p, server)
    dead = SPARE_PREFIX + "dead" + uuid.uuid4().hex[:8]
    name = tenant_db_name(uuid.uuid4())
    with p.servers.admin_connection(server) as a:
        a.execute(f'CREATE ROLE "{dead}_rw" NOLOGIN')
        a.execute(f'CREATE DATABASE "{dead}" OWNER "{dead}_rw"')
        a.execute(f'CREATE ROLE "{SPARE_PREFIX}orphan_rw" NOLOGIN')  # its database never made
        assert not claim_prepared(
            a,
            name,
            password="x" * 32,
            ro_password="y" * 32,
            connection_limit=5,
            statement_timeout_ms=1000,
        )
    assert name not in fleet.databases(REGION)
    assert refill_spares(p, server, 1) == 1
    with fleet.admin_conn(REGION) as a:
        left = a.execute(
            "SELECT datname FROM pg_database WHERE datname = %s "
            "UNION ALL SELECT rolname FROM pg_roles WHERE rolname IN (%s, %s)",
            (dead, f"{dead}_rw", f"{SPARE_PREFIX}orphan_rw"),
        ).fetchall()
    assert left == []


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
    assert spare_target(p.settings, server) == 2
    assert all(spare_target(p.settings, s) == 0 for s in others)
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
