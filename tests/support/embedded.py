"""Running a PostgreSQL test module again on embedded SQLite: `recollect` copies a module's
tests (and the fixtures they share) into a module of tests/integration/embedded, whose
conftest points `settings`, `engine` and `service` at a SQLite file."""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Any

__all__ = ["recollect"]


def recollect(into: dict[str, Any], modules: Iterable[ModuleType], *, fixtures: Iterable[str] = (),
              skip: Iterable[str] = ()) -> None:
    """Collect the modules' `test_*` functions (but `skip`) and the named module fixtures a
    second time in the namespace `into` (a test module's globals()), under its fixtures."""
    shared, left_out = set(fixtures), set(skip)
    for module in modules:
        for name in dir(module):
            if (name.startswith("test_") and name not in left_out) or name in shared:
                into[name] = getattr(module, name)
