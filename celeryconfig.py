"""Celery settings for walletq, read from the WALLETQ_* environment (services.settings).

`celery -A worker worker` loads these through worker.celery_app, when the configuration is
first used (importing a module reads nothing). Everything here follows docs/ARCHITECTURE.md,
"Concurrency and retries": JSON only, late acks, a lost worker's message goes back to the
queue, one message prefetched at a time, time limits well below the broker's visibility
timeout, and no result backend (the outcome lives in the database).

Extra variables read here (besides services.settings):
- WALLETQ_QUEUE_PREFIX: prepended to every queue and exchange name, so that parallel test
  runs (or two deployments) on one broker never share queues. Default: none. It is applied
  once, to the names: on Redis a queue's list key IS its name (`clientscommands`), which is
  what a producer in another language pushes to. (kombu's `global_keyprefix` is not used:
  it would prefix the keys a second time, so the worker read `clientsclientscommands` while
  every document and producer named `clientscommands`.) Redis's bookkeeping keys for
  unacknowledged messages carry the prefix too, so deployments never restore each other's.
- WALLETQ_BROKER_VISIBILITY_TIMEOUT_S: how long Redis waits before re-delivering a message
  that was taken and never acknowledged (a worker killed outright). Default: one hour, and
  at least twice the task time limit; the outbox sweep recovers such commands much sooner.
- WALLETQ_WORKER_CONCURRENCY: worker processes (default: Celery's, the number of CPUs).
- WALLETQ_BROKER_DELIVERY_LIMIT: on RabbitMQ, how many times a message may go back to its
  queue unacknowledged (its worker or pool process died) before RabbitMQ dead-letters it
  to `<queue>.dead` instead of delivering it again. Default WALLETQ_DELIVERY_MAX + 1: the
  database's own count quarantines a poison command first (`poison`, with its audit row);
  the broker's limit is the backstop for a message that never reaches the database.

On RabbitMQ (an amqp:// URL) every queue is a durable quorum queue (replicated, fsynced
before it confirms), publishes wait for the broker's confirm, and each work queue has a
dead-letter queue; see docs/ARCHITECTURE.md, "RabbitMQ".
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kombu import Exchange, Queue

from services import command_types
from services.message_policy import KEYS_TASK_NAME, TASK_NAME
from services.settings import Settings, SettingsError, load_settings

__all__ = ["build_config", "queue_names", "QueueNames", "prepare_broker_folders",
           "redis_bookkeeping_keys", "is_amqp", "work_queues", "dead_letter_queues",
           "delivery_limit"]



class QueueNames:
    """The three queues, named for their work, with the deployment's prefix."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.commands = f"{prefix}commands"
        self.payouts = f"{prefix}payouts"
        self.maintenance = f"{prefix}maintenance"
        self.exchange = f"{prefix}walletq"
        #: RabbitMQ only: where a queue's poison messages go (`<queue>.dead`).
        self.dead_exchange = f"{prefix}walletq.dead"

    def for_command_type(self, command_type: object) -> str:
        """The registry's queue for the type (a payout batch runs for seconds and must not
        hold up single commands behind it), with the prefix."""
        return f"{self.prefix}{command_types.queue_of(command_type)}"

    def all(self) -> list[str]:
        return [self.commands, self.payouts, self.maintenance]

    def dead(self) -> list[str]:
        """The dead-letter queue of each work queue, in the order of all()."""
        return [f"{name}.dead" for name in self.all()]


def queue_names(env: Mapping[str, str] | None = None) -> QueueNames:
    env = os.environ if env is None else env
    return QueueNames(env.get("WALLETQ_QUEUE_PREFIX", ""))


def _visibility_timeout_s(env: Mapping[str, str], settings: Settings) -> int:
    raw = env.get("WALLETQ_BROKER_VISIBILITY_TIMEOUT_S", "")
    floor_s = 2 * settings.task_time_limit_s + 60
    try:
        value = int(raw) if raw else max(3600, floor_s)
    except ValueError:
        raise SettingsError(f"WALLETQ_BROKER_VISIBILITY_TIMEOUT_S={raw!r} is not an int") from None
    if value < floor_s:
        # A message re-delivered while its task still runs would run twice at once.
        raise SettingsError(
            f"WALLETQ_BROKER_VISIBILITY_TIMEOUT_S={value} must be at least twice the task time "
            f"limit plus a minute ({floor_s})"
        )
    return value


def redis_bookkeeping_keys(prefix: str) -> dict[str, str]:
    """kombu's Redis keys for unacknowledged messages, under the deployment's prefix: a worker
    restores only its own deployment's messages, after its own visibility timeout."""
    return {"unacked_key": f"{prefix}unacked", "unacked_index_key": f"{prefix}unacked_index",
            "unacked_mutex_key": f"{prefix}unacked_mutex"}


def is_amqp(broker_url: str) -> bool:
    return broker_url.startswith(("amqp://", "amqps://", "pyamqp://"))


def delivery_limit(env: Mapping[str, str]) -> int:
    raw = env.get("WALLETQ_BROKER_DELIVERY_LIMIT", "")
    if not raw:
        return load_settings(env).delivery_max + 1
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"WALLETQ_BROKER_DELIVERY_LIMIT={raw!r} is not an int") from None
    if not 1 <= value <= 1000:
        raise SettingsError(f"WALLETQ_BROKER_DELIVERY_LIMIT={value} must be between 1 and 1000")
    return value


def work_queues(names: QueueNames, broker_url: str, env: Mapping[str, str]) -> list[Queue]:
    """The three work queues. On RabbitMQ: quorum queues (durable, replicated), which count
    each delivery that went back unacknowledged and dead-letter a message past the limit
    (at-least-once dead-lettering, which RabbitMQ allows only with `reject-publish`)."""
    exchange = Exchange(names.exchange, type="direct")
    if not is_amqp(broker_url):
        return [Queue(name, exchange, routing_key=name) for name in names.all()]
    limit = delivery_limit(env)
    return [Queue(name, exchange, routing_key=name, durable=True, queue_arguments={
        "x-queue-type": "quorum",
        "x-delivery-limit": limit,
        "x-dead-letter-exchange": names.dead_exchange,
        "x-dead-letter-routing-key": dead,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }) for name, dead in zip(names.all(), names.dead(), strict=True)]


def dead_letter_queues(names: QueueNames) -> list[Queue]:
    """RabbitMQ only: `<queue>.dead` for each work queue, bound to the dead-letter exchange.
    No worker consumes them; an operator inspects and requeues (README, "Choosing a
    broker"). Declared by the worker at start (worker.celery_app.DeclareDeadLetters)."""
    exchange = Exchange(names.dead_exchange, type="direct", durable=True)
    return [Queue(dead, exchange, routing_key=dead, durable=True,
                  queue_arguments={"x-queue-type": "quorum"}) for dead in names.dead()]


def _broker_tls(settings: Settings) -> dict[str, Any] | bool:
    """For rediss://, TLS that verifies the server: kombu's default for a rediss:// URL
    without options is CERT_NONE (encrypted, but anyone in the middle may answer)."""
    if not settings.broker_url.startswith("rediss://"):
        return False
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": settings.broker_ca_file,
            "ssl_check_hostname": True}


def _broker_folders(home: Path) -> dict[str, Path]:
    root = home / "broker"
    return {"queue": root / "queue", "processed": root / "processed", "control": root / "control"}


def prepare_broker_folders(env: Mapping[str, str] | None = None) -> None:
    """Create the embedded broker's folders (and WALLETQ_HOME); the edges call it before
    their first message, never an import."""
    settings = load_settings(os.environ if env is None else env)
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    if settings.broker_url.startswith("filesystem"):
        # Message files are commands with their signatures: this process's own (kombu
        # writes them with the umask's mode, so the umask keeps them 0600, folders 0700).
        os.umask(os.umask(0) | 0o077)
        for folder in _broker_folders(settings.home).values():
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)


def _filesystem_options(home: Path) -> dict[str, Any]:
    """The server-less broker: one folder of message files per deployment, under WALLETQ_HOME."""
    folders = _broker_folders(home)
    return {
        "data_folder_in": str(folders["queue"]),
        "data_folder_out": str(folders["queue"]),
        "processed_folder": str(folders["processed"]),
        "control_folder": str(folders["control"]),
        "store_processed": False,
        # Kombu polls virtual transports; the default second would slow the demo down.
        "polling_interval": 0.1,
    }


def build_config(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The Celery configuration for this environment, as a plain dict."""
    env = os.environ if env is None else env
    settings = load_settings(env)
    names = queue_names(env)
    amqp = is_amqp(settings.broker_url)
    exchange = Exchange(names.exchange, type="direct")
    time_limit_s = settings.task_time_limit_s
    visibility_timeout_s = _visibility_timeout_s(env, settings)
    transport_options: dict[str, Any] = {"visibility_timeout": visibility_timeout_s}
    if settings.broker_url.startswith("filesystem"):
        transport_options.update(_filesystem_options(settings.home))
    elif settings.broker_url.startswith(("redis", "rediss")):
        transport_options.update(redis_bookkeeping_keys(names.prefix))
    elif amqp:
        # Publisher confirms: a publish returns once RabbitMQ has the message (for a quorum
        # queue, on a majority of nodes' disks), not when it left our socket.
        transport_options = {"confirm_publish": True}
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "broker_use_ssl": _broker_tls(settings),
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # JSON only: a pickled message could run code; it is refused and acknowledged.
        "accept_content": ["json"],
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        # Ack after the task ran; a worker that dies mid-task leaves the message to another.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": time_limit_s,
        "task_soft_time_limit": max(1, time_limit_s - max(5, time_limit_s // 10)),
        "task_queues": work_queues(names, settings.broker_url, env),
        # A queue nobody consumes is a command nobody executes and no sweep knows of: a
        # message sent to a queue walletq does not declare (`celery call --queue commands`
        # under a prefix, a typo) is refused at publish (QueueNotFound), and so is a worker
        # started with `-Q` naming one.
        "task_create_missing_queues": False,
        "task_default_queue": names.commands,
        "task_default_exchange": exchange.name,
        "task_default_routing_key": names.commands,
        "task_routes": ("worker.celery_app.route_task",),
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 3, "interval_start": 0,
                                      "interval_step": 0.2, "interval_max": 1.0},
        "control_exchange": f"{names.prefix}celery",
        "event_exchange": f"{names.prefix}celeryev",
        "worker_hijack_root_logger": True,
        "worker_send_task_events": False,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "imports": ["tasks.commands", "tasks.maintenance", "tasks.expiry"],
        # Read when the task is bound to the app (its configuration loaded), not at import.
        "task_annotations": {name: {"max_retries": settings.task_retries_max,
                                    "retry_backoff_max": settings.task_backoff_s_max}
                             for name in (TASK_NAME, KEYS_TASK_NAME)},
        "beat_schedule": {
            "walletq-sweep": {
                "task": "walletq.sweep",
                "schedule": settings.sweep_interval_s,
                # A sweep that waited longer than one interval is superseded by the next.
                "options": {"queue": names.maintenance, "expires": settings.sweep_interval_s},
            },
            # Expired holds get their expire_hold commands (services.expiry); superseded too.
            "walletq-expire-holds": {
                "task": "walletq.expire_holds",
                "schedule": settings.expiry_interval_s,
                "options": {"queue": names.maintenance, "expires": settings.expiry_interval_s},
            },
        },
        "beat_schedule_filename": str(settings.home / "celerybeat-schedule"),
        "timezone": "UTC",
        "enable_utc": True,
    }
    if amqp:
        # Quorum queues refuse a global QoS: Celery detects them and sets a per-consumer
        # prefetch instead (worker_detect_quorum_queues, on by default; stated here).
        config["task_default_queue_type"] = "quorum"
        config["worker_detect_quorum_queues"] = True
    concurrency = env.get("WALLETQ_WORKER_CONCURRENCY")
    if concurrency:
        config["worker_concurrency"] = int(concurrency)
    return config
