"""Backups: a project's residency rule, and its snapshots (pg_dump files in
its server's backup region, with what was checked about them).

Revision ID: 0012
"""

from alembic import op

revision = "0012"
down_revision = "0011"


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE tenants ADD COLUMN IF NOT EXISTS residency TEXT
            CHECK (residency IN ('eu', 'us', 'apac'));
        ALTER TABLE tenants ADD COLUMN IF NOT EXISTS restored_from JSONB;
        CREATE TABLE IF NOT EXISTS snapshots (
            id UUID PRIMARY KEY,
            tenant_id UUID NOT NULL REFERENCES tenants(id),
            owner_id UUID,
            operation_id UUID,
            reason TEXT NOT NULL CHECK (reason IN ('manual', 'scheduled', 'safety')),
            status TEXT NOT NULL DEFAULT 'running'
                CHECK (status IN ('running', 'ok', 'failed', 'expired')),
            server_name TEXT,
            source_region TEXT,
            storage_region TEXT NOT NULL,
            path TEXT NOT NULL,
            size_bytes BIGINT,
            sha256 TEXT,
            pg_version TEXT,
            tables JSONB,
            error TEXT,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            finished_at TIMESTAMPTZ
        );
        CREATE INDEX IF NOT EXISTS snapshots_tenant ON snapshots (tenant_id, created_at DESC);
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE IF EXISTS snapshots;
        ALTER TABLE tenants DROP COLUMN IF EXISTS restored_from;
        ALTER TABLE tenants DROP COLUMN IF EXISTS residency;
        """
    )
