"""Publishing command messages: one place that knows the task's name and each queue.

The message is the task `walletq.execute_command` with one positional argument, the
command's JSON object, in the queue its type belongs to (payout batches: payouts).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from celery import Celery

import celeryconfig
from services.command_store import CommandRecord
from worker.celery_app import EXECUTE_TASK

__all__ = ["Publisher"]

log = logging.getLogger("walletq.publisher")


class Publisher:
    def __init__(self, app: Celery, env: Mapping[str, str] | None = None) -> None:
        self.app = app
        self.queues = celeryconfig.queue_names(env)

    def publish(self, payload: dict[str, Any], producer: Any = None) -> None:
        """Send one command message; raises when the broker cannot be reached."""
        queue = self.queues.for_command_type(payload.get("type"))
        self.app.send_task(EXECUTE_TASK, args=[payload], queue=queue, routing_key=queue,
                           producer=producer, ignore_result=True)

    def publish_record(self, record: CommandRecord) -> None:
        self.publish(record.payload_dict())

    def publish_many(self, payloads: Iterable[dict[str, Any]]) -> list[Exception | None]:
        """Send many messages over one producer connection; one entry per payload, None if sent."""
        outcomes: list[Exception | None] = []
        try:
            with self.app.producer_or_acquire() as producer:
                for payload in payloads:
                    try:
                        self.publish(payload, producer)
                        outcomes.append(None)
                    except Exception as exc:  # noqa: BLE001 - the caller logs; the sweep delivers
                        outcomes.append(exc)
        except Exception as exc:  # noqa: BLE001 - no connection at all
            outcomes.extend(exc for _ in range(len(list(payloads)) - len(outcomes)))
        return outcomes
