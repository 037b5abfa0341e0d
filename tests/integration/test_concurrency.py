"""Concurrency on PostgreSQL: many threads, few users, every kind of operation at once.

Afterwards every ledger invariant holds and no deadlock or exhausted retry reached a caller.
Run with -s to see the figures the main test prints.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from services import atomic_transaction_manager as atm
from services.atomic_transaction_manager import BusinessRuleError, HoldNotOpenError
from services.command_store import count_by_status
from services.settings import Settings
from services.wallet_service import WalletService
from tests.support.ledger import assert_ledger_sound, balances, hold, transfers
from tests.support.pg import close_connections, settled_deadlocks

THREADS = 8
OPERATIONS_PER_THREAD = 500
USERS = [f"u{i}" for i in range(10)]
SEED = 20261129


def amount(rng: random.Random, high_minor: int = 2_000) -> str:
    return f"{Decimal(rng.randint(1, high_minor)).scaleb(-2):.2f}"


class Workload:
    """Random operations on ten users; holds shared between threads so closes race."""

    def __init__(self, service: WalletService) -> None:
        self.service = service
        self.holds: list[str] = []
        self.holds_lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.outcomes_lock = threading.Lock()
        self.unexpected: list[BaseException] = []

    def recent_hold(self, rng: random.Random) -> str:
        with self.holds_lock:
            if not self.holds:
                return "no-such-hold"
            return rng.choice(self.holds[-12:])  # recent holds: several threads aim at each

    def one(self, rng: random.Random, thread: int, n: int) -> tuple[str, Callable[[], Any]]:
        s = self.service
        a, b = rng.sample(USERS, 2)
        pair = sorted(rng.sample(USERS[:4], 2))  # a few hot pairs, crossed both ways
        if rng.random() < 0.5:
            pair.reverse()
        hold_id = f"h-{thread}-{n}"
        choices: list[tuple[str, int, Callable[[], Any]]] = [
            ("credit_wallet", 8, lambda: s.credit_wallet(a, amount(rng))),
            ("debit_wallet", 8, lambda: s.debit_wallet(a, amount(rng, 4_000))),
            ("transfer_tokens_between_users", 14,
             lambda: s.transfer_tokens_between_users(pair[0], pair[1], amount(rng))),
            ("transfer_tokens_between_users", 8,
             lambda: s.transfer_tokens_between_users(a, b, amount(rng, 5_000))),
            ("admin_sell_tokens_to_user", 8, lambda: s.admin_sell_tokens_to_user(a, amount(rng))),
            ("user_sell_tokens_to_admin", 8, lambda: s.user_sell_tokens_to_admin(a, amount(rng))),
            ("transfer_to_escrow", 14, lambda: self.open_hold(hold_id, a, b, amount(rng))),
            ("release_from_escrow", 10, lambda: s.release_from_escrow(
                self.recent_hold(rng), fee_rate=rng.choice([None, "0.10", "0.035", "0", "1"]))),
            ("refund_from_escrow", 10, lambda: s.refund_from_escrow(self.recent_hold(rng))),
            ("admin_create_tokens", 1, lambda: s.admin_create_tokens(amount(rng, 100_000))),
        ]
        name, _, call = rng.choices(choices, weights=[w for _, w, _ in choices])[0]
        return name, call

    def open_hold(self, hold_id: str, payer: str, payee: str, value: str) -> Any:
        result = self.service.transfer_to_escrow(hold_id, payer, payee, value)
        with self.holds_lock:
            self.holds.append(hold_id)
        return result

    def run_thread(self, thread: int) -> None:
        rng = random.Random(SEED + thread)
        local: Counter[str] = Counter()
        for n in range(OPERATIONS_PER_THREAD):
            name, call = self.one(rng, thread, n)
            try:
                call()
                local[f"{name}: succeeded"] += 1
            except BusinessRuleError as exc:
                local[f"{name}: {exc.code}"] += 1
            except BaseException as exc:  # a deadlock, an exhausted retry, a bug: all reported
                self.unexpected.append(exc)
                local[f"{name}: {type(exc).__name__}"] += 1
        with self.outcomes_lock:
            self.outcomes.update(local)


@pytest.fixture
def stocked(service: WalletService) -> WalletService:
    service.admin_create_tokens("1000000.00", idempotency_key="mint")
    for user in USERS:
        service.admin_sell_tokens_to_user(user, "500.00", idempotency_key=f"stock-{user}")
    return service


@pytest.mark.slow
def test_eight_threads_of_random_operations_on_ten_users_keep_every_invariant(
    stocked: WalletService, engine: Engine, settings: Settings
) -> None:
    workload = Workload(stocked)
    retries_before, exhausted_before = atm.retry_stats.retries, atm.retry_stats.exhausted
    started = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(workload.run_thread, range(THREADS)))
    elapsed_s = time.perf_counter() - started
    retries = atm.retry_stats.retries - retries_before
    exhausted = atm.retry_stats.exhausted - exhausted_before
    operations = sum(workload.outcomes.values())

    print(f"\nconcurrency: {operations} operations, {THREADS} threads, {len(USERS)} users, "
          f"{retries} retries, {exhausted} retries exhausted, {elapsed_s:.1f} s "
          f"({operations / elapsed_s:.0f} operations/s)")
    for outcome, n in sorted(workload.outcomes.items()):
        print(f"  {outcome}: {n}")

    assert workload.unexpected == [], workload.unexpected[:5]
    assert exhausted == 0
    assert operations == THREADS * OPERATIONS_PER_THREAD
    assert_ledger_sound(engine, settings)
    with engine.connect() as conn:
        statuses = count_by_status(conn)
        # Every kind of operation really ran, and the races really happened.
        assert statuses.get("processing", 0) == 0 and statuses.get("failed", 0) == 0
        assert sum(statuses.values()) == operations + 1 + len(USERS)
    for name in ("transfer_tokens_between_users", "transfer_to_escrow", "release_from_escrow",
                 "refund_from_escrow", "debit_wallet", "user_sell_tokens_to_admin"):
        assert workload.outcomes[f"{name}: succeeded"] > 0, name
    assert workload.outcomes["release_from_escrow: hold_not_open"] > 0
    assert workload.outcomes["refund_from_escrow: hold_not_open"] > 0
    assert workload.outcomes["debit_wallet: insufficient_balance"] > 0


def test_a_release_and_a_refund_racing_on_each_hold_close_it_exactly_once(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    hold_count = 25
    service.credit_wallet("payer", "1000.00", idempotency_key="dep")
    for i in range(hold_count):
        service.transfer_to_escrow(f"o-{i}", "payer", "payee", "10.00", idempotency_key=f"open-{i}")
    barrier = threading.Barrier(2)

    def close(action: str) -> list[str]:
        won = []
        for i in range(hold_count):
            barrier.wait()
            try:
                getattr(service, action)(f"o-{i}", idempotency_key=f"{action}-{i}")
                won.append(f"o-{i}")
            except HoldNotOpenError:
                pass
        return won

    with ThreadPoolExecutor(2) as pool:
        released, refunded = pool.map(close, ["release_from_escrow", "refund_from_escrow"])
    assert sorted(released + refunded) == sorted(f"o-{i}" for i in range(hold_count))
    assert not set(released) & set(refunded)
    for hold_id in released:
        assert hold(engine, hold_id)["status"] == "released"  # type: ignore[index]
    money = balances(engine)
    assert money["user:payer:escrow"] == 0
    assert money["user:payee:available"] == 900 * len(released)
    assert money.get("platform:fees", 0) == 100 * len(released)
    assert money["user:payer:available"] == 100_000 - 1000 * len(released)
    assert_ledger_sound(engine, settings)


def test_transfers_in_opposite_directions_at_once_neither_deadlock_nor_lose_money(
    service: WalletService, engine: Engine, settings: Settings, pg_admin: Engine
) -> None:
    rounds = 60
    service.credit_wallet("a", "100.00", idempotency_key="dep-a")
    service.credit_wallet("b", "100.00", idempotency_key="dep-b")
    retries_before = atm.retry_stats.retries
    barrier = threading.Barrier(2)

    def send(direction: tuple[str, str]) -> int:
        barrier.wait()
        for i in range(rounds):
            service.transfer_tokens_between_users(*direction, "0.07",
                                                  idempotency_key=f"{direction[0]}-{i}")
        return rounds

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(send, [("a", "b"), ("b", "a")])) == [rounds, rounds]
    money = balances(engine)
    assert money["user:a:available"] == money["user:b:available"] == 10_000
    assert len(transfers(engine)) == 2 + 2 * rounds
    # Locks are taken in one global order (accounts by id): walletq never deadlocks itself.
    # A deadlock would have been retried (counted here) and reported by PostgreSQL, whose
    # count is read once every connection that could report one has closed.
    assert atm.retry_stats.retries == retries_before
    assert_ledger_sound(engine, settings)
    close_connections(engine)
    assert settled_deadlocks(pg_admin, engine.url.database) == 0
