"""Commands at the edge: JSON (or a dict) in, a validated, frozen model out.

Validation refuses rather than repairs: an unknown field, a JSON number as an amount,
an over-precise or non-positive amount, a malformed id or a transfer to oneself is an
`InvalidCommandError` naming the field and the reason. The union of command models, and
so the JSON Schema, is derived from the registry (services.command_types).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from services.boundary import PAYLOAD_BYTES_MAX, decode_strict
from services.canonical import canonical_payload, payload_hash
from services.command_fields import (
    ID_PATTERN,
    NAME_PATTERN,
    NAME_RULE,
    CommandBase,
    CommandLimits,
    JsonNumber,
)
from services.command_schema import build_command_schema
from services.command_types import NAMES, REGISTRY
from services.errors import InvalidCommandError
from services.operations.escrow import RefundFromEscrow, ReleaseFromEscrow, TransferToEscrow
from services.operations.treasury import (
    AdminCreateTokens,
    AdminSellTokensToUser,
    UserSellTokensToAdmin,
)
from services.operations.wallet import CreditWallet, DebitWallet, TransferTokensBetweenUsers
from services.payouts.command import PayoutBatch, PayoutItem

__all__ = [
    "Command",
    "CommandLimits",
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
    "ID_PATTERN",
    "parse_command",
    "load_json",
    "json_kind",
    "canonical_payload",
    "payload_hash",
    "command_json_schema",
    "PAYLOAD_BYTES_MAX",
]

COMMAND_TYPES = NAMES

if TYPE_CHECKING:
    Command = CommandBase
else:
    Command = Annotated[Union[tuple(entry.model for entry in REGISTRY)],  # noqa: UP007
                        Field(discriminator="type")]
_adapter: TypeAdapter[CommandBase] = TypeAdapter(Command)


def parse_command(raw: str | bytes | dict[str, Any] | BaseModel, limits: CommandLimits) -> Command:
    """JSON text, a dict or a model → a validated command, or InvalidCommandError."""
    if isinstance(raw, CommandBase):
        return raw
    if isinstance(raw, BaseModel):
        raise InvalidCommandError(f"{type(raw).__name__} is not a walletq command")
    data = load_json(raw) if isinstance(raw, str | bytes) else raw
    if not isinstance(data, dict):
        raise InvalidCommandError(f"a command must be a JSON object, not a JSON {json_kind(data)}")
    key = data.get("idempotency_key")
    key = key if isinstance(key, str) and len(key) <= 200 else None
    try:
        command = _adapter.validate_python(data, context=limits)
    except ValidationError as exc:
        fields = [_field_error(err) for err in exc.errors(include_url=False)]
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
        more = f" (and {len(fields) - 5} more)" if len(fields) > 5 else ""
        raise InvalidCommandError(
            f"invalid command: {summary}{more}", fields[:50], idempotency_key=key
        ) from None
    # What is stored must fit its column (a CHECK): refused here, never an IntegrityError.
    # Only a batch can be that long: a single command's fields are bounded far below.
    stored = len(canonical_payload(command)) if isinstance(command, PayoutBatch) else 0
    if stored > PAYLOAD_BYTES_MAX:
        raise InvalidCommandError(
            f"command is {stored} characters in its canonical form; at most {PAYLOAD_BYTES_MAX}",
            idempotency_key=key)
    return command


def load_json(raw: str | bytes) -> Any:
    """Strictly (services.boundary): bounded size and depth, no duplicate key. Floats and
    non-finite literals never become floats: money is never a float. They stay JsonNumber,
    which every field refuses, so the error names the field."""
    return decode_strict(raw)


def json_kind(data: Any) -> str:
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
    elif err["type"] == "string_pattern_mismatch" and (err.get("ctx") or {}).get(
            "pattern") == NAME_PATTERN:
        message = NAME_RULE
    elif err["type"] == "string_pattern_mismatch":
        message = "must be 1-200 characters of A-Z a-z 0-9 . _ : -"
    message = message.removeprefix("Value error, ")
    return {"field": ".".join(loc) or "(command)", "message": message}


def command_json_schema(limits: CommandLimits) -> dict[str, Any]:
    """The JSON Schema of a command at these limits (`walletq schema`), for producers in
    other languages: services.command_schema."""
    return build_command_schema(_adapter.json_schema(), limits, PAYLOAD_BYTES_MAX)
