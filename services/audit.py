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

from sqlalchemy import insert, text
from sqlalchemy.engine import Connection

from services import schema
from services.bulk_sql import Pending, pg_array
from services.ledger import Transfer

__all__ = ["log_financial_operation", "audit_command", "command_audit_row", "insert_audit_rows",
           "audit_rows_pending", "AuditedCommand"]

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
    insert_audit_rows(conn, [_row(command_id, idempotency_key, command_type, outcome, accounts,
                                  amounts, error, detail)])


def _row(command_id: int | None, idempotency_key: str | None, command_type: str, outcome: str,
         accounts: Sequence[str], amounts: Sequence[dict[str, Any]],
         error: dict[str, Any] | None, detail: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "command_id": command_id,
        "idempotency_key": idempotency_key,
        "command_type": command_type[:60],
        "outcome": outcome,
        "accounts": list(accounts),
        "amounts": list(amounts),
        "error_code": (error or {}).get("code"),
        "detail": {**(detail or {}), **({"error": error} if error else {})},
    }


_INSERT_AUDIT_MANY = text(
    "INSERT INTO audit_events (command_id, idempotency_key, command_type, outcome, accounts, "
    "amounts, error_code, detail) SELECT i, k, t, o, CAST(a AS JSON), CAST(m AS JSON), e, "
    "CAST(d AS JSON) FROM unnest(CAST(:ids AS BIGINT[]), CAST(:keys AS TEXT[]), "
    "CAST(:types AS TEXT[]), CAST(:outcomes AS TEXT[]), CAST(:accounts AS TEXT[]), "
    "CAST(:amounts AS TEXT[]), CAST(:codes AS TEXT[]), CAST(:details AS TEXT[])) "
    "AS v(i, k, t, o, a, m, e, d)")


def insert_audit_rows(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Audit rows in the caller's transaction (one statement for many on PostgreSQL), and
    one structured log line each."""
    if not rows:
        return
    if conn.dialect.name != "postgresql" or len(rows) == 1:
        conn.execute(_INSERT_AUDIT, list(rows))
        _log(rows)
    else:
        pending = audit_rows_pending(rows)
        conn.execute(pending.statement, pending.params)


def audit_rows_pending(rows: Sequence[dict[str, Any]]) -> Pending:
    """The PostgreSQL statement that inserts these rows, to send with others
    (bulk_sql.execute_together); their log lines are written now."""
    def texts(name: str) -> str:
        return pg_array([json.dumps(row[name], default=str) for row in rows])

    _log(rows)
    return Pending(_INSERT_AUDIT_MANY, {
        "ids": pg_array([row["command_id"] for row in rows]),
        "keys": pg_array([row["idempotency_key"] for row in rows]),
        "types": pg_array([row["command_type"] for row in rows]),
        "outcomes": pg_array([row["outcome"] for row in rows]),
        "accounts": texts("accounts"), "amounts": texts("amounts"),
        "codes": pg_array([row["error_code"] for row in rows]), "details": texts("detail")}, reusable=True)


def _log(rows: Sequence[dict[str, Any]]) -> None:
    for row in rows:
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
    insert_audit_rows(conn, [command_audit_row(record, outcome, transfers, error=error, ids=ids)])


def command_audit_row(
    record: AuditedCommand, outcome: str, transfers: Sequence[Transfer] = (), *,
    error: dict[str, Any] | None = None, ids: dict[str, Any] | None = None, attempt: int = 0,
) -> dict[str, Any]:
    """The audit row of a single command's outcome (see audit_command); `attempt` overrides
    the record's count when the delivery was not counted before (the lean path)."""
    accounts = sorted({code for t in transfers for code in (t.debit.code, t.credit.code)})
    return _row(record.id, record.idempotency_key, record.type, outcome, accounts,
                [t.describe() for t in transfers], error,
                {"attempt": attempt or record.attempts, **({"ids": ids} if ids else {})})
