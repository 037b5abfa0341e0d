"""Errors, the transaction boundary, the retry loop, the balance check and the audit row.

This module owns commit and rollback: every financial operation runs inside
`atomic_financial_operation()`, and `execute_with_retry()` re-runs a whole
transaction when the database reports a transient failure — never a business error.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from services import schema

__all__ = [
    "FinancialIntegrityError",
    "InvalidCommandError",
    "InsufficientBalanceError",
    "NegativeBalanceError",
    "UnknownUserError",
    "UnknownHoldError",
    "HoldNotOpenError",
    "HoldExistsError",
    "ForbiddenError",
    "IdempotencyConflictError",
    "TransactionIntegrityError",
    "ConcurrentOperationError",
    "EscrowIntegrityError",
    "RetryPolicy",
    "atomic_financial_operation",
    "current_connection",
    "execute_with_retry",
    "is_transient",
    "validate_balance_integrity",
    "log_financial_operation",
]

log = logging.getLogger("walletq.transactions")
audit_log = logging.getLogger("walletq.audit")


# --- errors -----------------------------------------------------------------------------


class FinancialIntegrityError(Exception):
    """Root of every walletq error; carries a DESIGN.md error code and the ids involved."""

    code = "internal"
    #: A business refusal is recorded as `rejected` and never retried.
    business = False

    def __init__(self, message: str, **ids: Any) -> None:
        super().__init__(message)
        self.message = message
        self.ids = {k: v for k, v in ids.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


class BusinessRuleError(FinancialIntegrityError):
    """Raised when a rule of the ledger refuses a well-formed command; nothing moves."""

    business = True


class InvalidCommandError(BusinessRuleError):
    """Raised when a command is malformed: bad JSON, a wrong type, an unknown field."""

    code = "invalid_command"

    def __init__(self, message: str, errors: Sequence[dict[str, Any]] = (), **ids: Any) -> None:
        super().__init__(message, **ids)
        self.errors = list(errors)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.errors:
            out["fields"] = self.errors
        return out


class InsufficientBalanceError(BusinessRuleError):
    """Raised when a debit would take an account that may not go negative below zero."""

    code = "insufficient_balance"


class NegativeBalanceError(FinancialIntegrityError):
    """Raised when the database itself refused a negative balance: a bug got past the check."""

    code = "internal"


class UnknownUserError(BusinessRuleError):
    """Raised when a debit names a user who has no wallet."""

    code = "unknown_user"


class UnknownHoldError(BusinessRuleError):
    """Raised when a release or refund names a hold that does not exist."""

    code = "unknown_hold"


class HoldNotOpenError(BusinessRuleError):
    """Raised when a hold was already released or refunded."""

    code = "hold_not_open"


class HoldExistsError(BusinessRuleError):
    """Raised when a new hold reuses the id of an existing one."""

    code = "hold_exists"


class ForbiddenError(BusinessRuleError):
    """Raised when a command names an account it may not move money from."""

    code = "forbidden"


class IdempotencyConflictError(BusinessRuleError):
    """Raised when a key is reused with another payload; the first command is untouched."""

    code = "idempotency_conflict"


class TransactionIntegrityError(FinancialIntegrityError):
    """Raised when legs do not balance or the database refuses a write it should accept."""

    code = "internal"


class EscrowIntegrityError(FinancialIntegrityError):
    """Raised when escrow balances and open holds disagree."""

    code = "internal"


class ConcurrentOperationError(FinancialIntegrityError):
    """Raised when transient database errors outlasted every retry."""

    code = "concurrent_operation"


# --- the transaction boundary -----------------------------------------------------------

_current: ContextVar[Connection | None] = ContextVar("walletq_connection", default=None)


def current_connection() -> Connection | None:
    """The connection of the transaction open in this context, if any."""
    return _current.get()


@contextmanager
def atomic_financial_operation(engine: Engine, label: str = "operation") -> Iterator[Connection]:
    """Open a transaction, or join the one already open: only the outermost level commits."""
    joined = _current.get()
    if joined is not None:
        if joined.engine is not engine:
            raise TransactionIntegrityError("nested operation on another database")
        yield joined
        return
    started = time.perf_counter()
    with engine.connect() as conn:
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


# --- the balance check and the audit row ------------------------------------------------


def validate_balance_integrity(
    *, account_code: str, balance_minor: int, debit_minor: int, may_go_negative: bool
) -> None:
    """Refuse a debit the locked balance cannot cover; call it under the row lock."""
    if debit_minor <= 0:
        raise TransactionIntegrityError(f"debit of {debit_minor} minor units is not positive")
    if not may_go_negative and balance_minor < debit_minor:
        raise InsufficientBalanceError(
            f"{account_code} holds {balance_minor} minor units, {debit_minor} needed",
            account=account_code,
            balance_minor=balance_minor,
            debit_minor=debit_minor,
        )


_INSERT_AUDIT = insert(schema.audit_events)


def log_financial_operation(
    conn: Connection,
    *,
    command_id: int | None,
    idempotency_key: str | None,
    command_type: str,
    outcome: str,
    accounts: Sequence[str] = (),
    amounts: Sequence[dict[str, Any]] = (),
    error: dict[str, Any] | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """One audit row in the caller's transaction, and one structured log line."""
    row = {
        "command_id": command_id,
        "idempotency_key": idempotency_key,
        "command_type": command_type[:60],
        "outcome": outcome,
        "accounts": list(accounts),
        "amounts": list(amounts),
        "error_code": (error or {}).get("code"),
        "detail": {**(detail or {}), **({"error": error} if error else {})},
    }
    conn.execute(_INSERT_AUDIT, row)
    audit_log.info(json.dumps({"event": "financial_operation", **row}, default=str))
