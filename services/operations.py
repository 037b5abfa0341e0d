"""The nine financial operations, each a short function `(conn, command, ctx) -> Effect`.

Each locks its rows (command, then hold, then accounts by id), checks, and moves money
only through ledger transfers. They run inside the caller's transaction; the command
executor owns commit, rollback, idempotency and the audit row.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from services import commands as c
from services import schema
from services.atomic_transaction_manager import (
    EscrowIntegrityError,
    HoldExistsError,
    HoldNotOpenError,
    UnknownHoldError,
)
from services.ledger import (
    EXTERNAL,
    FEES,
    ISSUANCE,
    TREASURY,
    AccountSpec,
    LockedAccount,
    Transfer,
    insert_ignoring_conflicts,
    lock_accounts,
    make_transfer,
    post_transfers,
    user_available,
    user_escrow,
)
from services.money import format_minor, split_fee

__all__ = ["Effect", "OperationContext", "HANDLERS"]


@dataclass(frozen=True)
class OperationContext:
    command_id: int
    scale: int
    fee_rate: Decimal


@dataclass
class Effect:
    """What an operation did: its result for the caller and the transfers it posted."""

    result: dict[str, Any]
    transfers: list[Transfer] = field(default_factory=list)


def _minor(ctx: OperationContext, amount: Decimal) -> int:
    return int(amount.scaleb(ctx.scale))


def _fmt(ctx: OperationContext, minor: int) -> str:
    return format_minor(minor, ctx.scale)


def _move(
    conn: Connection,
    ctx: OperationContext,
    debit: AccountSpec,
    credit: AccountSpec,
    amount_minor: int,
    kind: str,
    open_missing: Collection[str],
) -> tuple[Transfer, Mapping[str, LockedAccount]]:
    locked = lock_accounts(conn, [debit, credit], open_missing=open_missing)
    transfer = make_transfer(locked[debit.code], locked[credit.code], amount_minor, kind)
    post_transfers(conn, ctx.command_id, [transfer])
    return transfer, locked


def credit_wallet(conn: Connection, cmd: c.CreditWallet, ctx: OperationContext) -> Effect:
    user = user_available(cmd.user)
    amount = _minor(ctx, cmd.amount)
    t, locked = _move(conn, ctx, EXTERNAL, user, amount, "credit", {EXTERNAL.code, user.code})
    return Effect({"user": cmd.user, "amount": _fmt(ctx, amount),
                   "available": _fmt(ctx, locked[user.code].balance_minor)}, [t])


def debit_wallet(conn: Connection, cmd: c.DebitWallet, ctx: OperationContext) -> Effect:
    user = user_available(cmd.user)
    amount = _minor(ctx, cmd.amount)
    t, locked = _move(conn, ctx, user, EXTERNAL, amount, "debit", {EXTERNAL.code})
    return Effect({"user": cmd.user, "amount": _fmt(ctx, amount),
                   "available": _fmt(ctx, locked[user.code].balance_minor)}, [t])


def transfer_tokens_between_users(
    conn: Connection, cmd: c.TransferTokensBetweenUsers, ctx: OperationContext
) -> Effect:
    payer, payee = user_available(cmd.from_user), user_available(cmd.to_user)
    amount = _minor(ctx, cmd.amount)
    t, locked = _move(conn, ctx, payer, payee, amount, "transfer", {payee.code})
    return Effect({"from_user": cmd.from_user, "to_user": cmd.to_user,
                   "amount": _fmt(ctx, amount),
                   "from_available": _fmt(ctx, locked[payer.code].balance_minor)}, [t])


def admin_create_tokens(
    conn: Connection, cmd: c.AdminCreateTokens, ctx: OperationContext
) -> Effect:
    amount = _minor(ctx, cmd.amount)
    opened = {ISSUANCE.code, TREASURY.code}
    t, locked = _move(conn, ctx, ISSUANCE, TREASURY, amount, "mint", opened)
    return Effect({"amount": _fmt(ctx, amount),
                   "treasury": _fmt(ctx, locked[TREASURY.code].balance_minor)}, [t])


def admin_sell_tokens_to_user(
    conn: Connection, cmd: c.AdminSellTokensToUser, ctx: OperationContext
) -> Effect:
    user = user_available(cmd.user)
    amount = _minor(ctx, cmd.amount)
    opened = {TREASURY.code, user.code}
    t, locked = _move(conn, ctx, TREASURY, user, amount, "sale", opened)
    return Effect({"user": cmd.user, "amount": _fmt(ctx, amount),
                   "available": _fmt(ctx, locked[user.code].balance_minor)}, [t])


def user_sell_tokens_to_admin(
    conn: Connection, cmd: c.UserSellTokensToAdmin, ctx: OperationContext
) -> Effect:
    user = user_available(cmd.user)
    amount = _minor(ctx, cmd.amount)
    t, locked = _move(conn, ctx, user, TREASURY, amount, "buyback", {TREASURY.code})
    return Effect({"user": cmd.user, "amount": _fmt(ctx, amount),
                   "available": _fmt(ctx, locked[user.code].balance_minor)}, [t])


# --- escrow -----------------------------------------------------------------------------


def transfer_to_escrow(conn: Connection, cmd: c.TransferToEscrow, ctx: OperationContext) -> Effect:
    amount = _minor(ctx, cmd.amount)
    # The hold row comes before the accounts in the lock order; a rival with the same
    # hold id waits on it here, then finds it taken.
    inserted = insert_ignoring_conflicts(
        conn,
        schema.holds,
        [{"hold_id": cmd.hold_id, "payer": cmd.payer, "payee": cmd.payee, "amount_minor": amount,
          "status": "held", "opened_by": ctx.command_id}],
        ["hold_id"],
    )
    if inserted != 1:
        raise HoldExistsError(f"hold {cmd.hold_id!r} already exists", hold_id=cmd.hold_id)
    available, escrow = user_available(cmd.payer), user_escrow(cmd.payer)
    t, locked = _move(conn, ctx, available, escrow, amount, "hold", {escrow.code})
    return Effect({"hold_id": cmd.hold_id, "payer": cmd.payer, "payee": cmd.payee,
                   "amount": _fmt(ctx, amount),
                   "available": _fmt(ctx, locked[available.code].balance_minor)}, [t])


def _lock_open_hold(conn: Connection, hold_id: str) -> Any:
    h = schema.holds
    hold = conn.execute(select(h).where(h.c.hold_id == hold_id).with_for_update()).one_or_none()
    if hold is None:
        raise UnknownHoldError(f"no hold {hold_id!r}", hold_id=hold_id)
    if hold.status != "held":
        raise HoldNotOpenError(f"hold {hold_id!r} is already {hold.status}", hold_id=hold_id)
    return hold


def _close_hold(conn: Connection, hold: Any, status: str, ctx: OperationContext,
                fee_minor: int | None = None, fee_rate: Decimal | None = None) -> None:
    h = schema.holds
    done = conn.execute(
        update(h)
        .where(h.c.id == hold.id, h.c.status == "held")
        .values(status=status, closed_by=ctx.command_id, closed_at=datetime.now(UTC),
                fee_minor=fee_minor, fee_rate=None if fee_rate is None else str(fee_rate))
    )
    if done.rowcount != 1:
        raise EscrowIntegrityError(f"hold {hold.hold_id!r} changed under its lock")


def release_from_escrow(
    conn: Connection, cmd: c.ReleaseFromEscrow, ctx: OperationContext
) -> Effect:
    hold = _lock_open_hold(conn, cmd.hold_id)
    fee_rate = cmd.fee_rate if cmd.fee_rate is not None else ctx.fee_rate
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
                   "amount": _fmt(ctx, hold.amount_minor), "payee_amount": _fmt(ctx, payee_minor),
                   "fee": _fmt(ctx, fee_minor), "fee_rate": str(fee_rate)}, transfers)


def refund_from_escrow(conn: Connection, cmd: c.RefundFromEscrow, ctx: OperationContext) -> Effect:
    hold = _lock_open_hold(conn, cmd.hold_id)
    escrow, payer = user_escrow(hold.payer), user_available(hold.payer)
    t, _ = _move(conn, ctx, escrow, payer, hold.amount_minor, "refund", ())
    _close_hold(conn, hold, "refunded", ctx)
    return Effect({"hold_id": hold.hold_id, "payer": hold.payer,
                   "amount": _fmt(ctx, hold.amount_minor)}, [t])


Handler = Callable[[Connection, Any, OperationContext], Effect]

HANDLERS: dict[str, Handler] = {
    "credit_wallet": credit_wallet,
    "debit_wallet": debit_wallet,
    "transfer_tokens_between_users": transfer_tokens_between_users,
    "transfer_to_escrow": transfer_to_escrow,
    "release_from_escrow": release_from_escrow,
    "refund_from_escrow": refund_from_escrow,
    "admin_create_tokens": admin_create_tokens,
    "admin_sell_tokens_to_user": admin_sell_tokens_to_user,
    "user_sell_tokens_to_admin": user_sell_tokens_to_admin,
}
