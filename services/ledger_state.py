"""An account's state and its limits: the daily debit limit checked, the overdraft limit,
a freeze and a closing written, and the account's last leg found.

The state is read with the row's lock (`LockedAccount`) and written here only, on a row
this transaction locked, so a later command of the same batch sees it
(docs/ARCHITECTURE.md, "Accounts").
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Text, any_, bindparam, func, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from services import schema
from services.bulk_sql import execute_reusable, pg_array
from services.errors import AccountClosedError, AccountFrozenError, LimitExceededError
from services.ledger_accounts import TAKES_NO_CREDIT, LockedAccount, user_available
from services.ledger_book import HotAccountShort, book_of

__all__ = [
    "utc_day_start",
    "check_daily_debits",
    "debited_today",
    "set_account_state",
    "settle",
    "last_transfer_id",
    "recipients_blocked",
]

_a = schema.accounts


def utc_day_start(moment: datetime | None = None) -> datetime:
    """The start of the UTC day of `moment` (now): a velocity limit's day."""
    moment = (moment or datetime.now(UTC)).astimezone(UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def debited_today(conn: Connection, debit: LockedAccount) -> int:
    """What the account's committed legs (and this transaction's written ones) debited this
    UTC day: one index range, `ix_transfers_debit_account_at`."""
    t = schema.transfers
    start = utc_day_start()
    bound = start.replace(tzinfo=None) if conn.dialect.name == "sqlite" else start
    return int(conn.execute(select(func.coalesce(func.sum(t.c.amount_minor), 0)).where(
        t.c.debit_account_id == debit.id, t.c.created_at >= bound)).scalar_one())


def check_daily_debits(conn: Connection, debit: LockedAccount, amount_minor: int) -> None:
    """Refuse a debit that takes the account's debits of this UTC day beyond its daily
    limit. Under the row lock (a user's account is locked for the whole transaction): the
    day's committed legs (one index range, `ix_transfers_debit_account_at`: bounded by one
    day of one account) plus what this transaction posted and has not written yet."""
    assert debit.daily_limit_minor is not None
    written = debited_today(conn, debit)
    book = book_of(conn)
    pending = 0 if book is None else sum(
        posted[3] for posted in book.transfers if posted[1] == debit.id)
    if int(written) + pending + amount_minor > debit.daily_limit_minor:
        raise LimitExceededError(
            f"{debit.code} has debited {int(written) + pending} minor units today (UTC), "
            f"{amount_minor} more exceeds its daily limit of {debit.daily_limit_minor}",
            account=debit.code, limit_minor=debit.daily_limit_minor)


def set_account_state(conn: Connection, account: LockedAccount, *,
                      limit_minor: int | None = None, daily_limit_minor: int | None = None,
                      frozen: str | None = None,
                      frozen_until: datetime | None = None, unfreeze: bool = False,
                      close: bool = False) -> None:
    """The one writer of an account's state (its overdraft limit, a freeze, its closing),
    on a row this transaction locked; the locked copy follows, so a later command of the
    same batch sees it. A limit that the balance is already below is refused: the CHECK
    constraint would refuse it too, against the balance written so far."""
    values: dict[str, Any] = {}
    if limit_minor is not None:
        book = book_of(conn)
        pending = 0 if book is None else sum(
            delta for account_id, delta, _ in book.journal if account_id == account.id)
        lowest = min(account.balance_minor, account.balance_minor - pending)
        if lowest < -limit_minor:
            raise LimitExceededError(
                f"{account.code} holds {account.balance_minor} minor units: below "
                f"-{limit_minor}", account=account.code, limit_minor=limit_minor)
        values["overdraft_limit_minor"] = account.limit_minor = limit_minor
    if daily_limit_minor is not None:  # 0: none
        account.daily_limit_minor = daily_limit_minor or None
        values["daily_debit_limit_minor"] = account.daily_limit_minor
    if frozen is not None:
        values.update(frozen=frozen, frozen_until=frozen_until)
        in_force = frozen_until is None or frozen_until > datetime.now(UTC)
        account.debits_frozen = in_force
        account.credits_frozen = in_force and frozen == "both"
    if unfreeze:
        values.update(frozen=None, frozen_until=None)
        account.debits_frozen = account.credits_frozen = False
    if close:
        values["closed_at"] = datetime.now(UTC)
        account.closed = True
    if values:
        conn.execute(update(_a).where(_a.c.id == account.id).values(values))


def settle(conn: Connection) -> None:
    """Write what this transaction's book posted so far, now: an account's state change
    (a freeze, a closing) is then ordered after the legs of the commands before it in a
    batch, and before those after it (verify reads them in that order)."""
    book = book_of(conn)
    if book is None:
        return
    try:
        book.flush(conn)
    except IntegrityError as exc:
        if book.read_hot and "balance_nonnegative" in str(exc.orig):
            raise HotAccountShort(str(exc.orig)) from exc
        raise


def last_transfer_id(conn: Connection, account_id: int) -> int | None:
    """The id of the account's last leg (its legs' time follows their id order): two index
    probes."""
    t = schema.transfers
    found = []
    for column in (t.c.debit_account_id, t.c.credit_account_id):
        found.append(conn.execute(select(t.c.id).where(column == account_id)
                                  .order_by(t.c.created_at.desc(), t.c.id.desc())
                                  .limit(1)).scalar_one_or_none())
    ids = [found_id for found_id in found if found_id is not None]
    return max(ids) if ids else None



_BLOCKED = select(_a.c.user_id, _a.c.closed_at.is_not(None).label("closed")).where(
    _a.c.code == any_(func.cast(bindparam("codes"), postgresql.ARRAY(Text))), TAKES_NO_CREDIT)
_BLOCKED_PORTABLE = select(_a.c.user_id, _a.c.closed_at.is_not(None).label("closed")).where(
    _a.c.code.in_(bindparam("codes", expanding=True)), TAKES_NO_CREDIT)


def recipients_blocked(conn: Connection, users: Iterable[str]) -> dict[str, str]:
    """The users whose available account takes no credit now, {user: error code}: closed
    (`account_closed`) or frozen for credits too (`account_frozen`); a wallet not opened
    yet takes anything. A read, no lock: a payout decides on it, and reads again once the
    UPDATE that credits them holds their rows (a freeze that came between is seen then)."""
    codes = sorted({user_available(user).code for user in users})
    if not codes:
        return {}
    if conn.dialect.name == "postgresql":
        rows = execute_reusable(conn, _BLOCKED, {"codes": pg_array(codes)}).all()
    else:
        rows = conn.execute(_BLOCKED_PORTABLE, {"codes": codes}).all()
    return {row.user_id: AccountClosedError.code if row.closed else AccountFrozenError.code
            for row in rows if row.user_id is not None}
