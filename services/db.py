"""Engines: PostgreSQL with bounded waits on every connection, or embedded SQLite.

SQLite writers are serialised with BEGIN IMMEDIATE, so a read-then-debit cannot race.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine

from services import db_roles
from services.settings import Settings

__all__ = ["make_engine", "get_engine", "dispose_engines", "schema_is_current", "upgrade",
           "for_transactions"]

_engines: dict[str, Engine] = {}
#: Each PostgreSQL engine's twin without pre-ping, for transactions (see for_transactions).
_unpinged: dict[int, Engine] = {}
_lock = threading.Lock()


def for_transactions(engine: Engine) -> Engine:
    """The engine to run a retried transaction on: the same database, without the pre-ping
    round trip at every checkout. A transaction is re-run whole when its connection turns
    out dead (services.unit_of_work), so it does not need the ping that reads, which have
    no retry loop, do. An engine made elsewhere is its own."""
    return _unpinged.get(id(engine), engine)


def make_engine(settings: Settings, **kwargs: Any) -> Engine:
    url = settings.database_url
    if url.startswith("sqlite"):
        return _sqlite_engine(url, **kwargs)
    engine = _postgres_engine(settings, pre_ping=True, **dict(kwargs))
    _unpinged[id(engine)] = _postgres_engine(settings, pre_ping=False, **kwargs)
    return engine


def _postgres_engine(settings: Settings, *, pre_ping: bool, **kwargs: Any) -> Engine:
    url = settings.database_url
    options = (
        f"-c lock_timeout={settings.lock_timeout_ms} "
        f"-c statement_timeout={settings.statement_timeout_ms} "
        "-c idle_in_transaction_session_timeout=60000"
    )
    connect_args = {"options": options, "connect_timeout": 10, "application_name": "walletq"}
    return create_engine(
        url,
        connect_args=connect_args,
        # A pooled connection the server dropped (restart, pg_terminate_backend) is replaced
        # at checkout: reads have no retry loop around them. One round trip per checkout
        # (transactions use a twin without it: for_transactions).
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        pool_size=kwargs.pop("pool_size", 10),
        max_overflow=kwargs.pop("max_overflow", 20),
        isolation_level="READ COMMITTED",
        execution_options={"walletq_prepared": settings.prepared_statements},
        **kwargs,
    )


def _make_sqlite_folder(url: str) -> None:
    """The embedded database's folder (made 0700) and file (made 0600 before SQLite opens
    it; SQLite gives its journal and WAL files the database file's mode): the ledger is
    readable by its own user only."""
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite") else ""
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(path, 0o600)


def _sqlite_engine(url: str, **kwargs: Any) -> Engine:
    _make_sqlite_folder(url)
    kwargs.pop("pool_size", None)
    kwargs.pop("max_overflow", None)
    engine = create_engine(url, connect_args={"timeout": 30, "isolation_level": None}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Take the write lock at BEGIN: the balance read and the debit see one state.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def get_engine(settings: Settings) -> Engine:
    """One engine per database URL per process (disposed after a fork by the worker)."""
    with _lock:
        engine = _engines.get(settings.database_url)
        if engine is None:
            engine = _engines[settings.database_url] = make_engine(settings)
        return engine


def dispose_engines() -> None:
    """Drop pooled connections: a forked child must never share its parent's sockets."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)
            twin = _unpinged.pop(id(engine), None)
            if twin is not None:
                twin.dispose(close=False)
        _engines.clear()


def alembic_config(database_url: str) -> Any:
    from alembic.config import Config

    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Migrate; on PostgreSQL with walletq's roles in place, re-apply their grants, so a
    table a migration adds is reachable at once by exactly the roles that should reach it."""
    from alembic import command

    _make_sqlite_folder(settings.database_url)
    command.upgrade(alembic_config(settings.database_url), revision)
    if settings.is_postgres:
        engine = make_engine(settings, pool_size=1)
        try:
            with engine.begin() as conn:
                if db_roles.roles_exist(conn):
                    db_roles.apply_grants(conn)
        finally:
            engine.dispose()


def schema_is_current(engine: Engine) -> bool:
    """Whether the migrations have been applied (every table present)."""
    from services.schema import metadata

    names = set(inspect(engine).get_table_names())
    return all(table in names for table in metadata.tables)
