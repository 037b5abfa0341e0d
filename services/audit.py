"""The audit trail: one `audit_events` row per operation, written in the operation's own
transaction, and one JSON line on the `walletq.audit` logger.

The row and the outcome it records commit together or not at all; `walletq verify`
holds every terminal command against its audit row.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy import insert
from sqlalchemy.engine import Connection

from services import schema
from services.ledger import Transfer

__all__ = ["log_financial_operation", "audit_command", "AuditedCommand"]

audit_log = logging.getLogger("walletq.audit")

_INSERT_AUDIT = insert(schema.audit_events)


def log_financial_operation(
    conn: Connection,
    *,
    command_id: int | None,
    idempotency_key: str | None,
    command_type: str,
    outcome: str,
    accounts: Sequence[str] = (),
    amounts: Sequence[dict[str, Any]] = (),
    error: dict[str, Any] | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """One audit row in the caller's transaction, and one structured log line."""
    row = {
        "command_id": command_id,
        "idempotency_key": idempotency_key,
        "command_type": command_type[:60],
        "outcome": outcome,
        "accounts": list(accounts),
        "amounts": list(amounts),
        "error_code": (error or {}).get("code"),
        "detail": {**(detail or {}), **({"error": error} if error else {})},
    }
    conn.execute(_INSERT_AUDIT, row)
    audit_log.info(json.dumps({"event": "financial_operation", **row}, default=str))


class AuditedCommand(Protocol):
    """What the audit row needs to know of a command record."""

    @property
    def id(self) -> int: ...
    @property
    def idempotency_key(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def attempts(self) -> int: ...


def audit_command(
    conn: Connection, record: AuditedCommand, outcome: str, transfers: Sequence[Transfer] = (),
    *, error: dict[str, Any] | None = None, ids: dict[str, Any] | None = None,
) -> None:
    """The audit row of a single command's outcome: its accounts, its transfers, its error."""
    accounts = sorted({code for t in transfers for code in (t.debit.code, t.credit.code)})
    log_financial_operation(
        conn,
        command_id=record.id,
        idempotency_key=record.idempotency_key,
        command_type=record.type,
        outcome=outcome,
        accounts=accounts,
        amounts=[t.describe() for t in transfers],
        error=error,
        detail={"attempt": record.attempts, **({"ids": ids} if ids else {})},
    )
