"""Servers: the CA their TLS certificate is verified by, and the password of
the probe role (the privilege-less role the reconciler uses to look inside a
database that has no live project). The sslmode default becomes verify-full.

Revision ID: 0008
"""

from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    op.execute("""
    ALTER TABLE servers ADD COLUMN IF NOT EXISTS sslrootcert TEXT;
    ALTER TABLE servers ADD COLUMN IF NOT EXISTS probe_password_enc TEXT;
    ALTER TABLE servers ALTER COLUMN sslmode SET DEFAULT 'verify-full';
    """)


def downgrade() -> None:
    op.execute("""
    ALTER TABLE servers ALTER COLUMN sslmode SET DEFAULT 'prefer';
    ALTER TABLE servers DROP COLUMN IF EXISTS probe_password_enc;
    ALTER TABLE servers DROP COLUMN IF EXISTS sslrootcert;
    """)
