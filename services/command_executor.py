"""Executing commands exactly once: the entry point the worker, the CLI and WalletService call.

First admission (services.admission: signature, role, validation), writing nothing. Then:

- **The lean path** (a first delivery: a command met for the first time, or a row still
  untouched — accepted, never delivered, swept or re-driven): one transaction locks the
  row (or records it), takes up to `coalesce_max - 1` other untouched commands waiting
  (FOR UPDATE SKIP LOCKED, oldest first, each admitted on its own stored signature),
  applies them all (services.applying: one outcome, audit row and transfers each), and
  commits once. A refusal after a write is recorded in a second, short transaction.
- **The claimed path** (a redelivery, a retry, a row touched before, or anything unusual
  about the row): two transactions, as a delivery that may be a poison one needs — the
  claim commits the attempt first (and refuses another payload, returns an ended outcome
  as stored, holds a row to its own signature), then the command is applied alone.
- A bulk producer's chunk of keys (`execute_keys`) is applied as one batch on the lean
  path; a redelivered chunk goes key by key on the claimed path.

A batch type (services.command_types) runs its own transactions after the claim.
Every outcome is written under the command row's lock, after checking the row has not
ended: whichever delivery (or coalescing worker) gets there first applies it, the others
find it ended.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from services import command_store, command_types, ledger
from services.admission import Admitted, Refused, SignedHere, admit
from services.applying import Applied, Item, RejectLater, apply, integrity_failure, rejection
from services.audit import audit_command, insert_audit_rows
from services.canonical import canonical_payload, payload_hash
from services.command_status import CommandStatus
from services.command_store import CommandRecord
from services.errors import (
    BusinessRuleError,
    FinancialIntegrityError,
    IdempotencyConflictError,
    InvalidCommandError,
    PoisonMessageError,
)
from services.refusing import admit_row, record_refused, reject_row, row_refusal
from services.settings import Settings
from services.unit_of_work import run_transaction

__all__ = ["execute_command", "execute_admitted", "execute_keys", "record_failure"]

log = logging.getLogger("walletq.executor")


def execute_command(raw: Any, *, engine: Engine, settings: Settings,
                    signed_here: SignedHere | None = None) -> CommandRecord:
    """Admit a signed command, then apply it once; a duplicate gets the stored outcome.

    Raises the refusal as its typed error: UnauthenticatedError or ForbiddenError (audited
    and kept in `refusals`, no key taken), InvalidCommandError (nothing recorded),
    IdempotencyConflictError (the first command untouched) or ConcurrentOperationError
    (transient errors outlasted the retries).
    """
    admission = admit(raw, engine=engine, settings=settings, signed_here=signed_here)
    if isinstance(admission, Refused):
        if not isinstance(admission.error, InvalidCommandError):
            record_refused(raw, admission, engine=engine, settings=settings, source="service")
        raise admission.error
    return execute_admitted(admission, engine=engine, settings=settings)


def execute_admitted(admitted: Admitted, *, engine: Engine, settings: Settings,
                     redelivered: bool = False, coalesce: bool = False) -> CommandRecord:
    """Apply an admitted command once (see the module's docstring). `redelivered`: the
    broker says this message was delivered before (or it is a retry): the claimed path.
    `coalesce` (a worker): take other untouched commands waiting into the transaction."""
    entry = command_types.get(admitted.command.type)
    if not redelivered and not entry.is_batch:
        record = _lean(admitted, engine, settings, coalesce=coalesce and _coalesces(engine, settings))
        if record is not None:
            return record
    return _claimed(admitted, engine, settings)


# --- the lean path --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Lean:
    """What a lean transaction came to: the trigger's record (None: take the claimed path)."""

    record: CommandRecord | None
    applied: Applied | None = None


def _same(record: CommandRecord, admitted: Admitted) -> bool:
    """The row holds exactly this message: its payload and what was signed."""
    return (record.signed == admitted.signed
            and record.payload_hash == payload_hash(canonical_payload(admitted.command)))


def _coalesces(engine: Engine, settings: Settings) -> bool:
    """PostgreSQL only: a company is admitted inside the transaction, and on SQLite (one
    writer at a time, BEGIN IMMEDIATE) reading a producer there would wait on itself."""
    return settings.coalesce_max > 1 and engine.dialect.name == "postgresql"


def _company(conn: Connection, admitted: Admitted, engine: Engine, settings: Settings
             ) -> tuple[CommandRecord | None, list[Item]]:
    """The trigger's row if it is untouched and free, and up to `coalesce_max - 1` untouched
    commands waiting (oldest first, each held to its own signature): one statement."""
    key = admitted.command.idempotency_key
    rows = command_store.lock_untouched(conn, types=command_types.SINGLE_TYPES,
                                        limit=settings.coalesce_max - 1, first=key)
    trigger = rows[0] if rows and rows[0].idempotency_key == key else None
    others = rows[1:] if trigger is not None else rows
    return trigger, [Item(row, admit_row(row, engine=engine, settings=settings), counted=False)
                     for row in others]


def _own_row(conn: Connection, admitted: Admitted, *, expect_new: bool
             ) -> tuple[CommandRecord | None, bool]:
    """(the command's row, locked, and whether this delivery recorded it); (None, False) when
    it must take the claimed path. A row that ended comes back as it is."""
    key = admitted.command.idempotency_key
    if expect_new:
        record = command_store.insert_processing(conn, admitted.command, admitted.signed)
        if record is not None:
            return record, True
    record = command_store.lock(conn, key)
    if record is None:
        record = command_store.insert_processing(conn, admitted.command, admitted.signed)
        return record, record is not None  # None: recorded by someone else meanwhile
    if record.signed != admitted.signed and \
            record.payload_hash != payload_hash(canonical_payload(admitted.command)):
        raise command_store.conflict(admitted.command, record)
    if not _same(record, admitted):
        return None, False  # a retry signed afresh, or a row held to its own signature
    if record.ended or record.untouched:
        return record, False
    return None, False  # delivered, swept or re-driven before: count this delivery first


def _lean_body(conn: Connection, admitted: Admitted, engine: Engine, settings: Settings,
               coalesce: bool) -> _Lean:
    trigger, others = _company(conn, admitted, engine, settings) if coalesce else (None, [])
    counted = False
    if trigger is not None and _same(trigger, admitted):
        record: CommandRecord | None = trigger
    else:
        record, counted = _own_row(conn, admitted, expect_new=not coalesce)
    if record is None or record.ended:
        if not others:
            return _Lean(record)
        with ledger.deferred(conn):  # the company is applied all the same
            return _Lean(record, apply(conn, others, settings, alone=len(others) == 1))
    # Oldest first, the trigger among them: commands submitted in order apply in order.
    items = sorted([Item(record, admitted, counted), *others], key=lambda item: item.record.id)
    with ledger.deferred(conn):
        applied = apply(conn, items, settings, alone=len(items) == 1)
    mine = next((r for r in applied.finished if r.id == record.id), record)
    return _Lean(mine, applied)


def _lean(admitted: Admitted, engine: Engine, settings: Settings, *, coalesce: bool
          ) -> CommandRecord | None:
    """The lean path; None when the command must take the claimed path instead."""
    key = admitted.command.idempotency_key
    try:
        lean = run_transaction(engine, settings, f"execute {key}",
                               lambda conn: _lean_body(conn, admitted, engine, settings, coalesce))
    except RejectLater as later:
        return _reject_later(later, engine, settings)
    except ledger.HotAccountShort as short:
        log.info("%s: a hot account could not cover it at the flush (%s); again with its hot "
                 "accounts locked first", key, str(short).splitlines()[0])
        return None  # the claimed path locks hot accounts first
    except IntegrityError as exc:
        _count_attempt(admitted, engine, settings)
        raise integrity_failure(exc, key) from exc
    except (IdempotencyConflictError, BusinessRuleError):
        raise
    except Exception:
        # A bug, or a permanent database error: the transaction left nothing. Record the
        # delivery as a claim would (so the row exists and counts it), then let the caller
        # end it (`failed`).
        _count_attempt(admitted, engine, settings)
        raise
    if lean.applied is None or lean.record is None:
        if lean.applied is not None:
            _run_left(lean.applied.left, engine, settings)
        return lean.record
    mine = next((item for item in lean.applied.left if item.record.id == lean.record.id), None)
    _run_left([item for item in lean.applied.left if item is not mine], engine, settings)
    if mine is not None:  # left by its own batch: alone now, its failure the caller's
        return _claimed(admitted, engine, settings)
    return lean.record


def _count_attempt(admitted: Admitted, engine: Engine, settings: Settings) -> None:
    try:
        _claim(admitted, engine, settings)
    except Exception:  # noqa: BLE001 - the original failure is what the caller must see
        log.warning("%s: could not record the attempt", admitted.command.idempotency_key,
                    exc_info=True)


def _run_left(left: Sequence[Item], engine: Engine, settings: Settings) -> None:
    """Commands a batch left untouched: each on its own now (the trigger's caller sees its
    own failure; another's failure is its own message's, or its chunk's, to handle)."""
    for item in left:
        if not isinstance(item.admission, Admitted):
            continue
        try:
            _claimed(item.admission, engine, settings)
        except Exception:  # noqa: BLE001 - its own message (or a sweep) delivers it again
            log.warning("%s failed again alone; left for its own delivery",
                        item.record.idempotency_key, exc_info=True)


def _reject_later(later: RejectLater, engine: Engine, settings: Settings) -> CommandRecord:
    """Record a lone command's refusal in a transaction of its own (its writes rolled back)."""
    item = later.item

    def body(conn: Connection) -> CommandRecord:
        record = command_store.lock(conn, item.record.idempotency_key)
        if record is None:  # recorded in the transaction that rolled back: record it again
            assert isinstance(item.admission, Admitted)
            record = command_store.insert_processing(conn, item.admission.command,
                                                     item.admission.signed)
            assert record is not None, "a key taken meanwhile"
            counted = Item(record, item.admission, counted=True)
        elif record.ended:
            return record
        else:
            counted = Item(record, item.admission, counted=item.counted)
        finish, audit_row = rejection(counted, later.error)
        insert_audit_rows(conn, [audit_row])
        return command_store.finish_many(conn, [finish])[0]

    return run_transaction(engine, settings, f"reject {item.record.idempotency_key}", body)


# --- the claimed path -----------------------------------------------------------------------


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
        if found is None or found.ended or found.signed != admitted.signed:
            raise
        refusal = row_refusal(found, engine=engine, settings=settings)
        ended = reject_row(key, refusal.error, engine=engine, settings=settings) if refusal else None
        if ended is None:
            raise
        return ended
    if record.ended or record.signed == admitted.signed:
        return record
    refusal = row_refusal(record, engine=engine, settings=settings)
    if refusal is None:
        return record
    ended = reject_row(key, refusal.error, engine=engine, settings=settings)
    assert ended is not None, "claimed command vanished"
    return ended


def _claimed(admitted: Admitted, engine: Engine, settings: Settings) -> CommandRecord:
    command = admitted.command
    key = command.idempotency_key
    record = _claim(admitted, engine, settings)
    if record.ended:
        return record
    if record.attempts > settings.delivery_max:
        return _quarantine(record, engine, settings)
    entry = command_types.get(command.type)
    if entry.batch_executor is not None:
        return entry.batch_executor(engine, command, settings)
    try:
        return run_transaction(engine, settings, f"apply {key}",
                               lambda conn: _apply_claimed(conn, admitted, settings))
    except RejectLater as later:
        return _reject_later(later, engine, settings)
    except IntegrityError as exc:
        raise integrity_failure(exc, key) from exc


def _apply_claimed(conn: Connection, admitted: Admitted, settings: Settings) -> CommandRecord:
    record = command_store.lock(conn, admitted.command.idempotency_key)
    assert record is not None, "claimed command vanished"
    if record.ended:
        return record
    with ledger.deferred(conn, hot_first=True):  # the slow path takes no chance
        return apply(conn, [Item(record, admitted, counted=True)], settings,
                     alone=True).finished[0]


# --- a bulk producer's chunk of keys --------------------------------------------------------


def _keys_body(conn: Connection, *, keys: Sequence[str], engine: Engine, settings: Settings
               ) -> Applied:
    rows = command_store.lock_untouched(conn, types=command_types.SINGLE_TYPES,
                                        limit=len(keys), keys=keys)
    items = [Item(row, admit_row(row, engine=engine, settings=settings), counted=False)
             for row in rows]
    if not items:
        return Applied([], [])
    with ledger.deferred(conn):
        return apply(conn, items, settings, alone=len(items) == 1)


def execute_keys(keys: Sequence[str], *, engine: Engine, settings: Settings
                 ) -> list[CommandRecord]:
    """Apply the untouched commands under these keys, `coalesce_max` per transaction; the
    records they ended. Keys that are unknown, ended, or held by another worker are left
    to whoever holds them (and the sweep). Raises what a batch cannot get past (and, on
    SQLite, NotImplementedError): the caller then takes the keys one by one."""
    if not _coalesces(engine, settings):
        raise NotImplementedError("one command per transaction here: take the keys one by one")
    finished: list[CommandRecord] = []
    step = max(1, settings.coalesce_max)
    for start in range(0, len(keys), step):
        chunk = list(keys[start:start + step])
        finished += _each_batch(chunk, engine, settings)
    return finished


def _each_batch(chunk: list[str], engine: Engine, settings: Settings) -> list[CommandRecord]:
    label = f"execute {len(chunk)} keys from {chunk[0]}"
    try:
        applied = run_transaction(engine, settings, label,
                                  partial(_keys_body, keys=chunk, engine=engine, settings=settings))
    except RejectLater as later:
        return [_reject_later(later, engine, settings)]
    _run_left(applied.left, engine, settings)
    return applied.finished


# --- failures -------------------------------------------------------------------------------


def _quarantine(record: CommandRecord, engine: Engine, settings: Settings) -> CommandRecord:
    """A command delivered more than WALLETQ_DELIVERY_MAX times (its count committed by each
    claim, so deliveries that killed their worker count too) ends `failed` as `poison`."""
    error = PoisonMessageError(
        f"delivered {record.attempts} times without an outcome (WALLETQ_DELIVERY_MAX="
        f"{settings.delivery_max}): quarantined; `walletq redrive` runs it again after a fix",
        idempotency_key=record.idempotency_key)
    log.error("%s quarantined as poison after %d deliveries", record.idempotency_key,
              record.attempts)
    failed = record_failure(record.idempotency_key, error, engine=engine, settings=settings)
    assert failed is not None, "claimed command vanished"
    return failed


def record_failure(
    key: str, error: FinancialIntegrityError | dict[str, Any], *, engine: Engine,
    settings: Settings,
) -> CommandRecord | None:
    """Mark a command `failed` (retries ran out, or a bug) with its audit row; never a terminal one."""
    error_dict = error.to_dict() if isinstance(error, FinancialIntegrityError) else error

    def body(conn: Connection) -> CommandRecord | None:
        record = command_store.lock(conn, key)
        if record is None or record.ended:
            return record  # a failed command keeps its first error and its one audit row
        failed = command_store.finish(conn, record.id, CommandStatus.FAILED, error=error_dict)
        audit_command(conn, record, "failed", error=error_dict)
        return failed

    return run_transaction(engine, settings, f"fail {key}", body)
