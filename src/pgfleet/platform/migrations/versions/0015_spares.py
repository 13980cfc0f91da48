"""Prepared spares known to the platform DB: each has its project id and
its passwords (encrypted) ahead, so it is made under its final names and
routed before any create takes it (tenants/spares.py).

A spare's `state`: `making` while its refill makes it (one left there by a
crash is dropped once it is stale), `made` once it is whole on its server
(the routers may learn it from then on), `ready` once its refill has told
every router (only then may a create take it, in the transaction that
inserts its project: the project's id is the spare's), `drop` when a
create gave it back (cancelled before it started; the next refill of its
server drops it).

Revision ID: 0015
"""

from alembic import op

revision = "0015"
down_revision = "0014"


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE IF NOT EXISTS spares (
          id UUID PRIMARY KEY,
          server_id INT NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
          password_enc TEXT NOT NULL,
          ro_password_enc TEXT NOT NULL,
          state TEXT NOT NULL DEFAULT 'making'
            CHECK (state IN ('making', 'made', 'ready', 'drop')),
          created_at TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE INDEX IF NOT EXISTS spares_ready ON spares (server_id, created_at)
          WHERE state = 'ready';
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS spares")
