"""The book of one transaction (the lean path): what it locked and posted, written at its end.

Inside `deferred(conn)` (the executor's lean path) the ledger's calls write nothing at
once: a `Book` remembers the rows locked in this transaction (a second lock of the same
account costs no statement) and the balance changes and transfers posted, checked under
the lock as always; `Book.flush` writes them all at the end of the transaction in one
statement, and `Book.rollback_to` forgets what a refused command posted
(docs/ARCHITECTURE.md, "The lean path and coalescing"). The owner of another row the
transaction locked (a hold) keeps it here too (`keep`, `kept`) and sends its writes with
the flush (`defer`).

Hot accounts read, not locked, while the transaction works have their legs written once,
at the end, in the flush, which locks them last (after every user account, in id order)
and so holds their lock only through the commit. A debit that the locked row can no
longer cover by then fails the CHECK constraint: `HotAccountShort`, and the caller applies
the command again with its hot accounts locked first (docs/ARCHITECTURE.md, "Hot
accounts").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sqlalchemy import text
from sqlalchemy.engine import Connection

from services import schema
from services.bulk_sql import Deferred, Pending, insert_rows, pg_array
from services.errors import TransactionIntegrityError
from services.ledger_accounts import LockedAccount
from services.ledger_writes import Transfer, leg_times, write_deltas

__all__ = [
    "Book",
    "BookMark",
    "HotAccountShort",
    "book_of",
    "keep",
    "kept",
    "defer",
    "current_book",
    "deferred",
]


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

    def flush_pending(self, conn: Connection, before_hot: Sequence[Pending] = ()
                      ) -> list[Pending]:
        """`flush` as statements to send (bulk_sql.execute_together); on SQLite, written now.
        Other owners' deferred writes come first, in the order they were made, then
        `before_hot` (writes that lock no account: they are done before the hot accounts'
        locks are taken, which are then held only through the legs and the commit)."""
        deltas, transfers, writes = self.deltas(), self.transfers, _built(self.writes)
        self.journal, self.transfers, self.writes = [], [], []
        if conn.dialect.name != "postgresql" or not transfers:
            for write in writes:
                conn.execute(write.statement, write.params)
            _write_now(conn, deltas, transfers)
            return list(before_hot)
        columns = list(zip(*transfers, strict=True))
        # Every hot account a leg names is locked, even when its legs net to zero: the
        # balance after each leg is read under that lock.
        legs = set(columns[1]) | set(columns[2])
        hot = [account_id for account_id in self.hot_ids() if account_id in legs]
        # Each leg's balance after it is computed by _FLUSH itself, from the balances it
        # reads under the locks (a hot account read, not locked, is exact only there).
        lock_hot = [Pending(_LOCK_HOT, {"ids": pg_array(hot)}, reusable=True)] if hot else []
        return [*writes, *before_hot, *lock_hot, Pending(_FLUSH, {
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
# A leg's two balances are gathered by grouping its two rows, never by joining `run` to
# itself: the planner, which cannot see into the arrays, nests such a join (each leg
# scanning every leg: 5 ms of a 100-release batch's 7).
_FLUSH = text(
    "WITH moved AS (UPDATE accounts SET balance_minor = accounts.balance_minor + v.delta "
    "FROM unnest(CAST(:ids AS BIGINT[]), CAST(:deltas AS BIGINT[])) AS v(id, delta) "
    "WHERE accounts.id = v.id), "
    "before AS (SELECT id, balance_minor FROM accounts WHERE id IN (SELECT unnest(CAST("
    ":debits AS BIGINT[])) UNION SELECT unnest(CAST(:credits AS BIGINT[])))), "
    "t AS (SELECT * FROM unnest(CAST(:commands AS BIGINT[]), CAST(:debits AS BIGINT[]), "
    "CAST(:credits AS BIGINT[]), CAST(:amounts AS BIGINT[]), CAST(:kinds AS TEXT[])) "
    "WITH ORDINALITY AS t(command_id, debit, credit, amount, kind, n)), "
    "legs AS (SELECT n, 0 AS side, debit AS account_id, -amount AS delta, command_id, debit, "
    "credit, amount, kind FROM t "
    "UNION ALL SELECT n, 1, credit, amount, command_id, debit, credit, amount, kind FROM t), "
    "run AS (SELECT legs.*, b.balance_minor + SUM(delta) OVER (PARTITION BY account_id "
    "ORDER BY n, side ROWS UNBOUNDED PRECEDING) AS after FROM legs "
    "JOIN before b ON b.id = legs.account_id) "
    "INSERT INTO transfers (command_id, debit_account_id, credit_account_id, amount_minor, kind, "
    "debit_balance_after_minor, credit_balance_after_minor, created_at) "
    "SELECT command_id, debit, credit, amount, kind, MAX(after) FILTER (WHERE side = 0), "
    "MAX(after) FILTER (WHERE side = 1), clock_timestamp() FROM run "
    "GROUP BY n, command_id, debit, credit, amount, kind ORDER BY n")


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


def book_of(conn: Connection) -> Book | None:
    """The book `deferred` opened on this connection, or None: the ledger writes at once."""
    current = _BOOK.get()
    return current[1] if current is not None and current[0] is conn else None


def keep(conn: Connection, table: str, key: str, row: Any) -> None:
    """Remember a row this transaction locked (or changed), when a book is open."""
    book = book_of(conn)
    if book is not None:
        book.kept[(table, key)] = row


def kept(conn: Connection, table: str, key: str) -> Any:
    """A row `keep` remembered in this transaction, or None."""
    book = book_of(conn)
    return None if book is None else book.kept.get((table, key))


def defer(conn: Connection, write: Pending | Deferred) -> bool:
    """Send this write with the book's flush (True), or nothing (False: no book is open,
    the caller writes now). For the owner of a row the transaction locked already."""
    book = book_of(conn)
    if book is None:
        return False
    book.writes.append(write)
    return True


def current_book(conn: Connection) -> Book:
    """The book `deferred` opened on this connection (a bug if there is none)."""
    book = book_of(conn)
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
