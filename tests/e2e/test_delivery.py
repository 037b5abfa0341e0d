"""What the broker may do to a message: deliver it many times, or carry garbage."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
import redis

from services.atomic_transaction_manager import IdempotencyConflictError
from tests.e2e.conftest import BROKER_URL, assert_ledger_verifies
from tests.e2e.helpers import audit_outcomes, transfers_of
from tests.support.signing import signed
from worker.celery_app import EXECUTE_TASK


def _send(client, *args, **kwargs) -> None:
    queue = client.publisher.queues.commands
    client.publisher.app.send_task(EXECUTE_TASK, args=list(args), kwargs=kwargs, queue=queue,
                                   routing_key=queue)


def _queues_drained(prefix: str) -> bool:
    conn = redis.Redis.from_url(BROKER_URL)
    try:
        for key in conn.scan_iter(match=f"{prefix}*"):
            kind = conn.type(key)
            if kind == b"list" and conn.llen(key):
                return False
            if key.endswith(b"unacked") and conn.hlen(key):
                return False
        return True
    finally:
        conn.close()


def test_the_same_task_message_published_five_times_has_one_effect(worker, client):
    client.submit({"type": "credit_wallet", "idempotency_key": "seed", "user": "alice",
                   "amount": "100.00"})
    assert client.wait("seed", timeout=20).status == "succeeded"
    message = signed({"type": "transfer_tokens_between_users", "idempotency_key": "t-dup",
                      "from_user": "alice", "to_user": "bob", "amount": "7.00"})
    # A foreign producer: no outbox record first; the worker records the command itself.
    for _ in range(5):
        _send(client, message)
    record = client.wait("t-dup", timeout=20)
    assert record.status == "succeeded", worker.log_tail()
    client.submit({"type": "credit_wallet", "idempotency_key": "marker", "user": "zed",
                   "amount": "1.00"})
    # Messages are consumed in order per queue: once the marker ran, all five copies have.
    assert client.wait("marker", timeout=20).status == "succeeded"
    assert transfers_of("t-dup") == 1
    assert client.balance("bob")["available"] == Decimal("7.00")
    assert client.balance("alice")["available"] == Decimal("93.00")
    assert [o for o in audit_outcomes("t-dup")] == [("succeeded", None)]
    assert_ledger_verifies()


def test_invalid_payload_messages_are_refused_acked_and_the_worker_goes_on(
        worker, client, queue_prefix):
    # Signed, with a usable key: the key is taken by a rejected `invalid` command.
    _send(client, signed({"type": "credit_wallet", "idempotency_key": "bad-1", "user": "alice",
                          "amount": 5}))
    # No usable key, not an object, the wrong shape of message.
    _send(client, signed({"type": "credit_wallet", "user": "alice", "amount": "5.00"}))
    _send(client, "not a command at all")
    _send(client, ["a", "list"])
    _send(client, signed({"type": "credit_wallet", "idempotency_key": "two-args", "user": "a",
                          "amount": "1.00"}), {"extra": True})
    _send(client, command=signed({"type": "no_such_type", "idempotency_key": "bad-2"}))
    _send(client, signed({"type": "credit_wallet", "idempotency_key": "bad key with spaces",
                          "user": "alice", "amount": "5.00"}))
    client.submit({"type": "credit_wallet", "idempotency_key": "after", "user": "alice",
                   "amount": "2.00"})
    assert client.wait("after", timeout=20).status == "succeeded", worker.log_tail()

    bad = client.status("bad-1")
    assert bad.status == "rejected" and bad.error["code"] == "invalid_command"
    assert "decimal string" in bad.error["message"]
    assert client.status("bad-2").error["code"] == "invalid_command"
    assert client.status("two-args") is None  # a malformed message takes no key
    refusals = [o for o in audit_outcomes() if o[0] == "refused"]
    assert len(refusals) == 7 and {code for _, code in refusals} == {"invalid_command"}
    # The key of an invalid payload stays taken: a valid command under it is a conflict.
    with pytest.raises(IdempotencyConflictError):
        client.submit({"type": "credit_wallet", "idempotency_key": "bad-1", "user": "alice",
                       "amount": "5.00"})
    assert worker.alive
    assert _queues_drained(queue_prefix)
    assert_ledger_verifies()


def test_a_message_conflicting_with_its_keys_first_command_is_refused_and_acked(worker, client):
    client.submit({"type": "credit_wallet", "idempotency_key": "dep-1", "user": "alice",
                   "amount": "10.00"})
    assert client.wait("dep-1", timeout=20).status == "succeeded"
    _send(client, signed({"type": "credit_wallet", "idempotency_key": "dep-1", "user": "alice",
                          "amount": "99.00"}))
    client.submit({"type": "credit_wallet", "idempotency_key": "after", "user": "bob",
                   "amount": "1.00"})
    assert client.wait("after", timeout=20).status == "succeeded"
    # The worker that took the conflicting message may have applied "after" with it
    # (coalescing), before recording the refusal: wait for the refusal itself.
    deadline = time.monotonic() + 20
    while ("refused", "idempotency_conflict") not in audit_outcomes("dep-1"):
        assert time.monotonic() < deadline, audit_outcomes("dep-1")
        time.sleep(0.05)
    assert client.status("dep-1").status == "succeeded"
    assert client.balance("alice")["available"] == Decimal("10.00")
    assert_ledger_verifies()
