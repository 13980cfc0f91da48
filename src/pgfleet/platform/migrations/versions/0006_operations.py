"""Durable operations: the procrastinate job queue, operations and their
steps, idempotency keys and the audit log.

The queue's schema is the one shipped by the pinned procrastinate release
(its `schema.sql`), applied as is; a later procrastinate upgrade adds its own
migration files as further revisions here.

Revision ID: 0006
"""

from importlib import resources

from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    schema = resources.files("procrastinate.sql").joinpath("schema.sql").read_text()
    # Straight to psycopg, without parameters: the schema is plain SQL (it has
    # literal % signs), in the migration's transaction.
    driver = op.get_bind().connection.driver_connection
    assert driver is not None
    driver.execute(schema)

    op.execute("""
    ALTER TABLE tenants ADD COLUMN IF NOT EXISTS paused_at TIMESTAMPTZ;

    CREATE TABLE operations (
      id UUID PRIMARY KEY,
      tenant_id UUID REFERENCES tenants(id) ON DELETE CASCADE,
      owner_id UUID,
      type TEXT NOT NULL,
      status TEXT NOT NULL DEFAULT 'scheduled'
        CHECK (status IN ('scheduled', 'running', 'finished', 'failed', 'cancelled')),
      params JSONB NOT NULL DEFAULT '{}',
      result JSONB,
      current_step TEXT,
      attempts INT NOT NULL DEFAULT 0,
      error TEXT,
      actor TEXT,
      job_id BIGINT,
      worker TEXT,
      cancel_requested BOOLEAN NOT NULL DEFAULT false,
      deadline TIMESTAMPTZ NOT NULL,
      deadline_missed BOOLEAN NOT NULL DEFAULT false,
      created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
      started_at TIMESTAMPTZ,
      finished_at TIMESTAMPTZ,
      updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    -- One unfinished operation per project, enforced by the database, so two
    -- API processes cannot both start one.
    CREATE UNIQUE INDEX operations_one_active_per_tenant ON operations (tenant_id)
      WHERE status IN ('scheduled', 'running');
    CREATE INDEX operations_tenant_created_idx ON operations (tenant_id, created_at DESC);
    CREATE INDEX operations_unfinished_idx ON operations (created_at)
      WHERE status IN ('scheduled', 'running');

    CREATE TABLE operation_steps (
      operation_id UUID NOT NULL REFERENCES operations(id) ON DELETE CASCADE,
      position INT NOT NULL,
      name TEXT NOT NULL,
      status TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed', 'skipped')),
      attempts INT NOT NULL DEFAULT 1,
      error TEXT,
      started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
      finished_at TIMESTAMPTZ,
      PRIMARY KEY (operation_id, position)
    );

    CREATE TABLE idempotency_keys (
      owner_id UUID NOT NULL,
      key TEXT NOT NULL,
      method TEXT NOT NULL,
      path TEXT NOT NULL,
      request_hash TEXT NOT NULL,
      status_code INT,
      response JSONB,
      created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
      PRIMARY KEY (owner_id, key)
    );
    CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);

    CREATE TABLE audit_log (
      id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
      at TIMESTAMPTZ NOT NULL DEFAULT now(),
      owner_id UUID,
      actor TEXT NOT NULL,
      action TEXT NOT NULL,
      tenant_id UUID,
      operation_id UUID,
      details JSONB NOT NULL DEFAULT '{}'
    );
    CREATE INDEX audit_log_tenant_idx ON audit_log (tenant_id, at DESC);
    CREATE INDEX audit_log_at_idx ON audit_log (at DESC);

    CREATE TABLE reconcile_runs (
      id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
      at TIMESTAMPTZ NOT NULL DEFAULT now(),
      actor TEXT NOT NULL,
      repair BOOLEAN NOT NULL,
      force BOOLEAN NOT NULL,
      duration_ms FLOAT8 NOT NULL,
      findings JSONB NOT NULL
    );
    """)
