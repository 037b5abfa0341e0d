"""Payout batches: many (user, amount, reference) items paid from one funding account, in chunks.

A batch runs as a sequence of short transactions, one per chunk of `chunk_items` items
(the whole batch in one, in atomic mode). Each chunk, under the command's row lock:
locks the funding account (recipients are only credited: the UPDATE that credits them
takes their row locks, by ascending id), reads which of its references were paid from that
account before, decides every item in plain Python (`decide`), opens the wallets of new
recipients in one statement (with what this chunk credits them as their opening balance),
then writes with set-based SQL — item outcomes and transfers each in one statement of
unnested arrays, every other balance in one UPDATE — with the batch's progress and one
audit row. Progress commits with the chunk, so a re-run (a redelivered or swept message)
resumes at the first item not yet decided; the unique index on paid items' (funding
account, reference) makes a second payment of a reference impossible. The command stays
`processing` until the last chunk writes `succeeded`.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import BigInteger, Boolean, Integer, Table, func, insert, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import TextClause

from services import command_store, schema
from services.atomic_transaction_manager import (
    BusinessRuleError,
    ForbiddenError,
    InsufficientBalanceError,
    TransactionIntegrityError,
    UnknownUserError,
    log_financial_operation,
)
from services.command_store import CommandRecord
from services.commands import PayoutBatch
from services.ledger import (
    LockedAccount,
    account_spec,
    apply_balance_deltas,
    insert_ignoring_conflicts,
    user_available,
)
from services.money import format_minor, to_minor
from services.settings import Settings

__all__ = [
    "Item",
    "Decision",
    "decide",
    "execute_payout_batch",
    "payout_progress",
    "payout_item_rows",
    "AFTER_CHUNK_HOOKS",
    "TIMINGS",
    "FUNDING_KINDS",
]

#: Accounts a batch may be paid from: the platform's two, or a user's spendable balance.
FUNDING_KINDS = frozenset({"treasury", "fees", "user_available"})
TRANSFER_KIND = "payout"

#: Test hooks, called after each committed chunk with (idempotency_key, chunks_done).
AFTER_CHUNK_HOOKS: list[Callable[[str, int], None]] = []


@dataclass
class PhaseTimings:
    """Seconds spent per phase of the chunks run in this process (the benchmark reads it)."""

    seconds: dict[str, float] = field(default_factory=dict)
    chunks: int = 0

    def add(self, phase: str, started: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - started
        return now

    def reset(self) -> None:
        self.seconds.clear()
        self.chunks = 0


TIMINGS = PhaseTimings()


# --- the decision: pure -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Item:
    index: int
    user: str
    amount_minor: int
    reference: str


class Decision(NamedTuple):
    item: Item
    outcome: str  # paid | rejected | duplicate
    error_code: str | None = None


def decide(
    items: Sequence[Item], paid_before: Iterable[str], balance_minor: int, funding_code: str
) -> list[Decision]:
    """Each item on its own, in order: a duplicate pays nothing; what the balance covers is paid.

    An item the remaining balance cannot cover is rejected `insufficient_balance`; a later,
    smaller one may still be paid. An item paying the funding account itself is `forbidden`.
    """
    seen = set(paid_before)
    spec = account_spec(funding_code)
    funding_user = spec.user_id if spec is not None and spec.kind == "user_available" else None
    decisions = []
    for item in items:
        if item.reference in seen:
            decisions.append(Decision(item, "duplicate"))
        elif item.user == funding_user:
            decisions.append(Decision(item, "rejected", ForbiddenError.code))
        elif item.amount_minor > balance_minor:
            decisions.append(Decision(item, "rejected", InsufficientBalanceError.code))
        else:
            balance_minor -= item.amount_minor
            decisions.append(Decision(item, "paid"))
    assert balance_minor >= 0, "Bug! a payout plan overdraws its funding account"
    return decisions


# --- the batch row ----------------------------------------------------------------------

_b = schema.payout_batches


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


_BATCH_COLUMNS = [_b.c[name] for name in Batch.__dataclass_fields__]


def _load_batch(conn: Connection, command_id: int) -> Batch | None:
    row = conn.execute(select(*_BATCH_COLUMNS).where(_b.c.command_id == command_id)).one_or_none()
    return None if row is None else Batch(*row)


def _start_batch(conn: Connection, command_id: int, command: PayoutBatch, items: Sequence[Item],
                 settings: Settings) -> Batch:
    chunk_items = len(items) if command.atomic else max(1, settings.payout_chunk_items)
    conn.execute(insert(_b).values(
        command_id=command_id, from_account=command.from_account, atomic=command.atomic,
        status="running", items_total=len(items),
        amount_total_minor=sum(item.amount_minor for item in items),
        chunk_items=chunk_items, chunks_total=math.ceil(len(items) / chunk_items),
    ))
    batch = _load_batch(conn, command_id)
    assert batch is not None
    return batch


def _funding_refusal(conn: Connection, from_account: str) -> BusinessRuleError | None:
    """Why this account may not fund a payout, or None; opens a platform account if missing."""
    spec = account_spec(from_account)
    if spec is None or spec.kind not in FUNDING_KINDS:
        return ForbiddenError(f"{from_account} may not fund a payout: only platform:treasury, "
                              "platform:fees or a user's available account", account=from_account)
    if spec.user_id is None:
        insert_ignoring_conflicts(conn, schema.accounts, [spec.row()], ["code"])
        return None
    a = schema.accounts
    if conn.execute(select(a.c.id).where(a.c.code == spec.code)).first() is None:
        return UnknownUserError(f"user {spec.user_id!r} has no wallet", user=spec.user_id)
    return None


# --- one chunk --------------------------------------------------------------------------


def _pg_array(values: Sequence[Any]) -> str:
    """A PostgreSQL array literal ('{...}'), sent as one string and parsed by array_in.

    A list parameter reaches the server as ARRAY[v1, v2, ...]: one expression node per
    element to parse and plan, ~15 ms per column of 5,000 values; this costs a fraction."""
    if not values:
        return "{}"
    first = values[0]
    if isinstance(first, str):
        try:
            joined = '","'.join(values)  # the common case: no NULL, nothing to escape
        except TypeError:
            joined = None
        if joined is not None and "\\" not in joined and '"' not in joined:
            return '{"' + joined + '"}'
    elif type(first) is int and None not in values:
        return "{" + ",".join(map(str, values)) + "}"
    first = next((v for v in values if v is not None), None)
    if isinstance(first, bool):
        return "{" + ",".join("NULL" if v is None else ("t" if v else "f") for v in values) + "}"
    if isinstance(first, int):
        return "{" + ",".join("NULL" if v is None else str(int(v)) for v in values) + "}"
    return "{" + ",".join(
        "NULL" if v is None else '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
        for v in values) + "}"


@functools.lru_cache(maxsize=16)
def _unnest_insert(table: Table, names: tuple[str, ...], conflict: str) -> TextClause:
    def array_type(name: str) -> str:
        type_ = table.c[name].type
        for kind, sql in ((BigInteger, "BIGINT"), (Integer, "INTEGER"), (Boolean, "BOOLEAN")):
            if isinstance(type_, kind):
                return f"{sql}[]"
        return "TEXT[]"

    arrays = ", ".join(f"CAST(:{name} AS {array_type(name)})" for name in names)
    return text(f"INSERT INTO {table.name} ({', '.join(names)}) "
                f"SELECT * FROM unnest({arrays}) {conflict}")


def _insert_rows(conn: Connection, table: Table, columns: dict[str, list[Any]], *,
                 conflict: str = "") -> None:
    """Many rows in one statement whose text does not depend on their number (PostgreSQL:
    one array per column, unnested), so it is compiled once and sent in one round trip."""
    if not next(iter(columns.values())):
        return
    if conn.dialect.name == "postgresql":
        conn.execute(_unnest_insert(table, tuple(columns), conflict),
                     {name: _pg_array(values) for name, values in columns.items()})
        return
    rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    if conflict:
        insert_ignoring_conflicts(conn, table, rows, ["code"])
    else:
        conn.execute(insert(table), rows)



@dataclass(frozen=True)
class ChunkOutcome:
    paid: int
    rejected: int
    duplicate: int
    amount_paid_minor: int


_ACCOUNT_COLUMNS = [schema.accounts.c[name] for name in
                    ("id", "code", "user_id", "balance_minor", "may_go_negative")]


def _lock_funding(conn: Connection, code: str) -> LockedAccount:
    """The funding account, locked: every chunk paid from it queues here, so its balance,
    and which references it paid, are read after the last chunk paying from it committed."""
    a = schema.accounts
    row = conn.execute(select(*_ACCOUNT_COLUMNS).where(a.c.code == code).with_for_update()
                       ).one_or_none()
    if row is None:
        raise TransactionIntegrityError(f"funding account {code} vanished")
    return LockedAccount(*row)


def _paid_before(conn: Connection, funding_id: int, references: list[str]) -> set[str]:
    """Which of these references this account paid, by any batch (a statement of its own,
    after the lock: in READ COMMITTED it sees what the chunks before it committed)."""
    i = schema.payout_items
    if conn.dialect.name == "postgresql":
        rows = conn.execute(_PAID_BEFORE, {"f": funding_id, "refs": _pg_array(references)})
    else:
        rows = conn.execute(select(i.c.reference).where(
            i.c.funding_account_id == funding_id, i.c.outcome == "paid",
            i.c.reference.in_(references)))
    return {reference for (reference,) in rows}


# One probe of the unique index per reference (LATERAL ... LIMIT 1 is never flattened into a
# hash join): the cost follows the chunk, not how many items the account paid before; with
# `reference = ANY(...)` and stale statistics the planner filters every earlier payment.
_PAID_BEFORE = text(
    "SELECT r.ref FROM unnest(CAST(:refs AS TEXT[])) AS r(ref), LATERAL (SELECT 1 FROM "
    "payout_items i WHERE i.funding_account_id = :f AND i.outcome = 'paid' "
    "AND i.reference = r.ref LIMIT 1) AS hit")

# One index probe per recipient (as above); missing wallets are opened at zero in the same
# statement (those another transaction opens meanwhile are skipped by ON CONFLICT and found
# afterwards). Every recipient is then credited by apply_balance_deltas, the one balance
# writer. One round trip.
_OPEN_WALLETS = text(
    "WITH found AS (SELECT a.id, a.code FROM unnest(CAST(:codes AS TEXT[])) AS c(code), "
    "LATERAL (SELECT id, code FROM accounts WHERE code = c.code LIMIT 1) AS a), "
    "opened AS (INSERT INTO accounts (code, kind, user_id, may_go_negative, balance_minor) "
    "SELECT w.code, :kind, w.user_id, false, 0 FROM unnest(CAST(:codes AS TEXT[]), "
    "CAST(:users AS TEXT[])) AS w(code, user_id) "
    "WHERE w.code NOT IN (SELECT code FROM found) ORDER BY w.code "
    "ON CONFLICT (code) DO NOTHING RETURNING id, code) "
    "SELECT id, code FROM found UNION ALL SELECT id, code FROM opened")


def _recipients(conn: Connection, users: Sequence[str]) -> dict[str, int]:
    """Each recipient's account id, opening missing wallets (at a zero balance)."""
    users = sorted(users)
    codes = [user_available(user).code for user in users]
    ids: dict[str, int] = {}
    if conn.dialect.name == "postgresql":
        spec = user_available(users[0])
        assert not spec.may_go_negative
        rows = conn.execute(_OPEN_WALLETS, {
            "codes": _pg_array(codes), "users": _pg_array(users), "kind": spec.kind})
        user_of = dict(zip(codes, users, strict=True))
        for account_id, code in rows:
            ids[user_of[code]] = account_id
    else:
        _insert_rows(conn, schema.accounts, {
            "code": codes, "kind": [user_available(u).kind for u in users], "user_id": users,
            "may_go_negative": [False] * len(users), "balance_minor": [0] * len(users)},
            conflict="ON CONFLICT (code) DO NOTHING")
    missing = [code for code, user in zip(codes, users, strict=True) if user not in ids]
    if missing:  # SQLite, or wallets another transaction opened after this statement began
        a = schema.accounts
        for account_id, user in conn.execute(select(a.c.id, a.c.user_id).where(
                a.c.code.in_(missing))):
            ids[user] = account_id
    if len(ids) != len(users):
        raise TransactionIntegrityError(f"Bug! {len(users) - len(ids)} recipients have no wallet")
    return ids


def _atomic_refusal(decisions: Sequence[Decision], funding: LockedAccount) -> BusinessRuleError:
    first = next(d for d in decisions if d.outcome == "rejected")
    item = first.item
    if first.error_code == ForbiddenError.code:
        return ForbiddenError(f"item {item.index} ({item.reference}) pays {funding.code} itself; "
                              "atomic batch refused whole", item=item.index)
    needed = sum(d.item.amount_minor for d in decisions if d.outcome != "duplicate")
    return InsufficientBalanceError(
        f"{funding.code} holds {funding.balance_minor} minor units; the batch needs {needed} "
        f"(item {item.index}, {item.reference}, is the first it cannot cover); "
        "atomic batch refused whole",
        account=funding.code, item=item.index)


def _apply_chunk(conn: Connection, batch: Batch, chunk: Sequence[Item]) -> ChunkOutcome:
    """Decide and pay one chunk with set-based SQL; raises a BusinessRuleError in atomic mode."""
    started = time.perf_counter()
    funding = _lock_funding(conn, batch.from_account)
    paid_before = _paid_before(conn, funding.id, [item.reference for item in chunk])
    started = TIMINGS.add("lock", started)
    decisions = decide(chunk, paid_before, funding.balance_minor, funding.code)
    paid = [d.item for d in decisions if d.outcome == "paid"]
    if batch.atomic and any(d.outcome == "rejected" for d in decisions):
        raise _atomic_refusal(decisions, funding)
    credits: dict[str, int] = {}
    for item in paid:
        if type(item.amount_minor) is not int or item.amount_minor <= 0:
            raise TransactionIntegrityError(f"payout amount {item.amount_minor!r} is not positive")
        credits[item.user] = credits.get(item.user, 0) + item.amount_minor
    amount_paid = sum(credits.values())
    if amount_paid > funding.balance_minor:
        raise TransactionIntegrityError("Bug! a chunk overdraws its funding account")
    ids = _recipients(conn, list(credits)) if credits else {}
    if funding.id in ids.values():
        raise TransactionIntegrityError(f"Bug! a payout from {funding.code} to itself")
    started = TIMINGS.add("decide", started)
    _insert_rows(conn, schema.payout_items, {
        "command_id": [batch.command_id] * len(decisions),
        "item_index": [d.item.index for d in decisions],
        "user_id": [d.item.user for d in decisions],
        "amount_minor": [d.item.amount_minor for d in decisions],
        "reference": [d.item.reference for d in decisions],
        "outcome": [d.outcome for d in decisions],
        "error_code": [d.error_code for d in decisions],
        "funding_account_id": [funding.id] * len(decisions)})
    _insert_rows(conn, schema.transfers, {
        "command_id": [batch.command_id] * len(paid),
        "debit_account_id": [funding.id] * len(paid),
        "credit_account_id": [ids[item.user] for item in paid],
        "amount_minor": [item.amount_minor for item in paid],
        "kind": [TRANSFER_KIND] * len(paid)})
    started = TIMINGS.add("insert", started)
    deltas = {ids[user]: credit for user, credit in credits.items()}
    deltas[funding.id] = -amount_paid
    apply_balance_deltas(conn, deltas)
    TIMINGS.add("update", started)
    return ChunkOutcome(len(paid), sum(d.outcome == "rejected" for d in decisions),
                        sum(d.outcome == "duplicate" for d in decisions), amount_paid)


# --- progress, outcome, audit -----------------------------------------------------------


def _record_progress(conn: Connection, batch: Batch, done: ChunkOutcome) -> Batch:
    now = datetime.now(UTC)
    chunks_done = batch.chunks_done + 1
    complete = batch.next_index + done.paid + done.rejected + done.duplicate == batch.items_total
    if complete != (chunks_done == batch.chunks_total):
        raise TransactionIntegrityError(f"Bug! payout {batch.command_id}: chunk {chunks_done} of "
                                        f"{batch.chunks_total} and complete={complete}")
    changed = conn.execute(
        update(_b).where(_b.c.command_id == batch.command_id, _b.c.chunks_done == batch.chunks_done)
        .values(chunks_done=chunks_done, items_paid=batch.items_paid + done.paid,
                items_rejected=batch.items_rejected + done.rejected,
                items_duplicate=batch.items_duplicate + done.duplicate,
                amount_paid_minor=batch.amount_paid_minor + done.amount_paid_minor,
                status="succeeded" if complete else "running", updated_at=now,
                completed_at=now if complete else None))
    if changed.rowcount != 1:
        raise TransactionIntegrityError(f"Bug! payout {batch.command_id} progressed under its lock")
    # A heartbeat: the sweep leaves alone a batch that is making progress.
    c = schema.commands
    conn.execute(update(c).where(c.c.id == batch.command_id).values(updated_at=now))
    return replace(batch, chunks_done=chunks_done, items_paid=batch.items_paid + done.paid,
                   items_rejected=batch.items_rejected + done.rejected,
                   items_duplicate=batch.items_duplicate + done.duplicate,
                   amount_paid_minor=batch.amount_paid_minor + done.amount_paid_minor,
                   status="succeeded" if complete else "running")


def _rejected_by_code(conn: Connection, command_id: int) -> dict[str, int]:
    i = schema.payout_items
    rows = conn.execute(select(i.c.error_code, func.count()).where(
        i.c.command_id == command_id, i.c.outcome == "rejected").group_by(i.c.error_code))
    return {code: count for code, count in rows}


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
        "rejected_by_code": _rejected_by_code(conn, batch.command_id),
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
    conn.execute(update(_b).where(_b.c.command_id == batch.command_id, _b.c.status == "running")
                 .values(status="rejected", updated_at=datetime.now(UTC)))
    command_store.finish(conn, batch.command_id, "rejected", error=error)
    _audit(conn, key, batch, "rejected", error=error, detail={"ids": exc.ids} if exc.ids else {})


# --- the executor -----------------------------------------------------------------------


def _items(command: PayoutBatch, scale: int) -> list[Item]:
    return [Item(index, item.user, to_minor(item.amount, scale), item.reference)
            for index, item in enumerate(command.items)]


def _lock_command(conn: Connection, key: str) -> tuple[int, str]:
    c = schema.commands
    row = conn.execute(select(c.c.id, c.c.status).where(c.c.idempotency_key == key)
                       .with_for_update()).one_or_none()
    if row is None:
        raise TransactionIntegrityError(f"Bug! payout {key} was claimed but has no command row")
    return row.id, row.status


def _step(conn: Connection, command: PayoutBatch, items: Sequence[Item],
          settings: Settings) -> tuple[bool, int]:
    """One transaction: the next chunk of the batch. Returns (finished, chunks_done)."""
    key = command.idempotency_key
    command_id, status = _lock_command(conn, key)
    if status in command_store.TERMINAL:
        return True, 0
    batch = _load_batch(conn, command_id)
    if batch is None:
        batch = _start_batch(conn, command_id, command, items, settings)
        refusal = _funding_refusal(conn, command.from_account)
        if refusal is not None:
            _reject(conn, key, batch, refusal)
            return True, 0
    if batch.status != "running":
        raise TransactionIntegrityError(f"Bug! payout {key} is {batch.status}, its command {status}")
    chunk = items[batch.next_index:batch.next_index + batch.chunk_items]
    try:
        done = _apply_chunk(conn, batch, chunk)
    except BusinessRuleError as exc:  # atomic mode: nothing was written
        _reject(conn, key, batch, exc)
        return True, 0
    started = time.perf_counter()
    fresh = _record_progress(conn, batch, done)
    _audit(conn, key, fresh, "chunk", done=done, detail={
        "chunk": fresh.chunks_done, "items": [chunk[0].index, chunk[-1].index],
        "paid": done.paid, "rejected": done.rejected, "duplicate": done.duplicate})
    finished = fresh.status == "succeeded"
    if finished:
        result = _result(conn, fresh, settings.asset_scale)
        command_store.finish(conn, command_id, "succeeded", result=result)
        _audit(conn, key, fresh, "succeeded", detail=result)
    TIMINGS.add("progress", started)
    if settings.test_delay_s:
        time.sleep(settings.test_delay_s)  # fault tests: a window to kill the worker mid-chunk
    return finished, fresh.chunks_done


def execute_payout_batch(engine: Engine, command: PayoutBatch, settings: Settings) -> CommandRecord:
    """Run the batch's remaining chunks, one transaction each; the BATCH_EXECUTORS entry."""
    from services.command_executor import run_transaction

    items = _items(command, settings.asset_scale)
    key = command.idempotency_key
    while True:
        started = time.perf_counter()
        finished, chunks_done = run_transaction(
            engine, settings, f"payout {key}", lambda conn: _step(conn, command, items, settings))
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


# --- reads ------------------------------------------------------------------------------


def payout_progress(conn: Connection, key: str, scale: int) -> dict[str, Any] | None:
    """A payout's command status and batch progress, or None if no such command."""
    record = command_store.get_record(conn, key)
    if record is None:
        return None
    batch = _load_batch(conn, record.id)
    out: dict[str, Any] = {"idempotency_key": key, "type": record.type, "status": record.status,
                           "error": record.error, "created_at": command_store.iso(record.created_at),
                           "completed_at": command_store.iso(record.completed_at)}
    if record.type != "payout_batch":
        return out
    if batch is None:  # accepted, not started: its size comes from the payload
        payload = record.payload_dict()
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
                "rejected_by_code": _rejected_by_code(conn, batch.command_id)})
    return out


def payout_item_rows(conn: Connection, key: str, scale: int, *, outcome: str | None = None,
                     limit: int = 100_000) -> list[dict[str, Any]]:
    """A payout's per-item outcomes, by index (items not yet reached have none)."""
    i, c = schema.payout_items, schema.commands
    query = (
        select(i.c.item_index, i.c.user_id, i.c.amount_minor, i.c.reference, i.c.outcome,
               i.c.error_code)
        .join(c, c.c.id == i.c.command_id).where(c.c.idempotency_key == key)
        .order_by(i.c.item_index).limit(limit))
    if outcome is not None:
        query = query.where(i.c.outcome == outcome)
    rows = conn.execute(query)
    return [{"index": r.item_index, "user": r.user_id, "amount": format_minor(r.amount_minor, scale),
             "reference": r.reference, "outcome": r.outcome, "error": r.error_code} for r in rows]


# --- invariant 5 ------------------------------------------------------------------------


def check_batch_transfers(conn: Connection, command_id: int, n: int, s: int) -> str | None:
    """A payout's transfers are exactly its items paid (count and sum), and its items are
    exactly the ones its progress says it decided, whatever its status."""
    i = schema.payout_items
    row = conn.execute(select(_b.c.items_paid, _b.c.items_rejected, _b.c.items_duplicate,
                              _b.c.amount_paid_minor, _b.c.status)
                       .where(_b.c.command_id == command_id)).one_or_none()
    paid = i.c.outcome == "paid"
    items_n, paid_n, paid_s = conn.execute(
        select(func.count(), func.count().filter(paid),
               func.coalesce(func.sum(i.c.amount_minor).filter(paid), 0))
        .where(i.c.command_id == command_id)).one()
    if row is None:
        return f"{n} transfers, {items_n} items and no batch" if n or items_n else None
    decided = row.items_paid + row.items_rejected + row.items_duplicate
    if (n, s) != (row.items_paid, row.amount_paid_minor) or (paid_n, paid_s) != (n, s):
        return (f"{n} transfers of {s} minor units; batch paid {row.items_paid} of "
                f"{row.amount_paid_minor}; items paid {paid_n} of {paid_s}")
    if items_n != decided:
        return f"{items_n} items; the batch decided {decided}"
    return None


def _register() -> None:
    from services.command_executor import BATCH_EXECUTORS
    from services.verify import BATCH_CHECKS

    BATCH_EXECUTORS["payout_batch"] = execute_payout_batch
    BATCH_CHECKS["payout_batch"] = check_batch_transfers


_register()
