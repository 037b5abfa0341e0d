"""The sweep: republish commands left `accepted` or `processing` past the grace period.

A message lost by the broker (Redis restarted without persistence), or a worker killed in
the middle of a command, leaves a command that is not terminal; republishing it is always
safe because execution is idempotent. Bounded: at most `batches_max` batches of
`batch_max` commands per run. It publishes through a CommandPublisher, so this module
never imports Celery.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy.engine import Engine

from services import command_store
from services.publishing import CommandPublisher
from services.settings import Settings
from services.unit_of_work import run_transaction

__all__ = ["SweepCounts", "run_once", "BATCHES_MAX"]

log = logging.getLogger("walletq.sweep")

#: Batches per run: a backlog larger than this waits for the next run (beat's interval).
BATCHES_MAX = 20


@dataclass
class SweepCounts:
    found: int = 0
    republished: int = 0
    publish_failed: int = 0
    batches: int = 0
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_once(
    publisher: CommandPublisher, *, engine: Engine, settings: Settings,
    grace_s: float | None = None, batch_max: int | None = None, batches_max: int = BATCHES_MAX,
) -> SweepCounts:
    """Republish what is stuck, oldest first; returns what it found and did.

    A command whose publish fails keeps its restarted clock: the next run after the grace
    period tries it again.
    """
    grace_s = settings.sweep_grace_s if grace_s is None else grace_s
    batch_max = batch_max or settings.sweep_batch_max
    counts = SweepCounts()
    started = time.perf_counter()
    cutoff = command_store.stale_cutoff(grace_s)
    for _ in range(batches_max):
        batch = run_transaction(engine, settings, "sweep claim", lambda conn: command_store.claim_stale(
            conn, cutoff=cutoff, limit=batch_max))
        counts.batches += 1
        counts.found += len(batch)
        for record in batch:
            try:
                publisher.publish(record)
                counts.republished += 1
            except Exception:  # noqa: BLE001 - the broker may be down; the next run retries
                counts.publish_failed += 1
                log.warning("sweep: could not republish %s", record.idempotency_key,
                            exc_info=True)
        if len(batch) < batch_max:
            break
    counts.elapsed_s = round(time.perf_counter() - started, 3)
    if counts.found:
        log.info("sweep: %s", counts.to_dict())
    return counts
