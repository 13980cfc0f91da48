#!/usr/bin/env bash
# Sets up everything pgfleet needs on a fresh Debian machine: a virtualenv with
# the project and its dev tools, and PostgreSQL server binaries if none exist.
# With --with-browser (what `make test` uses) also Debian's chromium, which
# the console's browser tests drive through Playwright.
# Safe to run again: each step checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

# How to run a command as root: nothing as root, `sudo -n` where sudo works
# without a password, else unset (the caller says what to install by hand).
as_root() {
  if [ "$(id -u)" = 0 ]; then
    SUDO=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    return 1
  fi
}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.pgfleet-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing Python packages"
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e '.[dev]'
  touch "$stamp"
fi

# PostgreSQL binaries: system ones (PATH, pg_config, /usr/lib/postgresql/*/bin)
# are preferred; otherwise install Debian's packages when we can, and fall
# back to the pgserver wheel (PostgreSQL 16 binaries from PyPI).
if ! .venv/bin/python -m pgfleet.fleet.binaries >/dev/null 2>&1; then
  installed=no
  if command -v apt-get >/dev/null 2>&1; then
    if as_root; then
      echo "bootstrap: installing PostgreSQL server packages with apt-get"
      # Do not let the Debian package create and start its own cluster.
      $SUDO mkdir -p /etc/postgresql-common
      if [ ! -f /etc/postgresql-common/createcluster.conf ]; then
        echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
      fi
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null && installed=yes
    fi
  fi
  if [ "$installed" = no ]; then
    echo "bootstrap: installing PostgreSQL binaries from the pgserver wheel"
    .venv/bin/pip install --quiet -e '.[dev,pgserver]'
  fi
  .venv/bin/python -m pgfleet.fleet.binaries
fi

# pgBackRest, the servers' continuous archiving and base backups (Debian's
# package; it has no service of its own).
pgbackrest_found() {
  for b in "${PGFLEET_PGBACKREST:-}" /usr/bin/pgbackrest /usr/local/bin/pgbackrest; do
    [ -n "$b" ] && [ -x "$b" ] && return 0
  done
  return 1
}
if ! pgbackrest_found; then
  if command -v apt-get >/dev/null 2>&1 && as_root; then
    echo "bootstrap: installing pgBackRest with apt-get (continuous backups)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq pgbackrest >/dev/null
  else
    echo "bootstrap: backups need pgBackRest: run 'sudo apt-get install pgbackrest'" \
      "(or set PGFLEET_BACKUPS=false to run without continuous backups)" >&2
  fi
fi

# PgBouncer, the routers in front of each region's server (Debian's package).
# Its own service is stopped and disabled: pgfleet runs its routers itself.
pgbouncer_found() {
  for b in "${PGFLEET_PGBOUNCER:-}" /usr/sbin/pgbouncer /usr/bin/pgbouncer /usr/local/bin/pgbouncer; do
    [ -n "$b" ] && [ -x "$b" ] && return 0
  done
  return 1
}
if ! pgbouncer_found; then
  if command -v apt-get >/dev/null 2>&1 && as_root; then
    echo "bootstrap: installing PgBouncer with apt-get (the connection routers)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq pgbouncer >/dev/null
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
      $SUDO systemctl disable --now pgbouncer >/dev/null 2>&1 || true
    else
      $SUDO service pgbouncer stop >/dev/null 2>&1 || true
      $SUDO update-rc.d pgbouncer disable >/dev/null 2>&1 || true
    fi
  else
    echo "bootstrap: the routers need PgBouncer: run 'sudo apt-get install pgbouncer'" \
      "(or set PGFLEET_ROUTERS=false to run without routers)" >&2
    exit 1
  fi
fi

# chromium, and a colour emoji font so the region flags show in screenshots.
if [ "${1:-}" = "--with-browser" ] && { ! command -v chromium >/dev/null 2>&1 ||
  [ ! -e /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ]; }; then
  if ! as_root; then
    echo "bootstrap: the browser tests need Debian's chromium: run 'sudo apt-get install chromium fonts-noto-color-emoji'" >&2
    exit 1
  fi
  echo "bootstrap: installing chromium with apt-get (for the browser tests)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null
fi

# Node.js and the HTTP driver tests' packages (tests/driver: the Neon
# serverless driver, pinned, and node-postgres as the reference), for `make
# test` too. Debian's nodejs has no npm of its own; NodeSource's has one.
if [ "${1:-}" = "--with-browser" ]; then
  want=""
  command -v node >/dev/null 2>&1 || want="nodejs"
  command -v npm >/dev/null 2>&1 || want="$want npm"
  if [ -n "$want" ]; then
    if ! as_root; then
      echo "bootstrap: the driver tests need Node.js: run 'sudo apt-get install$want'" >&2
      exit 1
    fi
    echo "bootstrap: installing$want with apt-get (for the HTTP driver tests)"
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086  # one word per package
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $want >/dev/null
  fi
  if [ ! -f tests/driver/node_modules/.package-lock.json ] ||
    [ tests/driver/package-lock.json -nt tests/driver/node_modules/.package-lock.json ]; then
    echo "bootstrap: installing the HTTP driver tests' npm packages"
    (cd tests/driver && npm ci --no-audit --no-fund --loglevel=error)
  fi
fi
