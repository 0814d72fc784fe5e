"""Alembic environment and revisions for bitbench (run through ``service.db.migrate``)."""
