"""The Celery configuration as built from the environment, and as the task sees it once bound:
what docs/ARCHITECTURE.md ("Concurrency and retries") promises, read from the objects Celery
uses. No broker is contacted."""

from __future__ import annotations

from pathlib import Path

import pytest

import celeryconfig
from services.message_policy import TASK_NAME
from services.settings import SettingsError


def env(tmp_path: Path, **values: str) -> dict[str, str]:
    return {"WALLETQ_HOME": str(tmp_path / "home"), "WALLETQ_BROKER_URL": "redis://127.0.0.1:1/0",
            **values}


def test_messages_are_json_only_acknowledged_late_and_prefetched_one_at_a_time(
        tmp_path: Path) -> None:
    config = celeryconfig.build_config(env(tmp_path))
    assert config["accept_content"] == ["json"]  # a pickled message is refused
    assert (config["task_serializer"], config["result_serializer"],
            config["event_serializer"]) == ("json", "json", "json")
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["result_backend"] is None and config["task_ignore_result"] is True


@pytest.mark.parametrize("time_limit_s", ["300", "1800", "7200"])
def test_the_visibility_timeout_outlasts_twice_the_time_limit_plus_a_minute(
        tmp_path: Path, time_limit_s: str) -> None:
    config = celeryconfig.build_config(env(tmp_path, WALLETQ_TASK_TIME_LIMIT_S=time_limit_s))
    limit = int(time_limit_s)
    visibility = config["broker_transport_options"]["visibility_timeout"]
    assert config["task_time_limit"] == limit
    assert 0 < config["task_soft_time_limit"] < limit
    assert visibility >= 2 * limit + 60


def test_a_visibility_timeout_shorter_than_that_is_refused(tmp_path: Path) -> None:
    ok = celeryconfig.build_config(env(tmp_path, WALLETQ_TASK_TIME_LIMIT_S="100",
                                       WALLETQ_BROKER_VISIBILITY_TIMEOUT_S="260"))
    assert ok["broker_transport_options"]["visibility_timeout"] == 260
    with pytest.raises(SettingsError, match="at least twice the task time limit"):
        celeryconfig.build_config(env(tmp_path, WALLETQ_TASK_TIME_LIMIT_S="100",
                                      WALLETQ_BROKER_VISIBILITY_TIMEOUT_S="259"))


def test_the_retry_settings_reach_the_bound_task_through_task_annotations(
        tmp_path: Path) -> None:
    from worker.celery_app import make_app

    values = env(tmp_path, WALLETQ_TASK_RETRIES_MAX="7", WALLETQ_TASK_BACKOFF_S_MAX="13")
    annotations = celeryconfig.build_config(values)["task_annotations"]
    assert annotations[TASK_NAME] == {"max_retries": 7, "retry_backoff_max": 13}
    # Every task that executes commands (single messages, chunks of keys) retries alike.
    assert all(a == annotations[TASK_NAME] for a in annotations.values()), annotations
    app = make_app(values)
    try:
        app.loader.import_default_modules()  # the config's `imports`, as a worker loads them
        task = app.tasks[TASK_NAME]
        assert (task.max_retries, task.retry_backoff_max) == (7, 13)
        assert task.acks_late is True and task.reject_on_worker_lost is True
        assert task.retry_backoff is True and task.retry_jitter is True
    finally:
        app.close()
