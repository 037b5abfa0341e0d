"""Payout chunks paying from a hot account run side by side: the account is read, not
locked, and debited last. Two batches racing on the same references, or on a treasury that
cannot cover both, still pay each reference once and never overdraw it."""

from __future__ import annotations

import logging
import threading
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from services.settings import Settings
from services.wallet_service import WalletService
from tests.support.ledger import assert_ledger_sound, balances, record


def batch(key: str, prefix: str, n: int, amount: str = "1.00") -> dict[str, Any]:
    return {"type": "payout_batch", "idempotency_key": key,
            "items": [{"user": f"{prefix}-u{i}", "amount": amount, "reference": f"{prefix}-r{i}"}
                      for i in range(n)]}


def run_together(service: WalletService, *commands: dict[str, Any]) -> list[Any]:
    barrier = threading.Barrier(len(commands))
    outcomes: list[Any] = [None] * len(commands)

    def one(i: int) -> None:
        barrier.wait()
        outcomes[i] = service.execute(commands[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(commands))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return outcomes


def paid_per_reference(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(text(
            "SELECT reference, COUNT(*) FROM payout_items WHERE outcome = 'paid' "
            "GROUP BY reference")).all())  # type: ignore[arg-type]


def test_the_same_file_paid_twice_at_once_under_two_keys_pays_each_reference_once(
    service: WalletService, engine: Engine, caplog: pytest.LogCaptureFixture, settings: Settings
) -> None:
    caplog.set_level(logging.INFO, logger="walletq.payouts")
    service.admin_create_tokens("100000.00", idempotency_key="mint")
    first, second = run_together(service, batch("pay-1", "f", 3000), batch("pay-2", "f", 3000))
    assert (first.status, second.status) == ("succeeded", "succeeded")
    paid = paid_per_reference(engine)
    assert len(paid) == 3000 and set(paid.values()) == {1}
    results = [first.result, second.result]
    assert sorted(r["paid"] + r["duplicate"] for r in results) == [3000, 3000]
    assert sum(r["paid"] for r in results) == 3000
    assert balances(engine)["platform:treasury"] == 10_000_000 - 300_000
    # The chunks ran side by side and met: the unique index refused one, which ran again.
    assert any("the chunk again, its funding account locked" in r.getMessage()
               for r in caplog.records)
    assert_ledger_sound(engine, settings)


def test_two_batches_the_treasury_cannot_both_cover_never_overdraw_it(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    service.admin_create_tokens("5000.00", idempotency_key="mint")  # 500,000 minor units
    outcomes = run_together(service, batch("a", "a", 4000), batch("b", "b", 4000))
    assert {o.status for o in outcomes} == {"succeeded"}
    paid = sum(o.result["paid"] for o in outcomes)
    rejected = sum(o.result["rejected"] for o in outcomes)
    assert paid == 5000 and rejected == 3000  # 1.00 each: exactly what the treasury held
    assert balances(engine)["platform:treasury"] == 0
    assert {o.result["rejected_by_code"].get("insufficient_balance", 0) for o in outcomes} \
        <= {0, 1000, 2000, 3000}
    assert record(engine, "a").status == "succeeded"
    assert_ledger_sound(engine, settings)


def test_a_wallet_opened_by_another_transaction_meanwhile_is_credited_not_duplicated(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    """The wallets a chunk opens go in a plain INSERT; one another transaction opens at the
    same time (its unique entry first) makes that INSERT fail, and the chunk opens the rest
    skipping it, then credits it like any existing wallet."""
    service.admin_create_tokens("100.00", idempotency_key="mint")
    other = engine.connect()
    other.begin()
    other.execute(text("INSERT INTO accounts (code, kind, user_id, may_go_negative, "
                       "balance_minor) VALUES ('user:zed:available', 'user_available', 'zed', "
                       "false, 0)"))
    outcome: list[Any] = []
    paying = threading.Thread(target=lambda: outcome.append(service.execute(
        {"type": "payout_batch", "idempotency_key": "race",
         "items": [{"user": "amy", "amount": "1.00", "reference": "r-amy"},
                   {"user": "zed", "amount": "2.50", "reference": "r-zed"}]})))
    paying.start()
    paying.join(1.0)
    assert paying.is_alive()  # waiting on zed's uncommitted unique entry
    other.commit()
    other.close()
    paying.join(60)
    assert outcome and outcome[0].status == "succeeded" and outcome[0].result["paid"] == 2
    assert balances(engine)["user:zed:available"] == 250
    assert balances(engine)["user:amy:available"] == 100
    assert_ledger_sound(engine, settings)


@pytest.mark.parametrize(("daily", "paid", "left"), [("4.00", 4, "-1.00"), ("100.00", 5, "-2.00")])
def test_payouts_side_by_side_from_a_wallet_never_spend_past_its_limits_together(
    service: WalletService, engine: Engine, settings: Settings, daily: str, paid: int, left: str
) -> None:
    """An attacker's best try at a user's limits: several payouts from one wallet at once,
    each within its daily debit limit and overdraft alone, together far beyond them. The
    wallet is locked per chunk and the day's legs read under that lock, so together they
    pay only what the tighter limit allows (3.00 held, 2.00 of overdraft, `daily` a day),
    and the rest is rejected limit_exceeded."""
    service.admin_create_tokens("1000.00", idempotency_key="mint")
    service.admin_sell_tokens_to_user("boss", "3.00", idempotency_key="sale")
    service.execute({"type": "set_account_limit", "idempotency_key": "limits", "user": "boss",
                     "limit": "2.00", "daily_debit_limit": daily})
    payouts = [{**batch(f"pay-{n}", f"p{n}", 3), "from_account": "user:boss:available"}
               for n in range(4)]
    outcomes = run_together(service, *payouts)
    assert [o.status for o in outcomes] == ["succeeded"] * 4
    assert sum(o.result["paid"] for o in outcomes) == paid
    assert {code for o in outcomes for code in o.result["rejected_by_code"]} == {"limit_exceeded"}
    assert service.balance("boss").available == Decimal(left)
    assert_ledger_sound(engine, settings)
