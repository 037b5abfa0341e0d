"""Money in and out of a user's wallet, and between two users."""

from __future__ import annotations

from typing import Literal

from pydantic import ValidationInfo, field_validator
from sqlalchemy.engine import Connection

from services.command_fields import Amount, CommandBase, Ident
from services.ledger import EXTERNAL, user_available
from services.operations.base import Effect, Footprint, OperationContext, move

__all__ = ["CreditWallet", "DebitWallet", "TransferTokensBetweenUsers", "credit_wallet",
           "debit_wallet", "transfer_tokens_between_users", "credit_footprint",
           "debit_footprint", "transfer_footprint"]


class CreditWallet(CommandBase):
    """Money from outside (a deposit) into a user's available balance; opens the wallet."""

    type: Literal["credit_wallet"]
    user: Ident
    amount: Amount


class DebitWallet(CommandBase):
    """Money out of a user's available balance (a withdrawal); the user must exist."""

    type: Literal["debit_wallet"]
    user: Ident
    amount: Amount


class TransferTokensBetweenUsers(CommandBase):
    """From one user's available balance to another's; to_user must differ from from_user."""

    type: Literal["transfer_tokens_between_users"]
    from_user: Ident
    to_user: Ident
    amount: Amount

    @field_validator("to_user")
    @classmethod
    def _distinct_users(cls, to_user: str, info: ValidationInfo) -> str:
        if to_user == info.data.get("from_user"):
            raise ValueError("must differ from from_user: a transfer to oneself")
        return to_user


def credit_wallet(conn: Connection, cmd: CreditWallet, ctx: OperationContext) -> Effect:
    user = user_available(cmd.user)
    amount = ctx.minor(cmd.amount)
    t, locked = move(conn, ctx, EXTERNAL, user, amount, "credit", {EXTERNAL.code, user.code})
    return Effect({"user": cmd.user, "amount": ctx.fmt(amount),
                   "available": ctx.fmt(locked[user.code].balance_minor)}, [t])


def debit_wallet(conn: Connection, cmd: DebitWallet, ctx: OperationContext) -> Effect:
    user = user_available(cmd.user)
    amount = ctx.minor(cmd.amount)
    t, locked = move(conn, ctx, user, EXTERNAL, amount, "debit", {EXTERNAL.code})
    return Effect({"user": cmd.user, "amount": ctx.fmt(amount),
                   "available": ctx.fmt(locked[user.code].balance_minor)}, [t])


def transfer_tokens_between_users(
    conn: Connection, cmd: TransferTokensBetweenUsers, ctx: OperationContext
) -> Effect:
    payer, payee = user_available(cmd.from_user), user_available(cmd.to_user)
    amount = ctx.minor(cmd.amount)
    t, locked = move(conn, ctx, payer, payee, amount, "transfer", {payee.code})
    return Effect({"from_user": cmd.from_user, "to_user": cmd.to_user,
                   "amount": ctx.fmt(amount),
                   "from_available": ctx.fmt(locked[payer.code].balance_minor)}, [t])


def credit_footprint(cmd: CreditWallet) -> Footprint:
    user = user_available(cmd.user)
    return Footprint((EXTERNAL, user), frozenset({EXTERNAL.code, user.code}))


def debit_footprint(cmd: DebitWallet) -> Footprint:
    return Footprint((user_available(cmd.user), EXTERNAL), frozenset({EXTERNAL.code}))


def transfer_footprint(cmd: TransferTokensBetweenUsers) -> Footprint:
    payee = user_available(cmd.to_user)
    return Footprint((user_available(cmd.from_user), payee), frozenset({payee.code}))
