"""Failpoints: named places in operation code where a test can stop a worker.

Off unless `PGFLEET_FAILPOINTS` names them (comma separated). A worker that
reaches an armed failpoint writes `<name>.reached` into
`PGFLEET_FAILPOINT_DIR` and waits there until `<name>.release` appears (or a
test kills it with SIGKILL, which is what the crash tests do). Names are
`<operation>.<step>.before`, `<operation>.<step>.after`, and a few inside
steps (`provision.database.created`, `delete.drop_database.mid`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def _armed() -> set[str]:
    return {n.strip() for n in os.environ.get("PGFLEET_FAILPOINTS", "").split(",") if n.strip()}


def failpoint(name: str, *, max_wait_s: float = 300.0) -> None:
    if name not in _armed():
        return
    folder = Path(os.environ.get("PGFLEET_FAILPOINT_DIR", "."))
    (folder / f"{name}.reached").write_text(str(os.getpid()))
    release = folder / f"{name}.release"
    deadline = time.monotonic() + max_wait_s
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
