"""The `refusals` table, and the only module that writes it: refusals that take no key.

A command refused as unauthenticated, forbidden or a conflicting replay (or invalid, when
its key is taken or unusable) leaves no command row, so that nobody can squat a key by
sending garbage under it. Its producer still learns what became of it: by key (and
producer), here. Append-only (a trigger refuses UPDATE and DELETE). The producer named by
an unauthenticated refusal is only what the message claimed (`authenticated` is false).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from services import schema
from services.command_store import ERROR_MESSAGE_LENGTH_MAX, iso

__all__ = ["Refusal", "append", "for_key", "READ_MAX"]

_t = schema.refusals
#: Refusals read per key at most (newest first): a flood under one key stays readable.
READ_MAX = 100
_TYPE_CHARS_MAX = 60


@dataclass(frozen=True)
class Refusal:
    id: int
    idempotency_key: str | None
    producer: str | None
    authenticated: bool
    command_type: str | None
    error_code: str
    error_message: str
    source: str
    created_at: datetime

    @property
    def error(self) -> dict[str, str]:
        return {"code": self.error_code, "message": self.error_message}

    def to_dict(self) -> dict[str, Any]:
        return {"idempotency_key": self.idempotency_key, "producer": self.producer,
                "authenticated": self.authenticated, "type": self.command_type,
                "error": self.error, "source": self.source, "at": iso(self.created_at)}


def append(conn: Connection, *, key: str | None, producer: str | None, authenticated: bool,
           command_type: str | None, error: dict[str, Any], source: str) -> None:
    conn.execute(insert(_t).values(
        idempotency_key=key, producer=producer, authenticated=authenticated,
        command_type=None if command_type is None else command_type[:_TYPE_CHARS_MAX],
        error_code=error["code"], error_message=str(error["message"])[:ERROR_MESSAGE_LENGTH_MAX],
        source=source))


def for_key(conn: Connection, key: str, producer: str | None = None,
            limit: int = READ_MAX) -> list[Refusal]:
    """The refusals of commands sent under this key (by this producer), newest first."""
    query = select(_t).where(_t.c.idempotency_key == key)
    if producer is not None:
        query = query.where(_t.c.producer == producer)
    rows = conn.execute(query.order_by(_t.c.id.desc()).limit(min(limit, READ_MAX)))
    return [Refusal(**row._mapping) for row in rows]
