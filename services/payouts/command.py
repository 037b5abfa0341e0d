"""The `payout_batch` command: many (user, amount, reference) items from one funding account."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from services.command_fields import AccountCode, Amount, CommandBase, Ident, limits_of
from services.permissions import NOTHING_MORE, PAYOUT_ANY_ACCOUNT

__all__ = ["PayoutItem", "PayoutBatch", "payout_needs", "DEFAULT_FUNDING_ACCOUNT"]

DEFAULT_FUNDING_ACCOUNT = "platform:treasury"


class PayoutItem(BaseModel):
    """One payment of a batch; its reference is paid at most once per funding account."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    user: Ident
    amount: Amount
    reference: Ident


class PayoutBatch(CommandBase):
    """Pays many items from one funding account; each item's reference must be unique
    within the batch."""

    type: Literal["payout_batch"]
    from_account: AccountCode = DEFAULT_FUNDING_ACCOUNT
    items: list[PayoutItem] = Field(min_length=1)
    atomic: bool = False

    @model_validator(mode="after")
    def _bounded_and_unique(self, info: ValidationInfo) -> PayoutBatch:
        items_max = limits_of(info).payout_items_max
        if len(self.items) > items_max:
            raise ValueError(f"items: {len(self.items)} items; at most {items_max} per batch")
        first_seen: dict[str, int] = {}
        for index, item in enumerate(self.items):
            if item.reference in first_seen:
                raise ValueError(
                    f"items.{index}.reference: {item.reference!r} repeats item "
                    f"{first_seen[item.reference]}"
                )
            first_seen[item.reference] = index
        return self


def payout_needs(command: PayoutBatch) -> frozenset[str]:
    """Only the treasury funds a payout, unless the producer may fund one from elsewhere."""
    if command.from_account == DEFAULT_FUNDING_ACCOUNT:
        return NOTHING_MORE
    return frozenset({PAYOUT_ANY_ACCOUNT})
