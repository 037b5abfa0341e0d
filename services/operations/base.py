"""What every operation shares: its context, its effect, and the one move of money."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy.engine import Connection

from services.ledger import (
    AccountSpec,
    LockedAccount,
    Transfer,
    lock_accounts,
    make_transfer,
    post_transfers,
)
from services.money import format_minor, to_minor

__all__ = ["OperationContext", "Effect", "Footprint", "TransferFacts", "move",
           "one_transfer_of_amount"]


@dataclass(frozen=True)
class OperationContext:
    command_id: int
    scale: int
    fee_rate: Decimal
    #: The commands applied in this transaction when it is a coalesced batch (this one
    #: included): their outcomes are not written yet, so a handler that reads another's
    #: row must wait for it.
    batch: frozenset[int] = frozenset()

    def minor(self, amount: Decimal) -> int:
        return to_minor(amount, self.scale)

    def fmt(self, minor: int) -> str:
        return format_minor(minor, self.scale)


class ApplyAfterBatch(Exception):  # noqa: N818 - a signal to the batch, not an error
    """This command depends on another command of its batch, whose outcome is written only
    when the batch ends: the batch leaves it untouched and it runs alone once the batch has
    committed (services.applying)."""


@dataclass
class Effect:
    """What an operation did: its result for the caller and the transfers it posted."""

    result: dict[str, Any]
    transfers: list[Transfer] = field(default_factory=list)


@dataclass(frozen=True)
class Footprint:
    """The rows a command will lock, known before it runs, so that a batch of commands locks
    them all at once in the global order (the hold, then the accounts by id).

    `opens` names the accounts it may open: when one does not exist yet, a batch runs the
    command in a savepoint, so that a refusal undoes the opening too. A hold's accounts
    (release, refund) are known once the hold is locked: `hold_accounts(hold row)`.
    """

    accounts: tuple[AccountSpec, ...] = ()
    opens: frozenset[str] = frozenset()
    hold_id: str | None = None
    hold_accounts: Callable[[Any], Footprint] | None = None


def move(
    conn: Connection,
    ctx: OperationContext,
    debit: AccountSpec,
    credit: AccountSpec,
    amount_minor: int,
    kind: str,
    open_missing: Collection[str],
) -> tuple[Transfer, Mapping[str, LockedAccount]]:
    """Lock both accounts (opening those allowed), check the debit, post one transfer."""
    locked = lock_accounts(conn, [debit, credit], open_missing=open_missing)
    transfer = make_transfer(locked[debit.code], locked[credit.code], amount_minor, kind)
    post_transfers(conn, ctx.command_id, [transfer])
    return transfer, locked


@dataclass(frozen=True)
class TransferFacts:
    """What `walletq verify` knows of one command when it checks the transfers it implies."""

    conn: Connection
    command_id: int
    status: str
    payload: dict[str, Any]
    count: int
    total_minor: int
    scale: int


def one_transfer_of_amount(facts: TransferFacts) -> str | None:
    """The rule of most types: exactly one transfer, of the command's amount."""
    expected = to_minor(Decimal(facts.payload["amount"]), facts.scale)
    if (facts.count, facts.total_minor) == (1, expected):
        return None
    return f"{facts.count} transfers of {facts.total_minor} minor units"
