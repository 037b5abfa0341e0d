"""The nine operations on PostgreSQL: their transfers, balances, audit rows and command records;
every refusal moves nothing and leaves a rejected record with its code and an audit row."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from services import settings as settings_module
from services.atomic_transaction_manager import (
    FinancialIntegrityError,
    HoldExistsError,
    HoldNotOpenError,
    InsufficientBalanceError,
    InvalidCommandError,
    UnknownHoldError,
    UnknownUserError,
)
from services.settings import Settings
from services.wallet_service import WalletService
from tests.support.ledger import (
    assert_ledger_sound,
    audit,
    balances,
    count,
    hold,
    record,
    transfers,
)

EXT, TREASURY, FEES, ISSUANCE = "system:external", "platform:treasury", "platform:fees", "system:issuance"


def avail(user: str) -> str:
    return f"user:{user}:available"


def escrow(user: str) -> str:
    return f"user:{user}:escrow"


def assert_succeeded(engine: Engine, key: str, type_: str, result: dict[str, Any],
                     legs: list[tuple[str, str, int, str]]) -> None:
    """The command record, its transfers and its one audit row agree with what was returned."""
    rec = record(engine, key)
    assert rec.status == "succeeded" and rec.type == type_
    assert rec.result == result and rec.error is None
    assert rec.attempts == 1 and rec.completed_at is not None
    assert transfers(engine, key) == legs
    rows = audit(engine, key)
    assert len(rows) == 1
    row = rows[0]
    assert (row["command_id"], row["command_type"], row["outcome"], row["error_code"]) == (
        rec.id, type_, "succeeded", None)
    assert row["accounts"] == sorted({code for leg in legs for code in leg[:2]})
    assert row["amounts"] == [{"debit": d, "credit": c, "amount_minor": a, "kind": k}
                              for d, c, a, k in legs]


def assert_refused(service: WalletService, key: str, error: type[FinancialIntegrityError],
                   code: str, call: Callable[[], Any]) -> FinancialIntegrityError:
    """`call` raises `error`; nothing moved; a rejected record with `code` and an audit row."""
    engine = service.engine
    before = (balances(engine), transfers(engine), count(engine, "holds"))
    with pytest.raises(error) as caught:
        call()
    assert caught.value.code == code
    assert caught.value.ids.get("idempotency_key") == key
    assert (balances(engine), transfers(engine), count(engine, "holds")) == before
    rec = record(engine, key)
    assert rec.status == "rejected" and rec.result is None
    assert rec.error is not None and rec.error["code"] == code and rec.error["message"]
    assert transfers(engine, key) == []
    rows = audit(engine, key)
    assert len(rows) == 1
    assert (rows[0]["command_id"], rows[0]["outcome"], rows[0]["error_code"]) == (
        rec.id, "rejected", code)
    assert rows[0]["amounts"] == [] and rows[0]["detail"]["error"]["code"] == code
    assert_ledger_sound(engine, service.settings)
    return caught.value


@pytest.fixture
def funded(service: WalletService) -> WalletService:
    """Treasury 1000.00 minted; alice bought 100.00 of it; bob has nothing yet."""
    service.admin_create_tokens("1000.00", idempotency_key="mint-0")
    service.admin_sell_tokens_to_user("alice", "100.00", idempotency_key="sale-0")
    return service


# --- the nine operations ----------------------------------------------------------------


def test_credit_wallet_moves_external_money_into_a_new_users_available(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    result = service.credit_wallet("alice", "10.00", idempotency_key="dep-1", memo="first")
    assert result == {"user": "alice", "amount": "10.00", "available": "10.00"}
    assert_succeeded(engine, "dep-1", "credit_wallet", result, [(EXT, avail("alice"), 1000, "credit")])
    assert balances(engine) == {EXT: -1000, avail("alice"): 1000}
    assert service.balance("alice").to_dict() == {"user": "alice", "available": "10.00",
                                                  "escrow": "0.00"}
    assert_ledger_sound(engine, settings)


def test_a_second_credit_adds_to_the_same_account(service: WalletService, engine: Engine) -> None:
    service.credit_wallet("alice", "10.00", idempotency_key="dep-1")
    result = service.credit_wallet("alice", "0.05", idempotency_key="dep-2")
    assert result["available"] == "10.05"
    assert balances(engine) == {EXT: -1005, avail("alice"): 1005}


def test_debit_wallet_moves_available_money_out(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    service.credit_wallet("alice", "10.00", idempotency_key="dep-1")
    result = service.debit_wallet("alice", "3.50", idempotency_key="wd-1")
    assert result == {"user": "alice", "amount": "3.50", "available": "6.50"}
    assert_succeeded(engine, "wd-1", "debit_wallet", result, [(avail("alice"), EXT, 350, "debit")])
    assert balances(engine) == {EXT: -650, avail("alice"): 650}
    assert_ledger_sound(engine, settings)


def test_a_debit_of_the_whole_balance_leaves_zero(service: WalletService, engine: Engine) -> None:
    service.credit_wallet("alice", "10.00", idempotency_key="dep-1")
    assert service.debit_wallet("alice", "10.00", idempotency_key="wd-1")["available"] == "0.00"
    assert balances(engine)[avail("alice")] == 0


def test_transfer_between_users_moves_available_to_available_opening_the_payee(
    funded: WalletService, engine: Engine, settings: Settings
) -> None:
    result = funded.transfer_tokens_between_users("alice", "bob", "2.50", idempotency_key="t-1")
    assert result == {"from_user": "alice", "to_user": "bob", "amount": "2.50",
                      "from_available": "97.50"}
    assert_succeeded(engine, "t-1", "transfer_tokens_between_users", result,
                     [(avail("alice"), avail("bob"), 250, "transfer")])
    assert balances(engine)[avail("alice")] == 9750 and balances(engine)[avail("bob")] == 250
    assert_ledger_sound(engine, settings)


def test_transfer_to_escrow_opens_a_hold_and_moves_available_to_escrow(
    funded: WalletService, engine: Engine, settings: Settings
) -> None:
    result = funded.transfer_to_escrow("o-7", "alice", "bob", "5.00", idempotency_key="o-7-hold")
    assert result == {"hold_id": "o-7", "payer": "alice", "payee": "bob", "amount": "5.00",
                      "fee_rate": "0.10", "available": "95.00"}
    assert_succeeded(engine, "o-7-hold", "transfer_to_escrow", result,
                     [(avail("alice"), escrow("alice"), 500, "hold")])
    opened = hold(engine, "o-7")
    assert opened is not None
    assert (opened["payer"], opened["payee"], opened["amount_minor"], opened["status"]) == (
        "alice", "bob", 500, "held")
    assert opened["opened_by"] == record(engine, "o-7-hold").id
    assert opened["closed_by"] is None and opened["fee_minor"] is None
    assert funded.balance("alice").escrow == Decimal("5.00")
    assert funded.open_holds("alice") == [{"hold_id": "o-7", "payee": "bob",
                                           "amount": Decimal("5.00")}]
    assert_ledger_sound(engine, settings)


def test_release_pays_the_payee_the_amount_less_the_default_fee_and_the_fee_to_platform(
    funded: WalletService, engine: Engine, settings: Settings
) -> None:
    funded.transfer_to_escrow("o-7", "alice", "bob", "5.55", idempotency_key="o-7-hold")
    result = funded.release_from_escrow("o-7", idempotency_key="o-7-done")
    # 10% of 5.55 is 0.555: half to even gives 0.56, and 4.99 + 0.56 = 5.55.
    assert result == {"hold_id": "o-7", "payer": "alice", "payee": "bob", "amount": "5.55",
                      "payee_amount": "4.99", "fee": "0.56", "fee_rate": "0.10",
                      "status": "released", "hold_amount": "5.55", "released": "5.55",
                      "refunded": "0.00", "remaining": "0.00"}
    assert_succeeded(engine, "o-7-done", "release_from_escrow", result,
                     [(escrow("alice"), avail("bob"), 499, "release"),
                      (escrow("alice"), FEES, 56, "fee")])
    closed = hold(engine, "o-7")
    assert closed is not None
    assert (closed["status"], closed["fee_minor"], closed["fee_rate"]) == ("released", 56, "0.10")
    assert closed["closed_by"] == record(engine, "o-7-done").id and closed["closed_at"] is not None
    money = balances(engine)
    assert (money[escrow("alice")], money[avail("bob")], money[FEES]) == (0, 499, 56)
    assert funded.open_holds("alice") == []
    assert_ledger_sound(engine, settings)


@pytest.mark.parametrize(
    ("rate", "legs"),
    [("0.25", [("release", 1500), ("fee", 500)]),
     ("0", [("release", 2000)]),
     ("1", [("fee", 2000)])],
)
def test_release_with_an_explicit_fee_rate_posts_only_the_legs_with_money(
    funded: WalletService, engine: Engine, rate: str, legs: list[tuple[str, int]], settings: Settings
) -> None:
    funded.transfer_to_escrow("o-8", "alice", "bob", "20.00", idempotency_key="o-8-hold")
    result = funded.release_from_escrow("o-8", fee_rate=rate, idempotency_key="o-8-done")
    assert result["fee_rate"] == rate
    posted = [(kind, amount) for _, _, amount, kind in transfers(engine, "o-8-done")]
    assert posted == legs
    assert sum(amount for _, amount in posted) == 2000
    assert_ledger_sound(engine, settings)


def test_refund_returns_the_hold_to_the_payers_available(
    funded: WalletService, engine: Engine, settings: Settings
) -> None:
    funded.transfer_to_escrow("o-9", "alice", "bob", "7.00", idempotency_key="o-9-hold")
    result = funded.refund_from_escrow("o-9", idempotency_key="o-9-cancel")
    assert result == {"hold_id": "o-9", "payer": "alice", "amount": "7.00", "status": "refunded",
                      "hold_amount": "7.00", "released": "0.00", "refunded": "7.00",
                      "remaining": "0.00"}
    assert_succeeded(engine, "o-9-cancel", "refund_from_escrow", result,
                     [(escrow("alice"), avail("alice"), 700, "refund")])
    closed = hold(engine, "o-9")
    assert closed is not None and closed["status"] == "refunded" and closed["fee_minor"] is None
    assert funded.balance("alice").to_dict() == {"user": "alice", "available": "100.00",
                                                 "escrow": "0.00"}
    assert_ledger_sound(engine, settings)


def test_admin_create_tokens_mints_from_issuance_into_the_treasury(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    result = service.admin_create_tokens("1000000.00", idempotency_key="mint-1")
    assert result == {"amount": "1000000.00", "treasury": "1000000.00"}
    assert_succeeded(engine, "mint-1", "admin_create_tokens", result,
                     [(ISSUANCE, TREASURY, 10**8, "mint")])
    assert balances(engine) == {ISSUANCE: -(10**8), TREASURY: 10**8}
    assert service.total_supply() == Decimal("1000000.00")
    assert_ledger_sound(engine, settings)


def test_admin_sell_tokens_moves_treasury_to_the_user(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    service.admin_create_tokens("1000.00", idempotency_key="mint-1")
    result = service.admin_sell_tokens_to_user("alice", "100.00", idempotency_key="sale-3")
    assert result == {"user": "alice", "amount": "100.00", "available": "100.00"}
    assert_succeeded(engine, "sale-3", "admin_sell_tokens_to_user", result,
                     [(TREASURY, avail("alice"), 10000, "sale")])
    assert balances(engine)[TREASURY] == 90000
    assert_ledger_sound(engine, settings)


def test_user_sell_tokens_moves_the_users_available_back_to_treasury(
    funded: WalletService, engine: Engine, settings: Settings
) -> None:
    result = funded.user_sell_tokens_to_admin("alice", "50.00", idempotency_key="cash-4")
    assert result == {"user": "alice", "amount": "50.00", "available": "50.00"}
    assert_succeeded(engine, "cash-4", "user_sell_tokens_to_admin", result,
                     [(avail("alice"), TREASURY, 5000, "buyback")])
    assert balances(engine)[TREASURY] == 95000
    assert_ledger_sound(engine, settings)


def test_an_operation_without_a_key_gets_a_fresh_one_each_call(
    service: WalletService, engine: Engine
) -> None:
    service.credit_wallet("alice", "1.00")
    service.credit_wallet("alice", "1.00")
    assert balances(engine)[avail("alice")] == 200
    assert count(engine, "commands") == 2


def test_a_float_amount_is_refused_by_the_python_api_before_anything_is_recorded(
    service: WalletService, engine: Engine
) -> None:
    with pytest.raises(InvalidCommandError, match="never float"):
        service.credit_wallet("alice", 1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidCommandError, match="amount"):
        service.credit_wallet("alice", Decimal("1.005"))
    assert count(engine, "commands") == 0
    assert count(engine, "audit_events WHERE command_type <> 'producer'") == 0


def test_a_decimal_amount_is_accepted_by_the_python_api(service: WalletService) -> None:
    assert service.credit_wallet("alice", Decimal("2.5"))["available"] == "2.50"


# --- refusals ---------------------------------------------------------------------------


def test_a_debit_beyond_the_balance_is_rejected_as_insufficient_balance(
    funded: WalletService,
) -> None:
    error = assert_refused(funded, "wd-1", InsufficientBalanceError, "insufficient_balance",
                           lambda: funded.debit_wallet("alice", "100.01", idempotency_key="wd-1"))
    assert "user:alice:available" in error.message


def test_a_debit_of_an_unknown_user_is_rejected(service: WalletService) -> None:
    assert_refused(service, "wd-1", UnknownUserError, "unknown_user",
                   lambda: service.debit_wallet("nobody", "1.00", idempotency_key="wd-1"))


def test_a_transfer_beyond_the_balance_is_rejected_and_opens_no_account_for_the_payee(
    funded: WalletService, engine: Engine
) -> None:
    assert_refused(funded, "t-1", InsufficientBalanceError, "insufficient_balance",
                   lambda: funded.transfer_tokens_between_users("alice", "carol", "100.01",
                                                                idempotency_key="t-1"))
    assert avail("carol") not in balances(engine)


def test_a_transfer_from_an_unknown_user_is_rejected(funded: WalletService) -> None:
    assert_refused(funded, "t-1", UnknownUserError, "unknown_user",
                   lambda: funded.transfer_tokens_between_users("nobody", "alice", "1.00",
                                                                idempotency_key="t-1"))


def test_a_hold_beyond_the_balance_is_rejected_and_leaves_no_hold(
    funded: WalletService, engine: Engine
) -> None:
    assert_refused(funded, "h-1", InsufficientBalanceError, "insufficient_balance",
                   lambda: funded.transfer_to_escrow("o-1", "alice", "bob", "100.01",
                                                     idempotency_key="h-1"))
    assert hold(engine, "o-1") is None and escrow("alice") not in balances(engine)


def test_a_hold_for_an_unknown_payer_is_rejected(funded: WalletService, engine: Engine) -> None:
    assert_refused(funded, "h-1", UnknownUserError, "unknown_user",
                   lambda: funded.transfer_to_escrow("o-1", "nobody", "bob", "1.00",
                                                     idempotency_key="h-1"))
    assert hold(engine, "o-1") is None


def test_a_hold_reusing_an_existing_hold_id_is_rejected_and_the_first_hold_is_untouched(
    funded: WalletService, engine: Engine
) -> None:
    funded.transfer_to_escrow("o-1", "alice", "bob", "5.00", idempotency_key="h-1")
    first = hold(engine, "o-1")
    assert_refused(funded, "h-2", HoldExistsError, "hold_exists",
                   lambda: funded.transfer_to_escrow("o-1", "alice", "carol", "6.00",
                                                     idempotency_key="h-2"))
    assert hold(engine, "o-1") == first


@pytest.mark.parametrize("operation", ["release_from_escrow", "refund_from_escrow"])
def test_closing_an_unknown_hold_is_rejected(funded: WalletService, operation: str) -> None:
    assert_refused(funded, "c-1", UnknownHoldError, "unknown_hold",
                   lambda: getattr(funded, operation)("no-such-hold", idempotency_key="c-1"))


@pytest.mark.parametrize(
    ("first", "second"),
    [("release_from_escrow", "release_from_escrow"), ("release_from_escrow", "refund_from_escrow"),
     ("refund_from_escrow", "release_from_escrow"), ("refund_from_escrow", "refund_from_escrow")],
)
def test_closing_a_hold_that_is_no_longer_held_is_rejected(
    funded: WalletService, engine: Engine, first: str, second: str
) -> None:
    funded.transfer_to_escrow("o-1", "alice", "bob", "5.00", idempotency_key="h-1")
    getattr(funded, first)("o-1", idempotency_key="c-1")
    closed = hold(engine, "o-1")
    error = assert_refused(funded, "c-2", HoldNotOpenError, "hold_not_open",
                           lambda: getattr(funded, second)("o-1", idempotency_key="c-2"))
    assert "already" in error.message
    assert hold(engine, "o-1") == closed


def test_a_sale_beyond_the_treasury_is_rejected(service: WalletService, engine: Engine) -> None:
    service.admin_create_tokens("10.00", idempotency_key="mint-1")
    assert_refused(service, "sale-1", InsufficientBalanceError, "insufficient_balance",
                   lambda: service.admin_sell_tokens_to_user("alice", "10.01",
                                                             idempotency_key="sale-1"))
    assert avail("alice") not in balances(engine)


def test_a_sale_before_any_mint_is_rejected(service: WalletService) -> None:
    assert_refused(service, "sale-1", InsufficientBalanceError, "insufficient_balance",
                   lambda: service.admin_sell_tokens_to_user("alice", "1.00",
                                                             idempotency_key="sale-1"))


def test_a_buyback_beyond_the_users_balance_is_rejected(funded: WalletService) -> None:
    assert_refused(funded, "cash-1", InsufficientBalanceError, "insufficient_balance",
                   lambda: funded.user_sell_tokens_to_admin("alice", "100.01",
                                                            idempotency_key="cash-1"))


def test_a_buyback_by_an_unknown_user_is_rejected(funded: WalletService) -> None:
    assert_refused(funded, "cash-1", UnknownUserError, "unknown_user",
                   lambda: funded.user_sell_tokens_to_admin("nobody", "1.00",
                                                            idempotency_key="cash-1"))


def test_money_in_escrow_cannot_be_spent_from_available(funded: WalletService) -> None:
    funded.transfer_to_escrow("o-1", "alice", "bob", "60.00", idempotency_key="h-1")
    assert_refused(funded, "wd-1", InsufficientBalanceError, "insufficient_balance",
                   lambda: funded.debit_wallet("alice", "40.01", idempotency_key="wd-1"))


# --- reads ------------------------------------------------------------------------------


def test_the_balance_of_an_unknown_user_is_an_error_not_zero(service: WalletService) -> None:
    with pytest.raises(UnknownUserError):
        service.balance("nobody")


def test_balances_lists_every_account_in_code_order(funded: WalletService) -> None:
    funded.transfer_to_escrow("o-1", "alice", "bob", "5.00", idempotency_key="h-1")
    assert funded.balances() == [
        {"account": TREASURY, "balance": Decimal("900.00")},
        {"account": ISSUANCE, "balance": Decimal("-1000.00")},
        {"account": avail("alice"), "balance": Decimal("95.00")},
        {"account": escrow("alice"), "balance": Decimal("5.00")},
    ]


def test_history_lists_an_accounts_transfers_newest_first_signed_from_its_side(
    funded: WalletService,
) -> None:
    funded.transfer_tokens_between_users("alice", "bob", "2.50", idempotency_key="t-1")
    funded.transfer_tokens_between_users("bob", "alice", "1.00", idempotency_key="t-2")
    rows = funded.history(avail("alice"))
    assert [(r["idempotency_key"], r["kind"], r["amount"]) for r in rows] == [
        ("t-2", "transfer", Decimal("1.00")),
        ("t-1", "transfer", Decimal("-2.50")),
        ("sale-0", "sale", Decimal("100.00")),
    ]
    assert rows[0]["debit"] == avail("bob") and rows[0]["credit"] == avail("alice")
    assert rows[0]["at"].endswith("Z")
    assert len(funded.history(avail("alice"), limit=1)) == 1
    with pytest.raises(UnknownUserError):
        funded.history("user:nobody:available")


def test_release_without_a_fee_rate_uses_the_configured_walletq_fee_rate(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    monkeypatch.setenv("WALLETQ_FEE_RATE", "0.035")
    settings_module.reset_settings()
    service = WalletService(engine, settings_module.get_settings())
    service.credit_wallet("alice", "100.00", idempotency_key="dep")
    service.transfer_to_escrow("o-1", "alice", "bob", "10.50", idempotency_key="hold")
    result = service.release_from_escrow("o-1", idempotency_key="done")
    # 3.5% of 10.50 is 0.3675 → 0.37 (nearest; no tie), and 10.13 + 0.37 = 10.50.
    assert (result["fee_rate"], result["fee"], result["payee_amount"]) == ("0.035", "0.37", "10.13")
    assert hold(engine, "o-1")["fee_rate"] == "0.035"  # type: ignore[index]
    assert_ledger_sound(engine, settings)
