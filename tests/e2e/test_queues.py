"""Queues under a prefix, on Redis, with a real worker: a message published to the queue the
README documents for its type — the Redis list of the same name — is consumed, whoever
publishes it; a destination no worker consumes is refused at publish, never left to rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import redis
from celery import Celery

from tests.e2e.conftest import BROKER_URL
from tests.e2e.test_commands_end_to_end import PHASES
from tests.support.broker import broker_idle, queue_state, redis_task_message
from tests.support.ledger import assert_ledger_sound
from tests.support.polling import eventually
from tests.support.signing import signed
from worker.celery_app import EXECUTE_TASK

CELERY = [sys.executable, "-m", "celery", "-A", "worker"]


def documented_queue(prefix: str, command_type: str) -> str:
    """README, "Producers in other languages": WALLETQ_QUEUE_PREFIX + payouts or commands."""
    return f"{prefix}{'payouts' if command_type == 'payout_batch' else 'commands'}"


def credit(key: str) -> dict[str, str]:
    """A signed credit, as a producer publishing it directly sends it."""
    return signed({"type": "credit_wallet", "idempotency_key": key, "user": "alice", "amount": "1.00"})


def test_a_message_pushed_to_the_documented_redis_key_of_each_type_is_consumed(
        worker, client, queue_prefix):
    conn = redis.Redis.from_url(BROKER_URL)
    try:
        for phase in PHASES:
            for command in phase:
                key = documented_queue(queue_prefix, command["type"])
                conn.lpush(key, redis_task_message(EXECUTE_TASK, [signed(command)], key))
            ended = client.wait_all([c["idempotency_key"] for c in phase], timeout=30)
            assert {r.status for r in ended.values()} == {"succeeded"}, (
                [r.to_dict() for r in ended.values()], worker.log_tail())
        assert list(conn.scan_iter(match=f"{queue_prefix}{queue_prefix}*")) == []
    finally:
        conn.close()
    banner = worker.log_text()
    for name in ("commands", "payouts", "maintenance"):
        assert f".> {queue_prefix}{name} " in banner, banner[:3000]
    # Every message consumed and acknowledged (the ack follows the outcome: poll for it),
    # none stranded under a key no worker reads.
    eventually(lambda: broker_idle(BROKER_URL, queue_prefix), 30,
               describe=lambda: queue_state(BROKER_URL, queue_prefix))
    assert_ledger_sound(client.engine, client.settings)


def test_celery_call_to_the_bare_queue_name_fails_loudly_and_strands_nothing(
        worker, client, queue_prefix, pipeline_env):
    def celery_call(command: dict[str, str], *options: str):
        args = [*CELERY, "call", EXECUTE_TASK, "--args", json.dumps([command]), *options]
        return subprocess.run(args, capture_output=True, text=True, timeout=60,
                              env={**os.environ, **pipeline_env}, check=False)

    bare = celery_call(credit("bare"), "--queue", "commands")
    assert bare.returncode != 0 and "QueueNotFound" in bare.stderr, bare
    wrong_key = celery_call(credit("wrong-key"), "--routing-key", "commands")
    assert wrong_key.returncode != 0 and "QueueNotFound" in wrong_key.stderr, wrong_key

    named = celery_call(credit("named"), "--queue", f"{queue_prefix}commands")
    routed = celery_call(credit("routed"))
    assert (named.returncode, routed.returncode) == (0, 0), (named, routed)
    foreign = Celery(broker=BROKER_URL, set_as_current=False)  # knows nothing of walletq
    try:
        foreign.send_task(EXECUTE_TASK, args=[credit("foreign-python")],
                          queue=f"{queue_prefix}commands")
    finally:
        foreign.close()
    ended = client.wait_all(["named", "routed", "foreign-python"], timeout=30)
    assert {r.status for r in ended.values()} == {"succeeded"}, worker.log_tail()
    assert client.status("bare") is None and client.status("wrong-key") is None
    eventually(lambda: broker_idle(BROKER_URL, queue_prefix), 30,
               describe=lambda: queue_state(BROKER_URL, queue_prefix))
    assert_ledger_sound(client.engine, client.settings)
