"""The payout tables: `payout_batches` (a batch's progress) and `payout_items` (each item's
outcome). This module is their only writer; their reads are here too."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import bindparam, func, insert, select, text, update
from sqlalchemy.engine import Connection

from services import command_store, schema
from services.bulk_sql import insert_rows, pg_array
from services.errors import TransactionIntegrityError
from services.money import format_minor
from services.operations.base import TransferFacts
from services.payouts.command import PayoutBatch
from services.payouts.decision import Decision, Item

__all__ = ["Batch", "ChunkOutcome", "load_batch", "start_batch", "record_progress",
           "mark_rejected", "rejected_by_code", "lock_command", "paid_before", "insert_decisions",
           "payout_progress", "payouts_done", "payout_item_rows", "payout_totals", "check_batch_transfers"]

_b = schema.payout_batches
_i = schema.payout_items


@dataclass(frozen=True)
class Batch:
    command_id: int
    from_account: str
    atomic: bool
    status: str
    items_total: int
    amount_total_minor: int
    chunk_items: int
    chunks_total: int
    chunks_done: int
    items_paid: int
    items_rejected: int
    items_duplicate: int
    amount_paid_minor: int

    @property
    def next_index(self) -> int:
        return self.items_paid + self.items_rejected + self.items_duplicate


@dataclass(frozen=True)
class ChunkOutcome:
    paid: int
    rejected: int
    duplicate: int
    amount_paid_minor: int


_BATCH_COLUMNS = [_b.c[name] for name in Batch.__dataclass_fields__]


def load_batch(conn: Connection, command_id: int) -> Batch | None:
    row = conn.execute(select(*_BATCH_COLUMNS).where(_b.c.command_id == command_id)).one_or_none()
    return None if row is None else Batch(*row)


def start_batch(conn: Connection, command_id: int, command: PayoutBatch, items: Sequence[Item],
                chunk_items: int) -> Batch:
    """The batch's row, at its first chunk: its size fixed, nothing done yet."""
    chunk_items = len(items) if command.atomic else max(1, chunk_items)
    conn.execute(insert(_b).values(
        command_id=command_id, from_account=command.from_account, atomic=command.atomic,
        status="running", items_total=len(items),
        amount_total_minor=sum(item.amount_minor for item in items),
        chunk_items=chunk_items, chunks_total=math.ceil(len(items) / chunk_items),
    ))
    batch = load_batch(conn, command_id)
    assert batch is not None
    return batch


#: A batch's command, locked: its id and status only (the full record carries the payload,
#: megabytes to read, and to decode, at every chunk).
_LOCK_COMMAND = (select(schema.commands.c.id, schema.commands.c.status)
                 .where(schema.commands.c.idempotency_key == bindparam("key")).with_for_update())


def lock_command(conn: Connection, key: str) -> tuple[int, str] | None:
    """The batch's command row locked FOR UPDATE: (id, status), or None if there is none."""
    row = conn.execute(_LOCK_COMMAND, {"key": key}).one_or_none()
    return None if row is None else (row.id, row.status)


def record_progress(conn: Connection, batch: Batch, done: ChunkOutcome) -> Batch:
    """Count one chunk done, in the chunk's transaction; the last one completes the batch."""
    now = datetime.now(UTC)
    chunks_done = batch.chunks_done + 1
    complete = batch.next_index + done.paid + done.rejected + done.duplicate == batch.items_total
    if complete != (chunks_done == batch.chunks_total):
        raise TransactionIntegrityError(f"Bug! payout {batch.command_id}: chunk {chunks_done} of "
                                        f"{batch.chunks_total} and complete={complete}")
    fresh = replace(batch, chunks_done=chunks_done, items_paid=batch.items_paid + done.paid,
                    items_rejected=batch.items_rejected + done.rejected,
                    items_duplicate=batch.items_duplicate + done.duplicate,
                    amount_paid_minor=batch.amount_paid_minor + done.amount_paid_minor,
                    status="succeeded" if complete else "running")
    changed = conn.execute(
        update(_b).where(_b.c.command_id == batch.command_id, _b.c.chunks_done == batch.chunks_done)
        .values(chunks_done=fresh.chunks_done, items_paid=fresh.items_paid,
                items_rejected=fresh.items_rejected, items_duplicate=fresh.items_duplicate,
                amount_paid_minor=fresh.amount_paid_minor, status=fresh.status, updated_at=now,
                completed_at=now if complete else None))
    if changed.rowcount != 1:
        raise TransactionIntegrityError(f"Bug! payout {batch.command_id} progressed under its lock")
    command_store.heartbeat(conn, batch.command_id)
    return fresh


def mark_rejected(conn: Connection, batch: Batch) -> None:
    conn.execute(update(_b).where(_b.c.command_id == batch.command_id, _b.c.status == "running")
                 .values(status="rejected", updated_at=datetime.now(UTC)))


def rejected_by_code(conn: Connection, command_id: int, rejected: int | None = None
                     ) -> dict[str, int]:
    """Rejected items by reason; `rejected`, the batch's count, spares the scan when 0."""
    if rejected == 0:
        return {}
    rows = conn.execute(select(_i.c.error_code, func.count()).where(
        _i.c.command_id == command_id, _i.c.outcome == "rejected").group_by(_i.c.error_code))
    return {code: count for code, count in rows}


# One probe of the unique index per reference (LATERAL ... LIMIT 1 is never flattened into a
# hash join): the cost follows the chunk, not how many items the account paid before; with
# `reference = ANY(...)` and stale statistics the planner filters every earlier payment.
_PAID_BEFORE = text(
    "SELECT r.ref FROM unnest(CAST(:refs AS TEXT[])) AS r(ref), LATERAL (SELECT 1 FROM "
    "payout_items i WHERE i.funding_account_id = :f AND i.outcome = 'paid' "
    "AND i.reference = r.ref LIMIT 1) AS hit")


def paid_before(conn: Connection, funding_id: int, references: list[str]) -> set[str]:
    """Which of these references this account paid, by any batch (a statement of its own,
    after the funding account's lock: in READ COMMITTED it sees what the chunks before it
    committed)."""
    if conn.dialect.name == "postgresql":
        rows = conn.execute(_PAID_BEFORE, {"f": funding_id, "refs": pg_array(references)})
    else:
        rows = conn.execute(select(_i.c.reference).where(
            _i.c.funding_account_id == funding_id, _i.c.outcome == "paid",
            _i.c.reference.in_(references)))
    return {reference for (reference,) in rows}


def insert_decisions(conn: Connection, command_id: int, funding_id: int,
                     decisions: Sequence[Decision]) -> None:
    """Every decided item's outcome, in one statement; the unique index on paid items'
    (funding account, reference) refuses a second payment of a reference outright."""
    if not decisions:
        return
    if conn.dialect.name == "postgresql":  # the batch's two ids sent once, not per item
        items = [d.item for d in decisions]
        rejected = [d for d in decisions if d.error_code is not None]
        conn.execute(_INSERT_ITEMS, {
            "command_id": command_id, "funding_id": funding_id,
            "indexes": pg_array([item.index for item in items]),
            "users": pg_array([item.user for item in items]),
            "amounts": pg_array([item.amount_minor for item in items]),
            "refs": pg_array([item.reference for item in items]),
            "outcomes": pg_array([d.outcome for d in decisions]),
            "error_at": pg_array([d.item.index for d in rejected]),
            "errors": pg_array([d.error_code for d in rejected])})
        return
    insert_rows(conn, _i, {
        "command_id": [command_id] * len(decisions),
        "item_index": [d.item.index for d in decisions],
        "user_id": [d.item.user for d in decisions],
        "amount_minor": [d.item.amount_minor for d in decisions],
        "reference": [d.item.reference for d in decisions],
        "outcome": [d.outcome for d in decisions],
        "error_code": [d.error_code for d in decisions],
        "funding_account_id": [funding_id] * len(decisions)})


# Error codes travel apart, by item index: most items have none (one NULL each would send
# the whole column down pg_array's slow path).
_INSERT_ITEMS = text(
    "INSERT INTO payout_items (command_id, item_index, user_id, amount_minor, reference, "
    "outcome, error_code, funding_account_id) "
    "SELECT :command_id, i.idx, i.user_id, i.amount, i.ref, i.outcome, e.code, :funding_id "
    "FROM unnest(CAST(:indexes AS INTEGER[]), CAST(:users AS TEXT[]), "
    "CAST(:amounts AS BIGINT[]), CAST(:refs AS TEXT[]), CAST(:outcomes AS TEXT[])) "
    "AS i(idx, user_id, amount, ref, outcome) "
    "LEFT JOIN unnest(CAST(:error_at AS INTEGER[]), CAST(:errors AS TEXT[])) AS e(idx, code) "
    "ON e.idx = i.idx")


# --- reads ------------------------------------------------------------------------------


_c = schema.commands
#: What progress shows of a command: not its payload (a batch's is megabytes, and
#: `walletq payout` polls every batch's progress five times a second).
_PROGRESS_COLUMNS = (_c.c.id, _c.c.type, _c.c.status, _c.c.error_code, _c.c.error_message,
                     _c.c.created_at, _c.c.completed_at)


def payout_progress(conn: Connection, key: str, scale: int) -> dict[str, Any] | None:
    """A payout's command status and batch progress, or None if no such command."""
    record = conn.execute(select(*_PROGRESS_COLUMNS).where(_c.c.idempotency_key == key)
                          ).one_or_none()
    if record is None:
        return None
    batch = load_batch(conn, record.id)
    error = None if record.error_code is None else {"code": record.error_code,
                                                    "message": record.error_message or ""}
    out: dict[str, Any] = {"idempotency_key": key, "type": record.type, "status": record.status,
                           "error": error, "created_at": command_store.iso(record.created_at),
                           "completed_at": command_store.iso(record.completed_at)}
    if record.type != "payout_batch":
        return out
    if batch is None:  # accepted, not started: its size comes from the payload
        full = command_store.get_record(conn, key)
        assert full is not None
        payload = full.payload_dict()
        out.update({"from_account": payload.get("from_account", "platform:treasury"),
                    "items": len(payload["items"]), "done": 0, "paid": 0, "rejected": 0,
                    "duplicate": 0, "amount_paid": format_minor(0, scale), "chunks_done": 0,
                    "chunks_total": None, "rejected_by_code": {}})
        return out
    out.update({"from_account": batch.from_account, "atomic": batch.atomic,
                "items": batch.items_total, "done": batch.next_index,
                "paid": batch.items_paid, "rejected": batch.items_rejected,
                "duplicate": batch.items_duplicate,
                "amount_paid": format_minor(batch.amount_paid_minor, scale),
                "amount_total": format_minor(batch.amount_total_minor, scale),
                "chunks_done": batch.chunks_done, "chunks_total": batch.chunks_total,
                "rejected_by_code": rejected_by_code(conn, batch.command_id,
                                                     batch.items_rejected)})
    return out


_DONE = (_b.c.items_paid + _b.c.items_rejected + _b.c.items_duplicate).label("done")


def payouts_done(conn: Connection, keys: Sequence[str]) -> dict[str, tuple[str, int]]:
    """Each known key's command status and items decided so far, in one read of narrow
    columns: what a watcher polls (payout_progress reads a batch not started yet from its
    payload, a megabyte to fetch and decode per batch per poll, beside workers paying)."""
    rows = conn.execute(
        select(_c.c.idempotency_key, _c.c.status, func.coalesce(_DONE, 0))
        .select_from(_c.outerjoin(_b, _b.c.command_id == _c.c.id))
        .where(_c.c.idempotency_key.in_(list(keys))))
    return {key: (status, int(done)) for key, status, done in rows}


def payout_item_rows(conn: Connection, key: str, scale: int, *, outcome: str | None = None,
                     limit: int = 100_000) -> list[dict[str, Any]]:
    """A payout's per-item outcomes, by index (items not yet reached have none)."""
    command_id = conn.execute(select(_c.c.id).where(_c.c.idempotency_key == key)).scalar()
    if command_id is None:  # the id only: the record's payload is megabytes
        return []
    query = (
        select(_i.c.item_index, _i.c.user_id, _i.c.amount_minor, _i.c.reference, _i.c.outcome,
               _i.c.error_code)
        .where(_i.c.command_id == command_id).order_by(_i.c.item_index).limit(limit))
    if outcome is not None:
        query = query.where(_i.c.outcome == outcome)
    rows = conn.execute(query)
    return [{"index": r.item_index, "user": r.user_id, "amount": format_minor(r.amount_minor, scale),
             "reference": r.reference, "outcome": r.outcome, "error": r.error_code} for r in rows]


def payout_totals(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The sums over the batches of one payout (a file split in several)."""
    reasons: dict[str, int] = {}
    for state in states:
        for code, count in (state.get("rejected_by_code") or {}).items():
            reasons[code] = reasons.get(code, 0) + count
    return {
        "batches": len(states),
        "items": sum(s.get("items", 0) for s in states),
        "done": sum(s.get("done", 0) for s in states),
        "paid": sum(s.get("paid", 0) for s in states),
        "rejected": sum(s.get("rejected", 0) for s in states),
        "duplicate": sum(s.get("duplicate", 0) for s in states),
        # Fixed-point, as each batch's own figure (str() of a Decimal sum at scale 8: '3E-8').
        "amount_paid": format(sum((Decimal(s.get("amount_paid", "0")) for s in states),
                                  Decimal(0)), "f"),
        "rejected_by_code": reasons,
    }


# --- invariant 5 ------------------------------------------------------------------------


def check_batch_transfers(facts: TransferFacts) -> str | None:
    """A payout's transfers are exactly its items paid (count and sum), and its items are
    exactly the ones its progress says it decided, whatever its status."""
    conn, command_id, n, s = facts.conn, facts.command_id, facts.count, facts.total_minor
    row = conn.execute(select(_b.c.items_paid, _b.c.items_rejected, _b.c.items_duplicate,
                              _b.c.amount_paid_minor, _b.c.status)
                       .where(_b.c.command_id == command_id)).one_or_none()
    paid = _i.c.outcome == "paid"
    items_n, paid_n, paid_s = conn.execute(
        select(func.count(), func.count().filter(paid),
               func.coalesce(func.sum(_i.c.amount_minor).filter(paid), 0))
        .where(_i.c.command_id == command_id)).one()
    if row is None:
        return f"{n} transfers, {items_n} items and no batch" if n or items_n else None
    decided = row.items_paid + row.items_rejected + row.items_duplicate
    if (n, s) != (row.items_paid, row.amount_paid_minor) or (paid_n, paid_s) != (n, s):
        return (f"{n} transfers of {s} minor units; batch paid {row.items_paid} of "
                f"{row.amount_paid_minor}; items paid {paid_n} of {paid_s}")
    if items_n != decided:
        return f"{items_n} items; the batch decided {decided}"
    return None
