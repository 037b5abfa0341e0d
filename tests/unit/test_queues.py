"""Queues: one prefix, applied once; a destination no worker consumes is refused at publish."""

from __future__ import annotations

from typing import Any

import pytest
from celery.exceptions import QueueNotFound

import celeryconfig
from services.command_types import REGISTRY
from services.message_policy import TASK_NAME
from worker.celery_app import make_app

REDIS = {"WALLETQ_BROKER_URL": "redis://127.0.0.1:6379/0", "WALLETQ_QUEUE_PREFIX": "clients"}
#: What the README documents, written out: the queue (and Redis key) of each command type.
DOCUMENTED_QUEUE = {entry.name: "clientspayouts" if entry.name == "payout_batch" else "clientscommands"
                    for entry in REGISTRY}


def test_the_prefix_is_in_the_queue_names_once_and_not_again_in_the_redis_keys(tmp_path) -> None:
    config = celeryconfig.build_config({**REDIS, "WALLETQ_HOME": str(tmp_path)})
    assert [q.name for q in config["task_queues"]] == ["clientscommands", "clientspayouts",
                                                       "clientsmaintenance"]
    options = config["broker_transport_options"]
    assert "global_keyprefix" not in options
    assert options["unacked_key"] == "clientsunacked"
    assert options["unacked_index_key"] == "clientsunacked_index"
    assert options["unacked_mutex_key"] == "clientsunacked_mutex"
    assert config["task_create_missing_queues"] is False


def test_without_a_prefix_the_names_are_bare_and_the_keys_kombus_defaults(tmp_path) -> None:
    config = celeryconfig.build_config({"WALLETQ_BROKER_URL": "redis://127.0.0.1:6379/0",
                                        "WALLETQ_HOME": str(tmp_path)})
    assert [q.name for q in config["task_queues"]] == ["commands", "payouts", "maintenance"]
    assert config["broker_transport_options"]["unacked_key"] == "unacked"


@pytest.fixture
def redis_app(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Any:
    for key, value in {**REDIS, "WALLETQ_HOME": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    return make_app()


def route(app: Any, command: dict[str, Any], **options: Any) -> dict[str, Any]:
    """Where Celery would publish this message (no broker is contacted)."""
    return app.amqp.router.route(options, TASK_NAME, args=[command], kwargs={})  # type: ignore[no-any-return]


@pytest.mark.parametrize("command_type", list(DOCUMENTED_QUEUE))
def test_each_type_is_published_to_its_documented_queue(redis_app: Any, command_type: str) -> None:
    destination = route(redis_app, {"type": command_type})
    assert destination["queue"].name == DOCUMENTED_QUEUE[command_type]
    assert destination["routing_key"] == DOCUMENTED_QUEUE[command_type]


@pytest.mark.parametrize("options", [
    {"queue": "commands"},                 # the bare name, under a prefix
    {"queue": "clientsclientscommands"},   # the old doubly prefixed key
    {"queue": "comands"},
    {"routing_key": "commands"},
    {"exchange": "walletq"},
    {"exchange": "nope", "routing_key": "clientscommands"},
], ids=repr)
def test_a_destination_no_worker_consumes_is_refused_at_publish(redis_app: Any,
                                                                 options: dict[str, Any]) -> None:
    with pytest.raises(QueueNotFound):
        route(redis_app, {"type": "credit_wallet"}, **options)


@pytest.mark.parametrize("options", [
    {"queue": "clientscommands"}, {"queue": "clientspayouts"},
    {"routing_key": "clientscommands"}, {"exchange": "clientswalletq"},
], ids=repr)
def test_an_explicit_walletq_destination_is_accepted(redis_app: Any, options: dict[str, Any]) -> None:
    assert route(redis_app, {"type": "credit_wallet"}, **options)["queue"].name.startswith("clients")
