"""A limit change racing many debits (threads, real PostgreSQL): no balance is ever below
the limit in force, and every invariant holds afterwards."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import text
from sqlalchemy.engine import Engine

from services.atomic_transaction_manager import BusinessRuleError
from services.settings import Settings
from services.wallet_service import WalletService
from tests.integration.test_account_lifecycle import run
from tests.support.ledger import assert_ledger_sound

DEBITORS = 6
DEBITS_EACH = 25
LIMITS = ("0", "5.00", "20.00", "2.00")


class Race:
    """Debits of bob (of every kind) on some threads, bob's limit changed on another, and a
    watcher reading bob's balance and limit together as often as it can."""

    def __init__(self, service: WalletService, engine: Engine) -> None:
        self.service, self.engine = service, engine
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.refusals: list[str] = []
        self.seen_below: list[tuple[int, int]] = []

    def _refused(self, exc: BusinessRuleError) -> None:
        with self.lock:
            self.refusals.append(exc.code)

    def one_debit(self, rng: random.Random, seed: int) -> None:
        s, amount = self.service, f"{rng.randint(50, 400) / 100:.2f}"
        kind = rng.choice(("debit", "transfer", "hold", "credit"))
        if kind == "debit":
            s.debit_wallet("bob", amount)
        elif kind == "transfer":
            s.transfer_tokens_between_users("bob", "alice", amount)
        elif kind == "hold":
            s.transfer_to_escrow(f"h-{seed}-{rng.random()}", "bob", "alice", amount)
        else:
            s.transfer_tokens_between_users("alice", "bob", amount)

    def debits(self, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(DEBITS_EACH):
            try:
                self.one_debit(rng, seed)
            except BusinessRuleError as exc:
                self._refused(exc)

    def limits(self) -> None:
        rng = random.Random(7)
        for _ in range(40):
            try:
                run(self.service, "set_account_limit", user="bob", limit=rng.choice(LIMITS))
            except BusinessRuleError as exc:
                self._refused(exc)

    def watch(self) -> None:
        with self.engine.connect() as conn:
            while not self.done.is_set():
                balance, limit = conn.execute(text(
                    "SELECT balance_minor, overdraft_limit_minor FROM accounts "
                    "WHERE code = 'user:bob:available'")).one()
                conn.rollback()
                if balance < -limit:
                    self.seen_below.append((balance, limit))

    def run(self) -> None:
        watcher = threading.Thread(target=self.watch)
        watcher.start()
        try:
            with ThreadPoolExecutor(DEBITORS + 1) as pool:
                futures = [pool.submit(self.debits, seed) for seed in range(DEBITORS)]
                futures.append(pool.submit(self.limits))
                for future in futures:
                    future.result()
        finally:
            self.done.set()
            watcher.join()


def test_a_limit_change_racing_many_debits_never_leaves_a_balance_below_the_limit(
        service: WalletService, engine: Engine, settings: Settings) -> None:
    service.admin_create_tokens("1000.00")
    service.admin_sell_tokens_to_user("bob", "30.00")
    service.admin_sell_tokens_to_user("alice", "30.00")
    race = Race(service, engine)
    race.run()
    assert race.seen_below == []
    assert set(race.refusals) <= {"limit_exceeded", "insufficient_balance"}
    assert "limit_exceeded" in race.refusals  # the race was run: limits refused something
    with engine.connect() as conn:
        low = conn.execute(text(
            "SELECT MIN(debit_balance_after_minor) FROM transfers t JOIN accounts a "
            "ON a.id = t.debit_account_id WHERE a.code = 'user:bob:available'")).scalar_one()
    assert low >= -2000  # never below the largest limit it ever had
    assert_ledger_sound(engine, settings)
