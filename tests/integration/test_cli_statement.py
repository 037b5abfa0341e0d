"""`walletq balance USER --at`, `walletq statement` (and its CSV) and `history`'s running
balance, on PostgreSQL and SQLite: read from the balance each leg recorded after it."""

from __future__ import annotations

import csv
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import text

from services.wallet_service import WalletService
from tests.integration.test_cli_ledger import both_orders, ledger  # noqa: F401 - fixture
from tests.support.cli import walletq


def _legs(service: WalletService, code: str) -> list[tuple[datetime, str]]:
    """(time, balance after) of each leg of the account, oldest first."""
    with service.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT t.created_at, CASE WHEN d.code = :c THEN t.debit_balance_after_minor "
            "ELSE t.credit_balance_after_minor END FROM transfers t "
            "JOIN accounts d ON d.id = t.debit_account_id "
            "JOIN accounts k ON k.id = t.credit_account_id "
            "WHERE d.code = :c OR k.code = :c ORDER BY t.id"), {"c": code}).all()
    out = []
    for moment, after in rows:
        if isinstance(moment, str):  # SQLite's text
            moment = datetime.fromisoformat(moment)
        moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        out.append((moment, f"{after / 100:.2f}"))
    return out


def test_balance_at_a_moment_is_the_balance_after_the_last_leg_by_then(
        ledger: WalletService) -> None:  # noqa: F811
    legs = _legs(ledger, "user:alice:available")
    assert [after for _, after in legs] == ["100.00", "97.50", "92.50"]
    last = legs[-1][0]
    [now] = both_orders("balance", "alice", "--at", (last + timedelta(seconds=5)).isoformat())
    assert (now["available"], now["escrow"]) == ("92.50", "5.00")
    [before] = both_orders("balance", "alice", "--at", "2000-01-01T00:00:00Z")
    assert (before["available"], before["escrow"]) == ("0.00", "0.00")
    [bob] = both_orders("balance", "bob", "--at", "2999-01-01T00:00:00")
    assert (bob["available"], bob["escrow"]) == ("2.50", "0.00")
    assert walletq("balance", "alice", "--at", "yesterday").exit_code == 2
    assert walletq("balance", "nobody", "--at", "2999-01-01T00:00:00Z").exit_code == 1


def test_a_statement_prints_opening_movements_and_closing(ledger: WalletService) -> None:  # noqa: F811
    [report] = both_orders("statement", "alice", "--from", "2000-01-01T00:00:00Z",
                           "--to", "2999-01-01T00:00:00Z")
    assert report["account"] == "user:alice:available"
    assert (report["opening"], report["closing"]) == ("0.00", "92.50")
    assert [(m["kind"], m["amount"], m["balance_after"], m["idempotency_key"])
            for m in report["movements"]] == [
        ("sale", "100.00", "100.00", "sale"), ("transfer", "-2.50", "97.50", "t-1"),
        ("hold", "-5.00", "92.50", "h-1")]
    # A period after the first leg opens at its balance after.
    legs = _legs(ledger, "user:alice:available")
    ledger.transfer_tokens_between_users("alice", "bob", "1.00", idempotency_key="t-2")
    start = legs[-1][0] + timedelta(microseconds=1)
    [later] = both_orders("statement", "alice", "--from", start.isoformat(),
                          "--to", "2999-01-01T00:00:00Z")
    assert (later["opening"], later["closing"]) == ("92.50", "91.50")
    assert [m["idempotency_key"] for m in later["movements"]] == ["t-2"]
    table = walletq("statement", "alice", "--from", "2000-01-01", "--to", "2999-01-01")
    assert table.exit_code == 0 and "opening" in table.stdout and "closing" in table.stdout
    assert walletq("statement", "alice", "--from", "2999-01-01", "--to", "2000-01-01"
                   ).exit_code == 2
    assert walletq("statement", "nobody", "--from", "2000-01-01", "--to", "2999-01-01"
                   ).exit_code == 1


def test_a_statements_csv_is_read_back_by_the_csv_module_and_is_private(
        ledger: WalletService, tmp_path: Path) -> None:  # noqa: F811
    ledger.transfer_tokens_between_users("bob", "alice", "0.50", idempotency_key="-refund")
    path = tmp_path / "alice.csv"
    path.write_text("old\n")
    os.chmod(path, 0o644)
    result = walletq("statement", "alice", "--from", "2000-01-01T00:00:00Z", "--to",
                     "2999-01-01T00:00:00Z", "--csv", str(path))
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["at", "kind", "amount", "counterparty", "idempotency_key",
                       "balance_after"]
    assert rows[1][1:] == ["opening", "", "", "", "0.00"]
    assert [row[1:] for row in rows[2:-1]] == [
        ["sale", "100.00", "platform:treasury", "sale", "100.00"],
        ["transfer", "-2.50", "user:bob:available", "t-1", "97.50"],
        ["hold", "-5.00", "user:alice:escrow", "h-1", "92.50"],
        ["transfer", "0.50", "user:bob:available", "'-refund", "93.00"]]
    assert rows[-1][1:] == ["closing", "", "", "", "93.00"]


def test_history_shows_each_legs_balance_after(ledger: WalletService) -> None:  # noqa: F811
    table = walletq("history", "alice")
    assert table.exit_code == 0 and "balance" in table.stdout and "92.50" in table.stdout
