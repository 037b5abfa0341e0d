"""PostgreSQL statistics a test may read, once they are final.

A backend keeps its counters (deadlocks among them) to itself and flushes them to the
shared statistics at most once a second, and later when idle; it always flushes when it
exits, before it leaves pg_stat_activity. So a count is final once every client backend
that worked on the database has gone.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Engine

from services.db import for_transactions
from tests.support.polling import eventually

__all__ = ["client_backends", "close_connections", "settled_deadlocks"]


def _backends(admin: Engine, database: str) -> list[tuple[object, ...]]:
    with admin.connect() as conn:
        return [tuple(row) for row in conn.execute(text(
            "SELECT pid, application_name, client_addr, state, left(query, 80)"
            " FROM pg_stat_activity WHERE datname = :db"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"), {"db": database})]


def client_backends(admin: Engine, database: str) -> int:
    """Client connections to `database`, other than the admin's own."""
    with admin.connect() as conn:
        return int(conn.execute(text(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = :db"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"),
            {"db": database}).scalar_one())


def close_connections(engine: Engine) -> None:
    """Close the engine's pooled connections, and its twin's (services.db.for_transactions)."""
    for_transactions(engine).dispose()
    engine.dispose()


def settled_deadlocks(admin: Engine, database: str, deadline_s: float = 30) -> int:
    """pg_stat_database.deadlocks of `database` once no client is connected to it (the
    caller closes its own connections first: close_connections(engine), workers stopped)."""
    eventually(lambda: client_backends(admin, database) == 0, deadline_s,
               describe=lambda: _backends(admin, database))
    with admin.connect() as conn:
        return int(conn.execute(text("SELECT deadlocks FROM pg_stat_database WHERE datname = :db"),
                                {"db": database}).scalar_one())
