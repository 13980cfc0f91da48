"""The web console in a real browser: Playwright driving Debian's chromium
against a real API server on the real fleet. Screenshots of the main pages
go to docs/screenshots/."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from pgfleet.auth import create_owner
from pgfleet.monitoring import insights
from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner
from pgfleet.tenants import service
from tests.helpers import Api, FleetUnderTest, connect, refused, run_psql

SHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Debian's chromium is needed (make test installs it)"
    return found


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=chromium_path(), args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield b
        b.close()


@pytest.fixture
def context(browser: Browser, api_url: str) -> Iterator[BrowserContext]:
    ctx = browser.new_context(base_url=api_url, viewport={"width": 1200, "height": 900})
    ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=api_url)
    ctx.set_default_timeout(20_000)
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def sign_in(page: Page, token: str) -> None:
    page.goto("/projects")
    expect(page).to_have_url(re.compile(r"/signin"))
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/projects$"))


def create_in_browser(page: Page, name: str, region_label: str = "US East") -> str:
    page.goto("/projects/new")
    page.get_by_label("Name").fill(name)
    page.get_by_label(re.compile(region_label)).check()
    page.get_by_role("button", name="Create project").click()
    expect(page).to_have_url(re.compile(r"/projects/[0-9a-f-]{36}$"))
    expect(page.locator(".badge").first).to_have_text("active")
    expect(page.locator("[data-progress]")).to_have_count(0)
    pid = page.url.rsplit("/", 1)[1]
    return pid


def test_sign_in_create_in_another_region_and_see_flags(
    page: Page, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    page.goto("/projects")
    expect(page).to_have_url(re.compile(r"/signin\?next=/projects"))
    shot(page, "signin")
    page.get_by_label("API token").fill("pgf_wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not valid")
    page.get_by_label("API token").fill(owner[1])
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/projects$"))

    page.goto("/projects/new")
    # All six regions, with flags; metadata-only ones say where they are hosted.
    choices = page.locator(".region-choice")
    expect(choices).to_have_count(6)
    west = page.locator(".region-choice", has_text="eu-west-1")
    expect(west).to_contain_text("🇪🇺")
    expect(west).to_contain_text("metadata only: hosted in us-east-1 for now")
    expect(page.locator(".region-choice", has_text="eu-central-1")).not_to_contain_text(
        "metadata only"
    )
    expect(page.locator("input[name=region][value=us-east-1]")).to_be_checked()
    shot(page, "new-database")

    page.get_by_label("Name").fill("Café ☕ shop")
    page.locator("input[name=region][value=eu-west-1]").check()
    page.get_by_label("Plan").select_option("pro")
    page.get_by_role("button", name="Create project").click()
    expect(page).to_have_url(re.compile(r"/projects/[0-9a-f-]{36}"))
    expect(page.locator(".badge").first).to_have_text("active")
    expect(page.get_by_role("heading", level=1)).to_have_text("Café ☕ shop")
    expect(page.get_by_test_id("region")).to_contain_text("🇪🇺")
    expect(page.get_by_test_id("region")).to_contain_text("eu-west-1")
    expect(page.get_by_test_id("hosted-region")).to_contain_text("🇺🇸")
    expect(page.get_by_test_id("hosted-region")).to_contain_text("us-east-1")
    expect(page.locator("details.op").first).to_contain_text("provision")
    shot(page, "database")

    page.goto("/projects")
    row = page.locator("tr", has_text="Café ☕ shop")
    expect(row).to_contain_text("🇪🇺")
    expect(row).to_contain_text("hosted in")
    shot(page, "databases")
    # The database is where the page says.
    assert len(fleet.databases("us-east-1")) == 1


def test_validation_error_keeps_what_was_typed(page: Page, owner: tuple[Owner, str]) -> None:
    sign_in(page, owner[1])
    page.goto("/projects/new")
    long_name = "x" * 101
    page.get_by_label("Name").fill(long_name)
    page.locator("input[name=region][value=ap-southeast-1]").check()
    page.get_by_role("button", name="Create project").click()
    error = page.locator("#name-error")
    expect(error).to_contain_text("at most 100")
    expect(page.get_by_label("Name")).to_have_value(long_name)
    expect(page.get_by_label("Name")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("input[name=region][value=ap-southeast-1]")).to_be_checked()


def test_reveal_copy_connect_run_sql_rotate_and_delete(
    page: Page, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    sign_in(page, owner[1])
    pid = create_in_browser(page, "work", "Frankfurt|Central")
    uri_box = page.locator("#uri-rw")
    expect(uri_box).to_have_value(re.compile(r":\*{8}@"))
    page.locator("button.reveal[data-target=uri-rw]").click()
    expect(uri_box).not_to_have_value(re.compile(r":\*{8}@"))
    revealed = uri_box.input_value()
    copy = page.locator("button.copy[data-target=uri-rw]")
    copy.click()
    expect(copy).to_have_text("Copied")  # after the secret was fetched and written
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == revealed
    res = run_psql(copied, "select current_database()")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith("tenant_")

    # SQL editor: results with types, errors with their position.
    page.get_by_label("Query").fill("select 1 as one, 'héllo'::text as greeting, null::int as n")
    page.get_by_role("button", name="Run").click()
    table = page.get_by_test_id("sql-result")
    expect(table.locator("th").nth(0)).to_contain_text("one")
    expect(table.locator("th").nth(0)).to_contain_text("int4")
    expect(table.locator("th").nth(1)).to_contain_text("text")
    expect(table.locator("td").nth(1)).to_have_text("héllo")
    expect(table.locator("td").nth(2)).to_have_text("NULL")
    expect(page.get_by_test_id("sql-meta")).to_contain_text("1 row")
    shot(page, "sql")
    page.get_by_label("Query").fill("selec 1")
    page.get_by_role("button", name="Run").click()
    err = page.get_by_test_id("sql-error")
    expect(err).to_contain_text("42601")
    expect(err).to_contain_text("position 1")
    # History of recent queries, in this browser.
    page.locator("details.history summary").click()
    expect(page.locator("#sql-history li").first).to_have_text("selec 1")

    # Rotate: a new password that works; the old one stops.
    page.goto(f"/projects/{pid}")
    # It asks first, as the CLI does: dismissed, nothing changes.
    asked: list[str] = []

    def answer(accept: bool) -> Callable[[Any], None]:
        def on(dialog: Any) -> None:
            asked.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()

        return on

    page.once("dialog", answer(False))
    page.get_by_role("button", name="Rotate password").click()
    expect(page.locator(".notice")).to_have_count(0)
    assert asked and "current ones stop working" in asked[0], asked
    assert run_psql(revealed, "select 1").returncode == 0
    page.once("dialog", answer(True))
    page.get_by_role("button", name="Rotate password").click()
    expect(page.locator(".notice")).to_contain_text("the old ones stopped working")
    expect(page.locator("[data-progress]")).to_have_count(0)  # reloaded once done
    page.locator("button.reveal[data-target=uri-rw]").click()
    expect(page.locator("#uri-rw")).not_to_have_value(re.compile(r":\*{8}@"))
    rotated = page.locator("#uri-rw").input_value()
    assert rotated != revealed
    assert run_psql(rotated, "select 1").returncode == 0
    assert refused(run_psql(revealed, "select 1").stderr)

    # Delete needs the name typed.
    page.get_by_label(re.compile("Delete: type")).fill("wrong")
    page.get_by_role("button", name="Delete project").click()
    expect(page.get_by_role("alert")).to_contain_text("type the project's name")
    page.goto(f"/projects/{pid}")
    page.get_by_label(re.compile("Delete: type")).fill("work")
    page.get_by_role("button", name="Delete project").click()
    expect(page).to_have_url(re.compile(r"/projects\?flash=deleted"))
    expect(page.locator(".notice")).to_contain_text("deleted")
    assert fleet.databases("eu-central-1") == set()


def test_another_owner_gets_404(
    browser: Browser, api_url: str, page: Page, owner: tuple[Owner, str], platform: Platform
) -> None:
    sign_in(page, owner[1])
    pid = create_in_browser(page, "private")
    _, bob_token = create_owner(platform, "bob")
    ctx = browser.new_context(base_url=api_url)
    try:
        other = ctx.new_page()
        sign_in(other, bob_token)
        resp = other.goto(f"/projects/{pid}")
        assert resp is not None and resp.status == 404
        expect(other.get_by_role("heading", level=1)).to_have_text("Not found")
        expect(other.locator("body")).not_to_contain_text("private")
    finally:
        ctx.close()


def test_regions_page_shows_what_the_api_reports(
    page: Page, owner: tuple[Owner, str], admin: tuple[Owner, str], client: Any
) -> None:
    sign_in(page, owner[1])
    create_in_browser(page, "a", "Frankfurt|Central")
    create_in_browser(page, "b", "Singapore|Southeast")
    resp = page.goto("/regions")
    assert resp is not None and resp.status == 403  # owners are not admins
    page.context.clear_cookies()
    sign_in(page, admin[1])
    page.goto("/regions")
    api = client.get(
        "/v1/admin/stats/regions", headers={"Authorization": f"Bearer {admin[1]}"}
    ).json()
    for r in api["regions"]:
        row = page.locator(f"tr[data-region='{r['region']}']")
        for col in ("tenants", "free", "paid", "hosted"):
            expect(row.locator(f"td[data-col={col}]")).to_have_text(str(r[col]))
    expect(page.locator("svg.chart rect")).to_have_count(12)
    # Each server's backups: where they go and how its archiving goes, as the API says.
    backups = client.get(
        "/v1/admin/base-backups", headers={"Authorization": f"Bearer {admin[1]}"}
    ).json()
    for b in backups["servers"]:
        row = page.locator(f"[data-testid=backups-table] tr[data-server='{b['server']}']")
        expect(row).to_contain_text(b["storage_region"])
        expect(row).to_contain_text("on")
    # At 1280 px the tenants table fits its card (it was 1538 px in 998 px,
    # its last columns out of sight: found by a newcomer).
    page.set_viewport_size({"width": 1280, "height": 900})
    for table in ("regions-table", "backups-table"):
        fits = page.evaluate(
            f"() => {{ const t = document.querySelector('[data-testid={table}]');"
            " return t.scrollWidth <= t.parentElement.clientWidth; }"
        )
        assert fits, table
    # No request for a missing favicon (a console error on every page).
    assert page.locator("link[rel=icon]").count() == 1
    shot(page, "regions")


def test_forged_session_and_revoked_token_go_back_to_sign_in(
    context: BrowserContext, page: Page, api_url: str, owner: tuple[Owner, str], platform: Platform
) -> None:
    sign_in(page, owner[1])
    cookie = next(c for c in context.cookies() if c["name"] == "pgfleet_session")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    forged = dict(cookie, value=cookie["value"][:-4] + "AAAA")
    context.add_cookies([forged])  # type: ignore[list-item]
    page.goto("/projects")
    expect(page).to_have_url(re.compile(r"/signin"))
    # A session whose token was revoked ends too.
    sign_in(page, owner[1])
    from pgfleet.auth import revoke_token

    with platform.db.connection() as conn:
        (tid,) = conn.execute(
            "SELECT id FROM api_tokens WHERE owner_id = %s", (owner[0].id,)
        ).fetchone() or (None,)
    revoke_token(platform, owner[0], str(tid))
    page.goto("/projects")
    expect(page).to_have_url(re.compile(r"/signin"))


def test_form_without_csrf_is_403(
    context: BrowserContext, page: Page, api_url: str, owner: tuple[Owner, str]
) -> None:
    sign_in(page, owner[1])
    cookie = next(c for c in context.cookies() if c["name"] == "pgfleet_session")
    with httpx.Client(base_url=api_url, cookies={"pgfleet_session": cookie["value"]}) as http:
        r = http.post(
            "/projects/new", data={"name": "sneaky", "region": "us-east-1", "plan": "free"}
        )
        assert r.status_code == 403
        assert "CSRF" in r.text
        r = http.post(
            "/projects/new",
            data={"name": "sneaky", "region": "us-east-1", "plan": "free", "csrf": "forged"},
        )
        assert r.status_code == 403
    page.goto("/projects")
    expect(page.locator("body")).not_to_contain_text("sneaky")


def test_html_in_a_name_is_text(page: Page, owner: tuple[Owner, str]) -> None:
    sign_in(page, owner[1])
    evil = "<script>window.pwned=1</script><b>bold</b>"
    page.goto("/projects/new")
    page.get_by_label("Name").fill(evil)
    page.get_by_role("button", name="Create project").click()
    expect(page.locator(".badge").first).to_have_text("active")
    expect(page.locator("[data-progress]")).to_have_count(0)  # done reloading
    expect(page.get_by_role("heading", level=1)).to_have_text(evil)
    assert page.evaluate("window.pwned") is None
    assert page.locator("h1 b").count() == 0
    page.goto("/projects")
    expect(page.locator("table.list")).to_contain_text(evil)
    assert page.evaluate("window.pwned") is None


def test_phone_width_and_keyboard(page: Page, owner: tuple[Owner, str]) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto("/signin")
    # The token field is reached with the keyboard: skip link, brand, field.
    focused = []
    for _ in range(3):
        page.keyboard.press("Tab")
        focused.append(
            page.evaluate("document.activeElement.id || document.activeElement.textContent")
        )
    assert focused == ["Skip to content", "pgfleet", "token"], focused
    page.keyboard.type(owner[1])
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/projects$"))
    page.goto("/projects/new")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, width
    shot(page, "new-database-phone")


def test_expired_session_goes_back_to_sign_in(
    context: BrowserContext, page: Page, api_url: str, owner: tuple[Owner, str], platform: Platform
) -> None:
    import json
    import time

    sign_in(page, owner[1])
    with platform.db.connection() as conn:
        row = conn.execute(
            "SELECT id FROM api_tokens WHERE owner_id = %s", (owner[0].id,)
        ).fetchone()
    assert row is not None
    payload = json.dumps({"o": str(owner[0].id), "t": str(row[0]), "c": "x" * 32})
    too_old = int(time.time()) - platform.settings.session_ttl_s - 5
    cookie = next(c for c in context.cookies() if c["name"] == "pgfleet_session")
    context.add_cookies([dict(cookie, value=platform.secrets.encrypt(payload, at=too_old))])  # type: ignore[list-item]
    page.goto("/projects")
    expect(page).to_have_url(re.compile(r"/signin"))
    # The same payload, fresh, is a valid session: it was the age that counted.
    context.add_cookies([dict(cookie, value=platform.secrets.encrypt(payload))])  # type: ignore[list-item]
    page.goto("/projects")
    expect(page).to_have_url(re.compile(r"/projects$"))


def test_pause_resume_and_sign_out(page: Page, owner: tuple[Owner, str]) -> None:
    sign_in(page, owner[1])
    pid = create_in_browser(page, "napper")
    page.locator("button.reveal[data-target=uri-rw]").click()
    expect(page.locator("#uri-rw")).not_to_have_value(re.compile(r"\*{8}"))
    uri = page.locator("#uri-rw").input_value()
    assert uri.startswith("postgresql://")
    page.get_by_role("button", name="Pause").click()
    expect(page.locator("[data-progress]")).to_have_count(0)
    expect(page.locator(".badge").first).to_have_text("paused")
    assert refused(run_psql(uri, "select 1").stderr, "not permitted to log in")
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("[data-progress]")).to_have_count(0)
    expect(page.locator(".badge").first).to_have_text("active")
    assert run_psql(uri, "select 1").returncode == 0
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/signin"))
    page.goto(f"/projects/{pid}")
    expect(page).to_have_url(re.compile(r"/signin"))


def test_sign_in_form_needs_its_csrf_token(api_url: str, owner: tuple[Owner, str]) -> None:
    """Another site cannot post a token to /signin and sign a browser in."""
    with httpx.Client(base_url=api_url) as http:
        r = http.post("/signin", data={"token": owner[1], "next": "/projects"})
        assert r.status_code == 403
        assert "pgfleet_session" not in r.cookies
        form = http.get("/signin")
        m = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert m is not None
        r = http.post("/signin", data={"token": owner[1], "next": "/projects", "csrf": m.group(1)})
        assert r.status_code == 303, r.text
        assert "pgfleet_session" in r.cookies


def test_pages_run_under_the_content_security_policy(
    page: Page, owner: tuple[Owner, str], admin: tuple[Owner, str]
) -> None:
    """The console works with no inline script or style and nothing loaded
    from elsewhere: the browser reports no policy violation on any page,
    and the reveal button still works (it fetches the secret)."""
    violations: list[str] = []
    page.on(
        "console",
        lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None,
    )
    sign_in(page, owner[1])
    pid = create_in_browser(page, "policed")
    for path in ("/projects", "/projects/new", f"/projects/{pid}"):
        response = page.goto(path)
        assert response is not None
        assert "script-src 'self'" in response.headers["content-security-policy"]
    page.locator("button.reveal[data-target=uri-rw]").click()
    expect(page.locator("#uri-rw")).to_have_value(re.compile(r"^postgresql://[^*]+$"))
    page.get_by_role("button", name="Sign out").click()
    sign_in(page, admin[1])
    page.goto("/regions")
    expect(page.get_by_role("heading", name=re.compile("Regions"))).to_be_visible()
    assert violations == [], violations


def test_sign_out_ends_the_session_on_the_server(api_url: str, owner: tuple[Owner, str]) -> None:
    """A copy of the session cookie taken before signing out (a shared
    machine, a stolen cookie) no longer opens the console."""
    with httpx.Client(base_url=api_url) as http:
        form = http.get("/signin")
        m = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert m is not None
        r = http.post("/signin", data={"token": owner[1], "next": "/projects", "csrf": m.group(1)})
        assert r.status_code == 303, r.text
        copy = r.cookies["pgfleet_session"]
        page = http.get("/projects")
        assert page.status_code == 200
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        assert http.post("/signout", data={"csrf": csrf.group(1)}).status_code == 303
    with httpx.Client(base_url=api_url, cookies={"pgfleet_session": copy}) as stolen:
        r = stolen.get("/projects")
        assert r.status_code == 303 and "/signin" in r.headers["location"], r.status_code


def test_api_docs_render_without_internet(page: Page, api_url: str) -> None:
    """/docs loads Swagger UI from the package itself: with every request
    that leaves the API's own address refused, the reference still renders."""
    left: list[str] = []

    def only_local(route: Any) -> None:
        if route.request.url.startswith(api_url):
            route.continue_()
        else:
            left.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto("/docs")
    page.wait_for_selector(".swagger-ui .information-container .title")
    assert "pgfleet" in page.inner_text(".swagger-ui .information-container .title")
    page.get_by_text("/v1/projects", exact=True).first.wait_for()
    assert page.locator(".opblock").count() > 20  # the operations are listed
    page.get_by_text("Serverless driver endpoint").first.wait_for()
    assert left == [], f"/docs reached outside the API: {left}"


def test_snapshot_and_restore_from_the_console(
    page: Page, owner: tuple[Owner, str], platform: Platform, fleet: FleetUnderTest
) -> None:
    """Take a snapshot, see it listed, restore it into a new database in
    another region (residency limits the regions offered), follow the
    restore to the new database's page."""
    sign_in(page, owner[1])
    page.goto("/projects/new")
    page.get_by_label("Name").fill("ledger")
    page.get_by_label(re.compile("EU Central")).check()
    page.get_by_label("Data residency").select_option("eu")
    page.get_by_role("button", name="Create project").click()
    expect(page).to_have_url(re.compile(r"/projects/[0-9a-f-]{36}$"))
    expect(page.get_by_test_id("residency")).to_have_text("eu")
    expect(page.locator("[data-progress]")).to_have_count(0)
    pid = page.url.rsplit("/", 1)[1]
    page.get_by_role("button", name="Take a snapshot").click()
    expect(page.get_by_text("Done: snapshot taken")).to_be_visible()
    expect(page.get_by_test_id("snapshots")).to_contain_text("ok")
    # Only EU regions are offered for the copy.
    regions = page.locator("#restore-region option").all_inner_texts()
    assert all("eu-" in r for r in regions) and len(regions) == 2, regions
    page.locator("#restore-source").select_option(index=0)
    page.locator("#restore-region").select_option("eu-central-1")
    shot(page, "backups")
    page.get_by_role("button", name="Restore").click()
    expect(page).to_have_url(re.compile(r"/projects/[0-9a-f-]{36}\?op="))
    assert pid not in page.url
    expect(page.locator(".badge").first).to_have_text("active", timeout=60_000)
    expect(page.get_by_text("Restored from")).to_be_visible()
    expect(page.get_by_test_id("residency")).to_have_text("eu")


def test_a_failed_restore_says_why_in_the_console(
    page: Page, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    sign_in(page, owner[1])
    pid = create_in_browser(page, "fragile")
    page.get_by_role("button", name="Take a snapshot").click()
    expect(page.get_by_test_id("snapshots")).to_contain_text("ok")
    for dump in (fleet.settings.home_abs / "backups").rglob(f"snapshots/{pid}/*.dump"):
        data = bytearray(dump.read_bytes())
        data[len(data) // 2] ^= 0x01
        dump.write_bytes(bytes(data))
    labels = page.locator("#restore-source option").all_inner_texts()
    page.locator("#restore-source").select_option(
        label=next(x for x in labels if x.startswith("snapshot of"))
    )
    page.get_by_role("button", name="Restore").click()
    expect(page.get_by_role("heading", name="The restore did not finish")).to_be_visible(
        timeout=30_000
    )
    expect(page.get_by_role("alert")).to_contain_text("damaged")
    page.get_by_role("link", name="Back").click()
    expect(page).to_have_url(re.compile(pid))


def test_the_sql_editor_shows_json_as_json_and_bytea_as_hex(
    page: Page, owner: tuple[Owner, str]
) -> None:
    sign_in(page, owner[1])
    create_in_browser(page, "values")
    page.get_by_label("Query").fill(
        "select '{\"k\": [1, \"x\"]}'::jsonb as j, '\\xdeadbeef'::bytea as b, true as t"
    )
    page.get_by_role("button", name="Run").click()
    cells = page.get_by_test_id("sql-result").locator("tbody td").all_inner_texts()
    assert cells == ['{"k": [1, "x"]}', "\\xdeadbeef", "true"], cells
    # A control character a tenant stored is shown as its escape, as the CLI
    # does (the browser showed a box glyph).
    page.get_by_label("Query").fill("select E'\\x1b[31mred' as v")
    page.get_by_role("button", name="Run").click()
    cells = page.get_by_test_id("sql-result").locator("tbody td").all_inner_texts()
    assert cells == ["\\x1b[31mred"], cells
    # And text that would reorder the page after it (a bidirectional
    # override), in a column's name and in an error's words.
    page.get_by_label("Query").fill(
        "select 1 as \"a\u202eb\", pg_catalog.concat('x', E'\\u202e', 'y') as v"
    )
    page.get_by_role("button", name="Run").click()
    result = page.get_by_test_id("sql-result")
    assert result.locator("tbody td").all_inner_texts() == ["1", "x\\u202ey"]
    assert "a\\u202eb" in result.locator("thead").inner_text()
    page.get_by_label("Query").fill("do $$ begin raise exception E'no\\u202eway'; end $$")
    page.get_by_role("button", name="Run").click()
    said = page.get_by_test_id("sql-error").inner_text()
    assert "no\\u202eway" in said and "\u202e" not in said, said


def test_the_console_changes_a_plan(page: Page, owner: tuple[Owner, str]) -> None:
    sign_in(page, owner[1])
    create_in_browser(page, "upgrade")
    page.get_by_label("Plan").select_option("pro")
    page.get_by_role("button", name="Change plan").click()
    expect(page.locator(".notice")).to_contain_text("plan changed to pro")
    expect(page.locator("dl.facts")).to_contain_text("pro")


def test_no_page_scrolls_sideways_on_a_phone(
    page: Page, owner: tuple[Owner, str], admin: tuple[Owner, str], api: Api, platform: Platform
) -> None:
    """At 375 px the document is never wider than the screen: wide tables
    scroll inside their own box."""
    sign_in(page, owner[1])
    pid = create_in_browser(page, "a database with quite a long name indeed")
    for i in range(3):  # the project page's query stats table gets rows
        r = api.post(
            f"/v1/projects/{pid}/sql",
            json={"query": f"select {i}, now(), 'x' as some_long_column_name"},
        )
        assert r.status_code == 200, r.text
    insights.sample(platform)  # and its insights table too
    page.set_viewport_size({"width": 375, "height": 812})
    widths = {}
    for path in (f"/projects/{pid}", "/projects", "/projects/new", "/tokens"):
        page.goto(path)
        widths[path] = page.evaluate("document.documentElement.scrollWidth")
    shot(page, "databases-phone")
    page.goto(f"/projects/{pid}")
    shot(page, "database-phone")
    page.context.clear_cookies()
    sign_in(page, admin[1])
    page.goto("/owners")
    widths["/owners"] = page.evaluate("document.documentElement.scrollWidth")
    page.goto("/regions")
    widths["/regions"] = page.evaluate("document.documentElement.scrollWidth")
    shot(page, "regions-phone")
    assert all(w <= 375 for w in widths.values()), widths


def test_insights_show_statements_from_psql(
    page: Page, owner: tuple[Owner, str], admin: tuple[Owner, str], platform: Platform
) -> None:
    sign_in(page, owner[1])
    pid = create_in_browser(page, "seen", "Frankfurt|Central")
    uri = service.connection_details(platform, owner[0], pid, "rw").uri
    with connect({"uri": uri}) as c:
        c.execute("create table seen (n int)")
        for _ in range(3):
            c.execute("select n from seen where n < 5").fetchall()
    insights.sample(platform)
    page.goto(f"/projects/{pid}")
    row = page.get_by_test_id("insights").locator("tr", has_text="select n from seen where n < $1")
    expect(row.locator("td").nth(1)).to_have_text("3")
    page.context.clear_cookies()
    sign_in(page, admin[1])
    page.goto("/regions")
    hosted = page.get_by_test_id("region-insights").locator("tr", has_text="eu-central-1")
    expect(hosted).to_be_visible()


def test_the_console_lists_owners_and_tokens_and_each_projects_owner(
    page: Page,
    platform: Platform,
    admin: tuple[Owner, str],
    owner: tuple[Owner, str],
    api: Api,
    client: Any,
) -> None:
    assert api.post("/v1/projects", json={"name": "alices"}).status_code == 201
    _, bob_token = create_owner(platform, "bob")
    sign_in(page, admin[1])
    row = page.locator("tr", has_text="alices")
    expect(row.locator("td[data-col=owner]")).to_have_text("alice")
    page.goto("/owners")
    page.get_by_label("Name").fill("carol")
    page.get_by_role("button", name="Create owner").click()
    carol = page.get_by_test_id("new-owner").locator("code").inner_text()
    assert carol.startswith("pgf_")
    expect(page.get_by_test_id("owners").locator("tr", has_text="carol")).to_be_visible()
    page.get_by_test_id("owners").locator("tr", has_text="bob").get_by_role("link").click()
    page.once("dialog", lambda dialog: dialog.accept())  # it asks first
    page.get_by_role("button", name="Revoke").click()
    expect(page.get_by_role("status")).to_contain_text("revoked")
    # Every user: their own tokens, made with a scope and an expiry.
    page.goto("/tokens")
    page.get_by_label("Name", exact=True).fill("reader")
    page.get_by_label("Scope").select_option("read")
    page.get_by_label("Expires after (days; empty: never)").fill("3")
    page.get_by_role("button", name="Create token").click()
    reader = page.get_by_test_id("new-token").locator("code").inner_text()
    expect(page.get_by_test_id("tokens").locator("tr", has_text="reader")).to_contain_text("read")
    shot(page, "tokens")
    # A read-only token is for the API and the CLI: the console says so.
    page.context.clear_cookies()
    page.goto("/signin")
    page.get_by_label("API token").fill(reader)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("read-only")
    # An owner who is not an admin gets 403 on the owners page.
    sign_in(page, owner[1])
    resp = page.goto("/owners")
    assert resp is not None and resp.status == 403
    me = {"Authorization": f"Bearer {bob_token}"}
    assert client.get("/v1/me", headers=me).status_code == 401
    me = {"Authorization": f"Bearer {carol}"}
    assert client.get("/v1/me", headers=me).json()["name"] == "carol"
