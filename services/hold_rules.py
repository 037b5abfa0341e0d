"""The rules of a hold's life, as plain functions (docs/ARCHITECTURE.md, "Holds: partial
capture and expiry"): what a release may take, the fee of each part, when a hold expires.

A hold of `amount` is split, over its life, into parts released (each with its own fee),
and at most one refund (or expiry) of what remains: `amount == released + refunded +
remaining` at every moment. The fee of each released part is `round_half_even(part × rate)`
with the rate fixed when the hold opened (money.split_fee: one rounding per release), so
the payee of each part gets `part − fee` and nothing is lost to rounding. The parts' fees
may differ from the fee the whole would have paid in one release by the roundings only:
`|Σ fee(partᵢ) − fee(Σ partᵢ)| ≤ ⌊(n + 1) / 2⌋` minor units for n parts (each rounding is
off by at most half a unit: n of the parts plus one of the whole), and 0 for one part.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from services.money import split_fee

__all__ = ["HOLD_EXPIRES_IN_S_MAX", "Release", "plan_release", "remaining_of", "fee_drift_max",
           "expiry_of", "is_expired", "as_utc"]

#: The longest a hold may be given before it expires: a year (and a leap day). Bounded so
#: a typo cannot park money for a century; a hold without expiry stays open until acted on.
HOLD_EXPIRES_IN_S_MAX = 366 * 24 * 3600


@dataclass(frozen=True)
class Release:
    """One release of a hold: its part, the payee's share and the fee, and what is left."""

    part_minor: int
    payee_minor: int
    fee_minor: int
    remaining_minor: int


def remaining_of(amount_minor: int, released_minor: int, refunded_minor: int) -> int:
    remaining = amount_minor - released_minor - refunded_minor
    assert remaining >= 0, "Bug! a hold released or refunded beyond its amount"
    return remaining


def plan_release(remaining_minor: int, part_minor: int | None, fee_rate: Decimal) -> Release | None:
    """The release of `part_minor` (None: all that remains) from a hold with this much left;
    None when the part exceeds what remains (the caller refuses it: hold_exceeded)."""
    part = remaining_minor if part_minor is None else part_minor
    if part > remaining_minor or part <= 0:
        return None
    payee, fee = split_fee(part, fee_rate)
    return Release(part, payee, fee, remaining_minor - part)


def fee_drift_max(parts: int) -> int:
    """The most the fees of `parts` releases may differ from the fee of their sum, in minor
    units (the module's docstring says why)."""
    return 0 if parts <= 1 else (parts + 1) // 2


def as_utc(moment: datetime) -> datetime:
    """A stored moment as an aware UTC datetime (SQLite hands back naive UTC ones)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def expiry_of(expires_at: str | None, expires_in_s: int | None, now: datetime) -> datetime | None:
    """When a hold opened `now` expires; ValueError when that is not after now or lies more
    than HOLD_EXPIRES_IN_S_MAX ahead."""
    if expires_in_s is not None:
        return now + timedelta(seconds=expires_in_s)
    if expires_at is None:
        return None
    moment = as_utc(datetime.fromisoformat(expires_at.replace("Z", "+00:00")))
    if moment <= now:
        raise ValueError(f"expires_at {expires_at} is not in the future")
    if moment - now > timedelta(seconds=HOLD_EXPIRES_IN_S_MAX):
        raise ValueError(f"expires_at {expires_at} is more than {HOLD_EXPIRES_IN_S_MAX} s ahead")
    return moment


def is_expired(expires_at: datetime | None, now: datetime) -> bool:
    """Expired from its expiry on: at `expires_at` exactly a release is already refused."""
    return expires_at is not None and as_utc(expires_at) <= now
