"""`python -m pgfleet.cli` (how `pgfleet up --detach` starts the API)."""

from pgfleet.cli import main

main()
