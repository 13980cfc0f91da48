"""Change notifications for the SQL API's authentication cache.

API processes keep (token, project) lookups in memory for a few seconds; a
revoked token, a changed owner, or a project whose status, credentials,
plan or owner changed is announced on the `pgfleet_auth` channel
('k:<token id>', 'o:<owner id>', 't:<project id>'), after commit, so every
process drops those entries at once. api_tokens.last_used_at updates do not
notify.

Revision ID: 0007
"""

from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.execute("""
    CREATE FUNCTION pgfleet_notify_auth() RETURNS trigger
    LANGUAGE plpgsql AS $$
    DECLARE
      r record;
    BEGIN
      IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
      PERFORM pg_notify('pgfleet_auth', TG_ARGV[0] || ':' || r.id::text);
      RETURN NULL;
    END $$;

    CREATE TRIGGER api_tokens_auth_notify
      AFTER UPDATE OF revoked_at, token_hash, owner_id OR DELETE ON api_tokens
      FOR EACH ROW EXECUTE FUNCTION pgfleet_notify_auth('k');
    CREATE TRIGGER owners_auth_notify
      AFTER UPDATE OR DELETE ON owners
      FOR EACH ROW EXECUTE FUNCTION pgfleet_notify_auth('o');
    CREATE TRIGGER tenants_auth_notify
      AFTER UPDATE OF status, connection_info, owner_id, plan_type, region ON tenants
      FOR EACH ROW
      WHEN ((OLD.status, OLD.connection_info, OLD.owner_id, OLD.plan_type, OLD.region)
            IS DISTINCT FROM
            (NEW.status, NEW.connection_info, NEW.owner_id, NEW.plan_type, NEW.region))
      EXECUTE FUNCTION pgfleet_notify_auth('t');
    CREATE TRIGGER tenants_auth_notify_delete
      AFTER DELETE ON tenants
      FOR EACH ROW EXECUTE FUNCTION pgfleet_notify_auth('t');
    """)


def downgrade() -> None:
    op.execute("""
    DROP TRIGGER tenants_auth_notify_delete ON tenants;
    DROP TRIGGER tenants_auth_notify ON tenants;
    DROP TRIGGER owners_auth_notify ON owners;
    DROP TRIGGER api_tokens_auth_notify ON api_tokens;
    DROP FUNCTION pgfleet_notify_auth();
    """)
