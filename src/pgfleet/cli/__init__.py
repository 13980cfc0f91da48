"""The pgfleet command line.

`up`, `down`, `status`, `serve` and `worker` manage the embedded fleet and
the processes directly; every other command is a client of the REST API, so
each feature has one implementation. One module per command group; importing
them adds their commands to `app`.
"""

import io
import sys

from pgfleet.cli import accounts, backups, catalog, fleet, monitoring, ops, projects
from pgfleet.cli.common import app, say_error, undecodable

COMMANDS = (accounts, backups, catalog, fleet, monitoring, ops, projects)


def main() -> None:
    # A tenant's text on a terminal whose encoding cannot show it (LC_ALL=C
    # without Python's UTF-8 mode): escaped, not a UnicodeEncodeError.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    why = undecodable(sys.argv[1:])
    if why is not None:  # before any command sees it (a request cannot carry it)
        say_error(why)
        sys.exit(2)
    app()


__all__ = ["app", "main"]
