"""The Celery configuration for RabbitMQ, as built: quorum queues with a delivery limit and a
dead-letter queue each, publisher confirms; Redis's queues unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

import celeryconfig
from services.settings import SettingsError

AMQP = "amqp://guest@127.0.0.1:5672//"


def env(tmp_path: Path, url: str = AMQP, **values: str) -> dict[str, str]:
    return {"WALLETQ_HOME": str(tmp_path / "home"), "WALLETQ_BROKER_URL": url,
            "WALLETQ_QUEUE_PREFIX": "p.", **values}


def test_on_rabbitmq_every_queue_is_a_quorum_queue_that_dead_letters_past_its_limit(
        tmp_path: Path) -> None:
    config = celeryconfig.build_config(env(tmp_path))
    queues = {q.name: q for q in config["task_queues"]}
    assert set(queues) == {"p.commands", "p.payouts", "p.maintenance"}
    for name, queue in queues.items():
        assert queue.durable
        assert queue.queue_arguments == {
            "x-queue-type": "quorum", "x-delivery-limit": 11,  # WALLETQ_DELIVERY_MAX (10) + 1
            "x-dead-letter-exchange": "p.walletq.dead",
            "x-dead-letter-routing-key": f"{name}.dead",
            "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    assert config["broker_transport_options"] == {"confirm_publish": True}
    assert config["task_default_queue_type"] == "quorum"
    assert config["worker_detect_quorum_queues"] is True


def test_the_dead_letter_queues_are_bound_to_the_dead_letter_exchange_by_their_name() -> None:
    dead = celeryconfig.dead_letter_queues(celeryconfig.QueueNames("p."))
    assert [(q.name, q.exchange.name, q.routing_key) for q in dead] == [
        ("p.commands.dead", "p.walletq.dead", "p.commands.dead"),
        ("p.payouts.dead", "p.walletq.dead", "p.payouts.dead"),
        ("p.maintenance.dead", "p.walletq.dead", "p.maintenance.dead")]
    assert all(q.durable and q.queue_arguments == {"x-queue-type": "quorum"} for q in dead)


def test_the_delivery_limit_is_a_setting_within_bounds(tmp_path: Path) -> None:
    config = celeryconfig.build_config(env(tmp_path, WALLETQ_BROKER_DELIVERY_LIMIT="2"))
    assert {q.queue_arguments["x-delivery-limit"] for q in config["task_queues"]} == {2}
    for bad in ("0", "1001", "five"):
        with pytest.raises(SettingsError, match="WALLETQ_BROKER_DELIVERY_LIMIT"):
            celeryconfig.build_config(env(tmp_path, WALLETQ_BROKER_DELIVERY_LIMIT=bad))


def test_redis_queues_keep_no_arguments_and_no_confirms(tmp_path: Path) -> None:
    config = celeryconfig.build_config(env(tmp_path, "redis://127.0.0.1:1/0"))
    assert all(not q.queue_arguments for q in config["task_queues"])
    assert "confirm_publish" not in config["broker_transport_options"]
    assert "task_default_queue_type" not in config
