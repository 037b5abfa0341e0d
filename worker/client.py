"""WalletClient: how a web tier, a script or a batch job submits commands to walletq.

`submit` signs the command (unless it carries its producer and signature already) as the
producer of WALLETQ_PRODUCER / WALLETQ_PRODUCER_KEY_FILE (embedded with neither set: the
deployment's own `local-admin`), admits it as the worker will (signature, role,
validation: a refusal raises UnauthenticatedError, ForbiddenError or InvalidCommandError
and records nothing), records it as `accepted` in the database (the outbox) with what was
signed and the signature, and then publishes it to the workers, which verify it again;
it answers at once with the command record. A
duplicate (same key, same payload) returns the existing record and publishes nothing,
unless that record is stuck (left `accepted`/`processing` past WALLETQ_SWEEP_GRACE_S),
when it is published again. A key reused for another payload raises
IdempotencyConflictError; an invalid command raises InvalidCommandError and records
nothing. When the broker cannot be reached after the record committed, `submit` still
returns the accepted record: the sweep delivers it later.

In a Flask view::

    from flask import Flask, jsonify, request
    from services.atomic_transaction_manager import FinancialIntegrityError
    from worker.client import WalletClient

    app = Flask(__name__)
    wallet = WalletClient.from_env()          # once per process: it pools its connections

    @app.post("/deposits")
    def deposit():
        try:
            record = wallet.submit({"type": "credit_wallet",
                                    "idempotency_key": request.headers["Idempotency-Key"],
                                    "user": request.json["user"],
                                    "amount": request.json["amount"]})   # a string: "10.00"
        except FinancialIntegrityError as exc:  # invalid_command, idempotency_conflict
            return jsonify(error=exc.to_dict()), 409 if exc.code == "idempotency_conflict" else 422
        return jsonify(record.to_dict()), 202   # poll GET /commands/<key>, or wallet.wait(key)

In Django the same body goes in a view; create the client once at module level (or in
AppConfig.ready()) and return `JsonResponse(record.to_dict(), status=202)`. Never call
`submit` inside the view's own database transaction (ATOMIC_REQUESTS): the command is
committed by walletq in walletq's database, independently of the request's.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from typing import Any

from celery import Celery
from sqlalchemy.engine import Engine

from services import command_store, refusals
from services.admission import Refused, SignedHere, admit_object, as_object, sign_object
from services.command_status import ENDED
from services.command_store import CommandRecord
from services.command_types import SINGLE_TYPES
from services.commands import Command
from services.db import get_engine
from services.errors import BusinessRuleError
from services.message_policy import KEYS_PER_MESSAGE_MAX
from services.outbox import (
    CHUNK_COMMANDS_MAX,
    Accepted,
    record_accepted,
    record_accepted_many,
)
from services.refusals import Refusal
from services.settings import Settings, load_settings
from services.signing import Signed, Signer, public_key_text
from services.wallet_service import WalletService
from worker.celery_app import make_app
from worker.publisher import CeleryPublisher

__all__ = ["WalletClient", "ENDED"]

log = logging.getLogger("walletq.client")

_POLL_S_MIN, _POLL_S_MAX = 0.02, 0.5


class WalletClient:
    """Submit commands and read their outcomes; safe to share between threads."""

    def __init__(self, settings: Settings, app: Celery, env: Mapping[str, str] | None = None,
                 engine: Engine | None = None, signer: Signer | None = None) -> None:
        self.settings = settings
        self.engine = engine or get_engine(settings)
        self.publisher = CeleryPublisher(app, env)
        self._service = WalletService(self.engine, settings, signer)
        self._signer_public: tuple[Signer, str] | None = None

    @property
    def signer(self) -> Signer | None:
        """The producer this client signs as, found (or, embedded, made) on first use."""
        return self._service.signer

    def _public_text(self, signer: Signer) -> str:
        if self._signer_public is None or self._signer_public[0] is not signer:
            self._signer_public = (signer, public_key_text(signer.private_key.public_key()))
        return self._signer_public[1]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WalletClient:
        """A client configured from the WALLETQ_* environment (or the mapping given)."""
        env = dict(os.environ if env is None else env)
        return cls(load_settings(env), make_app(env), env)

    def close(self) -> None:
        """Release the broker connections (the database engine is shared per process)."""
        self.publisher.app.close()

    # --- submitting ------------------------------------------------------------------

    def _admit(self, command: Any) -> tuple[Command, Signed]:
        """Sign (unless signed) and admit; the refusal is raised, nothing recorded."""
        return self._admit_signed(*self._sign(command))

    def _sign(self, command: Any) -> tuple[dict[str, Any], SignedHere | None]:
        """The command object signed (unless it came signed), bounds-checked once before."""
        obj = as_object(command)
        signer = None if "signature" in obj else self.signer
        signed_obj, signed = sign_object(obj, signer)
        return signed_obj, None if signer is None else SignedHere(signed, self._public_text(signer))

    def _admit_signed(self, signed_obj: dict[str, Any], here: SignedHere | None
                      ) -> tuple[Command, Signed]:
        """Admit a signed object; a command signed here is not verified again: its key must
        be the producer's, valid, allowed."""
        admission = admit_object(signed_obj, engine=self.engine, settings=self.settings,
                                 signed_here=here)  # as_object checked it before signing
        if isinstance(admission, Refused):
            raise admission.error
        return admission.command, admission.signed

    def submit(self, command: Any) -> CommandRecord:
        """Sign, admit, record as accepted, publish; returns the command record at once."""
        return self.submit_admitted(*self.admit(command))

    def admit(self, command: Any) -> tuple[Command, Signed]:
        """Sign (unless signed) and admit as `submit` does, recording nothing: a caller that
        must refuse a whole set before submitting any (a payout file) admits each first."""
        return self._admit(command)

    def submit_admitted(self, parsed: Command, signed: Signed) -> CommandRecord:
        """Record and publish a command `admit` admitted (validated once, not again)."""
        accepted = record_accepted(parsed, signed, engine=self.engine, settings=self.settings)
        if self._needs_publish(accepted):
            self._publish_logged(accepted.record)
        return accepted.record

    def submit_many(self, commands: Iterable[Any]) -> list[CommandRecord | BusinessRuleError]:
        """Submit many commands; one answer per command, in order: its record or its refusal.

        Admitted commands are recorded in bulk (one statement per chunk) and published as
        one message per WALLETQ_COALESCE_MAX single commands, naming their keys: a worker
        applies each such chunk in one transaction. A refused command (invalid,
        unauthenticated, forbidden, or an idempotency conflict) records nothing.
        """
        return list(self.submit_stream(commands))

    def submit_stream(self, commands: Iterable[Any], *, chunk_size: int = CHUNK_COMMANDS_MAX
                      ) -> Iterator[CommandRecord | BusinessRuleError]:
        """submit_many for a stream of any length: answers come chunk by chunk, in order.

        While one chunk is admitted, recorded and published on a helper thread (waiting
        for the database and the broker), the next is read and signed here (Ed25519
        signing, the largest cost of a command, releases the GIL); at most two chunks are
        in hand, so memory does not grow with the stream. A chunk is recorded only after
        the one before it committed: an error (the database gone) stops the stream with
        nothing recorded beyond the chunks answered or being answered. Once the broker
        fails, later chunks are only recorded (left `accepted` for the sweep) instead of
        each waiting on a broker that is down.
        """
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        state = _Burst()
        source = iter(commands)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="walletq-submit") as pool:
            pending: Future[list[CommandRecord | BusinessRuleError]] | None = None
            while True:
                chunk = list(itertools.islice(source, chunk_size))
                signed = [self._sign_or_refusal(raw) for raw in chunk]
                done = pending.result() if pending is not None else []
                pending = (pool.submit(self._admit_record_publish, signed, state)
                           if signed else None)
                yield from done
                if pending is None:
                    break
        state.log_skipped()

    def _sign_or_refusal(self, raw: Any
                         ) -> tuple[dict[str, Any], SignedHere | None] | BusinessRuleError:
        try:
            return self._sign(raw)
        except BusinessRuleError as exc:
            return exc

    def _admit_record_publish(
            self, signed: list[tuple[dict[str, Any], SignedHere | None] | BusinessRuleError],
            state: _Burst) -> list[CommandRecord | BusinessRuleError]:
        """One chunk: admit each command, record what was admitted (one transaction), then
        publish what is new."""
        admitted: list[tuple[Command, Signed] | BusinessRuleError] = []
        for item in signed:
            if isinstance(item, BusinessRuleError):
                admitted.append(item)
                continue
            try:
                admitted.append(self._admit_signed(*item))
            except BusinessRuleError as exc:
                admitted.append(exc)
        answers: list[CommandRecord | BusinessRuleError] = []
        parsed = [a for a in admitted if not isinstance(a, BusinessRuleError)]
        outcomes = iter(record_accepted_many(parsed, engine=self.engine, settings=self.settings))
        to_publish: list[CommandRecord] = []
        keys: list[str] = []
        for item in admitted:
            outcome = item if isinstance(item, BusinessRuleError) else next(outcomes)
            if isinstance(outcome, Accepted):
                answers.append(outcome.record)
                if outcome.created and outcome.record.type in SINGLE_TYPES:
                    keys.append(outcome.record.idempotency_key)
                elif self._needs_publish(outcome):
                    to_publish.append(outcome.record)
            else:
                answers.append(outcome)
        if state.broker_failed:
            state.skipped += len(keys) + len(to_publish)
        elif not self._publish_keys_logged(keys):
            state.broker_failed = True
            state.skipped += len(to_publish)
        elif not self._publish_many_logged(to_publish):
            state.broker_failed = True
        return answers

    def _publish_keys_logged(self, keys: list[str]) -> bool:
        """Publish the keys, a message per chunk of them; False when the broker failed."""
        if not keys:
            return True
        step = min(self.settings.coalesce_max, KEYS_PER_MESSAGE_MAX)
        try:
            with self.publisher.app.producer_or_acquire() as producer:
                for start in range(0, len(keys), step):
                    self.publisher.publish_keys(keys[start:start + step], producer)
        except Exception:  # noqa: BLE001 - recorded already: the sweep will deliver them
            log.warning("could not publish %d commands' keys; they stay accepted for the sweep",
                        len(keys), exc_info=True)
            return False
        return True

    def _needs_publish(self, accepted: Accepted) -> bool:
        return accepted.created or accepted.record.is_stuck(self.settings.sweep_grace_s)

    def _publish_logged(self, record: CommandRecord) -> None:
        try:
            self.publisher.publish(record)
        except Exception:  # noqa: BLE001 - recorded already: the sweep will deliver it
            log.warning("could not publish %s; it stays accepted for the sweep",
                        record.idempotency_key, exc_info=True)

    def _publish_many_logged(self, records: list[CommandRecord]) -> bool:
        """Publish each record; False when any could not be (it stays for the sweep)."""
        if not records:
            return True
        outcomes = self.publisher.publish_many(records)
        failed = [r.idempotency_key for r, exc in zip(records, outcomes, strict=True) if exc]
        if failed:
            log.warning("could not publish %d commands (first %s); they stay accepted for the "
                        "sweep: %s", len(failed), failed[0], next(e for e in outcomes if e))
        return not failed

    def publish_again(self, record: CommandRecord) -> None:
        """Publish a recorded command (redrive); raises when the broker is unreachable."""
        self.publisher.publish(record)

    # --- reading ---------------------------------------------------------------------

    def status(self, key: str) -> CommandRecord | None:
        """The command's record, or None for an unknown key."""
        with self.engine.connect() as conn:
            return command_store.get_record(conn, key)

    def refusals(self, key: str, producer: str | None = None) -> list[Refusal]:
        """Refusals of commands sent under this key (by this producer), newest first: what
        became of a command refused without taking its key (unauthenticated, forbidden, a
        conflicting replay). `status(key)` first: a refusal never touches a recorded command."""
        with self.engine.connect() as conn:
            return refusals.for_key(conn, key, producer)

    def wait(self, key: str, timeout: float = 10.0) -> CommandRecord | None:
        """Poll until the command succeeded, was rejected or failed, or `timeout` seconds passed.

        Returns the latest record either way (check `record.status`); None when the key is
        still unknown at the deadline (a foreign producer's message the worker has not
        recorded yet, or a key never submitted).
        """
        deadline = time.monotonic() + timeout
        delay_s = _POLL_S_MIN
        while True:
            record = self.status(key)
            if (record is not None and record.status in ENDED) or time.monotonic() >= deadline:
                return record
            time.sleep(min(delay_s, max(0.0, deadline - time.monotonic())))
            delay_s = min(delay_s * 2, _POLL_S_MAX)

    def wait_all(self, keys: Iterable[str], timeout: float = 60.0) -> dict[str, CommandRecord]:
        """Poll until every key has ended or `timeout` passed; the latest record of each."""
        pending = list(dict.fromkeys(keys))
        latest: dict[str, CommandRecord] = {}
        deadline = time.monotonic() + timeout
        while True:
            with self.engine.connect() as conn:
                rows = command_store.get_records(conn, pending)
            latest.update({r.idempotency_key: r for r in rows})
            pending = [k for k in pending if k not in latest or latest[k].status not in ENDED]
            if not pending or time.monotonic() >= deadline:
                return latest
            time.sleep(0.05)

    def balance(self, user: str) -> dict[str, Decimal]:
        """{"available": Decimal, "escrow": Decimal}; UnknownUserError for a user with no wallet."""
        result = self._service.balance(user)
        return {"available": result.available, "escrow": result.escrow}


class _Burst:
    """What one submit_stream learnt of the broker: once it failed, the rest is left
    `accepted` for the sweep (counted here, logged once) rather than sent to a broker that
    is down, a retry policy's wait per chunk."""

    def __init__(self) -> None:
        self.broker_failed = False
        self.skipped = 0

    def log_skipped(self) -> None:
        if self.skipped:
            log.warning("did not publish %d more commands after the broker failed; they stay "
                        "accepted for the sweep", self.skipped)
