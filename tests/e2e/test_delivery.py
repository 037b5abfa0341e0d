"""What the broker may do to a message: deliver it many times, or carry garbage.

Each test ends its deliveries with a marker command and then waits until the broker is
idle (nothing queued, nothing unacknowledged): with late acks, that is when every copy
has been executed — not merely when the marker has, while another pool process may still
be running a copy. Every test runs on Redis and on RabbitMQ."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from services.atomic_transaction_manager import IdempotencyConflictError
from tests.e2e.conftest import on_both_brokers
from tests.support.builders import credit, transfer
from tests.support.ledger import assert_ledger_sound, audit_outcomes, transfers
from tests.support.polling import eventually
from tests.support.signing import signed
from worker.celery_app import EXECUTE_TASK

pytestmark = on_both_brokers


def _send(client, *args, **kwargs) -> None:
    queue = client.publisher.queues.commands
    client.publisher.app.send_task(EXECUTE_TASK, args=list(args), kwargs=kwargs, queue=queue,
                                   routing_key=queue)


def _every_delivery_ended(client, worker, broker, queue_prefix: str) -> None:
    """A marker published last has ended, and so has every message before it."""
    client.submit(credit("marker", "zed", "1.00"))
    assert client.wait("marker", timeout=20).status == "succeeded", worker.log_tail()
    eventually(lambda: broker.idle(queue_prefix), 30,
               describe=lambda: (broker.state(queue_prefix), worker.log_tail()))


def test_the_same_task_message_published_five_times_has_one_effect(
        worker, client, broker, queue_prefix):
    client.submit(credit("seed", "alice", "100.00"))
    assert client.wait("seed", timeout=20).status == "succeeded"
    # A foreign producer: no outbox record first; the worker records the command itself.
    for _ in range(5):
        _send(client, signed(transfer("t-dup", "alice", "bob", "7.00")))
    _every_delivery_ended(client, worker, broker, queue_prefix)
    assert client.status("t-dup").status == "succeeded", worker.log_tail()
    # All five copies ran to their end, each answered with the one stored outcome.
    assert len(re.findall(r"succeeded in \S+: \{'idempotency_key': 't-dup', 'status': 'succeeded'",
                          worker.log_text())) == 5, worker.log_tail()
    assert len(transfers(client.engine, "t-dup")) == 1
    assert client.balance("bob")["available"] == Decimal("7.00")
    assert client.balance("alice")["available"] == Decimal("93.00")
    assert audit_outcomes(client.engine, "t-dup") == [("succeeded", None)]
    assert_ledger_sound(client.engine, client.settings)


def test_invalid_payload_messages_are_refused_acked_and_the_worker_goes_on(
        worker, client, broker, queue_prefix):
    # Signed, with a usable key: the key is taken by a rejected `invalid` command.
    _send(client, signed({"type": "credit_wallet", "idempotency_key": "bad-1", "user": "alice",
                          "amount": 5}))
    # No usable key, not an object, the wrong shape of message.
    _send(client, signed({"type": "credit_wallet", "user": "alice", "amount": "5.00"}))
    _send(client, "not a command at all")
    _send(client, ["a", "list"])
    _send(client, signed(credit("two-args", "a", "1.00")), {"extra": True})
    _send(client, command=signed({"type": "no_such_type", "idempotency_key": "bad-2"}))
    _send(client, signed({"type": "credit_wallet", "idempotency_key": "bad key with spaces",
                          "user": "alice", "amount": "5.00"}))
    _every_delivery_ended(client, worker, broker, queue_prefix)

    bad = client.status("bad-1")
    assert bad.status == "rejected" and bad.error["code"] == "invalid_command"
    assert "decimal string" in bad.error["message"]
    assert client.status("bad-2").error["code"] == "invalid_command"
    assert client.status("two-args") is None  # a malformed message takes no key
    refusals = [o for o in audit_outcomes(client.engine) if o[0] == "refused"]
    assert len(refusals) == 7 and {code for _, code in refusals} == {"invalid_command"}
    # The key of an invalid payload stays taken: a valid command under it is a conflict.
    with pytest.raises(IdempotencyConflictError):
        client.submit(credit("bad-1", "alice", "5.00"))
    assert worker.alive
    assert_ledger_sound(client.engine, client.settings)


def test_a_message_conflicting_with_its_keys_first_command_is_refused_and_acked(
        worker, client, broker, queue_prefix):
    client.submit(credit("dep-1", "alice", "10.00"))
    assert client.wait("dep-1", timeout=20).status == "succeeded"
    _send(client, signed(credit("dep-1", "alice", "99.00")))
    _every_delivery_ended(client, worker, broker, queue_prefix)
    assert client.status("dep-1").status == "succeeded"
    assert client.balance("alice")["available"] == Decimal("10.00")
    assert audit_outcomes(client.engine, "dep-1") == [("succeeded", None),
                                                      ("refused", "idempotency_conflict")]
    assert_ledger_sound(client.engine, client.settings)
