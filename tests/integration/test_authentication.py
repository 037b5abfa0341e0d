"""Who may move money, in process on real PostgreSQL, through the worker's own failure policy
(`execute_message`) and the executor: a command that does not prove its producer, or asks
for more than its role allows, moves nothing, takes no key and is audited; a command that
does runs once, whatever signature its retry carries. (tests/e2e/test_producers.py sends
the same through a real worker.)"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine

from services import command_store, producers, refusals, schema
from services.admission import Admitted, Refused, admit
from services.authentication import DIRECTORY
from services.canonical import canonical_payload, payload_hash
from services.command_executor import execute_command
from services.command_fields import CommandLimits
from services.command_types import ROLE_PERMISSIONS
from services.commands import parse_command
from services.errors import (
    ForbiddenError,
    IdempotencyConflictError,
    UnauthenticatedError,
)
from services.message_policy import Done, execute_message
from services.outbox import record_accepted
from services.permissions import ADMIN, EVERYTHING
from services.settings import Settings
from services.signing import signed_form
from services.sweep import run_once
from services.verify import verify_ledger
from services.wallet_service import WalletService
from tests.support.ledger import assert_ledger_sound, audit, balances, transfers
from tests.support.signing import TEST_PRODUCERS, signed, signer

MINT = {"type": "admin_create_tokens", "idempotency_key": "mint-1", "amount": "1000000.00"}
CREDIT = {"type": "credit_wallet", "idempotency_key": "dep-1", "user": "alice", "amount": "10.00"}


def deliver(raw: Any, engine: Engine, settings: Settings) -> Done:
    """One delivery of a task message carrying `raw`, as the worker's task makes it."""
    outcome = execute_message((raw,), {}, engine=engine, settings=settings, retries_left=False)
    assert isinstance(outcome, Done), outcome
    return outcome


def record_of(engine: Engine, key: str) -> command_store.CommandRecord | None:
    with engine.connect() as conn:
        return command_store.get_record(conn, key)


def refusals_of(engine: Engine, key: str, producer: str | None = None) -> list[refusals.Refusal]:
    with engine.connect() as conn:
        return refusals.for_key(conn, key, producer)


def outcomes(engine: Engine, key: str) -> list[tuple[str, str | None]]:
    return [(row["outcome"], row["error_code"]) for row in audit(engine, key)]


def new_producer(engine: Engine, name: str, role: str, allow: tuple[str, ...] = ()
                 ) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    with engine.begin() as conn:
        producers.create(conn, name, role, key.public_key(), allow=allow)
    return key


def assert_refused_taking_no_key(engine: Engine, outcome: Done, key: str, code: str,
                                 *, authenticated: bool) -> None:
    assert outcome.refusal is not None and outcome.refusal["code"] == code, outcome
    assert record_of(engine, key) is None, "a refused message took its key"
    assert balances(engine) == {} or all(v == 0 for v in balances(engine).values())
    assert outcomes(engine, key) == [("refused", code)]
    [refusal] = refusals_of(engine, key)
    assert (refusal.error_code, refusal.authenticated) == (code, authenticated)


# --- unauthenticated ----------------------------------------------------------------------

FORGERIES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "unsigned": lambda c: dict(c),
    "unsigned, naming a producer": lambda c: {**c, "producer": "test-admin"},
    "a signature of the right shape that verifies nothing": lambda c: {**signed(c),
                                                                       "signature": "A" * 86},
    "signed by a key the producer does not hold": lambda c: signed(
        c, "test-admin", key=Ed25519PrivateKey.generate()),
    "signed by an unknown producer": lambda c: signed(c, "mallory",
                                                      key=Ed25519PrivateKey.generate()),
    "the amount changed after signing": lambda c: {**signed(c), "amount": "999999.00"},
    "another producer named after signing": lambda c: {**signed(c, "test-web"),
                                                       "producer": "test-admin"},
    "the signature padded": lambda c: {**signed(c), "signature": signed(c)["signature"] + "=="},
    "the signature in standard base64": lambda c: {**signed(c), "signature": "+" * 86},
    "JSON text with the amount changed": lambda c: __import__("json").dumps(
        {**signed(c), "amount": "999999.00"}),
}


@pytest.mark.parametrize("forge", FORGERIES.values(), ids=FORGERIES.keys())
def test_a_message_that_does_not_prove_its_producer_moves_nothing_takes_no_key_and_is_audited(
        forge: Callable[[dict[str, Any]], Any], engine: Engine, settings: Settings) -> None:
    outcome = deliver(forge(MINT), engine, settings)
    assert_refused_taking_no_key(engine, outcome, "mint-1", "unauthenticated", authenticated=False)
    # The key is still free: the treasury's own command under it runs.
    record = execute_command(signed(MINT, "test-treasury"), engine=engine, settings=settings)
    assert record.status == "succeeded"
    assert transfers(engine, "mint-1") == [("system:issuance", "platform:treasury", 10**8, "mint")]


def test_a_revoked_producer_moves_nothing_not_even_a_command_it_sent_before(
        engine: Engine, settings: Settings) -> None:
    key = new_producer(engine, "leaky", "treasury")
    accept(engine, settings, signed(MINT, "leaky", key=key))  # in the outbox
    with engine.begin() as conn:
        producers.revoke(conn, "leaky")
    DIRECTORY.forget()  # as `walletq producer revoke` does in its process
    fresh = signed({**MINT, "idempotency_key": "mint-2"}, "leaky", key=key)
    assert_refused_taking_no_key(engine, deliver(fresh, engine, settings), "mint-2",
                                 "unauthenticated", authenticated=False)
    # The command accepted before the revocation: its stored row fails its own check now,
    # so it ends (rejected, audited) instead of being swept again for ever.
    stored = record_of(engine, "mint-1")
    assert stored is not None
    deliver(stored.message(), engine, settings)
    ended = record_of(engine, "mint-1")
    assert ended is not None and ended.status == "rejected"
    assert ended.error is not None and ended.error["code"] == "unauthenticated"
    assert "revoked" in ended.error["message"]
    assert outcomes(engine, "mint-1") == [("rejected", "unauthenticated")]
    assert balances(engine) == {}


def accept(engine: Engine, settings: Settings, message: dict[str, Any]) -> None:
    """Record a signed command in the outbox, as a producer's client does (nothing published)."""
    record_accepted(parse_command(message, CommandLimits.from_settings(settings)),
                    signed_form(message), engine=engine, settings=settings)


def test_through_the_service_an_unauthenticated_command_raises_and_is_audited(
        engine: Engine, settings: Settings) -> None:
    with pytest.raises(UnauthenticatedError, match="does not verify"):
        execute_command({**signed(MINT), "amount": "5.00"}, engine=engine, settings=settings)
    assert record_of(engine, "mint-1") is None
    assert outcomes(engine, "mint-1") == [("refused", "unauthenticated")]
    assert refusals_of(engine, "mint-1")[0].producer == "test-admin"


def test_an_authenticated_producers_invalid_command_takes_its_key_an_unsigned_one_does_not(
        engine: Engine, settings: Settings) -> None:
    bad = {**CREDIT, "amount": 5}
    deliver(bad, engine, settings)
    assert record_of(engine, "dep-1") is None
    deliver(signed(bad, "test-payments"), engine, settings)
    record = record_of(engine, "dep-1")
    assert record is not None and record.status == "rejected" and record.type == "invalid"
    assert record.producer == "test-payments" and record.signature is not None
    assert outcomes(engine, "dep-1") == [("refused", "unauthenticated"),
                                         ("refused", "invalid_command")]


# --- roles ----------------------------------------------------------------------------------

EXAMPLES: dict[str, dict[str, Any]] = {
    "credit_wallet": CREDIT,
    "debit_wallet": {"user": "alice", "amount": "1.00"},
    "transfer_tokens_between_users": {"from_user": "alice", "to_user": "bob", "amount": "1.00"},
    "transfer_to_escrow": {"hold_id": "o-1", "payer": "alice", "payee": "bob", "amount": "1.00"},
    "release_from_escrow": {"hold_id": "o-1"},
    "refund_from_escrow": {"hold_id": "o-1"},
    "admin_create_tokens": {"amount": "1.00"},
    "admin_sell_tokens_to_user": {"user": "alice", "amount": "1.00"},
    "user_sell_tokens_to_admin": {"user": "alice", "amount": "1.00"},
    "payout_batch": {"items": [{"user": "bob", "amount": "1.00", "reference": "r-1"}]},
    "expire_hold": {"hold_id": "o-1"},
}


def example(type_: str, key: str = "k-1") -> dict[str, Any]:
    fields = {k: v for k, v in EXAMPLES[type_].items() if k not in ("type", "idempotency_key")}
    return {"type": type_, "idempotency_key": key, **fields}


@pytest.mark.parametrize("producer", list(TEST_PRODUCERS))
def test_each_built_in_role_may_send_its_types_and_no_other(
        producer: str, engine: Engine, settings: Settings) -> None:
    role = TEST_PRODUCERS[producer]
    allowed = {type_ for type_ in EXAMPLES
               if EVERYTHING in ROLE_PERMISSIONS[role] or type_ in ROLE_PERMISSIONS[role]}
    admitted = {type_ for type_ in EXAMPLES
                if isinstance(admit(signed(example(type_), producer), engine=engine,
                                    settings=settings), Admitted)}
    assert admitted == allowed
    assert (role == ADMIN) == (allowed == set(EXAMPLES))


def test_the_roles_the_migration_seeds_are_the_registrys(engine: Engine) -> None:
    with engine.connect() as conn:
        seeded = producers.role_permissions(conn)
    assert seeded == ROLE_PERMISSIONS


def test_a_role_that_lacks_the_type_is_forbidden_moves_nothing_and_takes_no_key(
        engine: Engine, settings: Settings) -> None:
    outcome = deliver(signed(MINT, "test-web"), engine, settings)
    assert_refused_taking_no_key(engine, outcome, "mint-1", "forbidden", authenticated=True)
    assert "test-web" in outcome.refusal["message"] and "web" in outcome.refusal["message"]
    web = WalletService(engine, settings, signer=signer("test-web"))
    with pytest.raises(ForbiddenError):
        web.admin_create_tokens("5.00", idempotency_key="mint-2")
    assert record_of(engine, "mint-2") is None and outcomes(engine, "mint-2") == [
        ("refused", "forbidden")]


def test_a_forbidden_type_is_refused_before_validation_so_it_takes_no_key_even_invalid(
        engine: Engine, settings: Settings) -> None:
    outcome = deliver(signed({**MINT, "amount": "0"}, "test-web"), engine, settings)
    assert_refused_taking_no_key(engine, outcome, "mint-1", "forbidden", authenticated=True)


def test_a_producer_may_be_allowed_a_type_beyond_its_role(engine: Engine, settings: Settings
                                                          ) -> None:
    key = new_producer(engine, "web-refunds", "web", allow=("credit_wallet",))
    record = execute_command(signed(CREDIT, "web-refunds", key=key), engine=engine,
                             settings=settings)
    assert record.status == "succeeded"
    refused = admit(signed(example("debit_wallet"), "web-refunds", key=key), engine=engine,
                    settings=settings)
    assert isinstance(refused, Refused) and refused.error.code == "forbidden"


# --- fee rates and funding accounts ---------------------------------------------------------


@pytest.fixture
def web(engine: Engine, settings: Settings, service: WalletService) -> WalletService:
    """alice has 100.00; the web producer's service."""
    service.admin_create_tokens("1000.00", idempotency_key="mint")
    service.admin_sell_tokens_to_user("alice", "100.00", idempotency_key="sale")
    return WalletService(engine, settings, signer=signer("test-web"))


def hold_of(engine: Engine, hold_id: str) -> Any:
    h = schema.holds
    with engine.connect() as conn:
        return conn.execute(select(h).where(h.c.hold_id == hold_id)).one()


def test_a_hold_keeps_the_fee_rate_it_opened_with_whatever_the_deployment_says_at_release(
        web: WalletService, engine: Engine, settings: Settings) -> None:
    web.transfer_to_escrow("o-1", "alice", "bob", "20.00", idempotency_key="h-1")
    assert hold_of(engine, "o-1").fee_rate == "0.10"
    later = WalletService(engine, dataclasses.replace(settings, fee_rate=Decimal("0.50")),
                          signer=signer("test-web"))
    result = later.release_from_escrow("o-1", idempotency_key="r-1")
    assert (result["fee"], result["payee_amount"], result["fee_rate"]) == ("2.00", "18.00", "0.10")


def test_the_web_role_cannot_name_a_fee_rate_on_a_hold_or_its_release(
        web: WalletService, engine: Engine, settings: Settings) -> None:
    web.transfer_to_escrow("o-1", "alice", "bob", "20.00", idempotency_key="h-1")
    before = balances(engine)
    for fee_rate, key in (("0", "r-0"), ("1", "r-1")):  # all to the payee; all to the platform
        outcome = deliver(signed({"type": "release_from_escrow", "idempotency_key": key,
                                  "hold_id": "o-1", "fee_rate": fee_rate}, "test-web"),
                          engine, settings)
        assert outcome.refusal is not None and outcome.refusal["code"] == "forbidden"
        assert "override_fee" in outcome.refusal["message"]
        assert record_of(engine, key) is None
    with pytest.raises(ForbiddenError, match="override_fee"):
        web.execute({"type": "transfer_to_escrow", "idempotency_key": "h-2", "hold_id": "o-2",
                     "payer": "alice", "payee": "bob", "amount": "5.00", "fee_rate": "0"})
    assert balances(engine) == before and hold_of(engine, "o-1").status == "held"
    assert web.release_from_escrow("o-1", idempotency_key="r-2")["fee"] == "2.00"


def test_an_admin_names_the_rate_of_a_hold_and_may_override_it_at_release(
        web: WalletService, service: WalletService, engine: Engine) -> None:
    service.execute({"type": "transfer_to_escrow", "idempotency_key": "h-1", "hold_id": "o-1",
                     "payer": "alice", "payee": "bob", "amount": "20.00", "fee_rate": "0.05"})
    assert hold_of(engine, "o-1").fee_rate == "0.05"
    assert web.release_from_escrow("o-1", idempotency_key="r-1")["fee"] == "1.00"
    service.transfer_to_escrow("o-2", "alice", "bob", "10.00", idempotency_key="h-2")
    assert service.release_from_escrow("o-2", fee_rate="0", idempotency_key="r-2")["fee"] == "0.00"


def test_a_payout_is_funded_from_the_treasury_unless_the_producer_may_fund_it_elsewhere(
        web: WalletService, engine: Engine, settings: Settings) -> None:
    items = [{"user": "mallory", "amount": "20.00", "reference": "inv-1"}]
    from_alice = {"type": "payout_batch", "idempotency_key": "p-1", "items": items,
                  "from_account": "user:alice:available"}
    outcome = deliver(signed(from_alice, "test-treasury"), engine, settings)
    assert outcome.refusal is not None and outcome.refusal["code"] == "forbidden"
    assert "payout_any_account" in outcome.refusal["message"]
    assert record_of(engine, "p-1") is None
    assert balances(engine)["user:alice:available"] == 100_00
    from_treasury = {**from_alice, "idempotency_key": "p-2", "from_account": "platform:treasury"}
    paid = execute_command(signed(from_treasury, "test-treasury"), engine=engine, settings=settings)
    assert paid.status == "succeeded" and paid.result is not None and paid.result["paid"] == 1
    key = new_producer(engine, "payroll", "treasury", allow=("payout_any_account",))
    allowed = execute_command(signed({**from_alice, "idempotency_key": "p-3", "items": [
        {"user": "bob", "amount": "1.00", "reference": "inv-2"}]}, "payroll", key=key),
        engine=engine, settings=settings)
    assert allowed.status == "succeeded"
    assert balances(engine)["user:alice:available"] == 99_00


# --- duplicates, rotation ---------------------------------------------------------------------


def test_a_command_replayed_with_a_new_signature_is_a_duplicate(
        engine: Engine, settings: Settings) -> None:
    first = execute_command(signed(CREDIT, "test-payments"), engine=engine, settings=settings)
    # Another spelling signs other bytes: another signature for the same command.
    respelled = signed({**CREDIT, "amount": "10.0"}, "test-payments")
    assert respelled["signature"] != signed(CREDIT, "test-payments")["signature"]
    assert execute_command(respelled, engine=engine, settings=settings) == first
    second_key = Ed25519PrivateKey.generate()
    with engine.begin() as conn:
        producers.add_key(conn, "test-payments", second_key.public_key())
    DIRECTORY.forget()
    again = deliver(signed(CREDIT, "test-payments", key=second_key), engine, settings)
    assert again.record == first
    assert transfers(engine, "dep-1") == [("system:external", "user:alice:available", 1000,
                                           "credit")]
    assert [o for o in outcomes(engine, "dep-1")] == [("succeeded", None)]


def test_a_message_carrying_an_ended_rows_signature_over_other_text_is_not_its_duplicate(
        engine: Engine, settings: Settings) -> None:
    """The shortcut for an ended row reads its producer and signature first, then holds the
    message to the whole signed text: the same signature on other text (here the same
    command spelt otherwise, and another one) is not taken as already ended, but admitted,
    and refused, since that signature does not sign it."""
    message = signed(CREDIT, "test-payments")
    first = deliver(message, engine, settings).record
    assert first is not None and first.status == "succeeded"
    assert deliver(dict(message), engine, settings).record == first  # exactly the signed form
    for other in ({**message, "amount": "10.0"}, {**message, "amount": "99.00"}):
        outcome = deliver(other, engine, settings)
        assert outcome.record is None and outcome.refusal is not None
        assert outcome.refusal["code"] == "unauthenticated"
    assert len(refusals_of(engine, "dep-1")) == 2
    assert transfers(engine, "dep-1") == [("system:external", "user:alice:available", 1000,
                                           "credit")]


def test_ended_record_reads_a_row_only_when_it_ended_under_the_messages_signer(
        engine: Engine, settings: Settings) -> None:
    ended = signed(CREDIT, "test-payments")
    first = deliver(ended, engine, settings).record
    waiting = signed({**CREDIT, "idempotency_key": "dep-2"}, "test-payments")
    accept(engine, settings, waiting)  # after: the delivery above would have coalesced it
    resigned = signed({**CREDIT, "amount": "10.0"}, "test-payments")  # same command, new text
    with engine.connect() as conn:
        assert command_store.ended_record(conn, "dep-2", signed_form(waiting)) is None
        assert command_store.ended_record(conn, "dep-1", signed_form(ended)) == first
        assert command_store.ended_record(conn, "dep-1", signed_form(resigned)) is None
        assert command_store.ended_record(conn, "nobody", signed_form(ended)) is None


def test_a_rotated_key_keeps_the_commands_it_signed_verifiable_and_signs_nothing_new(
        engine: Engine, settings: Settings) -> None:
    old = new_producer(engine, "shop", "payments")
    accept(engine, settings, signed(CREDIT, "shop", key=old))  # its message was lost
    new = Ed25519PrivateKey.generate()
    with engine.begin() as conn:
        producers.rotate(conn, "shop", new.public_key())
    DIRECTORY.forget()
    stored = record_of(engine, "dep-1")
    assert stored is not None
    assert deliver(stored.message(), engine, settings).record.status == "succeeded"  # type: ignore[union-attr]
    late = signed({**CREDIT, "idempotency_key": "dep-2"}, "shop", key=old)
    assert deliver(late, engine, settings).refusal["code"] == "unauthenticated"  # type: ignore[index]
    assert record_of(engine, "dep-2") is None
    fresh = signed({**CREDIT, "idempotency_key": "dep-3"}, "shop", key=new)
    assert deliver(fresh, engine, settings).record.status == "succeeded"  # type: ignore[union-attr]
    checks = {c.name: c for c in verify_ledger(engine, 2)}
    assert all(c.ok for c in checks.values()), checks
    assert checks["commands_are_signed"].detail.startswith("2 commands")


def test_a_rotation_with_grace_lets_the_old_key_sign_until_the_grace_ends(
        engine: Engine, settings: Settings) -> None:
    old = new_producer(engine, "shop", "payments")
    with engine.begin() as conn:
        rotated = producers.rotate(conn, "shop", Ed25519PrivateKey.generate().public_key(),
                                   grace_s=3600)
    DIRECTORY.forget()
    assert [k.valid_until is not None for k in rotated.keys] == [False, True]
    assert deliver(signed(CREDIT, "shop", key=old), engine, settings).record is not None


# --- rows written behind walletq's back -------------------------------------------------------


def forge_row(engine: Engine, message: dict[str, Any], *, payload_of: dict[str, Any] | None = None,
              signature: str | None = None) -> None:
    """A command row INSERTed by hand, as a producer with write access to `commands` could."""
    command, signed_ = parse_command(message, CommandLimits()), signed_form(message)
    shown = parse_command(payload_of, CommandLimits()) if payload_of else command
    canonical = canonical_payload(shown)
    with engine.begin() as conn:
        conn.execute(insert(schema.commands).values(
            idempotency_key=command.idempotency_key, type=command.type, payload=canonical,
            payload_hash=payload_hash(canonical), status="accepted", attempts=0,
            producer=signed_.producer, signed_payload=signed_.text,
            signature=signature or signed_.signature))


def sweep_finds(engine: Engine, settings: Settings) -> list[str]:
    published: list[str] = []

    class Recorder:
        def publish(self, record: command_store.CommandRecord) -> None:
            published.append(record.idempotency_key)

        def publish_many(self, records: Any) -> list[Exception | None]:
            return [self.publish(r) for r in records]  # type: ignore[func-returns-value]

    run_once(Recorder(), engine=engine, settings=settings, grace_s=0)
    return published


def test_a_row_written_straight_into_commands_with_a_bad_signature_ends_rejected(
        engine: Engine, settings: Settings) -> None:
    forge_row(engine, signed(MINT, "test-web"), signature="A" * 86)
    assert sweep_finds(engine, settings) == ["mint-1"]
    stored = record_of(engine, "mint-1")
    assert stored is not None
    deliver(stored.message(), engine, settings)  # what the sweep published
    ended = record_of(engine, "mint-1")
    assert ended is not None and ended.status == "rejected"
    assert ended.error == {"code": "unauthenticated", "message": ended.error["message"]}  # type: ignore[index]
    assert balances(engine) == {}
    assert sweep_finds(engine, settings) == []  # the sweep stops republishing it


def test_a_row_whose_payload_is_not_what_its_producer_signed_ends_rejected(
        engine: Engine, settings: Settings) -> None:
    small = signed({**CREDIT, "amount": "1.00"}, "test-payments")
    forge_row(engine, small, payload_of={**small, "amount": "100000.00"})
    stored = record_of(engine, "dep-1")
    assert stored is not None
    deliver(stored.message(), engine, settings)
    ended = record_of(engine, "dep-1")
    assert ended is not None and ended.status == "rejected"
    assert "not what its producer signed" in ended.error["message"]  # type: ignore[index]
    assert balances(engine) == {}


def test_a_validly_signed_row_of_a_type_its_producers_role_forbids_ends_forbidden(
        engine: Engine, settings: Settings) -> None:
    forge_row(engine, signed(MINT, "test-web"))  # web may not mint; it wrote the row itself
    stored = record_of(engine, "mint-1")
    assert stored is not None
    deliver(stored.message(), engine, settings)
    ended = record_of(engine, "mint-1")
    assert ended is not None and (ended.status, ended.error["code"]) == ("rejected", "forbidden")  # type: ignore[index]
    assert balances(engine) == {}


def test_a_row_with_a_forged_signature_is_not_rescued_by_a_valid_message_of_its_command(
        engine: Engine, settings: Settings) -> None:
    message = signed(CREDIT, "test-payments")
    forge_row(engine, message, signature="A" * 86)  # the right payload, a made-up signature
    deliver(message, engine, settings)  # the producer's own, valid: the row is still a forgery
    ended = record_of(engine, "dep-1")
    assert ended is not None and (ended.status, ended.error["code"]) == (  # type: ignore[index]
        "rejected", "unauthenticated")
    assert balances(engine) == {}
    assert_ledger_sound(engine, settings)


def test_a_bad_message_under_a_sound_rows_key_refuses_the_message_not_the_row(
        engine: Engine, settings: Settings) -> None:
    message = signed(CREDIT, "test-payments")
    accept(engine, settings, message)
    deliver({**message, "amount": "5000.00"}, engine, settings)  # tampered
    deliver({**CREDIT}, engine, settings)                          # unsigned
    stored = record_of(engine, "dep-1")
    assert stored is not None and stored.status == "accepted"
    assert [r.error_code for r in refusals_of(engine, "dep-1")] == ["unauthenticated"] * 2
    assert deliver(stored.message(), engine, settings).record.status == "succeeded"  # type: ignore[union-attr]
    assert balances(engine)["user:alice:available"] == 1000


# --- conflicts ---------------------------------------------------------------------------------


def test_a_conflict_reply_does_not_reveal_another_producers_command(
        engine: Engine, settings: Settings) -> None:
    execute_command(signed(CREDIT, "test-payments"), engine=engine, settings=settings)
    mine = signed({"type": "transfer_tokens_between_users", "idempotency_key": "dep-1",
                   "from_user": "bob", "to_user": "carol", "amount": "1.00"}, "test-web")
    outcome = deliver(mine, engine, settings)
    assert outcome.refusal is not None and outcome.refusal["code"] == "idempotency_conflict"
    with pytest.raises(IdempotencyConflictError) as caught:
        execute_command(mine, engine=engine, settings=settings)
    for message in (outcome.refusal["message"], caught.value.message):
        for secret in ("credit_wallet", "succeeded", "alice", "10.00", "test-payments"):
            assert secret not in message
    [refusal] = refusals_of(engine, "dep-1", "test-web")
    assert (refusal.error_code, refusal.authenticated, refusal.command_type) == (
        "idempotency_conflict", True, "transfer_tokens_between_users")
    assert refusals_of(engine, "dep-1", "test-payments") == []
    first = record_of(engine, "dep-1")
    assert first is not None and first.status == "succeeded" and first.producer == "test-payments"
