"""The accounts' lifecycle rules as plain functions (no database): overdraft and freeze
checks, the velocity limit's day, where a reversal pays back, a statement's arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.errors import (
    AccountClosedError,
    AccountFrozenError,
    InsufficientBalanceError,
    LimitExceededError,
)
from services.ledger import LockedAccount, check_usable, utc_day_start, validate_balance_integrity
from services.operations.reversal import reversal_target
from services.statements import Movement, Statement, parse_moment


def account(code: str, **state: object) -> LockedAccount:
    return LockedAccount(1 if "alice" in code else 2, code, None, 0, False, True,
                         **state)  # type: ignore[arg-type]


def check(balance: int, debit: int, limit: int = 0) -> None:
    validate_balance_integrity(account_code="user:a:available", balance_minor=balance,
                               debit_minor=debit, may_go_negative=False,
                               overdraft_limit_minor=limit)


def test_an_overdraft_limit_lowers_the_floor_to_minus_the_limit() -> None:
    check(100, 600, limit=500)
    check(-400, 100, limit=500)
    with pytest.raises(LimitExceededError):
        check(-400, 101, limit=500)


def test_without_a_limit_the_refusal_is_insufficient_balance() -> None:
    check(100, 100)
    with pytest.raises(InsufficientBalanceError):
        check(100, 101)


def test_a_closed_account_refuses_both_sides_and_a_freeze_its_directions() -> None:
    alice, bob = account("user:alice:available"), account("user:bob:available")
    check_usable(alice, bob)
    with pytest.raises(AccountClosedError):
        check_usable(alice, account("user:bob:available", closed=True))
    with pytest.raises(AccountFrozenError):
        check_usable(account("user:alice:available", debits_frozen=True), bob)
    check_usable(alice, account("user:bob:available", debits_frozen=True))
    with pytest.raises(AccountFrozenError):
        check_usable(alice, account("user:bob:available", debits_frozen=True,
                                    credits_frozen=True))


def test_the_velocity_limits_day_is_the_utc_calendar_day() -> None:
    late_in_tokyo = datetime(2026, 12, 1, 8, 30, tzinfo=timezone(timedelta(hours=9)))
    assert utc_day_start(late_in_tokyo) == datetime(2026, 11, 30, tzinfo=UTC)
    assert utc_day_start(datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)) == datetime(
        2026, 11, 30, tzinfo=UTC)


def test_a_released_holds_escrow_is_paid_back_to_the_payers_available() -> None:
    assert reversal_target("release_from_escrow", "user:al:escrow") == "user:al:available"
    assert reversal_target("release_from_escrow", "platform:fees") == "platform:fees"
    assert reversal_target("debit_wallet", "user:al:escrow") == "user:al:escrow"


def test_a_statement_adds_up_only_when_every_movement_follows_from_the_one_before() -> None:
    at = datetime(2026, 11, 30, tzinfo=UTC)
    moves = [Movement(1, at, "sale", 1000, "platform:treasury", "s", 1500),
             Movement(2, at, "debit", -200, "system:external", "d", 1300)]
    assert Statement("a", at, at, 500, moves, 1300).balanced
    assert not Statement("a", at, at, 500, moves, 1301).balanced
    broken = [moves[0], Movement(2, at, "debit", -200, "system:external", "d", 1299)]
    assert not Statement("a", at, at, 500, broken, 1299).balanced


def test_a_moment_without_an_offset_is_utc() -> None:
    assert parse_moment("2026-11-30T12:00:00") == datetime(2026, 11, 30, 12, tzinfo=UTC)
    assert parse_moment("2026-11-30T12:00:00+02:00") == datetime(2026, 11, 30, 10, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_moment("yesterday")
