"""FakePublisher: a services.publishing.CommandPublisher with no broker, for the cheapest tests
of what publishes (the client's outbox, the sweep): it records every message it takes and
refuses the ones a test tells it to, as a broker that is down, or fails half-way, would."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

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

    def publish(self, record: CommandRecord) -> None:
        if self.on_publish is not None:
            self.on_publish(record)
        key = record.idempotency_key
        with self._lock:
            self.calls += 1
            full = self.accept_max is not None and len(self.published) >= self.accept_max
            if self.down or key in self.refuse or full:
                self.refused.append(key)
                raise BrokerDown(f"fake broker refused {key}")
            self.published.append(key)

    def publish_many(self, records: Sequence[CommandRecord]) -> list[Exception | None]:
        outcomes: list[Exception | None] = []
        for record in records:
            try:
                self.publish(record)
                outcomes.append(None)
            except BrokerDown as exc:
                outcomes.append(exc)
        return outcomes
