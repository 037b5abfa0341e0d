"""A command's record as the `commands` table holds it, the row a new command becomes, and
the reads of records.

One row per idempotency key: the command's canonical payload and its hash, its producer,
what the producer signed and the signature (as first accepted), its status, result, error
and attempts. Idempotency is data: a status that only moves forward (see
services.command_status) and a payload hash compared on every sending; the hash leaves the
signature out, so a retry signed afresh is the same command.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, and_, bindparam, case, func, null, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Row

from services import schema
from services.canonical import canonical_payload, payload_hash
from services.command_fields import CommandBase
from services.command_status import ENDED, STUCK, TERMINAL, CommandStatus
from services.errors import IdempotencyConflictError
from services.signing import Signed

__all__ = [
    "CommandRecord",
    "ERROR_MESSAGE_LENGTH_MAX",
    "iso",
    "aware",
    "utc_now",
    "NOW",
    "insert_row",
    "insert_new_row",
    "row_params",
    "conflict",
    "get_record",
    "ended_record",
    "accepted_at",
    "get_records",
    "keys_by_id",
    "list_records",
    "count_by_status",
]

_c = schema.commands
ERROR_MESSAGE_LENGTH_MAX = 2000
#: One query per this many keys: SQLite allows 32,766 bound parameters.
_KEYS_PER_QUERY_MAX = 1000


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 UTC; SQLite hands back naive datetimes that are UTC already."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def aware(moment: datetime) -> datetime:
    """A timestamp in UTC; SQLite hands back naive datetimes that are UTC already."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


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
    producer: str | None
    signed_payload: str | None
    signature: str | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> CommandRecord:
        return cls(**row._mapping)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def untouched(self) -> bool:
        """Accepted and never delivered, swept or re-driven: its first delivery may take the
        lean path (one transaction), since nothing is known against it yet."""
        return (self.status == CommandStatus.ACCEPTED and self.attempts == 0
                and self.updated_at == self.created_at)

    def is_stuck(self, grace_s: float, now: datetime | None = None) -> bool:
        """Not ended, and untouched for longer than the sweep's grace period."""
        now = now or datetime.now(UTC)
        return (self.status in STUCK
                and aware(self.updated_at) < now - timedelta(seconds=grace_s))

    @property
    def error(self) -> dict[str, str] | None:
        if self.error_code is None:
            return None
        return {"code": self.error_code, "message": self.error_message or ""}

    def to_dict(self) -> dict[str, Any]:
        """The command record of the CLI contract (docs/ARCHITECTURE.md, "Interfaces")."""
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

    @property
    def accepted_at(self) -> datetime:
        """When the command was first recorded, in UTC: its key had to be valid then."""
        return aware(self.created_at)

    @property
    def signed(self) -> Signed | None:
        if self.producer is None or self.signed_payload is None or self.signature is None:
            return None
        return Signed(self.producer, self.signed_payload, self.signature)

    def message(self) -> dict[str, Any]:
        """What a sweep or a redrive publishes: the command as its producer signed it, with
        its signature, so the worker verifies the stored row itself. A row without one (a
        row written by hand) goes as stored, and the worker refuses it."""
        signed = self.signed
        return signed.message() if signed is not None else self.payload_dict()


def utc_now() -> datetime:
    """The time a record's clocks are set to (created, updated, completed)."""
    return datetime.now(UTC)


NOW = bindparam("now", type_=DateTime(timezone=True))


@functools.cache
def insert_new_row(dialect_name: str, status: str, attempts: int) -> Any:
    """`insert_row` that takes no key taken already, returning the row it made (nothing
    when the key was taken). Built once per dialect and status: construction costs more
    than its round trip."""
    return (insert_row(dialect_name, status, attempts)
            .on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(*_c.c))


def insert_row(dialect_name: str, status: str, attempts: int) -> Any:
    """A new command row from the parameters of row_params."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    return dialect.insert(_c).values(
        idempotency_key=bindparam("key"), type=bindparam("type"), payload=bindparam("payload"),
        payload_hash=bindparam("digest"), status=status, attempts=attempts, created_at=NOW,
        updated_at=NOW, producer=bindparam("producer"), signed_payload=bindparam("signed"),
        signature=bindparam("signature"),
    )


def row_params(command: CommandBase, signed: Signed) -> dict[str, Any]:
    if signed.producer != command.producer:
        raise AssertionError("Bug! a command stored with another producer's signature")
    canonical = canonical_payload(command)
    return {"key": command.idempotency_key, "type": command.type, "payload": canonical,
            "digest": payload_hash(canonical), "now": utc_now(), "producer": signed.producer,
            "signed": signed.text, "signature": signed.signature}


def conflict(command: CommandBase, record: CommandRecord) -> IdempotencyConflictError:
    # Nothing of the first command (its type, status, result, producer) is told: the key
    # may be another producer's.
    return IdempotencyConflictError(
        f"idempotency key {command.idempotency_key!r} was used for another payload; "
        "that command is untouched",
        idempotency_key=command.idempotency_key,
    )


def get_record(conn: Connection, key: str) -> CommandRecord | None:
    row = conn.execute(select(_c).where(_c.c.idempotency_key == key)).one_or_none()
    return None if row is None else CommandRecord.from_row(row)


#: The texts of a row (a payout's are megabytes each), read by `ended_record` only when
#: the row ended and names the given signer; NULL otherwise (both columns are NOT NULL in
#: a row, so NULL says the row was not the one asked for), and never decompressed then.
_TEXTS = ("payload", "signed_payload")


def _ended_by_signer() -> Any:
    return and_(_c.c.status.in_(sorted(ENDED)), _c.c.producer == bindparam("producer"),
                _c.c.signature == bindparam("signature"))


_ENDED_RECORD = select(*[
    case((_ended_by_signer(), column), else_=null()).label(column.name)
    if column.name in _TEXTS else column for column in _c.c
]).where(_c.c.idempotency_key == bindparam("key"))


def ended_record(conn: Connection, key: str, signed: Signed) -> CommandRecord | None:
    """The record under this key if it ended and carries this producer and signature, in
    one indexed read; None otherwise, its texts left unread (a first delivery's row has not
    ended: its payload and signed form are not fetched to learn that). The caller still
    holds the message to the whole signed text."""
    row = conn.execute(_ENDED_RECORD, {"key": key, "producer": signed.producer,
                                       "signature": signed.signature}).one_or_none()
    if row is None or row.payload is None:
        return None
    return CommandRecord.from_row(row)


def accepted_at(conn: Connection, key: str) -> datetime | None:
    """When the command under this key was first recorded (None: there is none)."""
    moment = conn.execute(select(_c.c.created_at).where(_c.c.idempotency_key == key)).scalar()
    return None if moment is None else aware(moment)


def get_records(conn: Connection, keys: Iterable[str]) -> list[CommandRecord]:
    """The records of these keys (unknown keys have none), in bounded queries."""
    keys = list(keys)
    records: list[CommandRecord] = []
    for start in range(0, len(keys), _KEYS_PER_QUERY_MAX):
        chunk = keys[start:start + _KEYS_PER_QUERY_MAX]
        records += [CommandRecord.from_row(row)
                    for row in conn.execute(select(_c).where(_c.c.idempotency_key.in_(chunk)))]
    return records


def keys_by_id(conn: Connection, ids: Iterable[int]) -> dict[int, str]:
    """Command id → idempotency key, for reads that show which command moved money."""
    ids = sorted(ids)
    keys: dict[int, str] = {}
    for start in range(0, len(ids), _KEYS_PER_QUERY_MAX):
        chunk = ids[start:start + _KEYS_PER_QUERY_MAX]
        keys.update((command_id, key) for command_id, key in conn.execute(
            select(_c.c.id, _c.c.idempotency_key).where(_c.c.id.in_(chunk))))
    return keys


def list_records(
    conn: Connection, *, status: str | None = None, limit: int = 100, after_id: int = 0
) -> list[CommandRecord]:
    query = select(_c).where(_c.c.id > after_id).order_by(_c.c.id).limit(min(limit, 10_000))
    if status is not None:
        query = query.where(_c.c.status == status)
    return [CommandRecord.from_row(row) for row in conn.execute(query)]


def count_by_status(conn: Connection) -> dict[str, int]:
    rows = conn.execute(select(_c.c.status, func.count()).group_by(_c.c.status))
    return {status: count for status, count in rows}


