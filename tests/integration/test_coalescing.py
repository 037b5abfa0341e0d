"""Coalescing changes nothing observable: commands applied together in one transaction each
get exactly their own outcome, audit row and transfers, as if each had run alone.

The batches here are the ones a worker makes: a bulk producer's chunk of keys
(`execute_keys_message`), and a single command's message that takes other untouched
commands waiting (`execute_message`). The deadlock is a real one, made by a second
connection; the killed worker's command is one it claimed before dying.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine

from services import command_store
from services.admission import Admitted, admit
from services.db import for_transactions
from services.message_policy import Done, execute_keys_message, execute_message
from services.outbox import record_accepted_many
from services.settings import Settings
from services.signing import new_private_key
from services.wallet_service import WalletService
from tests.support.ledger import assert_ledger_sound, audit, balances, record, transfers
from tests.support.signing import prepared, signed


def transfer(key: str, payer: str, payee: str, amount: str) -> dict[str, Any]:
    return {"type": "transfer_tokens_between_users", "idempotency_key": key,
            "from_user": payer, "to_user": payee, "amount": amount}


def accept(engine: Engine, settings: Settings, *commands: dict[str, Any]) -> None:
    """Record commands `accepted`, untouched, as WalletClient.submit_many does."""
    parsed = [prepared(command) for command in commands]
    answers = record_accepted_many(parsed, engine=engine, settings=settings)
    assert all(not isinstance(a, Exception) and a.created for a in answers), answers


def admitted(engine: Engine, settings: Settings, command: dict[str, Any]) -> Admitted:
    admission = admit(signed(command), engine=engine, settings=settings)
    assert isinstance(admission, Admitted)
    return admission


def final_audits(engine: Engine, key: str) -> list[dict[str, Any]]:
    """The audit rows of the command under `key` that record an outcome (a refused message
    under its key has one too, with no command)."""
    return [row for row in audit(engine, key) if row["command_id"] is not None
            and row["outcome"] in ("succeeded", "rejected", "failed", "refused")]


@pytest.fixture
def funded(service: WalletService) -> WalletService:
    service.admin_create_tokens("1000.00", idempotency_key="mint")
    for user in ("alice", "bob", "carol"):
        service.admin_sell_tokens_to_user(user, "100.00", idempotency_key=f"sale-{user}")
    return service


class DeadlockMaker:
    """A second connection that starts a hold the batch is about to open (so the batch's
    insert waits on it), then asks for an account the batch holds: a real deadlock, which
    PostgreSQL breaks by aborting the batch's statement (it waited first)."""

    def __init__(self, engine: Engine, hold_id: str, account: str, opened_by: int) -> None:
        self.engine, self.hold_id, self.account, self.opened_by = engine, hold_id, account, opened_by
        self.holding = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SET deadlock_timeout = '20s'"))  # the batch detects it
                conn.execute(text(
                    "INSERT INTO holds (hold_id, payer, payee, amount_minor, status, fee_rate, "
                    "opened_by) VALUES (:h, 'x', 'y', 1, 'held', '0.10', :c)"),
                    {"h": self.hold_id, "c": self.opened_by})
                self.holding.set()
                self.release.wait(30)
                conn.execute(text("SELECT id FROM accounts WHERE code = :a FOR UPDATE"),
                             {"a": self.account})
                conn.rollback()  # the hold it started never existed
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.holding.set()


def waiting_on_a_lock(engine: Engine) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'walletq' AND wait_event_type = 'Lock'")).scalar_one())


def eventually(condition: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_batch_with_refusals_conflicts_duplicates_a_deadlock_and_a_killed_workers_command(
    funded: WalletService, engine: Engine, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # Applied before: its duplicate in the batch gets its stored outcome, nothing more.
    funded.transfer_tokens_between_users("alice", "bob", "1.00", idempotency_key="k-dup")
    # A worker claimed this one (its delivery counted, `processing`) and died.
    killed = transfer("k-killed", "carol", "alice", "3.00")
    command, form = prepared(killed)
    with engine.begin() as conn:
        command_store.claim(conn, command, form)
    batch = [
        transfer("k-ok-1", "alice", "bob", "10.00"),
        transfer("k-ok-2", "bob", "carol", "20.00"),
        transfer("k-ok-3", "carol", "dave", "5.00"),  # opens dave's wallet
        transfer("k-poor", "alice", "bob", "500.00"),  # insufficient balance
        {"type": "debit_wallet", "idempotency_key": "k-nouser", "user": "zed", "amount": "1.00"},
        {"type": "release_from_escrow", "idempotency_key": "k-nohold", "hold_id": "nope"},
        {"type": "transfer_to_escrow", "idempotency_key": "k-hold", "hold_id": "H1",
         "payer": "bob", "payee": "carol", "amount": "7.00"},  # hits the deadlock
    ]
    accept(engine, settings, *batch)
    # A conflicting replay of k-ok-1 is refused; the row keeps its own payload. (Delivered
    # to a worker that coalesces nothing, so the batch below is still waiting.)
    conflict = execute_message((signed(transfer("k-ok-1", "alice", "bob", "99.00")),), {},
                               engine=engine, settings=dataclasses.replace(settings, coalesce_max=1),
                               retries_left=True)
    assert isinstance(conflict, Done) and conflict.refusal is not None
    assert conflict.refusal["code"] == "idempotency_conflict"
    # A row written behind walletq's back, signed by nobody's key: refused in the batch.
    forged = transfer("k-forged", "bob", "alice", "50.00")
    with engine.begin() as conn:
        command_store.accept(conn, *prepared(forged))
        conn.execute(text("UPDATE commands SET signature = :s WHERE idempotency_key = 'k-forged'"),
                     {"s": signed(forged, key=new_private_key())["signature"]})

    maker = DeadlockMaker(engine, "H1", "user:bob:available", record(engine, "mint").id)
    maker.thread.start()
    assert maker.holding.wait(10) and maker.error is None
    keys = [c["idempotency_key"] for c in batch] + ["k-dup", "k-killed", "k-forged", "k-ok-1"]
    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: outcome.append(execute_keys_message(
        (keys,), {}, engine=engine, settings=settings, retries_left=True)))
    worker.start()
    eventually(lambda: waiting_on_a_lock(engine))  # the batch waits on the hold H1
    maker.release.set()  # ... and the maker now waits on bob's account: a deadlock
    worker.join(60)
    maker.thread.join(60)
    assert not worker.is_alive() and maker.error is None
    left = [r.getMessage() for r in caplog.records if "left out of its batch" in r.getMessage()]
    assert len(left) == 1 and left[0].startswith("k-hold") and "deadlock detected" in left[0]

    # The killed worker's message comes back, redelivered: it ends once, here.
    again = execute_message((signed(killed),), {}, engine=engine, settings=settings,
                            retries_left=True, redelivered=True)
    assert isinstance(again, Done) and again.record is not None
    assert again.record.status == "succeeded" and again.record.attempts == 2

    expected = {
        "k-ok-1": ("succeeded", None, [("user:alice:available", "user:bob:available", 1000)]),
        "k-ok-2": ("succeeded", None, [("user:bob:available", "user:carol:available", 2000)]),
        "k-ok-3": ("succeeded", None, [("user:carol:available", "user:dave:available", 500)]),
        "k-poor": ("rejected", "insufficient_balance", []),
        "k-nouser": ("rejected", "unknown_user", []),
        "k-nohold": ("rejected", "unknown_hold", []),
        "k-hold": ("succeeded", None, [("user:bob:available", "user:bob:escrow", 700)]),
        "k-dup": ("succeeded", None, [("user:alice:available", "user:bob:available", 100)]),
        "k-killed": ("succeeded", None, [("user:carol:available", "user:alice:available", 300)]),
        "k-forged": ("rejected", "unauthenticated", []),
    }
    for key, (status, code, moved) in expected.items():
        found = record(engine, key)
        assert (found.status, found.error_code) == (status, code), key
        assert [t[:3] for t in transfers(engine, key)] == moved, key
        audits = final_audits(engine, key)
        assert [(a["outcome"], a["error_code"]) for a in audits] == [(status, code)], key
    assert record(engine, "k-hold").attempts == 1  # left by the batch, then run alone once
    refused = [row for row in audit(engine, "k-ok-1") if row["command_id"] is None]
    assert [(row["outcome"], row["error_code"]) for row in refused] == \
        [("refused", "idempotency_conflict")]
    assert balances(engine)["user:bob:escrow"] == 700
    assert_ledger_sound(engine, settings)


def test_a_single_commands_message_takes_the_untouched_commands_waiting_with_it(
    funded: WalletService, engine: Engine, settings: Settings
) -> None:
    waiting = [transfer(f"w-{i}", "alice", "bob", "1.00") for i in range(5)]
    accept(engine, settings, *waiting)
    trigger = transfer("w-trigger", "bob", "carol", "2.00")
    accept(engine, settings, trigger)
    outcome = execute_message((signed(trigger),), {}, engine=engine,
                              settings=dataclasses.replace(settings, coalesce_max=4),
                              retries_left=True)
    assert isinstance(outcome, Done) and outcome.record is not None
    assert outcome.record.status == "succeeded"
    ended = [record(engine, c["idempotency_key"]).status for c in waiting]
    assert ended == ["succeeded"] * 3 + ["accepted"] * 2  # the 3 oldest, then the bound
    # Their own messages, when they arrive, find them ended: one read, no second effect.
    for command in waiting[:3]:
        again = execute_message((signed(command),), {}, engine=engine, settings=settings,
                                retries_left=True)
        assert isinstance(again, Done) and again.record is not None
        assert again.record.status == "succeeded"
        assert len(transfers(engine, command["idempotency_key"])) == 1
        assert len(final_audits(engine, command["idempotency_key"])) == 1
    assert_ledger_sound(engine, settings)


@pytest.fixture
def statements(engine: Engine) -> Iterator[list[str]]:
    seen: list[str] = []

    def count(_conn: Connection, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    engines = {engine, for_transactions(engine)}  # reads, and the retried transactions
    for each in engines:
        event.listen(each, "before_cursor_execute", count)
    yield seen
    for each in engines:
        event.remove(each, "before_cursor_execute", count)


def test_the_message_of_a_command_a_batch_applied_costs_one_indexed_read(
    funded: WalletService, engine: Engine, settings: Settings, statements: list[str]
) -> None:
    command = transfer("d-1", "alice", "bob", "1.00")
    accept(engine, settings, command)
    execute_keys_message((["d-1"],), {}, engine=engine, settings=settings, retries_left=True)
    assert record(engine, "d-1").status == "succeeded"
    statements.clear()
    again = execute_message((signed(command),), {}, engine=engine, settings=settings,
                            retries_left=True)
    assert isinstance(again, Done) and again.record is not None
    assert again.record.status == "succeeded"
    assert len(statements) == 1 and "idempotency_key" in statements[0]


def test_rows_another_transaction_holds_are_skipped_not_waited_for(
    funded: WalletService, engine: Engine, settings: Settings
) -> None:
    accept(engine, settings, *[transfer(f"s-{i}", "alice", "bob", "1.00") for i in range(3)])
    with engine.connect() as holder:
        holder.begin()
        assert command_store.lock(holder, "s-1") is not None
        execute_keys_message((["s-0", "s-1", "s-2"],), {}, engine=engine, settings=settings,
                             retries_left=True)
        assert [record(engine, f"s-{i}").status for i in range(3)] == \
            ["succeeded", "accepted", "succeeded"]
        holder.rollback()
    assert_ledger_sound(engine, settings)


def test_a_redelivered_chunk_of_keys_counts_each_delivery_before_applying_it(
    funded: WalletService, engine: Engine, settings: Settings
) -> None:
    accept(engine, settings, *[transfer(f"r-{i}", "alice", "bob", "1.00") for i in range(3)])
    execute_keys_message((["r-0", "r-1", "r-2"],), {}, engine=engine, settings=settings,
                         retries_left=True, redelivered=True)
    for i in range(3):
        found = record(engine, f"r-{i}")
        assert (found.status, found.attempts) == ("succeeded", 1)
    assert_ledger_sound(engine, settings)


def test_a_message_that_is_not_a_list_of_keys_is_refused_and_recorded(
    engine: Engine, settings: Settings
) -> None:
    for bad in ([], ["ok", 3], "k-1", [f"k-{i}" for i in range(1001)], ["bad key!"]):
        outcome = execute_keys_message((bad,), {}, engine=engine, settings=settings,
                                       retries_left=True)
        assert isinstance(outcome, Done) and outcome.refusal is not None
        assert outcome.refusal["code"] == "invalid_command"


def test_wallet_service_never_takes_other_commands_into_its_transaction(
    funded: WalletService, engine: Engine, settings: Settings
) -> None:
    accept(engine, settings, transfer("n-1", "alice", "bob", "1.00"))
    funded.transfer_tokens_between_users("bob", "carol", "1.00", idempotency_key="n-2")
    assert record(engine, "n-1").status == "accepted"
    assert record(engine, "n-2").status == "succeeded"


def test_a_batch_applies_its_commands_oldest_first_whichever_message_came_first(
    engine: Engine, settings: Settings
) -> None:
    mint = {"type": "admin_create_tokens", "idempotency_key": "o-mint", "amount": "50.00"}
    sale = {"type": "admin_sell_tokens_to_user", "idempotency_key": "o-sale", "user": "alice",
            "amount": "50.00"}
    accept(engine, settings, mint, sale)  # submitted in this order
    outcome = execute_message((signed(sale),), {}, engine=engine, settings=settings,
                              retries_left=True)  # the sale's message arrives first
    assert isinstance(outcome, Done) and outcome.record is not None
    assert outcome.record.status == "succeeded"
    assert record(engine, "o-mint").status == "succeeded"
    assert balances(engine)["user:alice:available"] == 5000
    assert_ledger_sound(engine, settings)


def test_a_batch_writes_each_hold_it_changed_once_as_it_ends_up(
    funded: WalletService, engine: Engine, settings: Settings, statements: list[str]
) -> None:
    """Two partial releases and a refund of one hold, an over-release refused between them
    (its change undone), a release of another hold: one statement writes both holds."""
    for hold_id, payer in (("bh-1", "alice"), ("bh-2", "bob")):
        funded.transfer_to_escrow(hold_id, payer, "carol", "10.00",
                                  idempotency_key=f"open-{hold_id}")
    batch = [
        {"type": "release_from_escrow", "idempotency_key": "b-1", "hold_id": "bh-1",
         "amount": "3.00"},
        {"type": "release_from_escrow", "idempotency_key": "b-2", "hold_id": "bh-1",
         "amount": "8.00"},  # more than the 7.00 left: refused, changes nothing
        {"type": "release_from_escrow", "idempotency_key": "b-3", "hold_id": "bh-1",
         "amount": "2.00"},
        {"type": "refund_from_escrow", "idempotency_key": "b-4", "hold_id": "bh-1"},
        {"type": "release_from_escrow", "idempotency_key": "b-5", "hold_id": "bh-2"},
    ]
    accept(engine, settings, *batch)
    statements.clear()
    execute_keys_message(([c["idempotency_key"] for c in batch],), {}, engine=engine,
                         settings=settings, retries_left=True)
    assert [record(engine, c["idempotency_key"]).status for c in batch] == \
        ["succeeded", "rejected", "succeeded", "succeeded", "succeeded"]
    assert record(engine, "b-2").error["code"] == "hold_exceeded"
    hold_writes = [s for s in statements if "UPDATE holds" in s]
    assert len(hold_writes) == 1, hold_writes
    first, second = funded.hold("bh-1"), funded.hold("bh-2")
    assert (first["status"], first["released"], first["refunded"], first["remaining"]) == \
        ("refunded", Decimal("5.00"), Decimal("5.00"), Decimal("0.00"))
    assert (second["status"], second["released"], second["remaining"]) == \
        ("released", Decimal("10.00"), Decimal("0.00"))
    assert first["closed_at"] is not None and second["closed_at"] is not None
    with engine.connect() as conn:
        closers = dict(conn.execute(text(
            "SELECT h.hold_id, c.idempotency_key FROM holds h JOIN commands c "
            "ON c.id = h.closed_by WHERE h.hold_id IN ('bh-1', 'bh-2')")).all())
    assert closers == {"bh-1": "b-4", "bh-2": "b-5"}
    assert_ledger_sound(engine, settings)


def test_a_reversal_submitted_with_its_original_runs_once_the_original_succeeded(
    funded: WalletService, engine: Engine, settings: Settings
) -> None:
    """Coalesced together, the original's outcome is written only at the batch's end: the
    reversal is left out of the batch and runs alone after it, instead of being refused
    `not_reversible` for a command that was about to succeed."""
    batch = [transfer("o-1", "alice", "bob", "4.00"),
             {"type": "reverse_command", "idempotency_key": "rev-1", "original_key": "o-1",
              "reason": "charged twice"},
             transfer("o-2", "bob", "carol", "1.00")]
    before = balances(engine)
    accept(engine, settings, *batch)
    execute_keys_message((["o-1", "rev-1", "o-2"],), {}, engine=engine, settings=settings,
                         retries_left=True)
    assert [record(engine, key).status for key in ("o-1", "rev-1", "o-2")] == \
        ["succeeded"] * 3
    assert transfers(engine, "rev-1") == [("user:bob:available", "user:alice:available", 400,
                                           "reversal")]
    after = balances(engine)
    assert after["user:alice:available"] == before["user:alice:available"]
    assert after["user:bob:available"] == before["user:bob:available"] - 100
    assert [len(final_audits(engine, key)) for key in ("o-1", "rev-1", "o-2")] == [1, 1, 1]
    assert_ledger_sound(engine, settings)
