"""Find PostgreSQL server binaries: PATH, pg_config --bindir,
/usr/lib/postgresql/*/bin (highest version), or the pgserver wheel.

`python -m pgfleet.fleet.binaries` prints the directory found, or exits 1.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pgfleet.errors import FleetError

NEEDED = ("initdb", "pg_ctl", "postgres")


@dataclass(frozen=True)
class PgBinaries:
    bindir: Path
    version: int

    def path(self, name: str) -> str:
        return str(self.bindir / name)

    def has_library(self, name: str) -> bool:
        """Is the server module `name` (e.g. pg_stat_statements) installed
        beside these binaries? Debian keeps modules in ../lib, a source
        build may in ../lib/postgresql."""
        lib = self.bindir.parent / "lib"
        return any((d / f"{name}.so").is_file() for d in (lib, lib / "postgresql"))


def _complete(bindir: Path) -> bool:
    return all((bindir / n).is_file() and os.access(bindir / n, os.X_OK) for n in NEEDED)


def _version(bindir: Path) -> int:
    out = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r"(\d+)(?:\.\d+)?", out)
    if not m:
        raise FleetError(f"cannot read the PostgreSQL version from {out!r}")
    return int(m.group(1))


def _candidates() -> list[Path]:
    found: list[Path] = []
    env_dir = os.environ.get("PGFLEET_PG_BINDIR")
    if env_dir:
        found.append(Path(env_dir))
    initdb = shutil.which("initdb")
    if initdb:
        found.append(Path(initdb).resolve().parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            ).stdout.strip()
            found.append(Path(out))
        except (OSError, subprocess.CalledProcessError):
            pass
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    found.extend(debian)
    spec = importlib.util.find_spec("pgserver")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            found.append(Path(loc) / "pginstall" / "bin")
    return found


def find_binaries() -> PgBinaries:
    """The explicit directory wins; then the highest version among the rest."""
    env_dir = os.environ.get("PGFLEET_PG_BINDIR")
    complete = [c for c in _candidates() if _complete(c)]
    if not complete:
        raise FleetError(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found on PATH, "
            "via pg_config, in /usr/lib/postgresql/*/bin or in the pgserver package; "
            "run scripts/bootstrap.sh (make up does) to install them"
        )
    if env_dir and complete[0] == Path(env_dir):
        return PgBinaries(complete[0], _version(complete[0]))
    versions = [(_version(c), c) for c in complete]
    best = max(versions, key=lambda vc: vc[0])
    return PgBinaries(best[1], best[0])


if __name__ == "__main__":
    try:
        b = find_binaries()
    except FleetError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
    print(f"PostgreSQL {b.version}: {b.bindir}")
