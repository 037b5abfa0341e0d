"""What becomes of one command message: the failure policy, with no broker in sight.

`execute_message` takes a message's arguments, admits them (services.admission: strict
JSON, the producer's signature, its role, validation — in that order, writing nothing) and
always comes back with one of three answers, so the task that calls it is a thin adapter:
- `Done`: the command has its outcome (succeeded or rejected, stored), or the message was
  refused (unauthenticated, forbidden, not a valid command, a conflicting replay) and
  recorded as such (services.refusing: an audit row, and a refusal readable by key);
- `RetryLater`: a transient database failure outlived the in-process retries; deliver the
  message again later, with backoff;
- `Failed`: the command is recorded `failed` with its audit row: transient failures
  outlasted every retry (`concurrent_operation`), or something no retry mends — a
  permanent database error, a bug, a time limit (`internal`, naming the exception's
  type). `walletq redrive` sends it again after a fix.
No exception leaves this function but BaseException (interrupts), so no command is ever
left `processing` by a surprise. Only an admitted command can be recorded `failed`: a
message that has not proved its producer never touches the row under its key.

A message that is exactly the signed form of a row that ended (a duplicate, or the message
of a command a worker coalesced with another) costs one indexed read: its stored outcome
is the answer. `redelivered` (the broker delivered it before, or it is a retry) sends the
command down the claimed path, which counts the delivery before applying it.

`execute_keys_message` takes a bulk producer's message, a list of keys of recorded
commands (`KEYS_TASK_NAME`): trusted for nothing but naming them, each row is admitted on
its own stored signature; they are applied as one batch, or, when that cannot be done (or
the message is a redelivery), one by one as their own messages would be.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from services import command_store
from services.admission import Admitted, Evidence, Refused, admit, admit_object
from services.boundary import check_object
from services.command_executor import execute_admitted, execute_keys, record_failure
from services.command_fields import ID_PATTERN
from services.command_store import CommandRecord
from services.errors import (
    ConcurrentOperationError,
    FinancialIntegrityError,
    IdempotencyConflictError,
    InvalidCommandError,
)
from services.refusing import record_refused
from services.settings import Settings
from services.unit_of_work import is_transient

__all__ = ["Done", "RetryLater", "Failed", "MessageOutcome", "execute_message", "retryable",
           "TASK_NAME", "KEYS_TASK_NAME", "KEYS_PER_MESSAGE_MAX", "execute_keys_message"]

log = logging.getLogger("walletq.messages")

#: The task name every command message carries (a foreign producer publishes it too).
TASK_NAME = "walletq.execute_command"
#: A bulk producer's message: the keys of commands it recorded, applied as one batch.
KEYS_TASK_NAME = "walletq.execute_keys"
#: The most keys one such message may name.
KEYS_PER_MESSAGE_MAX = 1_000
#: A stored outcome a message identical to its row gets without admission: anything but a
#: row that ended for failing its own signature check (its message is refused again).
_ROW_REFUSALS = frozenset({"unauthenticated", "forbidden"})
_MESSAGE_CHARS_MAX = 500


@dataclass(frozen=True)
class Done:
    record: CommandRecord | None = None
    refusal: dict[str, Any] | None = None
    key: str | None = None

    def summary(self) -> dict[str, Any]:
        if self.record is not None:
            return {"idempotency_key": self.record.idempotency_key, "status": self.record.status,
                    "error": self.record.error}
        return {"idempotency_key": self.key, "status": "refused", "error": self.refusal}


@dataclass(frozen=True)
class RetryLater:
    error: Exception


@dataclass(frozen=True)
class Failed:
    key: str
    error: dict[str, Any]
    record: CommandRecord | None = None

    def summary(self) -> dict[str, Any]:
        return {"idempotency_key": self.key, "status": "failed", "error": self.error,
                "recorded": self.record is not None}


MessageOutcome = Done | RetryLater | Failed


def _payload_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The one command argument; any other shape of message is an invalid command."""
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args and set(kwargs) == {"command"}:
        return kwargs["command"]
    raise InvalidCommandError(
        f"a {TASK_NAME} message carries one argument, the command; got "
        f"{len(args)} positional and {sorted(kwargs)[:5]} named"
    )


def retryable(exc: BaseException) -> bool:
    """Transient by SQLSTATE, or the database unreachable (an outage outlives in-process retries)."""
    if isinstance(exc, ConcurrentOperationError):
        return True
    return is_transient(exc) or isinstance(exc, OperationalError | InterfaceError)


def _failure(exc: BaseException) -> dict[str, Any]:
    """The error a `failed` command records for what ended it."""
    if isinstance(exc, FinancialIntegrityError):
        return exc.to_dict()
    if isinstance(exc, DBAPIError) and retryable(exc):
        return {"code": "concurrent_operation",
                "message": f"database error outlasted the retries: {str(exc.orig)[:_MESSAGE_CHARS_MAX]}"}
    if isinstance(exc, DBAPIError):
        return {"code": "internal", "message": f"database refused: {str(exc.orig)[:_MESSAGE_CHARS_MAX]}"}
    return {"code": "internal", "message": f"{type(exc).__name__}: {exc}"[:_MESSAGE_CHARS_MAX]}


def _give_up(key: str, exc: BaseException, engine: Engine, settings: Settings) -> Failed:
    """Record the command `failed`; if even that is impossible, the sweep finds it later."""
    error = _failure(exc)
    try:
        record = record_failure(key, error, engine=engine, settings=settings)
        log.error("%s recorded failed: %s", key, error)
    except Exception:  # noqa: BLE001 - the database is unreachable; leave it to the sweep
        log.exception("%s: could not record the failure; left for the sweep", key)
        record = None
    return Failed(key, error, record)


def _refuse(raw: Any, refused: Refused, engine: Engine, settings: Settings) -> MessageOutcome:
    exc = refused.error
    try:
        record = record_refused(raw, refused, engine=engine, settings=settings)
    except Exception as failure:  # noqa: BLE001 - the refusal could not be written
        if retryable(failure):
            return RetryLater(failure)
        log.exception("could not record a refused message: %s", exc.message)
        record = None
    return Done(record=record, refusal=exc.to_dict(), key=refused.evidence.key)


def _admit(raw: Any, engine: Engine, settings: Settings, retries_left: bool,
           evidence: Evidence | None = None) -> Admitted | MessageOutcome:
    """Admit a message execute_message took: an object there passed check_object already."""
    try:
        if isinstance(raw, dict):
            admission = admit_object(raw, engine=engine, settings=settings, evidence=evidence)
        else:
            admission = admit(raw, engine=engine, settings=settings, evidence=evidence)
    except Exception as exc:  # noqa: BLE001 - reading the producer failed; nothing is written
        if retryable(exc) and retries_left:
            return RetryLater(exc)
        # Not yet authenticated: no row may be touched. A recorded command is swept again.
        log.error("could not check a message's producer: %s", exc, exc_info=True)
        return Done(refusal=_failure(exc), key=Evidence.of(raw).key)
    if isinstance(admission, Refused):
        log.warning("refused a message (%s): %s", admission.error.code, admission.error.message)
        return _refuse(raw, admission, engine, settings)
    return admission


def _already_ended(evidence: Evidence, engine: Engine) -> Done | None:
    """The stored outcome, when the message is exactly the signed form of a row that ended:
    one indexed read, which fetches the row's texts only for an ended row naming the
    message's producer and signature (a first delivery's row has not ended: a payout's
    payload and signed form, megabytes each, are left unread); then the whole signed text
    must be the message's."""
    signed = evidence.signed
    if evidence.key is None or signed is None:
        return None
    with engine.connect() as conn:
        record = command_store.ended_record(conn, evidence.key, signed)
    if record is None or record.signed != signed or record.error_code in _ROW_REFUSALS:
        return None
    return Done(record)


def execute_message(args: tuple[Any, ...], kwargs: dict[str, Any], *, engine: Engine,
                    settings: Settings, retries_left: bool, redelivered: bool = False
                    ) -> MessageOutcome:
    """One delivery of a command message (see the module's docstring)."""
    raw: Any = args
    try:
        raw = _payload_of(args, kwargs)
        if not isinstance(raw, str | bytes):
            check_object(raw)  # before anything recurses into it (the canonical form below)
    except InvalidCommandError as exc:
        log.warning("refused a message that is not a valid command: %s", exc.message)
        return _refuse(raw, Refused(exc, Evidence(), authenticated=False), engine, settings)
    evidence = Evidence.of(raw)  # one canonical form of the message, for both uses
    try:
        ended = _already_ended(evidence, engine)
    except Exception:  # noqa: BLE001 - a shortcut only: admission reads again, retrying
        ended = None
    if ended is not None:
        return ended
    admitted = _admit(raw, engine, settings, retries_left, evidence if evidence.key else None)
    if not isinstance(admitted, Admitted):
        return admitted
    command = admitted.command
    key = command.idempotency_key
    try:
        return Done(execute_admitted(admitted, engine=engine, settings=settings,
                                     redelivered=redelivered, coalesce=True))
    except IdempotencyConflictError as exc:
        log.warning("refused %s: %s", key, exc.message)
        evidence = Evidence(key, command.type, command.producer, admitted.signed)
        return _refuse(raw, Refused(exc, evidence, authenticated=True), engine, settings)
    except (ConcurrentOperationError, DBAPIError) as exc:
        if not retryable(exc):
            # A missing table, a value out of range, a broken constraint: a bug or a bad
            # deployment that no retry mends. Recorded failed (internal), loudly.
            log.error("%s failed on a permanent database error: %s", key, exc)
            return _give_up(key, exc, engine, settings)
        if retries_left:
            log.info("%s: %s; retry later", key, exc)
            return RetryLater(exc)
        return _give_up(key, exc, engine, settings)
    except Exception as exc:  # noqa: BLE001 - a bug, a time limit: the command must end
        log.error("%s failed: %s", key, exc, exc_info=True)
        return _give_up(key, exc, engine, settings)


# --- a bulk producer's chunk of keys -------------------------------------------------------

_KEY_RE = re.compile(ID_PATTERN)


@dataclass(frozen=True)
class KeysDone:
    """A chunk of keys handled: how many commands ended here, and each key's outcome when
    they were taken one by one."""

    ended: int
    outcomes: tuple[MessageOutcome, ...] = ()

    def summary(self) -> dict[str, Any]:
        return {"keys_ended": self.ended, "one_by_one": len(self.outcomes)}


def _keys_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    keys = args[0] if len(args) == 1 and not kwargs else None
    if not isinstance(keys, list) or not 1 <= len(keys) <= KEYS_PER_MESSAGE_MAX \
            or not all(isinstance(k, str) and _KEY_RE.fullmatch(k) for k in keys):
        raise InvalidCommandError(
            f"a {KEYS_TASK_NAME} message carries one argument, a list of 1 to "
            f"{KEYS_PER_MESSAGE_MAX} idempotency keys")
    return list(dict.fromkeys(keys))


def _one_by_one(keys: list[str], engine: Engine, settings: Settings, retries_left: bool,
                redelivered: bool) -> KeysDone | RetryLater:
    """Each key's stored command, as its own message would be delivered."""
    outcomes: list[MessageOutcome] = []
    for key in keys:
        with engine.connect() as conn:
            record = command_store.get_record(conn, key)
        if record is None or record.ended:
            continue
        outcomes.append(execute_message((record.message(),), {}, engine=engine,
                                        settings=settings, retries_left=retries_left,
                                        redelivered=redelivered))
    later = next((o for o in outcomes if isinstance(o, RetryLater)), None)
    return later if later is not None else KeysDone(0, tuple(outcomes))


def execute_keys_message(args: tuple[Any, ...], kwargs: dict[str, Any], *, engine: Engine,
                         settings: Settings, retries_left: bool, redelivered: bool = False
                         ) -> KeysDone | Done | RetryLater:
    """One delivery of a chunk of keys (see the module's docstring)."""
    try:
        keys = _keys_of(args, kwargs)
    except InvalidCommandError as exc:
        log.warning("refused a message that is not a chunk of keys: %s", exc.message)
        outcome = _refuse(args, Refused(exc, Evidence(), authenticated=False), engine, settings)
        return outcome if isinstance(outcome, Done | RetryLater) else Done(refusal=exc.to_dict())
    if redelivered or engine.dialect.name != "postgresql":  # SQLite: one writer, one by one
        return _one_by_one(keys, engine, settings, retries_left, redelivered=redelivered)
    try:
        return KeysDone(len(execute_keys(keys, engine=engine, settings=settings)))
    except Exception as exc:  # noqa: BLE001 - the batch could not be done: key by key
        log.warning("a chunk of %d keys could not run as one batch (%s: %s); one by one",
                    len(keys), type(exc).__name__, exc)
        return _one_by_one(keys, engine, settings, retries_left, redelivered=False)
