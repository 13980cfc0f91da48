"""Each health check records how many prepared spares its server had ready
(the pgfleet_spares_ready gauge).

Revision ID: 0011
"""

from alembic import op

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    op.execute("ALTER TABLE server_health ADD COLUMN IF NOT EXISTS spares_ready INT")


def downgrade() -> None:
    op.execute("ALTER TABLE server_health DROP COLUMN IF EXISTS spares_ready")
