"""Whether a command may run at all, decided before anything is written, in this order:

1. strict JSON: one object (a JSON number is kept as text, never a float);
2. the shape of `producer` and `signature`, and the object's RFC 8785 canonical form;
3. the signature, over that form, by a key of the named producer that was valid when the
   command was accepted (now, or when its row was recorded) and is not revoked;
4. the producer's role (and own permissions) allow the claimed type;
5. full validation of the command;
6. what its fields ask beyond its type: a fee override, a payout from another account, a
   key under `expire:` (the expiry pass's: role `system` only).

The answer is `Admitted` or `Refused`, never an exception of the command's making: 1-3
refuse as `invalid_command` (not an object) or `unauthenticated`, 4 and 6 as `forbidden`,
5 as `invalid_command`. A refusal before the signature verified is `authenticated=False`:
it must take no idempotency key (services.refusing). The same function checks a command
row's own stored signature (`accepted_at` = when the row was recorded).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy.engine import Engine

from services import command_store, command_types
from services.authentication import DIRECTORY, Principal, ProducerDirectory, authenticate
from services.boundary import check_object
from services.command_fields import EXPIRY_KEY_PREFIX, ID_PATTERN, CommandBase, CommandLimits
from services.commands import Command, json_kind, load_json, parse_command
from services.errors import (
    BusinessRuleError,
    ForbiddenError,
    InvalidCommandError,
    UnauthenticatedError,
)
from services.permissions import SYSTEM, allows, missing
from services.settings import Settings
from services.signing import PRODUCER_PATTERN, Signed, Signer, SigningError, signed_form

__all__ = ["Evidence", "Admitted", "Refused", "Admission", "SignedHere", "as_object", "admit",
           "admit_object",
           "sign_if_unsigned", "sign_object"]

_TYPE_CHARS_MAX = 60


@dataclass(frozen=True)
class Evidence:
    """What a message claims, kept for the record of a refusal: none of it is trusted."""

    key: str | None = None
    command_type: str | None = None
    producer: str | None = None
    #: What it signed and its signature, when both have the right shape (not yet verified).
    signed: Signed | None = None
    shape_problem: str | None = None

    @classmethod
    def of(cls, obj: Any, signed: Signed | None = None) -> Evidence:
        """What `obj` claims; `signed`, its signed form when the caller made it already."""
        if not isinstance(obj, dict):
            return cls()
        key, claimed, producer = obj.get("idempotency_key"), obj.get("type"), obj.get("producer")
        problem = None
        try:
            signed = signed or signed_form(obj)
        except SigningError as exc:
            problem = str(exc)
        return cls(key if isinstance(key, str) and re.fullmatch(ID_PATTERN, key) else None,
                   claimed[:_TYPE_CHARS_MAX] if isinstance(claimed, str) else None,
                   producer if isinstance(producer, str)
                   and re.fullmatch(PRODUCER_PATTERN, producer) else None,
                   signed, problem)


@dataclass(frozen=True)
class Admitted:
    command: Command
    signed: Signed
    principal: Principal


@dataclass(frozen=True)
class Refused:
    error: BusinessRuleError
    evidence: Evidence
    #: The signature verified: the producer named is the sender.
    authenticated: bool


Admission = Admitted | Refused


def as_object(raw: Any) -> dict[str, Any]:
    """The command object: JSON text loaded strictly, a dict as it is, a model as the object
    it dumps to (a producer signing a model signs that); InvalidCommandError otherwise."""
    if isinstance(raw, CommandBase):
        return raw.model_dump(mode="json", exclude_none=True)
    if isinstance(raw, BaseModel):
        raise InvalidCommandError(f"{type(raw).__name__} is not a walletq command")
    if isinstance(raw, str | bytes):
        data = load_json(raw)  # bounded size and depth, no duplicate key (services.boundary)
    else:
        check_object(raw)  # a dict from a caller: the same bounds, before anything recurses
        data = raw
    if not isinstance(data, dict):
        raise InvalidCommandError(f"a command must be a JSON object, not a JSON {json_kind(data)}")
    return data


def sign_if_unsigned(raw: Any, signer: Signer | None) -> tuple[dict[str, Any], Signed]:
    """At an edge (client, service, CLI): the command object and its signed form, signed
    by `signer` when it carries no signature; one that does is taken as it is."""
    return sign_object(as_object(raw), signer)


def sign_object(obj: dict[str, Any], signer: Signer | None) -> tuple[dict[str, Any], Signed]:
    """sign_if_unsigned of an object as_object gave already (its bounds are not walked again)."""
    if "signature" in obj:
        try:
            return obj, signed_form(obj)
        except SigningError as exc:
            raise UnauthenticatedError(str(exc), idempotency_key=Evidence.of(obj).key) from None
    if signer is None:
        raise UnauthenticatedError(
            "this process has no producer to sign as: set WALLETQ_PRODUCER and "
            "WALLETQ_PRODUCER_KEY_FILE (walletq producer create), or send a signed command",
            idempotency_key=Evidence.of(obj).key)
    try:
        return signer.sign(obj)
    except SigningError as exc:
        raise InvalidCommandError(str(exc), idempotency_key=Evidence.of(obj).key) from None


def _valid_when_accepted(principal: Principal, evidence: Evidence, engine: Engine,
                         accepted_at: datetime | None) -> None:
    """The key must have been valid when the command was accepted: now for a new command;
    when its row was recorded for one accepted before its key was rotated out."""
    key = principal.key
    if accepted_at is None:
        now = datetime.now(UTC)
        if key.valid_at(now):
            return
        if evidence.key is not None and key.valid_from <= now:
            with engine.connect() as conn:
                accepted_at = command_store.accepted_at(conn, evidence.key)
    if accepted_at is None or not key.valid_at(accepted_at):
        raise UnauthenticatedError(
            f"key {key.key_id} of producer {principal.producer.name!r} was not valid when the "
            "command was accepted", producer=principal.producer.name)


def _authenticated(evidence: Evidence, engine: Engine, settings: Settings,
                   accepted_at: datetime | None, directory: ProducerDirectory,
                   signer_public: str | None = None) -> Principal:
    if evidence.signed is None:
        raise UnauthenticatedError(evidence.shape_problem or "no signature")
    principal = authenticate(evidence.signed, engine=engine, ttl_s=settings.producer_cache_s,
                             directory=directory, signer_public=signer_public)
    _valid_when_accepted(principal, evidence, engine, accepted_at)
    return principal


@dataclass(frozen=True)
class SignedHere:
    """A command this process signed a moment ago: its signed form and the signing key's
    public half. Its signature is good by construction; the key must still be the
    producer's, valid, and the role must allow what it asks."""

    signed: Signed
    public_text: str


def admit(raw: Any, *, engine: Engine, settings: Settings, accepted_at: datetime | None = None,
          directory: ProducerDirectory = DIRECTORY, signed_here: SignedHere | None = None,
          evidence: Evidence | None = None) -> Admission:
    """Admitted, or Refused with the reason (see the module's docstring for the order).

    Database errors (reading the producer) propagate: they are not the command's fault.
    """
    try:
        obj = as_object(raw)
    except InvalidCommandError as exc:
        return Refused(exc, Evidence(), authenticated=False)
    return admit_object(obj, engine=engine, settings=settings, accepted_at=accepted_at,
                        directory=directory, signed_here=signed_here, evidence=evidence)


def admit_object(obj: dict[str, Any], *, engine: Engine, settings: Settings,
                 accepted_at: datetime | None = None, directory: ProducerDirectory = DIRECTORY,
                 signed_here: SignedHere | None = None, evidence: Evidence | None = None
                 ) -> Admission:
    """admit of an object as_object gave already, or that check_object passed (its bounds
    are not walked again: a 10,000-item payout's walk is ~5 ms, and the edge that signs it,
    or the worker that checked the message, paid it already)."""
    # `evidence`: what the caller read of this very object already (its canonical form).
    evidence = evidence or Evidence.of(obj, signed_here.signed if signed_here is not None else None)
    try:
        principal = _authenticated(evidence, engine, settings, accepted_at, directory,
                                   signed_here.public_text if signed_here is not None else None)
    except UnauthenticatedError as exc:
        exc.ids.setdefault("idempotency_key", evidence.key)
        return Refused(exc, evidence, authenticated=False)
    signed = evidence.signed
    assert signed is not None
    granted = principal.producer.permissions
    claimed = evidence.command_type
    # A type walletq does not know is refused by validation (step 5), as invalid.
    if claimed is not None and claimed in command_types.BY_NAME and not allows(granted, claimed):
        return Refused(ForbiddenError(
            f"producer {signed.producer!r} (role {principal.producer.role}) may not send "
            f"{claimed!r} commands", idempotency_key=evidence.key), evidence, authenticated=True)
    try:
        command = parse_command(obj, CommandLimits.from_settings(settings))
    except InvalidCommandError as exc:
        return Refused(exc, evidence, authenticated=True)
    lacking = missing(granted, command_types.permissions_needed(command))
    if lacking:
        return Refused(ForbiddenError(
            f"producer {signed.producer!r} (role {principal.producer.role}) lacks "
            f"{', '.join(lacking)} for this {command.type}", idempotency_key=evidence.key),
            evidence, authenticated=True)
    if command.idempotency_key.startswith(EXPIRY_KEY_PREFIX) and principal.producer.role != SYSTEM:
        # The pass submits `expire:<hold>` once the hold expired; anybody else's command
        # under it, refused before expiry, would end under the key the pass needs.
        return Refused(ForbiddenError(
            f"producer {signed.producer!r} (role {principal.producer.role}) may not use keys "
            f"under {EXPIRY_KEY_PREFIX!r}: they are the expiry pass's (role {SYSTEM}); an "
            "early expire_hold takes another key", idempotency_key=evidence.key),
            evidence, authenticated=True)
    return Admitted(command, signed, principal)
