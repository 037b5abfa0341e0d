"""What a test's RabbitMQ queues hold, read over AMQP (kombu/py-amqp, installed with Celery)
and, for messages in flight, with `rabbitmqctl` (AMQP tells ready messages only).

Every function takes the queue prefix of the test (WALLETQ_QUEUE_PREFIX) and touches only
the queues and exchanges walletq declares under it (celeryconfig.QueueNames).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Any

import amqp
from kombu import Connection

from celeryconfig import QueueNames

__all__ = ["ready_counts", "in_queue_counts", "rabbit_idle", "DeadLetter", "take_dead_letters",
           "delete_walletq_queues"]


def _channel_ready(conn: Connection, name: str) -> int:
    channel = conn.channel()
    try:
        return int(channel.queue_declare(name, passive=True).message_count)
    except amqp.NotFound:
        return 0
    finally:
        try:
            channel.close()
        except Exception:  # closed by the broker after NotFound
            pass


def ready_counts(url: str, names: list[str]) -> dict[str, int]:
    """Messages waiting (not delivered) in each named queue; 0 for a queue that is absent."""
    with Connection(url) as conn:
        return {name: _channel_ready(conn, name) for name in names}


def in_queue_counts(prefix: str, node: str | None = None) -> dict[str, int]:
    """Ready plus unacknowledged messages of every queue under the prefix, as rabbitmqctl
    tells them (slow: seconds per call)."""
    argv = ["rabbitmqctl", "-q"] + (["-n", node] if node else []) + [
        "list_queues", "--formatter", "json", "name", "messages"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout
    rows = json.loads(out or "[]")
    return {row["name"]: int(row["messages"]) for row in rows
            if row["name"].startswith(prefix) and row["messages"]}


def rabbit_idle(url: str, prefix: str, node: str | None = None) -> bool:
    """No message waits in a work queue and none is in flight (dead-letter queues aside)."""
    names = QueueNames(prefix)
    if any(ready_counts(url, names.all()).values()):
        return False
    return not {name for name in in_queue_counts(prefix, node) if name in names.all()}


@dataclass(frozen=True)
class DeadLetter:
    body: Any
    headers: dict[str, Any]

    @property
    def reason(self) -> str | None:
        """Why RabbitMQ dead-lettered it: `rejected` or `delivery_limit`."""
        deaths = self.headers.get("x-death") or []
        return str(deaths[0]["reason"]) if deaths else None


def take_dead_letters(url: str, queue: str) -> list[DeadLetter]:
    """Every message of a dead-letter queue, removed (acknowledged) as read."""
    taken = []
    with Connection(url) as conn:
        channel = conn.channel()
        while True:
            message = channel.basic_get(queue, no_ack=True)
            if message is None:
                break
            try:
                body: Any = json.loads(message.body)
            except (ValueError, TypeError):
                body = message.body
            headers = dict(message.headers or {})
            if not headers.get("x-death"):
                headers["x-death"] = message.properties.get("application_headers", {}).get("x-death")
            taken.append(DeadLetter(body, headers))
    return taken


def delete_walletq_queues(url: str, prefix: str) -> None:
    """The test's work and dead-letter queues and its two exchanges."""
    names = QueueNames(prefix)
    with Connection(url) as conn:
        for name in names.all() + names.dead():
            channel = conn.channel()
            try:
                channel.queue_delete(name)
            except amqp.AMQPError:
                pass
        for exchange in (names.exchange, names.dead_exchange):
            channel = conn.channel()
            try:
                channel.exchange_delete(exchange)
            except amqp.AMQPError:
                pass
