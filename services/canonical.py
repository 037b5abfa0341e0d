"""A command's canonical text and its hash: what idempotency compares and what is stored.

Sorted keys, no spaces, amounts at the asset's scale, absent optional fields left out, and
no signature: two sendings of one command give one text, whatever their spelling ("1.5" or
"1.50") and whatever their signature (a retry signed afresh is the same command). The
producer is part of it: one key sent by two producers is two commands, a conflict.
"""

from __future__ import annotations

import hashlib
import json

from services.command_fields import CommandBase

__all__ = ["canonical_payload", "payload_hash"]


def canonical_payload(command: CommandBase) -> str:
    data = command.model_dump(mode="json", exclude_none=True, exclude={"signature"})
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def payload_hash(canonical: str) -> str:
    return hashlib.sha256(canonical.encode()).hexdigest()
