"""Continuous archiving of the embedded servers, with pgBackRest.

Every regional server archives its WAL (`archive_command` runs pgBackRest's
`archive-push`) and takes base backups into a repository in its backup
region, another region than its own (regions.BACKUP_PAIRS). Backup storage
is not a database server: in the embedded fleet a region's storage is a
directory, so a region without a server can still hold backups.

Layout under PGFLEET_HOME (the servers' OS user owns what pgBackRest writes):
    backups/<region>/pgbackrest/        a repository (one stanza per server)
    backups/<region>/snapshots/<project>/   per-project pg_dump files
    servers/<server>/pgbackrest.conf    the stanza's configuration
    servers/<server>/pgbackrest/        its log and lock files
    scratch/<operation>/                a point-in-time restore's instance

pgBackRest reaches its server through the server's private Unix socket as
the admin, by peer authentication (pg_ident maps the servers' OS user to the
admin), into the `postgres` database only: no password is written for it.

A point-in-time restore never touches the server: `restore` writes the
archive's copy into a scratch directory (`--db-include`: only the project's
database has data there), and `Scratch` runs it as a throwaway instance on a
Unix socket only, with trust authentication inside a 0700 directory, until
the one database has been copied out.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import psycopg

from pgfleet.errors import FleetError

Run = Callable[..., CompletedProcess[str]]

BACKUP_TYPES = ("full", "diff", "incr")


def find_pgbackrest() -> str:
    for candidate in (
        os.environ.get("PGFLEET_PGBACKREST"),
        "/usr/bin/pgbackrest",
        "/usr/local/bin/pgbackrest",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FleetError(
        "pgBackRest (continuous backups) was not found; run scripts/bootstrap.sh (make up "
        "does), which installs Debian's pgbackrest, or set PGFLEET_BACKUPS=false to run "
        "without backups"
    )


@dataclass(frozen=True)
class Stanza:
    """One server's archive: where its data is and where its backups go."""

    name: str  # the server's name
    region: str
    storage_region: str
    port: int
    data_dir: Path
    socket_dir: Path
    config: Path
    work_dir: Path  # its log and lock files
    repo: Path


@dataclass(frozen=True)
class BaseBackup:
    label: str
    type: str
    started_at: datetime
    stopped_at: datetime
    size_bytes: int  # the database's size at backup time
    repo_bytes: int  # what it took in the repository
    wal_start: str
    wal_stop: str


@dataclass(frozen=True)
class ArchiveInfo:
    stanza: str
    status: str  # pgBackRest's status message ("ok", "no valid backups", ...)
    status_code: int  # 0 ok, 1 missing stanza path, 2 no valid backups, 3 missing stanza data
    backups: tuple[BaseBackup, ...]
    wal_min: str | None
    wal_max: str | None

    @property
    def oldest(self) -> BaseBackup | None:
        return self.backups[0] if self.backups else None

    @property
    def newest(self) -> BaseBackup | None:
        return self.backups[-1] if self.backups else None


def _ts(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def parse_info(raw: str) -> list[ArchiveInfo]:
    """`pgbackrest info --output=json`, as ArchiveInfo per stanza."""
    out = []
    for st in json.loads(raw):
        backups = tuple(
            BaseBackup(
                label=b["label"],
                type=b["type"],
                started_at=_ts(b["timestamp"]["start"]),
                stopped_at=_ts(b["timestamp"]["stop"]),
                size_bytes=int(b["info"]["size"]),
                repo_bytes=int(b["info"]["repository"]["size"]),
                wal_start=b["archive"]["start"],
                wal_stop=b["archive"]["stop"],
            )
            for b in st.get("backup", [])
            if not b.get("error")
        )
        archives = st.get("archive") or []
        wal_min = min((a["min"] for a in archives if a.get("min")), default=None)
        wal_max = max((a["max"] for a in archives if a.get("max")), default=None)
        out.append(
            ArchiveInfo(
                stanza=st["name"],
                status=str(st.get("status", {}).get("message", "")),
                status_code=int(st.get("status", {}).get("code", -1)),
                backups=tuple(sorted(backups, key=lambda b: b.stopped_at)),
                wal_min=wal_min,
                wal_max=wal_max,
            )
        )
    return out


class Archive:
    """pgBackRest for the embedded servers (every command runs as the
    servers' OS user, through `run`)."""

    def __init__(
        self,
        *,
        stanzas: list[Stanza],
        run: Run,
        owner: tuple[int, int] | None,
        retention_days: int,
        queue_max_mb: int,
    ) -> None:
        self.stanzas = {s.name: s for s in stanzas}
        self._run = run
        self._owner = owner
        self.retention_days = retention_days
        self.queue_max_mb = queue_max_mb
        self._bin: str | None = None

    @property
    def bin(self) -> str:
        if self._bin is None:
            self._bin = find_pgbackrest()
        return self._bin

    def stanza(self, server: str) -> Stanza:
        try:
            return self.stanzas[server]
        except KeyError:
            raise FleetError(f"server {server} has no archive") from None

    # ---- configuration ------------------------------------------------------
    def config_text(self, s: Stanza) -> str:
        lines = [
            "# Managed by pgfleet; rewritten at every start.",
            "[global]",
            f"repo1-path={s.repo}",
            # Full backups are kept for the longest point-in-time window any
            # plan offers (and the WAL they need); pgBackRest expires older
            # ones after each backup.
            "repo1-retention-full-type=time",
            f"repo1-retention-full={self.retention_days}",
            "compress-type=lz4",
            "compress-level=1",
            # archive_command failing must not fill the server's disk: past
            # this much WAL waiting, pgBackRest reports success and drops it
            # (a gap in the archive that the next full backup closes).
            f"archive-push-queue-max={self.queue_max_mb}MiB",
            "archive-timeout=60",
            "start-fast=y",
            "process-max=2",
            f"log-path={s.work_dir / 'log'}",
            f"lock-path={s.work_dir / 'lock'}",
            f"spool-path={s.work_dir / 'spool'}",
            "log-level-file=info",
            "log-level-console=warn",
            "log-level-stderr=error",
            "",
            f"[{s.name}]",
            f"pg1-path={s.data_dir}",
            f"pg1-port={s.port}",
            f"pg1-socket-path={s.socket_dir}",
            "pg1-user=pgfleet_admin",
            "pg1-database=postgres",
            "",
        ]
        return "\n".join(lines)

    def archive_command(self, s: Stanza) -> str:
        return (
            f"{shlex.quote(self.bin)} --config={shlex.quote(str(s.config))} "
            f"--stanza={s.name} archive-push %p"
        )

    def prepare(self, s: Stanza) -> None:
        """Its repository directory (in the storage region) and configuration."""
        for d in (s.repo.parent.parent, s.repo.parent):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o711)  # noqa: S103 - traverse only
        for d in (s.repo, s.work_dir, *(s.work_dir / n for n in ("log", "lock", "spool"))):
            d.mkdir(parents=True, exist_ok=True)
            if self._owner is not None:
                os.chown(d, *self._owner)
            os.chmod(d, 0o700)
        tmp = s.config.with_suffix(".tmp")
        tmp.write_text(self.config_text(s))
        if self._owner is not None:
            os.chown(tmp, *self._owner)
        os.chmod(tmp, 0o600)
        os.replace(tmp, s.config)

    def _cmd(self, s: Stanza, *args: str) -> list[str]:
        return [self.bin, f"--config={s.config}", f"--stanza={s.name}", *args]

    def create(self, s: Stanza) -> None:
        """The stanza in its repository, unless it is there (pgBackRest's
        `info` takes no lock, so a backup running meanwhile is no trouble)."""
        res = self._run(self._cmd(s, "info", "--output=json"), check=False, timeout=60)
        if res.returncode == 0:
            found = [i for i in parse_info(res.stdout) if i.stanza == s.name]
            if found and found[0].status_code in (0, 2):
                return
        self._run(self._cmd(s, "stanza-create"), timeout=120)

    # ---- backups ------------------------------------------------------------
    def backup(self, s: Stanza, type: str) -> BaseBackup:
        if type not in BACKUP_TYPES:
            raise ValueError(f"backup type must be one of {BACKUP_TYPES}, not {type!r}")
        self._run(self._cmd(s, "backup", f"--type={type}"), timeout=6 * 3600)
        newest = self.info(s).newest
        if newest is None:
            raise FleetError(f"pgBackRest reported no backup of {s.name} after taking one")
        return newest

    def info(self, s: Stanza) -> ArchiveInfo:
        res = self._run(self._cmd(s, "info", "--output=json"), timeout=60)
        found = [i for i in parse_info(res.stdout) if i.stanza == s.name]
        if not found:
            raise FleetError(f"pgBackRest knows no stanza {s.name}")
        return found[0]

    def backup_databases(self, s: Stanza, label: str) -> dict[int, str]:
        """The databases base backup `label` holds, oid -> name (the
        template databases aside)."""
        res = self._run(self._cmd(s, "info", "--output=json", f"--set={label}"), timeout=60)
        for st in json.loads(res.stdout):
            for b in st.get("backup", []):
                if b.get("label") == label:
                    return {int(d["oid"]): str(d["name"]) for d in b.get("database-ref") or []}
        raise FleetError(f"pgBackRest knows no backup {label} of {s.name}")

    def verify(self, s: Stanza) -> tuple[bool, str]:
        """pgBackRest's own check of the repository (checksums of every
        backup file and WAL segment): (ok, what it reported)."""
        # Its findings are logged at `info` and it exits 0 either way: read them.
        res = self._run(
            self._cmd(s, "verify", "--log-level-console=info"), check=False, timeout=3600
        )
        out = res.stdout + res.stderr
        found = [
            ln.split("INFO: ", 1)[-1].strip()
            for ln in out.splitlines()
            if "status:" in ln or "invalid" in ln or "missing" in ln or "ERROR" in ln
        ]
        ok = res.returncode == 0 and "status: error" not in out
        return ok, "; ".join(found) or out.strip()[-500:]

    # ---- point-in-time restore into a scratch instance ----------------------
    def restore(
        self,
        s: Stanza,
        dest: Path,
        *,
        target_time: datetime | None,
        target_name: str | None = None,
        backup_set: str | None = None,
        include: str | None = None,
        exclude: tuple[str, ...] = (),
    ) -> None:
        """The archive's copy as of `target_time`, or of the named restore
        point `target_name` (neither: the end of the archive), into `dest`, a
        new data directory. `include` names the one database (as the base
        backup knew it) whose files come back; or `exclude` the databases
        whose files do not (for a database made after the base backup, which
        recovery makes from the WAL): those come back as empty files, which
        recovery accepts (pgBackRest's --db-include / --db-exclude).
        `backup_set` pins the base backup to start from."""
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self._owner is not None:
            os.chown(dest.parent, *self._owner)
        os.chmod(dest.parent, 0o700)
        args = [
            "restore",
            f"--pg1-path={dest}",
            "--archive-mode=off",
            "--target-action=promote",
        ]
        if include is not None:
            args.append(f"--db-include={include}")
        args += [f"--db-exclude={name}" for name in exclude]
        if backup_set is not None:
            args.append(f"--set={backup_set}")
        if target_name is not None:
            args += ["--type=name", f"--target={target_name}"]
        elif target_time is not None:
            stamp = target_time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
            args += ["--type=time", f"--target={stamp}"]
        else:
            args += ["--type=default"]
        self._run(self._cmd(s, *args), timeout=6 * 3600)


class Scratch:
    """A restored data directory run as a throwaway PostgreSQL instance: a
    Unix socket in a 0700 directory, no TCP, trust authentication, no
    archiving, until it is stopped and removed."""

    def __init__(self, data_dir: Path, *, pg_ctl: str, run: Run, owner: tuple[int, int] | None):
        self.data_dir = data_dir
        self.socket_dir = data_dir.parent / "socket"
        self.port = 5432
        self._pg_ctl = pg_ctl
        self._run = run
        self._owner = owner

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        if self._owner is not None:
            os.chown(path, *self._owner)
        os.chmod(path, 0o600)

    def start(self, timeout_s: float = 600) -> None:
        self.socket_dir.mkdir(exist_ok=True)
        if self._owner is not None:
            os.chown(self.socket_dir, *self._owner)
        os.chmod(self.socket_dir, 0o700)
        # The server's own settings came back with its files: replace them.
        self._write(
            self.data_dir / "pgfleet.conf",
            "# A scratch instance of a point-in-time restore.\n"
            "listen_addresses = ''\n"
            f"port = {self.port}\n"
            f"unix_socket_directories = '{self.socket_dir}'\n"
            "unix_socket_permissions = 0700\n"
            "ssl = off\n"
            "archive_mode = off\n"
            "max_connections = 20\n"
            # No session until recovery reached its target and promoted (and
            # no check of the primary's connection settings against ours).
            "hot_standby = off\n"
            "fsync = off\n"
            "synchronous_commit = off\n"
            "full_page_writes = off\n"
            "shared_buffers = 128MB\n"
            "log_min_messages = log\n"
            "log_statement = none\n"
            "log_min_error_statement = panic\n",
        )
        self._write(self.data_dir / "pg_hba.conf", "local all all trust\n")
        log = self.data_dir.parent / "postgres.log"
        try:
            self._run(
                [
                    self._pg_ctl,
                    "start",
                    "-w",
                    "-t",
                    "120",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(log),
                ],
                timeout=180,
            )
        except FleetError as e:
            raise FleetError(f"the restored copy did not start: {self._log_tail(log)}") from e
        # Recovery replays WAL up to the target, then promotes: wait for it.
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with self.connect("postgres", "pgfleet_admin") as conn:
                    row = conn.execute("SELECT pg_catalog.pg_is_in_recovery()").fetchone()
                    if row is not None and not row[0]:
                        return
            except psycopg.OperationalError:
                if not self.running():
                    raise FleetError(
                        f"recovery of the restored copy failed: {self._log_tail(log)}"
                    ) from None
            if time.monotonic() > deadline:
                raise FleetError("recovery of the restored copy did not finish in time")
            time.sleep(0.2)

    @staticmethod
    def _log_tail(log: Path) -> str:
        if not log.exists():
            return "(no log)"
        lines = [
            ln
            for ln in log.read_text(errors="replace").splitlines()
            if "FATAL" in ln or "ERROR" in ln or "PANIC" in ln
        ]
        return " / ".join(lines[-3:]) or "(nothing in its log)"

    def conninfo(self, dbname: str, user: str) -> dict[str, Any]:
        return {
            "host": str(self.socket_dir),
            "port": self.port,
            "dbname": dbname,
            "user": user,
            "connect_timeout": 10,
        }

    def connect(self, dbname: str, user: str) -> psycopg.Connection[Any]:
        return psycopg.connect(**self.conninfo(dbname, user), autocommit=True)

    def running(self) -> bool:
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        res = self._run([self._pg_ctl, "status", "-D", str(self.data_dir)], check=False)
        return res.returncode == 0

    def stop(self) -> None:
        if self.data_dir.exists() and self.running():
            self._run(
                [
                    self._pg_ctl,
                    "stop",
                    "-w",
                    "-t",
                    "60",
                    "-m",
                    "immediate",
                    "-D",
                    str(self.data_dir),
                ],
                check=False,
                timeout=90,
            )

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)
