"""Issue 9, the accounts' half, on PostgreSQL: overdraft limits, freezes, closing, reversals
and the balance after each leg; every refusal moves nothing and leaves its audit row."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from services.atomic_transaction_manager import FinancialIntegrityError
from services.errors import (
    AccountClosedError,
    AccountFrozenError,
    AccountNotEmptyError,
    AlreadyReversedError,
    InsufficientBalanceError,
    LimitExceededError,
    NotReversibleError,
)
from services.settings import Settings
from services.wallet_service import WalletService, raise_for_outcome
from tests.support.ledger import assert_ledger_sound, audit, balances, count, record, transfers

EXT, TREASURY, FEES = "system:external", "platform:treasury", "platform:fees"


def avail(user: str) -> str:
    return f"user:{user}:available"


def escrow(user: str) -> str:
    return f"user:{user}:escrow"


def run(service: WalletService, type_: str, key: str | None = None, **fields: Any
        ) -> dict[str, Any]:
    data = {"type": type_, "idempotency_key": key or f"k-{uuid.uuid4().hex[:12]}", **fields}
    return raise_for_outcome(service.execute(data))


def refused(service: WalletService, error: type[FinancialIntegrityError], code: str,
            type_: str, **fields: Any) -> None:
    """The command is refused with `code`; nothing moved; a rejected record and audit row."""
    engine = service.engine
    key = f"r-{uuid.uuid4().hex[:12]}"
    before = (balances(engine), transfers(engine), count(engine, "account_events"),
              count(engine, "reversals"), _states(engine))
    with pytest.raises(error) as caught:
        run(service, type_, key, **fields)
    assert caught.value.code == code
    after = (balances(engine), transfers(engine), count(engine, "account_events"),
             count(engine, "reversals"), _states(engine))
    assert after == before
    rec = record(engine, key)
    assert rec.status == "rejected" and rec.error is not None and rec.error["code"] == code
    rows = audit(engine, key)
    assert [(row["outcome"], row["error_code"]) for row in rows] == [("rejected", code)]
    assert_ledger_sound(engine, service.settings)


def _states(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(
            "SELECT code, overdraft_limit_minor, frozen, frozen_until, closed_at FROM accounts "
            "ORDER BY code"))]


@pytest.fixture
def funded(service: WalletService) -> WalletService:
    """alice 100.00 and bob 10.00 of treasury tokens; treasury keeps 890.00."""
    service.admin_create_tokens("1000.00", idempotency_key="mint-0")
    service.admin_sell_tokens_to_user("alice", "100.00", idempotency_key="sale-0")
    service.admin_sell_tokens_to_user("bob", "10.00", idempotency_key="sale-1")
    return service


# --- limits -----------------------------------------------------------------------------


def test_an_overdraft_limit_lets_available_go_down_to_minus_the_limit(
        funded: WalletService, engine: Engine, settings: Settings) -> None:
    result = run(funded, "set_account_limit", user="bob", limit="5.00", reason="trusted")
    assert result == {"user": "bob", "limit": "5.00", "previous_limit": "0.00",
                      "available": "10.00"}
    assert run(funded, "debit_wallet", user="bob", amount="14.00")["available"] == "-4.00"
    refused(funded, LimitExceededError, "limit_exceeded", "debit_wallet", user="bob",
            amount="1.01")
    assert run(funded, "debit_wallet", user="bob", amount="1.00")["available"] == "-5.00"
    assert balances(engine)[avail("bob")] == -500
    assert_ledger_sound(engine, settings)


def test_a_hold_counts_against_the_limit(funded: WalletService, engine: Engine) -> None:
    run(funded, "set_account_limit", user="bob", limit="5.00")
    funded.transfer_to_escrow("h-1", "bob", "alice", "12.00")
    assert balances(engine)[avail("bob")] == -200
    refused(funded, LimitExceededError, "limit_exceeded", "transfer_to_escrow", hold_id="h-2",
            payer="bob", payee="alice", amount="3.01")


def test_a_limit_the_balance_is_already_below_is_refused(funded: WalletService) -> None:
    run(funded, "set_account_limit", user="bob", limit="5.00")
    run(funded, "debit_wallet", user="bob", amount="13.00")
    refused(funded, LimitExceededError, "limit_exceeded", "set_account_limit", user="bob",
            limit="2.99")
    run(funded, "set_account_limit", user="bob", limit="3.00")


def test_without_a_limit_the_refusal_stays_insufficient_balance(funded: WalletService) -> None:
    refused(funded, InsufficientBalanceError, "insufficient_balance", "debit_wallet",
            user="bob", amount="10.01")
    run(funded, "set_account_limit", user="bob", limit="1.00")
    run(funded, "set_account_limit", user="bob", limit="0")
    refused(funded, InsufficientBalanceError, "insufficient_balance", "debit_wallet",
            user="bob", amount="10.01")


def test_the_database_refuses_a_balance_below_the_limit(funded: WalletService,
                                                        engine: Engine) -> None:
    run(funded, "set_account_limit", user="bob", limit="5.00")
    with pytest.raises(Exception, match="balance_nonnegative"), engine.begin() as conn:
        conn.execute(text("UPDATE accounts SET balance_minor = -501 WHERE code = :c"),
                     {"c": avail("bob")})
    with engine.begin() as conn:
        conn.execute(text("UPDATE accounts SET balance_minor = -500 WHERE code = :c"),
                     {"c": avail("bob")})
        conn.execute(text("UPDATE accounts SET balance_minor = 1000 WHERE code = :c"),
                     {"c": avail("bob")})


def test_a_daily_debit_limit_counts_the_utc_days_debits(funded: WalletService, engine: Engine,
                                                        settings: Settings) -> None:
    result = run(funded, "set_account_limit", user="alice", limit="0",
                 daily_debit_limit="10.00")
    assert result["daily_debit_limit"] == "10.00"
    funded.debit_wallet("alice", "4.00")
    funded.transfer_to_escrow("h-1", "alice", "bob", "5.00")
    refused(funded, LimitExceededError, "limit_exceeded", "transfer_tokens_between_users",
            from_user="alice", to_user="bob", amount="1.01")
    funded.transfer_tokens_between_users("alice", "bob", "1.00")
    funded.refund_from_escrow("h-1")  # a credit: the day's debits stay what they were
    refused(funded, LimitExceededError, "limit_exceeded", "debit_wallet", user="alice",
            amount="0.01")
    funded.debit_wallet("bob", "5.00")  # bob has no daily limit
    run(funded, "set_account_limit", user="alice", limit="0", daily_debit_limit="0")
    funded.debit_wallet("alice", "20.00")
    assert_ledger_sound(engine, settings)


# --- freeze and close --------------------------------------------------------------------


def test_a_frozen_account_refuses_debits_and_still_receives_credits(
        funded: WalletService, engine: Engine, settings: Settings) -> None:
    result = run(funded, "freeze_account", user="bob", reason="fraud review")
    assert result == {"user": "bob", "direction": "debits", "until": None}
    for type_, fields in [
        ("debit_wallet", {"user": "bob", "amount": "1.00"}),
        ("transfer_tokens_between_users", {"from_user": "bob", "to_user": "alice",
                                           "amount": "1.00"}),
        ("transfer_to_escrow", {"hold_id": "h-9", "payer": "bob", "payee": "alice",
                                "amount": "1.00"}),
        ("user_sell_tokens_to_admin", {"user": "bob", "amount": "1.00"}),
    ]:
        refused(funded, AccountFrozenError, "account_frozen", type_, **fields)
    funded.transfer_tokens_between_users("alice", "bob", "1.00")
    assert balances(engine)[avail("bob")] == 1100
    assert run(funded, "unfreeze_account", user="bob", reason="cleared") == {
        "user": "bob", "was_frozen": True}
    funded.debit_wallet("bob", "1.00")
    assert_ledger_sound(engine, settings)


def test_frozen_for_both_refuses_credits_too(funded: WalletService) -> None:
    run(funded, "freeze_account", user="bob", reason="court order", direction="both")
    refused(funded, AccountFrozenError, "account_frozen", "transfer_tokens_between_users",
            from_user="alice", to_user="bob", amount="1.00")
    refused(funded, AccountFrozenError, "account_frozen", "credit_wallet", user="bob",
            amount="1.00")


def test_a_freeze_ends_by_itself_at_its_until(funded: WalletService, engine: Engine,
                                              settings: Settings) -> None:
    run(funded, "freeze_account", user="bob", reason="cool-off", until="2000-01-01T00:00:00Z")
    funded.debit_wallet("bob", "1.00")  # the freeze ended long ago
    run(funded, "freeze_account", user="bob", reason="cool-off", until="2999-01-01T00:00:00Z")
    refused(funded, AccountFrozenError, "account_frozen", "debit_wallet", user="bob",
            amount="1.00")
    assert_ledger_sound(engine, settings)


def test_close_needs_a_zero_balance_and_no_open_hold(funded: WalletService, engine: Engine,
                                                     settings: Settings) -> None:
    refused(funded, AccountNotEmptyError, "account_not_empty", "close_account", user="bob",
            reason="leaving")
    funded.transfer_tokens_between_users("bob", "alice", "10.00")
    funded.transfer_to_escrow("h-1", "alice", "bob", "1.00")
    refused(funded, AccountNotEmptyError, "account_not_empty", "close_account", user="bob",
            reason="leaving")
    funded.refund_from_escrow("h-1")
    assert run(funded, "close_account", user="bob", reason="leaving") == {
        "user": "bob", "closed": True}
    refused(funded, AccountClosedError, "account_closed", "credit_wallet", user="bob",
            amount="1.00")
    refused(funded, AccountClosedError, "account_closed", "transfer_tokens_between_users",
            from_user="alice", to_user="bob", amount="1.00")
    refused(funded, AccountClosedError, "account_closed", "freeze_account", user="bob",
            reason="x")
    refused(funded, AccountClosedError, "account_closed", "close_account", user="bob",
            reason="x")
    assert_ledger_sound(engine, settings)


def test_account_changes_of_an_unknown_user_are_refused(funded: WalletService) -> None:
    from services.errors import UnknownUserError
    refused(funded, UnknownUserError, "unknown_user", "freeze_account", user="nobody",
            reason="x")
    refused(funded, UnknownUserError, "unknown_user", "close_account", user="nobody",
            reason="x")


def test_account_events_are_append_only(funded: WalletService, engine: Engine) -> None:
    run(funded, "freeze_account", user="bob", reason="x")
    for statement in ("UPDATE account_events SET reason = 'y'", "DELETE FROM account_events",
                      "TRUNCATE account_events", "TRUNCATE reversals"):
        with pytest.raises(Exception, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))


# --- reversals ---------------------------------------------------------------------------


def test_a_reversal_posts_the_compensating_transfers(funded: WalletService, engine: Engine,
                                                     settings: Settings) -> None:
    funded.transfer_tokens_between_users("alice", "bob", "2.50", idempotency_key="t-1")
    before = balances(engine)
    result = run(funded, "reverse_command", "rev-1", original_key="t-1", reason="mistake")
    assert result == {"original_key": "t-1", "original_type": "transfer_tokens_between_users",
                      "transfers": 1, "amount": "2.50"}
    assert transfers(engine, "rev-1") == [(avail("bob"), avail("alice"), 250, "reversal")]
    after = balances(engine)
    assert after[avail("alice")] == before[avail("alice")] + 250
    assert after[avail("bob")] == before[avail("bob")] - 250
    assert transfers(engine, "t-1") == [(avail("alice"), avail("bob"), 250, "transfer")]
    refused(funded, AlreadyReversedError, "already_reversed", "reverse_command",
            original_key="t-1", reason="again")
    refused(funded, NotReversibleError, "not_reversible", "reverse_command",
            original_key="rev-1", reason="loop")
    assert_ledger_sound(engine, settings)


def test_reversing_a_release_pays_the_payer_back_and_leaves_the_hold_closed(
        funded: WalletService, engine: Engine, settings: Settings) -> None:
    funded.transfer_to_escrow("h-1", "alice", "bob", "10.00", idempotency_key="hold-1")
    funded.release_from_escrow("h-1", idempotency_key="rel-1")
    run(funded, "reverse_command", "rev-1", original_key="rel-1", reason="disputed")
    assert sorted(transfers(engine, "rev-1")) == sorted([
        (FEES, avail("alice"), 100, "reversal"), (avail("bob"), avail("alice"), 900, "reversal")])
    assert balances(engine)[escrow("alice")] == 0
    with engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM holds WHERE hold_id = 'h-1'")
                            ).scalar_one() == "released"
    assert balances(engine)[avail("alice")] == 10000
    refused(funded, NotReversibleError, "not_reversible", "reverse_command",
            original_key="hold-1", reason="x")
    assert_ledger_sound(engine, settings)


def test_a_reversal_that_would_overdraw_moves_nothing(funded: WalletService) -> None:
    funded.transfer_tokens_between_users("alice", "bob", "5.00", idempotency_key="t-1")
    funded.transfer_tokens_between_users("bob", "alice", "15.00")
    run(funded, "set_account_limit", user="bob", limit="100.00")
    refused(funded, InsufficientBalanceError, "insufficient_balance", "reverse_command",
            original_key="t-1", reason="x")


def test_unknown_rejected_and_unreversible_originals_are_refused(funded: WalletService) -> None:
    with pytest.raises(InsufficientBalanceError):
        funded.debit_wallet("bob", "99.00", idempotency_key="wd-x")
    run(funded, "freeze_account", "fz-1", user="bob", reason="x")
    for original in ("no-such-key", "wd-x", "fz-1"):
        refused(funded, NotReversibleError, "not_reversible", "reverse_command",
                original_key=original, reason="x")


def test_a_frozen_payee_makes_a_reversal_refused(funded: WalletService) -> None:
    funded.transfer_tokens_between_users("alice", "bob", "1.00", idempotency_key="t-1")
    run(funded, "freeze_account", user="bob", reason="x")
    refused(funded, AccountFrozenError, "account_frozen", "reverse_command",
            original_key="t-1", reason="x")


# --- balance after each leg --------------------------------------------------------------


def _legs(engine: Engine, code: str) -> list[tuple[int, int]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(  # type: ignore[misc]
            "SELECT CASE WHEN d.code = :c THEN -t.amount_minor ELSE t.amount_minor END, "
            "CASE WHEN d.code = :c THEN t.debit_balance_after_minor "
            "ELSE t.credit_balance_after_minor END FROM transfers t "
            "JOIN accounts d ON d.id = t.debit_account_id "
            "JOIN accounts k ON k.id = t.credit_account_id "
            "WHERE d.code = :c OR k.code = :c ORDER BY t.id"), {"c": code})]


def test_every_leg_records_the_balance_after_it(funded: WalletService, engine: Engine) -> None:
    funded.transfer_to_escrow("h-1", "alice", "bob", "10.00")
    funded.release_from_escrow("h-1")
    funded.transfer_tokens_between_users("bob", "alice", "3.00")
    for code in (avail("alice"), avail("bob"), TREASURY, FEES, escrow("alice")):
        running = 0
        for delta, after in _legs(engine, code):
            running += delta
            assert after == running, code
        assert running == balances(engine)[code]


def test_verify_catches_a_hand_broken_balance_after(funded: WalletService, engine: Engine,
                                                    settings: Settings) -> None:
    from services.verify import verify_ledger
    funded.transfer_tokens_between_users("alice", "bob", "1.00", idempotency_key="t-1")
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE transfers DISABLE TRIGGER transfers_append_only"))
        conn.execute(text("UPDATE transfers SET credit_balance_after_minor = "
                          "credit_balance_after_minor + 1 WHERE id = (SELECT MAX(id) FROM "
                          "transfers)"))
        conn.execute(text("ALTER TABLE transfers ENABLE TRIGGER transfers_append_only"))
    checks = {c.name: c for c in verify_ledger(engine, settings.asset_scale)}
    assert not checks["balance_after_chain"].ok
    assert "user:bob:available" in checks["balance_after_chain"].detail
    others = [name for name, c in checks.items() if not c.ok]
    assert others == ["balance_after_chain"]



def _failed(engine: Engine, settings: Settings) -> dict[str, str]:
    from services.verify import verify_ledger
    return {c.name: c.detail for c in verify_ledger(engine, settings.asset_scale) if not c.ok}


def test_verify_names_a_debit_written_by_hand_while_frozen(
        funded: WalletService, engine: Engine, settings: Settings) -> None:
    run(funded, "freeze_account", "fz", user="bob", reason="x")
    with engine.begin() as conn:
        bob, ext = (conn.execute(text("SELECT id, balance_minor FROM accounts WHERE code = :c"),
                                 {"c": code}).one() for code in (avail("bob"), TREASURY))
        conn.execute(text(
            "INSERT INTO transfers (command_id, debit_account_id, credit_account_id, "
            "amount_minor, kind, debit_balance_after_minor, credit_balance_after_minor) "
            "SELECT id, :bob, :ext, 100, 'debit', :bob_after, :ext_after FROM commands "
            "WHERE idempotency_key = 'sale-1'"),
            {"bob": bob[0], "ext": ext[0], "bob_after": bob[1] - 100, "ext_after": ext[1] + 100})
        conn.execute(text("UPDATE accounts SET balance_minor = balance_minor - 100 "
                          "WHERE id = :id"), {"id": bob[0]})
        conn.execute(text("UPDATE accounts SET balance_minor = balance_minor + 100 "
                          "WHERE id = :id"), {"id": ext[0]})
    failed = _failed(engine, settings)
    assert "user:bob:available" in failed["frozen_accounts_not_debited"]
    assert "balance_after_chain" not in failed  # the forged leg's running balance adds up


def test_verify_names_a_reversal_that_does_not_undo_its_original(
        funded: WalletService, engine: Engine, settings: Settings) -> None:
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO reversals (command_id, original_command_id, reason) "
            "SELECT r.id, o.id, 'forged' FROM commands r, commands o "
            "WHERE r.idempotency_key = 'sale-1' AND o.idempotency_key = 'sale-0'"))
    failed = _failed(engine, settings)
    assert list(failed) == ["reversals_net_to_zero"]
    assert "sale-0" in failed["reversals_net_to_zero"]


def test_a_payout_from_a_frozen_account_is_refused_and_pays_nothing(
        funded: WalletService, engine: Engine, settings: Settings) -> None:
    run(funded, "freeze_account", user="alice", reason="x")
    before = (balances(engine), transfers(engine))
    record_ = funded.execute({
        "type": "payout_batch", "idempotency_key": "pay-1", "from_account": avail("alice"),
        "items": [{"user": "bob", "amount": "1.00", "reference": "r-1"}]})
    assert record_.status == "rejected" and record_.error is not None
    assert record_.error["code"] == "account_frozen"
    assert (balances(engine), transfers(engine)) == before
    assert_ledger_sound(engine, settings)


def test_a_payout_rejects_the_items_of_wallets_that_take_no_credit_and_pays_the_rest(
        funded: WalletService, engine: Engine, settings: Settings) -> None:
    funded.transfer_tokens_between_users("bob", "alice", "10.00")
    run(funded, "close_account", user="bob", reason="leaving")
    funded.credit_wallet("carol", "1.00")
    run(funded, "freeze_account", user="carol", reason="court order", direction="both")
    funded.credit_wallet("dave", "1.00")
    run(funded, "freeze_account", user="dave", reason="debits only")  # credits still come in
    items = [{"user": user, "amount": "2.00", "reference": f"r-{user}"}
             for user in ("bob", "carol", "dave", "erin")]
    done = funded.execute({"type": "payout_batch", "idempotency_key": "pay-1",
                           "from_account": "platform:treasury", "items": items})
    assert done.status == "succeeded" and done.result is not None
    assert (done.result["paid"], done.result["rejected"]) == (2, 2)
    assert done.result["rejected_by_code"] == {"account_closed": 1, "account_frozen": 1}
    after = balances(engine)
    assert (after["user:bob:available"], after["user:carol:available"]) == (0, 100)
    assert (after["user:dave:available"], after["user:erin:available"]) == (300, 200)
    # Atomic: one wallet that takes no credit refuses the whole batch, naming it.
    refused(funded, AccountFrozenError, "account_frozen", "payout_batch",
            from_account="platform:treasury", atomic=True,
            items=[{"user": "erin", "amount": "1.00", "reference": "r-2"},
                   {"user": "carol", "amount": "1.00", "reference": "r-3"}])
    assert_ledger_sound(engine, settings)


def test_a_wallet_frozen_between_a_chunks_decision_and_its_credit_makes_the_chunk_run_again(
        funded: WalletService, engine: Engine, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The decision reads the wallets' state without a lock; the credit's UPDATE holds the
    rows, and the read after it sees a freeze that came between: nothing of that chunk
    stays, and it runs again, deciding on the freeze."""
    from services.payouts import executor

    funded.credit_wallet("carol", "1.00")
    run(funded, "freeze_account", user="carol", reason="court order", direction="both")
    real = executor.recipients_blocked
    calls: list[int] = []

    def missed_the_freeze_once(conn: Any, users: Any) -> dict[str, str]:
        calls.append(1)
        return {} if len(calls) == 1 else real(conn, users)

    monkeypatch.setattr(executor, "recipients_blocked", missed_the_freeze_once)
    done = funded.execute({"type": "payout_batch", "idempotency_key": "pay-1",
                           "from_account": "platform:treasury",
                           "items": [{"user": user, "amount": "2.00", "reference": f"r-{user}"}
                                     for user in ("carol", "erin")]})
    assert done.status == "succeeded" and done.result is not None
    assert done.result["rejected_by_code"] == {"account_frozen": 1}
    assert len(calls) == 4  # decide, check (the race), decide again, check
    after = balances(engine)
    assert (after["user:carol:available"], after["user:erin:available"]) == (100, 200)
    assert_ledger_sound(engine, settings)
