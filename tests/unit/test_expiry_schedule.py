"""Beat runs the expiry pass on the maintenance queue, every WALLETQ_EXPIRY_INTERVAL_S."""

from __future__ import annotations

from pathlib import Path

import pytest

import celeryconfig
from services.settings import SettingsError, load_settings
from worker.celery_app import EXPIRY_TASK, route_task


def test_beat_schedules_the_expiry_pass_on_the_maintenance_queue_at_its_interval() -> None:
    config = celeryconfig.build_config({"WALLETQ_EXPIRY_INTERVAL_S": "7", "WALLETQ_HOME": "/tmp/x"})
    entry = config["beat_schedule"]["walletq-expire-holds"]
    assert entry["task"] == EXPIRY_TASK == "walletq.expire_holds"
    assert entry["schedule"] == 7.0
    assert entry["options"] == {"queue": "maintenance", "expires": 7.0}
    assert "tasks.expiry" in config["imports"]


def test_the_expiry_task_is_routed_to_the_maintenance_queue() -> None:
    assert route_task(EXPIRY_TASK, [], {}, {}) == {"queue": "maintenance",
                                                   "routing_key": "maintenance"}


def test_the_system_producer_defaults_to_walletq_system_under_the_home() -> None:
    settings = load_settings({"WALLETQ_HOME": "/srv/wq"})
    assert settings.system_producer == "walletq-system"
    assert settings.system_producer_key_file == Path("/srv/wq/producers/walletq-system.key")
    named = load_settings({"WALLETQ_HOME": "/srv/wq", "WALLETQ_SYSTEM_PRODUCER": "sys-2",
                           "WALLETQ_SYSTEM_PRODUCER_KEY_FILE": "/run/secrets/sys"})
    assert (named.system_producer, named.system_producer_key_file) == ("sys-2",
                                                                      Path("/run/secrets/sys"))


def test_expiry_settings_out_of_bounds_stop_the_process_at_start() -> None:
    for env in ({"WALLETQ_EXPIRY_BATCH_MAX": "0"}, {"WALLETQ_EXPIRY_BATCH_MAX": "10001"},
                {"WALLETQ_SYSTEM_PRODUCER": "bad name"}, {"WALLETQ_EXPIRY_INTERVAL_S": "-1"}):
        with pytest.raises(SettingsError):
            load_settings({"WALLETQ_HOME": "/srv/wq", **env})
