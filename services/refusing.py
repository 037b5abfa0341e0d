"""What is recorded of a command refused before it ran, and of a stored row that fails its
own check.

A refused message leaves an audit row (with the reason and a bounded copy of the payload)
and, unless it takes its key, a row in `refusals` readable by its key and producer. Only an
authenticated producer's invalid command takes its free key (a `rejected` row of type
`invalid`); a message that failed authentication never does, so nobody can squat a key.

A command row is held to its own signature: a row whose stored signature does not verify
(or whose producer may not send it, or whose stored payload is not what was signed) ends
`rejected` with that reason, so the sweep stops republishing it. A message under the key
of a sound row refuses the message only, never the row.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy.engine import Connection, Engine

from services import command_store, refusals
from services.admission import Admitted, Evidence, Refused, admit
from services.audit import audit_command, log_financial_operation
from services.canonical import canonical_payload, payload_hash
from services.command_status import CommandStatus
from services.command_store import CommandRecord
from services.errors import (
    BusinessRuleError,
    ForbiddenError,
    InvalidCommandError,
    UnauthenticatedError,
)
from services.settings import Settings
from services.unit_of_work import run_transaction

__all__ = ["record_refused", "row_refusal", "admit_row", "reject_row"]

log = logging.getLogger("walletq.refusals")

#: What an audit row keeps of a refused payload, and what a refused row stores of it.
_AUDIT_PAYLOAD_CHARS_MAX = 2000
_REFUSED_PAYLOAD_CHARS_MAX = 100_000


def _raw_text(raw: Any) -> str:
    if isinstance(raw, bytes):
        return raw.decode("utf-8", errors="replace")
    if isinstance(raw, str):
        return raw
    try:
        return json.dumps(raw, sort_keys=True, separators=(",", ":"), default=repr)
    except (TypeError, ValueError):
        return repr(raw)


def row_refusal(record: CommandRecord, *, engine: Engine, settings: Settings,
                evidence: Evidence | None = None, verdict: Refused | None = None
                ) -> Refused | None:
    """Why a stored, unfinished command row must not run, or None when it is sound.

    When the message judged (`evidence`, `verdict`) is the row's own signed form, its
    verdict is the row's; otherwise the row's own signature and permissions are checked as
    of when it was recorded, and its stored payload held against what was signed.
    """
    signed = record.signed
    if verdict is not None and evidence is not None and signed is not None \
            and evidence.signed == signed:
        return verdict
    own = admit_row(record, engine=engine, settings=settings)
    return own if isinstance(own, Refused) else None


def admit_row(record: CommandRecord, *, engine: Engine, settings: Settings) -> Admitted | Refused:
    """A stored row admitted on its own signature, as of when it was recorded, its stored
    payload held against what was signed: how a worker takes a command it has no message of
    (a coalesced row, a bulk producer's key)."""
    own = admit(record.message(), engine=engine, settings=settings,
                accepted_at=record.accepted_at)
    if isinstance(own, Refused):
        return own
    return _contradiction(record, own) or own


def _contradiction(record: CommandRecord, own: Admitted) -> Refused | None:
    """A row whose stored payload is not the command its producer signed."""
    if payload_hash(canonical_payload(own.command)) == record.payload_hash \
            and record.producer == own.signed.producer:
        return None
    error = UnauthenticatedError(
        f"the stored command under {record.idempotency_key!r} is not what its producer signed",
        idempotency_key=record.idempotency_key)
    return Refused(error, Evidence(record.idempotency_key, record.type, record.producer,
                                   own.signed), authenticated=False)


def reject_row(key: str, error: BusinessRuleError, *, engine: Engine, settings: Settings
               ) -> CommandRecord | None:
    """End an unfinished command row `rejected` with this error, and its audit row."""

    def body(conn: Connection) -> CommandRecord | None:
        record = command_store.lock(conn, key)
        if record is None or record.terminal:
            return record
        error_dict = error.to_dict()
        finished = command_store.finish(conn, record.id, CommandStatus.REJECTED, error=error_dict)
        audit_command(conn, record, "rejected", error=error_dict, ids={"check": "signature"})
        log.warning("%s rejected: %s", key, error.message)
        return finished

    return run_transaction(engine, settings, f"reject {key}", body)


def _unsound_row(raw_refused: Refused, *, engine: Engine, settings: Settings
                 ) -> CommandRecord | None:
    """The row under the refused message's key, rejected if it fails its own check."""
    key = raw_refused.evidence.key
    if key is None or not isinstance(raw_refused.error, UnauthenticatedError | ForbiddenError):
        return None  # an invalid command or a conflict says nothing of the row under its key
    with engine.connect() as conn:
        record = command_store.get_record(conn, key)
    if record is None or record.terminal:
        return None
    refusal = row_refusal(record, engine=engine, settings=settings,
                          evidence=raw_refused.evidence, verdict=raw_refused)
    if refusal is None:
        return None
    return reject_row(key, refusal.error, engine=engine, settings=settings)


def record_refused(raw: Any, refused: Refused, *, engine: Engine, settings: Settings,
                   source: str = "worker") -> CommandRecord | None:
    """Record a command refused before it ran (see the module's docstring).

    Returns the command record the refusal wrote or ended (the key taken by an invalid
    command, or an unfinished row that failed its own check), else None.
    """
    ended = _unsound_row(refused, engine=engine, settings=settings)
    if ended is not None and ended.signed is not None and ended.signed == refused.evidence.signed:
        return ended  # the message was the row's own: its refusal is the row's outcome
    evidence, error = refused.evidence, refused.error
    take_key = evidence.key is not None and refused.authenticated \
        and isinstance(error, InvalidCommandError) and evidence.signed is not None
    text = _raw_text(raw)[:_REFUSED_PAYLOAD_CHARS_MAX]
    error_dict = error.to_dict()

    def body(conn: Connection) -> CommandRecord | None:
        record = None
        if take_key:
            assert evidence.key is not None and evidence.signed is not None
            record = command_store.refuse(conn, evidence.key, text, error_dict, evidence.signed)
        if record is None:
            refusals.append(conn, key=evidence.key, producer=evidence.producer,
                            authenticated=refused.authenticated,
                            command_type=evidence.command_type, error=error_dict, source=source)
        log_financial_operation(
            conn, command_id=record.id if record else None, idempotency_key=evidence.key,
            command_type="invalid" if record else (evidence.command_type or "invalid"),
            outcome="refused", error=error_dict,
            detail={"source": source, "recorded": record is not None,
                    "producer": evidence.producer, "authenticated": refused.authenticated,
                    "claimed_type": evidence.command_type,
                    "payload": text[:_AUDIT_PAYLOAD_CHARS_MAX]},
        )
        return record

    recorded = run_transaction(engine, settings, f"refuse {evidence.key or 'message'}", body)
    return ended or recorded
