"""The ledger as the tests read it: every invariant through services.verify, and plain-SQL
reads independent of the services (what moved, what was recorded)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.engine import Engine

from services import schema
from services.command_store import CommandRecord, get_record
from services.settings import Settings
from services.verify import verify_ledger

__all__ = ["assert_ledger_sound", "assert_report_sound", "CHECKS", "transfers", "balances",
           "audit", "audit_outcomes", "record", "hold", "count"]

#: The invariants of docs/ARCHITECTURE.md that verify must report, at least.
CHECKS = ("sum_of_balances_is_zero", "no_forbidden_negative_balance", "balance_equals_transfers",
          "escrow_equals_open_holds", "commands_have_their_transfers", "idempotency_keys_unique",
          "commands_are_signed", "commands_have_their_audit", "holds_add_up",
          # issue 9, the accounts' half (services.verify_accounts)
          "balance_after_chain", "no_balance_below_limit", "frozen_accounts_not_debited",
          "reversals_net_to_zero")


def assert_ledger_sound(engine: Engine, settings: Settings) -> None:
    """Every invariant holds. A verify that checks nothing, or skips one, fails here too."""
    checks = [check.to_dict() for check in verify_ledger(engine, settings.asset_scale)]
    assert_report_sound({"ok": all(check["ok"] for check in checks), "checks": checks})


def assert_report_sound(report: Mapping[str, Any]) -> None:
    """The same for what `walletq --json verify` printed (run as another database role, in
    another process): {"ok": ..., "checks": [{"name", "ok", "detail"}, ...]}."""
    checks = report["checks"]
    names = [check["name"] for check in checks]
    assert checks, "verify returned no checks"
    assert len(set(names)) == len(names), f"a check ran twice: {names}"
    missing = [name for name in CHECKS if name not in names]
    assert not missing, f"verify did not run {missing}"
    failed = [check for check in checks if not check["ok"]]
    assert not failed, failed
    assert report["ok"] is True, report


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
    """Every account's balance in minor units, by code."""
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT code, balance_minor FROM accounts")).all())  # type: ignore[arg-type]


def audit(engine: Engine, key: str) -> list[dict[str, Any]]:
    """A command's audit rows, oldest first."""
    a = schema.audit_events
    with engine.connect() as conn:
        rows = conn.execute(
            select(a.c.command_id, a.c.command_type, a.c.outcome, a.c.error_code, a.c.accounts,
                   a.c.amounts, a.c.detail).where(a.c.idempotency_key == key).order_by(a.c.id))
        return [dict(row._mapping) for row in rows]


def audit_outcomes(engine: Engine, key: str | None = None) -> list[tuple[str, str | None]]:
    """(outcome, error code) of every audit row, or of one key's, oldest first."""
    a = schema.audit_events
    query = select(a.c.outcome, a.c.error_code).order_by(a.c.id)
    if key is not None:
        query = query.where(a.c.idempotency_key == key)
    with engine.connect() as conn:
        return [(row.outcome, row.error_code) for row in conn.execute(query)]


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
