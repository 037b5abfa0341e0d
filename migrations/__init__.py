"""Alembic migrations for walletq's schema; run them with `walletq db upgrade`."""
