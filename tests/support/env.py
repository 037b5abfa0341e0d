"""The process environment without walletq's settings, so a test decides every WALLETQ_* value."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest

__all__ = ["without_walletq", "strip_walletq_env", "PREFIX"]

PREFIX = "WALLETQ_"


def without_walletq(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment (os.environ by default) with no WALLETQ_* variable."""
    environ = os.environ if environ is None else environ
    return {key: value for key, value in environ.items() if not key.startswith(PREFIX)}


def strip_walletq_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset every WALLETQ_* variable of this process for the test (restored afterwards)."""
    for key in list(os.environ):
        if key.startswith(PREFIX):
            monkeypatch.delenv(key)
