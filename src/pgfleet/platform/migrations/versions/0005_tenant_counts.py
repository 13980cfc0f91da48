"""tenant_counts: live counters of projects by region, hosting region,
server, plan and status, kept by statement-level triggers on tenants, so
placement and statistics read a few dozen rows instead of scanning every
tenant.

NULLs are stored as '' / 0 (they are part of the key).

Revision ID: 0005
"""

from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.execute("""
    CREATE TABLE tenant_counts (
      region TEXT NOT NULL,
      hosted_region TEXT NOT NULL,
      server_id INT NOT NULL,
      plan_type TEXT NOT NULL,
      status TEXT NOT NULL,
      n BIGINT NOT NULL,
      PRIMARY KEY (region, hosted_region, server_id, plan_type, status)
    );

    CREATE FUNCTION pgfleet_tenant_counts_apply() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO tenant_counts AS c (region, hosted_region, server_id, plan_type, status, n)
        SELECT coalesce(region, ''), coalesce(hosted_region, ''), coalesce(server_id, 0),
               coalesce(plan_type, ''), coalesce(status, ''), -count(*)
        FROM old_rows GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
        ON CONFLICT (region, hosted_region, server_id, plan_type, status)
        DO UPDATE SET n = c.n + EXCLUDED.n;
      END IF;
      IF TG_OP IN ('UPDATE', 'INSERT') THEN
        INSERT INTO tenant_counts AS c (region, hosted_region, server_id, plan_type, status, n)
        SELECT coalesce(region, ''), coalesce(hosted_region, ''), coalesce(server_id, 0),
               coalesce(plan_type, ''), coalesce(status, ''), count(*)
        FROM new_rows GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
        ON CONFLICT (region, hosted_region, server_id, plan_type, status)
        DO UPDATE SET n = c.n + EXCLUDED.n;
      END IF;
      RETURN NULL;
    END
    $$;

    CREATE TRIGGER tenant_counts_insert AFTER INSERT ON tenants
      REFERENCING NEW TABLE AS new_rows
      FOR EACH STATEMENT EXECUTE FUNCTION pgfleet_tenant_counts_apply();
    CREATE TRIGGER tenant_counts_update AFTER UPDATE ON tenants
      REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
      FOR EACH STATEMENT EXECUTE FUNCTION pgfleet_tenant_counts_apply();
    CREATE TRIGGER tenant_counts_delete AFTER DELETE ON tenants
      REFERENCING OLD TABLE AS old_rows
      FOR EACH STATEMENT EXECUTE FUNCTION pgfleet_tenant_counts_apply();

    LOCK TABLE tenants IN SHARE MODE;
    INSERT INTO tenant_counts (region, hosted_region, server_id, plan_type, status, n)
    SELECT coalesce(region, ''), coalesce(hosted_region, ''), coalesce(server_id, 0),
           coalesce(plan_type, ''), coalesce(status, ''), count(*)
    FROM tenants GROUP BY 1, 2, 3, 4, 5;
    """)
