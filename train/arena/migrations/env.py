"""Alembic environment: migrations run on the connection db.migrate hands over (no alembic.ini, no URL here)."""

from alembic import context

context.configure(connection=context.config.attributes["connection"], target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
