"""A command's canonical text and its hash: what idempotency compares and what is stored.

Sorted keys, no spaces, amounts at the asset's scale, absent optional fields left out, and
no signature: two sendings of one command give one text, whatever their spelling ("1.5" or
"1.50") and whatever their signature (a retry signed afresh is the same command). The
producer is part of it: one key sent by two producers is two commands, a conflict.
"""

from __future__ import annotations

import hashlib
import json
import weakref

from services.command_fields import CommandBase

__all__ = ["canonical_payload", "payload_hash"]


#: Large commands' texts by the id of their (frozen) instance, while it lives: validation,
#: recording and the idempotency check each need it, and a 10,000-item payout's costs
#: ~20 ms to write.
_KEPT: dict[int, tuple[weakref.ref[CommandBase], str]] = {}
_KEPT_CHARS_MIN = 65_536


def canonical_payload(command: CommandBase) -> str:
    kept = _KEPT.get(id(command))
    if kept is not None and kept[0]() is command:
        return kept[1]
    data = command.model_dump(mode="json", exclude_none=True, exclude={"signature"})
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if len(canonical) >= _KEPT_CHARS_MIN:
        key = id(command)

        def forget(_: weakref.ref[CommandBase]) -> None:
            _KEPT.pop(key, None)

        _KEPT[key] = (weakref.ref(command, forget), canonical)
    return canonical


def payload_hash(canonical: str) -> str:
    return hashlib.sha256(canonical.encode()).hexdigest()
