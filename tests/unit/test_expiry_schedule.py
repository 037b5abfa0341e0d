"""Beat runs the expiry pass on the maintenance queue, every WALLETQ_EXPIRY_INTERVAL_S."""

from __future__ import annotations

import celeryconfig
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
