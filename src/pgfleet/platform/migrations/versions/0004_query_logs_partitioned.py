"""query_logs partitioned by day (with a default partition for stragglers and
rows from before), per-minute rollups for fleet-wide statistics, and server
health history.

Revision ID: 0004
"""

from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.execute("""
    ALTER TABLE query_logs RENAME TO query_logs_unpartitioned;
    ALTER INDEX IF EXISTS query_logs_pkey RENAME TO query_logs_unpartitioned_pkey;
    ALTER INDEX IF EXISTS query_logs_executed_at_idx RENAME TO query_logs_unpartitioned_at_idx;
    ALTER INDEX IF EXISTS query_logs_tenant_idx RENAME TO query_logs_unpartitioned_tenant_idx;

    CREATE TABLE query_logs (
      id BIGINT NOT NULL DEFAULT nextval('query_logs_id_seq'),
      tenant_id UUID NOT NULL,
      region TEXT,
      hosted_region TEXT,
      server_id INT,
      route TEXT CHECK (route IN ('rw', 'ro')),
      execution_time_ms DOUBLE PRECISION NOT NULL,
      row_count BIGINT,
      outcome TEXT NOT NULL DEFAULT 'ok',
      fingerprint TEXT,
      executed_at TIMESTAMPTZ NOT NULL DEFAULT now()
    ) PARTITION BY RANGE (executed_at);
    ALTER SEQUENCE query_logs_id_seq OWNED BY query_logs.id;
    CREATE TABLE query_logs_default PARTITION OF query_logs DEFAULT;
    CREATE INDEX query_logs_executed_at_idx ON query_logs (executed_at);
    CREATE INDEX query_logs_tenant_idx ON query_logs (tenant_id, executed_at);

    INSERT INTO query_logs (id, tenant_id, region, hosted_region, server_id, route,
                            execution_time_ms, row_count, outcome, fingerprint, executed_at)
      SELECT id, tenant_id, region, hosted_region, server_id, route, execution_time_ms,
             row_count, outcome, fingerprint, executed_at
      FROM query_logs_unpartitioned;
    DROP TABLE query_logs_unpartitioned;

    -- Hourly rollups by region and route; hist[i] counts statements whose
    -- duration falls in bucket i of pgfleet.monitoring.histogram.
    CREATE TABLE query_log_rollups (
      bucket TIMESTAMPTZ NOT NULL,
      region TEXT NOT NULL,
      hosted_region TEXT NOT NULL,
      route TEXT NOT NULL,
      count BIGINT NOT NULL,
      errors BIGINT NOT NULL,
      sum_ms DOUBLE PRECISION NOT NULL,
      hist BIGINT[] NOT NULL,
      PRIMARY KEY (bucket, region, hosted_region, route)
    );

    CREATE FUNCTION pgfleet_hist_add(a BIGINT[], b BIGINT[]) RETURNS BIGINT[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
      SELECT CASE WHEN a IS NULL THEN b WHEN b IS NULL THEN a ELSE
        ARRAY(SELECT coalesce(x, 0) + coalesce(y, 0) FROM unnest(a, b) AS u(x, y)) END
    $$;
    CREATE AGGREGATE pgfleet_hist_sum(BIGINT[]) (SFUNC = pgfleet_hist_add, STYPE = BIGINT[]);

    CREATE TABLE server_health (
      id BIGSERIAL PRIMARY KEY,
      server_id INT NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
      checked_at TIMESTAMPTZ NOT NULL DEFAULT now(),
      ok BOOLEAN NOT NULL,
      latency_ms DOUBLE PRECISION,
      version TEXT,
      connections_used INT,
      connections_max INT,
      databases INT,
      tenant_databases INT,
      bytes_used BIGINT,
      error TEXT
    );
    CREATE INDEX server_health_server_idx ON server_health (server_id, checked_at DESC);

    -- Covers the statistics' single pass over tenants (index-only scans).
    CREATE INDEX IF NOT EXISTS tenants_stats_idx
      ON tenants (region, hosted_region, server_id, plan_type, status);
    """)
