"""The seed platform's tenants table as it was before regions.

On a pre-region platform DB this table already exists (with rows) and this
step leaves it untouched.

Revision ID: 0001
"""

from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE IF NOT EXISTS tenants (
      id UUID PRIMARY KEY,
      name TEXT NOT NULL,
      subdomain TEXT,
      plan_type TEXT,
      status TEXT DEFAULT 'active',
      connection_info JSONB,
      created_at TIMESTAMPTZ DEFAULT NOW(),
      updated_at TIMESTAMPTZ DEFAULT NOW()
    )
    """)
