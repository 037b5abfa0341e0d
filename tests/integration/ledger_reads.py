"""Reads the integration tests check the ledger with: plain SQL, independent of the services."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, text
from sqlalchemy.engine import Engine

from services import schema
from services.command_store import CommandRecord, get_record
from services.verify import verify_ledger


def transfers(engine: Engine, key: str | None = None) -> list[tuple[str, str, int, str]]:
    """(debit code, credit code, amount minor, kind) in order of posting; of one command or all."""
    where = "WHERE c.idempotency_key = :key" if key is not None else ""
    with engine.connect() as conn:
        rows = conn.execute(text(f"""
            SELECT d.code, k.code, t.amount_minor, t.kind FROM transfers t
            JOIN accounts d ON d.id = t.debit_account_id
            JOIN accounts k ON k.id = t.credit_account_id
            JOIN commands c ON c.id = t.command_id
            {where} ORDER BY t.id"""), {"key": key}).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]


def balances(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT code, balance_minor FROM accounts")).all())  # type: ignore[arg-type]


def audit(engine: Engine, key: str) -> list[dict[str, Any]]:
    a = schema.audit_events
    with engine.connect() as conn:
        rows = conn.execute(
            select(a.c.command_id, a.c.command_type, a.c.outcome, a.c.error_code, a.c.accounts,
                   a.c.amounts, a.c.detail).where(a.c.idempotency_key == key).order_by(a.c.id))
        return [dict(row._mapping) for row in rows]


def record(engine: Engine, key: str) -> CommandRecord:
    with engine.connect() as conn:
        found = get_record(conn, key)
    assert found is not None, f"no command {key!r}"
    return found


def hold(engine: Engine, hold_id: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM holds WHERE hold_id = :h"), {"h": hold_id}).first()
    return None if row is None else dict(row._mapping)


def count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())


def assert_ledger_holds(engine: Engine, scale: int = 2) -> None:
    checks = verify_ledger(engine, scale)
    failed = [c for c in checks if not c.ok]
    assert not failed, failed
    assert len(checks) == 8
