"""The `walletq` ledger commands, on PostgreSQL and on embedded SQLite:
db upgrade, balance, balances, history, verify, schema; --json before or after the command."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url

from services import settings as settings_module
from services.db import dispose_engines, get_engine
from services.settings import get_settings
from services.wallet_service import WalletService
from tests import servers
from tests.support.cli import walletq
from tests.support.env import strip_walletq_env
from tests.support.ledger import CHECKS


@pytest.fixture(params=["postgresql", "sqlite"])
def ledger(request: pytest.FixtureRequest) -> WalletService:
    """A small ledger on either database: alice bought 100.00, paid bob 2.50, holds 5.00 for bob."""
    if request.param == "postgresql":
        request.getfixturevalue("walletq_env")
    else:
        request.getfixturevalue("sqlite_env")
    service = WalletService(get_engine(get_settings()), get_settings())
    service.admin_create_tokens("1000.00", idempotency_key="mint")
    service.admin_sell_tokens_to_user("alice", "100.00", idempotency_key="sale")
    service.transfer_tokens_between_users("alice", "bob", "2.50", idempotency_key="t-1")
    service.transfer_to_escrow("o-1", "alice", "bob", "5.00", idempotency_key="h-1")
    return service


def both_orders(*args: str) -> list[Any]:
    """The command's JSON lines, the same with --json before the command and after it."""
    before, after = walletq("--json", *args), walletq(*args, "--json")
    assert before.exit_code == after.exit_code == 0, (before.output, after.output)
    assert before.stdout == after.stdout
    return before.json_lines()


def test_balance_prints_available_and_escrow_as_json_with_json_before_or_after(
    ledger: WalletService,
) -> None:
    assert both_orders("balance", "alice") == [
        {"user": "alice", "available": "92.50", "escrow": "5.00"}]


def test_balance_prints_a_table_for_people(ledger: WalletService) -> None:
    result = walletq("balance", "bob")
    assert result.exit_code == 0
    assert "available" in result.stdout and "escrow" in result.stdout
    assert "2.50" in result.stdout and "0.00" in result.stdout


def test_the_balance_of_an_unknown_user_exits_1_with_the_error_code(ledger: WalletService) -> None:
    result = walletq("balance", "nobody", "--json")
    assert result.exit_code == 1
    [error] = result.json_lines()
    assert error["error"]["code"] == "unknown_user" and "nobody" in error["error"]["message"]
    plain = walletq("balance", "nobody")
    assert plain.exit_code == 1 and "nobody" in plain.stderr


def test_balances_prints_one_json_object_per_account(ledger: WalletService) -> None:
    assert both_orders("balances") == [
        {"account": "platform:treasury", "balance": "900.00"},
        {"account": "system:issuance", "balance": "-1000.00"},
        {"account": "user:alice:available", "balance": "92.50"},
        {"account": "user:alice:escrow", "balance": "5.00"},
        {"account": "user:bob:available", "balance": "2.50"},
    ]


def test_balances_prints_a_table_for_people(ledger: WalletService) -> None:
    result = walletq("balances")
    assert result.exit_code == 0
    assert "platform:treasury" in result.stdout and "-1000.00" in result.stdout


def test_history_prints_an_accounts_transfers_newest_first(ledger: WalletService) -> None:
    rows = both_orders("history", "alice")
    assert [(r["idempotency_key"], r["kind"], r["amount"]) for r in rows] == [
        ("h-1", "hold", "-5.00"), ("t-1", "transfer", "-2.50"), ("sale", "sale", "100.00")]
    assert set(rows[0]) == {"transfer_id", "at", "kind", "debit", "credit", "amount",
                            "idempotency_key", "balance_after"}
    assert [r["balance_after"] for r in rows] == ["92.50", "97.50", "100.00"]


def test_history_takes_an_account_code_and_a_limit(ledger: WalletService) -> None:
    rows = walletq("history", "user:alice:escrow", "--limit", "1", "--json").json_lines()
    assert [(r["kind"], r["amount"]) for r in rows] == [("hold", "5.00")]
    assert walletq("history", "alice", "--limit", "0").exit_code == 2
    table = walletq("history", "bob")
    assert table.exit_code == 0 and "t-1" in table.stdout


def test_history_of_an_unknown_account_exits_1(ledger: WalletService) -> None:
    result = walletq("--json", "history", "nobody")
    assert result.exit_code == 1 and result.json_lines()[0]["error"]["code"] == "unknown_user"


def test_verify_prints_every_check_and_exits_0_when_the_ledger_holds(ledger: WalletService) -> None:
    [report] = both_orders("verify")
    assert report["ok"] is True
    assert {c["name"] for c in report["checks"]} >= set(CHECKS)
    assert all(set(c) == {"name", "ok", "detail"} and c["ok"] for c in report["checks"])


def test_verify_prints_a_table_for_people(ledger: WalletService) -> None:
    result = walletq("verify")
    assert result.exit_code == 0
    assert "sum_of_balances_is_zero" in result.stdout and "all invariants hold" in result.stdout


def test_verify_exits_non_zero_naming_the_account_whose_balance_was_corrupted(
    ledger: WalletService,
) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(text("UPDATE accounts SET balance_minor = balance_minor - 7"
                          " WHERE code = 'user:bob:available'"))
    result = walletq("verify", "--json")
    assert result.exit_code == 1
    [report] = result.json_lines()
    assert report["ok"] is False
    failed = {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}
    # The last leg's balance after it no longer matches the balance either (issue 9).
    assert set(failed) == {"sum_of_balances_is_zero", "balance_equals_transfers",
                           "balance_after_chain"}
    assert "user:bob:available (balance 243, transfers 250)" in failed["balance_equals_transfers"]
    assert "-7" in failed["sum_of_balances_is_zero"]
    table = walletq("verify")
    assert table.exit_code == 1
    assert "FAILED" in table.stdout and "user:bob:available" in table.stdout
    assert "invariants broken" in table.stdout


def test_verify_names_the_escrow_that_disagrees_with_its_holds(ledger: WalletService) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(text("UPDATE holds SET status = 'refunded', closed_by = opened_by, "
                          "refunded_minor = amount_minor"))
    [report] = walletq("--json", "verify").json_lines()
    failed = {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}
    assert set(failed) == {"escrow_equals_open_holds", "holds_add_up"}
    assert "1 users disagree: alice (escrow 500, open holds 0)" == failed["escrow_equals_open_holds"]


def test_schema_prints_the_json_schema_of_the_commands(ledger: WalletService) -> None:
    result = walletq("schema")
    assert result.exit_code == 0, result.output
    for args in (["--json", "schema"], ["schema", "--json"]):
        assert walletq(*args).stdout == result.stdout
    schema = json.loads(result.stdout)
    assert schema["title"] == "walletq command"
    assert "credit_wallet" in schema["properties"]["type"]["enum"]


def test_an_embedded_home_gets_its_schema_on_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    strip_walletq_env(monkeypatch)
    monkeypatch.setenv("WALLETQ_HOME", str(tmp_path / "fresh"))
    settings_module.reset_settings()
    try:
        result = walletq("--json", "balances")
        assert result.exit_code == 0 and result.stdout == ""
        assert (tmp_path / "fresh" / "walletq.db").exists()
        assert walletq("--json", "verify").json_lines()[0]["ok"] is True
    finally:
        settings_module.reset_settings()
        dispose_engines()


def test_a_server_database_without_schema_asks_for_db_upgrade_which_creates_it(
    pg_admin: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"walletq_empty_{uuid.uuid4().hex[:10]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(servers.PG_URL).set(database=name).render_as_string(hide_password=False)
    strip_walletq_env(monkeypatch)
    monkeypatch.setenv("WALLETQ_DATABASE_URL", url)
    monkeypatch.setenv("WALLETQ_HOME", str(tmp_path))
    settings_module.reset_settings()
    try:
        refused = walletq("balances")
        assert refused.exit_code == 1 and "walletq db upgrade" in refused.stderr
        upgraded = walletq("db", "upgrade", "--json")
        assert upgraded.exit_code == 0, upgraded.output
        assert upgraded.json_lines()[0]["ok"] is True
        assert walletq("--json", "db", "upgrade").exit_code == 0  # twice is harmless
        assert walletq("verify", "--json").json_lines()[0]["ok"] is True
    finally:
        settings_module.reset_settings()
        dispose_engines()
        with pg_admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_the_installed_walletq_command_runs_verify_in_its_own_process(
    walletq_env: dict[str, str],
) -> None:
    service = WalletService(get_engine(get_settings()), get_settings())
    service.credit_wallet("alice", "92.50")
    service.transfer_to_escrow("o-1", "alice", "bob", "5.00")
    service.credit_wallet("alice", "5.00")
    done = walletq("verify", "--json", process=True)
    assert done.exit_code == 0, done
    assert done.json()["ok"] is True
    balance = walletq("--json", "balance", "alice", process=True)
    assert balance.json() == {"user": "alice", "available": "92.50", "escrow": "5.00"}


@pytest.mark.parametrize("process", [False, True], ids=["in-process", "console-script"])
def test_a_setting_that_makes_no_sense_exits_2_naming_the_variable(
    walletq_env: dict[str, str], process: bool
) -> None:
    bad = {"WALLETQ_ASSET_SCALE": "two"}
    as_json = walletq("--json", "balances", env=bad, process=process)
    assert as_json.exit_code == 2, as_json
    error = as_json.json()["error"]
    assert error["code"] == "invalid_settings" and "WALLETQ_ASSET_SCALE='two'" in error["message"]
    human = walletq("verify", env={"WALLETQ_FEE_RATE": "1.5"}, process=process)
    assert human.exit_code == 2 and "WALLETQ_FEE_RATE" in human.stderr


def test_the_smallest_amounts_of_scale_8_print_as_digits_never_an_exponent(
        sqlite_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """str() of a Decimal at scale 8 writes '6E-8': an amount walletq prints must be one a
    command accepts (tables, --json, results alike)."""
    monkeypatch.setenv("WALLETQ_ASSET_SCALE", "8")
    settings_module.reset_settings()
    service = WalletService(get_engine(get_settings()), get_settings())
    service.credit_wallet("ann", "0.00000001", idempotency_key="k1")
    service.credit_wallet("bob", "1", idempotency_key="k2")
    assert service.transfer_tokens_between_users(
        "bob", "ann", "0.00000005", idempotency_key="k3")["amount"] == "0.00000005"
    assert both_orders("balance", "ann") == [
        {"user": "ann", "available": "0.00000006", "escrow": "0.00000000"}]
    for args in (("balance", "ann"), ("balances",), ("history", "user:ann:available")):
        result = walletq(*args)
        assert result.exit_code == 0, result.output
        assert "E-" not in result.stdout, result.stdout
    assert "0.00000006" in walletq("balance", "ann").stdout
