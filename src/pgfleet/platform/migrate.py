"""Apply the platform DB migrations (Alembic, plain SQL steps).

Migrations run under a session advisory lock, so several processes starting
at once apply them exactly once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL

MIGRATIONS = Path(__file__).parent / "migrations"
_LOCK_KEY = 0x7067666C656574  # "pgfleet"


def _url(conninfo: dict[str, Any]) -> URL:
    return URL.create(
        "postgresql+psycopg",
        username=conninfo.get("user"),
        password=conninfo.get("password"),
        host=conninfo.get("host"),
        port=int(conninfo["port"]) if conninfo.get("port") else None,
        database=conninfo.get("dbname"),
        query={
            k: str(conninfo[k])
            for k in ("sslmode", "sslrootcert", "sslcert", "sslkey")
            if conninfo.get(k)
        },
    )


def head() -> str:
    """The newest revision the migrations define."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    rev = ScriptDirectory.from_config(cfg).get_current_head()
    assert rev is not None
    return rev


def upgrade(conninfo: dict[str, Any], revision: str = "head") -> None:
    engine = sqlalchemy.create_engine(_url(conninfo), poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_KEY})
            conn.commit()
            try:
                cfg = Config()
                cfg.set_main_option("script_location", str(MIGRATIONS))
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
                conn.commit()
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
                conn.commit()
    finally:
        engine.dispose()


def current(conninfo: dict[str, Any]) -> str | None:
    engine = sqlalchemy.create_engine(_url(conninfo), poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            exists = conn.execute(
                sqlalchemy.text("SELECT to_regclass('alembic_version') IS NOT NULL")
            ).scalar()
            if not exists:
                return None
            return conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()
