"""The producer's side of walletq: record a command before publishing it (the outbox).

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
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy.engine import Connection, Engine

from services import command_store
from services.audit import log_financial_operation
from services.command_fields import ID_PATTERN, CommandBase
from services.command_status import CommandStatus
from services.command_store import CommandRecord
from services.errors import BusinessRuleError, IdempotencyConflictError, InvalidCommandError
from services.settings import Settings
from services.unit_of_work import run_transaction

__all__ = ["Accepted", "record_accepted", "record_accepted_many", "record_refused",
           "mark_redriven", "is_stuck", "usable_key", "CHUNK_COMMANDS_MAX"]

#: Commands recorded per transaction by record_accepted_many: one commit per chunk, and
#: row locks held only as long as one chunk takes.
CHUNK_COMMANDS_MAX = 500
#: What an audit row keeps of a refused payload, and what a refused row stores of it.
_AUDIT_PAYLOAD_CHARS_MAX = 2000
_REFUSED_PAYLOAD_CHARS_MAX = 100_000


@dataclass(frozen=True)
class Accepted:
    """A command recorded (or found) in the outbox; `created` is False for a duplicate."""

    record: CommandRecord
    created: bool


def is_stuck(record: CommandRecord, grace_s: float, now: datetime | None = None) -> bool:
    """Not ended, and untouched for longer than the sweep's grace period."""
    return record.is_stuck(grace_s, now)


def _accept_one(conn: Connection, command: CommandBase) -> Accepted:
    """Record one command as accepted, or find it; IdempotencyConflictError writes nothing."""
    return Accepted(*command_store.accept(conn, command))


def record_accepted(command: CommandBase, *, engine: Engine, settings: Settings) -> Accepted:
    """Record a validated command as `accepted` in its own transaction (committed on return)."""
    return run_transaction(engine, settings, f"accept {command.idempotency_key}",
                           lambda conn: _accept_one(conn, command))


def record_accepted_many(
    commands: Sequence[CommandBase], *, engine: Engine, settings: Settings,
) -> list[Accepted | BusinessRuleError]:
    """Record many commands, one transaction per chunk; a conflict refuses its own line only.

    The answer has one entry per command, in order: Accepted, or the error that refused it
    (nothing was recorded for that command).
    """
    answers: list[Accepted | BusinessRuleError] = []
    for start in range(0, len(commands), CHUNK_COMMANDS_MAX):
        chunk = commands[start:start + CHUNK_COMMANDS_MAX]
        answers.extend(run_transaction(engine, settings, f"accept {len(chunk)} commands",
                                       partial(_accept_chunk, chunk=chunk)))
    return answers


def _accept_chunk(conn: Connection, *, chunk: Sequence[CommandBase]
                  ) -> list[Accepted | BusinessRuleError]:
    answers: list[Accepted | BusinessRuleError] = []
    for command in chunk:
        try:
            answers.append(_accept_one(conn, command))
        except IdempotencyConflictError as exc:
            # Raised before anything was written for this command: the chunk goes on.
            answers.append(exc)
    return answers


def _as_object(raw: Any) -> Any:
    if isinstance(raw, str | bytes):
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
    return raw


def usable_key(raw: Any) -> str | None:
    """The idempotency key of a payload that failed validation, if it is a well-formed one."""
    data = _as_object(raw)
    key = data.get("idempotency_key") if isinstance(data, dict) else None
    return key if isinstance(key, str) and re.fullmatch(ID_PATTERN, key) else None


def _claimed_type(raw: Any) -> str:
    data = _as_object(raw)
    claimed = data.get("type") if isinstance(data, dict) else None
    return claimed[:60] if isinstance(claimed, str) else "invalid"


def _raw_text(raw: Any) -> str:
    if isinstance(raw, bytes):
        return raw.decode("utf-8", errors="replace")
    if isinstance(raw, str):
        return raw
    try:
        return json.dumps(raw, sort_keys=True, separators=(",", ":"), default=repr)
    except (TypeError, ValueError):
        return repr(raw)


def record_refused(
    raw: Any, error: BusinessRuleError, *, engine: Engine, settings: Settings,
    source: str = "worker",
) -> CommandRecord | None:
    """Record a payload refused before execution (invalid, or a key conflict): an audit row.

    An invalid payload whose usable key is still free also takes that key, as a `rejected`
    command of type `invalid`: a later valid command under it gets idempotency_conflict.
    Without a usable key, for a conflict, or when the key is taken, only the audit row.
    """
    key = usable_key(raw)
    # Only a malformed payload takes its key; a conflict leaves the first command alone.
    take_key = isinstance(error, InvalidCommandError)
    text = _raw_text(raw)[:_REFUSED_PAYLOAD_CHARS_MAX]
    error_dict = error.to_dict()

    def body(conn: Connection) -> CommandRecord | None:
        record = None
        if key is not None and take_key:
            record = command_store.refuse(conn, key, text, error_dict)
        log_financial_operation(
            conn, command_id=record.id if record else None, idempotency_key=key,
            command_type=_claimed_type(raw) if take_key else "invalid", outcome="refused",
            error=error_dict,
            detail={"source": source, "recorded": record is not None,
                    "payload": text[:_AUDIT_PAYLOAD_CHARS_MAX]},
        )
        return record

    return run_transaction(engine, settings, f"refuse {key or 'message'}", body)


def mark_redriven(
    key: str, *, engine: Engine, settings: Settings
) -> tuple[CommandRecord | None, bool]:
    """Move a `failed` command back to `accepted` (the sweep covers a lost redrive message).

    Returns the record as it now is (None for an unknown key) and whether it moved; a
    command that is not `failed` is left unchanged, and the caller refuses to re-drive it.
    """

    def body(conn: Connection) -> tuple[CommandRecord | None, bool]:
        record = command_store.lock(conn, key)
        if record is None or record.status != CommandStatus.FAILED:
            return record, False
        moved = command_store.redrive(conn, record)
        log_financial_operation(
            conn, command_id=record.id, idempotency_key=key, command_type=record.type,
            outcome="redriven", error=record.error, detail={"attempts": record.attempts},
        )
        return moved, True

    return run_transaction(engine, settings, f"redrive {key}", body)
