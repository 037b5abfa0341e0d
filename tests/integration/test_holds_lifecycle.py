"""Holds (issue 9): partial and repeated capture, refund of the rest, expiry, and the races
between them. PostgreSQL here; tests/integration/embedded/test_holds_embedded.py runs the same
tests on SQLite (embedded)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from services import expiry, producers
from services.errors import (
    ForbiddenError,
    HoldExceededError,
    HoldExpiredError,
    HoldNotExpiredError,
    HoldNotOpenError,
    InvalidCommandError,
)
from services.permissions import SYSTEM
from services.settings import Settings
from services.signing import Signer, new_private_key
from services.unit_of_work import run_transaction
from services.wallet_service import WalletService, raise_for_outcome
from tests.support.ledger import assert_ledger_sound, audit_outcomes, balances, record, transfers
from tests.support.polling import eventually

FEES = "platform:fees"


@pytest.fixture
def funded(service: WalletService) -> WalletService:
    service.credit_wallet("alice", "100.00", idempotency_key="dep")
    return service


@pytest.fixture
def system(engine: Engine, settings: Settings) -> Signer:
    """A producer of the built-in role `system`, as `walletq producer create` makes one."""
    key = new_private_key()
    run_transaction(engine, settings, "system producer",
                    lambda conn: producers.create(conn, "walletq-system", SYSTEM, key.public_key()))
    return Signer("walletq-system", key)


def expire_now(engine: Engine, hold_id: str) -> None:
    """The hold's expiry moved into the past (as if its time had come)."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE holds SET expires_at = :t WHERE hold_id = :h"),
                     {"t": datetime.now(UTC) - timedelta(seconds=1), "h": hold_id})


def moved(engine: Engine) -> dict[str, int]:
    return {k: v for k, v in balances(engine).items() if v}


def key_taken(engine: Engine, key: str) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(text("SELECT count(*) FROM commands WHERE idempotency_key = "
                                      ":key"), {"key": key}).scalar_one())


def refused(error: type[Exception], call: Any, engine: Engine) -> str:
    """The call is refused with this error and moves nothing."""
    before = balances(engine)
    with pytest.raises(error) as caught:
        call()
    assert balances(engine) == before
    return str(caught.value)


# --- partial capture ------------------------------------------------------------------


def test_partial_releases_each_pay_their_fee_at_the_holds_rate_and_the_last_closes_it(
    funded: WalletService, engine: Engine, settings: Settings
) -> None:
    funded.transfer_to_escrow("o-1", "alice", "bob", "10.00", idempotency_key="h-1")
    first = funded.release_from_escrow("o-1", amount="3.33", idempotency_key="r-1")
    # 10% of 3.33 is 0.333 → 0.33; the payee gets 3.00; 6.67 stays held.
    assert (first["amount"], first["fee"], first["payee_amount"]) == ("3.33", "0.33", "3.00")
    assert (first["status"], first["released"], first["remaining"]) == ("held", "3.33", "6.67")
    assert funded.hold("o-1")["status"] == "held"
    assert funded.balance("alice").escrow == Decimal("6.67")
    last = funded.release_from_escrow("o-1", idempotency_key="r-2")  # all that remains
    assert (last["amount"], last["fee"], last["payee_amount"]) == ("6.67", "0.67", "6.00")
    shown = funded.hold("o-1")
    assert (shown["status"], shown["amount"], shown["released"], shown["refunded"],
            shown["remaining"], shown["fee"]) == ("released", Decimal("10.00"), Decimal("10.00"),
                                                  Decimal("0.00"), Decimal("0.00"), Decimal("1.00"))
    money = balances(engine)
    assert (money["user:alice:escrow"], money["user:bob:available"], money[FEES]) == (0, 900, 100)
    assert_ledger_sound(engine, settings)


def test_a_release_of_more_than_remains_is_refused_hold_exceeded_and_moves_nothing(
    funded: WalletService, engine: Engine, settings: Settings
) -> None:
    funded.transfer_to_escrow("o-1", "alice", "bob", "5.00", idempotency_key="h-1")
    funded.release_from_escrow("o-1", amount="4.00", idempotency_key="r-1")
    message = refused(HoldExceededError, lambda: funded.release_from_escrow(
        "o-1", amount="1.01", idempotency_key="r-2"), engine)
    assert "1.01" in message and "1.00" in message
    assert record(engine, "r-2").error["code"] == "hold_exceeded"  # type: ignore[index]
    assert funded.hold("o-1")["remaining"] == Decimal("1.00")
    assert_ledger_sound(engine, settings)


def test_a_refund_of_a_partly_released_hold_returns_the_rest_and_closes_it_refunded(
    funded: WalletService, engine: Engine, settings: Settings
) -> None:
    funded.transfer_to_escrow("o-1", "alice", "bob", "10.00", idempotency_key="h-1")
    funded.release_from_escrow("o-1", amount="4.00", idempotency_key="r-1")
    result = funded.refund_from_escrow("o-1", idempotency_key="back")
    assert (result["amount"], result["status"], result["released"], result["refunded"],
            result["remaining"]) == ("6.00", "refunded", "4.00", "6.00", "0.00")
    assert transfers(engine, "back") == [("user:alice:escrow", "user:alice:available", 600,
                                          "refund")]
    assert funded.balance("alice").available == Decimal("96.00")
    refused(HoldNotOpenError, lambda: funded.release_from_escrow("o-1", idempotency_key="r-2"),
            engine)
    assert_ledger_sound(engine, settings)


def test_a_release_override_of_the_rate_applies_to_its_part_only(
    funded: WalletService, engine: Engine, settings: Settings
) -> None:
    funded.transfer_to_escrow("o-1", "alice", "bob", "10.00", idempotency_key="h-1")
    assert funded.release_from_escrow("o-1", amount="5.00", fee_rate="0",
                                      idempotency_key="r-1")["fee"] == "0.00"
    assert funded.release_from_escrow("o-1", idempotency_key="r-2")["fee"] == "0.50"
    assert funded.hold("o-1")["fee_rate"] == "0.10"
    assert_ledger_sound(engine, settings)


# --- expiry ---------------------------------------------------------------------------


def test_expire_hold_before_the_expiry_or_without_one_is_refused_hold_not_expired(
    funded: WalletService, engine: Engine, settings: Settings
) -> None:
    funded.transfer_to_escrow("o-1", "alice", "bob", "5.00", idempotency_key="h-1",
                              expires_in_s=3600)
    funded.transfer_to_escrow("o-2", "alice", "bob", "5.00", idempotency_key="h-2")
    for hold_id in ("o-1", "o-2"):
        early = {"type": "expire_hold", "idempotency_key": f"early-{hold_id}", "hold_id": hold_id}
        refused(HoldNotExpiredError, lambda c=early: raise_for_outcome(funded.execute(c)), engine)
    assert funded.hold("o-1")["status"] == "held"
    assert_ledger_sound(engine, settings)


def test_a_release_after_the_expiry_is_refused_hold_expired_before_the_expiry_ran(
    funded: WalletService, engine: Engine, settings: Settings
) -> None:
    funded.transfer_to_escrow("o-1", "alice", "bob", "5.00", idempotency_key="h-1",
                              expires_in_s=60)
    funded.release_from_escrow("o-1", amount="1.00", idempotency_key="r-1")
    expire_now(engine, "o-1")
    refused(HoldExpiredError, lambda: funded.release_from_escrow("o-1", idempotency_key="r-2"),
            engine)
    assert funded.hold("o-1")["status"] == "held"  # the expiry has not run yet
    assert_ledger_sound(engine, settings)


def test_the_expiry_pass_returns_the_rest_of_expired_holds_each_by_its_own_command(
    funded: WalletService, engine: Engine, settings: Settings, system: Signer
) -> None:
    for n in range(1, 5):
        funded.transfer_to_escrow(f"o-{n}", "alice", "bob", "5.00", idempotency_key=f"h-{n}",
                                  expires_in_s=3600)
    funded.release_from_escrow("o-1", amount="2.00", idempotency_key="r-1")
    for hold_id in ("o-1", "o-2", "o-3"):
        expire_now(engine, hold_id)
    counts = expiry.run_once(engine, settings, system, batch_max=2)
    assert (counts.found, counts.expired, counts.batches, counts.refused) == (3, 3, 2, {})
    one = funded.hold("o-1")
    assert (one["status"], one["released"], one["refunded"], one["remaining"]) == (
        "expired", Decimal("2.00"), Decimal("3.00"), Decimal("0.00"))
    assert funded.hold("o-4")["status"] == "held"
    expired = record(engine, "expire:o-1")
    assert (expired.status, expired.producer) == ("succeeded", "walletq-system")
    assert transfers(engine, "expire:o-1") == [("user:alice:escrow", "user:alice:available",
                                                300, "expiry")]
    assert ("succeeded", None) in audit_outcomes(engine, "expire:o-1")
    again = expiry.run_once(engine, settings, system)
    assert (again.found, again.expired) == (0, 0)
    message = refused(HoldExpiredError, lambda: funded.release_from_escrow(
        "o-2", idempotency_key="late"), engine)
    assert "o-2" in message
    assert funded.balance("alice").to_dict() == {"user": "alice", "available": "93.00",
                                                 "escrow": "5.00"}
    assert_ledger_sound(engine, settings)


def test_no_other_command_may_take_a_holds_expiry_key_so_nobody_can_stop_its_expiry(
    funded: WalletService, engine: Engine, settings: Settings, system: Signer
) -> None:
    # An attacker that may send anything but expire_hold squats `expire:o-1` (the key the
    # pass derives): had it been taken, the pass would count the hold "already" expired and
    # leave it open past its time. And an expire_hold may not name one hold under another's key.
    funded.transfer_to_escrow("o-1", "alice", "bob", "5.00", idempotency_key="h-1",
                              expires_in_s=3600)
    funded.transfer_to_escrow("o-2", "alice", "bob", "5.00", idempotency_key="h-2",
                              expires_in_s=3600)
    squats = [
        {"type": "transfer_tokens_between_users", "idempotency_key": "expire:o-1",
         "from_user": "alice", "to_user": "bob", "amount": "0.01"},
        {"type": "refund_from_escrow", "idempotency_key": "expire:o-1", "hold_id": "o-2"},
        {"type": "expire_hold", "idempotency_key": "expire:o-1", "hold_id": "o-2"},
    ]
    for squat in squats:
        message = refused(InvalidCommandError, lambda s=squat: funded.execute(dict(s)), engine)
        assert "expire" in message, message
    assert not key_taken(engine, "expire:o-1")  # no squat took the key
    expire_now(engine, "o-1")
    counts = expiry.run_once(engine, settings, system)
    assert (counts.found, counts.expired, counts.already) == (1, 1, 0)
    assert funded.hold("o-1")["status"] == "expired" and funded.hold("o-2")["status"] == "held"
    assert_ledger_sound(engine, settings)


def test_only_the_system_role_may_use_an_expiry_key_so_an_early_expire_hold_cannot_burn_it(
    funded: WalletService, engine: Engine, settings: Settings, system: Signer
) -> None:
    # An admin expiring a hold early under the pass's key would end `rejected`
    # (hold_not_expired) under `expire:o-1`, and the pass would find the key taken forever.
    funded.transfer_to_escrow("o-1", "alice", "bob", "5.00", idempotency_key="h-1",
                              expires_in_s=3600)
    message = refused(ForbiddenError, lambda: funded.execute(
        {"type": "expire_hold", "idempotency_key": "expire:o-1", "hold_id": "o-1"}), engine)
    assert "expiry pass's" in message
    assert not key_taken(engine, "expire:o-1")
    # Under a key of its own, an admin's early expiry is refused as it always was.
    refused(HoldNotExpiredError, lambda: raise_for_outcome(funded.execute(
        {"type": "expire_hold", "idempotency_key": "manual-1", "hold_id": "o-1"})), engine)
    expire_now(engine, "o-1")
    counts = expiry.run_once(engine, settings, system)
    assert (counts.found, counts.expired, counts.already) == (1, 1, 0)
    assert funded.hold("o-1")["status"] == "expired"
    assert_ledger_sound(engine, settings)


def test_the_pass_leaves_a_hold_whose_payer_takes_no_credit_until_the_wallet_thaws(
    funded: WalletService, engine: Engine, settings: Settings, system: Signer
) -> None:
    funded.transfer_to_escrow("o-1", "alice", "bob", "5.00", idempotency_key="h-1",
                              expires_in_s=3600)
    expire_now(engine, "o-1")
    raise_for_outcome(funded.execute({"type": "freeze_account", "idempotency_key": "f-1",
                                      "user": "alice", "reason": "review",
                                      "direction": "both"}))
    for _ in range(2):  # every run counts it waiting, none spends its key on a sure refusal
        counts = expiry.run_once(engine, settings, system)
        assert (counts.found, counts.waiting, counts.expired, counts.refused) == (0, 1, 0, {})
    assert not key_taken(engine, "expire:o-1")
    assert funded.hold("o-1")["status"] == "held"
    raise_for_outcome(funded.execute({"type": "unfreeze_account", "idempotency_key": "u-1",
                                      "user": "alice", "reason": "cleared"}))
    counts = expiry.run_once(engine, settings, system)
    assert (counts.found, counts.waiting, counts.expired) == (1, 0, 1)
    assert funded.hold("o-1")["status"] == "expired"
    assert_ledger_sound(engine, settings)


def test_holds_waiting_for_a_frozen_payer_never_fill_the_pass_ahead_of_other_holds(
    funded: WalletService, engine: Engine, settings: Settings, system: Signer
) -> None:
    # A web tier opening many small expiring holds for a payer who is then frozen for
    # everything: left waiting, they must not take every batch of every pass, or nobody
    # else's hold would expire.
    for n in range(5):
        funded.transfer_to_escrow(f"w-{n}", "alice", "bob", "0.01", idempotency_key=f"hw-{n}",
                                  expires_in_s=3600)
        expire_now(engine, f"w-{n}")
    funded.credit_wallet("bob", "1.00", idempotency_key="dep-bob")
    funded.transfer_to_escrow("later", "bob", "alice", "1.00", idempotency_key="h-later",
                              expires_in_s=3600)
    expire_now(engine, "later")
    raise_for_outcome(funded.execute({"type": "freeze_account", "idempotency_key": "f-1",
                                      "user": "alice", "reason": "review",
                                      "direction": "both"}))
    counts = expiry.run_once(engine, settings, system, batch_max=2, batches_max=1)
    assert (counts.found, counts.expired, counts.waiting) == (1, 1, 5)
    assert funded.hold("later")["status"] == "expired"
    assert [funded.hold(f"w-{n}")["status"] for n in range(5)] == ["held"] * 5
    assert_ledger_sound(engine, settings)


def test_a_hold_opened_to_expire_in_a_second_is_expired_by_a_pass_once_its_time_came(
    funded: WalletService, engine: Engine, settings: Settings, system: Signer
) -> None:
    funded.transfer_to_escrow("o-1", "alice", "bob", "5.00", idempotency_key="h-1",
                              expires_in_s=1)
    eventually(lambda: expiry.run_once(engine, settings, system).expired == 1, 10)
    assert funded.hold("o-1")["status"] == "expired"
    assert_ledger_sound(engine, settings)


@pytest.mark.parametrize("when", [
    {"expires_at": "2001-01-01T00:00:00Z"},
    {"expires_at": "2999-01-01T00:00:00+00:00"},
    {"expires_in_s": 0},
    {"expires_in_s": 10, "expires_at": "2999-01-01T00:00:00Z"},
])
def test_an_expiry_in_the_past_too_far_or_named_twice_is_refused_and_opens_nothing(
    funded: WalletService, engine: Engine, when: dict[str, Any]
) -> None:
    refused(InvalidCommandError, lambda: funded.transfer_to_escrow(
        "o-1", "alice", "bob", "5.00", idempotency_key="h-1", **when), engine)
    with pytest.raises(Exception, match="no hold"):
        funded.hold("o-1")


def test_the_system_producer_may_send_expire_hold_and_nothing_else(
    funded: WalletService, engine: Engine, settings: Settings, system: Signer
) -> None:
    as_system = WalletService(engine, settings, signer=system)
    refused(ForbiddenError, lambda: as_system.credit_wallet("mallory", "1.00"), engine)


# --- verify ----------------------------------------------------------------------------


def test_verify_names_a_hold_whose_totals_were_broken_by_hand(
    funded: WalletService, engine: Engine, settings: Settings
) -> None:
    from services.verify import verify_ledger

    funded.transfer_to_escrow("o-1", "alice", "bob", "10.00", idempotency_key="h-1")
    funded.release_from_escrow("o-1", amount="4.00", idempotency_key="r-1")
    assert_ledger_sound(engine, settings)
    with engine.begin() as conn:
        conn.execute(text("UPDATE holds SET released_minor = released_minor + 1"))
    failed = {c.name: c.detail for c in verify_ledger(engine, 2) if not c.ok}
    assert failed == {
        "escrow_equals_open_holds": "1 users disagree: alice (escrow 600, open holds 599)",
        "holds_add_up": "1 holds do not add up: hold o-1 (amount 1000: released 401 (fee 40), "
                        "its releases moved 400 (fee 40))"}
