"""What a user meets first (issue 14): the version, the plans, region ids
typed loosely, owners' names, list envelopes."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from typer.testing import CliRunner

from pgfleet.cli import app
from pgfleet.platform.owners import Owner
from pgfleet.regions import PLANS
from tests.helpers import Api, create_ok, error_of
from tests.test_cli import Cli

pytestmark = pytest.mark.usefixtures("cli_env")


@pytest.fixture
def cli(api_url: str, owner: tuple[Owner, str]) -> Cli:
    return Cli(api_url, owner[1])


def test_version() -> None:
    from pgfleet import __version__

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"pgfleet {__version__}"


def test_plans_are_discoverable(api: Api, cli: Cli) -> None:
    body = api.get("/v1/plans").json()
    assert [p["id"] for p in body["plans"]] == [p.id for p in PLANS]
    pro = next(p for p in body["plans"] if p["id"] == "pro")
    assert pro["connection_limit"] == 60 and pro["pitr_days"] == 14
    assert pro["monthly_price_usd"] == 25.0
    assert next(p for p in body["plans"] if p["id"] == "free")["monthly_price_usd"] == 0
    out = cli.ok("plans")
    for plan in ("free", "pro", "enterprise"):
        assert plan in out
    assert "on request" in out and "14 days" in out
    assert "500 clients, 10 to the server" in out  # pro's share of each router
    assert cli.json("plans") == body


def test_region_ids_are_forgiving_and_typos_get_a_suggestion(api: Api) -> None:
    p = create_ok(api, "loud", region=" EU-Central-1 ")
    assert p["region"] == "eu-central-1" and p["hosted_region"] == "eu-central-1"
    err = error_of(api.post("/v1/projects", json={"name": "x", "region": "eu-centrl-1"}), 422)
    assert "did you mean eu-central-1?" in err["message"], err
    assert err["suggestion"] == "eu-central-1"
    err = error_of(api.post("/v1/projects", json={"name": "x", "region": "mars"}), 422)
    assert "did you mean" not in err["message"] and "valid regions are" in err["message"]
    assert [x["name"] for x in api.get("/v1/projects").json()["projects"]] == ["loud"]


def test_an_owner_name_is_taken_once(admin_api: Api) -> None:
    r = admin_api.post("/v1/admin/owners", json={"name": "carol"})
    assert r.status_code == 201, r.text
    err = error_of(admin_api.post("/v1/admin/owners", json={"name": "Carol"}), 409)
    assert "exists already" in err["message"]


def test_every_list_has_its_envelope_in_json(cli: Cli) -> None:
    regions = cli.json("regions", "list")
    assert set(regions) == {"regions"} and len(regions["regions"]) == 6
    assert set(cli.json("projects", "list")) == {"projects"}
    assert set(cli.json("plans")) == {"plans"}


def test_help_texts_wrap_as_paragraphs() -> None:
    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "100"})
    assert res.exit_code == 0
    # A command's summary is reflowed, never cut where its docstring broke.
    line = next(ln for ln in res.stdout.splitlines() if "│ up " in ln)
    assert "region)," in line or "active" in line, res.stdout
    assert not any(ln.strip("│ ").startswith("region),") for ln in res.stdout.splitlines())


QUERY = "select '{\"k\": [1, \"x\"]}'::jsonb as j, '\\xdeadbeef'::bytea as b, true as t, null as n"


def test_sql_shows_json_as_json_and_bytea_as_hex(cli: Cli, api: Api) -> None:
    pid = create_ok(api, "values")["id"]
    out = cli.ok("sql", pid, QUERY)
    row = out.splitlines()[1].split("\t")
    assert row == ['{"k": [1, "x"]}', "\\xdeadbeef", "true", "NULL"], out
    # The API's JSON stays as documented: bytea base64, JSON as JSON.
    body = cli.json("sql", pid, QUERY)
    assert body["rows"][0][:2] == [{"k": [1, "x"]}, "3q2+7w=="]


def test_a_create_that_does_not_finish_in_time_says_what_to_run_next(
    cli: Cli, api: Api, held: Any
) -> None:
    """A create whose provisioning stalls (a server that accepts TCP and
    does not answer, here a held step) shows its progress, then exits
    non-zero with the operation and the commands to follow or cancel it."""
    _, release = held("provision.roles.before")
    res = cli("projects", "create", "--name", "stuck", "--timeout", "2")
    try:
        assert res.exit_code == 2, res.output
        msg = " ".join(res.stderr.split())
        m = re.search(r"operation (\S+) is running at step roles", msg)
        assert m is not None, msg
        assert f"pgfleet ops watch {m.group(1)}" in msg and "pgfleet ops cancel" in msg
        assert "not ready after 2 s" in msg
        assert "stuck" in res.stdout  # the project, as it stands
    finally:
        release()
    deadline = time.monotonic() + 30
    while api.get("/v1/projects").json()["projects"][0]["status"] != "active":
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_two_statements_in_pgfleet_sql_get_an_explanation(cli: Cli, api: Api) -> None:
    pid = create_ok(api, "two")["id"]
    msg = cli.fails("sql", pid, "select 1; select 2")
    assert "more than one statement" in msg and "one at a time" in msg, msg
    assert "prepared statement" not in msg


def test_pgfleet_sql_shows_the_servers_detail_and_hint(cli: Cli, api: Api) -> None:
    """As psql does (found missing by a newcomer: the API had the detail)."""
    pid = create_ok(api, "dup")["id"]
    cli.ok("sql", pid, "create table items (id int primary key)")
    cli.ok("sql", pid, "insert into items values (1)")
    msg = " ".join(cli.fails("sql", pid, "insert into items values (1)").split())
    assert "(SQLSTATE 23505) detail: Key (id)=(1) already exists." in msg, msg
    msg = " ".join(cli.fails("sql", pid, "select lower(1)").split())
    assert "(SQLSTATE 42883, at character 8) hint: No function matches" in msg, msg


def test_projects_list_reads_on_an_80_column_terminal(
    cli: Cli, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole ids left every other column a few letters wide there (found by a
    newcomer: `now…`, `eu-…`); the ids are cut to 8 characters instead,
    which every command takes, and a pipe still gets them whole."""
    from pgfleet.cli.common import out

    pid = create_ok(api, "narrow", region="eu-central-1")["id"]
    assert pid in cli.ok("projects", "list")  # a pipe: whole
    monkeypatch.setattr(out, "_force_terminal", True)
    monkeypatch.setattr(out, "_width", 80)
    shown = cli.ok("projects", "list")
    assert pid not in shown and pid[:8] in shown, shown
    assert "eu-central-1" in shown and "narrow" in shown and "active" in shown, shown
    assert "UTC" in shown, shown
    assert "narrow" in cli.ok("projects", "show", pid[:8])


def test_operations_and_tokens_lists_read_on_an_80_column_terminal(
    cli: Cli, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the projects list: ids cut to 8 characters there (two of them in
    an operation's row), each taken back by the commands; whole in a pipe."""
    from pgfleet.cli.common import out

    pid = create_ok(api, "ops-narrow", region="eu-central-1")["id"]
    op_id = api.get("/v1/operations").json()["operations"][0]["id"]
    tok = api.post("/v1/tokens", json={"name": "ci"}).json()["id"]
    piped_ops, piped_tokens = cli.ok("ops", "list"), cli.ok("tokens", "list")
    assert op_id in piped_ops and pid in piped_ops and tok in piped_tokens
    monkeypatch.setattr(out, "_force_terminal", True)
    monkeypatch.setattr(out, "_width", 80)
    ops = cli.ok("ops", "list")
    assert op_id not in ops and op_id[:8] in ops and pid[:8] in ops, ops
    assert "provision" in ops and "finished" in ops and "UTC" in ops, ops
    tokens = cli.ok("tokens", "list")
    assert tok not in tokens and tok[:8] in tokens and "ci" in tokens, tokens
    assert "provision" in cli.ok("ops", "show", op_id[:8])
    cli.ok("tokens", "revoke", tok[:8])
    assert any(t["id"] == tok and t["revoked_at"] for t in api.get("/v1/tokens").json()["tokens"])


def test_the_plan_is_called_plan_in_every_request(api: Api) -> None:
    r = api.post("/v1/projects", json={"name": "p", "plan": "pro"})
    assert r.status_code == 201, r.text
    # Answers name it plan too (they said only plan_type: found by a newcomer).
    assert r.json()["plan"] == r.json()["plan_type"] == "pro"
    pid = r.json()["id"]
    r = api.post(f"/v1/projects/{pid}/plan", json={"plan": "enterprise"})
    assert r.status_code == 200, r.text
    assert api.get(f"/v1/projects/{pid}").json()["plan"] == "enterprise"
    assert {p["plan"] for p in api.get("/v1/projects").json()["projects"]} == {"enterprise"}
    # The former name still works, alone; both at once must agree.
    assert api.post("/v1/projects", json={"name": "q", "plan_type": "pro"}).status_code == 201
    err = error_of(api.post("/v1/projects", json={"name": "r", "plan": "pro", "plan_type": "free"}))
    assert "give `plan` only" in err["message"], err


def test_status_in_json(api: Api, fleet: Any) -> None:
    import json

    from pgfleet.config import get_settings

    create_ok(api, "a", region="eu-central-1")
    env = {
        "PGFLEET_HOME": str(fleet.settings.home),
        "PGFLEET_PORT_BASE": str(fleet.settings.port_base),
    }
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(app, ["status", "--json"], env=env)
    finally:
        get_settings.cache_clear()
    assert res.exit_code == 0, (res.output, res.exception)
    body = json.loads(res.stdout)
    by_name = {s["name"]: s for s in body["servers"]}
    eu = by_name[fleet.server("eu-central-1").name]
    assert eu["state"] == "up" and eu["tenant_databases"] == len(fleet.databases("eu-central-1"))
    assert eu["archiving"]["mode"] == "on"
    assert {r["pooling"] for r in body["routers"]} == {"session", "transaction"}
    assert {b["server"]: b["stored_in"] for b in body["backups"]}[eu["name"]] == "eu-west-1"
    # (The suite's platform DBs are per test: the fleet's own is not migrated.)
    assert "operations" in body and body["api"].keys() == {"url", "pid"}


def test_show_has_limits_size_and_connections_and_a_plan_change_prints_limits(
    cli: Cli, api: Api
) -> None:
    import psycopg

    p = create_ok(api, "usage", region="us-east-1")
    c = api.get(f"/v1/projects/{p['id']}/connection", params={"direct": "true"}).json()
    with psycopg.connect(
        host=c["host"],
        port=c["port"],
        dbname=c["database"],
        user=c["user"],
        password=c["password"],
        sslmode="verify-full",
        sslrootcert=c["sslrootcert"],
    ):
        usage = api.get(f"/v1/projects/{p['id']}/usage").json()
        assert usage["reachable"] and usage["connections"] >= 1
        assert usage["database_bytes"] > 1_000_000 and usage["connection_limit"] == 10
        out = cli.ok("projects", "show", "usage")
    rows = dict(ln.split("\t", 1) for ln in out.splitlines())
    assert rows["connection limit"] == "10" and rows["statement timeout"] == "15 s"
    assert rows["database size"].endswith("MB") and rows["connections"].endswith("open")
    out = cli.ok("projects", "plan", "usage", "pro")
    rows = dict(ln.split("\t", 1) for ln in out.splitlines() if "\t" in ln)
    assert rows["connection limit"] == "60" and rows["point-in-time restore"] == "14 days", out


def test_moments_carry_their_zone_and_durations_read_as_a_person_says_them(cli: Cli) -> None:
    from pgfleet.display import duration, size, when

    assert when("2026-11-30T10:16:02.5+01:00") == "2026-11-30 09:16:02 UTC"
    assert when("2026-11-30T10:16:02.5+01:00", round_up=True) == "2026-11-30 09:16:03 UTC"
    assert when("2026-11-30T10:16:02+01:00", round_up=True) == "2026-11-30 09:16:02 UTC"
    assert when(None) == "-"
    assert [size(x) for x in (None, 0, 812, 5530, 1_288_490_189)] == [
        "-",
        "0 B",
        "812 B",
        "5.4 kB",
        "1.2 GB",
    ]
    assert [duration(x) for x in (412, 3200, 65_000, 7_380_000, 300_000_000)] == [
        "412 ms",
        "3.2 s",
        "1 min 05 s",
        "2 h 03 min",
        "3 d 11 h",
    ]
    cli.ok("projects", "create", "--name", "clock", "--region", "us-west-1")
    listed = cli.ok("projects", "list")
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", listed), listed
    op = cli.json("ops", "list")["operations"][0]
    shown = cli.ok("ops", "show", op["id"])
    created = next(ln for ln in shown.splitlines() if ln.startswith("created"))
    assert created.rstrip().endswith("UTC"), shown
    took = next(ln for ln in shown.splitlines() if ln.startswith("duration"))
    assert took.split("\t")[1] == duration(op["duration_ms"]), shown


def test_a_down_region_says_what_to_run(cli: Cli, api: Api, fleet: Any) -> None:
    from tests.test_sql_errors import server_down

    create_ok(api, "dark", region="eu-central-1")
    with server_down(fleet, "eu-central-1"):
        said = cli.fails("sql", "dark", "select 1")  # by its name, too
    assert "region eu-central-1 is unavailable" in said and "HTTP 503" in said, said
    assert "`pgfleet status` shows which servers and routers are down" in said, said


def test_a_create_in_a_region_known_down_fails_fast_unless_asked_to_wait(
    api: Api, platform: Any, fleet: Any
) -> None:
    from pgfleet.monitoring.background import run_once
    from tests.helpers import poll
    from tests.test_sql_errors import server_down

    with server_down(fleet, "ap-southeast-1"):
        run_once(platform)  # the health loop's round notices
        t0 = time.monotonic()
        err = error_of(
            api.post("/v1/projects", json={"name": "x", "region": "ap-southeast-1"}), 503
        )
        assert time.monotonic() - t0 < 2, "not at once"
        assert "failed its last health check" in err["message"], err
        assert "wait_for_region=true" in err["message"], err
        assert api.get("/v1/projects").json()["projects"] == []  # nothing half-made
        r = api.post(
            "/v1/projects",
            json={"name": "patient", "region": "ap-southeast-1"},
            params={"wait": "false", "wait_for_region": "true"},
        )
        assert r.status_code == 202, r.text
        op_id = r.json()["operation"]["id"]
        time.sleep(1)
        assert api.get(f"/v1/operations/{op_id}").json()["status"] in ("scheduled", "running")
    assert poll(api, op_id, timeout=60)["status"] == "finished"
    assert api.get(f"/v1/projects/{r.json()['id']}").json()["status"] == "active"


def test_a_tenants_control_characters_never_reach_the_terminal(cli: Cli, api: Api) -> None:
    """A value, a statement's text or an error can be a tenant's: escape
    sequences in them are shown, never sent to the reader's terminal."""
    pid = create_ok(api, "escapes")["id"]
    out = cli.ok("sql", pid, "select E'\\x1b]0;PWNED\\x07\\x1b[2Jfake' as v")
    assert "\x1b" not in out and "\\x1b]0;PWNED\\x07\\x1b[2Jfake" in out, out
    res = cli("sql", pid, "do $$ begin raise exception E'bad\\x1b[31m'; end $$")
    assert res.exit_code != 0 and "\x1b" not in res.stderr and "\\x1b[31m" in res.stderr
    # Text that reorders itself as it is shown (a bidirectional override).
    out = cli.ok("sql", pid, "select E'report\\u202Egpj.exe' as v")
    assert "\u202e" not in out and "report\\u202egpj.exe" in out, out
    # A zero-width space hides nothing either; and `--json` keeps the data
    # while writing such characters (and C1 controls) as JSON escapes.
    out = cli.ok("sql", pid, "select E'a\\u200Bb\\u202Ec' as v, E'\\u009b31m' as w")
    assert "a\\u200bb\\u202ec" in out and "\u200b" not in out, out
    out = cli.ok("sql", pid, "select E'a\\u200Bb\\u202Ec' as v, E'\\u009b31m' as w", "--json")
    assert not {"\u200b", "\u202e", "\x9b"} & set(out), out
    assert json.loads(out)["rows"] == [["a\u200bb\u202ec", "\x9b31m"]], out
