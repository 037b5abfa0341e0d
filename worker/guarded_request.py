"""The worker's message boundary: a walletq task message is inspected in the worker's main
process, before Celery decodes it, schedules it or hands it to the prefork pool.

Celery's default strategy decodes the body (kombu), holds a message with an `eta`
unacknowledged in a timer, and pickles the decoded arguments to send them to a pool
process: a 500-deep argument made that pickling raise RecursionError, which Celery treats
as unrecoverable (the worker stopped, the message went back to stop the next one). The
walletq tasks name `guarded_strategy` as their Strategy: it refuses what is not a plausible
command message — acknowledged, audited (services.refusing: an audit row and a `refusals`
row), never redelivered — and hands everything else to Celery's own strategy unchanged:

- not protocol 2 JSON (content type, compression, the `[args, kwargs, embed]` body);
- a body over the size limit (measured before decoding) or nested deeper than the limit
  (services.boundary), a key twice, not JSON;
- an `eta`/`countdown`: walletq never schedules a command; only Celery's own retry of a
  walletq task (`retries` ≥ 1) may carry one, no further ahead than the retry backoff's
  maximum;
- a per-message time limit, callbacks, a chain or chord;
- arguments that are not one command object (`walletq.execute_command`) or one list of keys
  (`walletq.execute_keys`).

A refusal the database cannot take is logged and the message rejected without requeue
(acknowledged on Redis; dead-lettered on RabbitMQ when its queue has one).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from celery.worker.strategy import default as default_strategy

from services.admission import Evidence, Refused
from services.boundary import DEPTH_MAX, PAYLOAD_BYTES_MAX, decode_strict, text_depth_over
from services.command_fields import ID_LENGTH_MAX
from services.db import get_engine
from services.errors import InvalidCommandError
from services.message_policy import KEYS_PER_MESSAGE_MAX, KEYS_TASK_NAME, TASK_NAME
from services.refusing import record_refused
from services.settings import Settings, get_settings

__all__ = ["guarded_strategy", "inspect_message", "Verdict", "STRATEGY", "BODY_BYTES_MAX",
           "HEADERS_BYTES_MAX"]

log = logging.getLogger("walletq.boundary")

#: What the walletq tasks name as their Strategy (Celery resolves it by name).
STRATEGY = "worker.guarded_request:guarded_strategy"
#: The body is the command plus its envelope (`[[command], {}, embed]`) and signature.
BODY_BYTES_MAX = PAYLOAD_BYTES_MAX + 64 * 1024
#: Celery's own headers are a few hundred bytes (argsrepr is cut at 1 KiB).
HEADERS_BYTES_MAX = 64 * 1024
#: The body nests the command two levels down: a list of args in the body's list.
_BODY_DEPTH_MAX = DEPTH_MAX + 2
_EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})
#: A retry's countdown is at most the backoff's maximum; jitter and clocks get this much more.
_ETA_SLACK_S = 60
_AUDIT_BODY_CHARS_MAX = 2000


@dataclass(frozen=True)
class Verdict:
    """Why a message is refused (None: it may go on), and what it claims (for the record)."""

    reason: str | None
    evidence: Evidence = Evidence()


def _header_problem(headers: Any, task_name: str, settings: Settings, now: datetime) -> str | None:
    if not isinstance(headers, dict) or headers.get("task") != task_name or "id" not in headers:
        return "not a Celery task message of protocol 2"
    try:
        text = json.dumps(headers, default=str)
    except (TypeError, ValueError, RecursionError):
        return "task message headers are not plain JSON"
    if len(text) > HEADERS_BYTES_MAX or text_depth_over(text, DEPTH_MAX):
        return f"task message headers are over {HEADERS_BYTES_MAX} bytes or {DEPTH_MAX} deep"
    if headers.get("compression"):
        return "a compressed task message (walletq never compresses)"
    return None


def _eta_problem(headers: dict[str, Any], settings: Settings, now: datetime) -> str | None:
    eta = headers.get("eta")
    if eta is None:
        return None
    retries = headers.get("retries")
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 1:
        return "a command message may not carry an eta or countdown: walletq runs it when it comes"
    try:
        when = datetime.fromisoformat(str(eta))
    except ValueError:
        return "a task message with an eta that is not an ISO 8601 time"
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    if when > now + timedelta(seconds=settings.task_backoff_s_max + _ETA_SLACK_S):
        return (f"a retry's eta is more than WALLETQ_TASK_BACKOFF_S_MAX "
                f"({settings.task_backoff_s_max} s) ahead")
    return None


def _time_limit_allowed(limits: Any, settings: Settings) -> bool:
    """None, or [hard, soft] each None or within the deployment's own limit (a message sent
    from inside a worker carries the task's configured limits): never a longer one, which
    would outlast the broker's visibility timeout."""
    if limits is None:
        return True
    if not isinstance(limits, list) or len(limits) != 2:
        return False
    return all(value is None or (isinstance(value, int | float) and not isinstance(value, bool)
                                 and 0 < value <= settings.task_time_limit_s)
               for value in limits)


def _body_problem(body: Any, task_name: str) -> str | None:
    """The `[args, kwargs, embed]` body of a walletq task, decoded."""
    if not (isinstance(body, list) and len(body) == 3 and isinstance(body[0], list)
            and isinstance(body[1], dict) and isinstance(body[2], dict)):
        return "a task message body must be [args, kwargs, embed]"
    args, kwargs, embed = body
    if not set(embed) <= _EMBED_KEYS or any(embed.values()):
        return "a command message may not carry callbacks, a chain or a chord"
    if task_name == KEYS_TASK_NAME:
        keys = args[0] if len(args) == 1 and not kwargs else None
        if not isinstance(keys, list) or not 1 <= len(keys) <= KEYS_PER_MESSAGE_MAX or not all(
                isinstance(key, str) and len(key) <= ID_LENGTH_MAX for key in keys):
            return (f"a {KEYS_TASK_NAME} message carries one argument, a list of 1 to "
                    f"{KEYS_PER_MESSAGE_MAX} idempotency keys")
        return None
    if len(args) == 1 and not kwargs:
        command = args[0]
    elif not args and set(kwargs) == {"command"}:
        command = kwargs["command"]
    else:
        return (f"a {TASK_NAME} message carries one argument, the command; got {len(args)} "
                f"positional and {len(kwargs)} named")
    if isinstance(command, str):
        try:
            command = decode_strict(command)
        except InvalidCommandError as exc:
            return exc.message
    if not isinstance(command, dict):
        return "the command must be a JSON object"
    return None


def _claims(body: Any) -> Evidence:
    """What a decoded body claims (key, type, producer), for the refusal's record; unverified."""
    if isinstance(body, list) and body and isinstance(body[0], list) and body[0] \
            and isinstance(body[0][0], dict):
        claimed = body[0][0]
        return Evidence.of({k: claimed.get(k) for k in ("idempotency_key", "type", "producer")})
    return Evidence()


def inspect_message(raw_body: Any, headers: Any, content_type: str | None, task_name: str,
                    settings: Settings, now: datetime | None = None) -> Verdict:
    """The boundary's verdict on one message (see the module's docstring)."""
    now = now or datetime.now(UTC)
    problem = _header_problem(headers, task_name, settings, now)
    if problem is not None:
        return Verdict(problem)
    if content_type != "application/json":
        return Verdict(f"content type {str(content_type)[:60]!r} disallowed: walletq takes JSON only")
    if not isinstance(raw_body, str | bytes):
        return Verdict("a task message body must be JSON text")
    try:
        body = decode_strict(raw_body, bytes_max=BODY_BYTES_MAX, depth_max=_BODY_DEPTH_MAX)
    except InvalidCommandError as exc:
        return Verdict(exc.message)
    problem = None
    if not _time_limit_allowed(headers.get("timelimit"), settings):
        problem = ("a task message may not set a time limit beyond "
                   f"WALLETQ_TASK_TIME_LIMIT_S ({settings.task_time_limit_s} s)")
    problem = problem or _eta_problem(headers, settings, now) or _body_problem(body, task_name)
    # What it claims is read only for the record of a refusal.
    return Verdict(None) if problem is None else Verdict(problem, _claims(body))


def _body_text(raw_body: Any) -> str:
    if isinstance(raw_body, bytes):
        return raw_body[:_AUDIT_BODY_CHARS_MAX].decode("utf-8", errors="replace")
    return str(raw_body)[:_AUDIT_BODY_CHARS_MAX]


def _refuse(message: Any, verdict: Verdict, ack: Callable[..., Any], reject: Callable[..., Any],
            errors: tuple[type[BaseException], ...], settings: Settings, eventer: Any) -> None:
    """Audit the refusal, then acknowledge; a refusal that cannot be written is rejected.
    With events on, Flower shows the message REJECTED (a `task-rejected` event)."""
    reason = verdict.reason or ""
    log.warning("refused a task message at the boundary: %s", reason)
    headers = message.headers if isinstance(message.headers, dict) else {}
    if eventer is not None and eventer.enabled and headers.get("id"):
        eventer.send("task-rejected", uuid=str(headers["id"])[:200], requeue=False)
    refused = Refused(InvalidCommandError(reason), verdict.evidence, authenticated=False)
    try:
        record_refused(_body_text(message.body), refused, engine=get_engine(settings),
                       settings=settings, source="boundary")
    except Exception:  # noqa: BLE001 - the main process must go on whatever the database does
        log.exception("could not record a refused message; rejected without requeue")
        reject(log, errors, False)
        return
    ack(log, errors)


def guarded_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's default strategy behind the boundary (see the module's docstring)."""
    handle = default_strategy(task, app, consumer, **kwargs)
    errors = tuple(consumer.connection_errors or ())

    def task_message_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                             **more: Any) -> Any:
        settings = get_settings()
        try:
            verdict = inspect_message(message.body, message.headers, message.content_type,
                                      task.name, settings)
        except Exception as exc:  # noqa: BLE001 - a bug here must not stop the worker
            log.exception("could not inspect a task message")
            verdict = Verdict(f"message could not be inspected: {type(exc).__name__}")
        if verdict.reason is None:
            return handle(message, body, ack, reject, callbacks, **more)
        _refuse(message, verdict, ack, reject, errors, settings, consumer.event_dispatcher)
        return None

    return task_message_handler
