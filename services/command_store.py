"""The `commands` table, and the only module that reads or writes it.

One row per idempotency key: the command's canonical payload and its hash, its producer,
what the producer signed and the signature (as first accepted), its status, result, error
and attempts. It is the idempotency record, the outbox a producer publishes from, and each
command's outcome. Idempotency is data: a status that only moves forward (see
services.command_status) and a payload hash compared on every sending; the hash leaves the
signature out, so a retry signed afresh is the same command.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, Text, and_, any_, bindparam, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Row

from services import schema
from services.bulk_sql import Pending, execute_reusable, insert_ignoring_conflicts, pg_array
from services.canonical import canonical_payload, payload_hash
from services.command_fields import CommandBase
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
    "finish_many_pending",
    "finished_records",
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
    "accepted_at",
    "get_records",
    "keys_by_id",
    "list_records",
    "count_by_status",
    "iso",
    "aware",
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


def _now() -> datetime:
    return datetime.now(UTC)


_NOW = bindparam("now", type_=DateTime(timezone=True))


def _insert(dialect_name: str, status: str, attempts: int) -> Any:
    """A new command row from the parameters of _row_params."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    return dialect.insert(_c).values(
        idempotency_key=bindparam("key"), type=bindparam("type"), payload=bindparam("payload"),
        payload_hash=bindparam("digest"), status=status, attempts=attempts, created_at=_NOW,
        updated_at=_NOW, producer=bindparam("producer"), signed_payload=bindparam("signed"),
        signature=bindparam("signature"),
    )


def _row_params(command: CommandBase, signed: Signed) -> dict[str, Any]:
    if signed.producer != command.producer:
        raise AssertionError("Bug! a command stored with another producer's signature")
    canonical = canonical_payload(command)
    return {"key": command.idempotency_key, "type": command.type, "payload": canonical,
            "digest": payload_hash(canonical), "now": _now(), "producer": signed.producer,
            "signed": signed.text, "signature": signed.signature}


@functools.cache
def _accept_statement(dialect_name: str) -> Any:
    return (_insert(dialect_name, CommandStatus.ACCEPTED, 0)
            .on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(*_c.c))


def accept(conn: Connection, command: CommandBase, signed: Signed
           ) -> tuple[CommandRecord, bool]:
    """Record the command as `accepted` (the outbox), or find it: (record, newly recorded).

    A duplicate is returned as it stands, read and untouched (touching updated_at would
    postpone the sweep); another payload under the key raises IdempotencyConflictError.
    It is read, not locked: the producer's database role may insert and read commands,
    never lock or update them (services/db_roles.py), and the row the conflict found is
    committed (ON CONFLICT waits for a concurrent inserter to end).
    """
    params = _row_params(command, signed)
    row = execute_reusable(conn, _accept_statement(conn.dialect.name), params).one_or_none()
    if row is not None:
        return CommandRecord.from_row(row), True
    record = get_record(conn, command.idempotency_key)
    assert record is not None, "a key that conflicted has no row"
    if record.payload_hash != params["digest"]:
        raise conflict(command, record)
    return record, False


@functools.cache
def _claim_statement(dialect_name: str) -> Any:
    """Built once per dialect: statement construction costs more than its round trip."""
    stmt = _insert(dialect_name, CommandStatus.PROCESSING, 1)
    return stmt.on_conflict_do_update(
        index_elements=["idempotency_key"],
        set_={"status": CommandStatus.PROCESSING.value, "attempts": _c.c.attempts + 1,
              "updated_at": _NOW},
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
    params = _row_params(command, signed)
    row = conn.execute(_claim_statement(conn.dialect.name), params).one_or_none()
    if row is not None:
        return CommandRecord.from_row(row)
    record = get_record(conn, command.idempotency_key)
    assert record is not None, "a key that conflicted has no row"
    if record.payload_hash != params["digest"]:
        raise conflict(command, record)
    assert record.ended, "an upsert skipped a command that has not ended"
    return record


@functools.cache
def _insert_processing_statement(dialect_name: str) -> Any:
    return (_insert(dialect_name, CommandStatus.PROCESSING, 1)
            .on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(*_c.c))


def insert_processing(conn: Connection, command: CommandBase, signed: Signed
                      ) -> CommandRecord | None:
    """Record a command met for the first time as `processing` (one attempt), its row
    locked until the transaction ends; None when the key is taken (the caller claims)."""
    row = execute_reusable(conn, _insert_processing_statement(conn.dialect.name),
                           _row_params(command, signed)).one_or_none()
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


def conflict(command: CommandBase, record: CommandRecord) -> IdempotencyConflictError:
    # Nothing of the first command (its type, status, result, producer) is told: the key
    # may be another producer's.
    return IdempotencyConflictError(
        f"idempotency key {command.idempotency_key!r} was used for another payload; "
        "that command is untouched",
        idempotency_key=command.idempotency_key,
    )


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
        "error_message": None if error is None else str(error["message"])[:ERROR_MESSAGE_LENGTH_MAX],
        "now": now,
        "completed_at": now if status in TERMINAL else None,
    }).one_or_none()
    if row is None:
        raise AssertionError(f"Bug! command {command_id} finished twice")
    return CommandRecord.from_row(row)


@dataclass(frozen=True)
class Finish:
    """One command's outcome, for finish_many; `attempts_added` is 1 when this delivery was
    not counted by a claim before (the lean path)."""

    command_id: int
    status: str
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    attempts_added: int = 0


_FINISH_MANY = text(
    "UPDATE commands SET status = v.status, result = CAST(v.result AS JSON), "
    "error_code = v.code, error_message = v.message, attempts = commands.attempts + v.added, "
    "updated_at = :now, completed_at = :now "
    "FROM unnest(CAST(:ids AS BIGINT[]), CAST(:statuses AS TEXT[]), CAST(:results AS TEXT[]), "
    "CAST(:codes AS TEXT[]), CAST(:messages AS TEXT[]), CAST(:added AS INTEGER[])) "
    "AS v(id, status, result, code, message, added) "
    "WHERE commands.id = v.id AND commands.status IN ('accepted', 'processing') "
    "RETURNING commands.*")


def finish_many(conn: Connection, outcomes: Sequence[Finish]) -> list[CommandRecord]:
    """Write the outcomes of many locked commands (terminal ones), in one statement on
    PostgreSQL; in the order given."""
    if not outcomes:
        return []
    if conn.dialect.name != "postgresql":
        return [_finish_one(conn, outcome) for outcome in outcomes]
    pending = finish_many_pending(outcomes)
    return finished_records(conn.execute(pending.statement, pending.params), outcomes)


def finish_many_pending(outcomes: Sequence[Finish]) -> Pending:
    """finish_many's PostgreSQL statement, to send with others (bulk_sql.execute_together);
    `finished_records` reads what it returns."""
    return Pending(_FINISH_MANY, {
        "now": _now(),
        "ids": pg_array([o.command_id for o in outcomes]),
        "statuses": pg_array([o.status for o in outcomes]),
        "results": pg_array([None if o.result is None else json.dumps(o.result)
                             for o in outcomes]),
        "codes": pg_array([None if o.error is None else o.error["code"] for o in outcomes]),
        "messages": pg_array([None if o.error is None else _message(o.error)
                              for o in outcomes]),
        "added": pg_array([o.attempts_added for o in outcomes]),
    }, reusable=True)


def finished_records(result: Any, outcomes: Sequence[Finish]) -> list[CommandRecord]:
    """The records finish_many's statement returned, in the order of `outcomes`."""
    by_id = {row.id: CommandRecord.from_row(row) for row in result.all()}
    if len(by_id) != len(outcomes):
        raise AssertionError(f"Bug! {len(outcomes) - len(by_id)} commands finished twice")
    return [by_id[o.command_id] for o in outcomes]


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
    params = [_row_params(command, signed) for command, signed in commands]
    rows = conn.execute(_ACCEPT_MANY.columns(*_c.c), {
        "now": _now(), **{name: pg_array([p[key] for p in params]) for name, key in (
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
    now = _now()
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
                attempts=0, updated_at=_now())
        .returning(*_c.c)).one()
    return CommandRecord.from_row(row)


def stale_cutoff(grace_s: float) -> datetime:
    """Commands whose clock stands before this are stuck. A sweep takes it once per run:
    the clocks it restarts are after it, so one run never takes a command twice (with a
    grace of 0 a cutoff taken per batch would take the same commands again each batch)."""
    return _now() - timedelta(seconds=grace_s)


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
        .values(updated_at=_now())
        .returning(_c.c.id)
    ).scalars().all())
    return [record for record in stale if record.id in claimed]


def heartbeat(conn: Connection, command_id: int) -> None:
    """A long command making progress restarts its clock: the sweep leaves it alone."""
    conn.execute(update(_c).where(_c.c.id == command_id).values(updated_at=_now()))


_LOCK_BY_KEY = select(_c).where(_c.c.idempotency_key == bindparam("key")).with_for_update()


def lock(conn: Connection, key: str) -> CommandRecord | None:
    """The command row, locked FOR UPDATE until the caller's transaction ends."""
    row = execute_reusable(conn, _LOCK_BY_KEY, {"key": key}).one_or_none()
    return None if row is None else CommandRecord.from_row(row)


lock_record = lock


def get_record(conn: Connection, key: str) -> CommandRecord | None:
    row = conn.execute(select(_c).where(_c.c.idempotency_key == key)).one_or_none()
    return None if row is None else CommandRecord.from_row(row)


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


