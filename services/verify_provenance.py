"""Invariants 7 and 8 (docs/ARCHITECTURE.md, "Invariants"): where each movement came from.

7. Every command that moved money (a transfer, or `succeeded`) carries a valid signature
   of its producer, by a key valid when the command was accepted, over exactly the command
   stored; and that producer's permissions allow its type and what its fields ask.
8. Every ended command has its audit row, matching its type, outcome, error and transfers.

A command, transfer or account written behind walletq's back fails one of them (or
invariants 3 and 5) and is named. Both read in the caller's snapshot and write nothing;
each command costs one signature verification and one validation (about 0.1 ms).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import exists, or_, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import Executable

from services import command_types, producers, schema
from services.canonical import canonical_payload, payload_hash
from services.command_fields import CommandLimits
from services.command_status import ENDED
from services.command_store import aware
from services.commands import parse_command
from services.errors import InvalidCommandError
from services.permissions import missing
from services.producers import Producer
from services.signing import SigningError, decode_signature, verifies

__all__ = ["signatures_problems", "audit_problems"]

_ROWS_PER_FETCH = 2_000
#: Limits for re-reading a stored command: its scale, and ceilings no deployment exceeds
#: (a command accepted under a larger maximum than today's is not a forgery).
_CEILING_AMOUNT_MINOR = 10**17
_CEILING_PAYOUT_ITEMS = 1_000_000
_OUTCOMES = ("succeeded", "rejected", "failed", "refused")


def _stream(conn: Connection, query: str | Executable) -> Iterator[Any]:
    """Rows fetched a bounded number at a time (a server-side cursor on PostgreSQL)."""
    return iter(conn.execution_options(stream_results=True, max_row_buffer=_ROWS_PER_FETCH)
                .execute(text(query) if isinstance(query, str) else query))


def _legacy_id_max(conn: Connection) -> int:
    value = conn.execute(text("SELECT legacy_command_id_max FROM signature_epoch WHERE id = 1")
                         ).scalar()
    return int(value) if value is not None else 0


def _signature_problem(row: Any, producer: Producer | None, limits: CommandLimits) -> str | None:
    if row.signed_payload is None or row.signature is None or row.producer is None:
        return "no signature"
    if producer is None:
        return f"unknown producer {row.producer!r}"
    try:
        signature = decode_signature(row.signature)
    except SigningError:
        return "a malformed signature"
    data = row.signed_payload.encode("utf-8")
    accepted_at = aware(row.created_at)
    key = next((k for k in producer.keys if verifies(k.public_key, data, signature)), None)
    if key is None:
        return f"a signature no key of {row.producer!r} verifies"
    if not key.valid_at(accepted_at):
        return f"signed by key {key.key_id}, not valid when the command was accepted"
    try:
        obj = json.loads(row.signed_payload)
        command = parse_command({**obj, "signature": row.signature}, limits)
    except (ValueError, InvalidCommandError):
        return "a signed payload that is not a valid command"
    canonical = canonical_payload(command)
    if (canonical != row.payload or payload_hash(canonical) != row.payload_hash
            or command.type != row.type or command.idempotency_key != row.idempotency_key
            or command.producer != row.producer):
        return "a stored command that is not what its producer signed"
    lacking = missing(producer.permissions, command_types.permissions_needed(command))
    if lacking:
        return f"producer {row.producer!r} (role {producer.role}) lacks {', '.join(lacking)}"
    return None


def signatures_problems(conn: Connection, scale: int) -> tuple[list[str], int]:
    """Invariant 7: the commands that moved money without a valid signature, and how many
    commands were checked."""
    known = {p.name: p for p in producers.list_producers(conn)}
    limits = CommandLimits(scale, _CEILING_AMOUNT_MINOR, _CEILING_PAYOUT_ITEMS)
    legacy_max = _legacy_id_max(conn)
    c, t = schema.commands, schema.transfers
    moved = exists().where(t.c.command_id == c.c.id)
    rows = _stream(conn, select(c.c.id, c.c.idempotency_key, c.c.type, c.c.status, c.c.payload,
                                c.c.payload_hash, c.c.producer, c.c.signed_payload,
                                c.c.signature, c.c.created_at)
                   .where(or_(c.c.status == "succeeded", moved)).order_by(c.c.id))
    names, checked = [], 0
    for row in rows:
        if row.signature is None and row.id <= legacy_max:
            continue  # accepted before commands were signed (migration 0004)
        checked += 1
        problem = _signature_problem(row, known.get(row.producer), limits)
        if problem:
            names.append(f"{row.idempotency_key} ({row.type} {row.status}: {problem})")
    return names, checked


# --- invariant 8 -------------------------------------------------------------------------


def _grouped(rows: Iterator[Any]) -> Iterator[tuple[int, list[Any]]]:
    """Rows ordered by command_id, as (command_id, its rows)."""
    current: list[Any] = []
    for row in rows:
        if current and row.command_id != current[0].command_id:
            yield current[0].command_id, current
            current = []
        current.append(row)
    if current:
        yield current[0].command_id, current


class _Cursor:
    """A stream of rows grouped by command id, read forward as the commands are."""

    def __init__(self, rows: Iterator[Any]) -> None:
        self._groups = _grouped(rows)
        self._head = next(self._groups, None)

    def take(self, command_id: int) -> list[Any]:
        while self._head is not None and self._head[0] < command_id:
            self._head = next(self._groups, None)
        if self._head is not None and self._head[0] == command_id:
            found = self._head[1]
            self._head = next(self._groups, None)
            return found
        return []


def _expected_outcome(command: Any) -> str:
    return "refused" if command.type == "invalid" else command.status


def _moved(transfers: Sequence[Any]) -> Counter[tuple[str, str, int, str]]:
    return Counter((t.debit, t.credit, int(t.amount_minor), t.kind) for t in transfers)


def _audited(rows: Sequence[Any]) -> Counter[tuple[str, str, int, str]]:
    return Counter((a["debit"], a["credit"], int(a["amount_minor"]), a["kind"])
                   for row in rows for a in (row.amounts or []))


def _audit_problem(command: Any, audit: Sequence[Any], transfers: Sequence[Any]) -> str | None:
    final = [row for row in audit if row.outcome in _OUTCOMES]
    if not final:
        return "no audit row"
    last = final[-1]
    if last.outcome != _expected_outcome(command) or last.command_type != command.type \
            or last.error_code != command.error_code:
        return (f"its audit row says {last.command_type} {last.outcome} "
                f"{last.error_code or ''}".rstrip())
    entry = command_types.BY_NAME.get(command.type)
    if entry is not None and entry.is_batch:
        chunks = [row for row in audit if row.outcome == "chunk"]
        audited_minor = sum(int(a["amount_minor"]) for row in chunks for a in (row.amounts or []))
        audited_n = sum(int((row.detail or {}).get("paid", 0)) for row in chunks)
        moved_minor = sum(int(t.amount_minor) for t in transfers)
        if (audited_n, audited_minor) != (len(transfers), moved_minor):
            return (f"{len(transfers)} transfers of {moved_minor} minor units; its audit rows "
                    f"say {audited_n} of {audited_minor}")
        return None
    moved, audited = _moved(transfers), _audited(final[-1:])
    if moved != audited:
        unaudited = ", ".join(f"{d}->{c} {m}" for d, c, m, _ in (moved - audited).elements())
        unmoved = ", ".join(f"{d}->{c} {m}" for d, c, m, _ in (audited - moved).elements())
        return ("transfers its audit row does not name: " + (unaudited or "none")
                + "; audited but not moved: " + (unmoved or "none"))[:400]
    return None


def audit_problems(conn: Connection) -> tuple[list[str], int]:
    """Invariant 8: the ended commands whose audit rows do not match them, and how many
    ended commands were checked."""
    c, a, t = schema.commands, schema.audit_events, schema.transfers
    debit, credit = schema.accounts.alias("debit"), schema.accounts.alias("credit")
    commands = _stream(conn, select(c.c.id, c.c.idempotency_key, c.c.type, c.c.status,
                                    c.c.error_code)
                       .where(c.c.status.in_(sorted(ENDED))).order_by(c.c.id))
    audits = _Cursor(_stream(conn, select(a.c.command_id, a.c.command_type, a.c.outcome,
                                          a.c.error_code, a.c.amounts, a.c.detail)
                             .where(a.c.command_id.is_not(None))
                             .order_by(a.c.command_id, a.c.id)))
    transfers = _Cursor(_stream(conn, select(t.c.command_id, debit.c.code.label("debit"),
                                             credit.c.code.label("credit"), t.c.amount_minor,
                                             t.c.kind)
                                .join(debit, debit.c.id == t.c.debit_account_id)
                                .join(credit, credit.c.id == t.c.credit_account_id)
                                .order_by(t.c.command_id, t.c.id)))
    names, checked = [], 0
    for command in commands:
        checked += 1
        problem = _audit_problem(command, audits.take(command.id), transfers.take(command.id))
        if problem:
            names.append(f"{command.idempotency_key} ({command.type} {command.status}: {problem})")
    return names, checked

