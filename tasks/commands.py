"""`walletq.execute_command`: a thin adapter from a Celery message to the failure policy.

services.message_policy.execute_message decides what becomes of the message; this task
only hands a `RetryLater` to Celery's autoretry (exponential backoff with jitter, bounded
by WALLETQ_TASK_RETRIES_MAX and WALLETQ_TASK_BACKOFF_S_MAX through the app's
task_annotations) and returns a summary of the outcome.
"""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task
from sqlalchemy.exc import DBAPIError

from services.db import get_engine
from services.errors import ConcurrentOperationError
from services.message_policy import TASK_NAME, RetryLater, execute_message
from services.settings import get_settings

__all__ = ["execute"]


@shared_task(
    bind=True,
    name=TASK_NAME,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(ConcurrentOperationError, DBAPIError),
    retry_backoff=True,
    retry_jitter=True,
    ignore_result=True,
)
def execute(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    settings = get_settings()
    outcome = execute_message(args, kwargs, engine=get_engine(settings), settings=settings,
                              retries_left=self.request.retries < self.max_retries)
    if isinstance(outcome, RetryLater):
        raise outcome.error  # autoretry_for: re-queued with exponential backoff and jitter
    return outcome.summary()
