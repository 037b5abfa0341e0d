"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from services import schema
from services.command_fields import CommandLimits
from services.db import get_engine
from services.outbox import Accepted, record_accepted
from services.settings import get_settings
from tests.support.signing import prepared

WALLETQ = str(Path(sys.executable).parent / "walletq")


def accept_only(raw: Any) -> Accepted:
    """Record a command as accepted (the outbox), signed as the test's producer, and publish
    nothing: a message 'lost'."""
    settings = get_settings()
    command, signature = prepared(raw, limits=CommandLimits.from_settings(settings))
    return record_accepted(command, signature, engine=get_engine(settings), settings=settings)


def walletq(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
            timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real `walletq` console script with the test's environment."""
    return subprocess.run([WALLETQ, *args], input=stdin, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout_s, check=False)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def transfers_of(key: str) -> int:
    c, t = schema.commands, schema.transfers
    with get_engine(get_settings()).connect() as conn:
        return conn.execute(select(func.count()).select_from(t.join(c, c.c.id == t.c.command_id))
                            .where(c.c.idempotency_key == key)).scalar_one()


def audit_outcomes(key: str | None = None) -> list[tuple[str, str | None]]:
    a = schema.audit_events
    query = select(a.c.outcome, a.c.error_code).order_by(a.c.id)
    if key is not None:
        query = query.where(a.c.idempotency_key == key)
    with get_engine(get_settings()).connect() as conn:
        return [(row.outcome, row.error_code) for row in conn.execute(query)]


def redis_task_message(task: str, args: list[Any], queue: str) -> str:
    """A Celery task message (protocol 2) as kombu's Redis transport stores it in a queue's
    list: what a producer without kombu (celery-node, a hand-written client) LPUSHes."""
    task_id = str(uuid.uuid4())
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    body = json.dumps([args, {}, embed]).encode()
    return json.dumps({
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "js", "task": task, "id": task_id, "root_id": task_id,
                    "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
                    "timelimit": [None, None], "origin": "a foreign producer"},
        "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    })


def start_beat(env: dict[str, str], schedule: Path) -> subprocess.Popen[bytes]:
    """`celery -A worker beat` in a process group of its own; stop it with stop_beat()."""
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker", "beat",
                             "--loglevel=INFO", "-s", str(schedule)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_beat(beat: subprocess.Popen[bytes]) -> str:
    """SIGTERM the beat's group; its log."""
    os.killpg(beat.pid, signal.SIGTERM)
    return beat.communicate(timeout=20)[0].decode(errors="replace")
