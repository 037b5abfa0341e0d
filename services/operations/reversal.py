"""Reversals: the compensating transfers of a succeeded command, posted as a new command.

History is never edited: `reverse_command` posts, for each transfer of the original (last
first), one of the same amount the other way, kind `reversal`, and records the pair in
`reversals` (this module owns it; the original's key is unique there, so a second reversal
is refused `already_reversed`; one that would take a balance below zero,
`insufficient_balance`: a reversal never uses an overdraft). What is reversed
(docs/ARCHITECTURE.md, "Accounts: ..."): credits, debits, transfers between users, mints,
sales and buy-backs, and releases. A release's reversal pays the payee's part and the fee
back to the payer's *available* account: the hold stays closed and escrow untouched, so
"escrow equals the open holds" keeps holding. Not reversed (`not_reversible`): a reversal
(no loops), holds opened and refunds (refund or release the hold instead), payouts (per
item, their own batch), account changes (no money moved), and anything that did not
succeed or is unknown.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from sqlalchemy import insert, select, text
from sqlalchemy.engine import Connection

from services import schema
from services.command_fields import CommandBase, Ident
from services.errors import (
    AlreadyReversedError,
    InsufficientBalanceError,
    LimitExceededError,
    NotReversibleError,
    TransactionIntegrityError,
)
from services.ledger import (
    AccountSpec,
    Transfer,
    account_spec,
    lock_accounts,
    make_transfer,
    post_transfers,
    user_available,
)
from services.operations.accounts import Reason
from services.operations.base import (
    ApplyAfterBatch,
    Effect,
    Footprint,
    OperationContext,
    TransferFacts,
)

__all__ = ["ReverseCommand", "REVERSIBLE", "reverse_command", "reversal_footprint",
           "reversal_transfers", "reversal_target"]

REVERSIBLE = frozenset({
    "credit_wallet", "debit_wallet", "transfer_tokens_between_users", "admin_create_tokens",
    "admin_sell_tokens_to_user", "user_sell_tokens_to_admin", "release_from_escrow",
})
#: Bounded: a reversible command has one or two transfers.
_LEGS_MAX = 10


class ReverseCommand(CommandBase):
    """Post the compensating transfers of the succeeded command `original_key`."""

    type: Literal["reverse_command"]
    original_key: Ident
    reason: Reason


def reversal_target(original_type: str, code: str) -> str:
    """Where a reversal credits what the original took from `code`: the account itself,
    except a released hold's escrow, whose money goes back to the payer's available."""
    spec = account_spec(code)
    if original_type == "release_from_escrow" and spec is not None \
            and spec.kind == "user_escrow" and spec.user_id is not None:
        return user_available(spec.user_id).code
    return code


def _lock_original(conn: Connection, key: str, ctx: OperationContext) -> Any:
    c = schema.commands
    row = conn.execute(select(c.c.id, c.c.type, c.c.status).where(c.c.idempotency_key == key)
                       .with_for_update()).one_or_none()
    if row is None:
        raise NotReversibleError(f"no command {key!r}", original_key=key)
    if row.id in ctx.batch and row.id != ctx.command_id:
        # Submitted together and coalesced: the original's outcome and transfers are
        # written with the batch. Run once they are, instead of refusing what will succeed.
        raise ApplyAfterBatch(f"{key!r} is applied in the same batch")
    if row.status != "succeeded":
        raise NotReversibleError(f"command {key!r} is {row.status}: only a succeeded command "
                                 "is reversed", original_key=key)
    if row.type not in REVERSIBLE:
        raise NotReversibleError(f"a {row.type} is not reversed", original_key=key)
    r = schema.reversals
    if conn.execute(select(r.c.command_id).where(r.c.original_command_id == row.id)
                    ).first() is not None:
        raise AlreadyReversedError(f"command {key!r} was reversed already", original_key=key)
    return row


_LEGS = text(
    "SELECT d.code, k.code, t.amount_minor FROM transfers t "
    "JOIN accounts d ON d.id = t.debit_account_id JOIN accounts k ON k.id = t.credit_account_id "
    "WHERE t.command_id = :id ORDER BY t.id")


def _legs(conn: Connection, command_id: int) -> Sequence[tuple[str, str, int]]:
    rows = conn.execute(_LEGS, {"id": command_id}).all()
    if not rows or len(rows) > _LEGS_MAX:
        raise TransactionIntegrityError(f"Bug! a succeeded command with {len(rows)} transfers")
    return [(debit, credit, amount) for debit, credit, amount in rows]


def _spec(code: str) -> AccountSpec:
    spec = account_spec(code)
    if spec is None:
        raise TransactionIntegrityError(f"Bug! {code} names no account")
    return spec


def reverse_command(conn: Connection, cmd: ReverseCommand, ctx: OperationContext) -> Effect:
    original = _lock_original(conn, cmd.original_key, ctx)
    moves = [(credit, reversal_target(original.type, debit), amount)
             for debit, credit, amount in reversed(_legs(conn, original.id))]
    locked = lock_accounts(conn, [_spec(code) for move in moves for code in move[:2]])
    transfers = [make_transfer(locked[debit], locked[credit], amount, "reversal")
                 for debit, credit, amount in moves]
    _no_overdraft(transfers)
    try:
        post_transfers(conn, ctx.command_id, transfers)
    except LimitExceededError as exc:
        raise InsufficientBalanceError(exc.message, **exc.ids) from exc
    conn.execute(insert(schema.reversals).values(
        command_id=ctx.command_id, original_command_id=original.id, reason=cmd.reason))
    total = sum(amount for _, _, amount in moves)
    return Effect({"original_key": cmd.original_key, "original_type": original.type,
                   "transfers": len(transfers), "amount": ctx.fmt(total)}, transfers)


def _no_overdraft(transfers: Sequence[Transfer]) -> None:
    """A reversal never draws on an overdraft: an account with a limit (a user's, locked,
    exact) may not end below zero by it. Others are checked by the ledger as always."""
    taken: dict[str, int] = {}
    for transfer in transfers:
        taken[transfer.debit.code] = taken.get(transfer.debit.code, 0) + transfer.amount_minor
    for transfer in transfers:
        debit = transfer.debit
        if debit.limit_minor and debit.balance_minor < taken[debit.code]:
            raise InsufficientBalanceError(
                f"{debit.code} holds {debit.balance_minor} minor units, {taken[debit.code]} "
                "needed (a reversal does not use the overdraft)", account=debit.code)


def reversal_footprint(cmd: ReverseCommand) -> Footprint:
    """Its accounts are known once the original's transfers are read: locked then."""
    return Footprint()


def reversal_transfers(facts: TransferFacts) -> str | None:
    """As many transfers as the original, of the same total."""
    row = facts.conn.execute(text(
        "SELECT COUNT(t.id), COALESCE(SUM(t.amount_minor), 0) FROM commands c "
        "LEFT JOIN transfers t ON t.command_id = c.id WHERE c.idempotency_key = :key"),
        {"key": facts.payload.get("original_key")}).one()
    if (facts.count, facts.total_minor) == (row[0], row[1]) and facts.count > 0:
        return None
    return (f"{facts.count} transfers of {facts.total_minor} minor units; the original has "
            f"{row[0]} of {row[1]}")
