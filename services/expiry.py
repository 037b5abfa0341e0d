"""The expiry pass: expired open holds get an `expire_hold` command each.

Beat runs it every WALLETQ_EXPIRY_INTERVAL_S (tasks/expiry.py); `walletq expire-holds` runs
it once. Each expired hold gets a command of its own, signed as the system producer (role
`system`, services.producer_identity.system_signer_for), with the key derived from the hold
(`expire:<hold_id>`): a second pass, or two passes at once, submit the same command, which
runs once; it leaves its command row and audit row like any other. Bounded: at most
`batches_max` batches of `batch_max` holds per run, in id order. A batch is named by
`SELECT ... FOR UPDATE SKIP LOCKED` (PostgreSQL; SQLite has no row locks): a hold whose row
another transaction holds (a release under way) is left to the next run, never waited for.
The command itself decides under the hold's lock: a release that got there first leaves
nothing to expire (hold_not_open), or the expiry wins and a later release is refused
(hold_expired). docs/ARCHITECTURE.md, "Holds: partial capture and expiry".
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, not_, select
from sqlalchemy.engine import Connection, Engine

from services import schema
from services.command_status import CommandStatus
from services.errors import BusinessRuleError
from services.ledger_accounts import TAKES_NO_CREDIT
from services.operations.escrow import expiry_key
from services.settings import Settings
from services.signing import Signer
from services.unit_of_work import run_transaction
from services.wallet_service import WalletService

__all__ = ["ExpiryCounts", "run_once", "expired_holds", "waiting_holds", "BATCHES_MAX"]

log = logging.getLogger("walletq.expiry")

#: Batches per run: a larger backlog waits for the next run (beat's interval).
BATCHES_MAX = 20


@dataclass
class ExpiryCounts:
    found: int = 0
    #: Expiry commands that ended succeeded (two passes at once may both count one: the
    #: second gets the stored outcome of the first's command).
    expired: int = 0
    already: int = 0  # an expiry command for the hold exists already (it ran, or runs)
    waiting: int = 0  # its payer's wallet takes no credit now (frozen for both, closed)
    refused: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    elapsed_s: float = 0.0
    producer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _expired(now: datetime) -> Any:
    """Open holds expired at `now`, joined to their payer's wallet: one that takes no credit
    now (frozen for everything, or closed) would refuse the expiry, and its key, once
    taken, would never be tried again."""
    h, a = schema.holds, schema.accounts
    return (select(h.c.id, h.c.hold_id)
            .select_from(h.outerjoin(a, a.c.code == "user:" + h.c.payer + ":available"))
            .where(h.c.status == "held", h.c.expires_at.is_not(None), h.c.expires_at <= now))


def expired_holds(conn: Connection, now: datetime, after_id: int, limit: int) -> list[tuple[int, str]]:
    """(id, hold_id) of open holds expired at `now` whose payer's wallet takes credit, past
    `after_id`, in id order; those another transaction holds are skipped. Holds left waiting
    for a wallet to thaw are not among them: however many, they never fill a batch."""
    rows = conn.execute(
        _expired(now).where(schema.holds.c.id > after_id,
                            not_(func.coalesce(TAKES_NO_CREDIT, False)))
        .order_by(schema.holds.c.id).limit(limit)
        .with_for_update(skip_locked=True, of=schema.holds)
    ).all()
    return [(row.id, row.hold_id) for row in rows]


def waiting_holds(conn: Connection, now: datetime) -> int:
    """Expired open holds the pass leaves until their payer's wallet takes credit again."""
    counted = select(func.count()).select_from(
        _expired(now).where(func.coalesce(TAKES_NO_CREDIT, False)).subquery())
    return int(conn.execute(counted).scalar_one())


def _keys_taken(conn: Connection, keys: list[str]) -> set[str]:
    c = schema.commands
    return set(conn.execute(select(c.c.idempotency_key)
                            .where(c.c.idempotency_key.in_(keys))).scalars())


def run_once(engine: Engine, settings: Settings, signer: Signer | None, *,
             now: datetime | None = None, batch_max: int | None = None,
             batches_max: int = BATCHES_MAX) -> ExpiryCounts:
    """Expire what has expired by `now` (default: now); returns what it found and did.
    With no signer (a server without the system producer's key) it does nothing, loudly."""
    counts = ExpiryCounts(producer=None if signer is None else signer.producer)
    if signer is None:
        log.warning("expiry: no system producer key (%s); no hold expires until one is made: "
                    "walletq producer create %s --role system", settings.system_producer_key_file,
                    settings.system_producer)
        return counts
    now = now or datetime.now(UTC)
    batch_max = batch_max or settings.expiry_batch_max
    service = WalletService(engine, settings, signer=signer)
    started, after_id = time.perf_counter(), 0
    for _ in range(batches_max):
        def claim(conn: Connection, after: int = after_id) -> tuple[list[tuple[int, str]], set[str]]:
            batch = expired_holds(conn, now, after, batch_max)
            return batch, _keys_taken(conn, [expiry_key(h) for _, h in batch]) if batch else set()

        batch, taken = run_transaction(engine, settings, "expiry claim", claim)
        counts.batches += 1
        counts.found += len(batch)
        for row_id, hold_id in batch:
            after_id = row_id
            key = expiry_key(hold_id)
            if key in taken:
                counts.already += 1
                continue
            _expire_one(service, counts, hold_id, key)
        if len(batch) < batch_max:
            break
    with engine.connect() as conn:
        counts.waiting = waiting_holds(conn, now)
    counts.elapsed_s = round(time.perf_counter() - started, 3)
    if counts.found or counts.waiting:
        log.info("expiry: %s", counts.to_dict())
    return counts


def _expire_one(service: WalletService, counts: ExpiryCounts, hold_id: str, key: str) -> None:
    try:
        record = service.execute({"type": "expire_hold", "idempotency_key": key,
                                  "hold_id": hold_id})
    except BusinessRuleError as exc:  # refused at admission (the producer's role, its key)
        counts.refused[exc.code] = counts.refused.get(exc.code, 0) + 1
        log.warning("expiry: %s refused: %s", key, exc.message)
        return
    if record.status == CommandStatus.SUCCEEDED:
        counts.expired += 1
    else:
        code = (record.error or {}).get("code", record.status)
        counts.refused[code] = counts.refused.get(code, 0) + 1
