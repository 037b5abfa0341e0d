"""The JSON Schema of the commands, as strict as the worker wherever JSON Schema can say it.

Producers in other languages validate against it (`walletq schema`), so it must accept
nothing the worker refuses. The models give the shape; the deployment's limits give the
rest: the amount pattern is built from the asset's scale and the largest amount (zero
excluded), a payout's `maxItems` from its item limit. Only standard draft 2020-12 keywords:
the type union is `if`/`then` on the `type` constant (pydantic's `discriminator` is not a
keyword, and strict validators refuse it). Every pattern ends at the end of the text in
every dialect (`$(?!\\n)`): Python's `re` and Java also match a bare `$` before a final
newline, so "alice\\n" would pass as a user id. What JSON Schema cannot say (two distinct
users, unique references, the size of the message) is written in the descriptions: the
models' docstrings say it where the validator lives.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from services.command_fields import AMOUNT_SCHEMA_MARK, RESERVED_KEY_PREFIXES, CommandLimits
from services.money import format_minor

__all__ = ["build_command_schema", "amount_schema", "amount_pattern", "digits_in_range"]

_AMOUNT_DEF = "Amount"
_END_OF_TEXT = r"$(?!\n)"


def build_command_schema(generated: dict[str, Any], limits: CommandLimits,
                         payload_bytes_max: int) -> dict[str, Any]:
    """pydantic's schema of the command union → the published, limit-aware schema."""
    schema = copy.deepcopy(generated)
    defs: dict[str, Any] = schema.pop("$defs")
    # The union's branches in the registry's order, each with its `type` constant.
    branches = [branch["$ref"].rsplit("/", 1)[1] for branch in schema["oneOf"]]
    names = {name: defs[name]["properties"]["type"]["const"] for name in branches}
    payout_items = defs["PayoutBatch"]["properties"]["items"]
    payout_items["maxItems"] = limits.payout_items_max
    # A key walletq derives is its owner type's alone (services.command_fields).
    for def_name, tag in names.items():
        key = defs[def_name]["properties"]["idempotency_key"]
        reserved = [prefix for prefix, owner in RESERVED_KEY_PREFIXES.items() if owner != tag]
        if reserved:
            key["not"] = {"anyOf": [{"pattern": "^" + re.escape(prefix) + r"[\s\S]*$"}
                                    for prefix in reserved]}
    defs = _replace_marks(defs)
    defs[_AMOUNT_DEF] = amount_schema(limits)
    published: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "walletq command",
        "description": (
            f"One walletq command: a JSON object of at most {payload_bytes_max} bytes, "
            "its fields chosen by `type`. Amounts are decimal strings, never JSON numbers. "
            "The worker also refuses what this schema cannot express: a transfer or a hold "
            "between one user and themself, a payout that repeats a reference, and an "
            "expire_hold under `expire:` with another hold's key (`expire:` keys are the expiry "
            "pass's)."
        ),
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"enum": list(names.values())}},
        "allOf": [
            {"if": {"properties": {"type": {"const": tag}}, "required": ["type"]},
             "then": {"$ref": f"#/$defs/{def_name}"}}
            for def_name, tag in names.items()
        ],
        "$defs": defs,
    }
    _anchor_patterns(published)
    return published


def amount_schema(limits: CommandLimits) -> dict[str, Any]:
    scale = limits.scale
    places = f"at most {scale} decimal places" if scale else "no decimal places"
    return {
        "type": "string",
        "pattern": amount_pattern(scale, limits.amount_max_minor),
        "description": (
            f"A decimal string greater than zero and at most "
            f"{format_minor(limits.amount_max_minor, scale)}, with {places}; digits and one "
            "'.', no sign, exponent, spaces or leading zeros (\"12.50\", \"0.01\", \"7\")."
        ),
    }


def amount_pattern(scale: int, amount_max_minor: int) -> str:
    """A regex matching exactly the strings `money.parse_amount` accepts at these limits:
    plain decimal notation, no leading zero, at most `scale` places, above zero and at most
    the maximum."""
    if amount_max_minor < 1:
        raise ValueError("the largest amount must be at least one minor unit")
    unit = 10**scale
    whole_max, fraction_max = divmod(amount_max_minor, unit)
    any_places = rf"(?:\.[0-9]{{1,{scale}}})?" if scale else ""
    alternatives: list[str] = []
    if whole_max >= 2:  # a whole part below the maximum's takes any places
        alternatives.append(_group(_whole_numbers(1, whole_max - 1)) + any_places)
    if whole_max >= 1 and scale:  # below one: places with a digit that is not zero
        alternatives.append(rf"0\.{_group(_not_all_zeros(scale))}")
    if whole_max == 0:  # the maximum is below one: not zero, and not above it
        alternatives.append(rf"0\.{_group(_fractions(scale, 1, fraction_max))}")
    elif fraction_max == 0:  # at the maximum's whole part, places are zeros only
        alternatives.append(f"{whole_max}" + (f"(?:\\.0{{1,{scale}}})?" if scale else ""))
    else:  # at the maximum's whole part, places up to the maximum's
        alternatives.append(f"{whole_max}(?:\\.{_group(_fractions(scale, 0, fraction_max))})?")
    return f"^(?:{'|'.join(alternatives)})$"


def _not_all_zeros(scale: int) -> str:
    """1 to `scale` digits, one of them not zero: k zeros, a non-zero digit, then any."""
    def then_any(count: int) -> str:
        return "" if count == 0 else "[0-9]?" if count == 1 else f"[0-9]{{0,{count}}}"

    return "|".join("0" * zeros + "[1-9]" + then_any(scale - 1 - zeros) for zeros in range(scale))


def _whole_numbers(low: int, high: int) -> str:
    """Numbers from low to high (both ≥ 1) written without leading zeros; the widths that
    are whole ("any 3 digits") share one `[1-9][0-9]{m,n}`."""
    parts, full_widths = [], []
    for width in range(len(str(low)), len(str(high)) + 1):
        first, last = max(low, 10 ** (width - 1)), min(high, 10**width - 1)
        if (first, last) == (10 ** (width - 1), 10**width - 1):
            full_widths.append(width)
        elif first <= last:
            parts.append(digits_in_range(first, last, width))
    if full_widths:
        fewest, most = full_widths[0] - 1, full_widths[-1] - 1
        span = "" if most == 0 else f"{{{most}}}" if fewest == most else f"{{{fewest},{most}}}"
        parts.insert(0, f"[1-9]{'[0-9]' if most else ''}{span}")
    return "|".join(parts)


def _fractions(scale: int, low_minor: int, high_minor: int) -> str:
    """The 1..scale digits after the point whose value in minor units lies in
    [low_minor, high_minor] (fewer places mean trailing zeros: ".5" is 50 at scale 2)."""
    parts = []
    for places in range(1, scale + 1):
        step = 10 ** (scale - places)
        first, last = -(-low_minor // step), high_minor // step
        if first <= last:
            parts.append(digits_in_range(first, last, places))
    return "|".join(parts)


def digits_in_range(low: int, high: int, width: int) -> str:
    """A regex for the strings of exactly `width` digits (leading zeros kept) whose value
    lies in [low, high]."""
    if not 0 <= low <= high < 10**width:
        raise ValueError(f"[{low}, {high}] does not fit in {width} digits")
    if width == 0:
        return ""
    lo, hi = str(low).zfill(width), str(high).zfill(width)
    rest = width - 1
    if lo[0] == hi[0]:
        return lo[0] + _group(digits_in_range(int(lo[1:] or 0), int(hi[1:] or 0), rest))
    parts = []
    first_full, last_full = int(lo[0]), int(hi[0])
    if int(lo[1:] or 0) != 0:  # lo's first digit covers only part of its rest
        parts.append(lo[0] + _group(digits_in_range(int(lo[1:]), 10**rest - 1, rest)))
        first_full += 1
    if int(hi[1:] or 0) != 10**rest - 1:
        last_part = hi[0] + _group(digits_in_range(0, int(hi[1:]), rest))
        last_full -= 1
    else:
        last_part = ""
    if first_full <= last_full:
        digit = str(first_full) if first_full == last_full else f"[{first_full}-{last_full}]"
        parts.append(digit + (f"[0-9]{{{rest}}}" if rest > 1 else "[0-9]" if rest else ""))
    if last_part:
        parts.append(last_part)
    return "|".join(parts)


def _group(pattern: str) -> str:
    return f"(?:{pattern})" if "|" in pattern else pattern


def _replace_marks(node: Any) -> Any:
    """Every amount marked by its model → a reference to the one amount definition."""
    if isinstance(node, dict) and node.get("$comment") == AMOUNT_SCHEMA_MARK["$comment"]:
        return {"$ref": f"#/$defs/{_AMOUNT_DEF}"}
    if isinstance(node, dict):
        return {key: _replace_marks(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_replace_marks(value) for value in node]
    return node


def _anchor_patterns(node: Any) -> None:
    """End every anchored pattern at the end of the text in every regex dialect."""
    if isinstance(node, dict):
        pattern = node.get("pattern")
        if isinstance(pattern, str) and pattern.endswith("$") and not pattern.endswith("\\$"):
            node["pattern"] = pattern[:-1] + _END_OF_TEXT
        for value in node.values():
            _anchor_patterns(value)
    elif isinstance(node, list):
        for value in node:
            _anchor_patterns(value)
