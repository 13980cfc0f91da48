"""API tokens with an expiry and a scope: `all` (everything its owner may
do) or `read` (list, show and run read-only SQL; change nothing).

Revision ID: 0014
"""

from alembic import op

revision = "0014"
down_revision = "0013"


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE api_tokens ADD COLUMN IF NOT EXISTS expires_at TIMESTAMPTZ;
        ALTER TABLE api_tokens ADD COLUMN IF NOT EXISTS scope TEXT NOT NULL DEFAULT 'all'
            CHECK (scope IN ('all', 'read'));
        -- A changed expiry or scope reaches the SQL API's auth cache at once too.
        DROP TRIGGER IF EXISTS api_tokens_auth_notify ON api_tokens;
        CREATE TRIGGER api_tokens_auth_notify
          AFTER UPDATE OF revoked_at, token_hash, owner_id, expires_at, scope OR DELETE
          ON api_tokens
          FOR EACH ROW EXECUTE FUNCTION pgfleet_notify_auth('k');
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TRIGGER IF EXISTS api_tokens_auth_notify ON api_tokens;
        CREATE TRIGGER api_tokens_auth_notify
          AFTER UPDATE OF revoked_at, token_hash, owner_id OR DELETE ON api_tokens
          FOR EACH ROW EXECUTE FUNCTION pgfleet_notify_auth('k');
        ALTER TABLE api_tokens DROP COLUMN IF EXISTS scope;
        ALTER TABLE api_tokens DROP COLUMN IF EXISTS expires_at;
        """
    )
