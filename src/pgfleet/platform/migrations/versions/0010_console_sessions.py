"""Console sessions are rows, so signing out ends a session on the server:
a copy of the cookie taken before stops working too.

Revision ID: 0010
"""

from alembic import op

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    op.execute("""
    CREATE TABLE IF NOT EXISTS console_sessions (
      id uuid PRIMARY KEY,
      owner_id uuid NOT NULL REFERENCES owners (id) ON DELETE CASCADE,
      token_id uuid NOT NULL REFERENCES api_tokens (id) ON DELETE CASCADE,
      created_at timestamptz NOT NULL DEFAULT now(),
      expires_at timestamptz NOT NULL,
      ended_at timestamptz
    );
    CREATE INDEX IF NOT EXISTS console_sessions_expires ON console_sessions (expires_at);
    """)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS console_sessions")
