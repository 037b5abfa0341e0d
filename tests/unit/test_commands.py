"""Commands: strict pydantic models; every bad input refused with the field and the reason."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import jsonschema
import pytest

from services import commands
from services.atomic_transaction_manager import InvalidCommandError
from services.commands import (
    COMMAND_TYPES,
    CommandLimits,
    CreditWallet,
    ReleaseFromEscrow,
    TransferToEscrow,
    canonical_payload,
    command_json_schema,
    payload_hash,
)

#: Scale 2 and the default maximum, whatever the calling shell exported: validation reads
#: its limits from its argument, never from the environment.
LIMITS = CommandLimits()


def parse_command(raw: Any, limits: CommandLimits = LIMITS) -> Any:
    return commands.parse_command(raw, limits)


#: Every command names its producer and carries a signature; validation checks their shape
#: only (the worker checks the signature itself: tests/unit/test_signing.py).
SIGNED = {"producer": "web-1", "signature": "A" * 86}
CREDIT = {"type": "credit_wallet", "idempotency_key": "dep-81", "user": "alice", "amount": "10.00",
          **SIGNED}

VALID = [
    CREDIT,
    {"type": "debit_wallet", "idempotency_key": "wd-9", "user": "alice", "amount": "1.00"},
    {"type": "transfer_tokens_between_users", "idempotency_key": "t-1", "from_user": "alice",
     "to_user": "bob", "amount": "2.50"},
    {"type": "transfer_to_escrow", "idempotency_key": "o-7-hold", "hold_id": "o-7", "payer": "alice",
     "payee": "bob", "amount": "5.00"},
    {"type": "release_from_escrow", "idempotency_key": "o-7-done", "hold_id": "o-7", "fee_rate": "0.10"},
    {"type": "refund_from_escrow", "idempotency_key": "o-7-cancel", "hold_id": "o-7"},
    {"type": "admin_create_tokens", "idempotency_key": "mint-1", "amount": "1000000.00"},
    {"type": "admin_sell_tokens_to_user", "idempotency_key": "sale-3", "user": "alice",
     "amount": "100.00"},
    {"type": "user_sell_tokens_to_admin", "idempotency_key": "cash-4", "user": "alice",
     "amount": "50.00"},
    {"type": "payout_batch", "idempotency_key": "payday-11-29", "from_account": "platform:treasury",
     "items": [{"user": "bob", "amount": "12.00", "reference": "inv-881"}]},
    # Issue 9, holds: partial capture, expiry (more than one example of a type from here).
    {"type": "expire_hold", "idempotency_key": "expire:o-7", "hold_id": "o-7"},
    {"type": "release_from_escrow", "idempotency_key": "o-7-part", "hold_id": "o-7",
     "amount": "2.00"},
    {"type": "transfer_to_escrow", "idempotency_key": "o-8-hold", "hold_id": "o-8", "payer": "alice",
     "payee": "bob", "amount": "5.00", "expires_in_s": 3600},
    {"type": "transfer_to_escrow", "idempotency_key": "o-9-hold", "hold_id": "o-9", "payer": "alice",
     "payee": "bob", "amount": "5.00", "expires_at": "2030-01-31T12:00:00+01:00"},
    # issue 9, the accounts' half (admin only)
    {"type": "set_account_limit", "idempotency_key": "lim-1", "user": "bob", "limit": "50.00",
     "reason": "trusted seller"},
    {"type": "freeze_account", "idempotency_key": "fz-1", "user": "bob", "reason": "review",
     "direction": "both", "until": "2026-12-31T00:00:00Z"},
    {"type": "unfreeze_account", "idempotency_key": "uf-1", "user": "bob", "reason": "cleared"},
    {"type": "close_account", "idempotency_key": "cl-1", "user": "bob", "reason": "leaving"},
    {"type": "reverse_command", "idempotency_key": "rev-1", "original_key": "t-1",
     "reason": "sent to the wrong user"},
]
VALID = [{**command, **SIGNED} for command in VALID]


def refused(raw: Any) -> InvalidCommandError:
    with pytest.raises(InvalidCommandError) as caught:
        parse_command(raw)
    assert caught.value.code == "invalid_command"
    return caught.value


def field_error(raw: Any, field: str) -> str:
    """The message for `field`; the error must name that field, in its list and its summary."""
    error = refused(raw)
    messages = [f["message"] for f in error.errors if f["field"] == field]
    assert messages, f"no error for {field!r} in {error.errors}"
    assert f"{field}: " in error.message
    return messages[0]


@pytest.mark.parametrize("data", VALID, ids=[d["type"] for d in VALID])
def test_every_command_of_the_design_parses_from_json_text_and_from_a_dict(data: dict) -> None:
    from_text = parse_command(json.dumps(data))
    assert from_text == parse_command(data)
    assert from_text.type == data["type"]
    assert parse_command(from_text) is from_text


def test_every_design_command_type_has_a_valid_example_here() -> None:
    assert {d["type"] for d in VALID} == set(COMMAND_TYPES)


def test_an_amount_becomes_a_decimal_at_the_assets_scale() -> None:
    command = parse_command({**CREDIT, "amount": "10.5"})
    assert isinstance(command, CreditWallet)
    assert command.amount == Decimal("10.50") and str(command.amount) == "10.50"


def test_commands_are_frozen() -> None:
    command = parse_command(CREDIT)
    with pytest.raises(Exception, match="frozen"):
        command.amount = Decimal("1000")  # type: ignore[misc]


def test_optional_fields_default_to_none() -> None:
    command = parse_command(VALID[4] | {"fee_rate": None})
    assert isinstance(command, ReleaseFromEscrow) and command.fee_rate is None
    assert command.memo is None and command.requested_by is None
    with_extras = parse_command({**CREDIT, "memo": "a gift", "requested_by": "web:42"})
    assert with_extras.memo == "a gift" and with_extras.requested_by == "web:42"


# --- amounts ----------------------------------------------------------------------------

NUMBER_LITERALS = ["10.5", "10", "0", "-1", "1e3", "1E-2", "NaN", "Infinity", "-Infinity", "10.00"]


@pytest.mark.parametrize("literal", NUMBER_LITERALS)
def test_a_json_number_as_amount_is_refused_naming_the_amount(literal: str) -> None:
    raw = json.dumps(CREDIT).replace('"10.00"', literal)
    assert literal in raw
    message = field_error(raw, "amount")
    assert "decimal string" in message and "JSON number" in message


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (10.5, "not a JSON number"),
        (10, "not a JSON number"),
        (True, "not a JSON boolean"),
        (None, "not a JSON null"),
        ("10.001", "3 decimal places; at most 2"),
        ("0", "greater than zero"),
        ("0.00", "greater than zero"),
        ("-5.00", "not a plain decimal"),
        ("NaN", "not a plain decimal"),
        ("Infinity", "not a plain decimal"),
        ("-Infinity", "not a plain decimal"),
        ("1e3", "not a plain decimal"),
        ("1E+3", "not a plain decimal"),
        ("010.00", "not a plain decimal"),
        (" 10.00", "not a plain decimal"),
        ("10.00 ", "not a plain decimal"),
        ("1000000000000.01", "exceeds the maximum"),
        ("", "not a plain decimal"),
    ],
)
def test_a_bad_amount_is_refused_naming_the_amount_and_why(value: object, reason: str) -> None:
    assert reason in field_error({**CREDIT, "amount": value}, "amount")


def test_a_missing_amount_is_refused_naming_the_amount() -> None:
    data = dict(CREDIT)
    del data["amount"]
    assert "required" in field_error(data, "amount").lower()


@pytest.mark.parametrize("index", [1, 2, 3, 6, 7, 8])
def test_every_amount_bearing_command_refuses_a_float_amount(index: int) -> None:
    raw = json.dumps(VALID[index])
    raw = raw.replace(f'"{VALID[index]["amount"]}"', "1.5")
    field_error(raw, "amount")


def test_a_payout_items_amount_is_refused_naming_its_path() -> None:
    raw = json.dumps(VALID[9]).replace('"12.00"', "12.0")
    assert "JSON number" in field_error(raw, "items.0.amount")


@pytest.mark.parametrize(
    ("value", "reason"),
    [(0.1, "decimal string"), ("1.5", "between 0 and 1"), ("-0.1", "between 0 and 1"),
     ("0.1234567", "at most 6 places"), ("NaN", "between 0 and 1"), ("1e-1", "between 0 and 1")],
)
def test_a_bad_fee_rate_is_refused_naming_the_fee_rate(value: object, reason: str) -> None:
    assert reason in field_error({**VALID[4], "fee_rate": value}, "fee_rate")


def test_a_fee_rate_in_json_as_a_number_is_refused_naming_the_fee_rate() -> None:
    raw = json.dumps(VALID[4]).replace('"0.10"', "0.10")
    field_error(raw, "fee_rate")


# --- ids, memo, unknown fields ----------------------------------------------------------

BAD_IDS = ["", "a" * 201, "al ice", "alice\n", "al/ice", "ali@ce", "élise", "a\x00b", "a,b", "用户"]


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize(
    ("index", "field"),
    [(0, "idempotency_key"), (0, "user"), (2, "from_user"), (2, "to_user"), (3, "hold_id"),
     (3, "payer"), (3, "payee"), (5, "hold_id"), (0, "requested_by")],
)
def test_an_id_outside_the_allowed_characters_is_refused_naming_it(
    bad: str, index: int, field: str
) -> None:
    message = field_error({**VALID[index], field: bad}, field)
    assert "200" in message


def test_an_id_of_exactly_200_allowed_characters_is_accepted() -> None:
    key, user = "aZ09._:-" * 25, "aZ09._-" * 28 + "aZ09"
    assert len(key) == len(user) == 200
    command = parse_command({**CREDIT, "idempotency_key": key, "user": user})
    assert (command.idempotency_key, command.user) == (key, user)


def example_of(type_name: str) -> dict[str, Any]:
    """The corpus's first valid command of a type."""
    return next(c for c in VALID if c["type"] == type_name)


@pytest.mark.parametrize("field", ["user", "hold_id", "payer", "reference"])
def test_a_colon_in_a_user_hold_or_reference_id_is_refused_saying_why(field: str) -> None:
    # `user:alice:available` as a user id could not be told apart from an account code.
    hold, payout = example_of("transfer_to_escrow"), example_of("payout_batch")
    base = {"user": CREDIT, "hold_id": hold, "payer": hold}.get(field)
    if base is None:
        bad = {**payout, "items": [{**payout["items"][0], "reference": "inv:1"}]}
        message = field_error(bad, "items.0.reference")
    else:
        message = field_error({**base, field: "user:alice:available"}, field)
    assert "no ':'" in message and "account codes" in message


def test_an_id_that_is_not_a_string_is_refused_naming_it() -> None:
    assert "string" in field_error({**CREDIT, "user": 42}, "user")


def test_an_oversized_memo_is_refused_naming_the_memo() -> None:
    assert parse_command({**CREDIT, "memo": "m" * 500}).memo == "m" * 500
    assert "500" in field_error({**CREDIT, "memo": "m" * 501}, "memo")


@pytest.mark.parametrize("index", range(len(VALID)))
def test_an_unknown_field_is_refused_by_name(index: int) -> None:
    assert field_error({**VALID[index], "colour": "blue"}, "colour") == "unknown field"


def test_a_missing_required_field_is_refused_by_name() -> None:
    data = dict(VALID[3])
    del data["payee"]
    assert "required" in field_error(data, "payee").lower()


# --- oneself, type, json ----------------------------------------------------------------


def test_a_transfer_to_oneself_is_refused_naming_the_recipient() -> None:
    message = field_error({**VALID[2], "to_user": "alice"}, "to_user")
    assert "from_user" in message and "oneself" in message


def test_a_hold_to_oneself_is_refused_naming_the_payee() -> None:
    message = field_error({**VALID[3], "payee": "alice"}, "payee")
    assert "payer" in message and "oneself" in message


def test_users_differing_only_by_case_are_two_users() -> None:
    assert isinstance(parse_command({**VALID[3], "payee": "Alice"}), TransferToEscrow)


@pytest.mark.parametrize("raw", ["{", '{"type": "credit_wallet",}', "", "nul", b"\xff\xfe{"])
def test_malformed_json_is_refused(raw: str | bytes) -> None:
    assert "malformed JSON" in refused(raw).message


@pytest.mark.parametrize(
    ("raw", "kind"),
    [("[]", "array"), ('"credit_wallet"', "string"), ("12", "number"), ("1.5", "number"),
     ("null", "null"), ("true", "boolean")],
)
def test_json_that_is_not_an_object_is_refused_saying_what_it_is(raw: str, kind: str) -> None:
    assert refused(raw).message == f"a command must be a JSON object, not a JSON {kind}"


def test_an_unknown_type_is_refused_naming_the_type_and_the_known_ones() -> None:
    message = field_error({**CREDIT, "type": "mint_money"}, "type")
    assert "unknown command type" in message and "credit_wallet" in message


def test_a_missing_type_is_refused_naming_the_type() -> None:
    data = dict(CREDIT)
    del data["type"]
    assert "required" in field_error(data, "type")


def test_an_oversized_payload_is_refused_before_parsing() -> None:
    raw = json.dumps({**CREDIT, "memo": "m" * (4 * 1024 * 1024)})
    assert "at most" in refused(raw).message


def test_the_error_keeps_a_well_formed_idempotency_key_for_the_record() -> None:
    assert refused({**CREDIT, "amount": "0"}).ids == {"idempotency_key": "dep-81"}
    assert refused({**CREDIT, "amount": "0", "idempotency_key": "k" * 201}).ids == {}


def test_the_errors_to_dict_carries_the_code_and_the_fields() -> None:
    out = refused({**CREDIT, "amount": "0", "colour": "blue"}).to_dict()
    assert out["code"] == "invalid_command"
    assert {f["field"] for f in out["fields"]} == {"amount", "colour"}


# --- producer and signature --------------------------------------------------------------


@pytest.mark.parametrize("field", ["producer", "signature"])
@pytest.mark.parametrize("index", range(len(VALID)))
def test_every_command_requires_its_producer_and_signature(index: int, field: str) -> None:
    data = {k: v for k, v in VALID[index].items() if k != field}
    assert "required" in field_error(data, field).lower()


@pytest.mark.parametrize("bad", ["", "a:b", "a b", "p" * 201, "élan", 7])
def test_a_producer_name_outside_its_characters_is_refused(bad: object) -> None:
    field_error({**CREDIT, "producer": bad}, "producer")


@pytest.mark.parametrize("bad", ["A" * 85, "A" * 87, "A" * 84 + "==", "A" * 85 + "+", "A" * 85 + "/",
                                 None, 12])
def test_a_signature_of_another_shape_than_86_base64url_characters_is_refused(bad: object) -> None:
    field_error({**CREDIT, "signature": bad}, "signature")


def test_the_canonical_payload_leaves_the_signature_out_and_keeps_the_producer() -> None:
    one = canonical_payload(parse_command(CREDIT))
    other = canonical_payload(parse_command({**CREDIT, "signature": "B" * 86}))
    assert one == other and "signature" not in json.loads(one)
    assert json.loads(one)["producer"] == "web-1"
    assert payload_hash(canonical_payload(parse_command({**CREDIT, "producer": "web-2"}))) \
        != payload_hash(one)


# --- canonical payload and schema -------------------------------------------------------


def test_the_canonical_payload_is_equal_for_10_0_and_10_00() -> None:
    one = canonical_payload(parse_command({**CREDIT, "amount": "10.0"}))
    two = canonical_payload(parse_command({**CREDIT, "amount": "10.00"}))
    three = canonical_payload(parse_command({**CREDIT, "amount": "10"}))
    assert one == two == three
    assert json.loads(one)["amount"] == "10.00"
    assert payload_hash(one) == payload_hash(two)


def test_the_canonical_payload_ignores_key_order_and_absent_options() -> None:
    reordered = dict(reversed(list(CREDIT.items())))
    assert canonical_payload(parse_command(reordered)) == canonical_payload(parse_command(CREDIT))
    with_none = canonical_payload(parse_command({**CREDIT, "memo": None}))
    assert with_none == canonical_payload(parse_command(CREDIT))
    assert " " not in canonical_payload(parse_command(CREDIT))


def test_another_amount_or_memo_changes_the_hash() -> None:
    base = payload_hash(canonical_payload(parse_command(CREDIT)))
    assert payload_hash(canonical_payload(parse_command({**CREDIT, "amount": "10.01"}))) != base
    assert payload_hash(canonical_payload(parse_command({**CREDIT, "memo": "x"}))) != base
    assert len(base) == 64


def test_the_json_schema_names_every_command_type_and_forbids_unknown_fields() -> None:
    schema = command_json_schema(LIMITS)
    json.dumps(schema)  # serialisable as it stands
    assert schema["title"] == "walletq command"
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["properties"]["type"]["enum"] == list(COMMAND_TYPES)
    credit = schema["$defs"]["CreditWallet"]
    assert credit["additionalProperties"] is False
    assert credit["properties"]["amount"] == {"$ref": "#/$defs/Amount"}
    assert schema["$defs"]["Amount"]["type"] == "string"
    assert set(credit["required"]) >= {"type", "idempotency_key", "user", "amount"}
    assert credit["properties"]["user"]["pattern"] == "^[A-Za-z0-9._-]{1,200}$(?!\\n)"
    assert credit["properties"]["idempotency_key"]["pattern"] == "^[A-Za-z0-9._:-]{1,200}$(?!\\n)"


def test_the_json_schema_is_valid_under_its_meta_schema_and_agrees_with_the_parser() -> None:
    schema = command_json_schema(LIMITS)
    validator_class = jsonschema.validators.validator_for(schema)
    assert validator_class is jsonschema.Draft202012Validator
    validator_class.check_schema(schema)  # the meta-schema check: raises SchemaError if not
    validator = validator_class(schema)
    for example in VALID:
        errors = [error.message for error in validator.iter_errors(example)]
        assert not errors, (example["type"], errors)
    assert not validator.is_valid({**CREDIT, "surprise": 1})  # unknown fields are errors
    assert not validator.is_valid({**CREDIT, "amount": 10})  # a JSON number is no amount
    assert not validator.is_valid({**CREDIT, "type": "no_such_type"})


def test_the_same_key_twice_in_json_text_is_refused_never_the_last_one_wins() -> None:
    text = json.dumps(CREDIT)[:-1] + ', "amount": "999.00"}'
    assert refused(text).message == "malformed JSON: the key 'amount' appears twice"


@pytest.mark.parametrize("as_text", [True, False], ids=["json text", "dict"])
def test_a_500_deep_command_is_invalid_naming_the_depth_not_a_recursion_error(as_text: bool) -> None:
    from services.admission import as_object

    deep: Any = "x"
    for _ in range(500):
        deep = {"n": deep}
    raw = {**CREDIT, "memo": deep}
    with pytest.raises(InvalidCommandError, match="more than 8 deep"):
        as_object(json.dumps(raw) if as_text else raw)


def test_an_oversized_dict_is_refused_before_it_is_walked_whole() -> None:
    from services.admission import as_object
    from services.boundary import PAYLOAD_BYTES_MAX

    huge = {**CREDIT, "memo": ["m" * 1024] * (6 * 1024)}  # 6 MiB of text, never encoded
    with pytest.raises(InvalidCommandError, match=f"over {PAYLOAD_BYTES_MAX} bytes"):
        as_object(huge)


def test_a_payout_whose_canonical_form_exceeds_the_stored_limit_is_invalid() -> None:
    # 10,000 items with 200-character ids: valid item by item, 4.4 MB canonical; the column
    # holds 4 MiB. Refused by validation, never an IntegrityError at the INSERT.
    long_id = "u" * 200
    items = [{"user": long_id, "amount": "1.00", "reference": f"{i:0>200}"} for i in range(10_000)]
    error = refused({**example_of("payout_batch"), "items": items})
    assert "canonical form" in error.message and "at most 4194304" in error.message


def test_a_large_commands_canonical_text_is_written_once_per_instance() -> None:
    """Kept by instance while it lives: a copy with another key writes its own text."""
    import gc

    from services import canonical

    raw = {"type": "payout_batch", "idempotency_key": "big", "producer": "p",
           "signature": "A" * 86,
           "items": [{"user": f"u{n}", "amount": "1.5", "reference": f"r{n}"} for n in range(3000)]}
    command = parse_command(raw, LIMITS)
    text = canonical.canonical_payload(command)
    assert canonical.canonical_payload(command) is text and '"amount":"1.50"' in text
    other = command.model_copy(update={"idempotency_key": "big-2"})
    assert '"idempotency_key":"big-2"' in canonical.canonical_payload(other)
    assert command == parse_command(raw, LIMITS)  # nothing kept on the instance itself
    ids = {id(command), id(other)}
    assert ids <= set(canonical._KEPT)
    del command, other
    gc.collect()
    assert not ids & set(canonical._KEPT)
