"""The pgfleet command line.

`up`, `down`, `status`, `serve` and `worker` manage the embedded fleet and
the processes directly; every other command is a client of the REST API, so
each feature has one implementation. One module per command group; importing
them adds their commands to `app`.
"""

from pgfleet.cli import accounts, backups, catalog, fleet, monitoring, ops, projects
from pgfleet.cli.common import app

COMMANDS = (accounts, backups, catalog, fleet, monitoring, ops, projects)


def main() -> None:
    app()


__all__ = ["app", "main"]
