"""Instruments on the payout executor: phase timings for the benchmark, chunk hooks for the
fault tests. Inert unless a caller reads or fills them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["PhaseTimings", "TIMINGS", "AFTER_CHUNK_HOOKS"]


@dataclass
class PhaseTimings:
    """Seconds spent per phase of the chunks run in this process (bench/payouts.py reads it)."""

    seconds: dict[str, float] = field(default_factory=dict)
    chunks: int = 0

    def add(self, phase: str, started: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - started
        return now

    def reset(self) -> None:
        self.seconds.clear()
        self.chunks = 0


TIMINGS = PhaseTimings()

#: Called after each committed chunk with (idempotency_key, chunks_done): a fault test
#: raises here to stop a batch between two chunks.
AFTER_CHUNK_HOOKS: list[Callable[[str, int], None]] = []
