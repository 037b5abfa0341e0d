"""The Celery ceiling of the benchmarks: walletq's own Celery configuration (Redis, JSON,
acks_late, prefetch 1, no result backend) and a task that does nothing.

    celery -A bench.noop worker        (bench/harness.py starts it)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_ready

import celeryconfig

__all__ = ["NOOP_TASK", "make_noop_app", "app"]

NOOP_TASK = "bench.noop"


def make_noop_app() -> Celery:
    noop = Celery("walletq-bench-noop", set_as_current=False)
    config = celeryconfig.build_config()
    config["imports"] = []
    config["task_routes"] = None
    noop.conf.update(config)

    @noop.task(name=NOOP_TASK, acks_late=True, ignore_result=True)
    def nothing(*_args: Any, **_kwargs: Any) -> None:
        return None

    return noop


@worker_ready.connect
def _announce_ready(**_kwargs: Any) -> None:
    ready_file = os.environ.get("WALLETQ_WORKER_READY_FILE")
    if ready_file:
        Path(ready_file).write_text(str(os.getpid()))


app = make_noop_app()
