"""RabbitMQ as the durable broker: what Redis cannot do, tested against real nodes.

A message RabbitMQ dead-letters lands in `<queue>.dead` with its `x-death` reason: one the
worker rejected (a task it does not know; a message that is not a task envelope is refused
by the worker's guard and acknowledged instead), and one that killed its pool process
on every delivery (past WALLETQ_BROKER_DELIVERY_LIMIT). A node SIGKILLed and restarted keeps
every confirmed message of its quorum queues. The restarted node is a private one on spare
ports (tests/e2e/fault_servers.py), never the machine's node on 5672.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from kombu import Exchange, Producer
from sqlalchemy import text

from celeryconfig import QueueNames
from services.db import get_engine
from services.settings import get_settings
from tests.e2e.fault_servers import PrivateRabbit
from tests.support.builders import credit
from tests.support.ledger import assert_ledger_sound
from tests.support.polling import eventually
from tests.support.rabbit import DeadLetter, ready_counts, take_dead_letters
from worker.celery_app import EXECUTE_TASK
from worker.client import WalletClient

pytestmark = pytest.mark.parametrize("broker_kind", ["rabbitmq"], indirect=True)

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def _headers(task: str) -> dict[str, Any]:
    task_id = str(uuid.uuid4())
    return {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None,
            "group": None, "eta": None, "expires": None, "retries": 0,
            "timelimit": [None, None], "origin": "test_rabbitmq"}


def _publish_raw(client: WalletClient, body: bytes, headers: dict[str, Any]) -> None:
    names = client.publisher.queues
    with client.publisher.app.connection_for_write() as conn:
        producer = Producer(conn.default_channel, exchange=Exchange(names.exchange, type="direct"))
        producer.publish(body, routing_key=names.commands, content_type="application/json",
                         content_encoding="utf-8", headers=headers, serializer=None,
                         delivery_mode=2)


def _dead_letters(url: str, queue: str, count: int, describe: Any) -> list[DeadLetter]:
    taken: list[DeadLetter] = []

    def enough() -> bool:
        taken.extend(take_dead_letters(url, queue))
        return len(taken) >= count

    eventually(enough, 60, describe=describe)
    return taken


def test_a_message_for_no_walletq_task_is_dead_lettered_and_a_refused_one_acked(
        worker, client, broker, queue_prefix):
    # Not a task envelope: the worker's guard refuses it (audited, acknowledged: it is not
    # dead-lettered, there is nothing to retry). A task the worker does not know: Celery
    # rejects it without requeue, and RabbitMQ dead-letters it.
    names = QueueNames(queue_prefix)
    _publish_raw(client, json.dumps({"not": "an envelope"}).encode(), _headers(EXECUTE_TASK))
    _publish_raw(client, json.dumps([[credit("no-task", "eve", "5.00")], {}, _EMBED]).encode(),
                 _headers("walletq.no_such_task"))
    client.submit(credit("after", "alice", "2.00"))
    assert client.wait("after", timeout=30).status == "succeeded", worker.log_tail()

    dead = _dead_letters(broker.url, names.commands + ".dead", 1, worker.log_tail)
    assert [d.reason for d in dead] == ["rejected"], dead
    assert isinstance(dead[0].body, list) and dead[0].body[0][0]["idempotency_key"] == "no-task"
    assert take_dead_letters(broker.url, names.commands + ".dead") == []
    with client.engine.connect() as conn:
        details = conn.execute(text(
            "SELECT detail FROM audit_events WHERE outcome = 'refused'")).scalars().all()
    found = [d if isinstance(d, dict) else json.loads(d) for d in details]
    assert [d.get("source") for d in found] == ["boundary"], found
    assert client.status("no-task") is None
    assert worker.alive
    assert_ledger_sound(client.engine, client.settings)


def _open_write_transactions() -> int:
    with get_engine(get_settings()).connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_xid IS NOT NULL")).scalar_one())


@pytest.fixture
def client_limit_1(pipeline_env, monkeypatch) -> Iterator[WalletClient]:
    # The limit is a queue argument: every producer and worker must declare the same one.
    monkeypatch.setenv("WALLETQ_BROKER_DELIVERY_LIMIT", "1")
    client = WalletClient.from_env()
    yield client
    client.close()


def test_a_message_that_kills_its_pool_process_on_every_delivery_is_dead_lettered(
        worker_factory, client_limit_1, broker, queue_prefix):
    client = client_limit_1
    names = QueueNames(queue_prefix)
    # A limit of 1: the first return is allowed, the second dead-letters the message.
    slow = worker_factory(concurrency=1, env={"WALLETQ_TEST_DELAY_S": "2",
                                              "WALLETQ_BROKER_DELIVERY_LIMIT": "1"})
    client.submit(credit("poison", "alice", "1.00"))
    killed = 0
    for _ in range(2):
        # Mid-transaction every time: the pool process dies, the main process returns the
        # message to RabbitMQ (task_reject_on_worker_lost), which counts the delivery.
        eventually(_open_write_transactions, 60, describe=slow.log_tail)
        assert slow.kill_pool_child() is not None
        killed += 1
        eventually(lambda: not _open_write_transactions(), 30, describe=slow.log_tail)

    dead = _dead_letters(broker.url, names.commands + ".dead", 1, slow.log_tail)
    assert [d.reason for d in dead] == ["delivery_limit"], dead
    assert dead[0].body[0][0]["idempotency_key"] == "poison"
    assert ready_counts(broker.url, [names.commands]) == {names.commands: 0}
    assert client.status("poison").status != "succeeded"
    assert slow.alive  # the main process went on; only its pool processes died
    print(f"\n[dead-letter] pool process killed {killed} times; dead-lettered "
          f"({dead[0].reason})")


@pytest.fixture
def private_rabbit() -> Iterator[PrivateRabbit]:
    node = PrivateRabbit().start()
    yield node
    node.stop()


def test_a_killed_rabbitmq_node_keeps_every_confirmed_command(
        worker_factory, pipeline_env, private_rabbit, queue_prefix, monkeypatch):
    broker = {"WALLETQ_BROKER_URL": private_rabbit.url}
    monkeypatch.setenv("WALLETQ_BROKER_URL", private_rabbit.url)
    names = QueueNames(queue_prefix)
    # Declared with their arguments (quorum, dead-lettering) by a worker, then stopped.
    worker = worker_factory(concurrency=2, env=broker)
    worker.stop()
    client = WalletClient.from_env({**os.environ, **broker})
    try:
        keys = [credit(f"kept-{i}", f"u{i % 10}", "1.25") for i in range(100)]
        answers = client.submit_many(keys)  # each publish confirmed by the node
        assert not [a for a in answers if isinstance(a, Exception)], answers
        queued = ready_counts(private_rabbit.url, [names.commands])[names.commands]
        assert queued > 0  # the client sends keys in chunks: fewer messages than commands
        private_rabbit.restart()  # SIGKILL: nothing flushed at exit
        restarted = time.monotonic()
        eventually(lambda: ready_counts(private_rabbit.url, [names.commands])[names.commands]
                   == queued, 60)
        worker.start()
        records = client.wait_all([c["idempotency_key"] for c in keys], timeout=90)
        ended = time.monotonic()
        assert {r.status for r in records.values()} == {"succeeded"}, worker.log_tail()
        assert len(records) == len(keys)
        print(f"\n[rabbit restart] {len(keys)} commands kept by a SIGKILLed node; all "
              f"succeeded {ended - restarted:.2f} s after the restart (no sweep)")
        assert {client.balance(f"u{i}")["available"] for i in range(10)} == {Decimal("12.50")}
        assert_ledger_sound(client.engine, client.settings)
    finally:
        client.close()
