"""Escrow: a payer's money held for a payee, then released (minus the platform fee) or refunded.

This module owns the `holds` table. A hold's row is locked before any account, so two
commands on one hold queue on it, and the second finds it closed. A hold's fee rate is
fixed when it opens (the deployment's rate, or one a producer allowed to override fees
names); its release uses that rate unless such a producer names another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy import select, text, update
from sqlalchemy.engine import Connection

from services import schema
from services.bulk_sql import (
    Deferred,
    Pending,
    execute_reusable,
    insert_ignoring_conflicts,
    pg_array,
)
from services.command_fields import Amount, CommandBase, FeeRate, Ident
from services.errors import (
    EscrowIntegrityError,
    HoldExceededError,
    HoldExistsError,
    HoldExpiredError,
    HoldNotExpiredError,
    HoldNotOpenError,
    InvalidCommandError,
    UnknownHoldError,
)
from services.hold_rules import (
    HOLD_EXPIRES_IN_S_MAX,
    as_utc,
    expiry_of,
    is_expired,
    plan_release,
    remaining_of,
)
from services.ledger import (
    FEES,
    defer,
    keep,
    kept,
    lock_accounts,
    make_transfer,
    post_transfers,
    user_available,
    user_escrow,
)
from services.money import to_minor
from services.operations.base import Effect, Footprint, OperationContext, TransferFacts, move
from services.permissions import NOTHING_MORE, OVERRIDE_FEE

__all__ = ["TransferToEscrow", "ReleaseFromEscrow", "RefundFromEscrow", "transfer_to_escrow",
           "release_from_escrow", "refund_from_escrow", "release_transfers", "refund_transfers",
           "fee_rate_needs", "lock_holds", "hold_footprint", "release_footprint",
           "refund_footprint", "ExpireHold", "expire_hold", "expire_footprint",
           "expire_transfers", "hold_view", "expiry_key"]

# ISO-8601 with a timezone ("Z" or ±hh:mm); the calendar (no 30 February) is checked by
# the validator, which JSON Schema cannot do (the description says it).
_EXPIRES_AT_PATTERN = (r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3])"
                       r":[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$")


def _a_real_moment(value: str) -> str:
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is not a date and time of the calendar") from None
    return value


ExpiresAt = Annotated[str, StringConstraints(pattern=_EXPIRES_AT_PATTERN, max_length=40),
                      AfterValidator(_a_real_moment)]
ExpiresInS = Annotated[int, Field(ge=1, le=HOLD_EXPIRES_IN_S_MAX)]


class TransferToEscrow(CommandBase):
    """Holds a payer's money for a payee under hold_id; payee must differ from payer.
    Optionally expiring: at `expires_at` (ISO-8601 with a timezone, a real date, in the
    future when it opens) or `expires_in_s` after it opens — not both."""

    # ajv's strict mode wants a `required` property defined beside it, in the `not` too.
    model_config = ConfigDict(json_schema_extra={"not": {
        "properties": {"expires_at": {}, "expires_in_s": {}},
        "required": ["expires_at", "expires_in_s"]}})

    type: Literal["transfer_to_escrow"]
    hold_id: Ident
    payer: Ident
    payee: Ident
    amount: Amount
    fee_rate: FeeRate | None = None
    expires_at: ExpiresAt | None = None
    expires_in_s: ExpiresInS | None = None

    @model_validator(mode="after")
    def _one_expiry(self) -> TransferToEscrow:
        if self.expires_at is not None and self.expires_in_s is not None:
            raise ValueError("expires_at and expires_in_s: name one, not both")
        return self

    @field_validator("payee")
    @classmethod
    def _distinct_users(cls, payee: str, info: ValidationInfo) -> str:
        if payee == info.data.get("payer"):
            raise ValueError("must differ from payer: a hold to oneself")
        return payee


class ReleaseFromEscrow(CommandBase):
    """Releases `amount` of a hold (absent: all that remains) to its payee, minus the fee."""

    type: Literal["release_from_escrow"]
    hold_id: Ident
    fee_rate: FeeRate | None = None
    amount: Amount | None = None


class RefundFromEscrow(CommandBase):
    type: Literal["refund_from_escrow"]
    hold_id: Ident


class ExpireHold(CommandBase):
    """Returns what remains of an expired hold to its payer (the expiry pass sends it)."""

    type: Literal["expire_hold"]
    hold_id: Ident

    @model_validator(mode="after")
    def _key_of_the_hold(self) -> ExpireHold:
        # Under the pass's prefix, only the key of its own hold: never a hold's under another's.
        if (self.idempotency_key.startswith("expire:")
                and self.idempotency_key != expiry_key(self.hold_id)):
            raise ValueError(f"an expire_hold under 'expire:' is {expiry_key(self.hold_id)!r}")
        return self


def fee_rate_needs(command: TransferToEscrow | ReleaseFromEscrow) -> frozenset[str]:
    """Naming a fee rate is an override: the rate of a hold is otherwise fixed at opening."""
    return NOTHING_MORE if command.fee_rate is None else frozenset({OVERRIDE_FEE})


def transfer_to_escrow(conn: Connection, cmd: TransferToEscrow, ctx: OperationContext) -> Effect:
    amount = ctx.minor(cmd.amount)
    fee_rate = cmd.fee_rate if cmd.fee_rate is not None else ctx.fee_rate
    try:
        expires_at = expiry_of(cmd.expires_at, cmd.expires_in_s, datetime.now(UTC))
    except ValueError as exc:  # in the past, or too far ahead: refused before anything
        raise InvalidCommandError(str(exc), hold_id=cmd.hold_id) from None
    # The hold row comes before the accounts in the lock order; a rival with the same
    # hold id waits on it here, then finds it taken.
    inserted = insert_ignoring_conflicts(
        conn,
        schema.holds,
        [{"hold_id": cmd.hold_id, "payer": cmd.payer, "payee": cmd.payee, "amount_minor": amount,
          "status": "held", "fee_rate": str(fee_rate), "opened_by": ctx.command_id,
          "released_minor": 0, "refunded_minor": 0, "expires_at": expires_at}],
        ["hold_id"],
    )
    if inserted != 1:
        raise HoldExistsError(f"hold {cmd.hold_id!r} already exists", hold_id=cmd.hold_id)
    available, escrow = user_available(cmd.payer), user_escrow(cmd.payer)
    t, locked = move(conn, ctx, available, escrow, amount, "hold", {escrow.code})
    result = {"hold_id": cmd.hold_id, "payer": cmd.payer, "payee": cmd.payee,
              "amount": ctx.fmt(amount), "fee_rate": str(fee_rate),
              "available": ctx.fmt(locked[available.code].balance_minor)}
    if expires_at is not None:
        result["expires_at"] = expires_at.isoformat()
    return Effect(result, [t])


# One constant statement (prepared once per connection) whatever the number of holds; an
# IN list of bound values would be compiled and planned afresh for every batch size.
_LOCK_HOLDS = text(
    "SELECT id, hold_id, payer, payee, amount_minor, status, fee_rate, fee_minor, "
    "released_minor, refunded_minor, expires_at FROM holds "
    "WHERE hold_id IN (SELECT unnest(CAST(:ids AS TEXT[]))) ORDER BY id FOR UPDATE")


def lock_holds(conn: Connection, hold_ids: list[str]) -> dict[str, _HoldState]:
    """Lock these holds (those that exist), in id order: a batch takes them before any
    account, as a single command does. The transaction's book keeps them (a release reads
    its hold from there)."""
    if conn.dialect.name == "postgresql":
        rows = execute_reusable(conn, _LOCK_HOLDS, {"ids": pg_array(hold_ids)}).all()
    else:
        h = schema.holds
        rows = conn.execute(select(h).where(h.c.hold_id.in_(hold_ids)).order_by(h.c.id)
                            .with_for_update()).all()
    holds = {row.hold_id: _state(row) for row in rows}
    for hold_id, hold in holds.items():
        keep(conn, "holds", hold_id, hold)
    return holds


def hold_footprint(cmd: TransferToEscrow) -> Footprint:
    escrow = user_escrow(cmd.payer)
    return Footprint((user_available(cmd.payer), escrow), frozenset({escrow.code}),
                     hold_id=cmd.hold_id)


def _release_accounts(hold: Any) -> Footprint:
    payee = user_available(hold.payee)
    return Footprint((user_escrow(hold.payer), payee, FEES), frozenset({payee.code, FEES.code}))


def _refund_accounts(hold: Any) -> Footprint:
    return Footprint((user_escrow(hold.payer), user_available(hold.payer)))


def release_footprint(cmd: ReleaseFromEscrow) -> Footprint:
    return Footprint(hold_id=cmd.hold_id, hold_accounts=_release_accounts)


def refund_footprint(cmd: RefundFromEscrow) -> Footprint:
    return Footprint(hold_id=cmd.hold_id, hold_accounts=_refund_accounts)


def expire_footprint(cmd: ExpireHold) -> Footprint:
    return Footprint(hold_id=cmd.hold_id, hold_accounts=_refund_accounts)


@dataclass(frozen=True)
class _HoldState:
    """What a batch knows of a hold it changed and has not written yet (the flush writes it)."""

    id: int
    hold_id: str
    payer: str
    payee: str
    amount_minor: int
    status: str
    fee_rate: str | None
    fee_minor: int | None
    released_minor: int
    refunded_minor: int
    expires_at: datetime | None
    closed_by: int | None = None
    closed_at: datetime | None = None


def _state(row: Any) -> _HoldState:
    return _HoldState(row.id, row.hold_id, row.payer, row.payee, row.amount_minor, row.status,
                      row.fee_rate, row.fee_minor, row.released_minor, row.refunded_minor,
                      row.expires_at)


# The holds a batch changed, in one statement at its flush, each as it ends up; guarded
# as a single write is, by the totals read under the lock when the batch took it.
_WRITE_HOLDS = text(
    "UPDATE holds SET released_minor = v.released, refunded_minor = v.refunded, "
    "fee_minor = v.fee, status = v.status, closed_by = v.closed_by, closed_at = v.closed_at "
    "FROM unnest(CAST(:ids AS BIGINT[]), CAST(:released AS BIGINT[]), "
    "CAST(:refunded AS BIGINT[]), CAST(:fees AS BIGINT[]), CAST(:statuses AS TEXT[]), "
    "CAST(:closed_by AS BIGINT[]), CAST(:closed_at AS TIMESTAMPTZ[]), "
    "CAST(:were_released AS BIGINT[]), CAST(:were_refunded AS BIGINT[]), "
    "CAST(:were AS TEXT[])) "
    "AS v(id, released, refunded, fee, status, closed_by, closed_at, were_released, "
    "were_refunded, was) "
    "WHERE holds.id = v.id AND holds.status = v.was "
    "AND holds.released_minor = v.were_released AND holds.refunded_minor = v.were_refunded")
_CHANGED = ("holds", "changed by this batch")


def _defer_hold_write(conn: Connection, before: _HoldState) -> None:
    """Remember the hold's totals as the batch locked them (its first change only), and
    have the flush write every changed hold in one statement. Both live in the book, so
    a command the batch refuses takes its changes back with the rest of its writes."""
    changed: dict[str, tuple[int, int]] | None = kept(conn, *_CHANGED)
    if changed is None:
        changed = {}
        defer(conn, Deferred(lambda: _holds_pending(conn)))
    if before.hold_id not in changed:
        # Copied, never changed in place: the book's marks keep the dict as it was.
        changed = {**changed, before.hold_id: (before.released_minor, before.refunded_minor)}
    keep(conn, *_CHANGED, changed)


def _holds_pending(conn: Connection) -> Pending | None:
    changed: dict[str, tuple[int, int]] | None = kept(conn, *_CHANGED)
    if not changed:
        return None
    holds = [kept(conn, "holds", hold_id) for hold_id in changed]
    return Pending(_WRITE_HOLDS, {
        "ids": pg_array([h.id for h in holds]),
        "released": pg_array([h.released_minor for h in holds]),
        "refunded": pg_array([h.refunded_minor for h in holds]),
        "fees": pg_array([h.fee_minor for h in holds]),
        "statuses": pg_array([h.status for h in holds]),
        "closed_by": pg_array([h.closed_by for h in holds]),
        "closed_at": pg_array([None if h.closed_at is None else h.closed_at.isoformat()
                               for h in holds]),
        "were_released": pg_array([was[0] for was in changed.values()]),
        "were_refunded": pg_array([was[1] for was in changed.values()]),
        # 'held' as a column, not a constant: a constant would let the plan PostgreSQL
        # keeps for this statement scan the holds by status, once per hold written.
        "were": pg_array(["held"] * len(holds)),
    }, reusable=True)


def _lock_hold(conn: Connection, hold_id: str) -> _HoldState:
    """The hold as this transaction's batch keeps it (lock_holds, _write_hold), or locked now."""
    hold: _HoldState | None = kept(conn, "holds", hold_id)
    if hold is not None:
        return hold
    h = schema.holds
    row = conn.execute(select(h).where(h.c.hold_id == hold_id).with_for_update()).one_or_none()
    if row is None:
        raise UnknownHoldError(f"no hold {hold_id!r}", hold_id=hold_id)
    return _state(row)


def _lock_open_hold(conn: Connection, hold_id: str) -> _HoldState:
    hold = _lock_hold(conn, hold_id)
    if hold.status != "held":
        raise HoldNotOpenError(f"hold {hold_id!r} is already {hold.status}", hold_id=hold_id)
    return hold


def _write_hold(conn: Connection, hold: _HoldState, ctx: OperationContext, *,
                released_minor: int, refunded_minor: int, fee_minor: int | None,
                closed_as: str) -> None:
    """The hold's new totals; `closed_as` is its status once nothing remains."""
    h = schema.holds
    remaining = remaining_of(hold.amount_minor, released_minor, refunded_minor)
    status = "held" if remaining else closed_as
    values: dict[str, Any] = {"released_minor": released_minor, "refunded_minor": refunded_minor,
                              "fee_minor": fee_minor, "status": status}
    if not remaining:
        values.update(closed_by=ctx.command_id, closed_at=datetime.now(UTC))
    # Under the hold's lock, from the totals read under it: a write that finds other totals
    # is a bug (a second writer), never a race.
    def statement() -> Any:
        return update(h).where(h.c.id == hold.id, h.c.status == "held",
                               h.c.released_minor == hold.released_minor,
                               h.c.refunded_minor == hold.refunded_minor).values(values)

    if kept(conn, "holds", hold.hold_id) is not None:
        # Locked by this transaction's batch: written with its flush (on PostgreSQL with
        # every other hold it changed, in one statement), and changed for the rest of the
        # batch now (a second release of it reads the new totals).
        if conn.dialect.name == "postgresql":
            _defer_hold_write(conn, hold)
        else:
            defer(conn, Pending(statement(), {}))
        keep(conn, "holds", hold.hold_id, _HoldState(
            hold.id, hold.hold_id, hold.payer, hold.payee, hold.amount_minor, status,
            hold.fee_rate, fee_minor, released_minor, refunded_minor, hold.expires_at,
            values.get("closed_by"), values.get("closed_at")))
        return
    done = conn.execute(statement())
    if done.rowcount != 1:
        raise EscrowIntegrityError(f"hold {hold.hold_id!r} changed under its lock")


def _rate_of(hold: Any, ctx: OperationContext) -> Decimal:
    """The rate fixed when the hold opened; a hold opened before migration 0004 has none
    stored and takes the deployment's rate, as it always did."""
    return Decimal(hold.fee_rate) if hold.fee_rate is not None else ctx.fee_rate


def hold_view(hold: Any, ctx: OperationContext) -> dict[str, Any]:
    """A hold's totals as the results and the reads show them."""
    remaining = remaining_of(hold.amount_minor, hold.released_minor, hold.refunded_minor)
    return {"status": hold.status, "hold_amount": ctx.fmt(hold.amount_minor),
            "released": ctx.fmt(hold.released_minor),
            "refunded": ctx.fmt(hold.refunded_minor), "remaining": ctx.fmt(remaining)}


def release_from_escrow(
    conn: Connection, cmd: ReleaseFromEscrow, ctx: OperationContext
) -> Effect:
    hold = _lock_hold(conn, cmd.hold_id)
    if hold.status == "expired" or (hold.status == "held" and is_expired(hold.expires_at,
                                                                          datetime.now(UTC))):
        raise HoldExpiredError(f"hold {hold.hold_id!r} expired at {_iso(hold.expires_at)}",
                               hold_id=hold.hold_id)
    if hold.status != "held":
        raise HoldNotOpenError(f"hold {hold.hold_id!r} is already {hold.status}",
                               hold_id=hold.hold_id)
    fee_rate = cmd.fee_rate if cmd.fee_rate is not None else _rate_of(hold, ctx)
    remaining = remaining_of(hold.amount_minor, hold.released_minor, hold.refunded_minor)
    part = None if cmd.amount is None else ctx.minor(cmd.amount)
    plan = plan_release(remaining, part, fee_rate)
    if plan is None:
        raise HoldExceededError(f"release of {ctx.fmt(part or 0)} exceeds the "
                                f"{ctx.fmt(remaining)} that remains of hold {hold.hold_id!r}",
                                hold_id=hold.hold_id)
    escrow, payee = user_escrow(hold.payer), user_available(hold.payee)
    locked = lock_accounts(conn, [escrow, payee, FEES], open_missing={payee.code, FEES.code})
    transfers = []
    if plan.payee_minor:
        transfers.append(make_transfer(locked[escrow.code], locked[payee.code], plan.payee_minor,
                                       "release"))
    if plan.fee_minor:
        transfers.append(make_transfer(locked[escrow.code], locked[FEES.code], plan.fee_minor,
                                       "fee"))
    post_transfers(conn, ctx.command_id, transfers)
    released = hold.released_minor + plan.part_minor
    fee_total = (hold.fee_minor or 0) + plan.fee_minor
    _write_hold(conn, hold, ctx, released_minor=released, refunded_minor=hold.refunded_minor,
                fee_minor=fee_total, closed_as="released")
    after = _HoldState(hold.id, hold.hold_id, hold.payer, hold.payee, hold.amount_minor,
                       "held" if plan.remaining_minor else "released", hold.fee_rate, fee_total,
                       released, hold.refunded_minor, hold.expires_at)
    return Effect({"hold_id": hold.hold_id, "payer": hold.payer, "payee": hold.payee,
                   "amount": ctx.fmt(plan.part_minor), "payee_amount": ctx.fmt(plan.payee_minor),
                   "fee": ctx.fmt(plan.fee_minor), "fee_rate": str(fee_rate),
                   **hold_view(after, ctx)}, transfers)


def _return_rest(conn: Connection, hold: _HoldState, ctx: OperationContext, kind: str,
                 closed_as: str) -> Effect:
    """A refund or an expiry: what remains goes back to the payer, and the hold closes."""
    remaining = remaining_of(hold.amount_minor, hold.released_minor, hold.refunded_minor)
    escrow, payer = user_escrow(hold.payer), user_available(hold.payer)
    t, _ = move(conn, ctx, escrow, payer, remaining, kind, ())
    refunded = hold.refunded_minor + remaining
    _write_hold(conn, hold, ctx, released_minor=hold.released_minor, refunded_minor=refunded,
                fee_minor=hold.fee_minor, closed_as=closed_as)
    after = _HoldState(hold.id, hold.hold_id, hold.payer, hold.payee, hold.amount_minor,
                       closed_as, hold.fee_rate, hold.fee_minor, hold.released_minor, refunded,
                       hold.expires_at)
    return Effect({"hold_id": hold.hold_id, "payer": hold.payer, "amount": ctx.fmt(remaining),
                   **hold_view(after, ctx)}, [t])


def refund_from_escrow(conn: Connection, cmd: RefundFromEscrow, ctx: OperationContext) -> Effect:
    """Returns what remains (all of it, or the rest of a partly released hold); allowed
    after expiry too: the payer gets the rest either way, and the expiry finds it closed."""
    return _return_rest(conn, _lock_open_hold(conn, cmd.hold_id), ctx, "refund", "refunded")


def expire_hold(conn: Connection, cmd: ExpireHold, ctx: OperationContext) -> Effect:
    hold = _lock_open_hold(conn, cmd.hold_id)
    if not is_expired(hold.expires_at, datetime.now(UTC)):
        when = "has no expiry" if hold.expires_at is None else f"expires at {_iso(hold.expires_at)}"
        raise HoldNotExpiredError(f"hold {hold.hold_id!r} {when}", hold_id=hold.hold_id)
    return _return_rest(conn, hold, ctx, "expiry", "expired")


def _iso(moment: datetime | None) -> str:
    return "never" if moment is None else as_utc(moment).isoformat()


def expiry_key(hold_id: str) -> str:
    """The expiry command's idempotency key, derived from the hold: `expire:<hold_id>`
    (a hold id too long for that takes `expire:sha256:<hex of the id>`)."""
    key = f"expire:{hold_id}"
    if len(key) <= 200:
        return key
    return "expire:sha256:" + hashlib.sha256(hold_id.encode()).hexdigest()


# What verify expects; a hold's totals are held against these transfers by verify's hold
# check (services.verify_holds).
def release_transfers(facts: TransferFacts) -> str | None:
    """The payee's part, and the fee's unless it rounds to zero (or the payee's does); a
    release that names its amount moves exactly that."""
    named = facts.payload.get("amount")
    if facts.count in (1, 2) and (named is None or
                                  _minor_of(named, facts.scale) == facts.total_minor):
        return None
    return f"{facts.count} transfers of {facts.total_minor} minor units"


def _minor_of(amount: str, scale: int) -> int:
    return to_minor(Decimal(amount), scale)


def refund_transfers(facts: TransferFacts) -> str | None:
    return None if facts.count == 1 else f"{facts.count} transfers of {facts.total_minor} minor units"


expire_transfers = refund_transfers
