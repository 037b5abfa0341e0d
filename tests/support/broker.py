"""What a test's Redis queues hold: every key of the test's queue prefix."""

from __future__ import annotations

import redis

__all__ = ["queue_state", "broker_idle"]


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
