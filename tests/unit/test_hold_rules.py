"""The rules of a hold's life (services.hold_rules), without a database: the fee of each
released part, what a release may take, when a hold expires."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.command_fields import ID_LENGTH_MAX, ID_PATTERN
from services.hold_rules import (
    HOLD_EXPIRES_IN_S_MAX,
    expiry_of,
    fee_drift_max,
    is_expired,
    plan_release,
)
from services.money import split_fee
from services.operations.escrow import expiry_key

RATES = st.decimals(min_value=0, max_value=1, places=6)
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


@st.composite
def hold_and_parts(draw: st.DrawFn) -> tuple[int, list[int]]:
    """A hold's amount and the parts released from it, up to all of it."""
    amount = draw(st.integers(min_value=1, max_value=10**12))
    parts, remaining = [], amount
    for _ in range(draw(st.integers(min_value=1, max_value=12))):
        if not remaining:
            break
        part = draw(st.integers(min_value=1, max_value=remaining))
        parts.append(part)
        remaining -= part
    return amount, parts


@given(hold_and_parts(), RATES)
def test_releasing_a_hold_in_parts_pays_each_part_fully_and_the_fees_drift_by_roundings_only(
    held: tuple[int, list[int]], rate: Decimal
) -> None:
    amount, parts = held
    remaining, fees = amount, 0
    for part in parts:
        plan = plan_release(remaining, part, rate)
        assert plan is not None
        assert plan.payee_minor + plan.fee_minor == part  # nothing lost to rounding
        assert plan.fee_minor == int((part * rate).quantize(Decimal(1), ROUND_HALF_EVEN))
        assert plan.remaining_minor == remaining - part
        remaining, fees = plan.remaining_minor, fees + plan.fee_minor
    whole = split_fee(sum(parts), rate)[1]
    assert abs(fees - whole) <= fee_drift_max(len(parts))
    # The same bound in the rule's own words: each rounding is off by half a unit at most.
    assert abs(fees - sum(parts) * rate) <= Decimal(len(parts)) / 2


@given(st.integers(min_value=1, max_value=10**12), RATES)
def test_one_release_of_all_that_remains_is_the_fee_of_the_whole(amount: int, rate: Decimal) -> None:
    plan = plan_release(amount, None, rate)
    assert plan is not None and (plan.payee_minor, plan.fee_minor) == split_fee(amount, rate)
    assert plan.remaining_minor == 0 and fee_drift_max(1) == 0


@given(st.integers(min_value=0, max_value=10**12), st.integers(min_value=1, max_value=10**6), RATES)
def test_a_release_of_more_than_remains_is_no_plan(remaining: int, extra: int, rate: Decimal) -> None:
    assert plan_release(remaining, remaining + extra, rate) is None


def test_the_drift_bound_is_reached() -> None:
    # 0.5 on parts of one unit rounds each to 0 (half to even); the whole 2 pays 1.
    assert sum(plan_release(2 - i, 1, Decimal("0.5")).fee_minor for i in range(2)) == 0  # type: ignore[union-attr]
    assert split_fee(2, Decimal("0.5"))[1] == 1 == fee_drift_max(2)


@given(st.integers(min_value=1, max_value=HOLD_EXPIRES_IN_S_MAX))
def test_expires_in_s_counts_from_the_opening(seconds: int) -> None:
    assert expiry_of(None, seconds, NOW) == NOW + timedelta(seconds=seconds)


@pytest.mark.parametrize(("text", "ok"), [
    ("2026-12-03T12:00:01Z", True), ("2026-12-03T13:00:01+01:00", True),
    ("2026-12-03T12:00:00Z", False), ("2026-12-03T11:00:00Z", False),
    ("2027-12-04T12:00:01Z", False),  # more than a year and a day ahead
])
def test_expires_at_must_lie_ahead_and_within_the_bound(text: str, ok: bool) -> None:
    if ok:
        assert expiry_of(text, None, NOW) is not None
    else:
        with pytest.raises(ValueError):
            expiry_of(text, None, NOW)


def test_a_hold_is_expired_from_its_expiry_on_and_never_without_one() -> None:
    assert is_expired(NOW, NOW) and is_expired(NOW - timedelta(microseconds=1), NOW)
    assert not is_expired(NOW + timedelta(microseconds=1), NOW) and not is_expired(None, NOW)
    assert is_expired(NOW.replace(tzinfo=None), NOW)  # SQLite's naive UTC


def test_the_expiry_key_is_derived_from_the_hold_and_always_a_valid_key() -> None:
    assert expiry_key("o-7") == "expire:o-7"
    assert len(expiry_key("a" * 193)) == ID_LENGTH_MAX
    long_ones = {expiry_key("a" * 194), expiry_key("a" * 200), expiry_key("b" * 200)}
    assert len(long_ones) == 3
    assert all(key.startswith("expire:sha256:") and re.fullmatch(ID_PATTERN, key)
               for key in long_ones)
