"""The one place that owns commit and rollback, and the retry of a whole transaction.

Every financial operation runs inside `atomic_financial_operation()`: it commits on
success and rolls back on any exception. `execute_with_retry()` re-runs a whole
transaction when the database reports a transient failure (classified by SQLSTATE),
never on a business error. `run_transaction()` is the two together, as callers use them.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from services.db import for_transactions
from services.errors import ConcurrentOperationError, TransactionIntegrityError
from services.settings import Settings

__all__ = [
    "RetryPolicy",
    "RetryStats",
    "retry_stats",
    "atomic_financial_operation",
    "current_connection",
    "execute_with_retry",
    "is_transient",
    "retry_policy",
    "run_transaction",
]

log = logging.getLogger("walletq.transactions")

_current: ContextVar[Connection | None] = ContextVar("walletq_connection", default=None)


def current_connection() -> Connection | None:
    """The connection of the transaction open in this context, if any."""
    return _current.get()


@contextmanager
def atomic_financial_operation(engine: Engine, label: str = "operation") -> Iterator[Connection]:
    """Open a transaction, or join the one already open: only the outermost level commits."""
    joined = _current.get()
    own = for_transactions(engine)
    if joined is not None:
        if joined.engine is not engine and joined.engine is not own:
            raise TransactionIntegrityError("nested operation on another database")
        yield joined
        return
    started = time.perf_counter()
    with own.connect() as conn:
        token = _current.set(conn)
        try:
            conn.begin()
            yield conn
            conn.commit()
            log.debug("commit %s in %.1f ms", label, (time.perf_counter() - started) * 1e3)
        except BaseException as exc:
            _rollback_quietly(conn)
            log.info("rollback %s: %s: %s", label, type(exc).__name__, exc)
            raise
        finally:
            _current.reset(token)


def _rollback_quietly(conn: Connection) -> None:
    # A connection lost mid-transaction cannot roll back; the server already did.
    try:
        conn.rollback()
    except DBAPIError:
        log.warning("rollback failed; the connection is gone", exc_info=True)


# --- retries ----------------------------------------------------------------------------

# Deadlock, serialization failure, lock timeout, and the server ending our connection.
_TRANSIENT_PGCODES = {"40P01", "40001", "55P03", "57P01", "57P02", "57P03"}
_TRANSIENT_PGCLASSES = {"08"}
_SQLITE_BUSY = ("database is locked", "database table is locked")


def is_transient(exc: BaseException) -> bool:
    """Whether a re-run of the whole transaction may succeed; classified by SQLSTATE."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    pgcode = getattr(exc.orig, "pgcode", None)
    if pgcode:
        return pgcode in _TRANSIENT_PGCODES or pgcode[:2] in _TRANSIENT_PGCLASSES
    message = str(exc.orig).lower()
    if any(text in message for text in _SQLITE_BUSY):
        return True
    # psycopg2 reports a dropped link without a SQLSTATE.
    return "server closed the connection" in message or "connection already closed" in message


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    backoff_s: float = 0.1
    backoff_s_max: float = 2.0

    def delay_s(self, failures: int) -> float:
        """Full jitter over 100 ms doubling to 2 s, so colliding retries spread out."""
        ceiling = min(self.backoff_s_max, self.backoff_s * 2 ** (failures - 1))
        return random.uniform(ceiling / 2, ceiling)


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(settings.retry_attempts, settings.retry_backoff_s,
                       settings.retry_backoff_s_max)


@dataclass
class RetryStats:
    """Counts retries process-wide, for the tests and benchmarks that report them."""

    retries: int = 0
    exhausted: int = 0


retry_stats = RetryStats()

T = TypeVar("T")


def execute_with_retry(
    operation: Callable[[], T],
    policy: RetryPolicy | None = None,
    *,
    label: str = "operation",
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `operation` (a whole transaction); re-run it on transient database errors only."""
    policy = policy or RetryPolicy()
    if _current.get() is not None:
        # Inside an open transaction a re-run of part of it is meaningless: the owner retries.
        return operation()
    failures = 0
    while True:
        try:
            return operation()
        except DBAPIError as exc:
            if not is_transient(exc):
                raise
            failures += 1
            pgcode = getattr(exc.orig, "pgcode", None)
            if failures >= policy.attempts:
                retry_stats.exhausted += 1
                log.warning("%s: transient error %s, %d attempts spent", label, pgcode, failures)
                raise ConcurrentOperationError(
                    f"{label}: transient database error ({pgcode or type(exc.orig).__name__}) "
                    f"persisted through {failures} attempts",
                    sqlstate=pgcode,
                ) from exc
            retry_stats.retries += 1
            delay_s = policy.delay_s(failures)
            log.info("%s: transient error %s, retry %d in %.3f s", label, pgcode, failures, delay_s)
            sleep(delay_s)


def run_transaction(
    engine: Engine, settings: Settings, label: str, body: Callable[[Connection], T]
) -> T:
    """`body` inside one transaction, re-run whole on transient database errors."""

    def attempt() -> T:
        with atomic_financial_operation(engine, label) as conn:
            return body(conn)

    return execute_with_retry(attempt, retry_policy(settings), label=label)


