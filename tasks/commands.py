"""`walletq.execute_command`: one command message in, one idempotent execution.

Thin by design: parse the payload, call services.command_executor.execute_command, and
sort what can go wrong into four outcomes:
- a business refusal is a `rejected` outcome the executor already stored — not a failure;
- a transient database failure that outlived the in-process retries becomes a Celery
  autoretry (exponential backoff with jitter, bounded); when those run out too, the
  command is recorded `failed` (concurrent_operation) with an audit row;
- a payload that is not a valid command, or that conflicts with its key's first command,
  is recorded as refused (services.outbox.record_refused) and acknowledged: it never
  poisons the queue;
- anything else (a bug) marks the command `failed` with `internal`, loudly.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from services.atomic_transaction_manager import (
    ConcurrentOperationError,
    FinancialIntegrityError,
    IdempotencyConflictError,
    InvalidCommandError,
    is_transient,
)
from services.command_executor import execute_command, record_failure
from services.commands import parse_command
from services.outbox import record_refused
from services.settings import get_settings
from worker.celery_app import EXECUTE_TASK

__all__ = ["execute"]

log = logging.getLogger("walletq.tasks")
_settings = get_settings()


def _payload_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The one command argument; any other shape of message is an invalid command."""
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args and set(kwargs) == {"command"}:
        return kwargs["command"]
    raise InvalidCommandError(
        f"a {EXECUTE_TASK} message carries one argument, the command; got "
        f"{len(args)} positional and {sorted(kwargs)[:5]} named"
    )


@shared_task(
    bind=True,
    name=EXECUTE_TASK,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(ConcurrentOperationError, DBAPIError),
    retry_backoff=True,
    retry_backoff_max=_settings.task_backoff_s_max,
    retry_jitter=True,
    max_retries=_settings.task_retries_max,
    ignore_result=True,
)
def execute(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
    raw: Any = args
    try:
        raw = _payload_of(args, kwargs)
        command = parse_command(raw)
    except InvalidCommandError as exc:
        log.warning("refused a message that is not a valid command: %s", exc.message)
        record_refused(raw, exc)
        return None
    key = command.idempotency_key
    try:
        record = execute_command(command)
    except IdempotencyConflictError as exc:
        log.warning("refused %s: %s", key, exc.message)
        record_refused(raw, exc)
        return None
    except (ConcurrentOperationError, DBAPIError) as exc:
        if not _retryable(exc):
            # A missing table, a value out of range, a broken constraint: a bug or bad
            # deployment that no retry mends. Recorded failed (internal), loudly.
            log.error("%s failed on a permanent database error: %s", key, exc)
            _give_up(key, exc)
            return None
        if self.request.retries < self.max_retries:
            log.info("%s: %s; Celery retry %d of %d", key, exc, self.request.retries + 1,
                     self.max_retries)
            raise  # autoretry_for: re-queued with exponential backoff and jitter
        _give_up(key, exc)
        return None
    except (FinancialIntegrityError, SoftTimeLimitExceeded) as exc:
        log.error("%s failed: %s", key, exc, exc_info=True)
        _give_up(key, exc)
        return None
    return {"idempotency_key": key, "status": record.status}


def _retryable(exc: BaseException) -> bool:
    """Transient by SQLSTATE, or the database unreachable (an outage outlives in-process retries)."""
    if isinstance(exc, ConcurrentOperationError):
        return True
    return is_transient(exc) or isinstance(exc, OperationalError | InterfaceError)


def _give_up(key: str, exc: BaseException) -> None:
    """Record the command `failed`; if even that is impossible, the sweep finds it later."""
    if isinstance(exc, FinancialIntegrityError):
        error: FinancialIntegrityError | dict[str, Any] = exc
    elif isinstance(exc, DBAPIError) and _retryable(exc):
        error = {"code": "concurrent_operation",
                 "message": f"database error outlasted the retries: {str(exc.orig)[:500]}"}
    elif isinstance(exc, DBAPIError):
        error = {"code": "internal", "message": f"database refused: {str(exc.orig)[:500]}"}
    else:
        error = {"code": "internal", "message": f"{type(exc).__name__}: {exc}"[:500]}
    try:
        record_failure(key, error)
        log.error("%s recorded failed: %s", key, error)
    except Exception:  # noqa: BLE001 - the database is unreachable; leave it to the sweep
        log.exception("%s: could not record the failure; left for the sweep", key)
