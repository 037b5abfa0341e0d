"""verify_ledger: each invariant of docs/ARCHITECTURE.md, and the account or command that breaks it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import insert, text
from sqlalchemy.engine import Engine

from services import schema
from services.canonical import canonical_payload, payload_hash
from services.command_fields import CommandLimits
from services.commands import parse_command
from services.settings import Settings
from services.signing import signed_form
from services.verify import verify_ledger
from services.wallet_service import WalletService
from tests.support.builders import item, payout
from tests.support.ledger import CHECKS, assert_ledger_sound
from tests.support.signing import signed


@pytest.fixture
def busy(service: WalletService) -> WalletService:
    """Every operation once, and a refusal."""
    service.admin_create_tokens("1000.00", idempotency_key="mint")
    service.admin_sell_tokens_to_user("alice", "100.00", idempotency_key="sale")
    service.credit_wallet("bob", "10.00", idempotency_key="dep")
    service.debit_wallet("bob", "1.00", idempotency_key="wd")
    service.transfer_tokens_between_users("alice", "bob", "5.00", idempotency_key="t-1")
    service.transfer_to_escrow("o-1", "alice", "bob", "20.00", idempotency_key="h-1")
    service.transfer_to_escrow("o-2", "alice", "carol", "7.00", idempotency_key="h-2")
    service.transfer_to_escrow("o-3", "bob", "alice", "3.00", idempotency_key="h-3")
    service.release_from_escrow("o-1", idempotency_key="r-1")
    service.refund_from_escrow("o-2", idempotency_key="f-2")
    service.user_sell_tokens_to_admin("alice", "1.00", idempotency_key="cash")
    with pytest.raises(Exception, match="holds"):
        service.debit_wallet("bob", "1000.00", idempotency_key="wd-too-much")
    return service


def failures(engine: Engine) -> dict[str, str]:
    return {c.name: c.detail for c in verify_ledger(engine, 2) if not c.ok}


def sql(engine: Engine, *statements: str) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))


def test_a_ledger_after_every_operation_passes_all_eight_checks(busy: WalletService, engine: Engine) -> None:
    checks = verify_ledger(engine, 2)
    assert [c.name for c in checks] == list(CHECKS)
    assert all(c.ok for c in checks), checks
    details = {c.name: c.detail for c in checks}
    assert details["sum_of_balances_is_zero"] == "sum of all balances = 0 minor units"
    assert details["commands_have_their_transfers"] == (
        "12 commands have exactly the transfers their outcome implies")


def test_an_empty_ledger_passes(engine: Engine, settings: Settings) -> None:
    assert_ledger_sound(engine, settings)


def test_a_balance_edited_behind_the_ledgers_back_is_named(busy: WalletService, engine: Engine) -> None:
    sql(engine, "UPDATE accounts SET balance_minor = balance_minor + 5 WHERE code = 'platform:fees'")
    failed = failures(engine)
    # ... and the running balance (issue 9) no longer adds up
    assert set(failed) == {"sum_of_balances_is_zero", "balance_equals_transfers",
                           "balance_after_chain"}
    assert failed["sum_of_balances_is_zero"] == "sum of all balances = 5 minor units"
    assert failed["balance_equals_transfers"] == (
        "1 accounts disagree: platform:fees (balance 205, transfers 200)")


def test_a_negative_balance_that_got_past_a_dropped_constraint_is_named(
    busy: WalletService, engine: Engine
) -> None:
    sql(engine, "ALTER TABLE accounts DROP CONSTRAINT ck_accounts_balance_nonnegative",
        "UPDATE accounts SET balance_minor = -1 WHERE code = 'user:bob:available'")
    failed = failures(engine)
    assert failed["no_forbidden_negative_balance"] == (
        "1 accounts below zero: user:bob:available (-1)")


def test_an_escrow_that_disagrees_with_its_open_holds_is_named(
    busy: WalletService, engine: Engine
) -> None:
    sql(engine, "UPDATE holds SET status = 'released', closed_by = opened_by, "
                "released_minor = amount_minor WHERE hold_id = 'o-3'")
    assert failures(engine) == {
        "escrow_equals_open_holds": "1 users disagree: bob (escrow 300, open holds 0)",
        "holds_add_up": "1 holds do not add up: hold o-3 (amount 300: released 300 (fee None), "
                        "its releases moved 0 (fee 0))"}


def test_a_succeeded_command_whose_transfers_do_not_match_its_payload_is_named(
    busy: WalletService, engine: Engine
) -> None:
    sql(engine, "UPDATE commands SET payload = replace(payload, '\"5.00\"', '\"6.00\"')"
                " WHERE idempotency_key = 't-1'")
    assert failures(engine) == {
        "commands_have_their_transfers": (
            "1 commands disagree: t-1 (transfer_tokens_between_users succeeded: "
            "1 transfers of 500 minor units)"),
        "commands_are_signed": (
            "1 commands moved money unsigned or unauthorized: t-1 (transfer_tokens_between_users "
            "succeeded: a stored command that is not what its producer signed)")}


def test_a_refused_command_with_transfers_is_named(busy: WalletService, engine: Engine) -> None:
    sql(engine, "UPDATE commands SET status = 'rejected', error_code = 'internal'"
                " WHERE idempotency_key = 'dep'")
    detail = failures(engine)["commands_have_their_transfers"]
    assert detail == "1 commands disagree: dep (credit_wallet rejected: 1 transfers)"


def test_a_succeeded_command_without_its_transfers_is_named(busy: WalletService, engine: Engine) -> None:
    sql(engine, "UPDATE commands SET status = 'succeeded', error_code = NULL"
                " WHERE idempotency_key = 'wd-too-much'")
    assert "wd-too-much (debit_wallet succeeded: 0 transfers of 0 minor units)" in (
        failures(engine)["commands_have_their_transfers"])


def test_a_release_that_moved_less_than_its_hold_is_named(busy: WalletService, engine: Engine) -> None:
    sql(engine, "UPDATE holds SET amount_minor = 2100, released_minor = 2100 WHERE hold_id = 'o-1'")
    assert "hold o-1 (amount 2100: opened with 2000; released 2100 (fee 200), its releases moved " \
        "2000 (fee 200))" in failures(engine)["holds_add_up"]


def test_a_repeated_idempotency_key_that_got_past_a_dropped_constraint_is_named(
    busy: WalletService, engine: Engine
) -> None:
    sql(engine, "ALTER TABLE commands DROP CONSTRAINT uq_commands_idempotency_key",
        "INSERT INTO commands (idempotency_key, type, payload, payload_hash, status)"
        " SELECT idempotency_key, type, payload, payload_hash, 'processing' FROM commands"
        " WHERE idempotency_key = 'mint'")
    assert failures(engine) == {"idempotency_keys_unique": "1 keys repeated: mint (2 times)"}


def test_many_offenders_are_named_ten_at_a_time_and_then_counted(
    service: WalletService, engine: Engine
) -> None:
    for i in range(13):
        service.credit_wallet(f"user{i:02d}", "1.00", idempotency_key=f"dep-{i}")
    sql(engine, "UPDATE accounts SET balance_minor = 7 WHERE code LIKE 'user:%'")
    detail = failures(engine)["balance_equals_transfers"]
    assert detail.startswith("13 accounts disagree: user:user00:available (balance 7, transfers 100)")
    assert detail.endswith("and 3 more")
    assert "user:user09:available" in detail and "user:user10:available" not in detail


# --- invariants 7 and 8: rows written behind walletq's back ---------------------------------


def forge_credit(engine: Engine, key: str, user: str, minor: int, *, audited: str | None = None,
                 message: dict[str, Any] | None = None) -> None:
    """The issue's forger: a succeeded command, the user's account and a transfer from
    system:issuance, balances kept consistent (so invariants 1-6 hold), and optionally an
    audit row written by hand too."""
    payload = json.dumps({"type": "credit_wallet", "idempotency_key": key, "user": user,
                          "amount": f"{minor // 100}.{minor % 100:02d}"}, sort_keys=True)
    signed_part = {}
    if message is not None:
        form = signed_form(message)
        payload = canonical_payload(parse_command(message, CommandLimits()))
        signed_part = {"producer": form.producer, "signed_payload": form.text,
                       "signature": form.signature}
    with engine.begin() as conn:
        command_id = conn.execute(insert(schema.commands).values(
            idempotency_key=key, type="credit_wallet", payload=payload,
            payload_hash=payload_hash(payload), status="succeeded", attempts=1,
            **signed_part).returning(schema.commands.c.id)).scalar_one()
        conn.execute(text("INSERT INTO accounts (code, kind, user_id, may_go_negative) VALUES "
                          "(:code, 'user_available', :user, false) ON CONFLICT DO NOTHING"),
                     {"code": f"user:{user}:available", "user": user})
        conn.execute(text("INSERT INTO accounts (code, kind, may_go_negative) VALUES "
                          "('system:issuance', 'issuance', true) ON CONFLICT DO NOTHING"))
        conn.execute(text("""
            INSERT INTO transfers (command_id, debit_account_id, credit_account_id, amount_minor, kind)
            SELECT :cid, d.id, c.id, :minor, 'credit' FROM accounts d, accounts c
            WHERE d.code = 'system:issuance' AND c.code = :credit"""),
                     {"cid": command_id, "minor": minor, "credit": f"user:{user}:available"})
        conn.execute(text("UPDATE accounts SET balance_minor = balance_minor - :m "
                          "WHERE code = 'system:issuance'"), {"m": minor})
        conn.execute(text("UPDATE accounts SET balance_minor = balance_minor + :m WHERE code = :c"),
                     {"m": minor, "c": f"user:{user}:available"})
        if audited is not None:
            conn.execute(insert(schema.audit_events).values(
                command_id=command_id, idempotency_key=key, command_type="credit_wallet",
                outcome=audited, accounts=[], amounts=[], detail={}))


def test_a_command_account_and_transfer_written_by_hand_are_named_while_balances_agree(
    busy: WalletService, engine: Engine
) -> None:
    forge_credit(engine, "forged", "forger", 1_000_000_00)
    failed = failures(engine)
    # ... and the running balance (issue 9) no longer adds up
    assert set(failed) == {"commands_are_signed", "commands_have_their_audit",
                           "balance_after_chain"}
    assert failed["commands_are_signed"] == (
        "1 commands moved money unsigned or unauthorized: forged (credit_wallet succeeded: "
        "no signature)")
    assert failed["commands_have_their_audit"] == (
        "1 commands disagree with their audit: forged (credit_wallet succeeded: no audit row)")


def test_a_forged_audit_row_does_not_hide_a_forged_command(busy: WalletService, engine: Engine
                                                           ) -> None:
    forge_credit(engine, "forged", "forger", 500, audited="succeeded")
    failed = failures(engine)
    assert "forged (credit_wallet succeeded: no signature)" in failed["commands_are_signed"]
    assert ("forged (credit_wallet succeeded: transfers its audit row does not name: "
            "system:issuance->user:forger:available 500") in failed["commands_have_their_audit"]


def test_a_validly_signed_command_its_producers_role_forbids_is_named(
    busy: WalletService, engine: Engine
) -> None:
    # The web producer's key signed a credit (a payments type), and the row was written by
    # hand with the web producer's database credentials: the signature holds, the role not.
    message = signed({"type": "credit_wallet", "idempotency_key": "by-web", "user": "eve",
                      "amount": "5.00"}, "test-web")
    forge_credit(engine, "by-web", "eve", 500, message=message, audited="succeeded")
    failed = failures(engine)
    assert failed["commands_are_signed"] == (
        "1 commands moved money unsigned or unauthorized: by-web (credit_wallet succeeded: "
        "producer 'test-web' (role web) lacks credit_wallet)")


def test_a_command_signed_by_another_key_than_its_producers_is_named(
    busy: WalletService, engine: Engine
) -> None:
    message = signed({"type": "credit_wallet", "idempotency_key": "fake", "user": "eve",
                      "amount": "5.00"}, "test-payments", key=Ed25519PrivateKey.generate())
    forge_credit(engine, "fake", "eve", 500, message=message, audited="succeeded")
    assert "fake (credit_wallet succeeded: a signature no key of 'test-payments' verifies)" in (
        failures(engine)["commands_are_signed"])


def test_a_transfer_added_by_hand_to_a_real_command_is_named_with_its_accounts(
    busy: WalletService, engine: Engine
) -> None:
    sql(engine, """INSERT INTO transfers (command_id, debit_account_id, credit_account_id,
                                          amount_minor, kind)
                   SELECT c.id, d.id, k.id, 700, 'credit' FROM commands c, accounts d, accounts k
                   WHERE c.idempotency_key = 'dep' AND d.code = 'system:external'
                     AND k.code = 'user:bob:available'""",
        "UPDATE accounts SET balance_minor = balance_minor - 700 WHERE code = 'system:external'",
        "UPDATE accounts SET balance_minor = balance_minor + 700 WHERE code = 'user:bob:available'")
    failed = failures(engine)
    # ... and the running balance (issue 9) no longer adds up
    assert set(failed) == {"commands_have_their_transfers", "commands_have_their_audit",
                           "balance_after_chain"}
    assert ("dep (credit_wallet succeeded: transfers its audit row does not name: "
            "system:external->user:bob:available 700; audited but not moved: none)"
            in failed["commands_have_their_audit"])


def test_commands_from_before_signatures_pass_only_up_to_the_recorded_epoch(
    busy: WalletService, engine: Engine
) -> None:
    forge_credit(engine, "old-1", "olga", 100, audited="succeeded")
    assert "old-1" in failures(engine)["commands_are_signed"]
    sql(engine, "UPDATE signature_epoch SET legacy_command_id_max = "
                "(SELECT id FROM commands WHERE idempotency_key = 'old-1')")
    failed = failures(engine)
    assert "commands_are_signed" not in failed
    forge_credit(engine, "new-1", "nina", 100, audited="succeeded")
    assert "new-1" in failures(engine)["commands_are_signed"]
# --- payouts: a batch's transfers are its paid items, its items the ones it counts -------


@pytest.fixture
def paid(service: WalletService) -> WalletService:
    """A payout of three items: two paid (3.00 and 4.00), one rejected."""
    service.admin_create_tokens("7.00", idempotency_key="mint")
    service.execute(payout("pay-1", [item("ann", "3.00", "r-1"), item("ben", "4.00", "r-2"),
                                     item("cy", "1.00", "r-3")]))
    return service


def test_a_payout_whose_progress_counts_another_payment_is_named(
    paid: WalletService, engine: Engine
) -> None:
    assert failures(engine) == {}
    sql(engine, "UPDATE payout_batches SET items_paid = items_paid + 1,"
                " items_rejected = items_rejected - 1")
    assert failures(engine) == {"commands_have_their_transfers": (
        "1 commands disagree: pay-1 (payout_batch succeeded: 2 transfers of 700 minor units; "
        "batch paid 3 of 700; items paid 2 of 700)")}


def test_a_payout_item_recorded_unpaid_though_it_was_paid_is_named(
    paid: WalletService, engine: Engine
) -> None:
    sql(engine, "ALTER TABLE payout_items DISABLE TRIGGER payout_items_append_only",
        "UPDATE payout_items SET outcome = 'rejected', error_code = 'insufficient_balance'"
        " WHERE reference = 'r-2'")
    detail = failures(engine)["commands_have_their_transfers"]
    assert detail == ("1 commands disagree: pay-1 (payout_batch succeeded: 2 transfers of 700 "
                      "minor units; batch paid 2 of 700; items paid 1 of 300)")


def test_a_payout_item_the_batch_never_decided_is_named(
    paid: WalletService, engine: Engine
) -> None:
    sql(engine, "INSERT INTO payout_items (command_id, item_index, user_id, amount_minor,"
                " reference, outcome, error_code, funding_account_id)"
                " SELECT command_id, 9, user_id, amount_minor, 'r-9', 'rejected',"
                " 'insufficient_balance', funding_account_id FROM payout_items"
                " WHERE reference = 'r-3'")
    assert failures(engine) == {"commands_have_their_transfers": (
        "1 commands disagree: pay-1 (payout_batch succeeded: 4 items; the batch decided 3)")}


def test_a_payout_transfer_beyond_its_paid_items_is_named(
    paid: WalletService, engine: Engine
) -> None:
    sql(engine, "INSERT INTO transfers (command_id, debit_account_id, credit_account_id,"
                " amount_minor, kind) SELECT t.command_id, t.debit_account_id,"
                " t.credit_account_id, 100, 'payout' FROM transfers t"
                " JOIN commands c ON c.id = t.command_id WHERE c.idempotency_key = 'pay-1'"
                " ORDER BY t.id LIMIT 1")
    assert "pay-1 (payout_batch succeeded: 3 transfers of 800 minor units; batch paid 2 of 700" in (
        failures(engine)["commands_have_their_transfers"])
