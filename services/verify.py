"""The ledger invariants (docs/ARCHITECTURE.md, "Invariants"), checked with plain SQL.

Each check names the accounts or commands that break it (a few, then a count). verify is
the one reader of every table at once, in one snapshot; it writes nothing. What a command
type's transfers must be comes from its registry entry (services.command_types).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from services import command_types
from services.command_status import CommandStatus
from services.operations.base import TransferFacts
from services.verify_accounts import account_checks
from services.verify_holds import escrow_problems, hold_problems
from services.verify_provenance import audit_problems, signatures_problems

__all__ = ["Check", "verify_ledger"]

_SHOWN_MAX = 10


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def _offenders(names: list[str], what: str) -> str:
    shown = ", ".join(names[:_SHOWN_MAX])
    more = f" and {len(names) - _SHOWN_MAX} more" if len(names) > _SHOWN_MAX else ""
    return f"{len(names)} {what}: {shown}{more}"


def _sum_zero(conn: Connection) -> Check:
    total = conn.execute(text("SELECT COALESCE(SUM(balance_minor), 0) FROM accounts")).scalar_one()
    return Check("sum_of_balances_is_zero", total == 0, f"sum of all balances = {total} minor units")


def _no_negative(conn: Connection) -> Check:
    rows = conn.execute(text(
        "SELECT code, balance_minor FROM accounts WHERE NOT may_go_negative"
        " AND balance_minor < -overdraft_limit_minor ORDER BY code")).all()  # 0 but overdrafts
    names = [f"{code} ({minor})" for code, minor in rows]
    return Check("no_forbidden_negative_balance", not rows,
                 _offenders(names, "accounts below zero") if rows else "no account below zero")


def _balances_match_transfers(conn: Connection) -> Check:
    rows = conn.execute(text("""
        SELECT a.code, a.balance_minor, COALESCE(cr.total, 0) - COALESCE(dr.total, 0) AS derived
        FROM accounts a
        LEFT JOIN (SELECT credit_account_id AS id, SUM(amount_minor) AS total FROM transfers
                   GROUP BY credit_account_id) cr ON cr.id = a.id
        LEFT JOIN (SELECT debit_account_id AS id, SUM(amount_minor) AS total FROM transfers
                   GROUP BY debit_account_id) dr ON dr.id = a.id
        WHERE a.balance_minor <> COALESCE(cr.total, 0) - COALESCE(dr.total, 0)
        ORDER BY a.code""")).all()
    count = conn.execute(text("SELECT COUNT(*) FROM accounts")).scalar_one()
    names = [f"{code} (balance {bal}, transfers {derived})" for code, bal, derived in rows]
    return Check("balance_equals_transfers", not rows,
                 _offenders(names, "accounts disagree") if rows
                 else f"{count} accounts agree with their transfers")


def _escrow_matches_holds(conn: Connection) -> Check:
    names = escrow_problems(conn)  # what remains of open holds: services.verify_holds
    return Check("escrow_equals_open_holds", not names,
                 _offenders(names, "users disagree") if names
                 else "every escrow balance equals what remains of its open holds")


def _commands_have_their_transfers(conn: Connection, scale: int) -> Check:
    rows = conn.execute(text("""
        SELECT c.id, c.idempotency_key, c.type, c.status, c.payload,
               COALESCE(x.n, 0), COALESCE(x.s, 0)
        FROM commands c
        LEFT JOIN (SELECT command_id, COUNT(*) AS n, SUM(amount_minor) AS s FROM transfers
                   GROUP BY command_id) x ON x.command_id = c.id
        ORDER BY c.id""")).yield_per(5_000)
    names, total = [], 0
    for command_id, key, type_, status, payload, n, s in rows:
        total += 1
        entry = command_types.BY_NAME.get(type_)
        if entry is not None and (entry.is_batch or status == CommandStatus.SUCCEEDED):
            # A batch's check covers every status: a running batch has paid some items.
            problem = _implied(entry, TransferFacts, conn, command_id, status, payload, n, s,
                               scale)
        elif status == CommandStatus.SUCCEEDED:
            problem = f"a succeeded command of unknown type {type_!r}"
        else:
            problem = f"{n} transfers" if n else None
        if problem:
            names.append(f"{key} ({type_} {status}: {problem})")
    return Check("commands_have_their_transfers", not names,
                 _offenders(names, "commands disagree") if names
                 else f"{total} commands have exactly the transfers their outcome implies")


def _implied(entry: Any, facts: Any, conn: Connection, *args: Any) -> str | None:
    """A command's own rule; a row it cannot read (a payload that is not JSON, a field of the
    wrong kind, written by hand) is reported, never a crash of verify."""
    command_id, status, payload, n, s, scale = args
    try:
        problem: str | None = entry.implied_transfers(
            facts(conn, command_id, status, json.loads(payload), n, s, scale))
    except Exception as exc:  # noqa: BLE001 - a bad row is a finding, not a crash
        return f"unreadable row: {type(exc).__name__}: {str(exc)[:200]}"
    return problem


def _keys_unique(conn: Connection) -> Check:
    rows = conn.execute(text(
        "SELECT idempotency_key, COUNT(*) FROM commands GROUP BY idempotency_key"
        " HAVING COUNT(*) > 1")).all()
    names = [f"{key} ({n} times)" for key, n in rows]
    return Check("idempotency_keys_unique", not rows,
                 _offenders(names, "keys repeated") if rows else "every key exists once")


def _signed(conn: Connection, scale: int) -> Check:
    names, checked = signatures_problems(conn, scale)
    return Check("commands_are_signed", not names,
                 _offenders(names, "commands moved money unsigned or unauthorized") if names
                 else f"{checked} commands that moved money are signed by a producer allowed to")


def _audited(conn: Connection) -> Check:
    names, checked = audit_problems(conn)
    return Check("commands_have_their_audit", not names,
                 _offenders(names, "commands disagree with their audit") if names
                 else f"{checked} ended commands match their audit rows")


def _holds_add_up(conn: Connection) -> Check:
    names, checked = hold_problems(conn)
    return Check("holds_add_up", not names,
                 _offenders(names, "holds do not add up") if names
                 else f"{checked} holds: amount = released + refunded + remaining, each "
                      "matching its transfers")


def verify_ledger(engine: Engine, scale: int) -> list[Check]:
    """Run every check in one repeatable-read snapshot, so they see one state of the ledger."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            checks = [_guarded(conn, name, check) for name, check in (
                ("sum_of_balances_is_zero", _sum_zero),
                ("no_forbidden_negative_balance", _no_negative),
                ("balance_equals_transfers", _balances_match_transfers),
                ("escrow_equals_open_holds", _escrow_matches_holds),
                ("commands_have_their_transfers",
                 lambda c: _commands_have_their_transfers(c, scale)),
                ("idempotency_keys_unique", _keys_unique),
                ("commands_are_signed", lambda c: _signed(c, scale)),
                ("commands_have_their_audit", _audited),
                ("holds_add_up", _holds_add_up),
            )]
            try:
                checks += [Check(*found) for found in account_checks(conn)]
            except Exception as exc:  # noqa: BLE001 - reported, as _guarded does
                checks.append(Check("account_checks", False,
                                    f"could not check: {type(exc).__name__}: {str(exc)[:300]}"))
            return checks


def _guarded(conn: Connection, name: str, check: Callable[[Connection], Check]) -> Check:
    """One check: one that cannot run on some row fails, naming why, and the others still run
    (verify reports a bad row; it never crashes on one). A database error aborts the
    snapshot's transaction on PostgreSQL: the checks after it then say so too."""
    try:
        return check(conn)
    except Exception as exc:  # noqa: BLE001 - reported as the check's failure
        return Check(name, False, f"could not check: {type(exc).__name__}: {str(exc)[:300]}")
