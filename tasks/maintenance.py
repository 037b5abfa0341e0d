"""`walletq.sweep`: what beat runs every WALLETQ_SWEEP_INTERVAL_S."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from services import sweep
from worker.celery_app import SWEEP_TASK

__all__ = ["sweep_task"]

log = logging.getLogger("walletq.tasks")


@shared_task(name=SWEEP_TASK, acks_late=True, ignore_result=True)
def sweep_task() -> dict[str, Any]:
    from worker.celery_app import app
    from worker.publisher import Publisher

    counts = sweep.run_once(Publisher(app).publish_record)
    return counts.to_dict()
