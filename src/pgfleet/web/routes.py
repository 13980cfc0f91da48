"""Console pages. Each handler checks the session, calls one service (the
same ones the REST API calls) and renders a template."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from pgfleet import auth
from pgfleet.backups import service as backups_service
from pgfleet.display import display, duration, printable, size, when
from pgfleet.errors import (
    Conflict,
    InvalidInput,
    NotAuthenticated,
    NotFound,
    PgfleetError,
    SqlError,
    to_http,
)
from pgfleet.monitoring import insights, stats
from pgfleet.monitoring.service import advisor_report, cost_report
from pgfleet.operations import service as ops_service
from pgfleet.platform.core import Platform
from pgfleet.regions import PLANS, REGIONS, REGIONS_BY_ID
from pgfleet.tenants import service
from pgfleet.tenants.sql import SqlGateway, SqlRequest
from pgfleet.tenants.store import Tenant
from pgfleet.web import session as sess

HERE = Path(__file__).parent
templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
# A SQL result's cell as a person reads it (JSON as JSON, bytea as \x...).
templates.filters["cell"] = lambda value, type_name="": printable(
    display(value, type_name), lines=True
)
# Text a tenant may have written (a statement, an error's words, a column's
# name) with what would reorder or hide the page's text escaped.
templates.filters["shown"] = lambda value: printable(str(value), lines=True)
templates.filters["when"] = when
templates.filters["duration"] = duration
templates.filters["size"] = size
router = APIRouter(include_in_schema=False)


class _SignIn(Exception):
    """No valid session: go to the sign-in page."""


def _platform(request: Request) -> Platform:
    p: Platform = request.app.state.platform
    return p


def _session(request: Request) -> sess.Session:
    s = sess.current(_platform(request), request)
    if s is None:
        raise _SignIn
    return s


SessionDep = Annotated[sess.Session, Depends(_session)]


def _check_csrf(s: sess.Session, token: str | None) -> None:
    if not sess.csrf_ok(s, token):
        raise _CsrfFailed


class _CsrfFailed(Exception):
    pass


def render(
    request: Request, name: str, s: sess.Session | None, status: int = 200, **ctx: Any
) -> HTMLResponse:
    html = templates.get_template(name).render(
        request=request,
        me=s.owner if s else None,
        csrf=s.csrf if s else "",
        regions=REGIONS,
        regions_by_id=REGIONS_BY_ID,
        plans=PLANS,
        **ctx,
    )
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


# Paths that answer JSON; everything else is the console's, which answers HTML.
API_PREFIXES = (
    "/v1/",
    "/health",
    "/metrics",
    "/ca.crt",
    "/sql",
    "/openapi.json",
    "/docs",
)


def wants_page(path: str, accept: str) -> bool:
    """Whether an error on `path` is shown as a console page (a browser
    asking for one of the console's paths) rather than the JSON envelope."""
    return (
        not path.startswith(API_PREFIXES) and not path.endswith(".json") and "text/html" in accept
    )


def console_error_page(exc: PgfleetError, headers: Mapping[str, str] | None = None) -> HTMLResponse:
    """What the console shows for an error it did not handle itself (the
    platform DB away, say): the message, as a page, with the status and
    headers the API would answer with."""
    status, _, mapped = to_http(exc)
    title = {503: "Unavailable", 404: "Not found", 429: "Slow down"}.get(status, "Not done")
    html = templates.get_template("error.html").render(me=None, title=title, message=exc.message)
    headers = {"Cache-Control": "no-store", **mapped, **(headers or {})}
    return HTMLResponse(html, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Add the console to the FastAPI app."""

    @app.exception_handler(_SignIn)
    async def to_signin(request: Request, exc: _SignIn) -> Response:
        r = RedirectResponse(f"/signin?next={request.url.path}", status_code=303)
        sess.clear(r)
        return r

    @app.exception_handler(_CsrfFailed)
    async def csrf_failed(request: Request, exc: _CsrfFailed) -> Response:
        return HTMLResponse(
            templates.get_template("error.html").render(
                me=None,
                title="Forbidden",
                message="This form was sent without a valid CSRF token. "
                "Reload the page and try again.",
            ),
            status_code=403,
        )

    @app.exception_handler(_NoSuchDatabase)
    async def no_such_database(request: Request, exc: _NoSuchDatabase) -> Response:
        return render(
            request,
            "error.html",
            sess.current(_platform(request), request),
            status=404,
            title="Not found",
            message=f"There is no project {exc.args[0]} in your account.",
        )

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(router)


# ---- sign in / out ------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def index(request: Request) -> Response:
    s = sess.current(_platform(request), request)
    return RedirectResponse("/projects" if s else "/signin", status_code=303)


@router.get("/databases{rest:path}", include_in_schema=False)
def former_paths(rest: str, request: Request) -> Response:
    """The console's pages were /databases/... before they took the one name
    the API and the CLI use; old links and bookmarks still arrive."""
    query = f"?{request.url.query}" if request.url.query else ""
    return RedirectResponse(f"/projects{rest}{query}", status_code=301)


PRE_CSRF = "pgfleet_signin_csrf"


SIGNIN_CSRF_TTL_S = 3600


def _signin_form(request: Request, next: str, error: str | None, status: int = 200) -> HTMLResponse:
    """The sign-in form, with its own CSRF token (a cookie and the same value
    in the form), so another site cannot sign a browser in to its account.
    The token is made and signed by the server (a Fernet token over a
    nonce), so a pair an attacker makes up is refused too."""
    token = sess.signin_csrf_token(_platform(request))
    r = render(
        request,
        "signin.html",
        None,
        status=status,
        next=_safe_next(next),
        error=error,
        signin_csrf=token,
    )
    r.set_cookie(
        PRE_CSRF,
        token,
        max_age=SIGNIN_CSRF_TTL_S,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/signin",
    )
    return r


@router.get("/signin", response_class=HTMLResponse)
def signin_page(request: Request, next: str = "/projects") -> HTMLResponse:
    return _signin_form(request, next, None)


def _safe_next(url: str) -> str:
    return url if url.startswith("/") and not url.startswith("//") else "/projects"


@router.post("/signin", response_class=HTMLResponse)
def signin(
    request: Request,
    token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    p = _platform(request)
    expected = request.cookies.get(PRE_CSRF, "")
    if not (
        csrf
        and expected
        and hmac.compare_digest(csrf, expected)
        and sess.signin_csrf_valid(p, csrf, SIGNIN_CSRF_TTL_S)
    ):
        raise _CsrfFailed
    try:
        owner, token_id = auth.authenticate_token(p, token.strip())
    except NotAuthenticated as e:
        said = "expired" in e.message and e.message.split(";")[0].capitalize()
        return _signin_form(
            request,
            next,
            f"{said}."
            if said
            else "That token is not valid (or was revoked). Tokens start with pgf_.",
            status=401,
        )
    if owner.read_only:
        return _signin_form(
            request,
            next,
            "That token is read-only (scope read): it is for the API and the CLI. "
            "The console signs in with a token of scope all.",
            status=403,
        )
    r = RedirectResponse(_safe_next(next or "/projects"), status_code=303)
    sess.issue(p, r, owner, token_id, secure=request.url.scheme == "https")
    return r


@router.post("/signout")
def signout(request: Request, s: SessionDep, csrf: Annotated[str, Form()] = "") -> Response:
    _check_csrf(s, csrf)
    r = RedirectResponse("/signin", status_code=303)
    sess.end(_platform(request), s, r)
    return r


# ---- projects ------------------------------------------------------------------

SORTS: dict[str, Callable[[Tenant], Any]] = {
    "created": lambda p: (p.created_at is None, p.created_at),
    "name": lambda p: p.name.lower(),
    "region": lambda p: p.region or "",
    "status": lambda p: p.status,
    "plan": lambda p: p.plan_type or "",
}


@router.get("/projects", response_class=HTMLResponse)
def databases(request: Request, s: SessionDep, q: str = "", sort: str = "created") -> HTMLResponse:
    rows = service.list_projects(_platform(request), s.owner)
    if q:
        needle = q.casefold()
        rows = [
            r
            for r in rows
            if needle in r.name.casefold() or needle in (r.region or "") or needle in str(r.id)
        ]
    key = SORTS.get(sort.lstrip("-")) or SORTS["created"]
    rows.sort(key=key, reverse=sort == "created" or sort.startswith("-"))
    names = (
        {o["id"]: o["name"] for o in auth.list_owners(_platform(request))}
        if s.owner.is_admin
        else {}
    )
    return render(request, "databases.html", s, projects=rows, q=q, sort=sort, owner_names=names)


# ---- tokens and owners ---------------------------------------------------------


@router.get("/tokens", response_class=HTMLResponse)
def tokens_page(request: Request, s: SessionDep) -> HTMLResponse:
    return _tokens(request, s, revoked=request.query_params.get("flash") == "revoked")


def _tokens(
    request: Request,
    s: sess.Session,
    *,
    subject: dict[str, Any] | None = None,
    created: dict[str, Any] | None = None,
    revoked: bool = False,
    error: str | None = None,
    form: dict[str, str] | None = None,
    status: int = 200,
) -> HTMLResponse:
    """The tokens page: the signed-in owner's own, or (an admin's view)
    those of `subject`, an owner row."""
    p = _platform(request)
    return render(
        request,
        "tokens.html",
        s,
        status=status,
        tokens=auth.list_tokens_of(p, subject["id"] if subject else s.owner.id),
        base=f"/owners/{subject['id']}/tokens" if subject else "/tokens",
        subject=subject,
        created=created,
        revoked=revoked,
        error=error,
        form=form or {},
    )


@router.post("/tokens", response_class=HTMLResponse)
def create_token(
    request: Request,
    s: SessionDep,
    csrf: Annotated[str, Form()] = "",
    name: Annotated[str, Form()] = "",
    scope: Annotated[str, Form()] = "all",
    expires_in_days: Annotated[str, Form()] = "",
) -> HTMLResponse:
    _check_csrf(s, csrf)
    form = {"name": name, "expires_in_days": expires_in_days}
    days = expires_in_days.strip()
    if days and not (days.isascii() and days.isdecimal()):
        return _tokens(
            request,
            s,
            error="Expires after: a whole number of days, or empty.",
            form=form,
            status=422,
        )
    try:
        _, token, _ = auth.create_token(
            _platform(request),
            s.owner,
            name,
            scope=scope,
            expires_in_days=int(days) if days else None,
        )
    except PgfleetError as e:
        return _tokens(request, s, error=e.message, form=form, status=e.status_code)
    return _tokens(request, s, created={"name": name.strip(), "token": token})


@router.post("/tokens/{token_id}/revoke")
def revoke_token(
    request: Request, s: SessionDep, token_id: str, csrf: Annotated[str, Form()] = ""
) -> Response:
    _check_csrf(s, csrf)
    auth.revoke_token(_platform(request), s.owner, token_id)
    return RedirectResponse("/tokens?flash=revoked", status_code=303)


def _admins_only(request: Request, s: sess.Session) -> HTMLResponse | None:
    if s.owner.is_admin:
        return None
    return render(
        request,
        "error.html",
        s,
        status=403,
        title="Admins only",
        message="Owners and their tokens are for administrators.",
    )


@router.get("/owners", response_class=HTMLResponse)
def owners_page(request: Request, s: SessionDep) -> HTMLResponse:
    return _admins_only(request, s) or _owners(request, s)


def _owners(
    request: Request,
    s: sess.Session,
    *,
    created: dict[str, Any] | None = None,
    error: str | None = None,
    form: dict[str, str] | None = None,
    status: int = 200,
) -> HTMLResponse:
    return render(
        request,
        "owners.html",
        s,
        status=status,
        owners=auth.list_owners(_platform(request)),
        created=created,
        error=error,
        form=form or {},
    )


@router.post("/owners", response_class=HTMLResponse)
def create_owner(
    request: Request,
    s: SessionDep,
    csrf: Annotated[str, Form()] = "",
    name: Annotated[str, Form()] = "",
    is_admin: Annotated[bool, Form()] = False,
) -> HTMLResponse:
    _check_csrf(s, csrf)
    refused = _admins_only(request, s)
    if refused is not None:
        return refused
    try:
        owner, token = auth.create_owner(_platform(request), name, is_admin=is_admin, unique=True)
    except PgfleetError as e:
        return _owners(request, s, error=e.message, form={"name": name}, status=e.status_code)
    return _owners(request, s, created={"name": owner.name, "token": token})


@router.get("/owners/{owner_id}", response_class=HTMLResponse)
def owner_page(request: Request, s: SessionDep, owner_id: str) -> HTMLResponse:
    refused = _admins_only(request, s)
    if refused is not None:
        return refused
    p = _platform(request)
    oid = auth.owner_id(p, owner_id)
    subject = next(o for o in auth.list_owners(p) if o["id"] == oid)
    return _tokens(
        request, s, subject=subject, revoked=request.query_params.get("flash") == "revoked"
    )


@router.post("/owners/{owner_id}/tokens/{token_id}/revoke")
def revoke_owner_token(
    request: Request,
    s: SessionDep,
    owner_id: str,
    token_id: str,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    _check_csrf(s, csrf)
    refused = _admins_only(request, s)
    if refused is not None:
        return refused
    auth.revoke_any_token(_platform(request), s.owner, token_id)
    return RedirectResponse(f"/owners/{owner_id}?flash=revoked", status_code=303)


@router.get("/projects/new", response_class=HTMLResponse)
def new_database(request: Request, s: SessionDep) -> HTMLResponse:
    return render(
        request,
        "new.html",
        s,
        form={"region": "us-east-1", "plan": "free"},
        errors={},
        **_region_notes(request),
    )


def _region_notes(request: Request) -> dict[str, Any]:
    served = {srv.region for srv in _platform(request).servers.all(enabled_only=True)}
    default = _platform(request).settings.default_region
    return {"served": served, "default_region": default}


@router.post("/projects/new", response_class=HTMLResponse)
def create_database(
    request: Request,
    s: SessionDep,
    name: Annotated[str, Form()] = "",
    region: Annotated[str, Form()] = "us-east-1",
    plan: Annotated[str, Form()] = "free",
    residency: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    _check_csrf(s, csrf)
    form = {"name": name, "region": region, "plan": plan, "residency": residency}
    try:
        project, op_id = service.start_create_project(
            _platform(request),
            s.owner,
            name=name,
            region=region,
            plan_type=plan,
            residency=residency or None,
        )
    except (InvalidInput, Conflict) as e:
        field = str(e.details.get("field") or "")
        if not field:
            field = {
                "unknown_region": "region",
                "unknown_plan": "plan",
                "residency_violation": "residency",
            }.get(e.code, "name")
        return render(
            request,
            "new.html",
            s,
            status=422,
            form=form,
            errors={field: e.message},
            **_region_notes(request),
        )
    except PgfleetError as e:
        return render(
            request,
            "new.html",
            s,
            status=e.status_code,
            form=form,
            errors={"form": e.message},
            **_region_notes(request),
        )
    return RedirectResponse(f"/projects/{project.id}?op={op_id}", status_code=303)


class _NoSuchDatabase(Exception):
    """Not this owner's database (or none at all): the 404 page."""


def _project_or_404(request: Request, s: sess.Session, pid: str) -> Tenant:
    try:
        return service.get_project(_platform(request), s.owner, pid)
    except NotFound:
        raise _NoSuchDatabase(pid) from None


def _failed_operation(p: Platform, s: sess.Session, op: str | None) -> Any:
    if not op:
        return None
    try:
        found = ops_service.visible_operation(p, s.owner, op)
    except (NotFound, ValueError):
        return None
    return found if found.status in ("failed", "cancelled") else None


@router.get("/projects/{pid}", response_class=HTMLResponse)
def database(request: Request, s: SessionDep, pid: str, op: str | None = None) -> Response:
    p = _platform(request)
    try:
        project = _project_or_404(request, s, pid)
    except _NoSuchDatabase:
        # A database whose making failed (a restore, say) is gone again: say
        # why, rather than only that it does not exist.
        failed = _failed_operation(p, s, op)
        if failed is None:
            raise
        source = (failed.params or {}).get("source_tenant_id")
        return render(
            request,
            "error.html",
            s,
            status=409,
            title=f"The {failed.type.replace('_', ' ')} did not finish",
            message=f"{failed.error or failed.status}. Nothing was left behind.",
            back=f"/projects/{source}" if source else "/projects",
        )
    ops = ops_service.project_operations(p, project.id, limit=10)
    detailed = []
    for o in ops[:5]:
        detailed.append(ops_service.visible_operation(p, s.owner, o.id))
    conns: dict[str, Any] = {}
    if project.status in ("active", "paused"):
        for key, label, mode, pooling, direct in CONNECTION_STRINGS:
            try:
                c = service.connection_details(
                    p, s.owner, project.id, mode, pooling=pooling, direct=direct
                )
                secret = ":" + quote(c.password, safe="") + "@"
                conns[key] = {
                    "label": label,
                    "mode": mode,
                    "pooling": pooling,
                    "direct": "true" if direct else "false",
                    "note": c.note,
                    "masked": c.uri.replace(secret, ":********@"),
                }
            except PgfleetError:
                pass
    perf = stats.project_performance(p, project.id, "24h")
    found = insights.project_statements(p, project.id, limit=10)
    pending = next((o for o in ops if not o.ended), None)
    return render(
        request,
        "database.html",
        s,
        project=project,
        ops=detailed,
        conns=conns,
        perf=perf,
        insights=found,
        pending=pending,
        backups=backups_service.list_backups(p, s.owner, project.id),
        flash=request.query_params.get("flash"),
    )


@router.post("/projects/{pid}/backups")
def take_snapshot(
    request: Request, s: SessionDep, pid: str, csrf: Annotated[str, Form()] = ""
) -> Response:
    return _action(
        request,
        s,
        pid,
        csrf,
        lambda tid: backups_service.start_snapshot(_platform(request), s.owner, tid)[1],
        "snapshot taken",
    )


@router.post("/projects/{pid}/restore")
def restore(
    request: Request,
    s: SessionDep,
    pid: str,
    csrf: Annotated[str, Form()] = "",
    source: Annotated[str, Form()] = "latest",
    target_time: Annotated[str, Form()] = "",
    region: Annotated[str, Form()] = "",
) -> Response:
    """Restore into a new database: the latest moment, a moment in the
    window (`target_time`, taken as UTC when it has no zone) or a snapshot
    (`source` = its id)."""
    _check_csrf(s, csrf)
    project = _project_or_404(request, s, pid)
    p = _platform(request)
    try:
        when = None
        if source == "time":
            try:
                when = datetime.fromisoformat(target_time.strip())
            except ValueError:
                raise InvalidInput(
                    f"{target_time!r} is not a moment: use YYYY-MM-DD HH:MM:SS (UTC)",
                    field="target_time",
                ) from None
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
        new, op_id = backups_service.start_restore(
            p,
            s.owner,
            project.id,
            target_time=when,
            backup_id=source if source not in ("latest", "time") else None,
            region=region or None,
        )
    except PgfleetError as e:
        return render(
            request,
            "error.html",
            s,
            status=e.status_code,
            title="Not restored",
            message=e.message,
            back=f"/projects/{pid}",
        )
    return RedirectResponse(f"/projects/{new.id}?op={op_id}&flash=restoring", status_code=303)


# The strings the project page shows: (key, label, mode, pooling, direct).
CONNECTION_STRINGS = (
    ("rw", "Read-write, pooled (session)", "rw", "session", False),
    ("rw-tx", "Read-write, pooled (transaction, for serverless)", "rw", "transaction", False),
    ("ro", "Read-only, pooled (session)", "ro", "session", False),
    ("rw-direct", "Read-write, direct to the server (pg_dump, replication)", "rw", "session", True),
)


@router.post("/projects/{pid}/connection")
def reveal_connection(
    request: Request,
    s: SessionDep,
    pid: str,
    csrf: Annotated[str, Form()] = "",
    mode: Annotated[str, Form()] = "rw",
    pooling: Annotated[str, Form()] = "session",
    direct: Annotated[bool, Form()] = False,
) -> JSONResponse:
    """A connection string with its password, for the reveal and copy
    buttons: only on request (a POST with the session's CSRF token), never
    in a page, never cached."""
    _check_csrf(s, csrf)
    project = _project_or_404(request, s, pid)
    c = service.connection_details(
        _platform(request), s.owner, project.id, mode, pooling=pooling, direct=direct
    )
    return JSONResponse({"uri": c.uri}, headers={"Cache-Control": "no-store"})


@router.get("/projects/{pid}/operations/{op_id}.json")
def operation_json(request: Request, s: SessionDep, pid: str, op_id: str) -> JSONResponse:
    """For the progress display: the operation's status and steps."""
    op = ops_service.visible_operation(_platform(request), s.owner, op_id)
    return JSONResponse(
        {
            "status": op.status,
            "current_step": op.current_step,
            "error": op.error,
            "steps": [{"name": x.name, "status": x.status} for x in op.steps],
        }
    )


def _action(
    request: Request, s: sess.Session, pid: str, csrf: str, start: Any, flash: str
) -> Response:
    _check_csrf(s, csrf)
    project = _project_or_404(request, s, pid)
    try:
        op_id = start(project.id)
    except PgfleetError as e:
        return render(
            request,
            "error.html",
            s,
            status=e.status_code,
            title="Not done",
            message=e.message,
            back=f"/projects/{pid}",
        )
    return RedirectResponse(f"/projects/{pid}?op={op_id}&flash={quote(flash)}", status_code=303)


@router.post("/projects/{pid}/rotate")
def rotate(
    request: Request, s: SessionDep, pid: str, csrf: Annotated[str, Form()] = ""
) -> Response:
    return _action(
        request,
        s,
        pid,
        csrf,
        lambda tid: service.rotate_password(_platform(request), s.owner, tid),
        "passwords rotated; the old ones stopped working and their sessions were ended, "
        "the connection strings below have the new ones",
    )


@router.post("/projects/{pid}/plan")
def change_plan(
    request: Request,
    s: SessionDep,
    pid: str,
    csrf: Annotated[str, Form()] = "",
    plan: Annotated[str, Form()] = "",
) -> Response:
    return _action(
        request,
        s,
        pid,
        csrf,
        lambda tid: service.change_plan(_platform(request), s.owner, tid, plan_type=plan),
        f"plan changed to {plan}; its limits apply now",
    )


@router.post("/projects/{pid}/pause")
def pause(request: Request, s: SessionDep, pid: str, csrf: Annotated[str, Form()] = "") -> Response:
    return _action(
        request,
        s,
        pid,
        csrf,
        lambda tid: service.pause_project(_platform(request), s.owner, tid),
        "paused",
    )


@router.post("/projects/{pid}/resume")
def resume(
    request: Request, s: SessionDep, pid: str, csrf: Annotated[str, Form()] = ""
) -> Response:
    return _action(
        request,
        s,
        pid,
        csrf,
        lambda tid: service.resume_project(_platform(request), s.owner, tid),
        "resumed",
    )


@router.post("/projects/{pid}/delete")
def delete(
    request: Request,
    s: SessionDep,
    pid: str,
    csrf: Annotated[str, Form()] = "",
    confirm: Annotated[str, Form()] = "",
) -> Response:
    _check_csrf(s, csrf)
    project = _project_or_404(request, s, pid)
    if confirm != project.name:
        return render(
            request,
            "error.html",
            s,
            status=422,
            title="Not deleted",
            message="To delete, type the project's name exactly as shown.",
            back=f"/projects/{pid}",
        )
    op_id = service.start_delete_project(_platform(request), s.owner, project.id)
    service.wait_or_raise(_platform(request), op_id)
    return RedirectResponse("/projects?flash=deleted", status_code=303)


@router.post("/projects/{pid}/sql", response_class=HTMLResponse)
async def sql(
    request: Request,
    s: SessionDep,
    pid: str,
    csrf: Annotated[str, Form()] = "",
    query: Annotated[str, Form()] = "",
    mode: Annotated[str, Form()] = "rw",
) -> Response:
    _check_csrf(s, csrf)
    project = await run_in_threadpool(_project_or_404, request, s, pid)
    gateway: SqlGateway = request.app.state.sql
    result = error = None
    try:
        row = await gateway.project_row(s.owner, str(project.id))
        req = SqlRequest(query=query, params=[], mode=mode)
        result = await gateway.run(s.owner, str(project.id), req, row)
    except SqlError as e:
        error = {"message": e.message, **e.details}
    except PgfleetError as e:
        error = {"message": e.message}
    return render(
        request,
        "sql_result.html",
        s,
        project=project,
        query=query,
        mode=mode,
        result=result,
        error=error,
    )


# ---- regions (admin) -------------------------------------------------------------


@router.get("/regions", response_class=HTMLResponse)
def regions_page(request: Request, s: SessionDep) -> HTMLResponse:
    if not s.owner.is_admin:
        return render(
            request,
            "error.html",
            s,
            status=403,
            title="Admins only",
            message="The regions overview is for administrators.",
        )
    p = _platform(request)
    rs = stats.region_stats(p)
    perf = stats.performance(p, "24h")
    return render(
        request,
        "regions.html",
        s,
        stats=rs,
        perf=perf,
        server_statements=insights.region_statements(p),
        insights_interval=p.settings.insights_interval_s,
        advisor=advisor_report(p),
        costs=cost_report(p),
        backups=backups_service.server_backups(p, s.owner),
        max_tenants=max([r["tenants"] for r in rs["regions"]] + [1]),
    )
