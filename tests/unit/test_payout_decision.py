"""What a payout chunk decides for each item: pure rules, no database."""

from __future__ import annotations

import pytest

from services.payouts import Item, decide


def test_decide_pays_what_the_balance_covers_and_skips_what_was_paid_before() -> None:
    items = [Item(0, "a", 50, "r0"), Item(1, "b", 60, "r1"), Item(2, "c", 40, "r2"),
             Item(3, "d", 10, "r3"), Item(4, "boss", 1, "r4")]
    got = decide(items, {"r2"}, 100, "user:boss:available")
    assert [(d.outcome, d.error_code) for d in got] == [
        ("paid", None), ("rejected", "insufficient_balance"), ("duplicate", None),
        ("paid", None), ("rejected", "forbidden")]


@pytest.mark.parametrize("funder", ["platform:treasury", "platform:fees"])
def test_a_platform_account_may_pay_any_user(funder: str) -> None:
    got = decide([Item(0, "treasury", 5, "r0"), Item(1, "fees", 5, "r1")], set(), 10, funder)
    assert [d.outcome for d in got] == ["paid", "paid"]


def test_an_item_exactly_the_balance_left_is_paid_and_nothing_after_it() -> None:
    got = decide([Item(0, "a", 7, "r0"), Item(1, "b", 3, "r1"), Item(2, "c", 1, "r2")],
                 set(), 10, "platform:treasury")
    assert [d.outcome for d in got] == ["paid", "paid", "rejected"]


def test_a_wallet_that_takes_no_credit_is_rejected_with_its_state_and_the_rest_is_paid() -> None:
    items = [Item(0, "a", 5, "r0"), Item(1, "frozen", 5, "r1"), Item(2, "closed", 5, "r2"),
             Item(3, "frozen", 5, "r3"), Item(4, "b", 5, "r4")]
    blocked = {"frozen": "account_frozen", "closed": "account_closed"}
    got = decide(items, {"r3"}, 10, "platform:treasury", blocked)
    assert [(d.outcome, d.error_code) for d in got] == [
        ("paid", None), ("rejected", "account_frozen"), ("rejected", "account_closed"),
        ("duplicate", None), ("paid", None)]  # a reference paid before stays a duplicate


def test_a_payouts_total_paid_prints_fixed_point_at_every_scale() -> None:
    from services.payouts.store import payout_totals

    assert payout_totals([{"amount_paid": "0.00000001"}, {"amount_paid": "0.00000002"}]
                         )["amount_paid"] == "0.00000003"
    assert payout_totals([{"amount_paid": "1.50"}, {"amount_paid": "2.25"}]
                         )["amount_paid"] == "3.75"


def test_a_funding_wallet_s_overdraft_limit_is_spent_as_any_debit_would_spend_it() -> None:
    items = [Item(0, "a", 80, "r0"), Item(1, "b", 60, "r1"), Item(2, "c", 20, "r2"),
             Item(3, "d", 10, "r3")]
    got = decide(items, set(), 100, "user:boss:available", limit_minor=50)
    assert [(d.outcome, d.error_code) for d in got] == [
        ("paid", None), ("paid", None), ("rejected", "limit_exceeded"), ("paid", None)]


def test_what_the_daily_debit_limit_leaves_today_bounds_a_payout_too() -> None:
    items = [Item(0, "a", 80, "r0"), Item(1, "b", 30, "r1"), Item(2, "c", 20, "r2")]
    got = decide(items, set(), 1000, "user:boss:available", day_left_minor=100)
    assert [(d.outcome, d.error_code) for d in got] == [
        ("paid", None), ("rejected", "limit_exceeded"), ("paid", None)]
