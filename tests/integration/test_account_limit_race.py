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


def test_a_limit_change_racing_many_debits_never_leaves_a_balance_below_the_limit(
        service: WalletService, engine: Engine, settings: Settings) -> None:
    service.admin_create_tokens("1000.00")
    service.admin_sell_tokens_to_user("bob", "30.00")
    service.admin_sell_tokens_to_user("alice", "30.00")
    done = threading.Event()
    seen_below: list[tuple[int, int]] = []
    refusals: list[str] = []
    lock = threading.Lock()

    def debits(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(DEBITS_EACH):
            kind = rng.choice(("debit", "transfer", "hold", "credit"))
            amount = f"{rng.randint(50, 400) / 100:.2f}"
            try:
                if kind == "debit":
                    service.debit_wallet("bob", amount)
                elif kind == "transfer":
                    service.transfer_tokens_between_users("bob", "alice", amount)
                elif kind == "hold":
                    service.transfer_to_escrow(f"h-{seed}-{rng.random()}", "bob", "alice",
                                               amount)
                else:
                    service.transfer_tokens_between_users("alice", "bob", amount)
            except BusinessRuleError as exc:
                with lock:
                    refusals.append(exc.code)

    def limits() -> None:
        rng = random.Random(7)
        for _ in range(40):
            try:
                run(service, "set_account_limit", user="bob", limit=rng.choice(LIMITS))
            except BusinessRuleError as exc:
                with lock:
                    refusals.append(exc.code)

    def watch() -> None:
        with engine.connect() as conn:
            while not done.is_set():
                balance, limit = conn.execute(text(
                    "SELECT balance_minor, overdraft_limit_minor FROM accounts "
                    "WHERE code = 'user:bob:available'")).one()
                conn.rollback()
                if balance < -limit:
                    seen_below.append((balance, limit))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(DEBITORS + 1) as pool:
            futures = [pool.submit(debits, seed) for seed in range(DEBITORS)]
            futures.append(pool.submit(limits))
            for future in futures:
                future.result()
    finally:
        done.set()
        watcher.join()
    assert seen_below == []
    assert set(refusals) <= {"limit_exceeded", "insufficient_balance"}
    assert "limit_exceeded" in refusals  # the race was run: limits refused something
    with engine.connect() as conn:
        low = conn.execute(text(
            "SELECT MIN(debit_balance_after_minor) FROM transfers t JOIN accounts a "
            "ON a.id = t.debit_account_id WHERE a.code = 'user:bob:available'")).scalar_one()
    assert low >= -2000  # never below the largest limit it ever had
    assert_ledger_sound(engine, settings)
