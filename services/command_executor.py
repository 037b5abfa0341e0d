"""Executing a command exactly once: the entry point the worker, the CLI and WalletService call.

Two short transactions, each retried whole on transient errors:
1. claim — record the command under its key (or find it), refuse another payload,
   return a terminal outcome as stored, otherwise mark it `processing` and count the attempt;
2. apply — lock the command row again, and if still not terminal apply the operation and
   write its outcome (succeeded, or rejected with its code) and its audit row, together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from services import command_store
from services.atomic_transaction_manager import (
    BusinessRuleError,
    FinancialIntegrityError,
    NegativeBalanceError,
    RetryPolicy,
    TransactionIntegrityError,
    atomic_financial_operation,
    execute_with_retry,
    log_financial_operation,
)
from services.command_store import CommandRecord
from services.commands import Command, parse_command
from services.db import get_engine
from services.operations import HANDLERS, Effect, OperationContext
from services.settings import Settings, get_settings

__all__ = ["execute_command", "record_failure", "retry_policy", "run_transaction"]

log = logging.getLogger("walletq.executor")

#: Long-running command types register here (payout_batch); they manage their own chunks.
BATCH_EXECUTORS: dict[str, Callable[[Engine, Any, Settings], CommandRecord]] = {}


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(settings.retry_attempts, settings.retry_backoff_s,
                       settings.retry_backoff_s_max)


def run_transaction(
    engine: Engine, settings: Settings, label: str, body: Callable[[Connection], Any]
) -> Any:
    """`body` inside one transaction, re-run whole on transient database errors."""

    def attempt() -> Any:
        with atomic_financial_operation(engine, label) as conn:
            return body(conn)

    return execute_with_retry(attempt, retry_policy(settings), label=label)


def execute_command(
    raw: Any, *, engine: Engine | None = None, settings: Settings | None = None
) -> CommandRecord:
    """Apply a command once; a duplicate gets the stored outcome.

    Raises InvalidCommandError (nothing recorded), IdempotencyConflictError (the first
    command untouched) or ConcurrentOperationError (transient errors outlasted the retries).
    """
    settings = settings or get_settings()
    engine = engine or get_engine(settings)
    command = parse_command(raw)
    key = command.idempotency_key
    record = run_transaction(
        engine, settings, f"claim {key}", lambda conn: command_store.claim(conn, command)
    )
    if record.terminal:
        return record
    batch_executor = BATCH_EXECUTORS.get(command.type)
    if batch_executor is not None:
        return batch_executor(engine, command, settings)
    return run_transaction(
        engine, settings, f"apply {key}", lambda conn: _apply(conn, command, settings)
    )


def _apply(conn: Connection, command: Command, settings: Settings) -> CommandRecord:
    record = command_store.lock_record(conn, command.idempotency_key)
    assert record is not None, "claimed command vanished"
    if record.terminal:
        return record
    ctx = OperationContext(record.id, settings.asset_scale, settings.fee_rate)
    try:
        with conn.begin_nested():
            effect = HANDLERS[command.type](conn, command, ctx)
            if settings.test_delay_s:
                time.sleep(settings.test_delay_s)
    except BusinessRuleError as exc:
        return _reject(conn, record, exc)
    except IntegrityError as exc:
        raise _integrity_failure(exc, command) from exc
    finished = command_store.finish(conn, record.id, "succeeded", result=effect.result)
    _audit(conn, record, "succeeded", effect)
    return finished


def _reject(conn: Connection, record: CommandRecord, exc: BusinessRuleError) -> CommandRecord:
    error = exc.to_dict()
    finished = command_store.finish(conn, record.id, "rejected", error=error)
    _audit(conn, record, "rejected", None, error=error, ids=exc.ids)
    return finished


def _audit(conn: Connection, record: CommandRecord, outcome: str, effect: Effect | None,
           *, error: dict[str, Any] | None = None, ids: dict[str, Any] | None = None) -> None:
    transfers = effect.transfers if effect else []
    accounts = sorted({code for t in transfers for code in (t.debit.code, t.credit.code)})
    log_financial_operation(
        conn,
        command_id=record.id,
        idempotency_key=record.idempotency_key,
        command_type=record.type,
        outcome=outcome,
        accounts=accounts,
        amounts=[t.describe() for t in transfers],
        error=error,
        detail={"attempt": record.attempts, **({"ids": ids} if ids else {})},
    )


def _integrity_failure(exc: IntegrityError, command: Command) -> FinancialIntegrityError:
    """The database refused a write the service accepted: a bug, reported loudly."""
    text = str(exc.orig)
    if "balance_nonnegative" in text:
        return NegativeBalanceError(
            f"the database refused a negative balance for {command.idempotency_key}: {text}",
            idempotency_key=command.idempotency_key,
        )
    return TransactionIntegrityError(
        f"the database refused {command.idempotency_key}: {text}",
        idempotency_key=command.idempotency_key,
    )


def record_failure(
    key: str, error: FinancialIntegrityError | dict[str, Any], *,
    engine: Engine | None = None, settings: Settings | None = None,
) -> CommandRecord | None:
    """Mark a command `failed` (retries ran out, or a bug) with its audit row; never a terminal one."""
    settings = settings or get_settings()
    engine = engine or get_engine(settings)
    error_dict = error.to_dict() if isinstance(error, FinancialIntegrityError) else error

    def body(conn: Connection) -> CommandRecord | None:
        record = command_store.lock_record(conn, key)
        if record is None or record.terminal:
            return record
        failed = command_store.finish(conn, record.id, "failed", error=error_dict)
        _audit(conn, record, "failed", None, error=error_dict)
        return failed

    return run_transaction(engine, settings, f"fail {key}", body)


# Batch executors register themselves on import; import them here so that they are present
# wherever a command can be executed.
from services import payouts as _payouts  # noqa: E402, F401
