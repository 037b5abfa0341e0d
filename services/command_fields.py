"""The field types every command model is built from, and the base every command shares.

Validators never read settings: the limits they enforce (the asset's scale, the largest
amount, the items of a payout) arrive as the validation context, a `CommandLimits` that
the edge (CLI, worker, client, service) builds once from its settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    PlainSerializer,
    PlainValidator,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)

from services.money import AmountError, parse_amount_decimal
from services.settings import Settings

__all__ = [
    "AMOUNT_SCHEMA_MARK",
    "EXPIRY_KEY_PREFIX",
    "ID_PATTERN",
    "NAME_PATTERN",
    "NAME_RULE",
    "Key",
    "ID_LENGTH_MAX",
    "MEMO_LENGTH_MAX",
    "CommandLimits",
    "JsonNumber",
    "Ident",
    "ProducerName",
    "SignatureText",
    "AccountCode",
    "Memo",
    "Amount",
    "FeeRate",
    "CommandBase",
    "limits_of",
]

ID_LENGTH_MAX = 200
#: An idempotency key (and `requested_by`): `:` allowed ("order:81:hold").
ID_PATTERN = r"^[A-Za-z0-9._:-]{1,200}$"
#: A user, hold or payout reference id: no `:`, which separates the parts of an account
#: code (`user:{id}:available`), so every user's accounts can be named unambiguously.
NAME_PATTERN = r"^[A-Za-z0-9._-]{1,200}$"
NAME_RULE = "must be 1-200 characters of A-Z a-z 0-9 . _ - (no ':', which separates the " \
    "parts of account codes)"
MEMO_LENGTH_MAX = 500
#: What pydantic writes for an amount; services.command_schema replaces each with a
#: reference to one definition built from the limits (pydantic's own cannot see them).
AMOUNT_SCHEMA_MARK = {"type": "string", "$comment": "walletq amount"}


@dataclass(frozen=True)
class CommandLimits:
    """What validation enforces beyond a field's shape; from the deployment's settings."""

    scale: int = 2
    amount_max_minor: int = 10**14
    payout_items_max: int = 10_000

    @classmethod
    def from_settings(cls, settings: Settings) -> CommandLimits:
        return cls(settings.asset_scale, settings.amount_max_minor, settings.payout_items_max)


def limits_of(info: ValidationInfo) -> CommandLimits:
    """The limits a model is being validated against; their absence is a bug of the caller."""
    if not isinstance(info.context, CommandLimits):
        raise TypeError("Bug! commands are validated with a CommandLimits as context")
    return info.context


class JsonNumber:
    """A JSON float, NaN or Infinity, kept as text so the field it sits in can refuse it by name."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"JsonNumber({self.text})"


def _validate_amount(value: Any, info: ValidationInfo) -> Decimal:
    limits = limits_of(info)
    if isinstance(value, JsonNumber):
        raise ValueError(
            f"must be a decimal string such as \"12.50\", not the JSON number {value.text[:40]}"
        )
    try:
        return parse_amount_decimal(value, scale=limits.scale, max_minor=limits.amount_max_minor)
    except AmountError as exc:
        raise ValueError(str(exc)) from None


#: A user, hold or reference id (NAME_PATTERN); an idempotency key is a `Key`.
Ident = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=ID_LENGTH_MAX)]
Key = Annotated[str, StringConstraints(pattern=ID_PATTERN, max_length=ID_LENGTH_MAX)]
# A producer's name, and a signature's one spelling (services.signing says why).
ProducerName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,200}$",
                                                max_length=ID_LENGTH_MAX)]
SignatureText = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{86}$",
                                                 min_length=86, max_length=86)]
AccountCode = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,220}$")]
Memo = Annotated[str, StringConstraints(max_length=MEMO_LENGTH_MAX)]

# A validated amount is quantized to the scale, so its plain notation is the canonical one.
Amount = Annotated[
    Decimal,
    PlainValidator(_validate_amount),
    PlainSerializer(lambda value: format(value, "f"), return_type=str),
    WithJsonSchema(AMOUNT_SCHEMA_MARK),
]

_FEE_RATE_PATTERN = r"^(0(\.[0-9]{1,6})?|1(\.0{1,6})?)$"


def _validate_fee_rate(value: Any) -> Decimal:
    if not isinstance(value, str):
        raise ValueError("must be a decimal string such as \"0.10\"")
    if not re.fullmatch(_FEE_RATE_PATTERN, value):
        raise ValueError(f"{value[:40]!r} must be a decimal between 0 and 1, at most 6 places")
    return Decimal(value)


FeeRate = Annotated[
    Decimal,
    PlainValidator(_validate_fee_rate),
    PlainSerializer(lambda v: str(v), return_type=str),
    WithJsonSchema({"type": "string", "pattern": _FEE_RATE_PATTERN}),
]


#: The expiry pass's keys: `expire:<hold_id>` (services.operations.escrow.expiry_key).
EXPIRY_KEY_PREFIX = "expire:"
#: Key prefixes walletq derives keys under, and the only type that may use each.
RESERVED_KEY_PREFIXES: dict[str, str] = {EXPIRY_KEY_PREFIX: "expire_hold"}


class CommandBase(BaseModel):
    """Fields every command carries; each type adds its own and a `type` literal.

    `producer` names who sent it and `signature` proves it (docs/ARCHITECTURE.md,
    "Producers"): both required, checked by the worker before anything else.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: str
    idempotency_key: Key
    producer: ProducerName
    signature: SignatureText
    memo: Memo | None = None
    requested_by: Key | None = None

    @model_validator(mode="after")
    def _reserved_key(self) -> CommandBase:
        # A key another part of walletq derives (the expiry pass's `expire:<hold_id>`) is
        # that type's alone: taken by any other command, it would stop the hold expiring.
        for prefix, owner in RESERVED_KEY_PREFIXES.items():
            if self.idempotency_key.startswith(prefix) and self.type != owner:
                raise ValueError(f"idempotency keys starting {prefix!r} are reserved for {owner}")
        return self
