"""Alembic environment: runs plain-SQL migrations on the connection that
pgfleet.platform.migrate hands over."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
