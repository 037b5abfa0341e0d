"""Balances at a moment and statements, read from the balance each leg recorded after it.

Every transfer carries its debit's and its credit's balance after it (services.ledger), so
an account's balance at a moment is the balance after its last leg at or before it: two
index probes (`ix_transfers_debit_account_at`, `ix_transfers_credit_account_at`), never a
sum over history. A leg's time is when it was written, under its account's lock, so an
account's legs follow their id order in time too. Times are UTC. Reads only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.engine import Connection

from services import schema
from services.errors import TransactionIntegrityError, UnknownUserError

__all__ = ["account_id", "balance_at", "Movement", "Statement", "statement", "movements",
           "parse_moment", "as_row", "STATEMENT_MOVEMENTS_MAX"]

#: A statement lists at most this many movements (a longer period: several statements).
STATEMENT_MOVEMENTS_MAX = 100_000


def parse_moment(value: str) -> datetime:
    """An ISO 8601 time; without an offset it is UTC. ValueError if it is not one."""
    moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


def _bind(conn: Connection, moment: datetime) -> datetime:
    # SQLite keeps naive UTC texts: compare with one.
    return moment.replace(tzinfo=None) if conn.dialect.name == "sqlite" else moment


def account_id(conn: Connection, code: str) -> int:
    a = schema.accounts
    found = conn.execute(select(a.c.id).where(a.c.code == code)).scalar_one_or_none()
    if found is None:
        raise UnknownUserError(f"no account {code!r}", account=code)
    return int(found)


def balance_at(conn: Connection, account: int, moment: datetime, *, before: bool = False
               ) -> int:
    """The balance after the account's last leg at (or, `before`, strictly before) the
    moment; zero before its first leg."""
    t = schema.transfers
    at = _bind(conn, moment)
    last: tuple[int, int] | None = None
    for column, after in ((t.c.debit_account_id, t.c.debit_balance_after_minor),
                          (t.c.credit_account_id, t.c.credit_balance_after_minor)):
        when = t.c.created_at < at if before else t.c.created_at <= at
        row = conn.execute(select(t.c.id, after).where(and_(column == account, when))
                           .order_by(t.c.created_at.desc(), t.c.id.desc()).limit(1)).first()
        if row is not None and (last is None or row[0] > last[0]):
            last = (row[0], row[1])
    if last is not None and last[1] is None:
        raise TransactionIntegrityError(f"transfer {last[0]} has no balance after it")
    return 0 if last is None else last[1]


@dataclass(frozen=True)
class Movement:
    transfer_id: int
    at: datetime
    kind: str
    amount_minor: int  # signed from the account's side
    counterparty: str
    idempotency_key: str
    balance_after_minor: int


@dataclass(frozen=True)
class Statement:
    account: str
    start: datetime
    end: datetime
    opening_minor: int
    movements: list[Movement]
    closing_minor: int

    @property
    def balanced(self) -> bool:
        """Opening + movements = closing, and each movement follows from the one before."""
        running = self.opening_minor
        for movement in self.movements:
            running += movement.amount_minor
            if running != movement.balance_after_minor:
                return False
        return running == self.closing_minor


def movements(conn: Connection, account: int, start: datetime, end: datetime,
              limit: int = STATEMENT_MOVEMENTS_MAX) -> Iterator[Movement]:
    """The account's legs in [start, end), oldest first."""
    t, a, c = schema.transfers, schema.accounts, schema.commands
    debit, credit = a.alias("debit"), a.alias("credit")
    rows = conn.execute(
        select(t.c.id, t.c.created_at, t.c.kind, t.c.amount_minor, t.c.debit_account_id,
               debit.c.code, credit.c.code, t.c.debit_balance_after_minor,
               t.c.credit_balance_after_minor, c.c.idempotency_key)
        .join(debit, debit.c.id == t.c.debit_account_id)
        .join(credit, credit.c.id == t.c.credit_account_id)
        .join(c, c.c.id == t.c.command_id)
        .where((t.c.debit_account_id == account) | (t.c.credit_account_id == account))
        .where(t.c.created_at >= _bind(conn, start), t.c.created_at < _bind(conn, end))
        .order_by(t.c.created_at, t.c.id).limit(limit))
    for row in rows:
        out = row.debit_account_id == account
        after = row.debit_balance_after_minor if out else row.credit_balance_after_minor
        moment = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
        yield Movement(row.id, moment, row.kind, -row.amount_minor if out else row.amount_minor,
                       row[6] if out else row[5], row.idempotency_key, after)


def statement(conn: Connection, code: str, start: datetime, end: datetime) -> Statement:
    """Opening balance (before `start`), each movement in [start, end), closing balance."""
    if end <= start:
        raise ValueError("the statement's end must come after its start")
    account = account_id(conn, code)
    opening = balance_at(conn, account, start, before=True)
    listed = list(movements(conn, account, start, end, STATEMENT_MOVEMENTS_MAX + 1))
    if len(listed) > STATEMENT_MOVEMENTS_MAX:
        raise ValueError(f"more than {STATEMENT_MOVEMENTS_MAX} movements: ask for a shorter "
                         "period")
    closing = listed[-1].balance_after_minor if listed else opening
    return Statement(code, start, end, opening, listed, closing)


def as_row(movement: Movement) -> dict[str, Any]:
    return {"transfer_id": movement.transfer_id, "at": movement.at, "kind": movement.kind,
            "amount_minor": movement.amount_minor, "counterparty": movement.counterparty,
            "idempotency_key": movement.idempotency_key,
            "balance_after_minor": movement.balance_after_minor}
