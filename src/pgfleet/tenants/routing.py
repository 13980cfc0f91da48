"""The routers' view of the projects, kept equal to the platform DB.

Every router knows every active project: its database on its own server,
with the plan's server pool, and its login roles with the servers' own SCRAM
verifiers (read from pg_authid as the admin, in the admin database). It also
knows every prepared spare, routed ahead of the create that takes it (see
_ROUTED_SQL and tenants/spares.py). Paused, deleted and other unfinished
projects are absent: the routers refuse their logins.

`publish` runs at the end of every operation that changes what a router
must know (create, delete, pause, resume, rotate, expire, plan change), so
the operation returns only once every router has the change; a periodic
`sync` repairs what a crash or a restarted router left behind, comparing
each router's loaded databases with the platform DB.

A create that took a prepared spare publishes nothing: its refill did.
One process at a time changes the files (an flock beside them, see
Routers.exclusive), and each change is atomic (a new file renamed over the old). An
operation's publish edits only its projects' lines, and publishes waiting
in any process on the host share one edit and one reload (`_Requests`); the
sync and repairs write both files whole from the platform DB.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pgfleet.crypto import write_private
from pgfleet.errors import PgfleetError
from pgfleet.fleet.registry import ServerRecord
from pgfleet.fleet.router import Login, Route, Routers, RouterSpec
from pgfleet.operations.registry import REGISTRY
from pgfleet.platform.core import Platform
from pgfleet.regions import get_plan
from pgfleet.tenants.naming import login_role_names, tenant_db_name

log = logging.getLogger(__name__)

_VERIFIERS_SQL = """
SELECT rolname, rolpassword FROM pg_catalog.pg_authid
WHERE rolname = ANY(%s) AND rolname LIKE 'tenant\\_%%'
  AND (rolcanlogin OR rolname = ANY(%s))
  AND rolpassword LIKE 'SCRAM-SHA-256$%%'
  AND (rolvaliduntil IS NULL OR rolvaliduntil > pg_catalog.now())
"""

# What the routers know: every active project, and every prepared spare
# once it is whole on its server (`made` or `ready`, tenants/spares.py),
# with the project made from it until it is active (routed ahead, so a
# create has nothing to publish). A spare's login roles
# are NOLOGIN until it is claimed: their verifiers are routed all the same
# (the server refuses the login; no session of them ever went through a
# router, so no pooled server connection of them exists). Any other role
# that cannot log in (a paused project's, an expired alternate) is left out.
# Columns: id, plan, server id, routed ahead.
_ROUTED_SQL = """
SELECT id, plan_type, (connection_info->>'server_id')::int, false FROM tenants
WHERE status = 'active' AND connection_info ? 'server_id' {and_ids}
UNION ALL
SELECT id, plan_type, server_id, true FROM tenants
WHERE status = 'provisioning' AND connection_info @> '{{"spare": true}}' {and_ids}
UNION ALL
SELECT id, NULL, server_id, true FROM spares WHERE state IN ('made', 'ready') {and_ids}
"""


def _routed(conn: psycopg.Connection[Any], ids: list[uuid.UUID] | None) -> list[Any]:
    if ids is None:
        return conn.execute(_ROUTED_SQL.format(and_ids="")).fetchall()
    return conn.execute(
        _ROUTED_SQL.format(and_ids="AND id = ANY(%(ids)s)"), {"ids": ids}
    ).fetchall()


def spare_route_fits(plan: str | None) -> bool:
    """Is a project on `plan` routed as a spare is (the free plan's server
    pool and client limit)? Then a project made from a spare has nothing to
    publish."""
    a, b = get_plan(plan or "free"), get_plan("free")
    return (a.router_pool_size, a.router_clients) == (b.router_pool_size, b.router_clients)


@dataclass
class Published:
    """What one publish did."""

    routes: int = 0
    logins: int = 0
    changed: bool = False
    reloaded: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)
    servers_unreachable: list[str] = field(default_factory=list)
    # Done by another publish (of any process on this host), which took
    # this one's projects while it waited for the lock.
    shared: bool = False


def _route(db: str, plan: str | None, server: ServerRecord) -> Route:
    """A project's line in the route table: its server, its plan's server
    pool and client limit, and the only roles the routers admit to it."""
    limits = get_plan(plan or "free")
    return Route(
        db,
        server.host,
        server.port,
        limits.router_pool_size,
        limits.router_clients,
        tuple(login_role_names(db)),
    )


def _read_verifiers(
    platform: Platform, server: ServerRecord, roles: list[str], ahead: set[str]
) -> dict[str, str] | None:
    """The server's own SCRAM verifiers of `roles` that may log in, or are
    routed ahead (`ahead`, see _ROUTED_SQL), read from pg_authid as the
    admin; None if the server cannot be reached."""
    try:
        with platform.servers.admin_connection(server) as conn:
            wanted = [r for r in roles if r in ahead]
            return dict(conn.execute(_VERIFIERS_SQL, (roles, wanted)).fetchall())
    except (PgfleetError, psycopg.Error):
        return None


def desired(
    platform: Platform,
    routers: Routers,
    current: dict[str, str],
    reread: Iterable[str] | None = None,
) -> tuple[list[Route], list[Login], list[str]]:
    """Routes and logins as the platform DB says they should be.

    Verifiers are read from the servers (pg_authid, as the admin) for every
    login role when `reread` is None; otherwise only for the roles the auth
    file lacks (a new, resumed or re-homed project's) and those in `reread`
    (a rotation's), the rest kept as the file has them. That keeps a
    create's route step from reading every project's verifier on every
    server; the periodic sync rereads all, so a verifier changed behind
    pgfleet's back is brought in within one sync. For a server that cannot
    be reached, its projects' logins stay what the auth file has, so an
    outage changes nothing for the routers."""
    with platform.db.connection() as conn:
        rows = _routed(conn, None)
    servers = {s.id: s for s in platform.servers.all()}
    routes: list[Route] = []
    roles_by_server: dict[int, list[str]] = {}
    ahead: set[str] = set()
    for tid, plan, server_id, early in rows:
        server = servers.get(server_id)
        if server is None:
            continue
        db = tenant_db_name(tid)
        routes.append(_route(db, plan, server))
        roles_by_server.setdefault(server_id, []).extend(login_role_names(db))
        if early:
            ahead.update(login_role_names(db))
    fresh = None if reread is None else set(reread)
    logins: list[Login] = []
    down: list[str] = []
    for server_id, roles in roles_by_server.items():
        server = servers[server_id]
        wanted = roles if fresh is None else [r for r in roles if r not in current or r in fresh]
        found: dict[str, str] = {}
        if wanted:
            read = _read_verifiers(platform, server, wanted, ahead)
            if read is None:
                down.append(server.name)
                wanted = []
            else:
                found = read
        asked = set(wanted)
        for r in roles:
            if r in asked:
                if r in found:
                    logins.append(Login(r, found[r]))
            elif r in current:
                logins.append(Login(r, current[r]))
    return routes, logins, down


def desired_for(
    platform: Platform, projects: Iterable[uuid.UUID]
) -> tuple[dict[str, Route | None], dict[str, str | None], list[str]]:
    """What the routers should know of `projects` alone, as changes to the
    files (Routers.edit): an active project's route and its login roles'
    verifiers, read afresh from its server; for any other (paused, deleted,
    unfinished, gone) no route and no logins. A project whose server cannot
    be reached keeps the logins the file has; its server is named."""
    ids = sorted(set(projects))
    with platform.db.connection() as conn:
        rows = _routed(conn, ids)
    active = {tid: (plan, server_id) for tid, plan, server_id, _ in rows}
    ahead = {r for tid, _, _, early in rows if early for r in login_role_names(tenant_db_name(tid))}
    servers = {s.id: s for s in platform.servers.all()} if active else {}
    routes: dict[str, Route | None] = {}
    logins: dict[str, str | None] = {}
    roles_by_server: dict[int, list[str]] = {}
    for tid in ids:
        db = tenant_db_name(tid)
        found = active.get(tid)
        server = None if found is None else servers.get(found[1])
        if found is None or server is None:
            routes[db] = None
            logins.update(dict.fromkeys(login_role_names(db)))
            continue
        routes[db] = _route(db, found[0], server)
        roles_by_server.setdefault(server.id, []).extend(login_role_names(db))
    down: list[str] = []
    for server_id, roles in roles_by_server.items():
        verifiers = _read_verifiers(platform, servers[server_id], roles, ahead)
        if verifiers is None:
            down.append(servers[server_id].name)
            continue
        for role in roles:
            logins[role] = verifiers.get(role)
    return routes, logins, down


@contextmanager
def _exclusive(platform: Platform, routers: Routers) -> Iterator[None]:
    """One publish at a time: first in this process (so waiting publishes
    queue on a thread lock), then across processes (Routers.exclusive)."""
    local = platform.component("routing_lock", threading.Lock)
    with local, routers.exclusive():
        yield


def _each(
    routers: Routers, fn: Any, ex: ThreadPoolExecutor | None = None
) -> tuple[list[str], list[str]]:
    """`fn(spec)` on every router at once (on `ex`, or on threads of its
    own); (done, unreachable) by name."""
    specs = routers.specs
    if not specs:
        return [], []

    def one(spec: RouterSpec) -> bool:
        try:
            fn(spec)
            return True
        except (PgfleetError, psycopg.Error, OSError) as e:
            log.debug("router %s: %s", spec.name, e)
            return False

    if ex is None:
        with ThreadPoolExecutor(max_workers=len(specs)) as own:
            results = list(own.map(one, specs))
    else:
        results = list(ex.map(one, specs))
    done = [s.name for s, ok in zip(specs, results, strict=True) if ok]
    failed = [s.name for s, ok in zip(specs, results, strict=True) if not ok]
    return done, failed


def _reloader(platform: Platform, routers: Routers) -> ThreadPoolExecutor:
    """The threads publishes reload the routers on, kept for the process
    (a publish per create: starting six threads each time showed in the
    route step's profile). Only publishes use them, one at a time."""
    return platform.component(
        "routers_reloader",
        lambda: ThreadPoolExecutor(
            max_workers=max(1, len(routers.specs)), thread_name_prefix="router-reload"
        ),
        close=lambda e: e.shutdown(wait=False),
    )


class _Requests:
    """Publishes asked for and not yet done, by every process on this host:
    lines in a file beside the routers' files (`p <project> <token>` for a
    project to publish, `k <database> <role>,... <token>` for clients to
    end; the token is the caller's, see `_lines`). Whoever holds
    the routers' lock takes every line and removes those it took only once
    every router has them, so creates waiting in any API process share one
    edit and one reload, and a holder killed mid-way leaves its lines for
    the next. A caller that finds none of its lines left when it gets the
    lock was done by another. (In one process, a thread lock queues the
    callers; the file is read and changed under a lock of its own.)"""

    def __init__(self, routers: Routers) -> None:
        self.routers = routers
        self.path = routers.paths.root / "publish.requests"

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return self.routers.locked(".requests.lock")

    def _read(self) -> list[str]:
        try:
            return self.path.read_text().splitlines()
        except FileNotFoundError:
            return []

    def add(self, lines: list[str]) -> None:
        if not lines:
            return
        with self._locked():
            fd = self.routers.open_private(self.path.name, os.O_RDWR | os.O_APPEND)
            try:
                # A write cut short (a full disk, a kill) left no newline:
                # the lines added now must not run on from it.
                size = os.fstat(fd).st_size
                torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
                os.write(fd, (("\n" if torn else "") + "".join(x + "\n" for x in lines)).encode())
            finally:
                os.close(fd)

    def read(self) -> list[str]:
        with self._locked():
            return self._read()

    def remove(self, lines: list[str]) -> None:
        """Those lines done. Every caller's lines carry its own token, so
        this never takes another caller's request."""
        if not lines:
            return
        gone = set(lines)
        with self._locked():
            left = [x for x in self._read() if x not in gone]
            write_private(self.path, "".join(x + "\n" for x in left), owner=self.routers.owner)


def _lines(ids: set[uuid.UUID], kill: list[tuple[str, set[str]]]) -> list[str]:
    """One caller's request, each line ending in the caller's own token: two
    requests for the same project stay two, and a withdrawal or a holder's
    removal takes exactly the lines meant."""
    token = uuid.uuid4().hex
    return [f"p {t} {token}" for t in sorted(ids)] + [
        f"k {db} {','.join(sorted(r))} {token}" for db, r in kill
    ]


def _parse(lines: list[str]) -> tuple[set[uuid.UUID], list[tuple[str, set[str]]]]:
    """The projects and client ends of request lines; a line that is not
    one (a torn write) is skipped."""
    ids: set[uuid.UUID] = set()
    kill: list[tuple[str, set[str]]] = []
    for line in lines:
        parts = line.split(" ")
        try:
            if parts[0] == "p" and len(parts) == 3:
                ids.add(uuid.UUID(parts[1]))
            elif parts[0] == "k" and len(parts) == 4:
                entry = (parts[1], set(parts[2].split(",")))
                if entry not in kill:
                    kill.append(entry)
        except ValueError:
            continue
    return ids, kill


def publish(
    platform: Platform,
    *,
    projects: Iterable[uuid.UUID] = (),
    end_clients_of: Iterable[tuple[uuid.UUID, Iterable[str]]] = (),
    repair: bool = False,
    reread: bool = False,
) -> Published:
    """Tell every router what changed, and reload them (with `repair`, only
    those whose loaded databases differ). A router that cannot be reached
    is reported, never an error: it is brought up to date when it runs
    again.

    With `projects` (or `end_clients_of`), only those projects changed: their
    lines in the route table and the auth file are edited in place, from
    their rows and their roles' verifiers read afresh from their servers
    (`desired_for`), at a cost that does not grow with the fleet. Without,
    both files are written whole from the platform DB (`desired`): verifiers
    read for the logins the auth file lacks, or for all of them with
    `reread` (and `repair`), for changes made without a rotation (a
    convergence that set many passwords again, a verifier changed behind
    pgfleet's back).

    `end_clients_of` is (project, roles) whose client connections through
    the routers must end: they logged in with a password that no longer
    holds (a rotation, an expiry). The server ending the roles' backends is
    not enough: a client between transactions (any in transaction pooling,
    and in session pooling one that has not run a query yet) holds none,
    and PgBouncer would open it a new one with the SCRAM keys of the role's
    latest login, the new password's. So a router that still has a client
    of those roles ends them (KILL_CLIENT, after the reload that brought the
    new verifiers: a client that logs in meanwhile proves the new password);
    the project's other clients stay."""
    routers = platform.routers
    out = Published()
    if routers is None:
        return out
    ends = [(t, set(roles)) for t, roles in end_clients_of]
    ids = set(projects) | {t for t, _ in ends}
    asked_kill = [(tenant_db_name(t), roles) for t, roles in ends]
    whole = repair or reread or not ids
    requests = _Requests(routers)
    mine = [] if whole else _lines(ids, asked_kill)
    requests.add(mine)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_exclusive(platform, routers))
        except BaseException:
            requests.remove(mine)  # not left for an unrelated publish to do later
            raise
        taken = requests.read()  # a whole publish covers them too
        if not whole and set(mine).isdisjoint(taken):
            out.shared = True  # done by a publish that held the lock before
            return out
        batch, kill = _parse(taken)  # a delta publish's own ends are among them
        if whole:
            kill = asked_kill + kill
        edited = None
        wanted: set[str] = set()
        if not whole:
            routes_for, logins_for, out.servers_unreachable = desired_for(platform, batch)
            out.routes = sum(1 for r in routes_for.values() if r is not None)
            out.logins = sum(1 for v in logins_for.values() if v is not None)
            edited = routers.edit(routes_for, logins_for)
        if edited is None:
            # The roles of the projects this publish took (a convergence
            # sets passwords again, with new salts) and of those whose
            # clients end are read afresh.
            changed_roles = {r for _, roles in kill for r in roles}
            for t in batch:
                changed_roles.update(login_role_names(tenant_db_name(t)))
            routes, logins, out.servers_unreachable = desired(
                platform,
                routers,
                routers.current_logins(),
                None if whole and (repair or reread) else changed_roles,
            )
            out.routes, out.logins = len(routes), len(logins)
            out.changed = routers.write(routes, logins)
            wanted = {r.database for r in routes}
        else:
            out.changed = edited

        def apply(spec: RouterSpec) -> None:
            if repair:
                loaded = routers.databases(spec)
                # A database left paused (a KILL whose RESUME never
                # came, a hold whose process died) is let go, unless
                # held here.
                for name, row in loaded.items():
                    if row.get("paused") and name not in _HELD:
                        routers.resume(spec, name)
                # A repair that took requests reloads: a publish killed
                # after its edit and before its reload left files that
                # already say what they ask for.
                if not kill and not taken and not out.changed and set(loaded) == wanted:
                    return
            routers.reload(spec)
            for db, roles in kill:
                routers.end_clients(spec, db, roles)

        out.reloaded, out.unreachable = _each(routers, apply, _reloader(platform, routers))
        # Done: what it took is no longer asked for. (On an exception it
        # stays asked for, and the next publish does it; if only this
        # removal fails, the next publish does it again, which is harmless
        # but for clients of a rotated role ended twice.)
        try:
            requests.remove(taken)
        except OSError as e:
            log.warning("publish requests done but not cleared: %s", e)
    if out.unreachable:
        log.warning("routers not reached: %s", ", ".join(out.unreachable))
    return out


def drift(platform: Platform) -> dict[str, tuple[set[str], set[str]]]:
    """Routers whose loaded databases differ from what the platform DB says
    they should know (_ROUTED_SQL: active projects, spares): name ->
    (missing, extra). A router that does not answer is reported with both
    empty."""
    routers = platform.routers
    if routers is None:
        return {}
    with platform.db.connection() as conn:
        wanted = {tenant_db_name(r[0]) for r in _routed(conn, None)}
    out: dict[str, tuple[set[str], set[str]]] = {}
    for spec in routers.specs:
        try:
            loaded = set(routers.databases(spec))
        except (PgfleetError, psycopg.Error):
            out[spec.name] = (set(), set())
            continue
        if loaded != wanted:
            out[spec.name] = (wanted - loaded, loaded - wanted)
    return out


@REGISTRY.every("sync_routers", lambda s: max(5.0, s.worker_heartbeat_s * 5))
def sync(platform: Platform) -> Published:
    """The periodic repair: every router's loaded databases compared with the
    platform DB, and those that differ reloaded."""
    return publish(platform, repair=True)


# Databases this process holds (see `hold`): the periodic sync leaves them paused.
_HELD: set[str] = set()


class Held:
    """A database held in every router (see `hold`)."""

    def __init__(self, routers: Routers, database: str, held: list[str]) -> None:
        self.routers = routers
        self.database = database
        self.held = held
        self._released = threading.Event()

    def release(self) -> list[str]:
        """RESUME everywhere it was held; returns the routers not reached."""
        if self._released.is_set():
            return []
        _, failed = _each(self.routers, lambda spec: self.routers.resume(spec, self.database))
        if not failed:
            self._released.set()
            _HELD.discard(self.database)
        return failed


def hold(platform: Platform, tenant_id: uuid.UUID, timeout_s: float = 5.0) -> Held:
    """Hold a project's database in every router (PgBouncer's PAUSE db): its
    clients' new queries and logins wait in the router, and run when it is
    released. A pooling router holds once in-flight transactions have ended;
    a session router once its sessions have ended, so a session that stays
    open past `timeout_s` leaves that router not held (reported, not an
    error: the caller decides). Not the lifecycle's `pause`."""
    routers = platform.routers
    if routers is None:
        raise PgfleetError("this fleet has no routers to hold a database in")
    db = tenant_db_name(tenant_id)
    _HELD.add(db)
    done, _ = _each(routers, lambda spec: routers.pause(spec, db, timeout_s))
    return Held(routers, db, done)
