"""The `commands` table: recording commands and their outcomes.

One row per idempotency key: the command's canonical payload and its hash, its producer,
what the producer signed and the signature (as first accepted), its status, result, error
and attempts. It is the idempotency record, the outbox a producer publishes from, and each
command's outcome. Idempotency is data: a status that only moves forward (see
services.command_status) and a payload hash compared on every sending; the hash leaves the
signature out, so a retry signed afresh is the same command.

With `services.command_records` (the record and its reads) and `services.command_claims`
(what a worker or a sweep locks and claims), the only modules that read or write the
table; every name of theirs is re-exported here, so that a caller names one module.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, bindparam, text, update
from sqlalchemy.engine import Connection

from services import schema
from services.bulk_sql import (
    Pending,
    execute_reusable,
    execute_together,
    insert_ignoring_conflicts,
    pg_array,
)
from services.canonical import payload_hash
from services.command_claims import (
    claim,
    claim_stale,
    heartbeat,
    insert_processing,
    lock,
    lock_record,
    lock_untouched,
    stale_cutoff,
)
from services.command_fields import CommandBase
from services.command_records import (
    ERROR_MESSAGE_LENGTH_MAX,
    NOW,
    CommandRecord,
    accepted_at,
    aware,
    conflict,
    count_by_status,
    ended_record,
    get_record,
    get_records,
    insert_new_row,
    iso,
    keys_by_id,
    list_records,
    row_params,
    utc_now,
)
from services.command_status import ENDED, STUCK, TERMINAL, CommandStatus
from services.errors import IdempotencyConflictError
from services.signing import Signed

__all__ = [
    "TERMINAL",
    "ENDED",
    "STUCK",
    "CommandRecord",
    "accept",
    "claim",
    "insert_processing",
    "lock_untouched",
    "finish",
    "Finish",
    "finish_many",
    "Finishing",
    "finishing",
    "accept_many",
    "conflict",
    "refuse",
    "redrive",
    "claim_stale",
    "stale_cutoff",
    "heartbeat",
    "lock",
    "lock_record",
    "get_record",
    "ended_record",
    "accepted_at",
    "get_records",
    "keys_by_id",
    "list_records",
    "count_by_status",
    "iso",
    "aware",
]

_c = schema.commands


def accept(conn: Connection, command: CommandBase, signed: Signed
           ) -> tuple[CommandRecord, bool]:
    """Record the command as `accepted` (the outbox), or find it: (record, newly recorded).

    A duplicate is returned as it stands, read and untouched (touching updated_at would
    postpone the sweep); another payload under the key raises IdempotencyConflictError.
    It is read, not locked: the producer's database role may insert and read commands,
    never lock or update them (services/db_roles.py), and the row the conflict found is
    committed (ON CONFLICT waits for a concurrent inserter to end).
    """
    params = row_params(command, signed)
    row = execute_reusable(conn, insert_new_row(conn.dialect.name, CommandStatus.ACCEPTED, 0),
                           params).one_or_none()
    if row is not None:
        return CommandRecord.from_row(row), True
    record = get_record(conn, command.idempotency_key)
    assert record is not None, "a key that conflicted has no row"
    if record.payload_hash != params["digest"]:
        raise conflict(command, record)
    return record, False



_FINISH = (
    update(_c)
    .where(_c.c.id == bindparam("command_id"), _c.c.status.not_in(sorted(TERMINAL)))
    .values(status=bindparam("status"), result=bindparam("result", type_=_c.c.result.type),
            error_code=bindparam("error_code"), error_message=bindparam("error_message"),
            updated_at=NOW,
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
    now = utc_now()
    row = conn.execute(_FINISH, {
        "command_id": command_id,
        "status": status,
        "result": result,
        "error_code": None if error is None else error["code"],
        "error_message": None if error is None else str(error["message"])[:ERROR_MESSAGE_LENGTH_MAX],
        "now": now,
        "completed_at": now if status in TERMINAL else None,
    }).one_or_none()
    if row is None:
        raise AssertionError(f"Bug! command {command_id} finished twice")
    return CommandRecord.from_row(row)


@dataclass(frozen=True)
class Finish:
    """One command's outcome, for finish_many: `record` is its row as this transaction
    locked it (the finished record is made from it); `attempts_added` is 1 when this
    delivery was not counted by a claim before (the lean path)."""

    record: CommandRecord
    status: str
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    attempts_added: int = 0

    @property
    def command_id(self) -> int:
        return self.record.id

    def finished(self, now: datetime) -> CommandRecord:
        """The record as _FINISH_MANY leaves it (every column it writes is known here)."""
        error = self.error
        return dataclasses.replace(
            self.record, status=self.status, result=self.result,
            error_code=None if error is None else error["code"],
            error_message=None if error is None else _message(error),
            attempts=self.record.attempts + self.attempts_added, updated_at=now,
            completed_at=now)


# No RETURNING: the finished records are known without reading the rows back (nor their
# payloads, a kilobyte or more each); _ENDED_HERE says how many this statement ended.
_FINISH_MANY = text(
    "UPDATE commands SET status = v.status, result = CAST(v.result AS JSON), "
    "error_code = v.code, error_message = v.message, attempts = commands.attempts + v.added, "
    "updated_at = :now, completed_at = :now "
    "FROM unnest(CAST(:ids AS BIGINT[]), CAST(:statuses AS TEXT[]), CAST(:results AS TEXT[]), "
    "CAST(:codes AS TEXT[]), CAST(:messages AS TEXT[]), CAST(:added AS INTEGER[])) "
    "AS v(id, status, result, code, message, added) "
    "WHERE commands.id = v.id AND commands.status IN ('accepted', 'processing')")
_ENDED_HERE = text("SELECT count(*) FROM commands WHERE id = ANY(CAST(:ids AS BIGINT[])) "
                   "AND updated_at = :now")


@dataclass(frozen=True)
class Finishing:
    """finish_many's statements on PostgreSQL, to send with others in one round trip
    (bulk_sql.execute_together): `update` where it fits, `count` last (its answer is the
    round trip's); `records` checks the count and gives the finished records."""

    update: Pending
    count: Pending
    outcomes: Sequence[Finish]
    now: datetime

    def records(self, result: Any) -> list[CommandRecord]:
        ended = result.scalar_one()
        if ended != len(self.outcomes):
            raise AssertionError(f"Bug! {len(self.outcomes) - ended} commands finished twice")
        return [outcome.finished(self.now) for outcome in self.outcomes]


def finishing(outcomes: Sequence[Finish]) -> Finishing:
    now = utc_now()
    ids = pg_array([o.command_id for o in outcomes])
    return Finishing(Pending(_FINISH_MANY, {
        "now": now,
        "ids": ids,
        "statuses": pg_array([o.status for o in outcomes]),
        "results": pg_array([None if o.result is None else json.dumps(o.result)
                             for o in outcomes]),
        "codes": pg_array([None if o.error is None else o.error["code"] for o in outcomes]),
        "messages": pg_array([None if o.error is None else _message(o.error)
                              for o in outcomes]),
        "added": pg_array([o.attempts_added for o in outcomes]),
    }, reusable=True), Pending(_ENDED_HERE, {"ids": ids, "now": now}, reusable=True),
        outcomes, now)


def finish_many(conn: Connection, outcomes: Sequence[Finish]) -> list[CommandRecord]:
    """Write the outcomes of many locked commands (terminal ones), in one round trip on
    PostgreSQL; in the order given."""
    if not outcomes:
        return []
    if conn.dialect.name != "postgresql":
        return [_finish_one(conn, outcome) for outcome in outcomes]
    done = finishing(outcomes)
    return done.records(execute_together(conn, [done.update, done.count]))


def _message(error: dict[str, Any]) -> str:
    return str(error["message"])[:ERROR_MESSAGE_LENGTH_MAX]


def _finish_one(conn: Connection, outcome: Finish) -> CommandRecord:
    if outcome.attempts_added:
        conn.execute(update(_c).where(_c.c.id == outcome.command_id)
                     .values(attempts=_c.c.attempts + outcome.attempts_added))
    return finish(conn, outcome.command_id, outcome.status, result=outcome.result,
                  error=outcome.error)


_ACCEPT_MANY = text(
    "INSERT INTO commands (idempotency_key, type, payload, payload_hash, status, attempts, "
    "created_at, updated_at, producer, signed_payload, signature) "
    "SELECT k, t, p, h, 'accepted', 0, :now, :now, pr, sp, sg FROM unnest("
    "CAST(:keys AS TEXT[]), CAST(:types AS TEXT[]), CAST(:payloads AS TEXT[]), "
    "CAST(:hashes AS TEXT[]), CAST(:producers AS TEXT[]), CAST(:signed AS TEXT[]), "
    "CAST(:signatures AS TEXT[])) AS v(k, t, p, h, pr, sp, sg) "
    "ON CONFLICT (idempotency_key) DO NOTHING RETURNING *")


def accept_many(conn: Connection, commands: Sequence[tuple[CommandBase, Signed]]
                ) -> list[tuple[CommandRecord, bool] | IdempotencyConflictError]:
    """Record many commands as `accepted` in one statement (PostgreSQL): per command,
    (record, newly recorded) or the conflict that refused it. Duplicates are read, not
    locked; the same key twice in one call is recorded once."""
    if conn.dialect.name != "postgresql":
        answers: list[tuple[CommandRecord, bool] | IdempotencyConflictError] = []
        for command, signed in commands:
            try:
                answers.append(accept(conn, command, signed))
            except IdempotencyConflictError as exc:
                answers.append(exc)
        return answers
    params = [row_params(command, signed) for command, signed in commands]
    rows = conn.execute(_ACCEPT_MANY.columns(*_c.c), {
        "now": utc_now(), **{name: pg_array([p[key] for p in params]) for name, key in (
            ("keys", "key"), ("types", "type"), ("payloads", "payload"), ("hashes", "digest"),
            ("producers", "producer"), ("signed", "signed"), ("signatures", "signature"))},
    }).all()
    created = {row.idempotency_key: CommandRecord.from_row(row) for row in rows}
    found = {r.idempotency_key: r for r in get_records(
        conn, [p["key"] for p in params if p["key"] not in created])}
    out: list[tuple[CommandRecord, bool] | IdempotencyConflictError] = []
    for (command, _), p in zip(commands, params, strict=True):
        record = created.pop(p["key"], None)
        if record is not None:
            found[p["key"]] = record
            out.append((record, True))
            continue
        record = found[p["key"]]
        out.append((record, False) if record.payload_hash == p["digest"]
                   else conflict(command, record))
    return out


def refuse(conn: Connection, key: str, text: str, error: dict[str, Any], signed: Signed
           ) -> CommandRecord | None:
    """Take a free key for an authenticated producer's invalid command: a `rejected` row of
    type `invalid`, with its signature (a message that failed authentication takes no key).

    A later valid command under the key then gets idempotency_conflict. None when the key
    is taken already (its first command is left alone).
    """
    now = utc_now()
    inserted = insert_ignoring_conflicts(conn, _c, [{
        "idempotency_key": key, "type": "invalid", "payload": text,
        "payload_hash": payload_hash(text), "status": CommandStatus.REJECTED.value,
        "attempts": 1, "error_code": error["code"],
        "error_message": str(error["message"])[:ERROR_MESSAGE_LENGTH_MAX],
        "created_at": now, "updated_at": now, "completed_at": now,
        "producer": signed.producer, "signed_payload": signed.text,
        "signature": signed.signature,
    }], ["idempotency_key"])
    return get_record(conn, key) if inserted else None


def redrive(conn: Connection, record: CommandRecord) -> CommandRecord:
    """Move a locked `failed` command back to `accepted`, its error cleared and its delivery
    count restarted (a quarantined poison command gets WALLETQ_DELIVERY_MAX more)."""
    if record.status != CommandStatus.FAILED:
        raise AssertionError(f"Bug! redrive of a {record.status} command")
    row = conn.execute(
        update(_c).where(_c.c.id == record.id, _c.c.status == CommandStatus.FAILED.value)
        .values(status=CommandStatus.ACCEPTED.value, error_code=None, error_message=None,
                attempts=0, updated_at=utc_now())
        .returning(*_c.c)).one()
    return CommandRecord.from_row(row)
