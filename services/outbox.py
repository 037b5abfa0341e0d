"""The producer's side of walletq: record a command before publishing it (the outbox).

A producer records a command as `accepted` in its own transaction and publishes only after
the commit, so a message the broker loses is never a command lost: the sweep republishes
what stayed `accepted`. A command is recorded with what its producer signed and the
signature, which is what is published (the worker verifies it). Also here: the move of a
`failed` command back to `accepted` when an operator re-drives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial

from sqlalchemy.engine import Connection, Engine

from services import command_store
from services.audit import log_financial_operation
from services.command_fields import CommandBase
from services.command_status import CommandStatus
from services.command_store import CommandRecord
from services.errors import BusinessRuleError, IdempotencyConflictError
from services.settings import Settings
from services.signing import Signed
from services.unit_of_work import run_transaction

__all__ = ["Accepted", "record_accepted", "record_accepted_many", "mark_redriven", "is_stuck",
           "CHUNK_COMMANDS_MAX"]

#: Commands recorded per transaction by record_accepted_many: one commit per chunk, and
#: row locks held only as long as one chunk takes.
CHUNK_COMMANDS_MAX = 500


@dataclass(frozen=True)
class Accepted:
    """A command recorded (or found) in the outbox; `created` is False for a duplicate."""

    record: CommandRecord
    created: bool


def is_stuck(record: CommandRecord, grace_s: float, now: datetime | None = None) -> bool:
    """Not ended, and untouched for longer than the sweep's grace period."""
    return record.is_stuck(grace_s, now)


def _accept_one(conn: Connection, command: CommandBase, signed: Signed) -> Accepted:
    """Record one command as accepted, or find it; IdempotencyConflictError writes nothing."""
    return Accepted(*command_store.accept(conn, command, signed))


def record_accepted(command: CommandBase, signed: Signed, *, engine: Engine, settings: Settings
                    ) -> Accepted:
    """Record a validated command and its signed form as `accepted`, in its own transaction
    (committed on return)."""
    return run_transaction(engine, settings, f"accept {command.idempotency_key}",
                           lambda conn: _accept_one(conn, command, signed))


def record_accepted_many(
    commands: Sequence[tuple[CommandBase, Signed]], *, engine: Engine, settings: Settings,
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


def _accept_chunk(conn: Connection, *, chunk: Sequence[tuple[CommandBase, Signed]]
                  ) -> list[Accepted | BusinessRuleError]:
    # One statement for the chunk; a conflict refuses its own command only.
    return [answer if isinstance(answer, IdempotencyConflictError) else Accepted(*answer)
            for answer in command_store.accept_many(conn, chunk)]


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
