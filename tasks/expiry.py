"""`walletq.expire_holds`: what beat runs every WALLETQ_EXPIRY_INTERVAL_S (services.expiry)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from services import expiry
from services.db import get_engine
from services.producer_identity import system_signer_for
from services.settings import get_settings
from worker.celery_app import EXPIRY_TASK

__all__ = ["expire_holds_task"]


@shared_task(name=EXPIRY_TASK, acks_late=True, ignore_result=True)
def expire_holds_task() -> dict[str, Any]:
    settings = get_settings()
    engine = get_engine(settings)
    return expiry.run_once(engine, settings, system_signer_for(settings, engine)).to_dict()
