"""The embedded fleet: a platform server plus one PostgreSQL server per active
region, all under one data directory (PGFLEET_HOME), on loopback only.

Layout of the data directory:
    fleet.json                  the servers and their ports (fixed at creation)
    secrets/<server>.password   admin password per server (0600)
    servers/<server>/data       PGDATA
    servers/<server>/tls/       the server's certificate and key (0600)
    servers/<server>/postgres.log
    tls/ca.crt, tls/ca.key      the fleet CA (the key 0600); clients verify
                                servers with sslmode=verify-full against ca.crt
    routers/                    the connection routers (PgBouncer, fleet/router.py):
                                two per active region, session and transaction mode
    backups/<region>/           backup storage of a region (fleet/archive.py): the
                                pgBackRest repository of the servers whose backups
                                go there, and projects' snapshots
    scratch/                    point-in-time restores' throwaway instances

initdb refuses to run as root, so when pgfleet runs as root every server
command runs as an unprivileged system user (created if missing).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import psycopg

from pgfleet.config import Settings
from pgfleet.crypto import generate_password, write_private
from pgfleet.errors import FleetError
from pgfleet.fleet.archive import Archive, Scratch, Stanza
from pgfleet.fleet.binaries import PgBinaries, find_binaries
from pgfleet.fleet.router import POOL_MODES, Routers, RouterSpec, ServerTLS
from pgfleet.fleet.tls import FleetCA
from pgfleet.net import port_free
from pgfleet.regions import PLANS, REGION_IDS, backup_region_of

ADMIN_USER = "pgfleet_admin"
# A role with no privilege at all, which the reconciler uses to look inside a
# database that has no live project (it never enters one as the admin).
PROBE_USER = "pgfleet_probe"
PLATFORM_DB = "pgfleet"
LOOPBACK = "127.0.0.1"
# Query insights for all traffic (monitoring.insights reads it).
STATEMENTS = "pg_stat_statements"
# The names a server certificate is issued for (what clients connect to).
TLS_HOSTS = [LOOPBACK, "localhost"]


@dataclass(frozen=True)
class EmbeddedServer:
    name: str
    kind: Literal["platform", "regional"]
    region: str | None
    port: int


@dataclass(frozen=True)
class ServerState:
    server: EmbeddedServer
    initialized: bool
    running: bool


class EmbeddedFleet:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = settings.home_abs
        self._bins: PgBinaries | None = None
        self._routers: Routers | None = None
        self._archive: Archive | None = None

    # ---- layout -----------------------------------------------------------
    @property
    def bins(self) -> PgBinaries:
        if self._bins is None:
            self._bins = find_binaries()
        return self._bins

    def _state_file(self) -> Path:
        return self.home / "fleet.json"

    def server_dir(self, name: str) -> Path:
        return self.home / "servers" / name

    def data_dir(self, name: str) -> Path:
        return self.server_dir(name) / "data"

    def log_file(self, name: str) -> Path:
        return self.server_dir(name) / "postgres.log"

    def password_file(self, name: str) -> Path:
        return self.home / "secrets" / f"{name}.password"

    @property
    def ca(self) -> FleetCA:
        return FleetCA(self.home / "tls")

    def tls_dir(self, name: str) -> Path:
        return self.server_dir(name) / "tls"

    def socket_dir(self, name: str) -> Path:
        """Where a regional server's Unix socket lives (0700, the servers' OS
        user's): only pgfleet's own processes (the SQL gateway, pgBackRest)
        connect there."""
        return self.server_dir(name) / "socket"

    def socket_dirs(self) -> dict[int, str]:
        """Each regional server's port -> its Unix socket directory."""
        regional = (s for s in self.servers() if s.kind == "regional")
        return {s.port: str(self.socket_dir(s.name)) for s in regional}

    def servers(self) -> list[EmbeddedServer]:
        """The fleet as recorded; new regions from settings are appended with new ports."""
        recorded = self._load()
        if recorded is None:
            recorded = [EmbeddedServer("platform", "platform", None, self.settings.port_base)]
        have = {s.region for s in recorded if s.kind == "regional"}
        next_port = max(s.port for s in recorded) + 1
        for region in self.settings.embedded_regions:
            if region not in have:
                recorded.append(EmbeddedServer(f"{region}-a", "regional", region, next_port))
                next_port += 1
        return recorded

    def router_specs(self) -> list[RouterSpec]:
        """Two routers (session and transaction pooling) per embedded region,
        with ports after the servers' (fixed in fleet.json once made); with
        external servers, per region that has one, on the configured ports."""
        if not self.settings.routers:
            return []
        if not self.settings.embedded:
            return external_router_specs(self.settings)
        recorded = self._load_routers()
        have = {(r.region, r.pool_mode) for r in recorded}
        ports = [s.port for s in self.servers()] + [r.port for r in recorded]
        next_port = max(ports) + 1
        for region in self.settings.embedded_regions:
            for mode in POOL_MODES:
                if (region, mode) not in have:
                    recorded.append(RouterSpec(region, mode, next_port))
                    next_port += 1
        wanted = set(self.settings.embedded_regions)
        return [r for r in recorded if r.region in wanted]

    @property
    def routers(self) -> Routers:
        """The routers (one object per EmbeddedFleet: it keeps their admin
        sessions; `down` closes them)."""
        if self._routers is None:
            self._routers = self._make_routers()
        return self._routers

    def _make_routers(self) -> Routers:
        root = self.home / "routers"
        common: dict[str, Any] = {
            "ca_file": self.ca.cert_path,
            "admin_password_file": self.home / "secrets" / "router.password",
            "owner": self._os_user() if self._as_root() else None,
            "run": self._run,
        }
        s = self.settings
        if s.embedded:
            return Routers(root, self.router_specs(), host=LOOPBACK, **common)
        # External servers: the routers run here, verifying each server by
        # the CA its own connections use (the system's for one that names
        # none). PgBouncer has one server TLS setting per process, so one
        # server configured with less than verify-full would weaken the way
        # to all of them: refused.
        servers = s.external_servers()
        weak = [f"{x.name} ({x.sslmode})" for x in servers if x.sslmode != "verify-full"]
        if weak:
            raise FleetError(
                "the routers reach every external server with one TLS setting, so they need "
                f"sslmode=verify-full for all of them; not so: {', '.join(weak)}. Set "
                "verify-full (with sslrootcert) or run without routers (PGFLEET_ROUTERS=false)"
            )
        pem = "".join(_read_ca(x.sslrootcert) for x in servers if x.sslrootcert)
        if pem and any(not x.sslrootcert for x in servers):
            pem += _read_ca(SYSTEM_CAS)
        return Routers(
            root,
            self.router_specs(),
            host=s.router_host,
            listen=s.router_listen,
            server_tls=ServerTLS(root / "tls" / "servers-ca.pem" if pem else None),
            server_ca_pem=pem or None,
            **common,
        )

    def _issue_router_certificate(
        self, cert: Path, key: Path, owner: tuple[int, int] | None
    ) -> None:
        self.ca.ensure()
        hosts = list(TLS_HOSTS)
        if not self.settings.embedded and self.settings.router_host not in hosts:
            hosts.insert(0, self.settings.router_host)
        self.ca.issue_server("pgfleet-router", hosts, cert, key, owner=owner)

    def backup_dir(self, region: str) -> Path:
        """A region's backup storage (a region without a server has one too)."""
        return self.home / "backups" / region

    def scratch_dir(self) -> Path:
        return self.home / "scratch"

    def scratch(self, key: str) -> Scratch:
        """The throwaway instance a point-in-time restore named `key` uses
        (its data directory is what Archive.restore writes)."""
        base = self.scratch_dir()
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o711)  # noqa: S103 - traverse only
        return Scratch(
            base / key / "data",
            pg_ctl=self.bins.path("pg_ctl"),
            run=self._run,
            owner=self._os_user() if self._as_root() else None,
        )

    @property
    def archive(self) -> Archive | None:
        """pgBackRest for the regional servers, or None without backups."""
        if not self.settings.backups:
            return None
        if self._archive is None:
            stanzas = []
            for s in self.regional_servers():
                assert s.region is not None
                storage = backup_region_of(s.region, self.settings.backup_regions, s.name)
                stanzas.append(
                    Stanza(
                        name=s.name,
                        region=s.region,
                        storage_region=storage,
                        port=s.port,
                        data_dir=self.data_dir(s.name),
                        socket_dir=self.socket_dir(s.name),
                        config=self.server_dir(s.name) / "pgbackrest.conf",
                        work_dir=self.server_dir(s.name) / "pgbackrest",
                        repo=self.backup_dir(storage) / "pgbackrest",
                    )
                )
            self._archive = Archive(
                stanzas=stanzas,
                run=self._run,
                owner=self._os_user() if self._as_root() else None,
                retention_days=max(p.pitr_days for p in PLANS),
                queue_max_mb=self.settings.archive_queue_max_mb,
            )
        return self._archive

    def _server_os_user(self) -> str:
        """The OS user the servers run as."""
        if self._as_root():
            return self.settings.os_user
        return pwd.getpwuid(os.geteuid()).pw_name

    def regional_servers(self) -> list[EmbeddedServer]:
        wanted = set(self.settings.embedded_regions)
        return [s for s in self.servers() if s.kind == "regional" and s.region in wanted]

    def platform_server(self) -> EmbeddedServer:
        return next(s for s in self.servers() if s.kind == "platform")

    def _load(self) -> list[EmbeddedServer] | None:
        path = self._state_file()
        if not path.exists():
            return None
        raw: dict[str, Any] = json.loads(path.read_text())
        return [EmbeddedServer(**s) for s in raw["servers"]]

    def _load_routers(self) -> list[RouterSpec]:
        path = self._state_file()
        if not path.exists():
            return []
        raw: dict[str, Any] = json.loads(path.read_text())
        return [RouterSpec(**r) for r in raw.get("routers", [])]

    def _save(self, servers: Sequence[EmbeddedServer]) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        path = self._state_file()
        routers = {(r.region, r.pool_mode): r for r in self._load_routers()}
        for r in self.router_specs():
            routers.setdefault((r.region, r.pool_mode), r)
        tmp = path.with_suffix(".tmp")
        body = {
            "servers": [asdict(s) for s in servers],
            "routers": [asdict(r) for r in routers.values()],
        }
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        os.replace(tmp, path)

    def admin_password(self, name: str) -> str:
        return self.password_file(name).read_text().strip()

    def conninfo(self, server: EmbeddedServer, dbname: str = "postgres") -> dict[str, Any]:
        return {
            "host": LOOPBACK,
            "port": server.port,
            "user": ADMIN_USER,
            "password": self.admin_password(server.name),
            "dbname": dbname,
            "sslmode": "verify-full",
            "sslrootcert": str(self.ca.cert_path),
            "connect_timeout": 5,
        }

    def platform_conninfo(self) -> dict[str, Any]:
        return self.conninfo(self.platform_server(), PLATFORM_DB)

    # ---- running commands as the right user ---------------------------------
    def _as_root(self) -> bool:
        return os.geteuid() == 0

    def _os_user(self) -> tuple[int, int]:
        name = self.settings.os_user
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            nologin = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
            cmd = [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                nologin,
                name,
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise FleetError(
                    f"running as root, pgfleet needs an unprivileged user {name!r} for the "
                    f"PostgreSQL servers and could not create it: {res.stderr.strip()}"
                ) from None
            pw = pwd.getpwnam(name)
        return pw.pw_uid, pw.pw_gid

    def _run(
        self, args: list[str], *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self._as_root():
            uid, gid = self._os_user()
            kwargs = {"user": uid, "group": gid, "extra_groups": []}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        res = subprocess.run(
            args, capture_output=True, text=True, env=env, cwd="/", timeout=timeout, **kwargs
        )
        if check and res.returncode != 0:
            raise FleetError(
                f"{Path(args[0]).name} failed (exit {res.returncode}): "
                f"{(res.stderr or res.stdout).strip()[-2000:]}"
            )
        return res

    def _hand_over(self, path: Path) -> None:
        """Give a server's directory to the unprivileged user when we are root."""
        if not self._as_root():
            return
        uid, gid = self._os_user()
        for root, dirs, files in os.walk(path):
            os.chown(root, uid, gid)
            for n in dirs + files:
                os.chown(os.path.join(root, n), uid, gid, follow_symlinks=False)
        # The user must be able to reach its directory through our home.
        probe = self._run(["test", "-w", str(path)], check=False)
        if probe.returncode != 0:
            raise FleetError(
                f"the PostgreSQL user {self.settings.os_user!r} cannot reach {path}; "
                f"make every parent directory of PGFLEET_HOME ({self.home}) traversable "
                "(chmod o+x) or choose another PGFLEET_HOME"
            )

    # ---- lifecycle --------------------------------------------------------
    def init(self) -> list[EmbeddedServer]:
        """Create what is missing; reuse what exists."""
        servers = self.servers()
        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o711)  # noqa: S103 - traverse only
        (self.home / "servers").mkdir(exist_ok=True)
        os.chmod(self.home / "servers", 0o711)  # noqa: S103
        self.ca.ensure()
        for s in servers:
            if not (self.data_dir(s.name) / "PG_VERSION").exists():
                self._initdb(s)
            self._write_config(s)
        self._save(servers)
        return servers

    def _initdb(self, s: EmbeddedServer) -> None:
        sdir = self.server_dir(s.name)
        if sdir.exists():
            shutil.rmtree(sdir)  # a half-made directory from an interrupted initdb
        sdir.mkdir(parents=True)
        os.chmod(sdir, 0o700)
        if not self.password_file(s.name).exists():
            write_private(self.password_file(s.name), generate_password() + "\n")
        pw = self.admin_password(s.name)
        with tempfile.NamedTemporaryFile("w", dir=sdir, delete=False) as f:
            f.write(pw + "\n")
            pwfile = Path(f.name)
        os.chmod(pwfile, 0o600)
        self._hand_over(sdir)
        try:
            args = [
                self.bins.path("initdb"),
                "-D",
                str(self.data_dir(s.name)),
                "-U",
                ADMIN_USER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ]
            if not self.settings.fsync:
                args.append("--no-sync")
            self._run(args)
        finally:
            pwfile.unlink(missing_ok=True)
        conf = self.data_dir(s.name) / "postgresql.conf"
        with conf.open("a") as f:
            f.write("\ninclude_if_exists = 'pgfleet.conf'\n")

    def ensure_certificate(self, s: EmbeddedServer) -> bool:
        """The server's certificate from the fleet CA (issued or renewed when
        needed); True if new files were written (a running server then needs
        a reload)."""
        renewed_ca = self.ca.ensure()
        tls = self.tls_dir(s.name)
        tls.mkdir(parents=True, exist_ok=True)
        owner = self._os_user() if self._as_root() else None
        if owner is not None:
            os.chown(tls, *owner)
        os.chmod(tls, 0o700)
        issued = self.ca.issue_server(
            s.name, TLS_HOSTS, tls / "server.crt", tls / "server.key", owner=owner
        )
        return issued.renewed or renewed_ca

    def renew_certificates(self) -> list[str]:
        """Renew what is about to expire and reload the running servers that
        got a new certificate (PostgreSQL rereads its TLS files on reload).
        Returns the servers renewed."""
        renewed = []
        for s in self.servers():
            if not (self.data_dir(s.name) / "PG_VERSION").exists():
                continue
            if self.ensure_certificate(s):
                renewed.append(s.name)
                if self.is_running(s):
                    self._run(
                        [self.bins.path("pg_ctl"), "reload", "-D", str(self.data_dir(s.name))]
                    )
        return renewed

    def _write_config(self, s: EmbeddedServer) -> None:
        data = self.data_dir(s.name)
        durable = "on" if self.settings.fsync else "off"
        self.ensure_certificate(s)
        tls = self.tls_dir(s.name)
        sockets = "''"
        if s.kind == "regional":
            sock = self.socket_dir(s.name)
            if len(str(sock)) + len(f"/.s.PGSQL.{s.port}") > 107:
                raise FleetError(
                    f"the socket path under {sock} is longer than Unix sockets allow (107 "
                    "bytes); choose a shorter PGFLEET_HOME"
                )
            sock.mkdir(exist_ok=True)
            if self._as_root():
                os.chown(sock, *self._os_user())
            os.chmod(sock, 0o700)
            sockets = f"'{sock}'"
        settings = {
            "listen_addresses": f"'{LOOPBACK}'",
            "port": str(s.port),
            # The routers' way in (see hba_conf); none on the platform server.
            "unix_socket_directories": sockets,
            "unix_socket_permissions": "0700",
            "password_encryption": "'scram-sha-256'",
            "wal_level": "logical",
            "max_connections": "300",
            # A connection that has not logged in within 10 s is ended (60 s
            # by default): a client that opens connections and never finishes
            # a login holds a server process that long. A login that timed
            # out on our side while the server was frozen leaves one too,
            # open until Python collects it (seen: 60 s of four such).
            "authentication_timeout": "'10s'",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "shared_buffers": "64MB",
            # PostgreSQL's default, said here because it matters: on a host
            # with huge pages reserved (vm.nr_hugepages) the shared memory
            # is mapped in 2 MB pages, and each new backend takes far fewer
            # page faults. Measured: a login (bench/sql_api.py round-robin)
            # cost the server 3.1 ms of CPU instead of 3.7. Without them the
            # server starts as before.
            "huge_pages": "try",
            "fsync": durable,
            # Even without fsync (tests, benches), a commit writes its WAL to
            # the OS before it returns: a killed postmaster loses nothing
            # committed (only the machine failing could).
            "synchronous_commit": "on",
            # Always on with backups, even on throwaway fleets: a
            # point-in-time restore brings back one database's files and
            # leaves the others' as zeroes, and WAL that changes a zeroed
            # page without a full-page image is "invalid" to recovery.
            "full_page_writes": "on" if self.settings.backups else durable,
            # TLS only (pg_hba has nothing but hostssl lines).
            "ssl": "on",
            "ssl_cert_file": f"'{tls / 'server.crt'}'",
            "ssl_key_file": f"'{tls / 'server.key'}'",
            "ssl_min_protocol_version": "'TLSv1.2'",
            # Tenants' statement text never reaches the log: a password literal
            # a tenant types (ALTER ROLE ... PASSWORD) stays out of it even when
            # the statement fails. Errors and warnings (whose text can quote the
            # statement) are not logged; LOG, FATAL and PANIC are.
            "log_min_messages": "log",
            "log_min_error_statement": "panic",
            "log_statement": "none",
            "log_min_duration_statement": "-1",
            "log_min_duration_sample": "-1",
            "log_duration": "off",
            "log_parameter_max_length": "0",
            "log_parameter_max_length_on_error": "0",
            "log_connections": "off",
            "log_disconnections": "off",
        }
        if s.kind == "regional":
            # The autovacuum launcher visits every database once per naptime,
            # a worker process each: with 700 projects on a server the default
            # (1 min) started one every 86 ms, about 100 ms of CPU a second per
            # server with every project idle (bench/density.py at 2,000
            # projects: 15% of the machine for three servers). At 5 min a busy
            # project's tables are looked at every 5 minutes instead of every
            # minute; the thresholds that decide a VACUUM stay PostgreSQL's.
            settings["autovacuum_naptime"] = "'5min'"
        if s.kind == "regional" and self.bins.has_library(STATEMENTS):
            settings.update(
                {
                    # Query insights for every client, not only the SQL API's.
                    "shared_preload_libraries": f"'{STATEMENTS}'",
                    "pg_stat_statements.track": "top",
                    # No utility statements: ALTER ROLE ... PASSWORD '...' would
                    # be kept with its literal (they are not normalised).
                    "pg_stat_statements.track_utility": "off",
                    "pg_stat_statements.max": "10000",
                }
            )
        archive = self.archive if s.kind == "regional" else None
        if archive is not None:
            stanza = archive.stanza(s.name)
            archive.prepare(stanza)
            command = archive.archive_command(stanza).replace("'", "''")
            settings.update(
                {
                    # Every WAL segment goes to the backup region's repository.
                    "archive_mode": "on",
                    "archive_command": f"'{command}'",
                    "archive_timeout": str(self.settings.archive_timeout_s),
                }
            )
        body = "# Managed by pgfleet; rewritten at every start.\n" + "".join(
            f"{k} = {v}\n" for k, v in settings.items()
        )
        (data / "pgfleet.conf").write_text(body)
        (data / "pg_hba.conf").write_text(hba_conf(s.kind))
        (data / "pg_ident.conf").write_text(
            "# Managed by pgfleet: the servers' OS user may be the admin on the\n"
            "# private socket (pgBackRest's way in).\n"
            f"pgfleet  {self._server_os_user()}  {ADMIN_USER}\n"
        )
        if self._as_root():
            uid, gid = self._os_user()
            for p in (data / "pgfleet.conf", data / "pg_hba.conf", data / "pg_ident.conf"):
                os.chown(p, uid, gid)
                os.chmod(p, 0o600)

    def is_running(self, s: EmbeddedServer) -> bool:
        if not (self.data_dir(s.name) / "PG_VERSION").exists():
            return False
        res = self._run(
            [self.bins.path("pg_ctl"), "status", "-D", str(self.data_dir(s.name))], check=False
        )
        return res.returncode == 0

    def start(self, s: EmbeddedServer) -> None:
        if self.is_running(s):
            return
        self._write_config(s)
        if not port_free(LOOPBACK, s.port):
            raise FleetError(
                f"port {s.port} for server {s.name} is in use by another program; "
                "stop it or choose other ports with PGFLEET_PORT_BASE (the fleet's ports are "
                f"fixed in {self._state_file()} once created){ephemeral_hint(s.port)}"
            )
        log = self.log_file(s.name)
        try:
            self._run(
                [
                    self.bins.path("pg_ctl"),
                    "start",
                    "-w",
                    "-t",
                    "60",
                    "-D",
                    str(self.data_dir(s.name)),
                    "-l",
                    str(log),
                ]
            )
        except FleetError as e:
            tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
            raise FleetError(
                f"server {s.name} (port {s.port}) did not start; its log ({log}) ends with:\n"
                + "\n".join(tail)
            ) from e
        self._wait_ready(s)

    def _wait_ready(self, s: EmbeddedServer, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(**self.conninfo(s)) as conn:
                    conn.execute("select 1")
                return
            except psycopg.OperationalError as e:
                last = e
                time.sleep(0.1)
        raise FleetError(f"server {s.name} did not accept connections on port {s.port}: {last}")

    def stop(self, s: EmbeddedServer, mode: str = "fast") -> None:
        if not self.is_running(s):
            return
        self._run(
            [
                self.bins.path("pg_ctl"),
                "stop",
                "-w",
                "-t",
                "60",
                "-m",
                mode,
                "-D",
                str(self.data_dir(s.name)),
            ]
        )

    def up(self) -> list[EmbeddedServer]:
        servers = self.init()
        for s in servers:
            self.start(s)
        self._ensure_platform_db()
        self.prepare_regional()
        self.start_routers()
        return servers

    def prepare_regional(self) -> None:
        """Each regional server's stanza in its backup region's repository,
        and pg_stat_statements in its admin database. A server that runs
        without archiving (made before backups existed, or with
        PGFLEET_BACKUPS=false before) or without pg_stat_statements loaded
        (made before query insights) is restarted once to turn them on."""
        archive = self.archive
        statements = self.bins.has_library(STATEMENTS)
        for s in self.regional_servers():
            with psycopg.connect(**self.conninfo(s)) as conn:
                row = conn.execute(
                    "SELECT current_setting('archive_mode'), "
                    "current_setting('shared_preload_libraries')"
                ).fetchone()
            assert row is not None
            if (archive is not None and row[0] != "on") or (
                statements and STATEMENTS not in row[1]
            ):
                # Both are read only at server start.
                self.stop(s)
                self.start(s)
            if statements:
                # In the admin database only: tenants never connect there, and
                # the view is read from there (monitoring.insights).
                with psycopg.connect(**self.conninfo(s), autocommit=True) as conn:
                    conn.execute(f"CREATE EXTENSION IF NOT EXISTS {STATEMENTS} SCHEMA public")
            if archive is not None:
                archive.create(archive.stanza(s.name))

    def start_routers(self) -> list[RouterSpec]:
        """Start the routers that are not running (their route table is what
        was last written; the platform's next sync brings it up to date).
        Returns those started."""
        routers = self.routers
        if not routers.specs:
            return []
        routers.prepare(self._issue_router_certificate)
        return [spec for spec in routers.specs if routers.start(spec)]

    def down(self) -> None:
        routers = self.routers
        routers.close()
        for spec in routers.specs:
            routers.stop(spec)
        self.stop_scratch()
        for s in reversed(self._load() or []):
            self.stop(s)

    def stop_scratch(self) -> list[str]:
        """Stop the scratch instances of restores that were running (their
        operations resume from their steps after `up`). Returns their names."""
        stopped = []
        if self.scratch_dir().is_dir():
            for work in self.scratch_dir().iterdir():
                if (work / "data" / "postmaster.pid").exists():
                    self.scratch(work.name).stop()
                    stopped.append(work.name)
        return stopped

    def states(self) -> list[ServerState]:
        out = []
        for s in self._load() or []:
            init = (self.data_dir(s.name) / "PG_VERSION").exists()
            out.append(ServerState(s, init, init and self.is_running(s)))
        return out

    def _ensure_platform_db(self) -> None:
        with psycopg.connect(**self.conninfo(self.platform_server()), autocommit=True) as conn:
            exists = conn.execute(
                "select 1 from pg_database where datname = %s", (PLATFORM_DB,)
            ).fetchone()
            if not exists:
                conn.execute(
                    psycopg.sql.SQL("CREATE DATABASE {}").format(
                        psycopg.sql.Identifier(PLATFORM_DB)
                    )
                )


# Debian's bundle of the system's CAs (what PgBouncer reads by default).
SYSTEM_CAS = "/etc/ssl/certs/ca-certificates.crt"


def _read_ca(path: str) -> str:
    try:
        text = Path(path).expanduser().read_text()
    except OSError as e:
        raise FleetError(f"cannot read the CA file {path} of an external server: {e}") from e
    return text if text.endswith("\n") else text + "\n"


def external_router_specs(settings: Settings) -> list[RouterSpec]:
    """Routers for external servers: two per region that has a server, at
    router_port_base + 2 x the region's place in REGION_IDS (+1 for
    transaction pooling), so a region's ports never depend on the others."""
    regions = {x.region for x in settings.external_servers()}
    return [
        RouterSpec(region, mode, settings.router_port_base + 2 * i + j)
        for i, region in enumerate(REGION_IDS)
        if region in regions
        for j, mode in enumerate(POOL_MODES)
    ]


def hba_conf(kind: Literal["platform", "regional"]) -> str:
    """pg_hba.conf of an embedded server: TLS and SCRAM only, loopback only.

    On a regional server the admin (a superuser) may only enter the
    `postgres` database (and `template1`, which new databases copy and no
    tenant can enter): no session of it can ever run inside a tenant's
    database, where the tenant controls what names resolve to. A project's
    login roles are members of a NOLOGIN role named like its database, so
    `samerole` admits them to that database and to no other (superusers are
    not members for samerole). The probe role has no privilege; it can enter
    only a database it was granted CONNECT on. The Unix socket, in a
    directory only the servers' OS user can enter, admits the same project
    roles the same way: it is how the SQL gateway logs in for them without
    a TLS handshake per login. The routers reach the servers over TLS.
    """
    head = "# Managed by pgfleet; rewritten at every start.\n"
    if kind == "platform":
        return head + (
            f"hostssl all          {ADMIN_USER}  127.0.0.1/32  scram-sha-256\n"
            f"hostssl replication  {ADMIN_USER}  127.0.0.1/32  scram-sha-256\n"
            "host    all          all            0.0.0.0/0     reject\n"
            "local   all          all                          reject\n"
        )
    return head + (
        # The SQL gateway (same host, a 0700 socket directory): the
        # projects' roles only, into their own database (samerole), SCRAM.
        "local   samerole     all                          scram-sha-256\n"
        # pgBackRest (the servers' OS user, same socket): the admin, by peer
        # authentication, into the admin database only.
        f"local   postgres     {ADMIN_USER}                  peer map=pgfleet\n"
        f"hostssl postgres,template1 {ADMIN_USER} 127.0.0.1/32 scram-sha-256\n"
        f"hostssl replication  {ADMIN_USER}  127.0.0.1/32  scram-sha-256\n"
        f"host    all          {ADMIN_USER}  0.0.0.0/0     reject\n"
        f"hostssl all          {PROBE_USER}  127.0.0.1/32  scram-sha-256\n"
        "hostssl samerole     all            127.0.0.1/32  scram-sha-256\n"
        "host    all          all            0.0.0.0/0     reject\n"
        "local   all          all                          reject\n"
    )


def ephemeral_hint(port: int) -> str:
    """What to add when a fixed port is taken: inside the kernel's range of
    ports for outgoing connections, it may be the local end of one (any
    process's, a router's to another server say), which frees the port when
    it ends."""
    try:
        low, high = (
            int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        )
    except (OSError, ValueError):
        return ""
    if not low <= port <= high:
        return ""
    return (
        f"; {port} is in the kernel's range for outgoing connections ({low}-{high}), so it "
        "may be the local end of one, which frees it when that connection ends (a port base "
        "below it, or net.ipv4.ip_local_reserved_ports, avoids this)"
    )


def _port_free(port: int) -> bool:
    return port_free(LOOPBACK, port)
