"""`walletq.execute_command` and `walletq.execute_keys`: thin adapters from a Celery message
to the failure policy.

services.message_policy decides what becomes of the message; these tasks only tell it
whether the message is a redelivery (the broker says so, or it is a retry: the command then
takes the path that counts its delivery first), hand a `RetryLater` to Celery's autoretry
(exponential backoff with jitter, bounded by WALLETQ_TASK_RETRIES_MAX and
WALLETQ_TASK_BACKOFF_S_MAX through the app's task_annotations) and return a summary.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject
from sqlalchemy.exc import DBAPIError

from services.db import get_engine
from services.errors import ConcurrentOperationError, PoisonMessageError
from services.message_policy import (
    KEYS_TASK_NAME,
    TASK_NAME,
    RetryLater,
    execute_keys_message,
    execute_message,
)
from services.settings import get_settings

__all__ = ["execute", "execute_keys"]

log = logging.getLogger("walletq.tasks")
POISON = PoisonMessageError.code


def _redelivered(task: Task) -> bool:
    """Delivered before (Redis and RabbitMQ flag a message they restore), or a retry."""
    delivery = task.request.delivery_info or {}
    return bool(delivery.get("redelivered")) or bool(task.request.retries)


#: Both tasks: late acks, a lost worker's message back to the queue, Celery's autoretry of
#: a transient failure (bounded through the app's task_annotations), no result; every
#: message inspected in the main process before it reaches the pool (the boundary).
_OPTIONS = {"bind": True, "acks_late": True, "reject_on_worker_lost": True,
            "autoretry_for": (ConcurrentOperationError, DBAPIError), "retry_backoff": True,
            "retry_jitter": True, "ignore_result": True,
            "Strategy": "worker.guarded_request:guarded_strategy"}


@shared_task(name=TASK_NAME, **_OPTIONS)
def execute(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    settings = get_settings()
    outcome = execute_message(args, kwargs, engine=get_engine(settings), settings=settings,
                              retries_left=self.request.retries < self.max_retries,
                              redelivered=_redelivered(self))
    if isinstance(outcome, RetryLater):
        raise outcome.error  # autoretry_for: re-queued with exponential backoff and jitter
    summary = outcome.summary()
    if (summary.get("error") or {}).get("code") == POISON:
        # Quarantined: dropped, never requeued (dead-lettered where the queue has a DLX).
        log.error("%s: poison message rejected: %s", summary["idempotency_key"], summary)
        raise Reject(summary, requeue=False)
    return summary


@shared_task(name=KEYS_TASK_NAME, **_OPTIONS)
def execute_keys(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    settings = get_settings()
    outcome = execute_keys_message(args, kwargs, engine=get_engine(settings), settings=settings,
                                   retries_left=self.request.retries < self.max_retries,
                                   redelivered=_redelivered(self))
    if isinstance(outcome, RetryLater):
        raise outcome.error
    return outcome.summary()
