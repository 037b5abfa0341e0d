"""Commands placed in the outbox by hand: recorded `accepted` and never published (a message
'lost'), or made to look stuck for longer than the sweep's grace period."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Engine

from services import schema
from services.command_fields import CommandLimits
from services.commands import parse_command
from services.outbox import Accepted, record_accepted
from services.settings import Settings
from services.signing import signed_form
from tests.support.signing import signed

__all__ = ["accept_only", "age"]


def accept_only(raw: dict[str, Any], engine: Engine, settings: Settings) -> Accepted:
    """Record a command as accepted and publish nothing: a producer that died before publishing.

    A command that carries its signature is recorded as its producer signed it; an unsigned
    one is signed first as the test's own producer (tests.support.signing)."""
    message = raw if "signature" in raw else signed(raw)
    command = parse_command(message, CommandLimits.from_settings(settings))
    return record_accepted(command, signed_form(message), engine=engine, settings=settings)


def age(engine: Engine, key: str, seconds: float) -> None:
    """Move a command's clock back: untouched for `seconds`, as the sweep sees it."""
    c = schema.commands
    with engine.begin() as conn:
        conn.execute(update(c).where(c.c.idempotency_key == key)
                     .values(updated_at=datetime.now(UTC) - timedelta(seconds=seconds)))
