"""The Celery app: `celery -A worker worker` and `celery -A worker beat` find it here.

The app object exists at import, as `celery -A worker` expects; its configuration
(celeryconfig.build_config(), from the WALLETQ_* environment) is read when first used, so
importing this module reads no setting and makes no folder. A forked worker process drops
the SQLAlchemy engines it inherited: sockets are never shared across a fork.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from celery import Celery, Task, bootsteps
from celery.exceptions import InvalidTaskError, QueueNotFound
from celery.signals import (
    beat_init,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)
from celery.worker.request import Request

import celeryconfig
from services.db import dispose_engines, for_transactions, get_engine
from services.message_policy import KEYS_TASK_NAME, TASK_NAME
from services.settings import get_settings, reset_settings

__all__ = ["app", "make_app", "route_task", "refuse_foreign_destination", "EXECUTE_TASK",
           "EXECUTE_KEYS_TASK", "SWEEP_TASK", "EXPIRY_TASK", "DeclareDeadLetters"]

log = logging.getLogger("walletq.worker")

EXECUTE_TASK = TASK_NAME
EXECUTE_KEYS_TASK = KEYS_TASK_NAME
SWEEP_TASK = "walletq.sweep"
EXPIRY_TASK = "walletq.expire_holds"


class CheckedRequest(Request):
    """A task request whose malformed envelope is refused instead of killing the worker.

    Celery builds the request in the worker's main process; a body that is not
    `[args, kwargs, embed]` (or a header of the wrong type) raises ValueError/TypeError
    there, which Celery treats as unrecoverable: the worker stops and the message goes
    back to the queue to stop the next worker too. As InvalidTaskError it is logged,
    rejected without requeue (acknowledged), and the worker goes on.
    """

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(message, *args, **kwargs)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InvalidTaskError(f"malformed task message: {exc!r}") from exc


class WalletqTask(Task):
    """The base of every walletq task (see CheckedRequest)."""

    Request = CheckedRequest


class DeclareDeadLetters(bootsteps.StartStopStep):
    """On RabbitMQ, declare the dead-letter exchange and queues once connected, before the
    task consumer starts: RabbitMQ drops a message dead-lettered to an exchange that routes
    it nowhere. Run again on every reconnection (a broker that lost its definitions)."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def include_if(self, c: Any) -> bool:
        return celeryconfig.is_amqp(str(c.app.conf.broker_url))

    def start(self, c: Any) -> None:
        channel = c.connection.default_channel
        for queue in celeryconfig.dead_letter_queues(celeryconfig.queue_names()):
            queue(channel).declare()


def make_app(env: Mapping[str, str] | None = None) -> Celery:
    """A Celery app for this environment, configured now (the producer client's own)."""
    celeryconfig.prepare_broker_folders(env)
    celery_app = Celery("walletq", set_as_current=False, task_cls=WalletqTask)
    celery_app.conf.update(celeryconfig.build_config(env))
    celery_app.steps["consumer"].add(DeclareDeadLetters)
    return celery_app


def _lazy_app() -> Celery:
    """The process's app: configured from the environment when its configuration is first
    read (a worker starting, a task published), not when this module is imported."""
    celery_app = Celery("walletq", task_cls=WalletqTask)
    celery_app.add_defaults(lambda: celeryconfig.build_config())
    celery_app.steps["consumer"].add(DeclareDeadLetters)
    return celery_app


def route_task(name: str, args: Any, kwargs: Any, options: Any, task: Any = None,
               **_kw: Any) -> dict[str, str] | None:
    """Payout batches to the payouts queue, the sweep to maintenance, the rest to commands;
    a destination no walletq worker consumes is refused (see refuse_foreign_destination)."""
    names = celeryconfig.queue_names()
    refuse_foreign_destination(options or {}, names)
    if name in (SWEEP_TASK, EXPIRY_TASK):
        return {"queue": names.maintenance, "routing_key": names.maintenance}
    if name == EXECUTE_KEYS_TASK:  # single commands only: a chunk of keys never names a batch
        return {"queue": names.commands, "routing_key": names.commands}
    if name == EXECUTE_TASK:
        payload = (args or [None])[0] if args else (kwargs or {}).get("command")
        command_type = payload.get("type") if isinstance(payload, dict) else None
        queue = names.for_command_type(command_type)
        return {"queue": queue, "routing_key": queue}
    return None


def refuse_foreign_destination(options: Mapping[str, Any], names: celeryconfig.QueueNames) -> None:
    """Raise QueueNotFound for an explicit exchange or routing key that is not walletq's.

    A message published where no walletq worker listens is a command lost without a log
    line, and the sweep cannot help: it was never recorded. An unknown `queue` is already
    refused by Celery (task_create_missing_queues=False); this covers `--exchange` and
    `--routing-key`, which Celery would publish as given (and Redis or RabbitMQ drop).
    """
    exchange = options.get("exchange")
    exchange_name = getattr(exchange, "name", exchange)
    if exchange_name not in (None, "", names.exchange):
        raise QueueNotFound(f"exchange {exchange_name!r} is not walletq's ({names.exchange!r})")
    routing_key = options.get("routing_key")
    if routing_key is not None and routing_key not in names.all():
        raise QueueNotFound(
            f"routing key {routing_key!r} names no walletq queue; expected one of "
            f"{', '.join(names.all())}"
        )


@worker_init.connect
@beat_init.connect
def _before_consuming(**_kwargs: Any) -> None:
    # The embedded broker's folders (and beat's schedule file's) must exist before use.
    celeryconfig.prepare_broker_folders()


@worker_process_init.connect
def _after_fork(**_kwargs: Any) -> None:
    # The parent's pooled connections belong to the parent; a child opens its own.
    reset_settings()
    dispose_engines()
    # What the child inherited (every module, the app) lives as long as it does: out of the
    # cyclic collector's sight, so that its full collections, which a payout's 10,000 items
    # set off while they are validated, walk only the task's own objects (a batch's
    # validation took 79 ms instead of 34 while they walked the whole heap).
    gc.freeze()
    _connect_early()


def _connect_early() -> None:
    """Open the child's database connections (each engine's first also asks the server what
    the dialect needs) before its first message instead of during it."""
    try:
        engine = get_engine(get_settings())
        for each in (engine, for_transactions(engine)):
            with each.connect():
                pass
    except Exception:  # noqa: BLE001 - unreachable now: the first command connects, or retries
        log.warning("could not connect to the database before the first task", exc_info=True)


@worker_ready.connect
def _announce_ready(**_kwargs: Any) -> None:
    # For supervisors and tests: a file that exists once the worker consumes its queues.
    ready_file = os.environ.get("WALLETQ_WORKER_READY_FILE")
    if ready_file:
        Path(ready_file).write_text(str(os.getpid()))
    log.info("walletq worker ready (pid %d)", os.getpid())


@worker_shutdown.connect
def _announce_shutdown(**_kwargs: Any) -> None:
    ready_file = os.environ.get("WALLETQ_WORKER_READY_FILE")
    if ready_file:
        Path(ready_file).unlink(missing_ok=True)


app = _lazy_app()
