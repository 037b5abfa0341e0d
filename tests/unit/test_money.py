"""Money at the edges: decimal strings in, integer minor units inside, rounding named."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.money import (
    AmountError,
    format_minor,
    parse_amount,
    parse_amount_decimal,
    split_fee,
    to_decimal,
    to_minor,
)

SCALE = 2
MAX_MINOR = 10**14


def parse(value: object, scale: int = SCALE, max_minor: int = MAX_MINOR) -> int:
    return parse_amount(value, scale=scale, max_minor=max_minor)


@pytest.mark.parametrize(
    ("text", "minor"),
    [("12.50", 1250), ("12.5", 1250), ("12", 1200), ("0.01", 1), ("0.1", 10), ("1000000.00", 10**8),
     ("1000000000000", MAX_MINOR)],
)
def test_a_plain_decimal_string_becomes_exact_minor_units(text: str, minor: int) -> None:
    assert parse(text) == minor


def test_the_scale_decides_how_many_places_are_allowed() -> None:
    assert parse("1.2345", scale=4) == 12345
    assert parse("7", scale=0) == 7
    with pytest.raises(AmountError, match="1 decimal places; at most 0"):
        parse("7.0", scale=0)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (12.5, "not a JSON number"),
        (12, "not a JSON number"),
        (0, "not a JSON number"),
        (True, "not a JSON boolean"),
        (False, "not a JSON boolean"),
        (None, "not a JSON null"),
        (Decimal("12.50"), "decimal string"),
        (["1.00"], "decimal string"),
        (b"1.00", "decimal string"),
    ],
)
def test_anything_but_a_string_is_refused_with_its_json_kind(value: object, reason: str) -> None:
    with pytest.raises(AmountError, match=reason):
        parse(value)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1.005", "3 decimal places; at most 2"),
        ("0.001", "3 decimal places"),
        ("0", "greater than zero"),
        ("0.00", "greater than zero"),
        ("-1.00", "not a plain decimal"),
        ("+1.00", "not a plain decimal"),
        ("NaN", "not a plain decimal"),
        ("nan", "not a plain decimal"),
        ("Infinity", "not a plain decimal"),
        ("-Infinity", "not a plain decimal"),
        ("inf", "not a plain decimal"),
        ("1e3", "not a plain decimal"),
        ("1E3", "not a plain decimal"),
        ("1.5e-1", "not a plain decimal"),
        ("007", "not a plain decimal"),
        ("01.50", "not a plain decimal"),
        (" 1.00", "not a plain decimal"),
        ("1.00 ", "not a plain decimal"),
        ("1.00\n", "not a plain decimal"),
        ("1 000", "not a plain decimal"),
        ("1,00", "not a plain decimal"),
        ("1_000", "not a plain decimal"),
        ("1.", "not a plain decimal"),
        (".5", "not a plain decimal"),
        ("", "not a plain decimal"),
        ("١٢", "not a plain decimal"),  # Arabic-Indic digits are digits to Python, not to us
        ("0x10", "not a plain decimal"),
        ("1000000000000.01", "exceeds the maximum 1000000000000.00"),
        ("99999999999999999", "exceeds the maximum"),
        ("9" * 19, "not a plain decimal"),
    ],
)
def test_a_bad_amount_string_is_refused_saying_why(text: str, reason: str) -> None:
    with pytest.raises(AmountError, match=reason):
        parse(text)


def test_the_maximum_itself_is_allowed_and_one_minor_unit_more_is_not() -> None:
    assert parse("5.00", max_minor=500) == 500
    with pytest.raises(AmountError, match="exceeds the maximum 5.00"):
        parse("5.01", max_minor=500)


def test_a_long_bad_value_is_cut_short_in_the_message() -> None:
    with pytest.raises(AmountError) as caught:
        parse("x" * 10_000)
    assert len(str(caught.value)) < 200


def test_minor_units_format_with_exactly_the_scale_places() -> None:
    assert format_minor(1250, 2) == "12.50"
    assert format_minor(1, 2) == "0.01"
    assert format_minor(0, 2) == "0.00"
    assert format_minor(-305, 2) == "-3.05"
    assert format_minor(7, 0) == "7"
    assert format_minor(10**14, 2) == "1000000000000.00"
    assert to_decimal(1250, 2) == Decimal("12.50")
    assert str(to_decimal(1250, 2)) == "12.50"


def test_to_minor_refuses_a_fraction_of_a_minor_unit_instead_of_rounding() -> None:
    assert to_minor(Decimal("12.50"), 2) == 1250
    with pytest.raises(AmountError, match="not a whole number of minor units"):
        to_minor(Decimal("12.505"), 2)


@given(st.integers(min_value=1, max_value=MAX_MINOR))
def test_formatting_then_parsing_gives_back_the_same_minor_units(minor: int) -> None:
    assert parse(format_minor(minor, SCALE)) == minor


@given(st.integers(min_value=0, max_value=8), st.integers(min_value=1, max_value=MAX_MINOR))
def test_every_scale_formats_fixed_point_and_parses_back(scale: int, minor: int) -> None:
    """At scales 7 and 8 str() of a Decimal writes an exponent ('1E-8'), which no amount
    field accepts: an amount walletq prints must be one it takes."""
    text = format_minor(minor, scale)
    assert "E" not in text and "e" not in text
    assert text == format(to_decimal(minor, scale), "f")
    assert format_minor(-minor, scale) == "-" + text
    assert parse(text, scale, MAX_MINOR) == minor


def test_the_smallest_amounts_of_the_largest_scale_print_as_digits() -> None:
    assert format_minor(1, 8) == "0.00000001"
    assert format_minor(0, 8) == "0.00000000"
    assert format_minor(-6, 8) == "-0.00000006"


# --- the fee split ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount_minor", "rate", "payee_minor", "fee_minor"),
    [
        (555, "0.10", 499, 56),    # 55.5 → 56: half to even rounds up to the even 56
        (545, "0.10", 491, 54),    # 54.5 → 54: half to even rounds down to the even 54
        (5, "0.10", 5, 0),         # 0.5 → 0
        (15, "0.10", 13, 2),       # 1.5 → 2
        (25, "0.10", 23, 2),       # 2.5 → 2
        (1000, "0.10", 900, 100),
        (1000, "0", 1000, 0),
        (1000, "1", 0, 1000),
        (1, "0.5", 1, 0),          # 0.5 → 0
        (3, "0.5", 1, 2),          # 1.5 → 2
        (333, "0.333333", 222, 111),
    ],
)
def test_the_fee_is_rounded_half_even_to_a_whole_minor_unit(
    amount_minor: int, rate: str, payee_minor: int, fee_minor: int
) -> None:
    assert split_fee(amount_minor, Decimal(rate)) == (payee_minor, fee_minor)


@pytest.mark.parametrize("rate", ["-0.01", "1.01", "2"])
def test_a_fee_rate_outside_zero_to_one_is_refused(rate: str) -> None:
    with pytest.raises(AmountError, match="between 0 and 1"):
        split_fee(1000, Decimal(rate))


rates = st.decimals(min_value=0, max_value=1, places=6, allow_nan=False, allow_infinity=False)


@given(amount_minor=st.integers(min_value=1, max_value=MAX_MINOR), rate=rates)
def test_payee_plus_fee_is_the_amount_for_every_amount_and_rate(
    amount_minor: int, rate: Decimal
) -> None:
    payee_minor, fee_minor = split_fee(amount_minor, rate)
    assert type(payee_minor) is int and type(fee_minor) is int
    assert payee_minor + fee_minor == amount_minor
    assert 0 <= fee_minor <= amount_minor
    # The fee is the exact product rounded once: never more than half a minor unit away.
    assert abs(Decimal(fee_minor) - Decimal(amount_minor) * rate) <= Decimal("0.5")


@given(st.from_regex(r"\A(0|[1-9][0-9]{0,17})(\.[0-9]{1,18})?\Z"), st.integers(0, 18))
def test_minor_units_are_counted_in_integers_exactly_as_decimal_counts_them(
        value: str, scale: int) -> None:
    try:
        minor = parse_amount(value, scale=scale, max_minor=2**63 - 1)
    except AmountError:
        return
    assert minor == to_minor(Decimal(value), scale)


def _outcome(call: object) -> tuple[str, str]:
    """What an amount parser answers: the Decimal's text, or the refusal's message."""
    try:
        return "ok", str(call())  # type: ignore[operator]
    except AmountError as exc:
        return "refused", str(exc)


_AMOUNT_TEXT = st.one_of(
    st.from_regex(r"\A[0-9]{1,20}(\.[0-9]{0,20})?\Z"),
    st.text(alphabet="0123456789.-+e _", max_size=24),
    st.sampled_from(["0", "0.00", "00.1", "1.", ".5", "1e3", "1_0", " 1", "-1", "+1", "٣"]),
)


@given(value=st.one_of(_AMOUNT_TEXT, st.integers(), st.none(), st.booleans()),
       scale=st.integers(0, 8), max_minor=st.sampled_from([1, 99, 10**4, 10**14, 2**63 - 1]))
def test_parse_amount_decimal_is_to_decimal_of_parse_amount_value_text_and_refusal(
        value: object, scale: int, max_minor: int) -> None:
    """The validator's fast path answers exactly what parse_amount then to_decimal does:
    the same Decimal, written the same way (its places), or the same refusal."""
    fast = _outcome(lambda: parse_amount_decimal(value, scale=scale, max_minor=max_minor))
    slow = _outcome(lambda: to_decimal(parse_amount(value, scale=scale, max_minor=max_minor),
                                       scale))
    assert fast == slow, value


@pytest.mark.parametrize(("text", "written"), [("12.5", "12.50"), ("12", "12.00"),
                                                ("12.50", "12.50"), ("0.01", "0.01")])
def test_parse_amount_decimal_writes_every_place_of_the_scale(text: str, written: str) -> None:
    assert str(parse_amount_decimal(text, scale=2, max_minor=MAX_MINOR)) == written
