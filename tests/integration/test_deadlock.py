"""A forced deadlock: two transactions lock two accounts in opposite order; PostgreSQL aborts
one (40P01), execute_with_retry re-runs it whole, and it succeeds."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from services import atomic_transaction_manager as atm
from services.atomic_transaction_manager import (
    RetryPolicy,
    atomic_financial_operation,
    execute_with_retry,
)
from services.settings import Settings
from services.wallet_service import WalletService
from tests.support.ledger import assert_ledger_sound, balances, record, transfers

A, B = "user:a:available", "user:b:available"


def lock(conn: Connection, code: str) -> int:
    return int(conn.execute(text("SELECT balance_minor FROM accounts WHERE code = :c FOR UPDATE"),
                            {"c": code}).scalar_one())


class Side:
    """One of the two transactions: lock `first`, meet the other side, lock `second`, then pay."""

    def __init__(self, engine: Engine, service: WalletService, first: str, second: str,
                 barrier: threading.Barrier, key: str, payer: str, payee: str) -> None:
        self.engine, self.service, self.barrier = engine, service, barrier
        self.first, self.second, self.key = first, second, key
        self.payer, self.payee = payer, payee
        self.attempts = 0
        self.errors: list[str] = []
        self.delays: list[float] = []

    def transaction(self) -> dict[str, Any]:
        self.attempts += 1
        try:
            with atomic_financial_operation(self.engine, f"deadlock {self.key}") as conn:
                # Detect the deadlock quickly; the default is a second.
                conn.execute(text("SET LOCAL deadlock_timeout = '100ms'"))
                lock(conn, self.first)
                if self.attempts == 1:
                    self.barrier.wait(timeout=10)  # both now hold their first lock
                lock(conn, self.second)
                # The rest of the transaction: a real command, joining this transaction.
                return self.service.transfer_tokens_between_users(
                    self.payer, self.payee, "1.00", idempotency_key=self.key)
        except DBAPIError as exc:
            self.errors.append(getattr(exc.orig, "pgcode", None) or type(exc.orig).__name__)
            raise

    def run(self) -> dict[str, Any]:
        def sleep(delay_s: float) -> None:
            self.delays.append(delay_s)
            time.sleep(delay_s)

        policy = RetryPolicy(attempts=3, backoff_s=0.1, backoff_s_max=2.0)
        return execute_with_retry(self.transaction, policy, label=self.key, sleep=sleep)


def test_the_loser_of_a_deadlock_is_retried_by_execute_with_retry_and_succeeds(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    service.credit_wallet("a", "10.00", idempotency_key="dep-a")
    service.credit_wallet("b", "10.00", idempotency_key="dep-b")
    barrier = threading.Barrier(2)
    sides = [Side(engine, service, A, B, barrier, "a-pays-b", "a", "b"),
             Side(engine, service, B, A, barrier, "b-pays-a", "b", "a")]
    retries_before = atm.retry_stats.retries
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(Side.run, sides))
    elapsed_s = time.perf_counter() - started
    retries = atm.retry_stats.retries - retries_before

    print(f"\ndeadlock: attempts {[s.attempts for s in sides]}, errors {[s.errors for s in sides]}, "
          f"retries {retries}, backoff {[round(d, 3) for s in sides for d in s.delays]} s, "
          f"{elapsed_s:.2f} s")

    # Exactly one side was chosen as the victim, failed with 40P01, and succeeded on its retry.
    assert sorted(s.attempts for s in sides) == [1, 2]
    loser = next(s for s in sides if s.attempts == 2)
    assert loser.errors == ["40P01"]
    assert len(loser.delays) == 1 and 0.05 <= loser.delays[0] <= 0.1
    assert retries == 1
    assert [r["amount"] for r in results] == ["1.00", "1.00"]
    # Both payments happened once each, the loser's first attempt left nothing behind.
    assert len(transfers(engine, "a-pays-b")) == len(transfers(engine, "b-pays-a")) == 1
    assert record(engine, loser.key).attempts == 1
    assert balances(engine)[A] == balances(engine)[B] == 1000
    assert_ledger_sound(engine, settings)


def test_a_deadlock_that_keeps_recurring_ends_in_a_concurrent_operation_error(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    service.credit_wallet("a", "10.00", idempotency_key="dep-a")
    service.credit_wallet("b", "10.00", idempotency_key="dep-b")
    attempts = []

    def always_deadlocked() -> None:
        attempts.append(1)
        with atomic_financial_operation(engine) as conn:
            conn.execute(text("DO $$ BEGIN RAISE EXCEPTION 'deadlock detected' "
                              "USING ERRCODE = 'deadlock_detected'; END $$"))

    exhausted_before = atm.retry_stats.exhausted
    try:
        execute_with_retry(always_deadlocked, RetryPolicy(attempts=3, backoff_s=0.01),
                           sleep=lambda _: None)
    except atm.ConcurrentOperationError as exc:
        assert exc.ids == {"sqlstate": "40P01"}
    else:
        raise AssertionError("ConcurrentOperationError not raised")
    assert len(attempts) == 3
    assert atm.retry_stats.exhausted == exhausted_before + 1
    assert_ledger_sound(engine, settings)
