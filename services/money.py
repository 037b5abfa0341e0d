"""Money at the edges: decimal strings in, integer minor units inside, never a float.

Pure functions, no database: parsing refuses rather than rounds, and the fee split
rounds once, with its mode named, so payee + fee always equals the amount.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_EVEN, Decimal

__all__ = ["AmountError", "parse_amount", "parse_amount_decimal", "to_minor", "to_decimal",
           "format_minor", "split_fee"]

# Plain decimal notation only: no sign, no exponent, no spaces, no leading zeros.
_AMOUNT_RE = re.compile(r"(?:0|[1-9][0-9]{0,17})(?:\.([0-9]{1,18}))?")


class AmountError(ValueError):
    """Raised when a value is not an acceptable amount; the message says why."""


def parse_amount(value: object, *, scale: int, max_minor: int) -> int:
    """A decimal string → positive integer minor units, or AmountError."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise AmountError(
            f"must be a decimal string such as \"12.50\", not a JSON {_json_kind(value)}"
        )
    match = _AMOUNT_RE.fullmatch(value)
    if match is None:
        raise AmountError(f"{value[:40]!r} is not a plain decimal number (digits and one '.')")
    places = match.group(1) or ""
    if len(places) > scale:
        raise AmountError(f"{value!r} has {len(places)} decimal places; at most {scale} allowed")
    # Exact in integers (the pattern allows nothing else): no Decimal, ~3x faster.
    whole, _, fraction = value.partition(".")
    minor = int(whole) * 10**scale + (int(fraction) * 10**(scale - len(fraction)) if fraction
                                      else 0)
    if minor <= 0:
        raise AmountError(f"{value!r} must be greater than zero")
    if minor > max_minor:
        raise AmountError(f"{value!r} exceeds the maximum {format_minor(max_minor, scale)}")
    return minor


#: One unit of the last place, by scale, for Decimal.quantize.
_QUANTA = {scale: Decimal(1).scaleb(-scale) for scale in range(19)}


def _quantum(scale: int) -> Decimal:
    return _QUANTA.get(scale) or Decimal(1).scaleb(-scale)


def parse_amount_decimal(value: object, *, scale: int, max_minor: int) -> Decimal:
    """parse_amount's amount as a Decimal with exactly `scale` places (`to_decimal` of its
    minor units): what a command's amount field holds. A valid string is read as it is
    written (exact: plain notation only), padded to the scale; a command validates one per
    payout item, ~2x faster than parse_amount then to_decimal. Any refusal is
    parse_amount's, word for word."""
    if type(value) is str:
        match = _AMOUNT_RE.fullmatch(value)
        if match is not None:
            places = match.end(1) - match.start(1) if match.start(1) >= 0 else 0
            if places <= scale:
                amount = Decimal(value)
                if 0 < amount and amount.scaleb(scale) <= max_minor:
                    return amount if places == scale else amount.quantize(_quantum(scale))
    return to_decimal(parse_amount(value, scale=scale, max_minor=max_minor), scale)


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def to_minor(amount: Decimal, scale: int) -> int:
    """Exact conversion; an amount with more places than the scale is a bug here."""
    minor = amount.scaleb(scale)
    if minor != minor.to_integral_value():
        raise AmountError(f"{amount} is not a whole number of minor units at scale {scale}")
    return int(minor)


def to_decimal(minor: int, scale: int) -> Decimal:
    return Decimal(minor).scaleb(-scale).quantize(_quantum(scale))


def format_minor(minor: int, scale: int) -> str:
    """An amount's text, always fixed-point ('12.50', '-0.05', '0.00000001'): str() of a
    Decimal switches to an exponent below 1E-6 ('1E-8' at scale 8), which no amount field
    accepts."""
    if scale == 0:
        return str(minor)
    whole, fraction = divmod(-minor if minor < 0 else minor, 10 ** scale)
    return f"{'-' if minor < 0 else ''}{whole}.{fraction:0{scale}d}"


def split_fee(amount_minor: int, fee_rate: Decimal) -> tuple[int, int]:
    """(payee_minor, fee_minor): the fee rounded half-even to a whole minor unit, once."""
    if not Decimal(0) <= fee_rate <= Decimal(1):
        raise AmountError(f"fee rate {fee_rate} must lie between 0 and 1")
    fee_minor = int((Decimal(amount_minor) * fee_rate).quantize(Decimal(1), ROUND_HALF_EVEN))
    payee_minor = amount_minor - fee_minor
    assert 0 <= fee_minor <= amount_minor and payee_minor + fee_minor == amount_minor
    return payee_minor, fee_minor
