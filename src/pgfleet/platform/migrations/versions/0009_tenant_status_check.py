"""tenants.status is one of the statuses pgfleet knows, checked by the
database (as operations.status already is).

A platform DB upgraded from the seed may hold rows with other values; they
are kept as they are (the constraint is then left NOT VALID, and checks new
and changed rows only), with a notice naming how many.

Revision ID: 0009
"""

from alembic import op

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    op.execute("""
    DO $$
    DECLARE other bigint;
    BEGIN
      IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'tenants_status_check') THEN
        ALTER TABLE tenants ADD CONSTRAINT tenants_status_check CHECK (status IN
          ('provisioning', 'active', 'paused', 'failed', 'deleting', 'deleted')) NOT VALID;
        SELECT count(*) INTO other FROM tenants WHERE status NOT IN
          ('provisioning', 'active', 'paused', 'failed', 'deleting', 'deleted');
        IF other = 0 THEN
          ALTER TABLE tenants VALIDATE CONSTRAINT tenants_status_check;
        ELSE
          RAISE NOTICE 'tenants_status_check left NOT VALID: % row(s) have another status', other;
        END IF;
      END IF;
    END $$;
    """)


def downgrade() -> None:
    op.execute("ALTER TABLE tenants DROP CONSTRAINT IF EXISTS tenants_status_check")
