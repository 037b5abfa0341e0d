"""Executing a command exactly once: the entry point the worker, the CLI and WalletService call.

Two short transactions, each retried whole on transient errors:
1. claim — record the command under its key (or find it), refuse another payload,
   return a terminal outcome as stored, otherwise mark it `processing` and count the attempt;
2. apply — lock the command row again, and if still not terminal apply the operation and
   write its outcome (succeeded, or rejected with its code) and its audit row, together.
A batch type (services.command_types) runs its own transactions after the claim.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from services import command_store, command_types
from services.audit import audit_command
from services.command_fields import CommandLimits
from services.command_status import CommandStatus
from services.command_store import CommandRecord
from services.commands import Command, parse_command
from services.errors import (
    BusinessRuleError,
    FinancialIntegrityError,
    NegativeBalanceError,
    TransactionIntegrityError,
)
from services.operations.base import OperationContext
from services.settings import Settings
from services.unit_of_work import run_transaction

__all__ = ["execute_command", "record_failure"]

log = logging.getLogger("walletq.executor")


def execute_command(raw: Any, *, engine: Engine, settings: Settings) -> CommandRecord:
    """Apply a command once; a duplicate gets the stored outcome.

    Raises InvalidCommandError (nothing recorded), IdempotencyConflictError (the first
    command untouched) or ConcurrentOperationError (transient errors outlasted the retries).
    """
    command = parse_command(raw, CommandLimits.from_settings(settings))
    key = command.idempotency_key
    record = run_transaction(
        engine, settings, f"claim {key}", lambda conn: command_store.claim(conn, command)
    )
    if record.terminal:
        return record
    entry = command_types.get(command.type)
    if entry.batch_executor is not None:
        return entry.batch_executor(engine, command, settings)
    return run_transaction(
        engine, settings, f"apply {key}", lambda conn: _apply(conn, command, settings)
    )


def _apply(conn: Connection, command: Command, settings: Settings) -> CommandRecord:
    record = command_store.lock(conn, command.idempotency_key)
    assert record is not None, "claimed command vanished"
    if record.terminal:
        return record
    handler = command_types.get(command.type).handler
    assert handler is not None, f"{command.type} has no handler"
    ctx = OperationContext(record.id, settings.asset_scale, settings.fee_rate)
    try:
        with conn.begin_nested():
            effect = handler(conn, command, ctx)
            if settings.test_delay_s:
                time.sleep(settings.test_delay_s)
    except BusinessRuleError as exc:
        return _reject(conn, record, exc)
    except IntegrityError as exc:
        raise _integrity_failure(exc, command) from exc
    finished = command_store.finish(conn, record.id, CommandStatus.SUCCEEDED, result=effect.result)
    audit_command(conn, record, "succeeded", effect.transfers)
    return finished


def _reject(conn: Connection, record: CommandRecord, exc: BusinessRuleError) -> CommandRecord:
    error = exc.to_dict()
    finished = command_store.finish(conn, record.id, CommandStatus.REJECTED, error=error)
    audit_command(conn, record, "rejected", error=error, ids=exc.ids)
    return finished


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
    key: str, error: FinancialIntegrityError | dict[str, Any], *, engine: Engine,
    settings: Settings,
) -> CommandRecord | None:
    """Mark a command `failed` (retries ran out, or a bug) with its audit row; never a terminal one."""
    error_dict = error.to_dict() if isinstance(error, FinancialIntegrityError) else error

    def body(conn: Connection) -> CommandRecord | None:
        record = command_store.lock(conn, key)
        if record is None or record.terminal:
            return record
        failed = command_store.finish(conn, record.id, CommandStatus.FAILED, error=error_dict)
        audit_command(conn, record, "failed", error=error_dict)
        return failed

    return run_transaction(engine, settings, f"fail {key}", body)
