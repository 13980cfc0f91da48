"""`python -m pgfleet` is the `pgfleet` command."""

from pgfleet.cli import main

main()
