"""The `commands` table: the idempotency record, the outbox and each command's outcome.

Idempotency is data: a key, the hash of its canonical payload, a status that only moves
forward (accepted → processing → succeeded | rejected | failed; failed may run again).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, and_, bindparam, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Row

from services import schema
from services.atomic_transaction_manager import IdempotencyConflictError
from services.commands import Command, canonical_payload, payload_hash

__all__ = [
    "TERMINAL",
    "CommandRecord",
    "accept",
    "claim",
    "finish",
    "get_record",
    "list_records",
    "stale_keys",
    "lock_record",
    "count_by_status",
    "iso",
]

TERMINAL = frozenset({"succeeded", "rejected"})
_c = schema.commands


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 UTC; SQLite hands back naive datetimes that are UTC already."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class CommandRecord:
    id: int
    idempotency_key: str
    type: str
    status: str
    payload: str
    payload_hash: str
    result: dict[str, Any] | None
    error_code: str | None
    error_message: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> CommandRecord:
        return cls(**row._mapping)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def error(self) -> dict[str, str] | None:
        if self.error_code is None:
            return None
        return {"code": self.error_code, "message": self.error_message or ""}

    def to_dict(self) -> dict[str, Any]:
        """The command record of DESIGN.md's CLI contract."""
        return {
            "idempotency_key": self.idempotency_key,
            "type": self.type,
            "status": self.status,
            "result": self.result,
            "error": self.error,
            "attempts": self.attempts,
            "created_at": iso(self.created_at),
            "completed_at": iso(self.completed_at),
        }

    def payload_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.payload)
        return data


def _now() -> datetime:
    return datetime.now(UTC)


_NOW = bindparam("now", type_=DateTime(timezone=True))


def _insert(dialect_name: str, status: str, attempts: int) -> Any:
    """A new command row from the parameters of _row_params; built once per use (cached)."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    return dialect.insert(_c).values(
        idempotency_key=bindparam("key"), type=bindparam("type"), payload=bindparam("payload"),
        payload_hash=bindparam("digest"), status=status, attempts=attempts, created_at=_NOW,
        updated_at=_NOW,
    )


def _row_params(command: Command) -> dict[str, Any]:
    canonical = canonical_payload(command)
    return {"key": command.idempotency_key, "type": command.type, "payload": canonical,
            "digest": payload_hash(canonical), "now": _now()}


@functools.cache
def _accept_statement(dialect_name: str) -> Any:
    return (_insert(dialect_name, "accepted", 0)
            .on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(*_c.c))


def accept(conn: Connection, command: Command) -> tuple[CommandRecord, bool]:
    """Record the command as `accepted` (the outbox), or find it: (record, newly recorded).

    A duplicate is returned as it stands, locked and untouched (touching updated_at would
    postpone the sweep); another payload under the key raises IdempotencyConflictError.
    """
    params = _row_params(command)
    row = conn.execute(_accept_statement(conn.dialect.name), params).one_or_none()
    if row is not None:
        return CommandRecord.from_row(row), True
    record = _locked(conn, command.idempotency_key)
    if record.payload_hash != params["digest"]:
        raise _conflict(command, record)
    return record, False


@functools.cache
def _claim_statement(dialect_name: str) -> Any:
    """Built once per dialect: statement construction costs more than its round trip."""
    stmt = _insert(dialect_name, "processing", 1)
    return stmt.on_conflict_do_update(
        index_elements=["idempotency_key"],
        set_={"status": "processing", "attempts": _c.c.attempts + 1, "updated_at": _NOW},
        where=and_(_c.c.payload_hash == stmt.excluded.payload_hash,
                   _c.c.status.not_in(sorted(TERMINAL))),
    ).returning(*_c.c)


def claim(conn: Connection, command: Command) -> CommandRecord:
    """Record the command (or find it) as `processing`, count the attempt, lock its row.

    One INSERT ... ON CONFLICT DO UPDATE ... RETURNING on the common path; the update is
    skipped (and the row read back unlocked) when the key holds another payload, raised
    as IdempotencyConflictError, or a terminal outcome, which is returned as stored.
    """
    params = _row_params(command)
    row = conn.execute(_claim_statement(conn.dialect.name), params).one_or_none()
    if row is not None:
        return CommandRecord.from_row(row)
    record = get_record(conn, command.idempotency_key)
    assert record is not None, "a key that conflicted has no row"
    if record.payload_hash != params["digest"]:
        raise _conflict(command, record)
    assert record.terminal, "an upsert skipped a non-terminal command"
    return record


def _conflict(command: Command, record: CommandRecord) -> IdempotencyConflictError:
    return IdempotencyConflictError(
        f"idempotency key {command.idempotency_key!r} was used for another payload "
        f"({record.type}, {record.status})",
        idempotency_key=command.idempotency_key,
    )


_LOCK_BY_KEY = select(_c).where(_c.c.idempotency_key == bindparam("key")).with_for_update()


def _locked(conn: Connection, key: str) -> CommandRecord:
    return CommandRecord.from_row(conn.execute(_LOCK_BY_KEY, {"key": key}).one())


def lock_record(conn: Connection, key: str) -> CommandRecord | None:
    row = conn.execute(_LOCK_BY_KEY, {"key": key}).one_or_none()
    return None if row is None else CommandRecord.from_row(row)


_FINISH = (
    update(_c)
    .where(_c.c.id == bindparam("command_id"), _c.c.status.not_in(sorted(TERMINAL)))
    .values(status=bindparam("status"), result=bindparam("result", type_=_c.c.result.type),
            error_code=bindparam("error_code"), error_message=bindparam("error_message"),
            updated_at=_NOW,
            completed_at=bindparam("completed_at", type_=DateTime(timezone=True)))
    .returning(*_c.c)
)


def finish(
    conn: Connection,
    command_id: int,
    status: str,
    *,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> CommandRecord:
    """Write a command's outcome; in the transaction of its effects, so both or neither."""
    now = _now()
    row = conn.execute(_FINISH, {
        "command_id": command_id,
        "status": status,
        "result": result,
        "error_code": None if error is None else error["code"],
        "error_message": None if error is None else str(error["message"])[:2000],
        "now": now,
        "completed_at": now if status in TERMINAL else None,
    }).one_or_none()
    if row is None:
        raise AssertionError(f"Bug! command {command_id} finished twice")
    return CommandRecord.from_row(row)


def get_record(conn: Connection, key: str) -> CommandRecord | None:
    row = conn.execute(select(_c).where(_c.c.idempotency_key == key)).one_or_none()
    return None if row is None else CommandRecord.from_row(row)


def list_records(
    conn: Connection, *, status: str | None = None, limit: int = 100, after_id: int = 0
) -> list[CommandRecord]:
    query = select(_c).where(_c.c.id > after_id).order_by(_c.c.id).limit(min(limit, 10_000))
    if status is not None:
        query = query.where(_c.c.status == status)
    return [CommandRecord.from_row(row) for row in conn.execute(query)]


def stale_keys(
    conn: Connection, *, grace_s: float, limit: int, statuses: Sequence[str] = ("accepted",
                                                                             "processing")
) -> list[CommandRecord]:
    """Commands left before a terminal status for longer than the grace period, oldest first."""
    cutoff = _now() - timedelta(seconds=grace_s)
    rows = conn.execute(
        select(_c)
        .where(_c.c.status.in_(list(statuses)), _c.c.updated_at < cutoff)
        .order_by(_c.c.updated_at)
        .limit(limit)
    )
    return [CommandRecord.from_row(row) for row in rows]


def count_by_status(conn: Connection) -> dict[str, int]:
    rows = conn.execute(select(_c.c.status, func.count()).group_by(_c.c.status))
    return {status: count for status, count in rows}
