"""Hot accounts (platform:treasury, platform:fees, the system's): read while a transaction
works, locked and written last, at its flush. Many threads on one hot account, then every
invariant; a debit that its reading allowed but the locked row no longer covers is applied
again with the row locked first, and refused there."""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from services.command_executor import execute_command
from services.errors import BusinessRuleError
from services.message_policy import Done, execute_keys_message, execute_message
from services.outbox import record_accepted_many
from services.settings import Settings
from services.wallet_service import WalletService
from tests.support.ledger import assert_ledger_sound, balances, record, transfers
from tests.support.signing import prepared, signed

THREADS = 8
ROUNDS = 40


def sale(key: str, user: str, amount: str) -> dict[str, Any]:
    return {"type": "admin_sell_tokens_to_user", "idempotency_key": key, "user": user,
            "amount": amount}


def test_a_sale_its_reading_allowed_but_the_locked_treasury_cannot_cover_is_refused_once(
    service: WalletService, engine: Engine, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="walletq.executor")
    service.admin_create_tokens("100.00", idempotency_key="mint")
    slow = dataclasses.replace(settings, test_delay_s=1.0)  # reads 100, then waits unlocked
    outcome: list[Any] = []
    first = threading.Thread(target=lambda: outcome.append(execute_command(
        signed(sale("s-slow", "alice", "60.00")), engine=engine, settings=slow)))
    first.start()
    # While it waits, another sale takes 60 (the treasury is not locked meanwhile).
    waiting_since = threading.Event()
    threading.Timer(0.3, waiting_since.set).start()
    waiting_since.wait()
    assert service.admin_sell_tokens_to_user("bob", "60.00", idempotency_key="s-fast")
    first.join(30)
    assert outcome and outcome[0].status == "rejected"
    assert outcome[0].error_code == "insufficient_balance"
    assert "40" in (outcome[0].error_message or "")  # decided on the locked row: 4000 left
    assert record(engine, "s-slow").attempts == 1 and transfers(engine, "s-slow") == []
    assert any("s-slow: a hot account could not cover it at the flush" in r.getMessage()
               for r in caplog.records)
    assert balances(engine)["platform:treasury"] == 4000
    assert_ledger_sound(engine, settings)


def test_a_refusal_is_decided_on_the_locked_row_not_on_a_reading(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    service.admin_create_tokens("10.00", idempotency_key="mint")
    # A reading of 10.00 cannot cover 15.00: the treasury is locked and read again first.
    with pytest.raises(BusinessRuleError, match="1000 minor units, 1500 needed"):
        service.admin_sell_tokens_to_user("alice", "15.00", idempotency_key="big")
    assert transfers(engine, "big") == []
    assert_ledger_sound(engine, settings)


def _release(service: WalletService, rng: random.Random, thread: int, n: int) -> None:
    hold = f"h-{thread}-{n}"
    payer, payee = rng.sample(["u0", "u1", "u2", "u3", "u4", "u5"], 2)
    service.transfer_to_escrow(hold, payer, payee, "1.00", idempotency_key=f"open-{hold}")
    service.release_from_escrow(hold, idempotency_key=f"close-{hold}")


def test_many_threads_on_the_hot_accounts_keep_every_invariant(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    # The treasury holds less than the threads will ask of it: some sales must be refused,
    # some on a reading, some only at the flush, and none may overdraw it.
    service.admin_create_tokens("150.00", idempotency_key="mint")
    for user in ("u0", "u1", "u2", "u3", "u4", "u5"):
        service.credit_wallet(user, "50.00", idempotency_key=f"seed-{user}")
    refused = []
    refused_lock = threading.Lock()

    def work(thread: int) -> None:
        rng = random.Random(thread)
        for n in range(ROUNDS):
            choice = rng.random()
            try:
                if choice < 0.45:  # a sale: debits the treasury
                    if thread % 2:
                        service.admin_sell_tokens_to_user(
                            f"u{rng.randrange(6)}", f"{rng.randint(1, 3)}.00",
                            idempotency_key=f"sale-{thread}-{n}")
                    else:  # through a worker's path, taking others waiting with it
                        command = sale(f"sale-{thread}-{n}", f"u{rng.randrange(6)}",
                                       f"{rng.randint(1, 3)}.00")
                        record_accepted_many([prepared(command)], engine=engine,
                                             settings=settings)
                        done = execute_message((signed(command),), {}, engine=engine,
                                               settings=settings, retries_left=True)
                        assert isinstance(done, Done) and done.record is not None
                        if done.record.status == "rejected":
                            raise BusinessRuleError(done.record.error_message or "")
                elif choice < 0.6:  # a buy-back: credits the treasury
                    service.user_sell_tokens_to_admin(f"u{rng.randrange(6)}", "1.00",
                                                      idempotency_key=f"buy-{thread}-{n}")
                else:  # a hold and its release: the fee credits platform:fees
                    _release(service, rng, thread, n)
            except BusinessRuleError as exc:
                with refused_lock:
                    refused.append(exc)

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(work, range(THREADS)))
    # Refusals are insufficient balances only; the treasury ran dry and never below zero.
    assert refused and all("minor units" in str(exc) for exc in refused)
    with engine.connect() as conn:
        left = conn.execute(text("SELECT balance_minor FROM accounts "
                                 "WHERE code = 'platform:treasury'")).scalar_one()
        sold = conn.execute(text(
            "SELECT COALESCE(SUM(t.amount_minor), 0) FROM transfers t JOIN accounts a "
            "ON a.id = t.debit_account_id WHERE a.code = 'platform:treasury'")).scalar_one()
        bought = conn.execute(text(
            "SELECT COALESCE(SUM(t.amount_minor), 0) FROM transfers t JOIN accounts a "
            "ON a.id = t.credit_account_id WHERE a.code = 'platform:treasury'")).scalar_one()
        fees = conn.execute(text("SELECT balance_minor FROM accounts "
                                 "WHERE code = 'platform:fees'")).scalar_one()
    assert left >= 0 and left == bought - sold
    assert fees > 0
    assert_ledger_sound(engine, settings)


def test_a_chunk_of_sales_larger_than_the_treasury_refuses_exactly_what_it_cannot_cover(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    service.admin_create_tokens("10.00", idempotency_key="mint")
    sales = [sale(f"c-{i}", f"u{i}", "3.00") for i in range(5)]  # 15.00 asked of 10.00
    record_accepted_many([prepared(c) for c in sales], engine=engine, settings=settings)
    execute_keys_message(([c["idempotency_key"] for c in sales],), {}, engine=engine,
                         settings=settings, retries_left=True)
    statuses = [record(engine, c["idempotency_key"]).status for c in sales]
    assert statuses == ["succeeded"] * 3 + ["rejected"] * 2  # in order: 3 x 3.00, then dry
    assert balances(engine)["platform:treasury"] == 100
    assert_ledger_sound(engine, settings)
