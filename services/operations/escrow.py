"""Escrow: a payer's money held for a payee, then released (minus the platform fee) or refunded.

This module owns the `holds` table. A hold's row is locked before any account, so two
commands on one hold queue on it, and the second finds it closed. A hold's fee rate is
fixed when it opens (the deployment's rate, or one a producer allowed to override fees
names); its release uses that rate unless such a producer names another.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import ValidationInfo, field_validator
from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from services import schema
from services.bulk_sql import Pending, insert_ignoring_conflicts
from services.command_fields import Amount, CommandBase, FeeRate, Ident
from services.errors import EscrowIntegrityError, HoldExistsError, HoldNotOpenError, UnknownHoldError
from services.ledger import (
    FEES,
    defer,
    keep,
    kept,
    lock_accounts,
    make_transfer,
    post_transfers,
    user_available,
    user_escrow,
)
from services.money import split_fee
from services.operations.base import Effect, Footprint, OperationContext, TransferFacts, move
from services.permissions import NOTHING_MORE, OVERRIDE_FEE

__all__ = ["TransferToEscrow", "ReleaseFromEscrow", "RefundFromEscrow", "transfer_to_escrow",
           "release_from_escrow", "refund_from_escrow", "release_transfers", "refund_transfers",
           "fee_rate_needs", "lock_holds", "hold_footprint", "release_footprint",
           "refund_footprint"]


class TransferToEscrow(CommandBase):
    """Holds a payer's money for a payee under hold_id; payee must differ from payer."""

    type: Literal["transfer_to_escrow"]
    hold_id: Ident
    payer: Ident
    payee: Ident
    amount: Amount
    fee_rate: FeeRate | None = None

    @field_validator("payee")
    @classmethod
    def _distinct_users(cls, payee: str, info: ValidationInfo) -> str:
        if payee == info.data.get("payer"):
            raise ValueError("must differ from payer: a hold to oneself")
        return payee


class ReleaseFromEscrow(CommandBase):
    type: Literal["release_from_escrow"]
    hold_id: Ident
    fee_rate: FeeRate | None = None


class RefundFromEscrow(CommandBase):
    type: Literal["refund_from_escrow"]
    hold_id: Ident


def fee_rate_needs(command: TransferToEscrow | ReleaseFromEscrow) -> frozenset[str]:
    """Naming a fee rate is an override: the rate of a hold is otherwise fixed at opening."""
    return NOTHING_MORE if command.fee_rate is None else frozenset({OVERRIDE_FEE})


def transfer_to_escrow(conn: Connection, cmd: TransferToEscrow, ctx: OperationContext) -> Effect:
    amount = ctx.minor(cmd.amount)
    fee_rate = cmd.fee_rate if cmd.fee_rate is not None else ctx.fee_rate
    # The hold row comes before the accounts in the lock order; a rival with the same
    # hold id waits on it here, then finds it taken.
    inserted = insert_ignoring_conflicts(
        conn,
        schema.holds,
        [{"hold_id": cmd.hold_id, "payer": cmd.payer, "payee": cmd.payee, "amount_minor": amount,
          "status": "held", "fee_rate": str(fee_rate), "opened_by": ctx.command_id}],
        ["hold_id"],
    )
    if inserted != 1:
        raise HoldExistsError(f"hold {cmd.hold_id!r} already exists", hold_id=cmd.hold_id)
    available, escrow = user_available(cmd.payer), user_escrow(cmd.payer)
    t, locked = move(conn, ctx, available, escrow, amount, "hold", {escrow.code})
    return Effect({"hold_id": cmd.hold_id, "payer": cmd.payer, "payee": cmd.payee,
                   "amount": ctx.fmt(amount), "fee_rate": str(fee_rate),
                   "available": ctx.fmt(locked[available.code].balance_minor)}, [t])


def lock_holds(conn: Connection, hold_ids: list[str]) -> dict[str, Any]:
    """Lock these holds (those that exist), in id order: a batch takes them before any
    account, as a single command does. The transaction's book keeps them (a release reads
    its hold from there)."""
    h = schema.holds
    rows = conn.execute(select(h).where(h.c.hold_id.in_(hold_ids)).order_by(h.c.id)
                        .with_for_update()).all()
    for row in rows:
        keep(conn, "holds", row.hold_id, row)
    return {row.hold_id: row for row in rows}


def hold_footprint(cmd: TransferToEscrow) -> Footprint:
    escrow = user_escrow(cmd.payer)
    return Footprint((user_available(cmd.payer), escrow), frozenset({escrow.code}),
                     hold_id=cmd.hold_id)


def _release_accounts(hold: Any) -> Footprint:
    payee = user_available(hold.payee)
    return Footprint((user_escrow(hold.payer), payee, FEES), frozenset({payee.code, FEES.code}))


def _refund_accounts(hold: Any) -> Footprint:
    return Footprint((user_escrow(hold.payer), user_available(hold.payer)))


def release_footprint(cmd: ReleaseFromEscrow) -> Footprint:
    return Footprint(hold_id=cmd.hold_id, hold_accounts=_release_accounts)


def refund_footprint(cmd: RefundFromEscrow) -> Footprint:
    return Footprint(hold_id=cmd.hold_id, hold_accounts=_refund_accounts)


def _lock_open_hold(conn: Connection, hold_id: str) -> Any:
    h = schema.holds
    hold = kept(conn, "holds", hold_id)
    if hold is None:
        hold = conn.execute(select(h).where(h.c.hold_id == hold_id).with_for_update()
                            ).one_or_none()
    if hold is None:
        raise UnknownHoldError(f"no hold {hold_id!r}", hold_id=hold_id)
    if hold.status != "held":
        raise HoldNotOpenError(f"hold {hold_id!r} is already {hold.status}", hold_id=hold_id)
    return hold


def _close_hold(conn: Connection, hold: Any, status: str, ctx: OperationContext,
                fee_minor: int | None = None, fee_rate: Decimal | None = None) -> None:
    h = schema.holds
    values: dict[str, Any] = {"status": status, "closed_by": ctx.command_id,
                              "closed_at": datetime.now(UTC), "fee_minor": fee_minor}
    if fee_rate is not None:  # the rate a release applied; a refund leaves the hold's own
        values["fee_rate"] = str(fee_rate)
    statement = update(h).where(h.c.id == hold.id, h.c.status == "held").values(values)
    if kept(conn, "holds", hold.hold_id) is not None:
        # Locked by this transaction's batch: closed with its flush, and closed for the rest
        # of the batch now (a second close of it finds it closed).
        defer(conn, Pending(statement, {}))
        keep(conn, "holds", hold.hold_id, _Closed(hold.hold_id, status))
        return
    done = conn.execute(statement)
    if done.rowcount != 1:
        raise EscrowIntegrityError(f"hold {hold.hold_id!r} changed under its lock")


@dataclass(frozen=True)
class _Closed:
    """What a batch knows of a hold it closed and has not written yet."""

    hold_id: str
    status: str


def _rate_of(hold: Any, ctx: OperationContext) -> Decimal:
    """The rate fixed when the hold opened; a hold opened before migration 0004 has none
    stored and takes the deployment's rate, as it always did."""
    return Decimal(hold.fee_rate) if hold.fee_rate is not None else ctx.fee_rate


def release_from_escrow(
    conn: Connection, cmd: ReleaseFromEscrow, ctx: OperationContext
) -> Effect:
    hold = _lock_open_hold(conn, cmd.hold_id)
    fee_rate = cmd.fee_rate if cmd.fee_rate is not None else _rate_of(hold, ctx)
    payee_minor, fee_minor = split_fee(hold.amount_minor, fee_rate)
    escrow, payee = user_escrow(hold.payer), user_available(hold.payee)
    locked = lock_accounts(conn, [escrow, payee, FEES], open_missing={payee.code, FEES.code})
    transfers = []
    if payee_minor:
        transfers.append(make_transfer(locked[escrow.code], locked[payee.code], payee_minor,
                                       "release"))
    if fee_minor:
        transfers.append(make_transfer(locked[escrow.code], locked[FEES.code], fee_minor, "fee"))
    post_transfers(conn, ctx.command_id, transfers)
    _close_hold(conn, hold, "released", ctx, fee_minor, fee_rate)
    return Effect({"hold_id": hold.hold_id, "payer": hold.payer, "payee": hold.payee,
                   "amount": ctx.fmt(hold.amount_minor), "payee_amount": ctx.fmt(payee_minor),
                   "fee": ctx.fmt(fee_minor), "fee_rate": str(fee_rate)}, transfers)


def refund_from_escrow(conn: Connection, cmd: RefundFromEscrow, ctx: OperationContext) -> Effect:
    hold = _lock_open_hold(conn, cmd.hold_id)
    escrow, payer = user_escrow(hold.payer), user_available(hold.payer)
    t, _ = move(conn, ctx, escrow, payer, hold.amount_minor, "refund", ())
    _close_hold(conn, hold, "refunded", ctx)
    return Effect({"hold_id": hold.hold_id, "payer": hold.payer,
                   "amount": ctx.fmt(hold.amount_minor)}, [t])


# What verify expects; the hold's amount is held against these transfers by verify's
# hold check (the transfers of the commands that opened and closed it).
def release_transfers(facts: TransferFacts) -> str | None:
    """The payee's part, and the fee's unless it rounds to zero (or the payee's does)."""
    return None if facts.count in (1, 2) else f"{facts.count} transfers of {facts.total_minor} minor units"


def refund_transfers(facts: TransferFacts) -> str | None:
    return None if facts.count == 1 else f"{facts.count} transfers of {facts.total_minor} minor units"
