"""execute_with_retry: transient database errors re-run the transaction, classified by SQLSTATE."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from services import atomic_transaction_manager as atm
from services import unit_of_work
from services.atomic_transaction_manager import (
    ConcurrentOperationError,
    InsufficientBalanceError,
    RetryPolicy,
    UnknownUserError,
    execute_with_retry,
    is_transient,
)


class FakeOrig(Exception):
    """A DBAPI exception as psycopg2 raises it: the SQLSTATE is in `pgcode`."""

    def __init__(self, pgcode: str | None, message: str = "boom") -> None:
        super().__init__(message)
        self.pgcode = pgcode


def db_error(pgcode: str | None, message: str = "boom", cls: type[DBAPIError] = OperationalError,
             invalidated: bool = False) -> DBAPIError:
    return cls("SELECT 1", {}, FakeOrig(pgcode, message), connection_invalidated=invalidated)


class Flaky:
    """Fails with the given errors in turn, then returns "done"; counts its calls."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


@pytest.fixture
def delays() -> list[float]:
    return []


@pytest.fixture
def run(delays: list[float]) -> Callable[..., str]:
    def go(operation: Callable[[], str], policy: RetryPolicy | None = None) -> str:
        return execute_with_retry(operation, policy, label="test", sleep=delays.append)

    return go


@pytest.fixture(autouse=True)
def fresh_stats(monkeypatch: pytest.MonkeyPatch) -> atm.RetryStats:
    stats = atm.RetryStats()
    monkeypatch.setattr(unit_of_work, "retry_stats", stats)
    return stats


@pytest.mark.parametrize(
    ("pgcode", "what"),
    [("40P01", "deadlock"), ("40001", "serialization failure"), ("55P03", "lock timeout"),
     ("57P01", "admin shutdown"), ("08006", "connection failure"), ("08003", "no connection")],
)
def test_a_transient_sqlstate_is_retried_and_then_succeeds(
    run: Callable[..., str], delays: list[float], fresh_stats: atm.RetryStats, pgcode: str, what: str
) -> None:
    operation = Flaky(db_error(pgcode, what))
    assert run(operation) == "done"
    assert operation.calls == 2
    assert len(delays) == 1
    assert fresh_stats.retries == 1 and fresh_stats.exhausted == 0


@pytest.mark.parametrize(
    ("pgcode", "cls"),
    [("57014", OperationalError),   # statement timeout: re-running would time out again
     ("23505", IntegrityError),     # unique violation
     ("23514", IntegrityError),     # check violation
     ("42P01", OperationalError),   # undefined table: bad configuration
     ("28P01", OperationalError)],  # bad password
)
def test_a_permanent_sqlstate_is_raised_at_once(
    run: Callable[..., str], delays: list[float], pgcode: str, cls: type[DBAPIError]
) -> None:
    error = db_error(pgcode, cls=cls)
    operation = Flaky(error)
    with pytest.raises(cls) as caught:
        run(operation)
    assert caught.value is error
    assert operation.calls == 1 and delays == []


def test_the_classification_is_by_sqlstate_not_by_exception_class() -> None:
    assert is_transient(db_error("40P01", cls=DBAPIError))
    assert is_transient(db_error("40001", cls=IntegrityError))
    assert not is_transient(db_error("57014", cls=OperationalError))
    assert not is_transient(db_error(None, "syntax error", cls=OperationalError))


def test_a_lost_connection_without_sqlstate_is_transient() -> None:
    assert is_transient(db_error(None, "server closed the connection unexpectedly"))
    assert is_transient(db_error(None, "connection already closed"))
    assert is_transient(db_error(None, "anything", invalidated=True))
    assert is_transient(db_error(None, "database is locked"))  # SQLite's busy writer


def test_something_that_is_not_a_database_error_is_never_transient() -> None:
    assert not is_transient(ValueError("40P01"))
    assert not is_transient(ConcurrentOperationError("x"))


@pytest.mark.parametrize(
    "error",
    [InsufficientBalanceError("short", account="user:a:available"), UnknownUserError("who"),
     ValueError("bug"), KeyError("k")],
)
def test_a_business_error_or_a_bug_is_never_retried(
    run: Callable[..., str], delays: list[float], fresh_stats: atm.RetryStats, error: Exception
) -> None:
    operation = Flaky(error)
    with pytest.raises(type(error)):
        run(operation)
    assert operation.calls == 1 and delays == [] and fresh_stats.retries == 0


def test_retries_run_out_after_the_policys_attempts_with_a_concurrent_operation_error(
    run: Callable[..., str], delays: list[float], fresh_stats: atm.RetryStats
) -> None:
    operation = Flaky(*[db_error("40P01", "deadlock detected") for _ in range(10)])
    with pytest.raises(ConcurrentOperationError) as caught:
        run(operation)
    assert operation.calls == 3  # the default: 3 attempts
    assert len(delays) == 2
    assert caught.value.code == "concurrent_operation"
    assert caught.value.ids == {"sqlstate": "40P01"}
    assert "3 attempts" in caught.value.message
    assert isinstance(caught.value.__cause__, DBAPIError)
    assert fresh_stats.retries == 2 and fresh_stats.exhausted == 1


@pytest.mark.parametrize("attempts", [1, 2, 5])
def test_the_number_of_attempts_is_configurable(run: Callable[..., str], attempts: int) -> None:
    operation = Flaky(*[db_error("40001") for _ in range(10)])
    with pytest.raises(ConcurrentOperationError):
        run(operation, RetryPolicy(attempts=attempts))
    assert operation.calls == attempts


def test_the_last_attempt_may_succeed(run: Callable[..., str]) -> None:
    operation = Flaky(db_error("40P01"), db_error("55P03"))
    assert run(operation) == "done"
    assert operation.calls == 3


def test_backoff_starts_at_100ms_and_doubles_up_to_2s_with_jitter(
    run: Callable[..., str], delays: list[float]
) -> None:
    random.seed(7)
    operation = Flaky(*[db_error("40P01") for _ in range(8)])
    with pytest.raises(ConcurrentOperationError):
        run(operation, RetryPolicy(attempts=8))
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert len(delays) == len(ceilings)
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling


def test_the_jitter_spreads_colliding_retries() -> None:
    policy = RetryPolicy()
    first_delays = {policy.delay_s(1) for _ in range(50)}
    assert len(first_delays) > 40
    assert all(0.05 <= d <= 0.1 for d in first_delays)


def test_the_backoff_is_configurable() -> None:
    policy = RetryPolicy(attempts=5, backoff_s=0.02, backoff_s_max=0.05)
    assert 0.01 <= policy.delay_s(1) <= 0.02
    assert 0.02 <= policy.delay_s(2) <= 0.04
    assert 0.025 <= policy.delay_s(3) <= 0.05
    assert 0.025 <= policy.delay_s(30) <= 0.05


def test_inside_an_open_transaction_the_owner_retries_not_the_inner_call(
    delays: list[float],
) -> None:
    token = unit_of_work._current.set(object())  # type: ignore[arg-type]
    try:
        operation = Flaky(db_error("40P01"))
        with pytest.raises(OperationalError):
            execute_with_retry(operation, sleep=delays.append)
        assert operation.calls == 1 and delays == []
    finally:
        unit_of_work._current.reset(token)
