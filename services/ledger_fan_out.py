"""One account paying many (a payout chunk): every balance in one statement, every transfer
in one more.

`post_fan_out` credits accounts by id; `pay_users` credits users' available accounts and
opens a new user wallet at what it is paid (one row written, not inserted then updated: a
user account, never a hot one). The debit is checked once, for the total, under its lock,
and written last, alone. A fan-out writes at once, never inside a transaction's book.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from services import schema
from services.bulk_sql import insert_ignoring_conflicts, insert_rows, pg_array
from services.errors import TransactionIntegrityError
from services.ledger_accounts import (
    LockedAccount,
    available_code,
    user_available,
    validate_balance_integrity,
)
from services.ledger_book import book_of
from services.ledger_state import check_daily_debits
from services.ledger_writes import leg_times, write_deltas_returning

__all__ = ["post_fan_out", "pay_users", "open_user_wallets"]


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
