"""An account's life besides its money: its overdraft limit, freezes, and closing (admin).

This module owns `account_events` (one row per change, append-only); the state itself sits
on the account row, written by `ledger.set_account_state` under the row's lock, and the
ledger refuses what the state forbids (docs/ARCHITECTURE.md, "Accounts: limits, freezes,
closing, reversals, statements"). A freeze or a closing first writes what the commands
before it in a batch posted (`ledger.settle`), so the event's `transfer_id_max` orders it
among the account's legs exactly.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StringConstraints
from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from services import schema
from services.command_fields import Amount, CommandBase, Ident
from services.errors import AccountClosedError, AccountNotEmptyError
from services.ledger import (
    LockedAccount,
    last_transfer_id,
    lock_accounts,
    set_account_state,
    settle,
    user_available,
    user_escrow,
)
from services.operations.base import Effect, Footprint, OperationContext, TransferFacts

__all__ = ["SetAccountLimit", "FreezeAccount", "UnfreezeAccount", "CloseAccount", "Reason",
           "set_account_limit", "freeze_account", "unfreeze_account", "close_account",
           "available_footprint", "close_footprint", "no_transfers", "parse_until"]

Reason = Annotated[str, StringConstraints(min_length=1, max_length=500)]
UNTIL_PATTERN = (r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
                 r"(Z|[+-][0-9]{2}:[0-9]{2})$")


def parse_until(value: str) -> datetime:
    """An ISO 8601 time with its offset, as UTC."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def _valid_until(value: str) -> str:
    parse_until(value)  # a date that does not exist (month 13) is refused here
    return value


Until = Annotated[str, StringConstraints(pattern=UNTIL_PATTERN), AfterValidator(_valid_until)]
#: A limit: a positive amount, or "0" (no overdraft).
Limit = Annotated[Amount | Literal["0"], Field(union_mode="left_to_right")]


class SetAccountLimit(CommandBase):
    """A user's overdraft limit: their available balance may go down to -limit."""

    type: Literal["set_account_limit"]
    user: Ident
    limit: Limit
    #: The most the user's debits may take in one UTC day ("0": no velocity limit; absent:
    #: unchanged).
    daily_debit_limit: Limit | None = None
    reason: Reason | None = None


class FreezeAccount(CommandBase):
    """Refuse a user's debits (direction `debits`) or everything (`both`) until `until`,
    or until unfrozen."""

    type: Literal["freeze_account"]
    user: Ident
    reason: Reason
    direction: Literal["debits", "both"] = "debits"
    until: Until | None = None


class UnfreezeAccount(CommandBase):
    type: Literal["unfreeze_account"]
    user: Ident
    reason: Reason


class CloseAccount(CommandBase):
    """Close a user's accounts for good: only at a zero balance with no open hold."""

    type: Literal["close_account"]
    user: Ident
    reason: Reason


def _lock_open(conn: Connection, user: str) -> LockedAccount:
    spec = user_available(user)
    account = lock_accounts(conn, [spec])[spec.code]
    if account.closed:
        raise AccountClosedError(f"{spec.code} is closed", account=spec.code)
    return account


def _record(conn: Connection, ctx: OperationContext, account: LockedAccount, event: str,
            **values: Any) -> None:
    e = schema.account_events
    row = {"account_id": account.id, "command_id": ctx.command_id, "event": event,
           "transfer_id_max": last_transfer_id(conn, account.id), **values}
    conn.execute(insert(e).values(row))


def set_account_limit(conn: Connection, cmd: SetAccountLimit, ctx: OperationContext) -> Effect:
    account = _lock_open(conn, cmd.user)
    limit_minor = 0 if cmd.limit == "0" else ctx.minor(cmd.limit)
    previous = account.limit_minor
    daily = None if cmd.daily_debit_limit is None else \
        0 if cmd.daily_debit_limit == "0" else ctx.minor(cmd.daily_debit_limit)
    set_account_state(conn, account, limit_minor=limit_minor, daily_limit_minor=daily)
    _record(conn, ctx, account, "set_limit", limit_minor=limit_minor,
            daily_debit_limit_minor=account.daily_limit_minor, reason=cmd.reason)
    result = {"user": cmd.user, "limit": ctx.fmt(limit_minor),
              "previous_limit": ctx.fmt(previous), "available": ctx.fmt(account.balance_minor)}
    if account.daily_limit_minor is not None:
        result["daily_debit_limit"] = ctx.fmt(account.daily_limit_minor)
    return Effect(result)


def freeze_account(conn: Connection, cmd: FreezeAccount, ctx: OperationContext) -> Effect:
    account = _lock_open(conn, cmd.user)
    until = parse_until(cmd.until) if cmd.until is not None else None
    settle(conn)
    set_account_state(conn, account, frozen=cmd.direction, frozen_until=until)
    _record(conn, ctx, account, "freeze", direction=cmd.direction, until=until,
            reason=cmd.reason)
    return Effect({"user": cmd.user, "direction": cmd.direction,
                   "until": None if until is None else until.isoformat()})


def unfreeze_account(conn: Connection, cmd: UnfreezeAccount, ctx: OperationContext) -> Effect:
    account = _lock_open(conn, cmd.user)
    was_frozen = account.debits_frozen
    settle(conn)
    set_account_state(conn, account, unfreeze=True)
    _record(conn, ctx, account, "unfreeze", reason=cmd.reason)
    return Effect({"user": cmd.user, "was_frozen": was_frozen})


def _open_hold(conn: Connection, user: str) -> str | None:
    h = schema.holds
    return conn.execute(select(h.c.hold_id).where(h.c.status == "held")
                        .where((h.c.payer == user) | (h.c.payee == user))
                        .limit(1)).scalar_one_or_none()


def close_account(conn: Connection, cmd: CloseAccount, ctx: OperationContext) -> Effect:
    specs = (user_available(cmd.user), user_escrow(cmd.user))
    # A wallet that never held anything in escrow has no escrow account yet: opened (at
    # zero) so that it is closed too; a refusal undoes it (the footprint says it may open).
    locked = lock_accounts(conn, specs, open_missing={specs[1].code})
    available, escrow = locked[specs[0].code], locked[specs[1].code]
    if available.closed:
        raise AccountClosedError(f"{available.code} is closed", account=available.code)
    for account in (available, escrow):
        if account.balance_minor != 0:
            raise AccountNotEmptyError(f"{account.code} holds {account.balance_minor} minor units",
                                       account=account.code)
    hold_id = _open_hold(conn, cmd.user)
    if hold_id is not None:
        raise AccountNotEmptyError(f"hold {hold_id!r} of {cmd.user!r} is open", hold_id=hold_id)
    settle(conn)
    for account in (available, escrow):
        set_account_state(conn, account, close=True)
        _record(conn, ctx, account, "close", reason=cmd.reason)
    return Effect({"user": cmd.user, "closed": True})


def available_footprint(cmd: SetAccountLimit | FreezeAccount | UnfreezeAccount) -> Footprint:
    return Footprint((user_available(cmd.user),))


def close_footprint(cmd: CloseAccount) -> Footprint:
    escrow = user_escrow(cmd.user)
    return Footprint((user_available(cmd.user), escrow), frozenset({escrow.code}))


def no_transfers(facts: TransferFacts) -> str | None:
    """An account's state changes; no money moves."""
    return None if facts.count == 0 else f"{facts.count} transfers of {facts.total_minor} minor units"
