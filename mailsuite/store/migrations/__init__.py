"""Alembic migrations for the mail store, applied at every start by store.engine.migrate()."""
