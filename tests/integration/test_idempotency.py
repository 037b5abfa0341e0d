"""Idempotency: same key + same payload → the stored outcome, never a second effect;
same key + another payload → idempotency_conflict, the first command untouched."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from services import command_store
from services.atomic_transaction_manager import (
    IdempotencyConflictError,
    InsufficientBalanceError,
    InvalidCommandError,
    atomic_financial_operation,
)
from services.command_executor import execute_command
from services.settings import Settings
from services.wallet_service import WalletService
from tests.support.ledger import assert_ledger_sound, audit, balances, record, transfers
from tests.support.signing import prepared, signed

THREADS = 20
CREDIT = {"type": "credit_wallet", "idempotency_key": "dep-81", "user": "alice", "amount": "10.00"}


def all_at_once(call: Callable[[int], Any], threads: int = THREADS) -> list[Any]:
    """Run call(i) in `threads` threads released together; each returns its value or its error."""
    barrier = threading.Barrier(threads)

    def one(i: int) -> Any:
        barrier.wait()
        try:
            return call(i)
        except Exception as exc:  # the outcome under test, compared below
            return exc

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(threads)))


def outcome(rec: Any) -> str:
    return json.dumps([rec.idempotency_key, rec.status, rec.result, rec.error], sort_keys=True)


def test_twenty_threads_submitting_the_same_credit_at_once_make_one_effect(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    results = all_at_once(lambda _: service.execute(dict(CREDIT)))
    assert not [r for r in results if isinstance(r, Exception)], results
    assert {outcome(r) for r in results} == {outcome(record(engine, "dep-81"))}
    assert results[0].status == "succeeded"
    assert transfers(engine, "dep-81") == [("system:external", "user:alice:available", 1000, "credit")]
    assert balances(engine)["user:alice:available"] == 1000
    assert len(audit(engine, "dep-81")) == 1
    assert_ledger_sound(engine, settings)


def test_twenty_threads_releasing_the_same_hold_under_one_key_pay_once(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    service.credit_wallet("alice", "50.00", idempotency_key="dep")
    service.transfer_to_escrow("o-1", "alice", "bob", "30.00", idempotency_key="hold")
    results = all_at_once(lambda _: service.release_from_escrow("o-1", idempotency_key="done"))
    assert all(r == results[0] for r in results), results
    assert results[0]["payee_amount"] == "27.00" and results[0]["fee"] == "3.00"
    assert [leg[2] for leg in transfers(engine, "done")] == [2700, 300]
    assert balances(engine)["user:bob:available"] == 2700
    assert_ledger_sound(engine, settings)


def test_twenty_threads_submitting_the_same_refused_command_all_get_the_same_refusal(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    service.credit_wallet("alice", "5.00", idempotency_key="dep")
    command = {"type": "debit_wallet", "idempotency_key": "wd", "user": "alice", "amount": "6.00"}
    results = all_at_once(lambda _: service.execute(dict(command)))
    assert {outcome(r) for r in results} == {outcome(record(engine, "wd"))}
    assert results[0].status == "rejected" and results[0].error["code"] == "insufficient_balance"
    assert len(audit(engine, "wd")) == 1
    assert_ledger_sound(engine, settings)


def test_twenty_threads_with_one_key_and_twenty_payloads_leave_one_winner_and_nineteen_conflicts(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    results = all_at_once(lambda i: service.execute({**CREDIT, "amount": f"{i + 1}.00"}))
    winners = [r for r in results if not isinstance(r, Exception)]
    conflicts = [r for r in results if isinstance(r, IdempotencyConflictError)]
    assert len(winners) == 1 and len(conflicts) == THREADS - 1, results
    paid = int(winners[0].result["amount"].split(".")[0]) * 100
    assert transfers(engine, "dep-81") == [("system:external", "user:alice:available", paid, "credit")]
    assert_ledger_sound(engine, settings)


def test_a_duplicate_gets_the_stored_outcome_without_a_second_effect_or_attempt(
    service: WalletService, engine: Engine
) -> None:
    first = service.execute(dict(CREDIT))
    again = service.execute(dict(CREDIT))
    assert again == first
    assert record(engine, "dep-81").attempts == 1
    assert len(transfers(engine, "dep-81")) == 1 and len(audit(engine, "dep-81")) == 1


def test_an_amount_written_differently_is_the_same_payload(
    service: WalletService, engine: Engine
) -> None:
    first = service.execute({**CREDIT, "amount": "10.00"})
    assert service.execute({**CREDIT, "amount": "10.0"}) == first
    assert service.execute({**CREDIT, "amount": "10"}) == first
    assert service.execute(dict(reversed(list(CREDIT.items())))) == first
    assert len(transfers(engine, "dep-81")) == 1


@pytest.mark.parametrize(
    "other",
    [{**CREDIT, "amount": "10.01"},
     {**CREDIT, "user": "bob"},
     {**CREDIT, "memo": "a different memo"},
     {"type": "debit_wallet", "idempotency_key": "dep-81", "user": "alice", "amount": "10.00"}],
    ids=["amount", "user", "memo", "type"],
)
def test_the_same_key_with_another_payload_is_a_conflict_and_the_first_is_untouched(
    service: WalletService, engine: Engine, other: dict[str, Any]
) -> None:
    service.execute(dict(CREDIT))
    first = record(engine, "dep-81")
    before = (balances(engine), transfers(engine), audit(engine, "dep-81"))
    with pytest.raises(IdempotencyConflictError) as caught:
        service.execute(other)
    assert caught.value.code == "idempotency_conflict"
    assert caught.value.ids == {"idempotency_key": "dep-81"}
    assert "another payload" in caught.value.message
    assert record(engine, "dep-81") == first  # status, payload, attempts, timestamps: all as before
    assert (balances(engine), transfers(engine), audit(engine, "dep-81")) == before


def test_a_conflict_with_a_command_still_processing_leaves_it_processing(
    service: WalletService, engine: Engine
) -> None:
    with atomic_financial_operation(engine) as conn:
        command_store.claim(conn, *prepared(CREDIT))
    claimed = record(engine, "dep-81")
    with pytest.raises(IdempotencyConflictError):
        service.execute({**CREDIT, "amount": "99.00"})
    assert record(engine, "dep-81") == claimed and claimed.status == "processing"


def test_a_rejected_command_replayed_returns_the_stored_rejection_even_when_it_would_now_succeed(
    service: WalletService, engine: Engine
) -> None:
    service.credit_wallet("alice", "5.00", idempotency_key="dep")
    with pytest.raises(InsufficientBalanceError):
        service.debit_wallet("alice", "8.00", idempotency_key="wd")
    rejected = record(engine, "wd")
    service.credit_wallet("alice", "100.00", idempotency_key="dep-2")  # now 105.00 would cover it
    with pytest.raises(InsufficientBalanceError) as caught:
        service.debit_wallet("alice", "8.00", idempotency_key="wd")
    assert caught.value.message == rejected.error["message"]  # type: ignore[index]
    assert record(engine, "wd") == rejected
    assert transfers(engine, "wd") == [] and len(audit(engine, "wd")) == 1
    assert balances(engine)["user:alice:available"] == 10500


def test_a_command_left_processing_by_a_crash_is_applied_once_when_run_again(
    service: WalletService, engine: Engine
) -> None:
    with atomic_financial_operation(engine) as conn:
        command_store.claim(conn, *prepared(CREDIT))  # claimed, then the worker died
    rec = execute_command(signed(CREDIT), engine=engine, settings=service.settings)
    assert rec.status == "succeeded" and rec.attempts == 2
    assert len(transfers(engine, "dep-81")) == 1
    assert execute_command(signed(CREDIT), engine=engine, settings=service.settings) == rec


def test_an_invalid_command_records_nothing(service: WalletService, engine: Engine) -> None:
    with pytest.raises(InvalidCommandError):
        service.execute({**CREDIT, "amount": "0"})
    with pytest.raises(InvalidCommandError):
        service.execute('{"type": "credit_wallet", "idempotency_key": "dep-81", "user": "alice",'
                        ' "amount": 10.00}')
    assert balances(engine) == {}
    with engine.connect() as conn:
        assert command_store.get_record(conn, "dep-81") is None


def test_the_record_an_execution_returns_is_the_row_as_stored(service: WalletService,
                                                               engine: Engine) -> None:
    """The outcomes' UPDATE returns nothing: the record handed back is built from the row as
    locked and what was written, and must be the stored row, field for field."""
    service.credit_wallet("ann", "5.00", idempotency_key="c-1")
    for command in ({"type": "transfer_tokens_between_users", "idempotency_key": "t-1",
                     "from_user": "ann", "to_user": "bob", "amount": "1.25"},
                    {"type": "transfer_tokens_between_users", "idempotency_key": "t-2",
                     "from_user": "ann", "to_user": "bob", "amount": "99.00"}):
        returned = service.execute(command)
        with engine.connect() as conn:
            stored = command_store.get_record(conn, command["idempotency_key"])
        assert stored is not None and returned == stored


def test_finishing_a_command_that_already_ended_is_a_bug_that_writes_nothing(
        service: WalletService, engine: Engine) -> None:
    service.credit_wallet("ann", "1.00", idempotency_key="k-1")
    with engine.connect() as conn:
        ended = command_store.get_record(conn, "k-1")
    assert ended is not None and ended.status == "succeeded"
    again = command_store.Finish(ended, "rejected", None,
                                 {"code": "internal", "message": "twice"}, 1)
    with pytest.raises(AssertionError, match="finished twice"), engine.begin() as conn:
        command_store.finish_many(conn, [again])
    with engine.connect() as conn:
        assert command_store.get_record(conn, "k-1") == ended
