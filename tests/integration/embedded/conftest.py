"""Embedded mode: every test here runs on a SQLite file under a temporary WALLETQ_HOME
(tests/conftest.py's `sqlite_env`); `engine` and `service` follow `settings`."""

from __future__ import annotations

import pytest

from services.settings import Settings


@pytest.fixture
def settings(sqlite_env: Settings) -> Settings:
    return sqlite_env
