"""The seed's region migration: add tenants.region, index it, backfill.

Upgrades a pre-region platform DB in place; every statement is a no-op when
run again.

Revision ID: 0002
"""

from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.execute("ALTER TABLE tenants ADD COLUMN IF NOT EXISTS region TEXT DEFAULT 'us-east-1'")
    op.execute("CREATE INDEX IF NOT EXISTS tenants_region_idx ON tenants(region)")
    op.execute("UPDATE tenants SET region = 'us-east-1' WHERE region IS NULL")
