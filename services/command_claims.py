"""The queries a worker or a sweep takes commands with: claim a delivery, lock the untouched
ones for the lean path, take the stale ones, keep a long one's clock going, lock a row.

Each locks what it returns until the caller's transaction ends; rows another transaction
holds are skipped, never waited for, where a worker or a sweep only looks for work.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Text, and_, any_, bindparam, func, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from services import schema
from services.bulk_sql import execute_reusable, pg_array
from services.command_fields import CommandBase
from services.command_records import (
    NOW,
    CommandRecord,
    conflict,
    get_record,
    insert_new_row,
    insert_row,
    row_params,
    utc_now,
)
from services.command_status import STUCK, CommandStatus
from services.signing import Signed

__all__ = [
    "claim",
    "insert_processing",
    "lock_untouched",
    "stale_cutoff",
    "claim_stale",
    "heartbeat",
    "lock",
    "lock_record",
]

_c = schema.commands


@functools.cache
def _claim_statement(dialect_name: str) -> Any:
    """Built once per dialect: statement construction costs more than its round trip."""
    stmt = insert_row(dialect_name, CommandStatus.PROCESSING, 1)
    return stmt.on_conflict_do_update(
        index_elements=["idempotency_key"],
        set_={"status": CommandStatus.PROCESSING.value, "attempts": _c.c.attempts + 1,
              "updated_at": NOW},
        # A failed command is not claimed: a duplicate gets its stored outcome (only a
        # redrive runs it again), so its first error and audit row stand.
        where=and_(_c.c.payload_hash == stmt.excluded.payload_hash,
                   _c.c.status.in_(sorted(STUCK))),
    ).returning(*_c.c)


def claim(conn: Connection, command: CommandBase, signed: Signed) -> CommandRecord:
    """Record the command (or find it) as `processing`, count the attempt, lock its row.

    One INSERT ... ON CONFLICT DO UPDATE ... RETURNING on the common path; the update is
    skipped (and the row read back unlocked) when the key holds another payload, raised
    as IdempotencyConflictError, or a terminal outcome, which is returned as stored. A
    row found keeps the signature it was first accepted with.
    """
    params = row_params(command, signed)
    row = conn.execute(_claim_statement(conn.dialect.name), params).one_or_none()
    if row is not None:
        return CommandRecord.from_row(row)
    record = get_record(conn, command.idempotency_key)
    assert record is not None, "a key that conflicted has no row"
    if record.payload_hash != params["digest"]:
        raise conflict(command, record)
    assert record.ended, "an upsert skipped a command that has not ended"
    return record


def insert_processing(conn: Connection, command: CommandBase, signed: Signed
                      ) -> CommandRecord | None:
    """Record a command met for the first time as `processing` (one attempt), its row
    locked until the transaction ends; None when the key is taken (the caller claims)."""
    row = execute_reusable(conn, insert_new_row(conn.dialect.name, CommandStatus.PROCESSING, 1),
                           row_params(command, signed)).one_or_none()
    return None if row is None else CommandRecord.from_row(row)


def _text_array(name: str) -> Any:
    """An array parameter sent as one literal (bulk_sql.pg_array): the statement's text does
    not change with the number of values, so it can be prepared (PostgreSQL only)."""
    return func.cast(bindparam(name), postgresql.ARRAY(Text))


def _untouched(*, keys: bool, exclude: bool) -> Any:
    query = (select(_c).where(_c.c.status == CommandStatus.ACCEPTED.value, _c.c.attempts == 0,
                              _c.c.updated_at == _c.c.created_at,
                              _c.c.type == any_(_text_array("types")))
             .order_by(_c.c.updated_at, _c.c.id).limit(bindparam("limit"))
             .with_for_update(skip_locked=True))
    if keys:
        query = query.where(_c.c.idempotency_key == any_(_text_array("keys")))
    if exclude:
        query = query.where(_c.c.idempotency_key != bindparam("first"))
    return query


@functools.cache
def _untouched_statement(keys: bool) -> Any:
    return _untouched(keys=keys, exclude=False)


@functools.cache
def _untouched_after_statement() -> Any:
    """The row under `first` if it is untouched and free, then up to `limit` others: one
    round trip for a worker's trigger and the company it coalesces."""
    first = (select(_c).where(_c.c.idempotency_key == bindparam("first"),
                              _c.c.status == CommandStatus.ACCEPTED.value, _c.c.attempts == 0,
                              _c.c.updated_at == _c.c.created_at)
             .with_for_update(skip_locked=True).cte("first_row"))
    others = _untouched(keys=False, exclude=True).cte("other_rows")
    return select(first).union_all(select(others))


def lock_untouched(conn: Connection, *, types: Iterable[str], limit: int,
                   keys: Sequence[str] | None = None, first: str | None = None
                   ) -> list[CommandRecord]:
    """Untouched commands of these types (see CommandRecord.untouched), oldest first, at most
    `limit`, locked: rows another transaction holds are skipped, never waited for (FOR
    UPDATE SKIP LOCKED). Only those under `keys` when given. With `first`, the row under
    that key comes first when it is untouched and free (of any type), then `limit` others."""
    params: dict[str, Any] = {"types": pg_array(sorted(types)), "limit": limit}
    if first is not None:
        statement = _untouched_after_statement()
        params["first"] = first
    else:
        statement = _untouched_statement(keys is not None)
        if keys is not None:
            params["keys"] = pg_array(list(keys))
    rows = [CommandRecord.from_row(row) for row in execute_reusable(conn, statement, params)]
    if first is not None and rows and rows[0].idempotency_key != first:
        rows = [row for row in rows if row.idempotency_key != first]
    return rows



def stale_cutoff(grace_s: float) -> datetime:
    """Commands whose clock stands before this are stuck. A sweep takes it once per run:
    the clocks it restarts are after it, so one run never takes a command twice (with a
    grace of 0 a cutoff taken per batch would take the same commands again each batch)."""
    return utc_now() - timedelta(seconds=grace_s)


def claim_stale(conn: Connection, *, cutoff: datetime, limit: int) -> list[CommandRecord]:
    """The oldest commands stuck since before `cutoff`, their clocks restarted so that no
    concurrent sweep takes them too. A row another transaction holds (a long apply, another
    sweep) is skipped, never waited for (FOR UPDATE SKIP LOCKED): the sweep goes on with the
    rest, and a later run finds it if it is still stuck."""
    stale = [CommandRecord.from_row(row) for row in conn.execute(
        select(_c).where(_c.c.status.in_(sorted(STUCK)), _c.c.updated_at < cutoff)
        .order_by(_c.c.updated_at).limit(limit).with_for_update(skip_locked=True))]
    if not stale:
        return []
    claimed = set(conn.execute(
        update(_c)
        .where(_c.c.id.in_([r.id for r in stale]), _c.c.status.in_(sorted(STUCK)),
               _c.c.updated_at < cutoff)
        .values(updated_at=utc_now())
        .returning(_c.c.id)
    ).scalars().all())
    return [record for record in stale if record.id in claimed]


def heartbeat(conn: Connection, command_id: int) -> None:
    """A long command making progress restarts its clock: the sweep leaves it alone."""
    conn.execute(update(_c).where(_c.c.id == command_id).values(updated_at=utc_now()))


_LOCK_BY_KEY = select(_c).where(_c.c.idempotency_key == bindparam("key")).with_for_update()


def lock(conn: Connection, key: str) -> CommandRecord | None:
    """The command row, locked FOR UPDATE until the caller's transaction ends."""
    row = execute_reusable(conn, _LOCK_BY_KEY, {"key": key}).one_or_none()
    return None if row is None else CommandRecord.from_row(row)


lock_record = lock
