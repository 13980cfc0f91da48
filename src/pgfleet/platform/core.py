"""The Platform: the lean context every control-plane process builds from
settings: the platform DB's pools (with the outage breaker), the secret box,
the server registry and the metrics registry. The domains and the engine
keep their per-process parts (the tenant client, the SQL gateway's pools,
the query-log writer, the operations runtime) as its components
(`component()`), made on first use and closed with it; the Platform itself
knows none of them.

Nothing here is process state that matters: every API or worker process builds
its own Platform on the one platform DB.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from pgfleet.config import ServerSpec, Settings, get_settings
from pgfleet.crypto import SecretBox
from pgfleet.errors import ConfigError, PlatformUnavailable
from pgfleet.fleet.embedded import ADMIN_USER, LOOPBACK, EmbeddedFleet
from pgfleet.fleet.registry import ServerRegistry, sync_servers
from pgfleet.fleet.router import Routers
from pgfleet.platform import migrate
from pgfleet.platform.db import Breaker, PlatformDB
from pgfleet.platform.metrics import Metrics
from pgfleet.pooling import swept_pool
from pgfleet.regions import get_regional_host

log = logging.getLogger(__name__)
T = TypeVar("T")


def platform_conninfo(settings: Settings) -> dict[str, Any]:
    if settings.platform_dsn is not None:
        return conninfo_to_dict(settings.platform_dsn.get_secret_value())
    if not settings.embedded:
        raise ConfigError(
            "external servers are configured, so PGFLEET_PLATFORM_DSN must name the platform DB"
        )
    fleet = EmbeddedFleet(settings)
    if not fleet.password_file("platform").exists():
        raise ConfigError(f"no embedded fleet in {settings.home_abs}; run `pgfleet up` first")
    return fleet.platform_conninfo()


def warn_weak_tls(settings: Settings) -> list[str]:
    """A warning for each external server reached without verifying who it
    is (anything weaker than sslmode=verify-full); logged, and returned for
    the CLI to print."""
    out = [
        f"server {s.name} ({s.region}) uses sslmode={s.sslmode}: its identity is not "
        "verified, so a man in the middle could read the passwords pgfleet sends; "
        "use sslmode=verify-full with sslrootcert"
        for s in settings.weak_tls_servers()
    ]
    for message in out:
        log.warning(message)
    return out


def configured_servers(settings: Settings) -> list[tuple[ServerSpec, bool]]:
    """(spec, embedded) for every regional server the settings describe."""
    if not settings.embedded:
        return [(s, False) for s in settings.external_servers()]
    fleet = EmbeddedFleet(settings)
    out = []
    for s in fleet.regional_servers():
        assert s.region is not None
        out.append(
            (
                ServerSpec(
                    name=s.name,
                    region=s.region,
                    host=LOOPBACK,
                    port=s.port,
                    admin_user=ADMIN_USER,
                    admin_password=fleet.admin_password(s.name),
                    sslmode="verify-full",
                    sslrootcert=str(fleet.ca.cert_path),
                    capacity=settings.embedded_capacity,
                    primary=True,
                ),
                True,
            )
        )
    return out


class Platform:
    def __init__(self, settings: Settings, conninfo: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.conninfo = conninfo if conninfo is not None else platform_conninfo(settings)
        self.secrets = SecretBox.from_settings(settings)
        # Shared by every pool of this process on the platform DB: while it is
        # away, callers get PlatformUnavailable at once (see platform/db.py).
        self.breaker = Breaker()

        def make_pool() -> ConnectionPool:
            return swept_pool(
                # Autocommit: a read is one round trip; multi-statement changes
                # use explicit `with conn.transaction()`.
                kwargs={**self.conninfo, "application_name": "pgfleet", "autocommit": True},
                min_size=1,
                max_size=16,
                timeout=settings.connect_timeout_s,
                name="platform",
                open=True,
            )

        self.db = PlatformDB(self.conninfo, breaker=self.breaker, make_pool=make_pool)
        self.servers = ServerRegistry(settings, self.secrets, self.db)
        self.metrics = Metrics()
        # Open per-project pools, counted by their owners (the tenant client,
        # the SQL gateways).
        self.pool_counters: list[Callable[[], int]] = []
        self.metrics.add_state(self._gauges)
        self._components: dict[str, Any] = {}
        self._closers: list[Callable[[], None]] = []
        self._lock = threading.RLock()
        self._closed = False

    def component(
        self, key: str, make: Callable[[], T], *, close: Callable[[T], None] | None = None
    ) -> T:
        """The part `key` of this process (made by `make` on first use;
        `close` runs when the platform closes, newest first)."""
        found = self._components.get(key)
        if found is None:
            with self._lock:
                found = self._components.get(key)
                if found is None:
                    if self._closed:
                        # A straggler (a worker's periodic task still running
                        # as its platform closed) makes nothing that no one
                        # would close.
                        raise PlatformUnavailable("this platform is closed")
                    made = make()
                    self._components[key] = made
                    if close is not None:
                        self._closers.append(lambda: close(made))
                    return made
        return cast(T, found)

    @property
    def routers(self) -> Routers | None:
        """The fleet's connection routers (the embedded fleet's, or those
        pgfleet runs for external servers), or None with PGFLEET_ROUTERS=false."""
        s = self.settings
        if not s.routers:
            return None
        return self.component("routers", lambda: EmbeddedFleet(s).routers, close=Routers.close)

    def local_socket_dir(self, host: str, port: int) -> str | None:
        """The Unix socket directory of the embedded regional server at
        `host:port`, or None (external servers, the platform server). The
        SQL gateways log in to tenant databases there: same host, a 0700
        directory of the servers' OS user, the same SCRAM and `samerole`
        rules as over TLS, without a TLS handshake per login."""
        s = self.settings
        if not s.embedded or host not in ("127.0.0.1", "localhost"):
            return None
        dirs = self.component("local_socket_dirs", lambda: EmbeddedFleet(s).socket_dirs())
        return dirs.get(port)

    def ca_bundle(self) -> str:
        """The CA certificates the servers' certificates are verified by (PEM)."""
        paths: list[str] = []
        for s in self.servers.all(enabled_only=True):
            if s.sslrootcert and s.sslrootcert not in paths:
                paths.append(s.sslrootcert)
        out = []
        for path in paths:
            try:
                out.append(Path(path).read_text())
            except OSError:
                log.warning("the CA file %s of a server cannot be read", path)
        return "".join(out)

    def migrate(self) -> None:
        migrate.upgrade(self.conninfo)

    def sync_servers(self) -> None:
        with self.db.connection() as conn:
            sync_servers(conn, self.secrets, configured_servers(self.settings))

    def get_regional_host(self, region: str) -> str:
        """The seed's routing: the host serving `region`; unknown or unserved
        regions fall back to the default region."""
        hosts: dict[str, str] = {}
        for s in sorted(self.servers.all(enabled_only=True), key=lambda s: not s.is_primary):
            hosts.setdefault(s.region, s.host)
        return get_regional_host(region, hosts, default=self.settings.default_region)

    def _gauges(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        return {
            "pgfleet_tenant_pools": [({}, float(sum(count() for count in self.pool_counters)))],
        }

    def ping(self) -> None:
        with self.db.connection() as conn:
            conn.execute("SELECT 1")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            closers, self._closers = self._closers, []
            self._components.clear()
        for close in reversed(closers):
            try:
                close()
            except Exception:
                log.exception("closing a component failed")
        self.servers.close()
        self.db.close()

    def __enter__(self) -> Platform:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default: Platform | None = None


def default_platform() -> Platform:
    """The process-wide Platform from environment settings (for the seed's
    module-level functions)."""
    global _default
    if _default is None:
        _default = Platform(get_settings())
    return _default
