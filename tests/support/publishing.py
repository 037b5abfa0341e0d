"""FakePublisher: a services.publishing.CommandPublisher with no broker, for the cheapest tests
of what publishes (the client's outbox, the sweep): it records every message it takes and
refuses the ones a test tells it to, as a broker that is down, or fails half-way, would."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

from services.command_store import CommandRecord

__all__ = ["FakePublisher", "BrokerDown"]


class BrokerDown(ConnectionError):
    """What the fake raises for a message it refuses."""


class FakePublisher:
    """Records published keys in order; refuses all (`down`), the keys in `refuse`, or every
    message after the first `accept_max`. `on_publish(record)` runs before each message is
    taken (a test may block there). Safe to share between threads."""

    def __init__(self, *, down: bool = False, refuse: Sequence[str] = (),
                 accept_max: int | None = None,
                 on_publish: Callable[[CommandRecord], None] | None = None) -> None:
        self.down = down
        self.refuse = set(refuse)
        self.accept_max = accept_max
        self.on_publish = on_publish
        self.published: list[str] = []
        self.refused: list[str] = []
        self.calls = 0
        self._lock = threading.Lock()
        # The client opens one producer connection around a burst of key messages.
        self.app = SimpleNamespace(producer_or_acquire=self._no_connection)

    @staticmethod
    @contextmanager
    def _no_connection() -> Iterator[None]:
        yield None

    def _take(self, keys: Sequence[str]) -> None:
        """One message naming `keys`: taken whole, or refused whole."""
        with self._lock:
            self.calls += 1
            full = self.accept_max is not None and len(self.published) >= self.accept_max
            if self.down or full or self.refuse & set(keys):
                self.refused.extend(keys)
                raise BrokerDown(f"fake broker refused {', '.join(keys)}")
            self.published.extend(keys)

    def publish(self, record: CommandRecord) -> None:
        if self.on_publish is not None:
            self.on_publish(record)
        self._take([record.idempotency_key])

    def publish_keys(self, keys: Sequence[str], producer: Any = None) -> None:
        self._take(list(keys))

    def publish_many(self, records: Sequence[CommandRecord]) -> list[Exception | None]:
        outcomes: list[Exception | None] = []
        for record in records:
            try:
                self.publish(record)
                outcomes.append(None)
            except BrokerDown as exc:
                outcomes.append(exc)
        return outcomes
