"""Alembic migrations of the vote store (run by db.migrate at every start)."""
