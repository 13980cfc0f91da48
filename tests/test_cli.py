"""The CLI as a client of a real API server (uvicorn in a thread) on the real fleet."""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import subprocess
import sys
import warnings
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from pgfleet.auth import create_owner
from pgfleet.cli import app
from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner
from tests.helpers import FleetUnderTest, run_psql

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
URI_RE = re.compile(r"postgresql://\S+")
TOKEN_RE = re.compile(r"pgf_[A-Za-z0-9_\-]+")
FLAGS = {
    "us-east-1": "🇺🇸",
    "us-west-1": "🇺🇸",
    "eu-central-1": "🇪🇺",
    "eu-west-1": "🇪🇺",
    "ap-southeast-1": "🇸🇬",
    "ap-northeast-1": "🇯🇵",
}


class Cli:
    """Runs `pgfleet ...` in-process against the test API with one token."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.runner = CliRunner()

    def __call__(self, *args: str, token: str | None = None, url: str | None = None) -> Result:
        argv = [*args, "--url", url or self.url, "--token", token or self.token]
        return self.invoke(argv)

    def invoke(self, argv: list[str], env: dict[str, str] | None = None) -> Result:
        # A wide terminal so that Rich tables do not fold ids and URIs.
        return self.runner.invoke(app, argv, env={"COLUMNS": "250", **(env or {})})

    def ok(self, *args: str, token: str | None = None) -> str:
        res = self(*args, token=token)
        assert res.exit_code == 0, (args, res.output, res.exception)
        return res.stdout

    def json(self, *args: str, token: str | None = None) -> Any:
        return json.loads(self.ok(*args, "--json", token=token))

    def fails(self, *args: str, token: str | None = None, url: str | None = None) -> str:
        res = self(*args, token=token, url=url)
        assert res.exit_code != 0, (args, res.output)
        assert "Traceback" not in res.output
        # A clean failure through `fail()`, not an uncaught exception.
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
        return " ".join(res.stderr.split())


pytestmark = pytest.mark.usefixtures("cli_env")


@pytest.fixture
def cli(api_url: str, owner: tuple[Owner, str]) -> Cli:
    return Cli(api_url, owner[1])


@pytest.fixture
def admin_cli(api_url: str, admin: tuple[Owner, str]) -> Cli:
    return Cli(api_url, admin[1])


def test_regions_list(cli: Cli) -> None:
    out = cli.ok("regions", "list")
    for rid, flag in FLAGS.items():
        line = next((ln for ln in out.splitlines() if rid in ln), None)
        assert line is not None, (rid, out)
        assert flag in line, line
        status = "active" if rid in ("us-east-1", "eu-central-1", "ap-southeast-1") else "metadata"
        assert status in line, line
    data = cli.json("regions", "list")["regions"]
    assert [r["id"] for r in data] == list(FLAGS)
    assert {r["id"]: r["flag"] for r in data} == FLAGS


def test_project_lifecycle(cli: Cli, fleet: FleetUnderTest) -> None:
    out = cli.ok(
        "projects", "create", "--name", "shop", "--region", "eu-central-1", "--plan", "free"
    )
    ids = UUID_RE.findall(out)
    assert ids, out
    pid = ids[0]
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert "🇪🇺 eu-central-1" in lines["region"]
    hosted = next(ln for ln in out.splitlines() if ln.strip().startswith("hosted in"))
    assert "🇪🇺 eu-central-1" in hosted
    assert re.search(r"^\s*status\s+active\s*$", out, re.M), out
    uris = URI_RE.findall(out)
    assert len(uris) == 1, out
    res = run_psql(uris[0], "select current_database()")
    assert res.returncode == 0, res.stderr
    db = res.stdout.strip()
    assert db == "tenant_" + pid.replace("-", "_")
    for region in fleet.regions():
        assert (db in fleet.databases(region)) == (region == "eu-central-1"), region

    out = cli.ok("projects", "list")
    row = next((ln for ln in out.splitlines() if pid in ln), None)
    assert row is not None, out
    assert "shop" in row
    assert "eu-central-1" in row
    assert "active" in row

    out = cli.ok("projects", "show", pid)
    assert pid in out
    assert "🇪🇺 eu-central-1" in out
    assert re.search(r"^\s*name\s+shop\s*$", out, re.M), out

    ro = cli.ok("projects", "connection", pid, "--mode", "ro").strip()
    assert URI_RE.fullmatch(ro), ro
    res = run_psql(ro, "create table t (x int)")
    assert res.returncode != 0
    assert "read-only" in res.stderr
    rw = cli.ok("projects", "connection", pid).strip()
    res = run_psql(rw, "create table t (x int)")
    assert res.returncode == 0, res.stderr

    # Not a terminal and no --yes: refused, naming the project; nothing dropped.
    msg = cli.fails("projects", "delete", pid)
    assert "'shop'" in msg and "add --yes" in msg, msg
    assert "only its backups can bring it back" in " ".join(msg.split()), msg
    assert cli.json("projects", "show", pid)["status"] == "active"
    out = cli.ok("projects", "delete", pid, "--yes")
    assert pid in out
    assert "deleted" in out
    for region in fleet.regions():
        assert db not in fleet.databases(region)
        assert db not in fleet.roles(region)
    assert pid not in cli.ok("projects", "list")
    # Asked for by name afterwards: what became of it, and how it comes back.
    said = " ".join(cli.fails("projects", "show", "shop").split())
    assert "project 'shop'" in said and "was deleted at" in said, said
    assert f"pgfleet backups restore {pid}" in said, said
    assert run_psql(rw, "select 1").returncode != 0


def test_json_variants(cli: Cli, fleet: FleetUnderTest) -> None:
    created = cli.json(
        "projects", "create", "--name", "jsonic", "--region", "ap-southeast-1", "--plan", "pro"
    )
    pid = created["id"]
    assert created["status"] == "active"
    assert created["region"] == created["hosted_region"] == "ap-southeast-1"
    assert created["plan_type"] == "pro"
    assert created["connection"]["database"] in fleet.databases("ap-southeast-1")

    listed = cli.json("projects", "list")
    assert [p["id"] for p in listed["projects"]] == [pid]
    shown = cli.json("projects", "show", pid)
    assert shown["id"] == pid
    assert shown["name"] == "jsonic"
    conn = cli.json("projects", "connection", pid, "--mode", "ro")
    assert conn["mode"] == "ro"
    assert conn["database"] == created["connection"]["database"]
    res = run_psql(conn["uri"], "select 1")
    assert res.returncode == 0, res.stderr

    cli.ok("projects", "delete", pid, "--yes")
    assert cli.json("projects", "list")["projects"] == []
    everything = cli.json("projects", "list", "--all")["projects"]
    assert [(p["id"], p["status"]) for p in everything] == [(pid, "deleted")]


def test_flags_and_env_are_both_read(cli: Cli) -> None:
    res = cli.invoke(
        ["regions", "list", "--json"], env={"PGFLEET_URL": cli.url, "PGFLEET_TOKEN": cli.token}
    )
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["regions"]) == 6
    # A flag wins over the environment.
    res = cli.invoke(
        ["regions", "list", "--json", "--token", cli.token],
        env={"PGFLEET_URL": cli.url, "PGFLEET_TOKEN": "pgf_wrong"},
    )
    assert res.exit_code == 0, res.output


def test_unknown_region_lists_valid_regions(cli: Cli, fleet: FleetUnderTest) -> None:
    msg = cli.fails("projects", "create", "--name", "shop", "--region", "mars-1")
    assert "mars-1" in msg
    for rid in FLAGS:
        assert rid in msg
    assert "422" in msg
    msg = cli.fails("projects", "create", "--name", "shop", "--plan", "gold")
    for plan in ("free", "pro", "enterprise"):
        assert plan in msg
    assert cli.json("projects", "list")["projects"] == []
    assert all(fleet.databases(r) == set() for r in fleet.regions())


def test_bad_token_is_a_clear_401(cli: Cli) -> None:
    for bad in ("pgf_" + "x" * 43, "not-a-token"):
        msg = cli.fails("projects", "list", token=bad)
        assert "401" in msg
        assert "token" in msg


def test_missing_token_is_a_clear_error(cli: Cli) -> None:
    res = cli.invoke(["projects", "list", "--url", cli.url])
    assert res.exit_code != 0
    assert "token" in res.stderr
    assert "Traceback" not in res.output


def test_unknown_project_id(cli: Cli) -> None:
    for args in (
        ("projects", "show", "00000000-0000-4000-8000-000000000000"),
        ("projects", "connection", "00000000-0000-4000-8000-000000000000"),
        ("projects", "delete", "00000000-0000-4000-8000-000000000000", "--yes"),
    ):
        msg = cli.fails(*args)
        assert "not found" in msg, (args, msg)
        assert "404" in msg
    # Neither a name nor an id prefix of any project: said so, with where to look.
    for args in (("projects", "show", "nope"), ("projects", "delete", "nope", "--yes")):
        msg = cli.fails(*args)
        assert "no project is named 'nope' or has an id starting with it" in msg, msg


def test_a_project_is_named_by_its_name_or_a_unique_id_prefix(cli: Cli) -> None:
    """As gh, docker and neonctl: ids are never cut, and a unique name or id
    prefix names a project; ambiguity lists the candidates."""
    a = cli.json("projects", "create", "--name", "alpha")["id"]
    b = cli.json("projects", "create", "--name", "beta")["id"]
    assert cli.json("projects", "show", "alpha")["id"] == a
    assert cli.json("projects", "show", b[:8])["id"] == b
    # Piped (not a terminal): tab-separated, whole ids, no box drawing.
    listed = cli.ok("projects", "list")
    assert "│" not in listed and "…" not in listed
    rows = [ln.split("\t") for ln in listed.splitlines()]
    assert rows[0][0] == "id" and {r[0] for r in rows[1:]} == {a, b}
    cli.json("projects", "create", "--name", "alpha")
    msg = cli.fails("projects", "show", "alpha")
    assert "'alpha' names 2 projects" in msg and a in msg, msg
    common = next(i for i in range(36) if a[: i + 1] != b[: i + 1])
    if common:  # the two ids share a first character or more
        assert "names 2 projects" in cli.fails("projects", "show", a[:common])


def test_bad_input_messages(cli: Cli) -> None:
    assert "name" in cli.fails("projects", "create", "--name", "   ")
    assert "name" in cli.fails("projects", "create", "--name", "x" * 101)
    assert "subdomain" in cli.fails("projects", "create", "--name", "a", "--subdomain", "Bad_Sub")
    pid = cli.json("projects", "create", "--name", "a")["id"]
    assert "mode" in cli.fails("projects", "connection", pid, "--mode", "xx")


def test_unreachable_api(cli: Cli) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    msg = cli.fails("regions", "list", url=closed)
    assert "cannot reach" in msg
    assert closed in msg
    msg = cli.fails("projects", "create", "--name", "x", url=closed)
    assert "cannot reach" in msg


def test_names_are_shown_verbatim(cli: Cli) -> None:
    """A project name is data: Rich must not read it as markup."""
    problems = []
    for name in ("shop [staging]", "db [/prod]", "Robert'); DROP TABLE tenants;-- 🐘 Zoë"):
        created = cli.json("projects", "create", "--name", name)
        assert created["name"] == name
        for args in (("projects", "show", created["id"]), ("projects", "list")):
            res = cli(*args)
            if res.exit_code != 0:
                problems.append((name, args[1], f"exit {res.exit_code}: {res.exception!r}"))
            elif name not in res.stdout:
                problems.append((name, args[1], "name not shown as is"))
    assert problems == []


def test_cli_closes_its_http_connections(cli: Cli) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for args in (("regions", "list"), ("projects", "show", "nope")):
            res = cli(*args)
            del res
            gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []


def test_tokens_create_list_revoke(cli: Cli, admin_cli: Cli) -> None:
    for c in (cli, admin_cli):
        out = c.ok("tokens", "create", "--name", "laptop")
        tokens = TOKEN_RE.findall(out)
        assert len(tokens) == 1, out
        new_token = tokens[0]
        tid = UUID_RE.findall(out)[0]
        assert c.json("regions", "list", token=new_token)

        listed = c.ok("tokens", "list")
        assert tid in listed
        assert "laptop" in listed
        assert new_token[:10] in listed
        assert new_token not in listed

        assert tid in c.ok("tokens", "revoke", tid)
        msg = c.fails("projects", "list", token=new_token)
        assert "401" in msg
        row = next(ln for ln in c.ok("tokens", "list").splitlines() if tid in ln)
        cells = row.split("\t")
        assert re.fullmatch(r"\d{4}-\d\d-\d\d [\d:]{8} UTC", cells[-1]), row  # revoked at
        # The token that did the revoking still works.
        assert c.json("projects", "list") == {"projects": []}
    assert "not found" in cli.fails("tokens", "revoke", "00000000-0000-4000-8000-000000000000")
    # By a prefix of its id, or by its name, as projects are named.
    out = cli.ok("tokens", "create", "--name", "phone")
    tid = UUID_RE.findall(out)[0]
    assert tid in cli.ok("tokens", "revoke", tid[:8])
    out = cli.ok("tokens", "create", "--name", "tablet")
    tid = UUID_RE.findall(out)[0]
    assert tid in cli.ok("tokens", "revoke", "tablet")
    assert "no token is named 'nothing'" in cli.fails("tokens", "revoke", "nothing")
    # A revoked token's name does not make a live one's ambiguous (found by
    # an attack); a name that is also another's id prefix is ambiguous.
    out = cli.ok("tokens", "create", "--name", "dup")
    gone = UUID_RE.findall(out)[0]
    cli.ok("tokens", "revoke", gone)
    out = cli.ok("tokens", "create", "--name", "dup")
    tid = UUID_RE.findall(out)[0]
    assert tid in cli.ok("tokens", "revoke", "dup")
    kept = UUID_RE.findall(cli.ok("tokens", "create", "--name", "kept"))[0]
    out = cli.ok("tokens", "create", "--name", kept[:8])
    clash = UUID_RE.findall(out)[0]
    assert "names 2 tokens" in cli.fails("tokens", "revoke", kept[:8])
    assert clash in cli.ok("tokens", "revoke", clash)


def test_owners_create_with_admin_token(
    admin_cli: Cli, cli: Cli, platform: Platform, fleet: FleetUnderTest
) -> None:
    alices = cli.json("projects", "create", "--name", "alice's")
    out = admin_cli.ok("owners", "create", "dave")
    assert "dave" in out
    tokens = TOKEN_RE.findall(out)
    assert len(tokens) == 1, out
    dave = tokens[0]
    assert cli.json("projects", "list", token=dave) == {"projects": []}
    created = cli.json(
        "projects", "create", "--name", "dave's", "--region", "eu-central-1", token=dave
    )
    assert created["connection"]["database"] in fleet.databases("eu-central-1")
    assert "not found" in cli.fails("projects", "show", alices["id"], token=dave)

    data = admin_cli.json("owners", "create", "erin", "--admin")
    assert data["owner"]["is_admin"] is True
    seen = {p["id"] for p in cli.json("projects", "list", token=data["token"])["projects"]}
    assert seen == {alices["id"], created["id"]}

    out = admin_cli.ok("owners", "list")
    for name in ("alice", "dave", "erin"):
        assert name in out
    msg = cli.fails("owners", "create", "mallory", "--admin")
    assert "403" in msg
    assert "admin" in msg
    _, other = create_owner(platform, "frank")
    assert "403" in cli.fails("owners", "list", token=other)


def test_an_argument_that_is_not_utf8_is_refused_in_words() -> None:
    """Bytes that are not UTF-8 on the command line (a file name from an
    old system, a stray paste) are refused before any command runs, naming
    the argument and the byte: no request could carry them (it was a
    traceback from the HTTP client)."""
    done = subprocess.run(
        [sys.executable, "-m", "pgfleet.cli", "sql", "proj", b"select \xff"],
        capture_output=True,
        env={**os.environ, "PGFLEET_TOKEN": "x", "PGFLEET_URL": "http://127.0.0.1:9"},
        timeout=60,
    )
    stderr = done.stderr.decode()
    assert done.returncode == 2, (done.returncode, stderr)
    assert "argument 3" in stderr and "0xff" in stderr and "UTF-8" in stderr, stderr
    assert "Traceback" not in stderr and not done.stdout, (stderr, done.stdout)


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"PGFLEET_TOKEN": "pgf_abc\u00a0"}, "not printable ASCII at position 8"),
        ({"PGFLEET_TOKEN": "pgf_\u00e9"}, "not printable ASCII at position 5"),
        ({"PGFLEET_URL": "http://[::1"}, "is not a URL"),
        ({"PGFLEET_URL": "127.0.0.1:8470"}, "not an http:// or https:// URL"),
    ],
)
def test_a_token_or_address_no_request_can_carry_is_refused_in_words(
    env: dict[str, str], said: str
) -> None:
    """A token pasted with a non-breaking space, or an address that is not
    a URL, is said to be so, naming where it came from (they were
    tracebacks from the HTTP client)."""
    done = subprocess.run(
        [sys.executable, "-m", "pgfleet.cli", "projects", "list"],
        capture_output=True,
        text=True,
        env={**os.environ, "PGFLEET_TOKEN": "pgf_x", "PGFLEET_URL": "http://127.0.0.1:9", **env},
        timeout=60,
    )
    stderr = " ".join(done.stderr.split())  # as one line, however it was folded
    assert done.returncode == 1, (done.returncode, stderr)
    assert said in stderr and "PGFLEET_" in stderr and "Traceback" not in stderr, stderr
