"""What a worker's pool process does when it starts (worker.celery_app's worker_process_init
handler): it drops the engines it inherited, freezes what it inherited out of the cyclic
collector's sight, and connects to the database before its first message; a database
that cannot be reached then is logged, not fatal."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator

import pytest

from services import settings as settings_module
from services.db import dispose_engines, for_transactions, get_engine
from worker import celery_app


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_a_started_pool_process_holds_a_connection_of_each_engine_and_a_frozen_heap(
        walletq_env: dict[str, str], unfrozen: None) -> None:
    inherited = get_engine(settings_module.get_settings())
    celery_app._after_fork()
    engine = get_engine(settings_module.get_settings())
    assert engine is not inherited  # its own, not the parent's
    assert engine.pool.checkedin() == 1 and for_transactions(engine).pool.checkedin() == 1
    assert gc.get_freeze_count() > 0


def test_a_pool_process_starting_while_the_database_is_down_logs_it_and_starts(
        walletq_env: dict[str, str], unfrozen: None, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("WALLETQ_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:1/none")
    with caplog.at_level(logging.WARNING, logger="walletq.worker"):
        celery_app._after_fork()
    assert "could not connect to the database before the first task" in caplog.text
    dispose_engines()
