"""Which failures the message policy hands back for a later retry, and which it records at once."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DataError, OperationalError, ProgrammingError

from services.atomic_transaction_manager import ConcurrentOperationError
from services.message_policy import retryable as _retryable


class _Orig(Exception):
    def __init__(self, message: str, pgcode: str | None = None) -> None:
        super().__init__(message)
        self.pgcode = pgcode


@pytest.fixture
def retryable():
    return _retryable


def test_exhausted_in_process_retries_go_to_celery_autoretry(retryable):
    assert retryable(ConcurrentOperationError("deadlocks persisted"))


def test_a_deadlock_or_an_unreachable_database_is_retried(retryable):
    assert retryable(OperationalError("SELECT 1", {}, _Orig("deadlock", "40P01")))
    assert retryable(OperationalError("connect", {}, _Orig("connection refused")))


def test_a_missing_column_or_an_out_of_range_value_is_not_retried(retryable):
    assert not retryable(ProgrammingError("SELECT x", {}, _Orig("no column x", "42703")))
    assert not retryable(DataError("INSERT", {}, _Orig("bigint out of range", "22003")))
