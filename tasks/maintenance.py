"""`walletq.sweep`: what beat runs every WALLETQ_SWEEP_INTERVAL_S."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from services import sweep
from services.db import get_engine
from services.settings import get_settings
from worker.celery_app import SWEEP_TASK
from worker.publisher import CeleryPublisher

__all__ = ["sweep_task"]


@shared_task(bind=True, name=SWEEP_TASK, acks_late=True, ignore_result=True)
def sweep_task(self: Task) -> dict[str, Any]:
    settings = get_settings()
    counts = sweep.run_once(CeleryPublisher(self.app), engine=get_engine(settings),
                            settings=settings)
    return counts.to_dict()
