"""Embedded mode runs the accounts' half of issue 9: the PostgreSQL tests of limits, freezes,
closing, reversals and balance after each leg, collected again on SQLite (those that use
PostgreSQL's own statements have their SQLite form here)."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from services.settings import Settings
from services.verify import verify_ledger
from services.wallet_service import WalletService
from tests.integration import test_account_lifecycle
from tests.support.embedded import recollect

_POSTGRES_ONLY = {"test_account_events_are_append_only",
                  "test_verify_catches_a_hand_broken_balance_after"}
recollect(globals(), (test_account_lifecycle,), fixtures=("funded",), skip=_POSTGRES_ONLY)


def test_the_embedded_database_runs_on_sqlite(engine: Engine) -> None:
    assert engine.dialect.name == "sqlite"


def test_account_events_and_reversals_are_append_only_on_sqlite(
        funded: WalletService, engine: Engine) -> None:
    funded.transfer_tokens_between_users("alice", "bob", "1.00", idempotency_key="t-1")
    test_account_lifecycle.run(funded, "reverse_command", original_key="t-1", reason="x")
    test_account_lifecycle.run(funded, "freeze_account", user="bob", reason="x")
    for statement in ("UPDATE account_events SET reason = 'y'", "DELETE FROM account_events",
                      "DELETE FROM reversals"):
        with pytest.raises(Exception, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))


def test_verify_catches_a_hand_broken_balance_after_on_sqlite(
        funded: WalletService, engine: Engine, settings: Settings) -> None:
    funded.transfer_tokens_between_users("alice", "bob", "1.00", idempotency_key="t-1")
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER transfers_append_only_update"))
        conn.execute(text("UPDATE transfers SET debit_balance_after_minor = "
                          "debit_balance_after_minor - 1 WHERE id = (SELECT MAX(id) FROM "
                          "transfers)"))
    checks = {c.name: c for c in verify_ledger(engine, settings.asset_scale)}
    assert [name for name, c in checks.items() if not c.ok] == ["balance_after_chain"]
    assert "user:alice:available" in checks["balance_after_chain"].detail
