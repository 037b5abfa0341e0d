"""The double-entry ledger: row locks in one global order, and transfers posted under them.

The ledger owns every write to `accounts` and `transfers`. Money moves only through
`make_transfer` (both legs from one constructor) and `post_transfers` (the balance check
under the row lock, then both balance updates and the transfer row), or, for one account
paying many (a payout chunk), `post_fan_out` and `pay_users`. `apply_balance_deltas` is the
one function that changes a balance, so a hot account can later be spread over several
rows without touching the operations (`pay_users` opens a new user wallet at what it is
paid: a user account, never a hot one).

Inside `deferred(conn)` (the executor's lean path) the same calls write nothing at once:
the transaction's `Book` remembers what they locked and posted and writes it at the end
(`services.ledger_book`).

Hot accounts (the platform's and the system's: every release credits `platform:fees`,
every sale debits `platform:treasury`) are not locked while the transaction works: their
balance is read, a debit is checked against it (and, when that reading cannot cover it,
against the row locked there and then), and their legs are written once, at the end, in
the book's flush, which locks them last: `HotAccountShort` if a locked row no longer
covers its debits by then (docs/ARCHITECTURE.md, "Hot accounts").

This module locks and posts; the rest of the ledger lives beside it, every name re-exported
here, so that a caller names one module:
- `services.ledger_accounts`: account specs and codes, `LockedAccount`, the checks on it;
- `services.ledger_writes`: `Transfer` and the statements that write balances and transfers;
- `services.ledger_book`: the book of one transaction (`deferred`, `Book`, `HotAccountShort`);
- `services.ledger_state`: an account's limits, freeze and closing (`set_account_state`);
- `services.ledger_fan_out`: one account paying many (`post_fan_out`, `pay_users`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

from sqlalchemy import bindparam, select, text
from sqlalchemy.engine import Connection

from services import schema
from services.bulk_sql import execute_reusable, insert_ignoring_conflicts, pg_array
from services.errors import (
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
    check_usable,
    is_hot,
    locked_account,
    read_account,
    user_available,
    user_escrow,
    validate_balance_integrity,
)
from services.ledger_book import (
    Book,
    BookMark,
    HotAccountShort,
    book_of,
    current_book,
    defer,
    deferred,
    keep,
    kept,
)
from services.ledger_fan_out import open_user_wallets, pay_users, post_fan_out
from services.ledger_state import (
    check_daily_debits,
    debited_today,
    last_transfer_id,
    recipients_blocked,
    set_account_state,
    settle,
    utc_day_start,
)
from services.ledger_writes import (
    INSERT_TRANSFER,
    Transfer,
    leg_time,
    make_transfer,
    write_deltas,
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
    "recipients_blocked",
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
    "debited_today",
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
    book = book_of(conn)
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
# `IN (SELECT unnest(...))`, not `= ANY(...)`: in the plan PostgreSQL keeps for a prepared
# statement, a scan filtered by `= ANY($1)` walks the whole array for every row (0.5 ms
# for 160 codes in a table of 360 accounts); the set is joined instead.
_LOCK_COLD_READ_HOT = text(
    f"WITH cold AS (SELECT id, code, user_id, balance_minor, may_go_negative, {STATE_SQL} "
    "FROM accounts WHERE code IN (SELECT unnest(CAST(:cold AS TEXT[]))) ORDER BY id FOR UPDATE) "
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


def lock_footprint(conn: Connection, specs: Iterable[AccountSpec]) -> dict[str, LockedAccount]:
    """Lock, in one statement, every existing account a batch of commands will touch: users'
    in id order, hot ones read (see the module's docstring). None is opened here: a command
    opens its own, so that a refusal undoes it."""
    book = book_of(conn)
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
    book = book_of(conn)
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
    book = book_of(conn)
    if book is not None:
        book.add_deltas(deltas)
        return
    write_deltas(conn, deltas)


