"""The ledger's accounts: which accounts there are, what a locked one holds, and whether
it may be debited or credited now.

An account is named by its code: the platform's and the system's fixed ones (`TREASURY`,
`FEES`, `ISSUANCE`, `EXTERNAL`: the hot accounts) and each user's available and escrow
accounts. A `LockedAccount` is one row as this transaction locked (or, for a hot one, read)
it, with its state then (docs/ARCHITECTURE.md, "Accounts"); the checks here decide on that
copy, under the lock. Locking itself is `services.ledger`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.engine import Connection

from services import schema
from services.errors import (
    AccountClosedError,
    AccountFrozenError,
    InsufficientBalanceError,
    LimitExceededError,
    TransactionIntegrityError,
)

__all__ = [
    "AccountSpec",
    "LockedAccount",
    "TREASURY",
    "FEES",
    "ISSUANCE",
    "EXTERNAL",
    "is_hot",
    "user_available",
    "available_code",
    "user_escrow",
    "account_spec",
    "validate_balance_integrity",
    "check_usable",
    "STATE_COLUMNS",
    "STATE_SQL",
    "locked_account",
    "read_account",
]


@dataclass(frozen=True)
class AccountSpec:
    code: str
    kind: str
    user_id: str | None
    may_go_negative: bool

    def row(self) -> dict[str, Any]:
        return {"code": self.code, "kind": self.kind, "user_id": self.user_id,
                "may_go_negative": self.may_go_negative, "balance_minor": 0}


TREASURY = AccountSpec("platform:treasury", "treasury", None, False)
FEES = AccountSpec("platform:fees", "fees", None, False)
ISSUANCE = AccountSpec("system:issuance", "issuance", None, True)
EXTERNAL = AccountSpec("system:external", "external", None, True)
_FIXED = {spec.code: spec for spec in (TREASURY, FEES, ISSUANCE, EXTERNAL)}


def is_hot(code: str) -> bool:
    """The platform's and the system's accounts: every command of some type touches one."""
    return not code.startswith("user:")


def user_available(user: str) -> AccountSpec:
    return AccountSpec(available_code(user), "user_available", user, False)


def available_code(user: str) -> str:
    """A user's available account's code, without its spec (a payout names 2,000 at once)."""
    return f"user:{user}:available"


def user_escrow(user: str) -> AccountSpec:
    return AccountSpec(f"user:{user}:escrow", "user_escrow", user, False)


def account_spec(code: str) -> AccountSpec | None:
    """The spec an account code names, or None if it names no walletq account."""
    if code in _FIXED:
        return _FIXED[code]
    parts = code.split(":")
    if len(parts) == 3 and parts[0] == "user" and parts[1]:
        if parts[2] == "available":
            return user_available(parts[1])
        if parts[2] == "escrow":
            return user_escrow(parts[1])
    return None


def validate_balance_integrity(
    *, account_code: str, balance_minor: int, debit_minor: int, may_go_negative: bool,
    overdraft_limit_minor: int = 0,
) -> None:
    """Refuse a debit the locked balance (down to -overdraft_limit_minor) cannot cover; call
    it under the row lock. Beyond a limit the code is `limit_exceeded`, else
    `insufficient_balance`."""
    if debit_minor <= 0:
        raise TransactionIntegrityError(f"debit of {debit_minor} minor units is not positive")
    if not may_go_negative and overdraft_limit_minor and \
            balance_minor + overdraft_limit_minor < debit_minor:
        raise LimitExceededError(
            f"{account_code} holds {balance_minor} minor units with an overdraft limit of "
            f"{overdraft_limit_minor}, {debit_minor} needed",
            account=account_code, balance_minor=balance_minor, debit_minor=debit_minor,
            limit_minor=overdraft_limit_minor)
    if not may_go_negative and balance_minor < debit_minor - overdraft_limit_minor:
        raise InsufficientBalanceError(
            f"{account_code} holds {balance_minor} minor units, {debit_minor} needed",
            account=account_code,
            balance_minor=balance_minor,
            debit_minor=debit_minor,
        )


@dataclass
class LockedAccount:
    """An account row locked FOR UPDATE in this transaction; its balance tracks our writes.

    Inside `deferred`, a hot account is read, not locked (`exact` False) until a debit its
    reading cannot cover locks it, or the flush does."""

    id: int
    code: str
    user_id: str | None
    balance_minor: int
    may_go_negative: bool
    exact: bool = True
    #: Its state when locked (docs/ARCHITECTURE.md, "Accounts"): the overdraft limit, a
    #: freeze in force now (of its debits; of its credits too), closed.
    limit_minor: int = 0
    debits_frozen: bool = False
    credits_frozen: bool = False
    closed: bool = False
    #: The most its debits may take in one UTC day (None: no velocity limit).
    daily_limit_minor: int | None = None


def check_usable(debit: LockedAccount, credit: LockedAccount) -> None:
    """Refuse a movement out of a closed or debit-frozen account, or into a closed or
    fully frozen one: before any balance check, so the refusal names the state."""
    for account in (debit, credit):
        if account.closed:
            raise AccountClosedError(f"{account.code} is closed", account=account.code)
    if debit.debits_frozen:
        raise AccountFrozenError(f"{debit.code} is frozen: no debit", account=debit.code)
    if credit.credits_frozen:
        raise AccountFrozenError(f"{credit.code} is frozen: no credit", account=credit.code)

_a = schema.accounts
# A freeze is in force until its end; read with the database's clock (transaction start
# here: a debit allowed after `frozen_until` is written later still, as verify expects).
FREEZE_IN_FORCE = or_(_a.c.frozen_until.is_(None), _a.c.frozen_until > func.now())
CREDITS_FROZEN = and_(_a.c.frozen == "both", FREEZE_IN_FORCE)
#: An account no credit may reach now: closed, or frozen for credits too.
TAKES_NO_CREDIT = or_(_a.c.closed_at.is_not(None), CREDITS_FROZEN)
STATE_COLUMNS = (
    _a.c.overdraft_limit_minor,
    and_(_a.c.frozen.is_not(None), FREEZE_IN_FORCE).label("debits_frozen"),
    CREDITS_FROZEN.label("credits_frozen"),
    _a.c.closed_at.is_not(None).label("closed"),
    _a.c.daily_debit_limit_minor,
)
# The same state in PostgreSQL's text statements (clock_timestamp: the moment of the lock).
STATE_SQL = (
    "overdraft_limit_minor, "
    "COALESCE(frozen IS NOT NULL AND (frozen_until IS NULL OR frozen_until > clock_timestamp()),"
    " false) AS debits_frozen, "
    "COALESCE(frozen = 'both' AND (frozen_until IS NULL OR frozen_until > clock_timestamp()),"
    " false) AS credits_frozen, "
    "closed_at IS NOT NULL AS closed, daily_debit_limit_minor")


def locked_account(row: Any, exact: bool | None = None) -> LockedAccount:
    """An account as a lock statement returned it, with `STATE_COLUMNS` or `STATE_SQL`
    (`exact` from the row's own column when not given)."""
    m = row._mapping
    return LockedAccount(m["id"], m["code"], m["user_id"], m["balance_minor"],
                         m["may_go_negative"], bool(m["exact"]) if exact is None else exact,
                         m["overdraft_limit_minor"], bool(m["debits_frozen"]),
                         bool(m["credits_frozen"]), bool(m["closed"]),
                         m["daily_debit_limit_minor"])

def read_account(conn: Connection, spec: AccountSpec) -> LockedAccount | None:
    """A hot account read, not locked (`exact` False): post_fan_out debits it last, and the
    CHECK constraint refuses the debit if the row no longer covers it by then."""
    a = schema.accounts
    row = conn.execute(select(a.c.id, a.c.code, a.c.user_id, a.c.balance_minor,
                              a.c.may_go_negative, *STATE_COLUMNS)
                       .where(a.c.code == spec.code)).one_or_none()
    return None if row is None else locked_account(row, False)
