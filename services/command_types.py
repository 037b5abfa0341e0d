"""The registry of command types: everything walletq knows of each type, in one entry.

Per type: its model (what a producer sends), how it runs (a handler inside the executor's
transaction, with the footprint of rows it locks, or a batch executor that runs its own
transactions), the transfers a
succeeded command implies (what `walletq verify` checks), its queue, the built-in roles
that may send it (`admin` may send every type) and what a command of it needs beyond its
type (a fee override, a payout from another account than the treasury). The command union,
the JSON Schema, the handler table, verify's expectations, the routing and the built-in
roles' permissions (seeded as data by migration 0004, held against this registry by a
test) are all derived from `REGISTRY`. Adding a type: docs/ARCHITECTURE.md, "Adding a
command type".
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.engine import Connection, Engine

from services.command_fields import CommandBase
from services.command_store import CommandRecord
from services.operations import accounts, escrow, reversal, treasury, wallet
from services.operations.base import (
    Effect,
    Footprint,
    OperationContext,
    TransferFacts,
    one_transfer_of_amount,
)
from services.payouts.command import PayoutBatch, payout_needs
from services.payouts.executor import execute_payout_batch
from services.payouts.store import check_batch_transfers
from services.permissions import (
    ADMIN,
    BUILTIN_ROLES,
    EVERYTHING,
    NOTHING_MORE,
    OVERRIDES,
    PAYMENTS,
    SYSTEM,
    TREASURY,
    WEB,
)
from services.settings import Settings

__all__ = ["CommandType", "Handler", "BatchExecutor", "TransferCheck", "Needs", "Queue",
           "REGISTRY", "BY_NAME", "NAMES", "SINGLE_TYPES", "QUEUES", "ROLE_PERMISSIONS", "GRANTABLE", "get",
           "queue_of", "permissions_needed"]

#: A single command's operation, inside the executor's transaction (services.applying).
Handler = Callable[[Connection, Any, OperationContext], Effect]
#: The rows a single command will lock, known before it runs (operations.base.Footprint).
FootprintOf = Callable[[Any], Footprint]
#: A long command that runs its own transactions (a payout, chunk by chunk).
BatchExecutor = Callable[[Engine, Any, Settings], CommandRecord]
#: verify's rule for a command's transfers: None when they are right, else what is wrong.
TransferCheck = Callable[[TransferFacts], "str | None"]
#: The permissions a validated command needs beyond its type (services.permissions).
Needs = Callable[[Any], frozenset[str]]


def _nothing_more(_command: Any) -> frozenset[str]:
    return NOTHING_MORE


Queue = Literal["commands", "payouts"]
QUEUES: tuple[Queue, ...] = ("commands", "payouts")


@dataclass(frozen=True)
class CommandType:
    name: str
    model: type[CommandBase]
    implied_transfers: TransferCheck
    handler: Handler | None = None
    batch_executor: BatchExecutor | None = None
    queue: Queue = "commands"
    #: The built-in roles that may send it, besides `admin` (which may send every type).
    roles: tuple[str, ...] = ()
    needs: Needs = _nothing_more
    footprint: FootprintOf | None = None
    #: The handler writes a row outside the ledger before it may still refuse (a hold it
    #: opens): in a batch it runs in a savepoint, so that its refusal leaves nothing.
    savepoint: bool = False

    def __post_init__(self) -> None:
        # A registry entry that lacks a part fails at import, not mid-command.
        literal = typing.get_args(self.model.model_fields["type"].annotation)
        if literal != (self.name,):
            raise TypeError(f"{self.model.__name__}.type is {literal}, not ({self.name!r},)")
        if (self.handler is None) == (self.batch_executor is None):
            raise TypeError(f"{self.name}: exactly one of handler and batch_executor")
        if self.queue not in QUEUES:
            raise TypeError(f"{self.name}: unknown queue {self.queue!r}")
        unknown = set(self.roles) - (set(BUILTIN_ROLES) - {ADMIN})
        if unknown:
            raise TypeError(f"{self.name}: roles {sorted(unknown)} are not built-in roles "
                            "(admin may send every type without being named)")
        if (self.handler is None) != (self.footprint is None):
            raise TypeError(f"{self.name}: a handler needs its footprint (the rows it locks)")

    @property
    def is_batch(self) -> bool:
        return self.batch_executor is not None


REGISTRY: tuple[CommandType, ...] = (
    CommandType("credit_wallet", wallet.CreditWallet, one_transfer_of_amount,
                handler=wallet.credit_wallet, footprint=wallet.credit_footprint,
                roles=(PAYMENTS,)),
    CommandType("debit_wallet", wallet.DebitWallet, one_transfer_of_amount,
                handler=wallet.debit_wallet, footprint=wallet.debit_footprint,
                roles=(PAYMENTS,)),
    CommandType("transfer_tokens_between_users", wallet.TransferTokensBetweenUsers,
                one_transfer_of_amount, handler=wallet.transfer_tokens_between_users,
                footprint=wallet.transfer_footprint, roles=(WEB,)),
    CommandType("transfer_to_escrow", escrow.TransferToEscrow, one_transfer_of_amount,
                handler=escrow.transfer_to_escrow, footprint=escrow.hold_footprint,
                savepoint=True, roles=(WEB,), needs=escrow.fee_rate_needs),
    CommandType("release_from_escrow", escrow.ReleaseFromEscrow, escrow.release_transfers,
                handler=escrow.release_from_escrow, footprint=escrow.release_footprint,
                roles=(WEB,), needs=escrow.fee_rate_needs),
    CommandType("refund_from_escrow", escrow.RefundFromEscrow, escrow.refund_transfers,
                handler=escrow.refund_from_escrow, footprint=escrow.refund_footprint,
                roles=(WEB,)),
    CommandType("admin_create_tokens", treasury.AdminCreateTokens, one_transfer_of_amount,
                handler=treasury.admin_create_tokens, footprint=treasury.mint_footprint,
                roles=(TREASURY,)),
    CommandType("admin_sell_tokens_to_user", treasury.AdminSellTokensToUser,
                one_transfer_of_amount, handler=treasury.admin_sell_tokens_to_user,
                footprint=treasury.sale_footprint, roles=(TREASURY,)),
    CommandType("user_sell_tokens_to_admin", treasury.UserSellTokensToAdmin,
                one_transfer_of_amount, handler=treasury.user_sell_tokens_to_admin,
                footprint=treasury.buyback_footprint, roles=(WEB,)),
    CommandType("payout_batch", PayoutBatch, check_batch_transfers,
                batch_executor=execute_payout_batch, queue="payouts", roles=(TREASURY,),
                needs=payout_needs),
    CommandType("expire_hold", escrow.ExpireHold, escrow.expire_transfers,
                handler=escrow.expire_hold, footprint=escrow.expire_footprint,
                roles=(SYSTEM,)),
    # Accounts: limits, freezes, closing, reversals — admin only (docs/ARCHITECTURE.md).
    CommandType("set_account_limit", accounts.SetAccountLimit, accounts.no_transfers,
                handler=accounts.set_account_limit, footprint=accounts.available_footprint),
    CommandType("freeze_account", accounts.FreezeAccount, accounts.no_transfers,
                handler=accounts.freeze_account, footprint=accounts.available_footprint),
    CommandType("unfreeze_account", accounts.UnfreezeAccount, accounts.no_transfers,
                handler=accounts.unfreeze_account, footprint=accounts.available_footprint),
    CommandType("close_account", accounts.CloseAccount, accounts.no_transfers,
                handler=accounts.close_account, footprint=accounts.close_footprint),
    CommandType("reverse_command", reversal.ReverseCommand, reversal.reversal_transfers,
                handler=reversal.reverse_command, footprint=reversal.reversal_footprint),
)

BY_NAME: dict[str, CommandType] = {entry.name: entry for entry in REGISTRY}
NAMES: tuple[str, ...] = tuple(BY_NAME)
#: The types a worker may coalesce into one transaction (every type with a handler).
SINGLE_TYPES: tuple[str, ...] = tuple(entry.name for entry in REGISTRY if not entry.is_batch)
if len(BY_NAME) != len(REGISTRY):
    raise TypeError("a command type is registered twice")


#: The built-in roles' permissions, as migration 0004 seeds them (a test holds the two equal).
ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    **{role: frozenset(entry.name for entry in REGISTRY if role in entry.roles)
       for role in BUILTIN_ROLES if role != ADMIN},
    ADMIN: frozenset({EVERYTHING}),
}
#: What `--allow` may grant a producer: a registered type or an override.
GRANTABLE: frozenset[str] = frozenset(NAMES) | frozenset(OVERRIDES)


def permissions_needed(command: CommandBase) -> tuple[str, ...]:
    """Every permission a validated command needs: its type, then what its fields ask for."""
    return (command.type, *sorted(BY_NAME[command.type].needs(command)))


def get(name: str) -> CommandType:
    """The entry of a registered type; KeyError for a name that is not one."""
    return BY_NAME[name]


def queue_of(name: object) -> Queue:
    """The queue a command of this type travels on; an unknown type goes to `commands`,
    where the worker refuses it as invalid."""
    entry = BY_NAME.get(name) if isinstance(name, str) else None
    return entry.queue if entry is not None else "commands"
