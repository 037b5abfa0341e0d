"""The limits of a plausible command, and JSON decoded strictly within them.

A command is a small, shallow JSON object. Anything else is refused before any work is
done on it, at every edge (WalletClient, WalletService, `walletq submit`) and in the
worker's main process before a message reaches the pool (worker.guarded_request):

- **size**: the text is measured before it is decoded (`PAYLOAD_BYTES_MAX`); an object
  handed over already decoded is walked and given up as soon as it is over;
- **depth**: at most `DEPTH_MAX` levels of objects and arrays (a payout needs 3); measured
  without recursion, and a decoder that recursed too deep is a refusal, not a crash
  (a 500-deep message used to kill the prefork pool's pickling);
- **duplicate keys**: `{"amount": "1.00", "amount": "999.00"}` is refused, never "the
  last one wins";
- floats and non-finite literals stay `JsonNumber` text, which every field refuses.

Each refusal is an `InvalidCommandError` naming the reason. No Celery here: the worker's
envelope checks live in worker.guarded_request and call `decode_strict`/`check_depth`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from services.command_fields import JsonNumber
from services.errors import InvalidCommandError

__all__ = ["PAYLOAD_BYTES_MAX", "DEPTH_MAX", "decode_strict", "check_object", "depth_over",
           "text_depth_over"]

#: The largest command text. Single commands are small; a payout of 10,000 rows with long
#: ids is about 4 MB, and `commands.payload` holds at most 4 MiB (a CHECK).
PAYLOAD_BYTES_MAX = 4 * 1024 * 1024
#: The deepest nesting of objects and arrays a command may have: a payout is 3 deep
#: (command → items → item); a few levels spare, far below any recursion limit.
DEPTH_MAX = 8


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise InvalidCommandError(f"malformed JSON: the key {key[:60]!r} appears twice")
        obj[key] = value
    return obj


def depth_over(value: Any, depth_max: int = DEPTH_MAX) -> bool:
    """Whether objects and arrays nest deeper than `depth_max` (an explicit stack, no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > depth_max:
            return True
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list | tuple))
    return False


# In text that is valid JSON (so every string ends): its strings, then all but brackets.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')
_NOT_BRACKET = re.compile(rb"[^\[\]{}]++")
_INNERMOST = re.compile(rb"\[\]|\{\}")


def text_depth_over(text: str | bytes, depth_max: int = DEPTH_MAX) -> bool:
    """Whether valid JSON text nests deeper than `depth_max`: its skeleton of brackets, the
    innermost pairs removed `depth_max` times (regular expressions, no recursion)."""
    raw = text.encode() if isinstance(text, str) else text
    if raw.count(b"[") + raw.count(b"{") <= depth_max:
        return False
    skeleton = _NOT_BRACKET.sub(b"", _STRING.sub(b"", raw))
    for _ in range(depth_max):
        skeleton = _INNERMOST.sub(b"", skeleton)
        if not skeleton:
            return False
    return bool(skeleton)


def _too_deep() -> InvalidCommandError:
    return InvalidCommandError(f"command nests objects and arrays more than {DEPTH_MAX} deep")


def decode_strict(raw: str | bytes, *, bytes_max: int = PAYLOAD_BYTES_MAX,
                  depth_max: int = DEPTH_MAX) -> Any:
    """JSON text → its value within the limits above, or InvalidCommandError naming why."""
    if len(raw) > bytes_max:
        raise InvalidCommandError(f"command is {len(raw)} bytes; at most {bytes_max}")
    try:
        # UTF-8 only (json.loads would guess UTF-16 or 32 from bytes): in UTF-8 no byte of a
        # multi-byte character is a quote, a backslash or a bracket, so the skeleton is exact.
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text, parse_float=JsonNumber, parse_constant=JsonNumber,
                           object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidCommandError(f"malformed JSON: {str(exc)[:200]}") from None
    if text_depth_over(raw, depth_max):  # valid JSON now: every string ends
        raise _too_deep()
    return value


def check_object(value: Any, *, bytes_max: int = PAYLOAD_BYTES_MAX,
                 depth_max: int = DEPTH_MAX) -> None:
    """A value handed over already decoded (a dict from a web request): refused when it
    nests too deep or its text would be over `bytes_max`; walked once, without recursion,
    and given up at the first limit passed. The size counted is a lower bound of its compact
    JSON text (no escapes counted), so what would fit as text is never refused here."""
    size = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > depth_max:
                raise _too_deep()
            size += 1 + _members(item, depth + 1, stack)
        elif isinstance(item, list | tuple):
            if depth > depth_max:
                raise _too_deep()
            size += 1 + len(item) + _leaves(item, depth + 1, stack)  # brackets and commas
        elif isinstance(item, str):
            size += len(item) + 2
        else:
            size += 1
        if size > bytes_max:
            raise InvalidCommandError(f"command is over {bytes_max} bytes")


def _members(item: dict[Any, Any], depth: int, stack: list[tuple[Any, int]]) -> int:
    """`_leaves` of an object's values, and its keys, each with its quotes, colon and comma."""
    size = 4 * len(item)
    for key in item:
        size += len(key if type(key) is str else str(key))
    return size + _leaves(item.values(), depth, stack)


def _leaves(children: Iterable[Any], depth: int, stack: list[tuple[Any, int]]) -> int:
    """The size of a container's scalar children; its containers pushed for the walk (a
    payout's 10,000 items are 30,000 strings: counted here, not pushed, ~3x faster)."""
    size = 0
    for child in children:
        if type(child) is str:
            size += len(child) + 2
        elif isinstance(child, dict | list | tuple):
            stack.append((child, depth))
        else:
            size += len(child) + 2 if isinstance(child, str) else 1
    return size
