"""Publishing command messages with Celery: the CommandPublisher the client and the sweep use.

The message is the task `walletq.execute_command` with one positional argument, the
command's JSON object as its producer signed it, with its signature (a recorded command's
`message()`), in the queue its type belongs to (services.command_types).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from celery import Celery

import celeryconfig
from services.command_store import CommandRecord
from worker.celery_app import EXECUTE_KEYS_TASK, EXECUTE_TASK

__all__ = ["CeleryPublisher"]

log = logging.getLogger("walletq.publisher")


class CeleryPublisher:
    """services.publishing.CommandPublisher over a Celery app."""

    def __init__(self, app: Celery, env: Mapping[str, str] | None = None) -> None:
        self.app = app
        self.queues = celeryconfig.queue_names(env)

    def publish_payload(self, payload: dict[str, Any], producer: Any = None) -> None:
        """Send one command message; raises when the broker cannot be reached."""
        queue = self.queues.for_command_type(payload.get("type"))
        self.app.send_task(EXECUTE_TASK, args=[payload], queue=queue, routing_key=queue,
                           producer=producer, ignore_result=True)

    def publish(self, record: CommandRecord) -> None:
        self.publish_payload(record.message())

    def publish_keys(self, keys: Sequence[str], producer: Any = None) -> None:
        """One message naming recorded single commands by key: the worker applies them as
        one batch, each admitted on its own stored signature."""
        self.app.send_task(EXECUTE_KEYS_TASK, args=[list(keys)], queue=self.queues.commands,
                           routing_key=self.queues.commands, producer=producer,
                           ignore_result=True)

    def publish_many(self, records: Sequence[CommandRecord]) -> list[Exception | None]:
        """Send many messages over one producer connection; one entry per record, None if sent."""
        outcomes: list[Exception | None] = []
        try:
            with self.app.producer_or_acquire() as producer:
                for record in records:
                    try:
                        self.publish_payload(record.message(), producer)
                        outcomes.append(None)
                    except Exception as exc:  # noqa: BLE001 - the caller logs; the sweep delivers
                        outcomes.append(exc)
        except Exception as exc:  # noqa: BLE001 - no connection at all
            outcomes.extend(exc for _ in range(len(records) - len(outcomes)))
        return outcomes
