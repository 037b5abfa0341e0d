"""Executing a command exactly once: the entry point the worker, the CLI and WalletService call.

First admission (services.admission: signature, role, validation), writing nothing; then
two short transactions, each retried whole on transient errors:
1. claim — record the command under its key (or find it), refuse another payload,
   return a terminal outcome as stored, otherwise mark it `processing` and count the attempt;
   a row found with another signature than the message's is held to its own (one more
   verification, off the common path) and ends `rejected` if it fails it;
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
from services.admission import Admitted, Refused, admit
from services.audit import audit_command
from services.command_status import CommandStatus
from services.command_store import CommandRecord
from services.commands import Command
from services.errors import (
    BusinessRuleError,
    FinancialIntegrityError,
    IdempotencyConflictError,
    InvalidCommandError,
    NegativeBalanceError,
    TransactionIntegrityError,
)
from services.operations.base import OperationContext
from services.refusing import record_refused, reject_row, row_refusal
from services.settings import Settings
from services.unit_of_work import run_transaction

__all__ = ["execute_command", "execute_admitted", "record_failure"]

log = logging.getLogger("walletq.executor")


def execute_command(raw: Any, *, engine: Engine, settings: Settings) -> CommandRecord:
    """Admit a signed command, then apply it once; a duplicate gets the stored outcome.

    Raises the refusal as its typed error: UnauthenticatedError or ForbiddenError (audited
    and kept in `refusals`, no key taken), InvalidCommandError (nothing recorded),
    IdempotencyConflictError (the first command untouched) or ConcurrentOperationError
    (transient errors outlasted the retries).
    """
    admission = admit(raw, engine=engine, settings=settings)
    if isinstance(admission, Refused):
        if not isinstance(admission.error, InvalidCommandError):
            record_refused(raw, admission, engine=engine, settings=settings, source="service")
        raise admission.error
    return execute_admitted(admission, engine=engine, settings=settings)


def _claim(admitted: Admitted, engine: Engine, settings: Settings) -> CommandRecord:
    """Claim the command; a row that fails its own signature ends rejected instead."""
    command, key = admitted.command, admitted.command.idempotency_key
    try:
        record = run_transaction(engine, settings, f"claim {key}",
                                 lambda conn: command_store.claim(conn, command, admitted.signed))
    except IdempotencyConflictError:
        # A row under this key whose signed form is this very message, but whose stored
        # payload differs: written behind walletq's back. It ends; else the conflict stands.
        with engine.connect() as conn:
            found = command_store.get_record(conn, key)
        if found is None or found.terminal or found.signed != admitted.signed:
            raise
        refusal = row_refusal(found, engine=engine, settings=settings)
        ended = reject_row(key, refusal.error, engine=engine, settings=settings) if refusal else None
        if ended is None:
            raise
        return ended
    if record.terminal or record.signed == admitted.signed:
        return record
    refusal = row_refusal(record, engine=engine, settings=settings)
    if refusal is None:
        return record
    ended = reject_row(key, refusal.error, engine=engine, settings=settings)
    assert ended is not None, "claimed command vanished"
    return ended


def execute_admitted(admitted: Admitted, *, engine: Engine, settings: Settings) -> CommandRecord:
    """Apply an admitted command once (see the module's docstring)."""
    command = admitted.command
    key = command.idempotency_key
    record = _claim(admitted, engine, settings)
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
