"""Query insights for all traffic: each project's statements as its server's
pg_stat_statements counts them (every client, not only the SQL API), and
when each server was last sampled and what that cost.

Revision ID: 0013
"""

from alembic import op

revision = "0013"
down_revision = "0012"


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE IF NOT EXISTS statement_stats (
            tenant_id UUID NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
            queryid BIGINT NOT NULL,
            query TEXT NOT NULL,
            calls BIGINT NOT NULL,
            total_ms DOUBLE PRECISION NOT NULL,
            rows BIGINT NOT NULL,
            shared_blks_hit BIGINT NOT NULL,
            shared_blks_read BIGINT NOT NULL,
            first_seen TIMESTAMPTZ NOT NULL DEFAULT now(),
            sampled_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            -- When the server stopped showing it (evicted, reset): kept a
            -- while with its last figures, then dropped.
            gone_at TIMESTAMPTZ,
            PRIMARY KEY (tenant_id, queryid)
        );
        CREATE TABLE IF NOT EXISTS statement_samples (
            server_id INT PRIMARY KEY REFERENCES servers(id) ON DELETE CASCADE,
            sampled_at TIMESTAMPTZ NOT NULL,
            duration_ms DOUBLE PRECISION NOT NULL,
            statements INT NOT NULL,
            changed INT NOT NULL,
            error TEXT
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS statement_samples; DROP TABLE IF EXISTS statement_stats;")
