"""The Celery app, the producer client, the CLI and the settings that wire them.

`celery -A worker ...` asks this package for `app`; it is imported lazily so that the CLI
and the producer client do not pay for Celery's import when they do not need it.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.celery_app import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
