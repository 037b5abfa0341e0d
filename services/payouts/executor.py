"""Running a payout batch: a sequence of short transactions, one per chunk of items.

Each chunk (the whole batch in one, in atomic mode), under the command's row lock: locks
the funding account — a hot one (the treasury, the fees) is only read, so that chunks
paying from it run side by side, and debited last; a chunk that meets another (the account
no longer covers it, a reference paid meanwhile, a refusal to decide) runs again with the
account locked (`ChunkRace`) — (recipients are only credited: the UPDATE that credits them
takes their row locks, by ascending id), reads which of its references that account paid
before, decides every item in plain Python (services.payouts.decision), then pays with set-based
SQL through the ledger (`pay_users`: new recipients' wallets opened at what they are paid),
writes the items' outcomes and the batch's progress, and one audit row. Progress commits
with the chunk, so a re-run (a redelivered or swept message) resumes at the first item not
yet decided. The command stays `processing` until the last chunk writes `succeeded`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from services import command_store
from services.audit import log_financial_operation
from services.command_status import ENDED, CommandStatus
from services.command_store import CommandRecord
from services.errors import (
    AccountClosedError,
    AccountFrozenError,
    BusinessRuleError,
    ConcurrentOperationError,
    ForbiddenError,
    TransactionIntegrityError,
)
from services.ledger import (
    account_spec,
    check_usable,
    debited_today,
    is_hot,
    lock_accounts,
    pay_users,
    read_account,
    recipients_blocked,
)
from services.money import format_minor
from services.payouts import store
from services.payouts.command import PayoutBatch
from services.payouts.decision import FUNDING_KINDS, Item, atomic_refusal, decide, items_of
from services.payouts.instruments import AFTER_CHUNK_HOOKS, TIMINGS
from services.payouts.store import Batch, ChunkOutcome
from services.settings import Settings
from services.unit_of_work import run_transaction

__all__ = ["execute_payout_batch", "TRANSFER_KIND"]

TRANSFER_KIND = "payout"
log = logging.getLogger("walletq.payouts")


class ChunkRace(Exception):  # noqa: N818 - a signal to the caller, not an error
    """A chunk paid from a hot account it only read met another chunk: its funding account
    no longer covered it, or a reference it decided unpaid was paid meanwhile (the unique
    index refused it). Nothing was written; the chunk runs again with the account locked."""


def _lock_funding(conn: Connection, from_account: str, *, exact: bool = True) -> Any:
    """The funding account, locked (opened if it is a platform account); a refusal if it
    may not fund a payout. Every chunk paid from it queues here, so its balance and the
    references it paid are read after the last chunk paying from it committed.

    Not `exact`: a hot (platform) account is read, not locked, so that chunks paying from
    it run side by side; its debit is written last and a race is caught (ChunkRace)."""
    spec = account_spec(from_account)
    if spec is None or spec.kind not in FUNDING_KINDS:
        return ForbiddenError(f"{from_account} may not fund a payout: only platform:treasury, "
                              "platform:fees or a user's available account", account=from_account)
    if not exact and is_hot(spec.code):
        found = read_account(conn, spec)
        if found is not None:
            return found
    opened = {spec.code} if spec.user_id is None else set()
    try:
        funding = lock_accounts(conn, [spec], open_missing=opened)[spec.code]
    except BusinessRuleError as exc:  # a user's account that does not exist
        return exc
    try:  # a frozen or closed account funds nothing: refused before any write
        check_usable(funding, funding)
    except BusinessRuleError as exc:
        return exc
    return funding


def _apply_chunk(conn: Connection, batch: Batch, chunk: Sequence[Item], exact: bool
                 ) -> ChunkOutcome:
    """Decide and pay one chunk; raises a BusinessRuleError (nothing written) in atomic mode."""
    started = time.perf_counter()
    funding = _lock_funding(conn, batch.from_account, exact=exact)
    if isinstance(funding, (AccountFrozenError, AccountClosedError)):
        # Frozen or closed after the batch began: this chunk writes nothing and the command
        # fails; unfreezing and re-driving it resumes where it stopped.
        raise TransactionIntegrityError(f"payout stopped: {funding.message}")
    if isinstance(funding, BusinessRuleError):
        raise TransactionIntegrityError(f"Bug! funding account {batch.from_account}: {funding}")
    references = [item.reference for item in chunk]
    paid_before = store.paid_before(conn, funding.id, references)
    blocked = recipients_blocked(conn, [item.user for item in chunk])
    started = TIMINGS.add("lock", started)
    limit = 0 if funding.may_go_negative else funding.limit_minor
    # A daily debit limit: what today's legs leave, read under the funding account's lock.
    day_left = None if funding.daily_limit_minor is None else \
        funding.daily_limit_minor - debited_today(conn, funding)
    decisions = decide(chunk, paid_before, funding.balance_minor, funding.code, blocked, limit,
                       day_left)
    if not funding.exact and any(d.outcome == "rejected" for d in decisions):
        raise ChunkRace("a refusal is decided on the locked account, never on a reading")
    if batch.atomic and any(d.outcome == "rejected" for d in decisions):
        raise atomic_refusal(decisions, funding.code, funding.balance_minor, limit, day_left)
    paid = [(d.item.user, d.item.amount_minor) for d in decisions if d.outcome == "paid"]
    amount_paid = sum(amount_minor for _, amount_minor in paid)
    if amount_paid > funding.balance_minor + limit:  # checked before any write of the chunk
        raise TransactionIntegrityError("Bug! a chunk overdraws its funding account")
    started = TIMINGS.add("decide", started)
    try:
        store.insert_decisions(conn, batch.command_id, funding.id, decisions)
        pay_users(conn, batch.command_id, funding, paid, TRANSFER_KIND)
    except IntegrityError as exc:
        if funding.exact:
            raise
        raise ChunkRace(str(exc.orig).splitlines()[0]) from exc
    # Read again now that the credits hold the recipients' rows: a wallet frozen or
    # closed between the decision and its credit is seen here, and the chunk runs again.
    changed = recipients_blocked(conn, [user for user, _ in paid])
    if changed:
        raise ChunkRace(f"{len(changed)} recipients' wallets were frozen or closed meanwhile")
    TIMINGS.add("pay", started)
    return ChunkOutcome(len(paid), sum(d.outcome == "rejected" for d in decisions),
                        sum(d.outcome == "duplicate" for d in decisions), amount_paid)


def _result(conn: Connection, batch: Batch, scale: int) -> dict[str, Any]:
    return {
        "from_account": batch.from_account,
        "atomic": batch.atomic,
        "items": batch.items_total,
        "paid": batch.items_paid,
        "rejected": batch.items_rejected,
        "duplicate": batch.items_duplicate,
        "amount_paid": format_minor(batch.amount_paid_minor, scale),
        "amount_total": format_minor(batch.amount_total_minor, scale),
        "rejected_by_code": store.rejected_by_code(conn, batch.command_id, batch.items_rejected),
        "chunks": batch.chunks_done,
    }


def _audit(conn: Connection, key: str, batch: Batch, outcome: str, *,
           done: ChunkOutcome | None = None, error: dict[str, Any] | None = None,
           detail: dict[str, Any] | None = None) -> None:
    """One audit row per committed chunk; its items and transfers carry the detail."""
    amounts = []
    if done is not None and done.paid:
        amounts = [{"debit": batch.from_account, "credit": f"{done.paid} recipients",
                    "amount_minor": done.amount_paid_minor, "kind": TRANSFER_KIND}]
    log_financial_operation(
        conn, command_id=batch.command_id, idempotency_key=key, command_type="payout_batch",
        outcome=outcome, accounts=[batch.from_account], amounts=amounts, error=error,
        detail=detail or {})


def _reject(conn: Connection, key: str, batch: Batch, exc: BusinessRuleError) -> None:
    error = exc.to_dict()
    store.mark_rejected(conn, batch)
    command_store.finish(conn, batch.command_id, CommandStatus.REJECTED, error=error)
    _audit(conn, key, batch, "rejected", error=error, detail={"ids": exc.ids} if exc.ids else {})


def _step(conn: Connection, command: PayoutBatch, items: Sequence[Item],
          settings: Settings, exact: bool = True) -> tuple[bool, int]:
    """One transaction: the next chunk of the batch. Returns (finished, chunks_done)."""
    key = command.idempotency_key
    locked = store.lock_command(conn, key)
    if locked is None:
        raise TransactionIntegrityError(f"Bug! payout {key} was claimed but has no command row")
    command_id, status = locked
    if status in ENDED:
        return True, 0
    batch = store.load_batch(conn, command_id)
    if batch is None:
        batch = store.start_batch(conn, command_id, command, items, settings.payout_chunk_items)
        funding = _lock_funding(conn, command.from_account, exact=exact)
        if isinstance(funding, BusinessRuleError):
            _reject(conn, key, batch, funding)
            return True, 0
    if batch.status != "running":
        raise TransactionIntegrityError(f"Bug! payout {key} is {batch.status}, "
                                        f"its command {status}")
    chunk = items[batch.next_index:batch.next_index + batch.chunk_items]
    try:
        done = _apply_chunk(conn, batch, chunk, exact)
    except BusinessRuleError as exc:  # atomic mode: nothing was written
        _reject(conn, key, batch, exc)
        return True, 0
    started = time.perf_counter()
    fresh = store.record_progress(conn, batch, done)
    _audit(conn, key, fresh, "chunk", done=done, detail={
        "chunk": fresh.chunks_done, "items": [chunk[0].index, chunk[-1].index],
        "paid": done.paid, "rejected": done.rejected, "duplicate": done.duplicate})
    finished = fresh.status == "succeeded"
    if finished:
        result = _result(conn, fresh, settings.asset_scale)
        command_store.finish(conn, command_id, CommandStatus.SUCCEEDED, result=result)
        _audit(conn, key, fresh, "succeeded", detail=result)
    TIMINGS.add("progress", started)
    if settings.test_delay_s:
        time.sleep(settings.test_delay_s)  # fault tests: a window to kill the worker mid-chunk
    return finished, fresh.chunks_done


#: A chunk that meets a race runs again, its funding account locked; this many times.
CHUNK_RACES_MAX = 3


def _chunk(engine: Engine, command: PayoutBatch, items: Sequence[Item], settings: Settings
           ) -> tuple[bool, int]:
    """One chunk in a transaction of its own: first reading a hot funding account, then,
    after a race, with it locked (a recipient's wallet frozen meanwhile can race it too)."""
    key, exact = command.idempotency_key, False
    for _ in range(CHUNK_RACES_MAX):
        try:
            return run_transaction(engine, settings, f"payout {key}",
                                   partial(_step, command=command, items=items,
                                           settings=settings, exact=exact))
        except ChunkRace as race:
            log.info("payout %s: %s; the chunk again, its funding account locked", key, race)
            exact = True
    raise ConcurrentOperationError(f"payout {key}: a chunk met {CHUNK_RACES_MAX} races in a row",
                                   idempotency_key=key)


def execute_payout_batch(engine: Engine, command: PayoutBatch, settings: Settings) -> CommandRecord:
    """Run the batch's remaining chunks, one transaction each (a batch executor)."""
    items = items_of(command, settings.asset_scale)
    key = command.idempotency_key
    while True:
        started = time.perf_counter()
        finished, chunks_done = _chunk(engine, command, items, settings)
        TIMINGS.chunks += 1
        TIMINGS.seconds["transaction"] = (TIMINGS.seconds.get("transaction", 0.0)
                                          + time.perf_counter() - started)
        if finished:
            break
        for hook in AFTER_CHUNK_HOOKS:
            hook(key, chunks_done)
    with engine.connect() as conn:
        record = command_store.get_record(conn, key)
    assert record is not None
    return record
