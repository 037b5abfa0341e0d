"""The Celery app, the producer client and the CLI: the edges that build settings and
engines once and hand them to services/.

`celery -A worker ...` asks this package for `app`; it is imported on first use, so the
CLI commands that need no broker do not pay for Celery's import.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.celery_app import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
