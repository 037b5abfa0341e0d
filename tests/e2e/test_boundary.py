"""The worker's message boundary (worker.guarded_request), with a real worker on Redis: a
hostile message is refused in the main process — acknowledged, audited, never redelivered —
and the worker goes on with the next command, in the same process."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from sqlalchemy import text

from services.boundary import DEPTH_MAX
from tests.e2e.conftest import BROKER_URL
from tests.support.broker import broker_idle, queue_state, redis_task_message
from tests.support.builders import credit
from tests.support.ledger import assert_ledger_sound, transfers
from tests.support.polling import eventually
from tests.support.signing import signed
from worker.celery_app import EXECUTE_TASK
from worker.guarded_request import BODY_BYTES_MAX

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def _deep(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = {"n": value}
    return value


def _refusals(engine) -> list[tuple[str | None, str]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(
            "SELECT idempotency_key, error_message FROM refusals WHERE source = 'boundary' "
            "ORDER BY id"))]


def _push(queue_prefix: str, body: bytes | None = None, args: list[Any] | None = None,
          **headers: Any) -> None:
    key = f"{queue_prefix}commands"
    conn = redis.Redis.from_url(BROKER_URL)
    try:
        conn.lpush(key, redis_task_message(EXECUTE_TASK, args or [], key, body=body,
                                           headers=headers))
    finally:
        conn.close()


def _after(client, worker, queue_prefix: str, key: str) -> None:
    """A valid command after the hostile ones succeeds, and the broker is then idle."""
    client.submit(credit(key, "zed", "1.00"))
    assert client.wait(key, timeout=30).status == "succeeded", worker.log_tail()
    eventually(lambda: broker_idle(BROKER_URL, queue_prefix), 20,
               describe=lambda: (queue_state(BROKER_URL, queue_prefix), worker.log_tail()))


def test_a_500_deep_message_is_refused_and_the_same_worker_runs_the_next_command(
        worker, client, queue_prefix):
    pid = worker.pid
    deep = signed(credit("deep-1", "alice", "1.00", memo="x"))
    deep["memo"] = _deep(500)  # ~1.2 KB: once enough to stop every worker, one after another
    queue = client.publisher.queues.commands
    client.publisher.app.send_task(EXECUTE_TASK, args=[deep], queue=queue, routing_key=queue)
    _after(client, worker, queue_prefix, "after-deep")

    assert worker.alive and worker.pid == pid and worker.starts == 1, worker.log_tail()
    assert "Unrecoverable" not in worker.log_text() and "RecursionError" not in worker.log_text()
    refused = _refusals(client.engine)
    # Never decoded, so nothing of it is named: its first 2,000 bytes are in the audit row.
    assert refused == [(None, f"command nests objects and arrays more than {DEPTH_MAX} deep")]
    assert client.status("deep-1") is None  # a refusal takes no key
    assert_ledger_sound(client.engine, client.settings)


def test_eta_duplicate_keys_oversized_and_odd_shapes_are_refused_and_acknowledged(
        worker, client, queue_prefix):
    queue = client.publisher.queues.commands
    # An eta an hour ahead: once held unacknowledged and redelivered, piling up copies.
    client.publisher.app.send_task(EXECUTE_TASK, args=[signed(credit("eta-1", "alice", "5.00"))],
                                   queue=queue, routing_key=queue, countdown=3600)
    # A "retry" whose eta is a day ahead: a retry waits at most the backoff's maximum.
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    _push(queue_prefix, args=[signed(credit("eta-2", "alice", "5.00"))], eta=later, retries=1)
    # The same key twice: never "the last one wins".
    twice = json.dumps(signed(credit("dup-1", "alice", "1.00")))[:-1] + ', "amount": "999.00"}'
    _push(queue_prefix, body=f"[[{twice}], {{}}, {json.dumps(EMBED)}]".encode())
    # Over the size limit, refused before it is decoded.
    _push(queue_prefix, body=b'[["' + b"x" * BODY_BYTES_MAX + b'"], {}, {}]')
    # Not JSON; a callback; a per-message time limit; two arguments.
    _push(queue_prefix, body=b"[[{not json")
    _push(queue_prefix, body=json.dumps([[signed(credit("cb-1", "alice", "1.00"))], {},
                                         {**EMBED, "callbacks": [{"task": "x"}]}]).encode())
    _push(queue_prefix, args=[signed(credit("tl-1", "alice", "1.00"))], timelimit=[99999, None])
    _push(queue_prefix, args=[signed(credit("two-1", "alice", "1.00")), {"extra": True}])
    _after(client, worker, queue_prefix, "after-odd")

    reasons = dict(_refusals(client.engine))
    assert len(_refusals(client.engine)) == 8, _refusals(client.engine)
    assert "eta or countdown" in reasons["eta-1"]
    assert "WALLETQ_TASK_BACKOFF_S_MAX" in reasons["eta-2"]
    assert "callbacks" in reasons["cb-1"]
    assert "time limit" in reasons["tl-1"]
    assert "one argument" in reasons["two-1"]
    unnamed = [message for key, message in _refusals(client.engine) if key is None]
    assert any(f"at most {BODY_BYTES_MAX}" in m for m in unnamed), unnamed
    assert any(m.startswith("malformed JSON: Expecting") for m in unnamed), unnamed
    # Refused while decoding, so nothing of it is named either.
    assert "malformed JSON: the key 'amount' appears twice" in unnamed
    for key in ("eta-1", "eta-2", "dup-1", "cb-1", "tl-1", "two-1"):
        assert client.status(key) is None
    assert worker.alive and worker.starts == 1
    assert len(transfers(client.engine)) == 1  # the marker's: nothing refused moved money
    assert_ledger_sound(client.engine, client.settings)
