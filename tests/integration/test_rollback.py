"""Rollback: a failure part-way through leaves no trace; the database is the last line of defence."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from services import atomic_transaction_manager as atm
from services import ledger
from services.atomic_transaction_manager import (
    NegativeBalanceError,
    TransactionIntegrityError,
    atomic_financial_operation,
    current_connection,
    log_financial_operation,
)
from services.db import make_engine
from services.operations import escrow
from services.settings import Settings
from services.wallet_service import WalletService
from tests.support.ledger import (
    assert_ledger_sound,
    audit,
    balances,
    count,
    hold,
    record,
    transfers,
)


class Injected(RuntimeError):
    """The failure a test injects."""


def fail_on_call(monkeypatch: pytest.MonkeyPatch, n: int, error: BaseException) -> list[int]:
    """Make ledger._post_one raise `error` on its n-th call from now; returns the call log."""
    real = ledger._post_one
    calls: list[int] = []

    def post_one(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == n:
            raise error
        real(*args, **kwargs)

    monkeypatch.setattr(ledger, "_post_one", post_one)
    return calls


@pytest.fixture
def held(service: WalletService) -> WalletService:
    service.admin_create_tokens("100.00", idempotency_key="mint")
    service.admin_sell_tokens_to_user("alice", "20.00", idempotency_key="sale")
    service.transfer_to_escrow("o-1", "alice", "bob", "10.00", idempotency_key="hold")
    return service


def test_a_failure_after_the_first_leg_of_a_release_leaves_no_trace(
    held: WalletService, engine: Engine, monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    before = (balances(engine), transfers(engine), hold(engine, "o-1"), count(engine, "audit_events"))
    calls = fail_on_call(monkeypatch, 2, Injected("the fee leg failed"))
    with pytest.raises(Injected):
        held.release_from_escrow("o-1", fee_rate="0.10", idempotency_key="done")
    assert len(calls) == 2  # the payee leg was posted, then the fee leg failed
    assert (balances(engine), transfers(engine), hold(engine, "o-1"),
            count(engine, "audit_events")) == before
    assert hold(engine, "o-1")["status"] == "held"  # type: ignore[index]
    assert transfers(engine, "done") == []
    assert record(engine, "done").status == "processing"  # claimed, never succeeded
    assert audit(engine, "done") == []
    assert_ledger_sound(engine, settings)


def test_the_same_release_run_again_after_the_failure_succeeds_once(
    held: WalletService, engine: Engine, monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    fail_on_call(monkeypatch, 2, Injected("the fee leg failed"))
    with pytest.raises(Injected):
        held.release_from_escrow("o-1", idempotency_key="done")
    monkeypatch.undo()
    result = held.release_from_escrow("o-1", idempotency_key="done")
    assert (result["payee_amount"], result["fee"]) == ("9.00", "1.00")
    assert [leg[2] for leg in transfers(engine, "done")] == [900, 100]
    assert record(engine, "done").attempts == 2
    assert_ledger_sound(engine, settings)


def test_a_deadlock_on_the_second_leg_reruns_the_whole_transaction_once(
    held: WalletService, engine: Engine, monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    orig = Exception("deadlock detected")
    orig.pgcode = "40P01"  # type: ignore[attr-defined]
    deadlock = OperationalError("UPDATE accounts", {}, orig)
    retries_before = atm.retry_stats.retries
    calls = fail_on_call(monkeypatch, 2, deadlock)
    result = held.release_from_escrow("o-1", idempotency_key="done")
    assert len(calls) == 4  # legs 1, 2 (deadlock); then legs 1, 2 again
    assert atm.retry_stats.retries == retries_before + 1
    assert (result["payee_amount"], result["fee"]) == ("9.00", "1.00")
    assert [leg[2] for leg in transfers(engine, "done")] == [900, 100]  # no leg twice
    assert len(audit(engine, "done")) == 1
    assert_ledger_sound(engine, settings)


def test_a_failure_in_refund_after_the_leg_keeps_the_hold_open(
    held: WalletService, engine: Engine, monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    real_close = escrow._write_hold

    def close_then_fail(*args: Any, **kwargs: Any) -> None:
        real_close(*args, **kwargs)
        raise Injected("after the hold closed")

    monkeypatch.setattr(escrow, "_write_hold", close_then_fail)
    before = balances(engine)
    with pytest.raises(Injected):
        held.refund_from_escrow("o-1", idempotency_key="undo")
    assert balances(engine) == before and hold(engine, "o-1")["status"] == "held"  # type: ignore[index]
    assert_ledger_sound(engine, settings)


@pytest.mark.parametrize(
    ("operation", "args"),
    [("debit_wallet", ("alice", "20.01")),
     ("transfer_tokens_between_users", ("alice", "bob", "25.00")),
     ("transfer_to_escrow", ("o-2", "alice", "bob", "10.01")),
     ("user_sell_tokens_to_admin", ("alice", "99.00")),
     ("admin_sell_tokens_to_user", ("bob", "90.01"))],
)
def test_the_check_constraint_refuses_a_negative_balance_when_the_services_check_is_bypassed(
    held: WalletService, engine: Engine, monkeypatch: pytest.MonkeyPatch, operation: str,
    args: tuple[str, ...], settings: Settings,
) -> None:
    monkeypatch.setattr(ledger, "validate_balance_integrity", lambda **_: None)
    before = (balances(engine), transfers(engine), count(engine, "holds"))
    with pytest.raises(NegativeBalanceError) as caught:
        getattr(held, operation)(*args, idempotency_key="bad")
    assert "negative balance" in caught.value.message and "balance_nonnegative" in caught.value.message
    assert caught.value.code == "internal"
    assert isinstance(caught.value.__cause__, DBAPIError)
    assert (balances(engine), transfers(engine), count(engine, "holds")) == before
    assert record(engine, "bad").status == "processing"
    monkeypatch.undo()
    assert_ledger_sound(engine, settings)


@pytest.mark.parametrize("table", ["transfers", "audit_events"])
def test_transfers_and_audit_events_are_append_only(
    held: WalletService, engine: Engine, table: str
) -> None:
    rows_before = count(engine, table)
    assert rows_before > 0
    for statement in ("UPDATE {table} SET created_at = now()", "DELETE FROM {table}",
                      "DELETE FROM {table} WHERE id = (SELECT max(id) FROM {table})"):
        with pytest.raises(DBAPIError, match=f"{table} is append-only"), engine.begin() as conn:
            conn.execute(text(statement.format(table=table)))
    assert count(engine, table) == rows_before


def test_an_amount_cannot_be_edited_in_place(held: WalletService, engine: Engine, settings: Settings) -> None:
    with pytest.raises(DBAPIError, match="append-only; UPDATE refused"), engine.begin() as conn:
        conn.execute(text("UPDATE transfers SET amount_minor = amount_minor + 1"))
    assert_ledger_sound(engine, settings)


# --- atomic_financial_operation ---------------------------------------------------------


def _audit_row(conn: Any, key: str) -> None:
    log_financial_operation(conn, command_id=None, idempotency_key=key, command_type="probe",
                            outcome="succeeded")


def _probes(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(
            text("SELECT COUNT(*) FROM audit_events WHERE command_type = 'probe'")).scalar_one())


def test_a_nested_operation_joins_the_outer_transaction_and_commits_once_at_the_outermost(
    engine: Engine,
) -> None:
    with atomic_financial_operation(engine, "outer") as outer:
        _audit_row(outer, "outer")
        with atomic_financial_operation(engine, "inner") as inner:
            assert inner is outer and current_connection() is outer
            _audit_row(inner, "inner")
        assert outer.in_transaction()
        assert _probes(engine) == 0  # the inner level did not commit
    assert current_connection() is None
    assert _probes(engine) == 2


def test_a_failure_in_the_inner_operation_rolls_back_everything(engine: Engine) -> None:
    with pytest.raises(Injected), atomic_financial_operation(engine, "outer") as outer:
        _audit_row(outer, "outer")
        with atomic_financial_operation(engine, "inner") as inner:
            _audit_row(inner, "inner")
            raise Injected("inner failed")
    assert current_connection() is None
    assert _probes(engine) == 0


def test_commands_run_inside_one_open_operation_commit_or_roll_back_together(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    with pytest.raises(Injected), atomic_financial_operation(engine, "batch"):
        service.credit_wallet("alice", "5.00", idempotency_key="a")
        service.credit_wallet("bob", "5.00", idempotency_key="b")
        raise Injected("the batch failed after two commands")
    assert count(engine, "commands") == 0 and count(engine, "transfers") == 0
    with atomic_financial_operation(engine, "batch"):
        service.credit_wallet("alice", "5.00", idempotency_key="a")
        service.credit_wallet("bob", "5.00", idempotency_key="b")
    assert count(engine, "transfers") == 2
    assert_ledger_sound(engine, settings)


def test_a_nested_operation_on_another_database_is_refused(
    engine: Engine, settings: Settings
) -> None:
    other = make_engine(settings)
    try:
        with pytest.raises(TransactionIntegrityError, match="another database"), \
                atomic_financial_operation(engine) as outer:
            _audit_row(outer, "outer")
            with atomic_financial_operation(other):
                pass
    finally:
        other.dispose()
    assert _probes(engine) == 0


def test_an_operation_commits_on_success(engine: Engine) -> None:
    with atomic_financial_operation(engine) as conn:
        _audit_row(conn, "one")
    assert _probes(engine) == 1
