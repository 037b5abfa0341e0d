"""Applying single commands inside one transaction: one command, or a batch coalesced.

`apply` runs in the caller's transaction, whose command rows are locked already and whose
ledger writes are deferred (services.ledger.deferred):

1. the rows every command of the batch will lock (its registry footprint) are locked at
   once, in the global order: holds by id, then accounts by id;
2. each handler runs, locking from the ledger's book (no statement) and posting transfers
   checked under those locks. A business refusal forgets what the command posted and
   records `rejected`. A command that writes outside the ledger before it may refuse (a
   hold it opens, an account it opens) runs in a savepoint when it has company; alone, its
   refusal is raised as `RejectLater`: the caller rolls back and records the rejection in a
   short transaction of its own (there is nothing else to keep, so no savepoint).
   In a batch, any other failure of one command leaves it untouched (`Applied.left`): the
   caller runs it again on its own once the batch has committed, where the usual policy
   (retry, or `failed`) applies to it alone;
3. every audit row and every outcome, then the ledger's writes (balances and transfers),
   in a few statements whatever the number of commands, sent in one round trip. Hot
   accounts are locked there, last (services.ledger), after the audit rows and outcomes
   are written, so that their lock is held only through the legs and the commit; when
   their legs overdraw them by then,
   `ledger.HotAccountShort` is raised and the caller applies the commands again with
   their hot accounts locked first.

A command row that fails its own signature check (`Item.refusal`) ends `rejected` here,
with the reason, as services.refusing.reject_row would end it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError

from services import audit, command_store, command_types, ledger
from services.admission import Admitted, Refused
from services.bulk_sql import execute_together
from services.command_status import CommandStatus
from services.command_store import CommandRecord, Finish
from services.errors import (
    BusinessRuleError,
    FinancialIntegrityError,
    NegativeBalanceError,
    TransactionIntegrityError,
)
from services.operations import escrow
from services.operations.base import ApplyAfterBatch, Footprint, OperationContext
from services.settings import Settings

__all__ = ["Item", "Applied", "RejectLater", "apply", "integrity_failure", "rejection"]

log = logging.getLogger("walletq.applying")


@dataclass(frozen=True)
class Item:
    """A locked command row that has not ended, and the command it holds."""

    record: CommandRecord
    #: The command admitted (from its message, or from the row's own signed form), or the
    #: refusal of a row that fails its own signature check.
    admission: Admitted | Refused
    #: Its delivery was counted already (a claim): the outcome adds no attempt.
    counted: bool

    @property
    def attempts_added(self) -> int:
        return 0 if self.counted else 1


@dataclass(frozen=True)
class Applied:
    finished: list[CommandRecord]
    #: Commands of a batch that failed on something other than a business rule: untouched,
    #: to be run again on their own.
    left: list[Item]


class RejectLater(Exception):  # noqa: N818 - a signal to the caller, not an error
    """A lone command refused after it wrote: roll back, then record the rejection."""

    def __init__(self, item: Item, error: BusinessRuleError) -> None:
        super().__init__(error.message)
        self.item, self.error = item, error


@dataclass
class _Outcomes:
    finishes: list[Finish] = dataclasses.field(default_factory=list)
    audits: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    left: list[Item] = dataclasses.field(default_factory=list)

    def add(self, item: Item, status: str, transfers: Sequence[ledger.Transfer] = (), *,
            result: dict[str, Any] | None = None, error: dict[str, Any] | None = None,
            ids: dict[str, Any] | None = None) -> None:
        record = item.record
        self.finishes.append(Finish(record, status, result, error, item.attempts_added))
        self.audits.append(audit.command_audit_row(
            record, status, transfers, error=error, ids=ids,
            attempt=record.attempts + item.attempts_added))


def rejection(item: Item, error: BusinessRuleError) -> tuple[Finish, dict[str, Any]]:
    """The outcome and audit row of a command rejected by a business rule."""
    outcomes = _Outcomes()
    outcomes.add(item, CommandStatus.REJECTED, error=error.to_dict(), ids=error.ids or None)
    return outcomes.finishes[0], outcomes.audits[0]


def _footprint_of(command: Any) -> Footprint:
    footprint = command_types.get(command.type).footprint
    assert footprint is not None, f"{command.type} has no footprint"
    return footprint(command)


def _footprints(conn: Connection, items: Sequence[Item]) -> dict[int, Footprint]:
    """Each runnable command's footprint; their holds, then their accounts, locked in order."""
    prints = {item.record.id: _footprint_of(item.admission.command)
              for item in items if isinstance(item.admission, Admitted)}
    hold_ids = sorted({fp.hold_id for fp in prints.values() if fp.hold_id is not None})
    holds = escrow.lock_holds(conn, hold_ids) if hold_ids else {}
    for command_id, fp in prints.items():
        hold = holds.get(fp.hold_id) if fp.hold_id is not None else None
        if fp.hold_accounts is not None and hold is not None:
            more = fp.hold_accounts(hold)
            prints[command_id] = dataclasses.replace(
                fp, accounts=fp.accounts + more.accounts, opens=fp.opens | more.opens)
    ledger.lock_footprint(conn, [spec for fp in prints.values() for spec in fp.accounts])
    return prints


def _run(conn: Connection, item: Item, footprint: Footprint, book: ledger.Book,
         settings: Settings, alone: bool, outcomes: _Outcomes, batch: frozenset[int]) -> None:
    """One command's handler; its outcome (or its being left) added to `outcomes`."""
    assert isinstance(item.admission, Admitted)
    command = item.admission.command
    entry = command_types.get(command.type)
    assert entry.handler is not None, f"{command.type} has no handler"
    writes_first = entry.savepoint or any(code not in book.locked for code in footprint.opens)
    in_savepoint = writes_first and not alone
    ctx = OperationContext(item.record.id, settings.asset_scale, settings.fee_rate, batch)
    mark = book.mark()
    try:
        if in_savepoint:
            with conn.begin_nested():
                effect = entry.handler(conn, command, ctx)
        else:
            effect = entry.handler(conn, command, ctx)
    except ledger.HotAccountShort:
        raise  # what the batch posted before overdraws a hot account: the whole batch again
    except ApplyAfterBatch as exc:
        book.rollback_to(mark)
        log.info("%s left out of its batch: %s", item.record.idempotency_key, exc)
        outcomes.left.append(item)
        return
    except BusinessRuleError as exc:
        if writes_first and alone:
            raise RejectLater(item, exc) from exc
        book.rollback_to(mark)
        outcomes.add(item, CommandStatus.REJECTED, error=exc.to_dict(), ids=exc.ids or None)
        return
    except Exception as exc:
        lost = conn.invalidated or (isinstance(exc, DBAPIError)
                                    and (not in_savepoint or exc.connection_invalidated))
        if alone or lost:
            raise  # alone: the caller's policy; the transaction (or its connection) is lost
        book.rollback_to(mark)
        log.warning("%s left out of its batch (%s: %s); it runs again alone",
                 item.record.idempotency_key, type(exc).__name__, exc)
        outcomes.left.append(item)
        return
    outcomes.add(item, CommandStatus.SUCCEEDED, effect.transfers, result=effect.result)


def apply(conn: Connection, items: Sequence[Item], settings: Settings, *, alone: bool
          ) -> Applied:
    """Apply these locked commands in the caller's transaction (see the module's docstring).

    `alone`: a single command, raising what it raises (RejectLater for a refusal after a
    write); otherwise a batch, each command with an outcome of its own or left.
    """
    book = ledger.current_book(conn)
    outcomes = _Outcomes()
    prints = _footprints(conn, items)
    batch = frozenset(item.record.id for item in items) if not alone else frozenset()
    for item in items:
        if isinstance(item.admission, Refused):
            error = item.admission.error
            log.warning("%s rejected: %s", item.record.idempotency_key, error.message)
            outcomes.add(item, CommandStatus.REJECTED, error=error.to_dict(),
                         ids={"check": "signature"})
            continue
        if settings.test_fault:
            _test_fault(settings.test_fault, item.record.idempotency_key)
        _run(conn, item, prints[item.record.id], book, settings, alone, outcomes, batch)
    if settings.test_delay_s:
        time.sleep(settings.test_delay_s)  # fault tests: a window inside the transaction
    return Applied(_write(conn, book, outcomes), outcomes.left)


def _test_fault(fault: str, key: str) -> None:
    """WALLETQ_TEST_FAULT (settings refuse it unless WALLETQ_TEST_MODE=1): a bug, or a
    process that dies, on the command under one key, inside its transaction."""
    kind, _, target = fault.partition(":")
    if key != target:
        return
    if kind == "exit":
        log.error("WALLETQ_TEST_FAULT: the process ends while applying %s", key)
        os._exit(70)
    raise KeyError(f"WALLETQ_TEST_FAULT injected into {key}")


def _write(conn: Connection, book: ledger.Book, outcomes: _Outcomes) -> list[CommandRecord]:
    """Balances and transfers, outcomes, audit rows: one round trip on PostgreSQL."""
    if conn.dialect.name != "postgresql" or not outcomes.finishes:
        book.flush(conn)
        audit.insert_audit_rows(conn, outcomes.audits)
        return command_store.finish_many(conn, outcomes.finishes)
    hot = book.read_hot
    # The audit rows and the outcomes before the hot accounts' locks: a hot row is held
    # from its lock through the commit, and a batch beside this one waits for it.
    finishing = command_store.finishing(outcomes.finishes)
    pending = [*book.flush_pending(conn, before_hot=[
        audit.audit_rows_pending(outcomes.audits), finishing.update]), finishing.count]
    try:
        result = execute_together(conn, pending)
    except IntegrityError as exc:
        if hot and "balance_nonnegative" in str(exc.orig):
            raise ledger.HotAccountShort(str(exc.orig)) from exc
        raise
    return finishing.records(result)


def integrity_failure(exc: IntegrityError, key: str) -> FinancialIntegrityError:
    """The database refused a write the service accepted: a bug, reported loudly."""
    text = str(exc.orig)
    if "balance_nonnegative" in text:
        return NegativeBalanceError(
            f"the database refused a negative balance for {key}: {text}", idempotency_key=key)
    return TransactionIntegrityError(f"the database refused {key}: {text}", idempotency_key=key)
