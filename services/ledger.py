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
- `services.ledger_state`: an account's limits, freeze and closing (`set_account_state`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

from sqlalchemy import bindparam, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from services import schema
from services.bulk_sql import (
    execute_reusable,
    insert_ignoring_conflicts,
    insert_rows,
    pg_array,
)
from services.errors import (
    AccountClosedError,
    AccountFrozenError,
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
from services.ledger_state import (
    check_daily_debits,
    last_transfer_id,
    set_account_state,
    settle,
    utc_day_start,
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


def _check_fan_out(conn: Connection, debit: LockedAccount, amounts: Iterable[int]) -> int:
    """The total one account pays many, checked once under its lock (see post_fan_out)."""
    if book_of(conn) is not None:
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


