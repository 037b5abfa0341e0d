"""Hold commands: `walletq holds` lists holds, `walletq expire-holds` runs one expiry pass."""

from __future__ import annotations

import click

from services import expiry
from services.db import get_engine
from services.producer_identity import system_signer_for
from services.settings import get_settings
from services.wallet_service import WalletService
from worker.cli.base import Output, cli, ensure_schema, json_option, pass_output

__all__ = ["holds", "expire_holds"]

STATUSES = ("held", "released", "refunded", "expired")


@cli.command("holds")
@click.option("--user", help="holds this user pays or is paid by")
@click.option("--status", type=click.Choice(STATUSES))
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@json_option
@pass_output
def holds(out: Output, user: str | None, status: str | None, limit: int) -> None:
    """Holds, newest first: amount, released, refunded, remaining, expiry."""
    settings = get_settings()
    ensure_schema(settings)
    rows = WalletService(settings=settings).holds(user=user, status=status, limit=limit)
    if out.as_json:
        out.json(rows)
        return
    columns = ["hold_id", "payer", "payee", "status", "amount", "released", "refunded",
               "remaining", "fee", "expires_at"]
    out.table("holds", columns, [[row[c] for c in columns] for row in rows],
              right=["amount", "released", "refunded", "remaining", "fee"])


@cli.command("expire-holds")
@click.option("--batch-max", type=click.IntRange(1, 10_000), default=None,
              help="holds per batch (default WALLETQ_EXPIRY_BATCH_MAX)")
@json_option
@pass_output
def expire_holds(out: Output, batch_max: int | None) -> None:
    """Run one expiry pass now: each expired open hold gets its expire_hold command,
    signed as the system producer (WALLETQ_SYSTEM_PRODUCER)."""
    settings = get_settings()
    ensure_schema(settings)
    engine = get_engine(settings)
    signer = system_signer_for(settings, engine)
    if signer is None:
        out.fail(f"no key for the system producer {settings.system_producer!r} at "
                 f"{settings.system_producer_key_file}: create it with `walletq producer create "
                 f"{settings.system_producer} --role system` and set "
                 "WALLETQ_SYSTEM_PRODUCER_KEY_FILE", 2, "invalid_settings")
    counts = expiry.run_once(engine, settings, signer, batch_max=batch_max)
    data = counts.to_dict()
    if out.as_json:
        out.json(data)
        return
    refused = ", ".join(f"{code} {n}" for code, n in sorted(counts.refused.items())) or "0"
    out.table("expire-holds", ["found", "expired", "already", "refused", "batches", "elapsed_s"],
              [[counts.found, counts.expired, counts.already, refused, counts.batches,
                counts.elapsed_s]], right=["found", "expired", "already", "batches", "elapsed_s"])
