"""Commands: one frozen, strict pydantic model per type in DESIGN.md.

Validation refuses rather than repairs: an unknown field, a JSON number as an amount,
an over-precise or non-positive amount, a malformed id or a transfer to oneself is an
`InvalidCommandError` naming the field and the reason.
"""

from __future__ import annotations

import hashlib
import json
import re
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from services.atomic_transaction_manager import InvalidCommandError
from services.money import AmountError, format_minor, parse_amount, to_decimal
from services.settings import get_settings

__all__ = [
    "Command",
    "CreditWallet",
    "DebitWallet",
    "TransferTokensBetweenUsers",
    "TransferToEscrow",
    "ReleaseFromEscrow",
    "RefundFromEscrow",
    "AdminCreateTokens",
    "AdminSellTokensToUser",
    "UserSellTokensToAdmin",
    "PayoutItem",
    "PayoutBatch",
    "COMMAND_TYPES",
    "parse_command",
    "canonical_payload",
    "payload_hash",
    "command_json_schema",
    "amount_minor",
    "PAYLOAD_BYTES_MAX",
]

ID_PATTERN = r"^[A-Za-z0-9._:-]{1,200}$"
# Single commands are small; a payout of 10,000 rows is about a megabyte.
PAYLOAD_BYTES_MAX = 4 * 1024 * 1024

Ident = Annotated[str, StringConstraints(pattern=ID_PATTERN, max_length=200)]
AccountCode = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,220}$")]
Memo = Annotated[str, StringConstraints(max_length=500)]


class JsonNumber:
    """A JSON float, NaN or Infinity, kept as text so the field it sits in can refuse it by name."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"JsonNumber({self.text})"


def _validate_amount(value: Any) -> Decimal:
    settings = get_settings()
    if isinstance(value, JsonNumber):
        raise ValueError(
            f"must be a decimal string such as \"12.50\", not the JSON number {value.text[:40]}"
        )
    try:
        minor = parse_amount(value, scale=settings.asset_scale, max_minor=settings.amount_max_minor)
    except AmountError as exc:
        raise ValueError(str(exc)) from None
    return to_decimal(minor, settings.asset_scale)


def _serialize_amount(value: Decimal) -> str:
    settings = get_settings()
    return format_minor(amount_minor(value), settings.asset_scale)


Amount = Annotated[
    Decimal,
    PlainValidator(_validate_amount),
    PlainSerializer(_serialize_amount, return_type=str),
    WithJsonSchema(
        {"type": "string", "pattern": r"^(0|[1-9][0-9]{0,17})(\.[0-9]+)?$",
         "description": "a positive decimal string with at most the asset's scale of places"}
    ),
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


def amount_minor(amount: Decimal) -> int:
    return int(amount.scaleb(get_settings().asset_scale))


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    idempotency_key: Ident
    memo: Memo | None = None
    requested_by: Ident | None = None


class CreditWallet(_Command):
    type: Literal["credit_wallet"]
    user: Ident
    amount: Amount


class DebitWallet(_Command):
    type: Literal["debit_wallet"]
    user: Ident
    amount: Amount


class TransferTokensBetweenUsers(_Command):
    type: Literal["transfer_tokens_between_users"]
    from_user: Ident
    to_user: Ident
    amount: Amount

    @field_validator("to_user")
    @classmethod
    def _distinct_users(cls, to_user: str, info: ValidationInfo) -> str:
        if to_user == info.data.get("from_user"):
            raise ValueError("must differ from from_user: a transfer to oneself")
        return to_user


class TransferToEscrow(_Command):
    type: Literal["transfer_to_escrow"]
    hold_id: Ident
    payer: Ident
    payee: Ident
    amount: Amount

    @field_validator("payee")
    @classmethod
    def _distinct_users(cls, payee: str, info: ValidationInfo) -> str:
        if payee == info.data.get("payer"):
            raise ValueError("must differ from payer: a hold to oneself")
        return payee


class ReleaseFromEscrow(_Command):
    type: Literal["release_from_escrow"]
    hold_id: Ident
    fee_rate: FeeRate | None = None


class RefundFromEscrow(_Command):
    type: Literal["refund_from_escrow"]
    hold_id: Ident


class AdminCreateTokens(_Command):
    type: Literal["admin_create_tokens"]
    amount: Amount


class AdminSellTokensToUser(_Command):
    type: Literal["admin_sell_tokens_to_user"]
    user: Ident
    amount: Amount


class UserSellTokensToAdmin(_Command):
    type: Literal["user_sell_tokens_to_admin"]
    user: Ident
    amount: Amount


class PayoutItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    user: Ident
    amount: Amount
    reference: Ident


class PayoutBatch(_Command):
    type: Literal["payout_batch"]
    from_account: AccountCode = "platform:treasury"
    items: list[PayoutItem] = Field(min_length=1)
    atomic: bool = False

    @model_validator(mode="after")
    def _bounded_and_unique(self) -> PayoutBatch:
        items_max = get_settings().payout_items_max
        if len(self.items) > items_max:
            raise ValueError(f"items: {len(self.items)} items; at most {items_max} per batch")
        first_seen: dict[str, int] = {}
        for index, item in enumerate(self.items):
            if item.reference in first_seen:
                raise ValueError(
                    f"items.{index}.reference: {item.reference!r} repeats item "
                    f"{first_seen[item.reference]}"
                )
            first_seen[item.reference] = index
        return self


Command = Annotated[
    CreditWallet
    | DebitWallet
    | TransferTokensBetweenUsers
    | TransferToEscrow
    | ReleaseFromEscrow
    | RefundFromEscrow
    | AdminCreateTokens
    | AdminSellTokensToUser
    | UserSellTokensToAdmin
    | PayoutBatch,
    Field(discriminator="type"),
]
_adapter: TypeAdapter[Command] = TypeAdapter(Command)

COMMAND_TYPES = (
    "credit_wallet",
    "debit_wallet",
    "transfer_tokens_between_users",
    "transfer_to_escrow",
    "release_from_escrow",
    "refund_from_escrow",
    "admin_create_tokens",
    "admin_sell_tokens_to_user",
    "user_sell_tokens_to_admin",
    "payout_batch",
)


def parse_command(raw: str | bytes | dict[str, Any] | BaseModel) -> Command:
    """JSON text, a dict or a model → a validated command, or InvalidCommandError."""
    if isinstance(raw, BaseModel):
        return raw  # type: ignore[return-value]
    data = _load_json(raw) if isinstance(raw, str | bytes) else raw
    if not isinstance(data, dict):
        raise InvalidCommandError(f"a command must be a JSON object, not a JSON {_json_kind(data)}")
    key = data.get("idempotency_key")
    key = key if isinstance(key, str) and len(key) <= 200 else None
    try:
        return _adapter.validate_python(data)
    except ValidationError as exc:
        fields = [_field_error(err) for err in exc.errors(include_url=False)]
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
        more = f" (and {len(fields) - 5} more)" if len(fields) > 5 else ""
        raise InvalidCommandError(
            f"invalid command: {summary}{more}", fields[:50], idempotency_key=key
        ) from None


def _load_json(raw: str | bytes) -> Any:
    if len(raw) > PAYLOAD_BYTES_MAX:
        raise InvalidCommandError(f"command is {len(raw)} bytes; at most {PAYLOAD_BYTES_MAX}")
    try:
        # Floats and non-finite literals never become floats: money is never a float. They
        # stay JsonNumber, which every field refuses, so the error names the field.
        return json.loads(raw, parse_float=JsonNumber, parse_constant=JsonNumber)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidCommandError(f"malformed JSON: {exc}") from None


def _json_kind(data: Any) -> str:
    if isinstance(data, bool):
        return "boolean"
    if isinstance(data, int | JsonNumber):
        return "number"
    return {list: "array", str: "string", type(None): "null"}.get(type(data), type(data).__name__)


def _field_error(err: Any) -> dict[str, str]:
    loc = [str(part) for part in err["loc"]]
    if len(loc) >= 1 and loc[0] in COMMAND_TYPES:
        loc = loc[1:]  # drop the discriminator's tag from the path
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown field"
    elif err["type"] == "union_tag_invalid":
        loc = ["type"]
        message = f"unknown command type; expected one of {', '.join(COMMAND_TYPES)}"
    elif err["type"] == "union_tag_not_found":
        loc, message = ["type"], "required: the command's type"
    elif err["type"] == "string_pattern_mismatch":
        message = "must be 1-200 characters of A-Z a-z 0-9 . _ : -"
    message = message.removeprefix("Value error, ")
    return {"field": ".".join(loc) or "(command)", "message": message}


def canonical_payload(command: Command) -> str:
    """The command as sorted, compact JSON with amounts at the asset's scale: what is hashed."""
    data = command.model_dump(mode="json", exclude_none=True)
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def payload_hash(canonical: str) -> str:
    return hashlib.sha256(canonical.encode()).hexdigest()


def command_json_schema() -> dict[str, Any]:
    schema = _adapter.json_schema()
    schema["title"] = "walletq command"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
