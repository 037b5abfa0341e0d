"""How a recorded command reaches a worker: a protocol, so that services never import a
broker library. The Celery implementation is worker.publisher.CeleryPublisher; a second
broker library would be one more class with these three methods."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from services.command_store import CommandRecord

__all__ = ["CommandPublisher"]


class CommandPublisher(Protocol):
    def publish(self, record: CommandRecord) -> None:
        """Send one recorded command to the workers; raise when the broker cannot take it."""

    def publish_many(self, records: Sequence[CommandRecord]) -> list[Exception | None]:
        """Send many over one connection: one entry per record, None where it was sent."""

    def publish_keys(self, keys: Sequence[str]) -> None:
        """Send one message naming recorded single commands by key, for one batch; raise
        when the broker cannot take it."""
