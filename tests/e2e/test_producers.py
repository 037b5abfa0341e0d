"""Who may move money, through a real `celery worker` on PostgreSQL and Redis: the issue's
attacks tried as an attacker would (raw task messages with no credential, forged or stolen
signatures, rows written straight into `commands`, a web producer naming its own fee or
funding a payout from a user's wallet), each refused, audited and moving nothing; and the
paths a real producer takes (client, foreign raw message, sweep, rotation, the README's
three commands) working."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, insert, select

from services import producers, schema
from services.canonical import canonical_payload, payload_hash
from services.command_fields import CommandLimits
from services.commands import parse_command
from services.db import get_engine
from services.errors import ForbiddenError
from services.settings import get_settings, load_settings
from services.signing import signed_form
from tests.e2e.conftest import BROKER_URL
from tests.support.broker import broker_idle, queue_state
from tests.support.cli import walletq
from tests.support.ledger import assert_ledger_sound, audit_outcomes, transfers
from tests.support.outbox import accept_only
from tests.support.polling import eventually
from tests.support.signing import signed
from worker.celery_app import EXECUTE_TASK
from worker.client import WalletClient


def send(client: WalletClient, message: Any) -> None:
    """A foreign producer's raw task message, straight onto the queue its type names."""
    queue = client.publisher.queues.for_command_type(
        message.get("type") if isinstance(message, dict) else None)
    client.publisher.app.send_task(EXECUTE_TASK, args=[message], queue=queue, routing_key=queue)


def marker(client: WalletClient, name: str) -> None:
    """A signed command after the others on the commands queue; once it ran and the broker
    is idle (nothing queued, nothing unacknowledged), every message sent before it on that
    queue has ended: each was taken before it, and recorded as unacknowledged before the
    worker asked for the next one.

    Not a message on another queue (a payout travels on its own): the worker may take it
    after the marker, and kombu pops a message from its list before it records it as
    unacknowledged, so for that moment the broker looks idle while the message is on its
    way. Wait for such a message's own outcome (refused_by)."""
    send(client, signed({"type": "credit_wallet", "idempotency_key": name, "user": "marker",
                         "amount": "0.01"}, "test-payments"))
    record = client.wait(name, timeout=30)
    assert record is not None and record.status == "succeeded"
    prefix = client.publisher.queues.prefix
    eventually(lambda: broker_idle(BROKER_URL, prefix), 30,
               describe=lambda: queue_state(BROKER_URL, prefix))


def refused_by(client: WalletClient, expected: dict[str, str]) -> None:
    """Wait until the command of each key has been refused for its producer: the outcome
    the test expects is what it waits for, whichever queue carried the message."""
    eventually(lambda: all(client.refusals(key, producer) for key, producer in expected.items()),
               30, describe=lambda: {key: client.refusals(key) for key in expected})


def total_supply() -> int:
    a = schema.accounts
    with get_engine(get_settings()).connect() as conn:
        return -int(conn.execute(select(func.coalesce(func.sum(a.c.balance_minor), 0))
                                 .where(a.c.code == "system:issuance")).scalar_one())


def test_the_issues_raw_messages_with_no_credential_mint_and_move_nothing(worker, client):
    # The attack of the issue: mint, sell to mallory, credit mallory; no signature at all,
    # then the same claiming to be the admin producer, then signed by a made-up producer.
    attack = [
        {"type": "admin_create_tokens", "idempotency_key": "evil-mint",
         "amount": "1000000000000.00"},
        {"type": "admin_sell_tokens_to_user", "idempotency_key": "evil-sale", "user": "mallory",
         "amount": "1000000000000.00"},
        {"type": "credit_wallet", "idempotency_key": "evil-credit", "user": "mallory",
         "amount": "1000000.00"},
    ]
    for message in attack:
        send(client, message)
        send(client, {**message, "producer": "test-admin", "signature": "A" * 86})
        send(client, signed(message, "mallory", key=Ed25519PrivateKey.generate()))
    marker(client, "after-attack")
    assert total_supply() == 0
    for message in attack:
        key = message["idempotency_key"]
        assert client.status(key) is None, f"{key} took its key"
        assert [r.error_code for r in client.refusals(key)] == ["unauthenticated"] * 3
        assert audit_outcomes(client.engine, key) == [("refused", "unauthenticated")] * 3
    with pytest.raises(Exception, match="no wallet"):
        client.balance("mallory")
    # The keys were not squatted: the real treasury mints under one of them.
    send(client, signed(attack[0] | {"amount": "5.00"}, "test-treasury"))
    assert client.wait("evil-mint", timeout=30).status == "succeeded"
    assert worker.alive
    assert_ledger_sound(client.engine, client.settings)


def test_forged_stolen_and_out_of_role_messages_each_move_nothing_and_are_audited(
        worker, client):
    engine = get_engine(get_settings())
    revoked_key = Ed25519PrivateKey.generate()
    with engine.begin() as conn:
        producers.create(conn, "old-shop", "payments", revoked_key.public_key())
        producers.revoke(conn, "old-shop")

    def credit(key: str, amount: str = "10.00") -> dict[str, Any]:
        return {"type": "credit_wallet", "idempotency_key": key, "user": "alice",
                "amount": amount}

    cases = {
        "unsigned": (credit("c-unsigned"), "unauthenticated"),
        "bad signature": ({**signed(credit("c-bad"), "test-payments"),
                           "signature": "B" * 86}, "unauthenticated"),
        "revoked key": (signed(credit("c-revoked"), "old-shop", key=revoked_key),
                        "unauthenticated"),
        "unknown key": (signed(credit("c-unknown"), "test-payments",
                               key=Ed25519PrivateKey.generate()), "unauthenticated"),
        "amount changed after signing": ({**signed(credit("c-tampered", "1.00"), "test-payments"),
                                          "amount": "900000.00"}, "unauthenticated"),
        "role lacks the type": (signed(credit("c-web"), "test-web"), "forbidden"),
    }
    for message, _ in cases.values():
        send(client, message)
    marker(client, "after-forgeries")
    for name, (message, code) in cases.items():
        key = message["idempotency_key"]
        assert client.status(key) is None, name
        assert audit_outcomes(client.engine, key) == [("refused", code)], name
        [refusal] = client.refusals(key)
        assert refusal.error_code == code and refusal.authenticated == (code == "forbidden"), name
    assert client.balance("marker")["available"] == Decimal("0.01")
    with pytest.raises(Exception, match="no wallet"):
        client.balance("alice")
    assert_ledger_sound(client.engine, client.settings)


def test_a_signed_command_replayed_with_a_new_signature_is_a_duplicate(worker, client):
    first = signed({"type": "credit_wallet", "idempotency_key": "dep-1", "user": "alice",
                    "amount": "10.00"}, "test-payments")
    respelled = signed({"type": "credit_wallet", "idempotency_key": "dep-1", "user": "alice",
                        "amount": "10.0"}, "test-payments")
    assert first["signature"] != respelled["signature"]
    send(client, first)
    assert client.wait("dep-1", timeout=30).status == "succeeded"
    send(client, respelled)
    client.submit(respelled)  # through the outbox too: the stored record comes back
    marker(client, "after-replay")
    assert len(transfers(client.engine, "dep-1")) == 1
    # The replay reached the worker and got the stored outcome: neither refused nor run again.
    assert worker.log_text().count("'idempotency_key': 'dep-1', 'status': 'succeeded'") == 2
    assert client.refusals("dep-1") == [] and audit_outcomes(client.engine, "dep-1") == [("succeeded", None)]
    assert client.balance("alice")["available"] == Decimal("10.00")
    assert_ledger_sound(client.engine, client.settings)


def test_the_web_role_cannot_pick_a_fee_or_fund_a_payout_from_a_user(worker, client, pipeline_env):
    client.submit({"type": "admin_create_tokens", "idempotency_key": "mint", "amount": "100.00"})
    # Two pool processes: the sale may only be sent once the mint it spends has ended.
    assert client.wait("mint", timeout=30).status == "succeeded"
    client.submit({"type": "admin_sell_tokens_to_user", "idempotency_key": "sale",
                   "user": "alice", "amount": "50.00"})
    web = WalletClient.from_env({**os.environ, **pipeline_env, "WALLETQ_PRODUCER": "test-web",
                                 "WALLETQ_PRODUCER_KEY_FILE": str(Path(
                                     os.environ["WALLETQ_PRODUCER_KEY_FILE"]).parent
                                     / "test-web.key")})
    try:
        assert web.wait("sale", timeout=30).status == "succeeded"
        web.submit({"type": "transfer_to_escrow", "idempotency_key": "h-1", "hold_id": "o-1",
                    "payer": "alice", "payee": "bob", "amount": "20.00"})
        assert web.wait("h-1", timeout=30).status == "succeeded"
        with pytest.raises(ForbiddenError, match="override_fee"):
            web.submit({"type": "release_from_escrow", "idempotency_key": "r-0",
                        "hold_id": "o-1", "fee_rate": "0"})
        # A web producer publishing raw, past its own client's check: the worker refuses.
        send(client, signed({"type": "release_from_escrow", "idempotency_key": "r-1",
                             "hold_id": "o-1", "fee_rate": "1"}, "test-web"))
        send(client, signed({"type": "payout_batch", "idempotency_key": "p-1",
                             "from_account": "user:alice:available",
                             "items": [{"user": "mallory", "amount": "20.00",
                                        "reference": "inv-1"}]}, "test-web"))
        send(client, signed({"type": "payout_batch", "idempotency_key": "p-2",
                             "from_account": "user:alice:available",
                             "items": [{"user": "mallory", "amount": "20.00",
                                        "reference": "inv-2"}]}, "test-treasury"))
        marker(client, "after-web")
        refused = {"r-1": "test-web", "p-1": "test-web", "p-2": "test-treasury"}
        refused_by(client, refused)  # the payouts: on their own queue, after the marker's
        for key, producer in refused.items():
            assert [r.error_code for r in client.refusals(key, producer)] == ["forbidden"], key
        for key in ("r-0", "r-1", "p-1", "p-2"):
            assert client.status(key) is None, key
        web.submit({"type": "release_from_escrow", "idempotency_key": "r-2", "hold_id": "o-1"})
        released = web.wait("r-2", timeout=30)
        assert released.status == "succeeded" and released.result["fee"] == "2.00"
    finally:
        web.close()
    assert client.balance("alice")["available"] == Decimal("30.00")
    with pytest.raises(Exception, match="no wallet"):
        client.balance("mallory")
    assert_ledger_sound(client.engine, client.settings)


def test_a_row_written_straight_into_commands_ends_rejected_and_the_sweep_stops(worker, client):
    message = signed({"type": "admin_create_tokens", "idempotency_key": "forged",
                      "amount": "1000000.00"}, "test-web")
    form = signed_form(message)
    canonical = canonical_payload(parse_command(message, CommandLimits()))
    with get_engine(get_settings()).begin() as conn:
        conn.execute(insert(schema.commands).values(
            idempotency_key="forged", type="admin_create_tokens", payload=canonical,
            payload_hash=payload_hash(canonical), status="accepted", attempts=0,
            producer="test-web", signed_payload=form.text, signature="C" * 86))
    swept = walletq("--json", "sweep", "--grace", "0").json()
    assert swept["republished"] == 1
    record = client.wait("forged", timeout=30)
    assert record.status == "rejected" and record.error["code"] == "unauthenticated", \
        worker.log_tail()
    assert walletq("--json", "sweep", "--grace", "0").json()["found"] == 0
    assert total_supply() == 0
    assert_ledger_sound(client.engine, client.settings)


def test_a_key_rotated_after_its_command_was_accepted_still_verifies_it(worker, client):
    engine = get_engine(get_settings())
    old = Ed25519PrivateKey.generate()
    with engine.begin() as conn:
        producers.create(conn, "shop", "payments", old.public_key())
    lost = signed({"type": "credit_wallet", "idempotency_key": "lost", "user": "alice",
                   "amount": "3.00"}, "shop", key=old)
    accept_only(lost, client.engine, client.settings)  # recorded, its message lost
    with engine.begin() as conn:
        producers.rotate(conn, "shop", Ed25519PrivateKey.generate().public_key())
    assert walletq("--json", "sweep", "--grace", "0").json()["republished"] == 1
    assert client.wait("lost", timeout=30).status == "succeeded", worker.log_tail()
    late = signed({"type": "credit_wallet", "idempotency_key": "late", "user": "alice",
                   "amount": "3.00"}, "shop", key=old)
    send(client, late)
    marker(client, "after-rotation")
    assert client.status("late") is None
    assert [r.error_code for r in client.refusals("late")] == ["unauthenticated"]
    assert client.balance("alice")["available"] == Decimal("3.00")
    assert_ledger_sound(client.engine, client.settings)


def test_a_foreign_producers_conflicting_replay_is_readable_as_refused_by_its_key(worker, client):
    client.submit({"type": "credit_wallet", "idempotency_key": "shared", "user": "alice",
                   "amount": "10.00"})
    assert client.wait("shared", timeout=30).status == "succeeded"
    send(client, signed({"type": "transfer_tokens_between_users", "idempotency_key": "shared",
                         "from_user": "bob", "to_user": "carol", "amount": "1.00"}, "test-web"))
    marker(client, "after-conflict")
    [refusal] = client.refusals("shared", "test-web")
    assert refusal.error_code == "idempotency_conflict" and refusal.authenticated
    for secret in ("credit_wallet", "succeeded", "alice", "test-admin"):
        assert secret not in refusal.error_message
    shown = walletq("--json", "refusals", "shared", "--producer", "test-web").json_lines()
    assert [r["error"]["code"] for r in shown] == ["idempotency_conflict"]
    assert client.status("shared").status == "succeeded"  # untouched
    assert_ledger_sound(client.engine, client.settings)


def test_the_readmes_three_commands_create_a_producer_and_submit_a_signed_command(
        worker, pipeline_env, tmp_path):
    key_file = tmp_path / "web-1.key"
    made = walletq("--json", "producer", "create", "web-1", "--role", "payments",
                   "--key-out", str(key_file))
    assert made.exit_code == 0, made
    env = {"WALLETQ_PRODUCER": "web-1", "WALLETQ_PRODUCER_KEY_FILE": str(key_file)}
    done = walletq("--json", "submit", '{"type": "credit_wallet", "idempotency_key": "dep-81", '
                   '"user": "alice", "amount": "10.00"}', env=env)
    assert done.exit_code == 0, done
    status = walletq("--json", "status", "dep-81", "--wait", "30", env=env)
    [record] = status.json_lines()
    assert record["status"] == "succeeded", worker.log_tail()
    with get_engine(load_settings({**os.environ, **pipeline_env})).connect() as conn:
        stored = conn.execute(select(schema.commands.c.producer, schema.commands.c.signature)
                              .where(schema.commands.c.idempotency_key == "dep-81")).one()
    assert stored.producer == "web-1" and len(stored.signature) == 86
    assert walletq("verify").exit_code == 0
