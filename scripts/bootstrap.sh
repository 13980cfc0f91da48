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

# PgBouncer, the routers in front of each region's server. pgfleet needs
# 1.24 or newer: it keeps pools with TLS to the servers through a RELOAD
# (1.18 dropped every TLS server login in progress on each one, failing
# other projects' clients whenever a project was created) and it limits
# client connections per database. Debian 13 ships 1.24; on Debian 12 (1.18)
# bootstrap builds Debian 13's own pgbouncer source package, with its
# security patches, fetched through apt (so Debian's signatures and
# checksums are verified), into /usr/local/lib/pgfleet/pgbouncer (as root)
# or .venv/opt/pgbouncer. Debian's service is stopped and disabled: pgfleet
# runs its routers itself.
PGBOUNCER_MIN=1.24
pgbouncer_ok() { # $1: a binary; true if it runs and is new enough
  local v
  [ -n "$1" ] && [ -x "$1" ] || return 1
  v=$("$1" --version 2>/dev/null | awk 'NR == 1 { print $2 }')
  [ -n "$v" ] && printf '%s\n%s\n' "$PGBOUNCER_MIN" "$v" | sort -V -C
}
pgbouncer_found() {
  # The virtualenv's build only for a user who is not root (root never runs
  # a binary from a working tree).
  local venv=""
  [ "$(id -u)" = 0 ] || venv="$PWD/.venv/opt/pgbouncer/bin/pgbouncer"
  for b in "${PGFLEET_PGBOUNCER:-}" /usr/local/lib/pgfleet/pgbouncer/bin/pgbouncer \
    $venv /usr/sbin/pgbouncer /usr/bin/pgbouncer /usr/local/bin/pgbouncer; do
    pgbouncer_ok "$b" && return 0
  done
  return 1
}
build_pgbouncer() { # $1: the prefix to install into
  local work apt_opts
  work=$(mktemp -d)
  mkdir -p "$work/parts" "$work/lists/partial" "$work/cache/archives/partial" "$work/src"
  cat >"$work/parts/pgbouncer.sources" <<'SOURCES'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: trixie-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  apt_opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/parts"
    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Debug::NoLocking=1
    -o APT::Sandbox::User="$(id -un)")
  apt-get "${apt_opts[@]}" update -qq
  (cd "$work/src" && apt-get "${apt_opts[@]}" source --download-only -qq pgbouncer >/dev/null)
  (
    cd "$work/src"
    tar xzf pgbouncer_*.orig.tar.gz
    cd pgbouncer-*/
    tar xJf ../pgbouncer_*.debian.tar.xz
    grep -v '^#' debian/patches/series | while read -r patch; do
      [ -n "$patch" ] && patch -p1 -s <"debian/patches/$patch"
    done
    ./configure --prefix="$1" --without-cares --with-systemd=no --with-pam=no >/dev/null
    make -s -j"$(nproc)" >/dev/null
    # Installed beside, then swapped in: a failed install leaves the old one.
    make -s install DESTDIR="$work/stage" >/dev/null
    mkdir -p "$(dirname "$1")"
    rm -rf "$1.old"
    if [ -e "$1" ]; then mv "$1" "$1.old"; fi
    mv "$work/stage$1" "$1"
    rm -rf "$1.old"
  )
  rm -rf "$work"
}
if ! pgbouncer_found; then
  if command -v apt-get >/dev/null 2>&1 && as_root; then
    if ! [ -x /usr/sbin/pgbouncer ]; then
      echo "bootstrap: installing PgBouncer with apt-get (the connection routers)"
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq pgbouncer >/dev/null
      if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now pgbouncer >/dev/null 2>&1 || true
      else
        $SUDO service pgbouncer stop >/dev/null 2>&1 || true
        $SUDO update-rc.d pgbouncer disable >/dev/null 2>&1 || true
      fi
    fi
  fi
fi
if ! pgbouncer_found; then
  if [ "$(id -u)" = 0 ]; then prefix=/usr/local/lib/pgfleet/pgbouncer; else prefix="$PWD/.venv/opt/pgbouncer"; fi
  if command -v apt-get >/dev/null 2>&1 && as_root; then
    echo "bootstrap: installing what building PgBouncer needs with apt-get"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq gcc make pkg-config patch \
      xz-utils libevent-dev libssl-dev >/dev/null
  fi
  if command -v apt-get >/dev/null 2>&1 && command -v gcc >/dev/null 2>&1 &&
    pkg-config --exists libevent openssl 2>/dev/null; then
    echo "bootstrap: building PgBouncer from Debian 13's source package into $prefix (Debian's is older than $PGBOUNCER_MIN)"
    build_pgbouncer "$prefix"
  fi
  if ! pgbouncer_found; then
    echo "bootstrap: the routers need PgBouncer $PGBOUNCER_MIN or newer: install Debian 13's" \
      "pgbouncer, or run this script as root to build it, or 'sudo apt-get install gcc make" \
      "pkg-config libevent-dev libssl-dev' and run it again (or set PGFLEET_ROUTERS=false" \
      "to run without routers)" >&2
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
