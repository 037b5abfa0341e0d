"""The producer's side of the `commands` table: record before publishing (the outbox).

A producer records a command as `accepted` in its own transaction and publishes only after
the commit, so a message the broker loses is never a command lost: the sweep republishes
what stayed `accepted`. Also here: what the worker records for a message it refuses, and
the move of a `failed` command back to `accepted` when an operator re-drives it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Connection, Engine

from services import command_store, schema
from services.atomic_transaction_manager import (
    BusinessRuleError,
    IdempotencyConflictError,
    InvalidCommandError,
    log_financial_operation,
)
from services.command_executor import run_transaction
from services.command_store import CommandRecord
from services.commands import ID_PATTERN, Command, payload_hash
from services.db import get_engine
from services.ledger import insert_ignoring_conflicts
from services.settings import Settings, get_settings

__all__ = ["Accepted", "record_accepted", "record_accepted_many", "record_refused",
           "mark_redriven", "is_stuck", "usable_key", "CHUNK_COMMANDS_MAX"]

#: Commands recorded per transaction by record_accepted_many: one commit per chunk, and
#: row locks held only as long as one chunk takes.
CHUNK_COMMANDS_MAX = 500
_STUCK_STATUSES = ("accepted", "processing")
_c = schema.commands


@dataclass(frozen=True)
class Accepted:
    """A command recorded (or found) in the outbox; `created` is False for a duplicate."""

    record: CommandRecord
    created: bool


def is_stuck(record: CommandRecord, grace_s: float, now: datetime | None = None) -> bool:
    """Non-terminal, not failed, and untouched for longer than the sweep's grace period."""
    now = now or datetime.now(UTC)
    updated = record.updated_at
    if updated.tzinfo is None:
        updated = updated.replace(tzinfo=UTC)
    return record.status in _STUCK_STATUSES and updated < now - timedelta(seconds=grace_s)


def _accept_one(conn: Connection, command: Command) -> Accepted:
    """Record one command as accepted, or find it; IdempotencyConflictError writes nothing."""
    return Accepted(*command_store.accept(conn, command))


def record_accepted(
    command: Command, *, engine: Engine | None = None, settings: Settings | None = None
) -> Accepted:
    """Record a validated command as `accepted` in its own transaction (committed on return)."""
    settings = settings or get_settings()
    engine = engine or get_engine(settings)
    return run_transaction(  # type: ignore[no-any-return]
        engine, settings, f"accept {command.idempotency_key}",
        lambda conn: _accept_one(conn, command),
    )


def record_accepted_many(
    commands: Sequence[Command], *, engine: Engine | None = None,
    settings: Settings | None = None,
) -> list[Accepted | BusinessRuleError]:
    """Record many commands, one transaction per chunk; a conflict refuses its own line only.

    The answer has one entry per command, in order: Accepted, or the error that refused it
    (nothing was recorded for that command).
    """
    settings = settings or get_settings()
    engine = engine or get_engine(settings)
    answers: list[Accepted | BusinessRuleError] = []
    for start in range(0, len(commands), CHUNK_COMMANDS_MAX):
        chunk = commands[start:start + CHUNK_COMMANDS_MAX]
        answers.extend(run_transaction(engine, settings, f"accept {len(chunk)} commands",
                                       partial(_accept_chunk, chunk=chunk)))
    return answers


def _accept_chunk(conn: Connection, *, chunk: Sequence[Command]
                  ) -> list[Accepted | BusinessRuleError]:
    answers: list[Accepted | BusinessRuleError] = []
    for command in chunk:
        try:
            answers.append(_accept_one(conn, command))
        except IdempotencyConflictError as exc:
            # Raised before anything was written for this command: the chunk goes on.
            answers.append(exc)
    return answers


def usable_key(raw: Any) -> str | None:
    """The idempotency key of a payload that failed validation, if it is a well-formed one."""
    data = raw
    if isinstance(raw, str | bytes):
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
    key = data.get("idempotency_key") if isinstance(data, dict) else None
    return key if isinstance(key, str) and re.fullmatch(ID_PATTERN, key) else None


def _raw_text(raw: Any) -> str:
    if isinstance(raw, bytes):
        return raw.decode("utf-8", errors="replace")
    if isinstance(raw, str):
        return raw
    try:
        return json.dumps(raw, sort_keys=True, separators=(",", ":"), default=repr)
    except (TypeError, ValueError):
        return repr(raw)


def _claimed_type(raw: Any) -> str:
    data = raw
    if isinstance(raw, str | bytes):
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return "invalid"
    claimed = data.get("type") if isinstance(data, dict) else None
    return claimed[:60] if isinstance(claimed, str) else "invalid"


def record_refused(
    raw: Any, error: BusinessRuleError, *, source: str = "worker",
    engine: Engine | None = None, settings: Settings | None = None,
) -> CommandRecord | None:
    """Record a payload refused before execution (invalid, or a key conflict): an audit row.

    An invalid payload whose usable key is still free also takes that key, as a `rejected`
    command of type `invalid`: a later valid command under it gets idempotency_conflict.
    Without a usable key, for a conflict, or when the key is taken, only the audit row.
    """
    settings = settings or get_settings()
    engine = engine or get_engine(settings)
    key = usable_key(raw)
    # Only a malformed payload takes its key; a conflict leaves the first command alone.
    take_key = isinstance(error, InvalidCommandError)
    text = _raw_text(raw)[:100_000]
    error_dict = error.to_dict()

    def body(conn: Connection) -> CommandRecord | None:
        record = None
        if key is not None and take_key:
            now = datetime.now(UTC)
            inserted = insert_ignoring_conflicts(conn, _c, [{
                "idempotency_key": key, "type": "invalid", "payload": text,
                "payload_hash": payload_hash(text), "status": "rejected", "attempts": 1,
                "error_code": error.code, "error_message": error.message[:2000],
                "created_at": now, "updated_at": now, "completed_at": now,
            }], ["idempotency_key"])
            record = command_store.get_record(conn, key) if inserted else None
        log_financial_operation(
            conn, command_id=record.id if record else None, idempotency_key=key,
            command_type=_claimed_type(raw) if take_key else "invalid", outcome="refused",
            error=error_dict,
            detail={"source": source, "recorded": record is not None, "payload": text[:2000]},
        )
        return record

    return run_transaction(engine, settings, f"refuse {key or 'message'}", body)  # type: ignore[no-any-return]


def mark_redriven(
    key: str, *, engine: Engine | None = None, settings: Settings | None = None
) -> tuple[CommandRecord | None, bool]:
    """Move a `failed` command back to `accepted` (the sweep covers a lost redrive message).

    Returns the record as it now is (None for an unknown key) and whether it moved; a
    command that is not `failed` is left unchanged, and the caller refuses to re-drive it.
    """
    settings = settings or get_settings()
    engine = engine or get_engine(settings)

    def body(conn: Connection) -> tuple[CommandRecord | None, bool]:
        record = command_store.lock_record(conn, key)
        if record is None or record.status != "failed":
            return record, False
        conn.execute(update(_c).where(_c.c.id == record.id).values(
            status="accepted", error_code=None, error_message=None,
            updated_at=datetime.now(UTC)))
        log_financial_operation(
            conn, command_id=record.id, idempotency_key=key, command_type=record.type,
            outcome="redriven", error=record.error, detail={"attempts": record.attempts},
        )
        return command_store.get_record(conn, key), True

    return run_transaction(engine, settings, f"redrive {key}", body)  # type: ignore[no-any-return]
