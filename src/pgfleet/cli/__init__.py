"""The pgfleet command line.

`up`, `down`, `status`, `serve` and `worker` manage the embedded fleet and
the processes directly; every other command is a client of the REST API, so
each feature has one implementation. One module per command group; importing
them adds their commands to `app`.
"""

import sys

from rich.text import Text

from pgfleet.cli import accounts, backups, catalog, fleet, monitoring, ops, projects
from pgfleet.cli.common import app, err, undecodable

COMMANDS = (accounts, backups, catalog, fleet, monitoring, ops, projects)


def main() -> None:
    why = undecodable(sys.argv[1:])
    if why is not None:  # before any command sees it (a request cannot carry it)
        err.print(Text.assemble(("error:", "bold red"), " ", why), highlight=False)
        sys.exit(2)
    app()


__all__ = ["app", "main"]
