# The two commands: `make up` runs pgfleet on its embedded fleet,
# `make test` runs the whole suite (ruff, mypy, pytest). Both set up
# everything they need first.
.PHONY: up down status test lint bootstrap bench

# The suite's processes (pytest-xdist): each starts its own embedded fleet
# and takes tests as it frees up (worksteal). Not loadfile or loadscope:
# under them schemathesis ran 10 of test_fuzz.py's 1,573 cases.
TEST_WORKERS ?= 2

bootstrap:
	@scripts/bootstrap.sh

up: bootstrap
	.venv/bin/pgfleet up

down: bootstrap
	.venv/bin/pgfleet down

status: bootstrap
	.venv/bin/pgfleet status

lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports

test: lint
	@scripts/bootstrap.sh --with-browser
	.venv/bin/pytest -n $(TEST_WORKERS) --dist worksteal

bench: bootstrap
	.venv/bin/python bench/provision.py
