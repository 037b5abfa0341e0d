"""Embedded mode: with no WALLETQ_DATABASE_URL the same services run on a local SQLite file.

The operation, refusal and idempotency tests of the PostgreSQL suite are collected here a
second time, with `settings`, `engine` and `service` pointing at SQLite instead.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from services.atomic_transaction_manager import BusinessRuleError
from services.settings import Settings
from services.verify import verify_ledger
from services.wallet_service import WalletService
from tests.integration import test_idempotency, test_operations
from tests.support.embedded import recollect
from tests.support.ledger import assert_ledger_sound, balances, count

# The PostgreSQL suite's tests, re-collected under this module's fixtures (SQLite).
recollect(globals(), (test_operations, test_idempotency), fixtures=("funded",))


def test_embedded_mode_runs_on_a_sqlite_file_under_walletq_home(
    settings: Settings, engine: Engine
) -> None:
    assert settings.embedded and engine.dialect.name == "sqlite"
    assert settings.database_url.endswith("/home/walletq.db")
    assert (settings.home / "walletq.db").exists()


def test_a_marketplace_day_on_sqlite_keeps_every_invariant(
    service: WalletService, engine: Engine
) -> None:
    service.admin_create_tokens("1000.00")
    service.admin_sell_tokens_to_user("alice", "100.00")
    service.credit_wallet("bob", "5.00")
    service.transfer_tokens_between_users("alice", "bob", "10.00")
    service.transfer_to_escrow("o-1", "alice", "bob", "5.55")
    service.transfer_to_escrow("o-2", "alice", "carol", "20.00")
    assert service.release_from_escrow("o-1")["fee"] == "0.56"
    service.refund_from_escrow("o-2")
    service.user_sell_tokens_to_admin("bob", "3.00")
    service.debit_wallet("alice", "1.00")
    assert service.balance("alice").to_dict() == {"user": "alice", "available": "83.45",
                                                  "escrow": "0.00"}
    assert service.balance("bob").to_dict()["available"] == "16.99"
    assert_ledger_sound(engine, service.settings)


def test_verify_on_sqlite_names_the_account_whose_balance_was_corrupted(
    service: WalletService, engine: Engine
) -> None:
    service.credit_wallet("alice", "10.00")
    with engine.begin() as conn:
        conn.execute(text("UPDATE accounts SET balance_minor = balance_minor + 1"
                          " WHERE code = 'user:alice:available'"))
    failed = {c.name: c.detail for c in verify_ledger(engine, 2) if not c.ok}
    assert set(failed) == {"sum_of_balances_is_zero", "balance_equals_transfers",
                           "balance_after_chain"}  # its last leg's balance after, too
    assert "user:alice:available (balance 1001, transfers 1000)" in failed["balance_equals_transfers"]


@pytest.mark.parametrize("table", ["transfers", "audit_events"])
@pytest.mark.parametrize("statement", ["UPDATE {table} SET created_at = created_at",
                                       "DELETE FROM {table}"])
def test_transfers_and_audit_events_are_append_only_on_sqlite(
    service: WalletService, engine: Engine, table: str, statement: str
) -> None:
    service.credit_wallet("alice", "10.00")
    before = count(engine, table)  # the credit's (and the embedded producer's creation)
    with pytest.raises(DBAPIError, match=f"{table} is append-only"), engine.begin() as conn:
        conn.execute(text(statement.format(table=table)))
    assert count(engine, table) == before >= 1


def test_the_check_constraint_refuses_a_negative_balance_on_sqlite(
    service: WalletService, engine: Engine
) -> None:
    service.credit_wallet("alice", "10.00")
    with pytest.raises(DBAPIError, match="balance_nonnegative"), engine.begin() as conn:
        conn.execute(text("UPDATE accounts SET balance_minor = -1 WHERE code = 'user:alice:available'"))
    assert balances(engine)["user:alice:available"] == 1000


def test_concurrent_writers_on_sqlite_are_serialised_and_never_overdraw(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    service.credit_wallet("alice", "10.00", idempotency_key="dep")
    barrier = threading.Barrier(6)

    def spend(i: int) -> str:
        barrier.wait()
        outcomes = []
        for n in range(5):
            try:
                service.debit_wallet("alice", "0.50", idempotency_key=f"wd-{i}-{n}")
                outcomes.append("ok")
            except BusinessRuleError as exc:
                outcomes.append(exc.code)
        return ",".join(outcomes)

    with ThreadPoolExecutor(6) as pool:
        results = ",".join(pool.map(spend, range(6))).split(",")
    assert results.count("ok") == 20  # 10.00 / 0.50: thirty tries, twenty paid, no more
    assert results.count("insufficient_balance") == 10
    assert balances(engine)["user:alice:available"] == 0
    assert_ledger_sound(engine, settings)
