"""A transfer's two legs, and the statements that write balances and transfer rows at once.

`make_transfer` builds both legs from one constructor: the debit's loss is exactly the
credit's gain. The writes here are the ledger's own, made outside a transaction's book
(or by its flush): every balance change in ascending account id order, in one statement
whatever the number of accounts on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, text, update
from sqlalchemy.engine import Connection

from services import schema
from services.bulk_sql import pg_array
from services.errors import TransactionIntegrityError
from services.ledger_accounts import LockedAccount

__all__ = [
    "Transfer",
    "make_transfer",
    "INSERT_TRANSFER",
    "leg_time",
    "leg_times",
    "BALANCE_MIN",
    "BALANCE_MAX",
    "write_deltas",
    "write_deltas_returning",
]


@dataclass(frozen=True)
class Transfer:
    debit: LockedAccount
    credit: LockedAccount
    amount_minor: int
    kind: str

    def describe(self) -> dict[str, Any]:
        return {"debit": self.debit.code, "credit": self.credit.code,
                "amount_minor": self.amount_minor, "kind": self.kind}


def make_transfer(
    debit: LockedAccount, credit: LockedAccount, amount_minor: int, kind: str
) -> Transfer:
    """Both legs of one movement: the debit's loss is exactly the credit's gain."""
    if type(amount_minor) is not int or amount_minor <= 0:
        raise TransactionIntegrityError(f"transfer amount {amount_minor!r} is not a positive int")
    if debit.id == credit.id:
        raise TransactionIntegrityError(f"transfer from {debit.code} to itself")
    transfer = Transfer(debit, credit, amount_minor, kind)
    legs = (-transfer.amount_minor, +transfer.amount_minor)
    assert sum(legs) == 0, "legs of a transfer must balance"
    return transfer


INSERT_TRANSFER = insert(schema.transfers).values(
    command_id=bindparam("command_id"), debit_account_id=bindparam("debit_id"),
    credit_account_id=bindparam("credit_id"), amount_minor=bindparam("amount_minor"),
    kind=bindparam("kind"), debit_balance_after_minor=bindparam("debit_after"),
    credit_balance_after_minor=bindparam("credit_after"),
)


def leg_time(conn: Connection) -> datetime | None:
    """A leg's time on SQLite: now, to the microsecond (CURRENT_TIMESTAMP has whole seconds,
    too coarse for `balance --at`); the database's own default elsewhere."""
    return datetime.now(UTC) if conn.dialect.name == "sqlite" else None


def leg_times(conn: Connection, count: int) -> dict[str, list[datetime]]:
    """`leg_time` as the column of `count` rows inserted at once (none: the default)."""
    at = leg_time(conn)
    return {} if at is None else {"created_at": [at] * count}


_UPDATE_FROM_ARRAYS = text(
    "UPDATE accounts SET balance_minor = accounts.balance_minor + v.delta "
    "FROM unnest(CAST(:ids AS BIGINT[]), CAST(:deltas AS BIGINT[])) AS v(id, delta) "
    "WHERE accounts.id = v.id"
)


#: A balance is a signed 64-bit integer (PostgreSQL's BIGINT refuses more; SQLite would
#: silently store a REAL instead, so its new balances are checked here first).
BALANCE_MIN, BALANCE_MAX = -(2**63), 2**63 - 1


def _check_sqlite_range(conn: Connection, items: Sequence[tuple[int, int]]) -> None:
    a = schema.accounts
    found = dict(conn.execute(select(a.c.id, a.c.balance_minor)
                              .where(a.c.id.in_([i for i, _ in items]))).all())
    for account_id, delta in items:
        balance = found.get(account_id)
        if balance is None:
            continue
        if not isinstance(balance, int) or not BALANCE_MIN <= balance + delta <= BALANCE_MAX:
            raise TransactionIntegrityError(
                f"account {account_id}: balance {balance!r} + {delta} leaves the signed 64-bit "
                "range; nothing written", account_id=account_id)


def write_deltas(conn: Connection, deltas: Mapping[int, int]) -> None:
    """Add each delta to its account now, in ascending id order: what
    `apply_balance_deltas` does outside a book, and a book's flush on SQLite."""
    items = sorted((account_id, delta) for account_id, delta in deltas.items() if delta)
    if not items:
        return
    a = schema.accounts
    if conn.dialect.name == "sqlite":
        _check_sqlite_range(conn, items)
    if conn.dialect.name == "postgresql" and len(items) > 1:
        # One statement (one round trip) for both legs of a transfer or a payout chunk's
        # many accounts, its text the same whatever their number: two arrays unnested.
        # (A VALUES list of 500 rows costs SQLAlchemy ~0.1 s to compile, every time.)
        conn.execute(_UPDATE_FROM_ARRAYS, {"ids": [i for i, _ in items],
                                           "deltas": [d for _, d in items]})
        return
    conn.execute(
        update(a)
        .where(a.c.id == bindparam("b_id"))
        .values(balance_minor=a.c.balance_minor + bindparam("b_delta")),
        [{"b_id": account_id, "b_delta": delta} for account_id, delta in items],
    )


_UPDATE_RETURNING = text(
    "UPDATE accounts SET balance_minor = accounts.balance_minor + v.delta "
    "FROM unnest(CAST(:ids AS BIGINT[]), CAST(:deltas AS BIGINT[])) AS v(id, delta) "
    "WHERE accounts.id = v.id RETURNING accounts.id, accounts.balance_minor"
)


def write_deltas_returning(conn: Connection, deltas: Mapping[int, int]) -> dict[int, int]:
    """`write_deltas` (outside a book), returning each account's new balance."""
    items = sorted((account_id, delta) for account_id, delta in deltas.items() if delta)
    if not items:
        return {}
    if conn.dialect.name == "postgresql":
        rows = conn.execute(_UPDATE_RETURNING, {"ids": pg_array([i for i, _ in items]),
                                                "deltas": pg_array([d for _, d in items])})
        return {account_id: balance for account_id, balance in rows}
    write_deltas(conn, deltas)
    a = schema.accounts
    rows = conn.execute(select(a.c.id, a.c.balance_minor).where(
        a.c.id.in_([i for i, _ in items])))
    return {account_id: balance for account_id, balance in rows}
