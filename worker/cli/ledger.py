"""Ledger commands: schema, reads, verify, and the command schema for producers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import click
from sqlalchemy import text

from services import db_roles
from services.commands import CommandLimits, command_json_schema
from services.db import get_engine, upgrade
from services.db_roles import RoleKind
from services.settings import get_settings
from services.verify import verify_ledger
from services.wallet_service import WalletService
from worker.cli.base import Output, cli, ensure_schema, json_option, pass_output
from worker.cli.lifecycle import Moment, balances_at


@cli.group()
def db() -> None:
    """The database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@json_option
@pass_output
def db_upgrade(out: Output, revision: str) -> None:
    """Create or upgrade the schema."""
    settings = get_settings()
    upgrade(settings, revision)
    where = settings.database_url.split("@")[-1]
    if out.as_json:
        out.json({"ok": True, "revision": revision, "database": where})
    else:
        out.say(f"schema at {revision}: {where}")


@db.command("roles")
@click.option("--passwords", "password_dir", type=click.Path(file_okay=False, exists=True),
              help="a folder holding one file per role, named as the role (walletq_worker, ...)")
@json_option
@pass_output
def db_roles_(out: Output, password_dir: str | None) -> None:
    """Create (idempotently) the owner, worker, producer and readonly roles of this
    database and apply their grants. Run once, as a superuser; then migrate as the owner."""
    settings = get_settings()
    if not settings.is_postgres:
        out.fail("database roles exist on PostgreSQL only (WALLETQ_DATABASE_URL)", 2, "invalid_settings")
    engine = get_engine(settings)
    with engine.begin() as conn:
        database = conn.execute(text("SELECT current_database()")).scalar_one()
        names = db_roles.role_names(database)
        passwords = _read_passwords(out, password_dir, names) if password_dir else None
        created = db_roles.create_roles(conn, passwords)
    rows = [{"kind": kind, "role": name, "created": name in created,
             "password": bool(passwords and kind in passwords)} for kind, name in names.items()]
    if out.as_json:
        out.json({"ok": True, "database": database, "roles": rows})
    else:
        out.table(f"roles of {database}", ["kind", "role", "created", "password set"],
                  [[r["kind"], r["role"], r["created"], r["password"]] for r in rows])


def _read_passwords(out: Output, folder: str, names: Mapping[RoleKind, str]) -> dict[RoleKind, str]:
    """One file per role, named as the role (a Docker secret's file): its one line."""
    passwords: dict[RoleKind, str] = {}
    for kind, name in names.items():
        path = Path(folder) / name
        if not path.is_file():
            out.fail(f"{path} is missing: every role needs its password file", 2, "invalid_settings")
        password = path.read_text(encoding="utf-8").removesuffix("\n")
        if not password or "\n" in password:
            out.fail(f"{path} must hold one password on one line", 2, "invalid_settings")
        passwords[kind] = password
    return passwords


@cli.command()
@click.argument("user")
@click.option("--at", "moment", type=Moment(),
              help="as of this time (ISO 8601; UTC without an offset)")
@json_option
@pass_output
def balance(out: Output, user: str, moment: datetime | None) -> None:
    """A user's available and escrow balances (now, or --at a moment)."""
    settings = get_settings()
    ensure_schema(settings)
    if moment is not None:
        then = balances_at(user, moment)
        if out.as_json:
            out.json(then)
        else:
            out.table(f"at {then['at']}", ["user", "available", "escrow"],
                      [[user, then["available"], then["escrow"]]], right=["available", "escrow"])
        return
    result = WalletService(settings=settings).balance(user)
    if out.as_json:
        out.json(result.to_dict())
    else:
        out.table(None, ["user", "available", "escrow"],
                  [[user, result.available, result.escrow]], right=["available", "escrow"])


@cli.command()
@json_option
@pass_output
def balances(out: Output) -> None:
    """Every account and its balance."""
    settings = get_settings()
    ensure_schema(settings)
    rows = WalletService(settings=settings).balances()
    if out.as_json:
        for row in rows:
            out.json(row)
        return
    out.table("balances", ["account", "balance"],
              [[r["account"], r["balance"]] for r in rows], right=["balance"])


@cli.command()
@click.argument("account")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@json_option
@pass_output
def history(out: Output, account: str, limit: int) -> None:
    """An account's transfers, newest first (ACCOUNT is a code, or a user's name)."""
    settings = get_settings()
    ensure_schema(settings)
    code = account if ":" in account else f"user:{account}:available"
    rows = WalletService(settings=settings).history(code, limit)
    if out.as_json:
        for row in rows:
            out.json(row)
        return
    out.table(f"history of {code}",
              ["at", "kind", "amount", "debit", "credit", "command", "balance"],
              [[r["at"], r["kind"], r["amount"], r["debit"], r["credit"], r["idempotency_key"],
                r["balance_after"]] for r in rows], right=["amount", "balance"])


@cli.command()
@json_option
@pass_output
def verify(out: Output) -> None:
    """Check every ledger invariant; exit 1 naming what fails."""
    settings = get_settings()
    ensure_schema(settings)
    checks = verify_ledger(get_engine(settings), settings.asset_scale)
    ok = all(check.ok for check in checks)
    if out.as_json:
        out.json({"ok": ok, "checks": [check.to_dict() for check in checks]})
    else:
        out.table("ledger invariants", ["check", "ok", "detail"],
                  [[c.name, "ok" if c.ok else "FAILED", c.detail] for c in checks])
        out.say("all invariants hold" if ok else "invariants broken", "green" if ok else "red")
    if not ok:
        raise SystemExit(1)


@cli.command("schema")
@json_option
@pass_output
def schema_(out: Output) -> None:
    """Print the JSON Schema of the commands, for producers in other languages (always JSON):
    its amounts and payout sizes follow this deployment's WALLETQ_* limits."""
    limits = CommandLimits.from_settings(get_settings())
    click.echo(json.dumps(command_json_schema(limits), indent=2))
