# The two commands: `make up` runs pgfleet on its embedded fleet,
# `make test` runs the whole suite (ruff, mypy, pytest). Both set up
# everything they need first.
.PHONY: up down status test lint bootstrap bench

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
	.venv/bin/pytest

bench: bootstrap
	.venv/bin/python bench/provision.py
