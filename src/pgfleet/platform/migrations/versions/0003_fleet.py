"""Regions, servers, owners and API tokens, placement columns on tenants,
and query_logs.

Revision ID: 0003
"""

from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.execute("""
    CREATE TABLE IF NOT EXISTS regions (
      id TEXT PRIMARY KEY,
      name TEXT NOT NULL,
      flag TEXT NOT NULL,
      sort_order INT NOT NULL
    );
    INSERT INTO regions (id, name, flag, sort_order) VALUES
      ('us-east-1', 'US East (N. Virginia)', U&'\\+01F1FA\\+01F1F8', 1),
      ('us-west-1', 'US West (N. California)', U&'\\+01F1FA\\+01F1F8', 2),
      ('eu-central-1', 'EU Central (Frankfurt)', U&'\\+01F1EA\\+01F1FA', 3),
      ('eu-west-1', 'EU West (Ireland)', U&'\\+01F1EA\\+01F1FA', 4),
      ('ap-southeast-1', 'Asia Pacific (Singapore)', U&'\\+01F1F8\\+01F1EC', 5),
      ('ap-northeast-1', 'Asia Pacific (Tokyo)', U&'\\+01F1EF\\+01F1F5', 6)
    ON CONFLICT (id) DO UPDATE
      SET name = EXCLUDED.name, flag = EXCLUDED.flag, sort_order = EXCLUDED.sort_order;

    CREATE TABLE IF NOT EXISTS servers (
      id SERIAL PRIMARY KEY,
      name TEXT NOT NULL UNIQUE,
      region TEXT NOT NULL REFERENCES regions(id),
      host TEXT NOT NULL,
      port INT NOT NULL CHECK (port BETWEEN 1 AND 65535),
      admin_user TEXT NOT NULL,
      admin_password_enc TEXT NOT NULL,
      admin_database TEXT NOT NULL DEFAULT 'postgres',
      sslmode TEXT NOT NULL DEFAULT 'prefer',
      capacity INT NOT NULL CHECK (capacity > 0),
      is_primary BOOLEAN NOT NULL DEFAULT false,
      enabled BOOLEAN NOT NULL DEFAULT true,
      embedded BOOLEAN NOT NULL DEFAULT false,
      created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
      updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE INDEX IF NOT EXISTS servers_region_idx ON servers(region);

    CREATE TABLE IF NOT EXISTS owners (
      id UUID PRIMARY KEY,
      name TEXT NOT NULL,
      is_admin BOOLEAN NOT NULL DEFAULT false,
      created_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );

    CREATE TABLE IF NOT EXISTS api_tokens (
      id UUID PRIMARY KEY,
      owner_id UUID NOT NULL REFERENCES owners(id) ON DELETE CASCADE,
      name TEXT NOT NULL,
      token_hash BYTEA NOT NULL UNIQUE,
      token_prefix TEXT NOT NULL,
      created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
      last_used_at TIMESTAMPTZ,
      revoked_at TIMESTAMPTZ
    );
    CREATE INDEX IF NOT EXISTS api_tokens_owner_idx ON api_tokens(owner_id);

    ALTER TABLE tenants
      ADD COLUMN IF NOT EXISTS owner_id UUID REFERENCES owners(id),
      ADD COLUMN IF NOT EXISTS server_id INT REFERENCES servers(id),
      ADD COLUMN IF NOT EXISTS hosted_region TEXT,
      ADD COLUMN IF NOT EXISTS placement_reason TEXT,
      ADD COLUMN IF NOT EXISTS error TEXT,
      ADD COLUMN IF NOT EXISTS deleted_at TIMESTAMPTZ;
    CREATE INDEX IF NOT EXISTS tenants_owner_idx ON tenants(owner_id);
    CREATE INDEX IF NOT EXISTS tenants_server_idx ON tenants(server_id);
    CREATE UNIQUE INDEX IF NOT EXISTS tenants_subdomain_live_key
      ON tenants (lower(subdomain)) WHERE status <> 'deleted' AND subdomain IS NOT NULL;

    CREATE TABLE IF NOT EXISTS query_logs (
      id BIGSERIAL PRIMARY KEY,
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
    );
    CREATE INDEX IF NOT EXISTS query_logs_executed_at_idx ON query_logs(executed_at);
    CREATE INDEX IF NOT EXISTS query_logs_tenant_idx ON query_logs(tenant_id, executed_at);
    """)
