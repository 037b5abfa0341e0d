"""Accounts through time: `statement`, and the readers `balance --at` and
`history` use (the balance each leg recorded after it; services.statements)."""

from __future__ import annotations

import csv
import os
from datetime import datetime

import click

from services import statements
from services.command_store import iso
from services.db import get_engine
from services.money import format_minor
from services.settings import get_settings
from worker.cli.base import Output, cli, ensure_schema, json_option, pass_output

__all__ = ["statement", "balances_at", "Moment"]

#: What a spreadsheet would read as a formula if a text cell began with it.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class Moment(click.ParamType):
    """An ISO 8601 time (UTC when it has no offset)."""

    name = "timestamp"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None
                ) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return statements.parse_moment(str(value))
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 time such as 2026-11-30T12:00:00Z",
                      param, ctx)


def balances_at(user: str, moment: datetime) -> dict[str, str]:
    """A user's available and escrow balances just after the last leg at or before `moment`."""
    settings = get_settings()
    engine = get_engine(settings)
    out = {"user": user, "at": moment.isoformat()}
    with engine.connect() as conn:
        for part in ("available", "escrow"):
            code = f"user:{user}:{part}"
            try:
                account = statements.account_id(conn, code)
            except Exception:
                if part == "available":
                    raise
                out[part] = format_minor(0, settings.asset_scale)
                continue
            minor = statements.balance_at(conn, account, moment)
            out[part] = format_minor(minor, settings.asset_scale)
    return out


def _cell(value: str) -> str:
    return "'" + value if value.startswith(_FORMULA_STARTS) else value


def _write_csv(path: str, result: statements.Statement, scale: int) -> None:
    """The statement as CSV (the csv module's quoting), readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that existed keeps no wider mode
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["at", "kind", "amount", "counterparty", "idempotency_key",
                         "balance_after"])
        writer.writerow([iso(result.start), "opening", "", "", "",
                         format_minor(result.opening_minor, scale)])
        for m in result.movements:
            writer.writerow([iso(m.at), _cell(m.kind), format_minor(m.amount_minor, scale),
                             _cell(m.counterparty), _cell(m.idempotency_key),
                             format_minor(m.balance_after_minor, scale)])
        writer.writerow([iso(result.end), "closing", "", "", "",
                         format_minor(result.closing_minor, scale)])


@cli.command()
@click.argument("user")
@click.option("--from", "start", required=True, type=Moment(), help="start (included)")
@click.option("--to", "end", required=True, type=Moment(), help="end (excluded)")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False),
              help="also write the statement to this CSV file (mode 0600)")
@json_option
@pass_output
def statement(out: Output, user: str, start: datetime, end: datetime,
              csv_path: str | None) -> None:
    """A user's available account from --from to --to: opening balance, each movement
    with the balance after it, closing balance (USER may also be an account code)."""
    settings = get_settings()
    ensure_schema(settings)
    code = user if ":" in user else f"user:{user}:available"
    if end <= start:
        out.fail("--to must come after --from", 2)
    with get_engine(settings).connect() as conn:
        try:
            result = statements.statement(conn, code, start, end)
        except ValueError as exc:
            out.fail(str(exc), 2)
    if not result.balanced:
        out.fail(f"the statement of {code} does not add up: run `walletq verify`", 1,
                 "internal")
    scale = settings.asset_scale
    if csv_path:
        _write_csv(csv_path, result, scale)
    if out.as_json:
        out.json({"account": code, "from": iso(start), "to": iso(end),
                  "opening": format_minor(result.opening_minor, scale),
                  "closing": format_minor(result.closing_minor, scale),
                  "movements": [{"transfer_id": m.transfer_id, "at": iso(m.at),
                                 "kind": m.kind, "amount": format_minor(m.amount_minor, scale),
                                 "counterparty": m.counterparty,
                                 "idempotency_key": m.idempotency_key,
                                 "balance_after": format_minor(m.balance_after_minor, scale)}
                                for m in result.movements]})
        return
    rows = [[iso(start), "opening", "", "", "", format_minor(result.opening_minor, scale)]]
    rows += [[iso(m.at), m.kind, format_minor(m.amount_minor, scale), m.counterparty,
              m.idempotency_key, format_minor(m.balance_after_minor, scale)]
             for m in result.movements]
    rows.append([iso(end), "closing", "", "", "", format_minor(result.closing_minor, scale)])
    out.table(f"statement of {code}", ["at", "kind", "amount", "counterparty", "command",
                                       "balance"], rows, right=["amount", "balance"])
