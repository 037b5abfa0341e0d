"""Waiting for asynchronous work: poll a condition until it holds or a deadline passes.

A fixed sleep either wastes time or is too short on a loaded machine; an immediate read
races the worker. `eventually` polls instead, and its deadline is a bound on a hang, never
an assertion about speed: on a slow machine a test waits longer, it does not fail.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["eventually"]

T = TypeVar("T")

_POLL_S_MIN, _POLL_S_MAX = 0.01, 0.25


def eventually(predicate: Callable[[], T], deadline_s: float, *,
               describe: Callable[[], object] | None = None) -> T:
    """The first truthy value `predicate()` returns; AssertionError if none by `deadline_s`.

    The message names the last value seen and, when given, what `describe()` returns (a
    worker's log tail, a queue's state) so that a timeout says where things stood.
    """
    deadline = time.monotonic() + deadline_s
    delay_s = _POLL_S_MIN
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            context = f"\n{describe()}" if describe is not None else ""
            name = getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"{name} still false after {deadline_s} s "
                                 f"(last value {value!r}){context}")
        time.sleep(min(delay_s, max(0.0, deadline - time.monotonic())))
        delay_s = min(delay_s * 2, _POLL_S_MAX)
