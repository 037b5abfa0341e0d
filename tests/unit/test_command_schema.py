"""The JSON Schema agrees with the worker: an independent validator (`jsonschema`, draft
2020-12) and walletq's parse_command judge one corpus of commands, and disagree only where
JSON Schema has no words (two distinct users, unique references, the size of the text)."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from services.command_schema import amount_pattern, digits_in_range
from services.commands import PAYLOAD_BYTES_MAX, CommandLimits, command_json_schema, parse_command
from services.errors import InvalidCommandError
from services.money import AmountError, parse_amount
from services.operations.escrow import expiry_key
from tests.unit.test_commands import VALID

LIMITS = CommandLimits()
SMALL = CommandLimits(scale=2, amount_max_minor=150, payout_items_max=3)

AMOUNTS = ["10.00", "10", "10.0", "0.01", "0.1", "7", "999999999999.99", "1000000000000",
           "1000000000000.0", "1000000000000.00", "0", "0.0", "0.00", "0.000", "0.001", "1.005",
           "1000000000000.01", "1000000000001", "99999999999999999999", "-1", "+1", "1e3", "1E3",
           "01", "00.5", "1.", ".", ".5", " 1", "1 ", "1\n", "\n1", "１", "\u0661", "1,00",
           "1_000", "NaN", "Infinity", "", "1.0.0", "0x10"]
IDS = ["alice", "a" * 200, "a" * 201, "", "alice\n", "al ice", "al/ice", "a:b", "a.b_c-d",
       "ä", "\u0661", "a\x00", "A9"]
FEE_RATES = ["0", "0.1", "0.10", "1", "1.0", "1.000000", "1.0000000", "0.123456", "0.1234567",
             "1.01", "-0.1", ".5", "0.", "2", "0.1\n", ""]
MEMOS = ["", "x" * 500, "x" * 501, "\U0001f600" * 500, "\U0001f600" * 501, "line\nbreak"]
WRONG_KINDS: list[Any] = [None, 12, 1.5, True, [], {}]
EXPIRES_AT = ["2030-01-31T12:00:00Z", "2030-01-31T12:00:00+01:00", "2030-01-31T12:00:00.123456Z",
              "2030-01-31T12:00:00.1234567Z", "2030-01-31T12:00:00", "2030-13-01T00:00:00Z",
              "2030-01-31 12:00:00Z", "2030-01-31T24:00:00Z", "2030-01-31T12:00:00+1:00",
              "2030-01-31T12:00:00Z\n", "2030-01-00T12:00:00Z", ""]
EXPIRES_IN_S = [1, 3600, 31_622_400, 31_622_401, 0, -1, "60"]
ID_FIELDS = {"user", "from_user", "to_user", "payer", "payee", "hold_id", "idempotency_key",
             "requested_by", "reference"}
SIGNATURES = ["A" * 85, "A" * 87, "A" * 84 + "==", "+" * 86, "/" * 86, "A" * 85 + "\n", "_-" * 43]
ACCOUNTS = ["platform:treasury", "user:acme:available", "a" * 220, "a" * 221, "platform:treasury\n",
            "platform treasury"]


def schema_validator(limits: CommandLimits) -> Draft202012Validator:
    schema = command_json_schema(limits)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


VALIDATOR = schema_validator(LIMITS)


def walletq_accepts(command: Any, limits: CommandLimits = LIMITS) -> bool:
    try:
        parse_command(copy.deepcopy(command), limits)
    except InvalidCommandError:
        return False
    return True


def values_for(field: str) -> list[Any]:
    if field == "amount":
        return AMOUNTS + WRONG_KINDS
    if field == "fee_rate":
        return FEE_RATES + WRONG_KINDS
    if field == "memo":
        return MEMOS + WRONG_KINDS
    if field == "from_account":
        return ACCOUNTS + WRONG_KINDS
    if field in ID_FIELDS or field == "producer":
        return IDS + WRONG_KINDS
    if field == "signature":
        return SIGNATURES + WRONG_KINDS
    if field == "expires_at":
        return EXPIRES_AT + WRONG_KINDS
    if field == "expires_in_s":
        return EXPIRES_IN_S + WRONG_KINDS
    return WRONG_KINDS + ["x"]


def mutations(command: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Each field dropped, replaced by every value of its kind and of every wrong kind; an
    unknown field; the type swapped; each optional field added; a payout's items too."""
    yield command
    yield {**command, "surprise": "x"}
    for other in {c["type"] for c in VALID} | {"no_such_type", ""}:
        yield {**command, "type": other}
    for field in ["memo", "requested_by", "fee_rate", "from_account", "atomic"]:
        if field not in command:
            for value in values_for(field) + [False]:
                yield {**command, field: value}
    for field, value in command.items():
        yield {k: v for k, v in command.items() if k != field}
        if field == "items":
            yield from _item_mutations(command)
            continue
        for replacement in values_for(field):
            if replacement != value:
                yield {**command, field: replacement}


def _item_mutations(command: dict[str, Any]) -> Iterator[dict[str, Any]]:
    item = command["items"][0]
    for items in ([], "x", [1], [None], [{**item, "surprise": 1}], [item, {**item, "reference": "r2"}],
                  [item, {**item, "amount": "1.00"}]):
        yield {**command, "items": items}
    for field in item:
        yield {**command, "items": [{k: v for k, v in item.items() if k != field}]}
        for replacement in values_for(field):
            yield {**command, "items": [{**item, field: replacement}]}


CORPUS = [case for command in VALID for case in mutations(command)]


def test_the_corpus_is_large_and_has_both_verdicts() -> None:
    verdicts = [walletq_accepts(case) for case in CORPUS]
    assert len(CORPUS) > 1500
    assert sum(verdicts) > 100 and verdicts.count(False) > 1000


def test_the_schema_and_the_worker_agree_on_every_command_of_the_corpus() -> None:
    disagreements = [
        (case, schema_ok)
        for case in CORPUS
        if (schema_ok := VALIDATOR.is_valid(case)) != walletq_accepts(case)
        and not (schema_ok and beyond_json_schema(case))
    ]
    assert disagreements == [], f"{len(disagreements)} disagreements, e.g. {disagreements[:3]}"
    beyond = [case for case in CORPUS if beyond_json_schema(case)]
    assert len(beyond) >= 3 and not any(walletq_accepts(case) for case in beyond)


def beyond_json_schema(case: dict[str, Any]) -> bool:
    """A rule JSON Schema has no keyword for: one user on both sides, a repeated reference,
    an expire_hold under the `expire:` prefix with another hold's key."""
    pairs = {"transfer_tokens_between_users": ("from_user", "to_user"),
             "transfer_to_escrow": ("payer", "payee")}
    kind = case.get("type")
    key = case.get("idempotency_key")
    if kind == "expire_hold" and isinstance(case.get("hold_id"), str) and isinstance(key, str):
        return key.startswith("expire:") and key != expiry_key(case["hold_id"])
    if isinstance(kind, str) and kind in pairs:
        first, second = pairs[kind]
        return first in case and case.get(first) == case.get(second)
    items = case.get("items")
    if case.get("type") == "payout_batch" and isinstance(items, list):
        references = [i.get("reference") for i in items if isinstance(i, dict)]
        return len(references) != len(set(map(str, references)))
    return False


@pytest.mark.parametrize(
    "case",
    [
        {**VALID[2], "to_user": VALID[2]["from_user"]},
        {**VALID[3], "payee": VALID[3]["payer"]},
        {**VALID[9], "items": [VALID[9]["items"][0]] * 2},
    ],
    ids=["transfer to oneself", "hold to oneself", "a repeated reference"],
)
def test_what_json_schema_cannot_say_is_described_and_refused_by_the_worker(case: dict[str, Any]) -> None:
    assert VALIDATOR.is_valid(case)
    assert not walletq_accepts(case)
    definition = VALIDATOR.schema["$defs"][_definition_of(case["type"])]
    assert re.search(r"must differ|must be unique", definition["description"])


def test_the_size_limit_is_described_and_enforced_on_the_text() -> None:
    item = {"user": "u" * 200, "amount": "1.00"}
    items = [{**item, "reference": f"{n:0200d}"} for n in range(LIMITS.payout_items_max)]
    huge = {**VALID[9], "items": items}
    text = json.dumps(huge)
    assert len(text) > PAYLOAD_BYTES_MAX
    assert VALIDATOR.is_valid(huge)
    with pytest.raises(InvalidCommandError, match="bytes"):
        parse_command(text, LIMITS)
    assert f"at most {PAYLOAD_BYTES_MAX} bytes" in VALIDATOR.schema["description"]


def test_a_payout_above_the_item_limit_is_refused_by_both() -> None:
    item = VALID[9]["items"][0]
    for count, accepted in [(LIMITS.payout_items_max, True), (LIMITS.payout_items_max + 1, False)]:
        batch = {**VALID[9], "items": [{**item, "reference": f"r{n}"} for n in range(count)]}
        assert VALIDATOR.is_valid(batch) is accepted
        assert walletq_accepts(batch) is accepted


@pytest.mark.parametrize("limits", [
    SMALL, CommandLimits(scale=0, amount_max_minor=10**5),
    CommandLimits(scale=3, amount_max_minor=123_456_789),
    CommandLimits(scale=8, amount_max_minor=10**17), CommandLimits(scale=1, amount_max_minor=1),
], ids=["max 1.50", "scale 0", "scale 3", "scale 8", "max 0.1"])
def test_the_schema_follows_the_deployments_limits(limits: CommandLimits) -> None:
    validator = schema_validator(limits)
    item = VALID[9]["items"][0]
    cases = [{**VALID[0], "amount": amount} for amount in AMOUNTS + _boundaries(limits)]
    cases += [{**VALID[9], "items": [{**item, "amount": "1", "reference": f"r{n}"} for n in range(count)]}
              for count in (limits.payout_items_max, limits.payout_items_max + 1)]
    disagreements = [c for c in cases if validator.is_valid(c) != walletq_accepts(c, limits)]
    assert disagreements == []


def _boundaries(limits: CommandLimits) -> list[str]:
    scale, top = limits.scale, limits.amount_max_minor
    def text(minor: int, places: int) -> str:
        whole, part = divmod(minor, 10**scale)
        fraction = str(part).zfill(scale)[:places] if places else ""
        return f"{whole}.{fraction}" if places else str(whole)
    return [text(m, p) for m in (1, top - 1, top, top + 1, 10**scale) for p in range(scale + 2)
            if m >= 0]


@settings(max_examples=400, deadline=None)
@given(
    scale=st.integers(0, 8),
    whole_digits=st.integers(0, 9),
    data=st.data(),
)
def test_the_amount_pattern_accepts_exactly_what_parse_amount_accepts(
    scale: int, whole_digits: int, data: st.DataObject
) -> None:
    top = data.draw(st.integers(1, min(10**17, 10 ** (whole_digits + scale))), label="max_minor")
    pattern = re.compile(amount_pattern(scale, top))
    near = st.integers(0, top + 10**scale).map(lambda m: _as_text(m, scale, data))
    noise = st.text(alphabet="0123456789.-+e \n", max_size=22)
    for value in data.draw(st.lists(st.one_of(near, noise), min_size=1, max_size=30), label="values"):
        assert (pattern.fullmatch(value) is not None) == _parses(value, scale, top), value


def _as_text(minor: int, scale: int, data: st.DataObject) -> str:
    """An amount written with 0 to scale + 1 places (trailing places cut or zero-padded)."""
    whole, part = divmod(minor, 10**scale)
    places = data.draw(st.integers(0, scale + 1), label="places")
    digits = (str(part).zfill(scale) + "0")[:places]
    return f"{whole}.{digits}" if places else str(whole)


def _parses(value: str, scale: int, top: int) -> bool:
    try:
        parse_amount(value, scale=scale, max_minor=top)
    except AmountError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 3), data=st.data())
def test_digits_in_range_matches_exactly_the_numbers_of_its_range(width: int, data: st.DataObject) -> None:
    low = data.draw(st.integers(0, 10**width - 1))
    high = data.draw(st.integers(low, 10**width - 1))
    pattern = re.compile(digits_in_range(low, high, width))
    matched = {n for n in range(10**width) if pattern.fullmatch(str(n).zfill(width))}
    assert matched == set(range(low, high + 1))


def test_the_default_amount_pattern_reads_as_documented() -> None:
    assert amount_pattern(2, 10**14) == (
        r"^(?:[1-9][0-9]{0,11}(?:\.[0-9]{1,2})?|0\.(?:[1-9][0-9]?|0[1-9])"
        r"|1000000000000(?:\.0{1,2})?)$"
    )


# Draft 2020-12's vocabularies: core, applicator, unevaluated, validation, meta-data,
# format-annotation, content. Anything else is a keyword strict validators refuse.
KEYWORDS = {
    "$schema", "$id", "$ref", "$anchor", "$dynamicRef", "$dynamicAnchor", "$vocabulary",
    "$comment", "$defs", "prefixItems", "items", "contains", "additionalProperties",
    "properties", "patternProperties", "dependentSchemas", "propertyNames", "if", "then",
    "else", "allOf", "anyOf", "oneOf", "not", "unevaluatedItems", "unevaluatedProperties",
    "type", "const", "enum", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
    "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems", "minItems",
    "uniqueItems", "maxContains", "minContains", "maxProperties", "minProperties", "required",
    "dependentRequired", "title", "description", "default", "deprecated", "readOnly",
    "writeOnly", "examples", "format", "contentEncoding", "contentMediaType", "contentSchema",
}
_ONE_SCHEMA = {"items", "contains", "additionalProperties", "propertyNames", "if", "then",
               "else", "not", "unevaluatedItems", "unevaluatedProperties", "contentSchema"}
_SCHEMA_MAPS = {"$defs", "properties", "patternProperties", "dependentSchemas"}
_SCHEMA_LISTS = {"allOf", "anyOf", "oneOf", "prefixItems"}


def subschemas(schema: dict[str, Any], where: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    yield where, schema
    for key, value in schema.items():
        if key in _ONE_SCHEMA and isinstance(value, dict):
            yield from subschemas(value, f"{where}/{key}")
        elif key in _SCHEMA_MAPS:
            for name, sub in value.items():
                yield from subschemas(sub, f"{where}/{key}/{name}")
        elif key in _SCHEMA_LISTS:
            for index, sub in enumerate(value):
                yield from subschemas(sub, f"{where}/{key}/{index}")


def test_the_schema_uses_only_standard_keywords_and_closes_every_object() -> None:
    schema = command_json_schema(LIMITS)
    found = list(subschemas(schema))
    assert len(found) > 50
    unknown = {(where, key) for where, sub in found for key in sub if key not in KEYWORDS}
    assert unknown == set()
    models = [(where, sub) for where, sub in found if sub.get("type") == "object" and where != "#"]
    assert len(models) == len({c["type"] for c in VALID}) + 1  # every type, the payout item
    assert [where for where, sub in models if sub.get("additionalProperties") is not False] == []
    assert "discriminator" not in json.dumps(schema)


def test_every_pattern_ends_at_the_end_of_the_text() -> None:
    patterns = [sub["pattern"] for _, sub in subschemas(command_json_schema(LIMITS)) if "pattern" in sub]
    assert len(patterns) > 20
    assert all(p.startswith("^") and p.endswith("$(?!\\n)") for p in patterns)
    assert not VALIDATOR.is_valid({**VALID[0], "user": "alice\n"})
    assert not VALIDATOR.is_valid({**VALID[0], "amount": "1.00\n"})


def _definition_of(command_type: str) -> str:
    [branch] = [b for b in VALIDATOR.schema["allOf"]
                if b["if"]["properties"]["type"]["const"] == command_type]
    return str(branch["then"]["$ref"].rsplit("/", 1)[1])
