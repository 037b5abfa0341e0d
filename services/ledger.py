"""The double-entry ledger: accounts, row locks in one global order, and transfers.

The ledger owns every write to `accounts` and `transfers`. Money moves only through
`make_transfer` (both legs from one constructor) and `post_transfers` (the balance check
under the row lock, then both balance updates and the transfer row), or, for one account
paying many (a payout chunk), `post_fan_out` and `pay_users`. `apply_balance_deltas` is the
one function that changes a balance, so a hot account can later be spread over several
rows without touching the operations (`pay_users` opens a new user wallet at what it is
paid: a user account, never a hot one).

Inside `deferred(conn)` (the executor's lean path) the same calls write nothing at once: a
`Book` remembers the rows locked in this transaction (a second lock of the same account
costs no statement) and the balance changes and transfers posted, checked under the lock
as always; `Book.flush` writes them all at the end of the transaction in one statement,
and `Book.rollback_to` forgets what a refused command posted (docs/ARCHITECTURE.md, "The
lean path and coalescing").

Hot accounts (the platform's and the system's: every release credits `platform:fees`,
every sale debits `platform:treasury`) are not locked while the transaction works: their
balance is read, a debit is checked against it (and, when that reading cannot cover it,
against the row locked there and then), and their legs are written once, at the end, in
the flush, which locks them last (after every user account, in id order) and so holds
their lock only through the commit. A debit that the locked row can no longer cover by
then fails the CHECK constraint: `HotAccountShort`, and the caller applies the command
again with its hot accounts locked first (docs/ARCHITECTURE.md, "Hot accounts").

This module locks and posts; the rest of the ledger lives beside it, every name re-exported
here, so that a caller names one module:
- `services.ledger_accounts`: account specs and codes, `LockedAccount`, the checks on it;
- `services.ledger_writes`: `Transfer` and the statements that write balances and transfers.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from services import schema
from services.bulk_sql import (
    Deferred,
    Pending,
    execute_reusable,
    insert_ignoring_conflicts,
    insert_rows,
    pg_array,
)
from services.errors import (
    AccountClosedError,
    AccountFrozenError,
    LimitExceededError,
    TransactionIntegrityError,
    UnknownUserError,
)
from services.ledger_accounts import (
    EXTERNAL,
    FEES,
    ISSUANCE,
    STATE_COLUMNS,
    STATE_SQL,
    TREASURY,
    AccountSpec,
    LockedAccount,
    account_spec,
    available_code,
    check_usable,
    is_hot,
    locked_account,
    read_account,
    user_available,
    user_escrow,
    validate_balance_integrity,
)
from services.ledger_writes import (
    INSERT_TRANSFER,
    Transfer,
    leg_time,
    leg_times,
    make_transfer,
    write_deltas,
    write_deltas_returning,
)

__all__ = [
    "AccountSpec",
    "LockedAccount",
    "Transfer",
    "TREASURY",
    "FEES",
    "ISSUANCE",
    "EXTERNAL",
    "user_available",
    "user_escrow",
    "account_spec",
    "lock_accounts",
    "lock_recipients",
    "make_transfer",
    "post_transfers",
    "post_fan_out",
    "pay_users",
    "open_user_wallets",
    "apply_balance_deltas",
    "validate_balance_integrity",
    "Book",
    "BookMark",
    "HotAccountShort",
    "is_hot",
    "deferred",
    "current_book",
    "keep",
    "kept",
    "defer",
    "lock_footprint",
    "read_account",
    "check_usable",
    "set_account_state",
    "settle",
    "last_transfer_id",
    "check_daily_debits",
    "utc_day_start",
]


def lock_accounts(
    conn: Connection, specs: Iterable[AccountSpec], *, open_missing: Collection[str] = ()
) -> dict[str, LockedAccount]:
    """Lock the accounts by ascending id (the global order); open those allowed to be new.

    An account that is missing and may not be opened belongs to an unknown user. Inside
    `deferred`, an account this transaction locked already is taken from its book.
    """
    wanted = {spec.code: spec for spec in specs}
    book = _book(conn)
    known = {code: book.locked[code] for code in wanted if code in book.locked} if book else {}
    if len(known) == len(wanted):
        return known
    locked = {**known, **_select(conn, sorted(set(wanted) - set(known)), book)}
    # Open what is missing (usually nothing), then lock the whole set again in id order.
    to_open = [wanted[code].row() for code in sorted(open_missing)
               if code in wanted and code not in locked]
    if to_open:
        insert_ignoring_conflicts(conn, schema.accounts, to_open, ["code"])
        locked = {**known, **_select(conn, sorted(set(wanted) - set(known)), book)}
    if book is not None:
        book.remember(locked)
    for code, spec in sorted(wanted.items()):
        if code not in locked:
            if spec.user_id is None:
                raise TransactionIntegrityError(f"system account {code} is missing", account=code)
            raise UnknownUserError(f"user {spec.user_id!r} has no wallet", user=spec.user_id)
    return locked


_a = schema.accounts
_LOCK_ACCOUNTS = (
    select(_a.c.id, _a.c.code, _a.c.user_id, _a.c.balance_minor, _a.c.may_go_negative,
           *STATE_COLUMNS)
    .where(_a.c.code.in_(bindparam("codes", expanding=True)))
    .order_by(_a.c.id)
    .with_for_update()
)
# Users' accounts locked in id order, hot ones read (the book locks them at its flush).
_LOCK_COLD_READ_HOT = text(
    f"WITH cold AS (SELECT id, code, user_id, balance_minor, may_go_negative, {STATE_SQL} "
    "FROM accounts WHERE code = ANY(CAST(:cold AS TEXT[])) ORDER BY id FOR UPDATE) "
    "SELECT *, true AS exact FROM cold "
    f"UNION ALL SELECT id, code, user_id, balance_minor, may_go_negative, {STATE_SQL}, "
    "false AS exact FROM accounts WHERE code = ANY(CAST(:hot AS TEXT[]))")
# Every account locked: users' in id order, then hot ones in id order.
_LOCK_COLD_THEN_HOT = text(
    f"SELECT id, code, user_id, balance_minor, may_go_negative, {STATE_SQL} FROM accounts "
    "WHERE code = ANY(CAST(:codes AS TEXT[])) ORDER BY code NOT LIKE 'user:%', id FOR UPDATE")


def _select_for_update(conn: Connection, codes: list[str]) -> dict[str, LockedAccount]:
    rows = conn.execute(_LOCK_ACCOUNTS, {"codes": codes}).all()
    return {row.code: locked_account(row, True) for row in rows}


def _select(conn: Connection, codes: list[str], book: Book | None) -> dict[str, LockedAccount]:
    """Outside a book, every account locked in id order; inside one (PostgreSQL), users'
    accounts locked in id order and hot ones read, or, `hot_first`, locked after them."""
    if book is None or conn.dialect.name != "postgresql" or not codes:
        return _select_for_update(conn, codes) if codes else {}
    if book.hot_first:
        rows = execute_reusable(conn, _LOCK_COLD_THEN_HOT, {"codes": pg_array(codes)}).all()
        return {row.code: locked_account(row, True) for row in rows}
    hot = [code for code in codes if is_hot(code)]
    cold = [code for code in codes if not is_hot(code)]
    rows = execute_reusable(conn, _LOCK_COLD_READ_HOT,
                           {"cold": pg_array(cold), "hot": pg_array(hot)}).all()
    return {row.code: locked_account(row) for row in rows}


def lock_recipients(conn: Connection, users: Iterable[str]) -> dict[str, str]:
    """Lock the users' available accounts that exist (in id order) and name those that take
    no credit now, {user: error code}: closed (`account_closed`) or frozen for credits too
    (`account_frozen`). A wallet not opened yet takes anything. A payout decides on this,
    under the locks its credits are written under."""
    codes = sorted({user_available(user).code for user in users})
    if not codes:
        return {}
    if conn.dialect.name == "postgresql":
        rows = execute_reusable(conn, _LOCK_COLD_THEN_HOT, {"codes": pg_array(codes)}).all()
    else:
        rows = conn.execute(_LOCK_ACCOUNTS, {"codes": codes}).all()
    blocked: dict[str, str] = {}
    for row in rows:
        account = locked_account(row, True)
        if account.user_id is None:
            continue
        if account.closed:
            blocked[account.user_id] = AccountClosedError.code
        elif account.credits_frozen:
            blocked[account.user_id] = AccountFrozenError.code
    return blocked


def lock_footprint(conn: Connection, specs: Iterable[AccountSpec]) -> dict[str, LockedAccount]:
    """Lock, in one statement, every existing account a batch of commands will touch: users'
    in id order, hot ones read (see the module's docstring). None is opened here: a command
    opens its own, so that a refusal undoes it."""
    book = _book(conn)
    codes = sorted({spec.code for spec in specs} - (set(book.locked) if book else set()))
    locked = _select(conn, codes, book)
    if book is not None:
        book.remember(locked)
    return locked


def post_transfers(conn: Connection, command_id: int, transfers: Sequence[Transfer]) -> None:
    """Check each debit under its lock, then move the money; all in the caller's transaction."""
    for transfer in transfers:
        _post_one(conn, command_id, transfer)


def _post_one(conn: Connection, command_id: int, transfer: Transfer) -> None:
    debit, credit = transfer.debit, transfer.credit
    check_usable(debit, credit)
    book = _book(conn)
    if book is not None and not debit.exact and not debit.may_go_negative \
            and debit.balance_minor + debit.limit_minor < transfer.amount_minor:
        book.lock_exact(conn, debit)  # a refusal is decided under the lock, never on a reading
    validate_balance_integrity(
        account_code=debit.code,
        balance_minor=debit.balance_minor,
        debit_minor=transfer.amount_minor,
        may_go_negative=debit.may_go_negative,
        overdraft_limit_minor=debit.limit_minor,
    )
    if debit.daily_limit_minor is not None:
        check_daily_debits(conn, debit, transfer.amount_minor)
    if book is not None:
        book.post(command_id, transfer)
        return
    apply_balance_deltas(conn, {debit.id: -transfer.amount_minor, credit.id: transfer.amount_minor})
    debit.balance_minor -= transfer.amount_minor
    credit.balance_minor += transfer.amount_minor
    # Both rows are locked (outside a book every account is): their balances are exact.
    row = {"command_id": command_id, "debit_id": debit.id, "credit_id": credit.id,
           "amount_minor": transfer.amount_minor, "kind": transfer.kind,
           "debit_after": debit.balance_minor, "credit_after": credit.balance_minor}
    at = leg_time(conn)
    if at is None:
        conn.execute(INSERT_TRANSFER, row)
    else:
        conn.execute(INSERT_TRANSFER.values(created_at=bindparam("at")), {**row, "at": at})


def apply_balance_deltas(conn: Connection, deltas: Mapping[int, int]) -> None:
    """The only writer of balances: add each delta to its account, in ascending id order
    (inside `deferred`, when the book is flushed)."""
    book = _book(conn)
    if book is not None:
        book.add_deltas(deltas)
        return
    write_deltas(conn, deltas)


def _check_fan_out(conn: Connection, debit: LockedAccount, amounts: Iterable[int]) -> int:
    """The total one account pays many, checked once under its lock (see post_fan_out)."""
    if _book(conn) is not None:
        raise TransactionIntegrityError("Bug! a fan-out writes at once: no book may be open")
    total = 0
    for amount_minor in amounts:
        if type(amount_minor) is not int or amount_minor <= 0:
            raise TransactionIntegrityError(f"transfer amount {amount_minor!r} is not a positive int")
        total += amount_minor
    if debit.closed or debit.debits_frozen:  # the payout refuses it when it locks it
        raise TransactionIntegrityError(f"Bug! a fan-out from {debit.code}, frozen or closed")
    validate_balance_integrity(account_code=debit.code, balance_minor=debit.balance_minor,
                               debit_minor=total, may_go_negative=debit.may_go_negative,
                               overdraft_limit_minor=debit.limit_minor)
    if debit.daily_limit_minor is not None:
        check_daily_debits(conn, debit, total)
    return total


def post_fan_out(conn: Connection, command_id: int, debit: LockedAccount,
                 credits: Sequence[tuple[int, int]], kind: str) -> None:
    """One locked account pays many: (credit account id, amount) each a transfer.

    The transfers go in one statement and every balance in one more; the debit is checked
    once, for the total, under its lock. The credited rows are locked by the UPDATE, in
    ascending id order like every other balance write. A hot debit account that was only
    read (`exact` False) is written last, alone, so that its lock is held only through the
    commit: two chunks paying from it run side by side (docs/ARCHITECTURE.md, "Hot
    accounts"); if it no longer covers the total, the CHECK constraint refuses it.
    """
    if not credits:
        return
    total = _check_fan_out(conn, debit, (amount_minor for _, amount_minor in credits))
    if any(account_id == debit.id for account_id, _ in credits):
        raise TransactionIntegrityError(f"Bug! a transfer from {debit.code} to itself")
    deltas: dict[int, int] = {}
    for account_id, amount_minor in credits:
        deltas[account_id] = deltas.get(account_id, 0) + amount_minor
    # Balances first (the credited rows locked by their UPDATE, the debited one last), so
    # that each leg's balance after it is known from the balances written: the legs of one
    # account, in order, end at its new balance.
    after = write_deltas_returning(conn, deltas)
    _insert_fan_out(conn, command_id, debit, credits, after, total, kind)


def _insert_fan_out(conn: Connection, command_id: int, debit: LockedAccount,
                    credits: Sequence[tuple[int, int]], after: dict[int, int], total: int,
                    kind: str) -> None:
    """Debit the payer last (alone, its lock held only through the commit), then every
    transfer in one statement, each leg with its account's balance after it."""
    after.update(write_deltas_returning(conn, {debit.id: -total}))
    debit.balance_minor -= total
    credit_after, debit_after = [0] * len(credits), [0] * len(credits)
    running = dict(after)
    for index in range(len(credits) - 1, -1, -1):
        account_id, amount_minor = credits[index]
        credit_after[index] = running[account_id]
        running[account_id] -= amount_minor
        debit_after[index] = running[debit.id]
        running[debit.id] += amount_minor
    if conn.dialect.name == "postgresql":  # the repeated columns sent once, not 2,000 times
        conn.execute(_INSERT_FAN_OUT, {
            "command_id": command_id, "debit_id": debit.id, "kind": kind,
            "credit_ids": pg_array([account_id for account_id, _ in credits]),
            "amounts": pg_array([amount_minor for _, amount_minor in credits]),
            "debit_after": pg_array(debit_after), "credit_after": pg_array(credit_after)})
        return
    insert_rows(conn, schema.transfers, {
        "command_id": [command_id] * len(credits),
        "debit_account_id": [debit.id] * len(credits),
        "credit_account_id": [account_id for account_id, _ in credits],
        "amount_minor": [amount_minor for _, amount_minor in credits],
        "kind": [kind] * len(credits),
        "debit_balance_after_minor": debit_after,
        "credit_balance_after_minor": credit_after,
        **leg_times(conn, len(credits))})


_INSERT_FAN_OUT = text(
    "INSERT INTO transfers (command_id, debit_account_id, credit_account_id, amount_minor, "
    "kind, debit_balance_after_minor, credit_balance_after_minor) "
    "SELECT :command_id, :debit_id, t.credit_id, t.amount, :kind, t.debit_after, "
    "t.credit_after FROM unnest(CAST(:credit_ids AS BIGINT[]), CAST(:amounts AS BIGINT[]), "
    "CAST(:debit_after AS BIGINT[]), CAST(:credit_after AS BIGINT[])) "
    "AS t(credit_id, amount, debit_after, credit_after)")


def pay_users(conn: Connection, command_id: int, debit: LockedAccount,
              payments: Sequence[tuple[str, int]], kind: str) -> None:
    """One locked account pays many users' available accounts, (user, amount) each a
    transfer: `post_fan_out` with the wallets opened on the way. On PostgreSQL a wallet
    opened here is opened at what it is paid (one row written, not inserted then updated);
    the others are credited by the one balance UPDATE, in id order, as always."""
    if not payments:
        return
    if conn.dialect.name != "postgresql":
        wallets = open_user_wallets(conn, list({user for user, _ in payments}))
        post_fan_out(conn, command_id, debit, [(wallets[user], amount_minor)
                                               for user, amount_minor in payments], kind)
        return
    total = _check_fan_out(conn, debit, (amount_minor for _, amount_minor in payments))
    per_user: dict[str, int] = {}
    for user, amount_minor in payments:
        per_user[user] = per_user.get(user, 0) + amount_minor
    if debit.user_id is not None and debit.user_id in per_user \
            and debit.code == user_available(debit.user_id).code:
        raise TransactionIntegrityError(f"Bug! a transfer from {debit.code} to itself")
    users = sorted(per_user)
    params = {"codes": pg_array([available_code(user) for user in users]),
              "users": pg_array(users), "amounts": pg_array([per_user[user] for user in users]),
              "kind": "user_available"}
    try:  # a plain INSERT: ON CONFLICT's speculative insertion costs ~40% more per row
        with conn.begin_nested():
            rows = conn.execute(_CREDIT_WALLETS, params).all()
    except IntegrityError as exc:  # a wallet opened meanwhile by another transaction
        if getattr(exc.orig, "pgcode", None) != "23505":
            raise
        rows = conn.execute(_CREDIT_WALLETS_RACING, params).all()
    ids: dict[str, int] = {}
    after: dict[int, int] = {}
    for account_id, user, opened_at in rows:
        ids[user] = account_id
        if opened_at is not None:
            after[account_id] = opened_at
    found = [user for user in users if user not in ids]
    if found:  # opened by another transaction after this statement began
        a = schema.accounts
        for account_id, user in conn.execute(select(a.c.id, a.c.user_id).where(
                a.c.code.in_([available_code(user) for user in found]))):
            ids[user] = account_id
    if len(ids) != len(users):
        raise TransactionIntegrityError(f"Bug! {len(users) - len(ids)} wallets were not opened")
    after.update(write_deltas_returning(conn, {ids[user]: per_user[user] for user in users
                                                if ids[user] not in after}))
    _insert_fan_out(conn, command_id, debit, [(ids[user], amount_minor)
                                              for user, amount_minor in payments],
                    after, total, kind)


# Like _OPEN_WALLETS, each missing wallet opened at what it is paid (its balance after its
# legs): returns (id, user, that balance) for those opened, (id, user, NULL) for the others.
# Racing: a wallet another transaction opens meanwhile is skipped, then found and credited.
_CREDIT_WALLETS_SQL = (
    "WITH wanted AS (SELECT * FROM unnest(CAST(:codes AS TEXT[]), CAST(:users AS TEXT[]), "
    "CAST(:amounts AS BIGINT[])) AS w(code, user_id, amount)), "
    "found AS (SELECT a.id, w.code, w.user_id FROM wanted w, "
    "LATERAL (SELECT id FROM accounts WHERE code = w.code LIMIT 1) AS a), "
    "opened AS (INSERT INTO accounts (code, kind, user_id, may_go_negative, balance_minor) "
    "SELECT w.code, :kind, w.user_id, false, w.amount FROM wanted w "
    "WHERE w.code NOT IN (SELECT code FROM found) ORDER BY w.code{conflict} "
    "RETURNING id, user_id, balance_minor) "
    "SELECT id, user_id, NULL::BIGINT FROM found UNION ALL SELECT * FROM opened")
_CREDIT_WALLETS = text(_CREDIT_WALLETS_SQL.format(conflict=""))
_CREDIT_WALLETS_RACING = text(_CREDIT_WALLETS_SQL.format(
    conflict=" ON CONFLICT (code) DO NOTHING"))


def utc_day_start(moment: datetime | None = None) -> datetime:
    """The start of the UTC day of `moment` (now): a velocity limit's day."""
    moment = (moment or datetime.now(UTC)).astimezone(UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def check_daily_debits(conn: Connection, debit: LockedAccount, amount_minor: int) -> None:
    """Refuse a debit that takes the account's debits of this UTC day beyond its daily
    limit. Under the row lock (a user's account is locked for the whole transaction): the
    day's committed legs (one index range, `ix_transfers_debit_account_at`: bounded by one
    day of one account) plus what this transaction posted and has not written yet."""
    assert debit.daily_limit_minor is not None
    t = schema.transfers
    start = utc_day_start()
    bound = start.replace(tzinfo=None) if conn.dialect.name == "sqlite" else start
    written = conn.execute(select(func.coalesce(func.sum(t.c.amount_minor), 0)).where(
        t.c.debit_account_id == debit.id, t.c.created_at >= bound)).scalar_one()
    book = _book(conn)
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
        book = _book(conn)
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
    book = _book(conn)
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


# One index probe per wallet (LATERAL ... LIMIT 1 is never flattened into a hash join, so
# the cost follows the chunk, not the table); missing wallets are opened at zero in the same
# statement (those another transaction opens meanwhile are skipped by ON CONFLICT and found
# afterwards). Balances are then written by apply_balance_deltas only. One round trip.
_OPEN_WALLETS = text(
    "WITH found AS (SELECT a.id, a.code FROM unnest(CAST(:codes AS TEXT[])) AS c(code), "
    "LATERAL (SELECT id, code FROM accounts WHERE code = c.code LIMIT 1) AS a), "
    "opened AS (INSERT INTO accounts (code, kind, user_id, may_go_negative, balance_minor) "
    "SELECT w.code, :kind, w.user_id, false, 0 FROM unnest(CAST(:codes AS TEXT[]), "
    "CAST(:users AS TEXT[])) AS w(code, user_id) "
    "WHERE w.code NOT IN (SELECT code FROM found) ORDER BY w.code "
    "ON CONFLICT (code) DO NOTHING RETURNING id, code) "
    "SELECT id, code FROM found UNION ALL SELECT id, code FROM opened")


def open_user_wallets(conn: Connection, users: Sequence[str]) -> dict[str, int]:
    """Each user's available account id, opening the missing ones (at a zero balance)."""
    users = sorted(users)
    if not users:
        return {}
    specs = [user_available(user) for user in users]
    codes = [spec.code for spec in specs]
    ids: dict[str, int] = {}
    if conn.dialect.name == "postgresql":
        user_of = dict(zip(codes, users, strict=True))
        rows = conn.execute(_OPEN_WALLETS, {"codes": pg_array(codes), "users": pg_array(users),
                                            "kind": specs[0].kind})
        ids = {user_of[code]: account_id for account_id, code in rows}
    else:
        insert_ignoring_conflicts(conn, schema.accounts, [spec.row() for spec in specs], ["code"])
    missing = [code for code, user in zip(codes, users, strict=True) if user not in ids]
    if missing:  # SQLite, or wallets another transaction opened after this statement began
        a = schema.accounts
        for account_id, user in conn.execute(select(a.c.id, a.c.user_id).where(
                a.c.code.in_(missing))):
            ids[user] = account_id
    if len(ids) != len(users):
        raise TransactionIntegrityError(f"Bug! {len(users) - len(ids)} wallets were not opened")
    return ids


# --- the book of one transaction (the lean path) --------------------------------------------

#: The book open in this context, with the connection it belongs to (a context variable,
#: not the connection's own `info`: a connection lost mid-transaction cannot be asked).
_BOOK: ContextVar[tuple[Connection, Book] | None] = ContextVar("walletq_ledger_book", default=None)


#: A transfer posted in a book: command id, debit id, credit id, amount, kind, and the
#: debit's and the credit's balance after it (None where the account was only read).
_Posted = tuple[int, int, int, int, str, int | None, int | None]


class BookMark(NamedTuple):
    locked: int
    journal: int
    transfers: int
    writes: int
    kept: dict[tuple[str, str], Any]


class HotAccountShort(Exception):  # noqa: N818 - a signal to the caller, not an error
    """A hot account's debits, checked against its reading, overdraw the locked row at the
    flush: apply the command again with its hot accounts locked first (`hot_first`)."""


@dataclass
class Book:
    """What one transaction locked and posted, written at its end by `flush`."""

    #: Lock hot accounts with the others (after them), not at the flush: exact throughout.
    hot_first: bool = False
    locked: dict[str, LockedAccount] = field(default_factory=dict)
    #: (account id, delta, the locked account whose tracked balance it changed, if any).
    journal: list[tuple[int, int, LockedAccount | None]] = field(default_factory=list)
    #: (command id, debit id, credit id, amount, kind, debit's and credit's balance after:
    #: exact where the account is locked, else None), in posting order.
    transfers: list[_Posted] = field(default_factory=list)
    #: Rows another owner locked in this transaction (a hold), by (table, key): read again
    #: from here; and that owner's own writes, sent with the flush (`keep`, `defer`).
    kept: dict[tuple[str, str], Any] = field(default_factory=dict)
    writes: list[Pending | Deferred] = field(default_factory=list)
    _read_hot: bool = False

    def remember(self, locked: Mapping[str, LockedAccount]) -> None:
        for code, account in locked.items():
            self.locked.setdefault(code, account)
            self._read_hot = self._read_hot or not account.exact

    def post(self, command_id: int, transfer: Transfer) -> None:
        """A transfer checked under its locks: both legs tracked now, written at flush."""
        debit, credit, amount = transfer.debit, transfer.credit, transfer.amount_minor
        self.journal += [(debit.id, -amount, debit), (credit.id, amount, credit)]
        debit.balance_minor -= amount
        credit.balance_minor += amount
        self.transfers.append((command_id, debit.id, credit.id, amount, transfer.kind,
                               debit.balance_minor if debit.exact else None,
                               credit.balance_minor if credit.exact else None))

    def add_deltas(self, deltas: Mapping[int, int]) -> None:
        self.journal += [(account_id, delta, None) for account_id, delta in deltas.items() if delta]

    def lock_exact(self, conn: Connection, account: LockedAccount) -> None:
        """Lock a hot account now, and track its exact balance from here on. If what this
        transaction posted against its reading already overdraws it: HotAccountShort."""
        balance = conn.execute(_LOCK_ONE, {"id": account.id}).scalar_one()
        pending = sum(delta for account_id, delta, _ in self.journal if account_id == account.id)
        account.balance_minor, account.exact = balance + pending, True
        if not account.may_go_negative and account.balance_minor < 0:
            raise HotAccountShort(f"{account.code}: {balance} minor units, {-pending} posted")

    def hot_ids(self) -> list[int]:
        return sorted(account.id for account in self.locked.values() if not account.exact)

    @property
    def read_hot(self) -> bool:
        """Some hot account was read, not locked, in this transaction: a refusal of its
        legs by the CHECK constraint at the flush is a shortfall, not a bug."""
        return self._read_hot or bool(self.hot_ids())

    def mark(self) -> BookMark:
        return BookMark(len(self.locked), len(self.journal), len(self.transfers),
                        len(self.writes), dict(self.kept))

    def rollback_to(self, mark: BookMark) -> None:
        """Forget what was posted (and locked) since `mark`: a refused command leaves nothing.
        Locks taken since are forgotten too (a savepoint rolled back released them)."""
        for _, delta, account in reversed(self.journal[mark.journal:]):
            if account is not None:
                account.balance_minor -= delta
        del self.journal[mark.journal:]
        del self.transfers[mark.transfers:]
        del self.writes[mark.writes:]
        self.kept = mark.kept
        for code in list(self.locked)[mark.locked:]:
            del self.locked[code]

    def deltas(self) -> dict[int, int]:
        summed: dict[int, int] = {}
        for account_id, delta, _ in self.journal:
            summed[account_id] = summed.get(account_id, 0) + delta
        return {account_id: delta for account_id, delta in sorted(summed.items()) if delta}

    def flush(self, conn: Connection) -> None:
        """Write every balance change and transfer posted: one statement on PostgreSQL."""
        pending = self.flush_pending(conn)
        for item in pending:
            conn.execute(item.statement, item.params)

    def flush_pending(self, conn: Connection) -> list[Pending]:
        """`flush` as statements to send (bulk_sql.execute_together); on SQLite, written now.
        Other owners' deferred writes come first, in the order they were made."""
        deltas, transfers, writes = self.deltas(), self.transfers, _built(self.writes)
        self.journal, self.transfers, self.writes = [], [], []
        if conn.dialect.name != "postgresql" or not transfers:
            for write in writes:
                conn.execute(write.statement, write.params)
            _write_now(conn, deltas, transfers)
            return []
        columns = list(zip(*transfers, strict=True))
        # Every hot account a leg names is locked, even when its legs net to zero: the
        # balance after each leg is read under that lock.
        legs = set(columns[1]) | set(columns[2])
        hot = [account_id for account_id in self.hot_ids() if account_id in legs]
        # Each leg's balance after it is computed by _FLUSH itself, from the balances it
        # reads under the locks (a hot account read, not locked, is exact only there).
        lock_hot = [Pending(_LOCK_HOT, {"ids": pg_array(hot)}, reusable=True)] if hot else []
        return [*writes, *lock_hot, Pending(_FLUSH, {
            "ids": pg_array(list(deltas)), "deltas": pg_array(list(deltas.values())),
            "commands": pg_array(list(columns[0])), "debits": pg_array(list(columns[1])),
            "credits": pg_array(list(columns[2])), "amounts": pg_array(list(columns[3])),
            "kinds": pg_array(list(columns[4]))}, reusable=True)]


def _built(writes: Sequence[Pending | Deferred]) -> list[Pending]:
    """The deferred writes as they are to be sent, those with nothing to write left out."""
    built = [write.build() if isinstance(write, Deferred) else write for write in writes]
    return [write for write in built if write is not None]


_LOCK_ONE = text("SELECT balance_minor FROM accounts WHERE id = :id FOR UPDATE")
# Hot accounts locked last, in id order, just before their legs are written.
_LOCK_HOT = text("SELECT id FROM accounts WHERE id = ANY(CAST(:ids AS BIGINT[])) ORDER BY id "
                 "FOR UPDATE")
# Balances and transfers in one round trip: a data-modifying CTE runs whatever follows it.
# Every sub-statement sees one snapshot, taken once every row is locked (the hot ones by
# the statement before): `before` is each account's balance before this transaction's
# legs, and each leg's balance after it is that plus the running sum of the account's legs
# in posting order (docs/ARCHITECTURE.md, "Balance after each leg"). The transfers' time is
# the moment they are written, under the locks, so an account's legs follow its id order.
_FLUSH = text(
    "WITH moved AS (UPDATE accounts SET balance_minor = accounts.balance_minor + v.delta "
    "FROM unnest(CAST(:ids AS BIGINT[]), CAST(:deltas AS BIGINT[])) AS v(id, delta) "
    "WHERE accounts.id = v.id), "
    "before AS (SELECT id, balance_minor FROM accounts WHERE id = ANY(CAST(:debits AS BIGINT[])) "
    "OR id = ANY(CAST(:credits AS BIGINT[]))), "
    "t AS (SELECT * FROM unnest(CAST(:commands AS BIGINT[]), CAST(:debits AS BIGINT[]), "
    "CAST(:credits AS BIGINT[]), CAST(:amounts AS BIGINT[]), CAST(:kinds AS TEXT[])) "
    "WITH ORDINALITY AS t(command_id, debit, credit, amount, kind, n)), "
    "legs AS (SELECT n, 0 AS side, debit AS account_id, -amount AS delta FROM t "
    "UNION ALL SELECT n, 1, credit, amount FROM t), "
    "run AS (SELECT n, side, b.balance_minor + SUM(delta) OVER (PARTITION BY account_id "
    "ORDER BY n, side ROWS UNBOUNDED PRECEDING) AS after FROM legs "
    "JOIN before b ON b.id = legs.account_id) "
    "INSERT INTO transfers (command_id, debit_account_id, credit_account_id, amount_minor, kind, "
    "debit_balance_after_minor, credit_balance_after_minor, created_at) "
    "SELECT t.command_id, t.debit, t.credit, t.amount, t.kind, d.after, c.after, "
    "clock_timestamp() FROM t JOIN run d ON d.n = t.n AND d.side = 0 "
    "JOIN run c ON c.n = t.n AND c.side = 1 ORDER BY t.n")


def _write_now(conn: Connection, deltas: Mapping[int, int], transfers: Sequence[_Posted]
               ) -> None:
    """SQLite (every account locked and exact there), or nothing to write on PostgreSQL."""
    write_deltas(conn, deltas)
    if transfers:
        columns = list(zip(*transfers, strict=True))
        if None in columns[5] or None in columns[6]:
            raise TransactionIntegrityError("Bug! a leg's balance after it is unknown")
        insert_rows(conn, schema.transfers, {
            "command_id": list(columns[0]), "debit_account_id": list(columns[1]),
            "credit_account_id": list(columns[2]), "amount_minor": list(columns[3]),
            "kind": list(columns[4]), "debit_balance_after_minor": list(columns[5]),
            "credit_balance_after_minor": list(columns[6]), **leg_times(conn, len(transfers))})


def _book(conn: Connection) -> Book | None:
    current = _BOOK.get()
    return current[1] if current is not None and current[0] is conn else None


def keep(conn: Connection, table: str, key: str, row: Any) -> None:
    """Remember a row this transaction locked (or changed), when a book is open."""
    book = _book(conn)
    if book is not None:
        book.kept[(table, key)] = row


def kept(conn: Connection, table: str, key: str) -> Any:
    """A row `keep` remembered in this transaction, or None."""
    book = _book(conn)
    return None if book is None else book.kept.get((table, key))


def defer(conn: Connection, write: Pending | Deferred) -> bool:
    """Send this write with the book's flush (True), or nothing (False: no book is open,
    the caller writes now). For the owner of a row the transaction locked already."""
    book = _book(conn)
    if book is None:
        return False
    book.writes.append(write)
    return True


def current_book(conn: Connection) -> Book:
    """The book `deferred` opened on this connection (a bug if there is none)."""
    book = _book(conn)
    if book is None:
        raise TransactionIntegrityError("Bug! no ledger book is open on this connection")
    return book


@contextmanager
def deferred(conn: Connection, *, hot_first: bool = False) -> Iterator[Book]:
    """Defer this transaction's ledger writes to `Book.flush`, which the caller runs before
    it commits; leaving the block without flushing discards them (the caller rolls back).
    `hot_first`: lock hot accounts with the others instead of at the flush."""
    if _BOOK.get() is not None:
        raise TransactionIntegrityError("Bug! a ledger book is open in this context already")
    book = Book(hot_first=hot_first)
    token = _BOOK.set((conn, book))
    try:
        yield book
    finally:
        _BOOK.reset(token)
