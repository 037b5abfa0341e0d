"""The sweep: republish commands left `accepted` or `processing` past the grace period.

A message lost by the broker (Redis restarted without persistence), or a worker killed in
the middle of a command, leaves a command that is not terminal; republishing it is always
safe because execution is idempotent. Bounded: at most `batches_max` batches of
`batch_max` commands per run. `publish` is a callable, so this module never imports Celery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Connection, Engine

from services import command_store, schema
from services.command_executor import run_transaction
from services.command_store import CommandRecord
from services.db import get_engine
from services.settings import Settings, get_settings

__all__ = ["SweepCounts", "run_once", "BATCHES_MAX"]

log = logging.getLogger("walletq.sweep")

#: Batches per run: a backlog larger than this waits for the next run (beat's interval).
BATCHES_MAX = 20
_STATUSES = ("accepted", "processing")
_c = schema.commands


@dataclass
class SweepCounts:
    found: int = 0
    republished: int = 0
    publish_failed: int = 0
    batches: int = 0
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _claim_batch(conn: Connection, grace_s: float, batch_max: int) -> list[CommandRecord]:
    """The oldest stale commands, their clocks restarted so no concurrent sweep takes them too."""
    stale = command_store.stale_keys(conn, grace_s=grace_s, limit=batch_max, statuses=_STATUSES)
    if not stale:
        return []
    cutoff = datetime.now(UTC) - timedelta(seconds=grace_s)
    claimed = conn.execute(
        update(_c)
        .where(_c.c.id.in_([r.id for r in stale]), _c.c.status.in_(_STATUSES),
               _c.c.updated_at < cutoff)
        .values(updated_at=datetime.now(UTC))
        .returning(_c.c.id)
    ).scalars().all()
    ids = set(claimed)
    return [record for record in stale if record.id in ids]


def run_once(
    publish: Callable[[CommandRecord], None], *, engine: Engine | None = None,
    settings: Settings | None = None, grace_s: float | None = None,
    batch_max: int | None = None, batches_max: int = BATCHES_MAX,
) -> SweepCounts:
    """Republish what is stuck, oldest first; returns what it found and did.

    A command whose publish fails keeps its restarted clock: the next run after the grace
    period tries it again.
    """
    settings = settings or get_settings()
    engine = engine or get_engine(settings)
    grace_s = settings.sweep_grace_s if grace_s is None else grace_s
    batch_max = batch_max or settings.sweep_batch_max
    counts = SweepCounts()
    started = time.perf_counter()
    for _ in range(batches_max):
        batch = run_transaction(engine, settings, "sweep claim",
                                lambda conn: _claim_batch(conn, grace_s, batch_max))
        counts.batches += 1
        counts.found += len(batch)
        for record in batch:
            try:
                publish(record)
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
