"""What a test's Redis queues hold (every key of the test's queue prefix), and a message as
a producer without kombu pushes it onto one."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import redis

from services.message_policy import KEYS_TASK_NAME

__all__ = ["queue_state", "broker_idle", "queued_commands", "redis_task_message"]


def queue_state(url: str, prefix: str) -> dict[str, int]:
    """Length of every list (a queue) and hash (unacknowledged messages) under the prefix;
    {} when every one is empty."""
    conn = redis.Redis.from_url(url)
    try:
        state = {}
        for key in conn.scan_iter(match=f"{prefix}*"):
            kind = conn.type(key)
            size = conn.llen(key) if kind == b"list" else (
                conn.hlen(key) if kind == b"hash" else 0)
            if size:
                state[key.decode()] = size
        return state
    finally:
        conn.close()


def broker_idle(url: str, prefix: str) -> bool:
    """No message waits and none is in flight. With late acks a message leaves the unacked
    hash only after its task returned, so an idle broker means every delivery has ended."""
    return not queue_state(url, prefix)


def queued_commands(url: str, prefix: str) -> int:
    """Commands the queues under the prefix name: one per command message, one per key of a
    bulk producer's chunk message (services.message_policy.KEYS_TASK_NAME)."""
    conn = redis.Redis.from_url(url)
    try:
        named = 0
        for key in conn.scan_iter(match=f"{prefix}*"):
            if conn.type(key) != b"list":
                continue
            for raw in conn.lrange(key, 0, -1):
                message = json.loads(raw)
                body = json.loads(base64.b64decode(message["body"]))
                task = message["headers"]["task"]
                named += len(body[0][0]) if task == KEYS_TASK_NAME else 1
        return named
    finally:
        conn.close()


def redis_task_message(task: str, args: list[Any], queue: str, *, body: bytes | None = None,
                       headers: dict[str, Any] | None = None) -> str:
    """A Celery task message (protocol 2) as kombu's Redis transport stores it in a queue's
    list: what a producer without kombu (celery-node, a hand-written client) LPUSHes.
    `body` replaces the encoded `[args, {}, embed]`; `headers` adds to / overrides the headers."""
    task_id = str(uuid.uuid4())
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    body = json.dumps([args, {}, embed]).encode() if body is None else body
    return json.dumps({
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "js", "task": task, "id": task_id, "root_id": task_id,
                    "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
                    "timelimit": [None, None], "origin": "a foreign producer", **(headers or {})},
        "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    })
