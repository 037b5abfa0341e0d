"""The ledger's book (services.ledger_book.Book): what a transaction posts is tracked in Python,
forgotten exactly when a refused command is rolled back, and summed per account for the
one write at the end."""

from __future__ import annotations

from services.ledger import Book, LockedAccount, make_transfer


def account(id_: int, balance: int, code: str | None = None) -> LockedAccount:
    return LockedAccount(id_, code or f"user:u{id_}:available", f"u{id_}", balance, False)


def test_postings_move_the_tracked_balances_and_sum_per_account() -> None:
    book = Book()
    a, b, c = account(1, 1000), account(2, 0), account(3, 50)
    book.remember({x.code: x for x in (a, b, c)})
    book.post(7, make_transfer(a, b, 300, "transfer"))
    book.post(8, make_transfer(b, c, 100, "transfer"))
    assert (a.balance_minor, b.balance_minor, c.balance_minor) == (700, 200, 150)
    assert book.deltas() == {1: -300, 2: 200, 3: 100}
    # Each with its accounts' balances after it (exact: both rows are locked).
    assert book.transfers == [(7, 1, 2, 300, "transfer", 700, 300),
                              (8, 2, 3, 100, "transfer", 200, 150)]


def test_rolling_back_to_a_mark_forgets_exactly_what_came_after_it() -> None:
    book = Book()
    a, b = account(1, 1000), account(2, 0)
    book.remember({a.code: a, b.code: b})
    book.post(7, make_transfer(a, b, 300, "transfer"))
    mark = book.mark()
    late = account(3, 5)
    book.remember({late.code: late})
    book.post(8, make_transfer(a, late, 200, "transfer"))
    book.add_deltas({9: 4})
    book.rollback_to(mark)
    assert (a.balance_minor, b.balance_minor, late.balance_minor) == (700, 300, 5)
    assert book.deltas() == {1: -300, 2: 300}
    assert book.transfers == [(7, 1, 2, 300, "transfer", 700, 300)]
    assert set(book.locked) == {a.code, b.code}  # what was locked after the mark is forgotten


def test_a_hot_account_read_and_not_locked_is_what_the_flush_locks() -> None:
    book = Book()
    treasury = LockedAccount(5, "platform:treasury", None, 100, False, exact=False)
    user = account(9, 0)
    book.remember({treasury.code: treasury, user.code: user})
    assert book.hot_ids() == [5] and book.read_hot
    treasury.exact = True  # locked there and then (Book.lock_exact)
    assert book.hot_ids() == [] and book.read_hot  # a reading was taken all the same


def test_a_leg_of_an_account_only_read_has_no_balance_after_until_the_flush() -> None:
    book = Book()
    treasury = LockedAccount(5, "platform:treasury", None, 100, False, exact=False)
    user = account(9, 0)
    book.post(3, make_transfer(treasury, user, 40, "sale"))
    assert book.transfers == [(3, 5, 9, 40, "sale", None, 40)]  # the flush computes it
