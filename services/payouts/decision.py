"""What a payout chunk does with each item: pure rules, no database.

Each item on its own, in order: a reference the funding account paid before is a
duplicate and pays nothing; an item paying a wallet that takes no credit (closed, or frozen
for credits too) is rejected with that state's code; an item paying the funding account's
own user is forbidden;
what the remaining balance covers (down to the funding account's overdraft limit, as any
debit) is paid; the rest is rejected `insufficient_balance` (`limit_exceeded` where the
account has a limit), and a later, smaller item may still be paid. In atomic mode one
rejection refuses the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from services.errors import (
    AccountClosedError,
    AccountFrozenError,
    BusinessRuleError,
    ForbiddenError,
    InsufficientBalanceError,
    LimitExceededError,
)
from services.ledger import account_spec
from services.money import to_minor
from services.payouts.command import PayoutBatch

__all__ = ["Item", "Decision", "decide", "items_of", "atomic_refusal", "FUNDING_KINDS"]

#: Accounts a batch may be paid from: the platform's two, or a user's spendable balance.
FUNDING_KINDS = frozenset({"treasury", "fees", "user_available"})


@dataclass(frozen=True, slots=True)
class Item:
    index: int
    user: str
    amount_minor: int
    reference: str


class Decision(NamedTuple):
    item: Item
    outcome: str  # paid | rejected | duplicate
    error_code: str | None = None


def items_of(command: PayoutBatch, scale: int) -> list[Item]:
    return [Item(index, item.user, to_minor(item.amount, scale), item.reference)
            for index, item in enumerate(command.items)]


def decide(
    items: Sequence[Item], paid_before: Iterable[str], balance_minor: int, funding_code: str,
    blocked: Mapping[str, str] | None = None, limit_minor: int = 0,
    day_left_minor: int | None = None,
) -> list[Decision]:
    """Each item on its own, in order (see the module's docstring). `blocked`: recipients
    whose wallet takes no credit now, and the code that says why. `limit_minor`: the
    funding account's overdraft limit, which a payout may draw on as any debit may;
    `day_left_minor`: what its daily debit limit leaves today (None: no daily limit). An
    item beyond either is `limit_exceeded`, as a single debit's refusal would be."""
    seen = set(paid_before)
    short_code = LimitExceededError.code if limit_minor else InsufficientBalanceError.code
    balance_minor += limit_minor  # what may still be spent
    blocked = blocked or {}
    spec = account_spec(funding_code)
    funding_user = spec.user_id if spec is not None and spec.kind == "user_available" else None
    decisions = []
    for item in items:
        if item.reference in seen:
            decisions.append(Decision(item, "duplicate"))
        elif item.user in blocked:
            decisions.append(Decision(item, "rejected", blocked[item.user]))
        elif item.user == funding_user:
            decisions.append(Decision(item, "rejected", ForbiddenError.code))
        elif item.amount_minor > balance_minor:
            decisions.append(Decision(item, "rejected", short_code))
        elif day_left_minor is not None and item.amount_minor > day_left_minor:
            decisions.append(Decision(item, "rejected", LimitExceededError.code))
        else:
            balance_minor -= item.amount_minor
            if day_left_minor is not None:
                day_left_minor -= item.amount_minor
            decisions.append(Decision(item, "paid"))
    assert balance_minor >= 0, "Bug! a payout plan overdraws its funding account"
    return decisions


def atomic_refusal(decisions: Sequence[Decision], funding_code: str, balance_minor: int,
                   limit_minor: int = 0, day_left_minor: int | None = None
                   ) -> BusinessRuleError:
    """Why an atomic batch is refused whole: its first rejected item, named."""
    first = next(d for d in decisions if d.outcome == "rejected")
    item = first.item
    if first.error_code == ForbiddenError.code:
        return ForbiddenError(f"item {item.index} ({item.reference}) pays {funding_code} itself; "
                              "atomic batch refused whole", item=item.index)
    if first.error_code in (AccountFrozenError.code, AccountClosedError.code):
        state = "closed" if first.error_code == AccountClosedError.code else "frozen"
        error = AccountClosedError if first.error_code == AccountClosedError.code \
            else AccountFrozenError
        return error(f"item {item.index} ({item.reference}) pays {item.user}, whose wallet is "
                     f"{state}; atomic batch refused whole", item=item.index)
    needed = sum(d.item.amount_minor for d in decisions if d.outcome != "duplicate")
    short = LimitExceededError if first.error_code == LimitExceededError.code \
        else InsufficientBalanceError
    beyond = f" with an overdraft limit of {limit_minor}" if limit_minor else ""
    if day_left_minor is not None:
        beyond += f" and {day_left_minor} left of its daily debit limit"
    return short(
        f"{funding_code} holds {balance_minor} minor units{beyond}; the batch needs {needed} "
        f"(item {item.index}, {item.reference}, is the first it cannot cover); "
        "atomic batch refused whole",
        account=funding_code, item=item.index)
