"""The platform's token stock: minting, selling to users, buying back."""

from __future__ import annotations

from typing import Literal

from sqlalchemy.engine import Connection

from services.command_fields import Amount, CommandBase, Ident
from services.ledger import ISSUANCE, TREASURY, user_available
from services.operations.base import Effect, Footprint, OperationContext, move

__all__ = ["AdminCreateTokens", "AdminSellTokensToUser", "UserSellTokensToAdmin",
           "admin_create_tokens", "admin_sell_tokens_to_user", "user_sell_tokens_to_admin",
           "mint_footprint", "sale_footprint", "buyback_footprint"]


class AdminCreateTokens(CommandBase):
    type: Literal["admin_create_tokens"]
    amount: Amount


class AdminSellTokensToUser(CommandBase):
    type: Literal["admin_sell_tokens_to_user"]
    user: Ident
    amount: Amount


class UserSellTokensToAdmin(CommandBase):
    type: Literal["user_sell_tokens_to_admin"]
    user: Ident
    amount: Amount


def admin_create_tokens(conn: Connection, cmd: AdminCreateTokens, ctx: OperationContext) -> Effect:
    amount = ctx.minor(cmd.amount)
    opened = {ISSUANCE.code, TREASURY.code}
    t, locked = move(conn, ctx, ISSUANCE, TREASURY, amount, "mint", opened)
    return Effect({"amount": ctx.fmt(amount),
                   "treasury": ctx.fmt(locked[TREASURY.code].balance_minor)}, [t])


def admin_sell_tokens_to_user(
    conn: Connection, cmd: AdminSellTokensToUser, ctx: OperationContext
) -> Effect:
    user = user_available(cmd.user)
    amount = ctx.minor(cmd.amount)
    opened = {TREASURY.code, user.code}
    t, locked = move(conn, ctx, TREASURY, user, amount, "sale", opened)
    return Effect({"user": cmd.user, "amount": ctx.fmt(amount),
                   "available": ctx.fmt(locked[user.code].balance_minor)}, [t])


def user_sell_tokens_to_admin(
    conn: Connection, cmd: UserSellTokensToAdmin, ctx: OperationContext
) -> Effect:
    user = user_available(cmd.user)
    amount = ctx.minor(cmd.amount)
    t, locked = move(conn, ctx, user, TREASURY, amount, "buyback", {TREASURY.code})
    return Effect({"user": cmd.user, "amount": ctx.fmt(amount),
                   "available": ctx.fmt(locked[user.code].balance_minor)}, [t])


def mint_footprint(cmd: AdminCreateTokens) -> Footprint:
    return Footprint((ISSUANCE, TREASURY), frozenset({ISSUANCE.code, TREASURY.code}))


def sale_footprint(cmd: AdminSellTokensToUser) -> Footprint:
    user = user_available(cmd.user)
    return Footprint((TREASURY, user), frozenset({TREASURY.code, user.code}))


def buyback_footprint(cmd: UserSellTokensToAdmin) -> Footprint:
    return Footprint((user_available(cmd.user), TREASURY), frozenset({TREASURY.code}))
