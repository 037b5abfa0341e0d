"""The invariants of accounts' lives: limits, freezes, closing, reversals, and the
balance recorded after each leg (docs/ARCHITECTURE.md, "Invariants" 9-12).

Plain SQL, inside verify's one repeatable-read snapshot; each check names its offenders.
Legs and account events are ordered by transfer id: an event records the account's last
transfer when it happened (`account_events.transfer_id_max`).
"""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import text
from sqlalchemy.engine import Connection

from services.operations.reversal import reversal_target

__all__ = ["account_checks"]

_SHOWN_MAX = 10

# Every leg of every transfer, as (account, transfer id, side, delta, balance after).
_LEGS = """
    SELECT debit_account_id AS account_id, id, 0 AS side, -amount_minor AS delta,
           debit_balance_after_minor AS after, created_at FROM transfers
    UNION ALL
    SELECT credit_account_id, id, 1, amount_minor, credit_balance_after_minor, created_at
    FROM transfers"""


def _offenders(names: list[str], what: str) -> str:
    shown = ", ".join(names[:_SHOWN_MAX])
    more = f" and {len(names) - _SHOWN_MAX} more" if len(names) > _SHOWN_MAX else ""
    return f"{len(names)} {what}: {shown}{more}"


def _chain(conn: Connection) -> tuple[bool, str]:
    """Each leg's balance after = the account's previous one + the leg; the last = its
    balance. (So a statement's opening + its movements = its closing.)"""
    broken = conn.execute(text(f"""
        WITH legs AS ({_LEGS}),
        chain AS (SELECT account_id, id, delta, after,
                         LAG(after) OVER (PARTITION BY account_id ORDER BY id, side) AS prev,
                         ROW_NUMBER() OVER (PARTITION BY account_id ORDER BY id DESC, side DESC)
                           AS back
                  FROM legs)
        SELECT a.code, c.id, c.after, COALESCE(c.prev, 0) + c.delta, c.back, a.balance_minor
        FROM chain c JOIN accounts a ON a.id = c.account_id
        WHERE c.after IS NULL OR c.after <> COALESCE(c.prev, 0) + c.delta
           OR (c.back = 1 AND c.after <> a.balance_minor)
        ORDER BY a.code, c.id""")).all()
    names = [f"{code} transfer {tid} (after {after}, expected {expected}"
             + (f", balance {balance})" if back == 1 else ")")
             for code, tid, after, expected, back, balance in broken]
    return (not broken, _offenders(names, "legs break the running balance") if broken
            else "every leg's balance after follows from the one before it")


def _limits(conn: Connection) -> tuple[bool, str]:
    """No leg took an account below the largest overdraft limit it ever had (the CHECK
    constraint holds the limit in force; this reads history)."""
    rows = conn.execute(text(f"""
        WITH legs AS ({_LEGS}),
        floor AS (SELECT a.id, a.code, GREATEST_LIMIT AS limit_minor FROM accounts a
                  LEFT JOIN (SELECT account_id, MAX(limit_minor) AS most FROM account_events
                             WHERE event = 'set_limit' GROUP BY account_id) e
                         ON e.account_id = a.id
                  WHERE NOT a.may_go_negative)
        SELECT f.code, MIN(l.after), f.limit_minor FROM legs l JOIN floor f ON f.id = l.account_id
        GROUP BY f.code, f.limit_minor HAVING MIN(l.after) < -f.limit_minor
        ORDER BY f.code""".replace(
        "GREATEST_LIMIT",
        "CASE WHEN COALESCE(e.most, 0) > a.overdraft_limit_minor THEN e.most "
        "ELSE a.overdraft_limit_minor END"))).all()
    names = [f"{code} (down to {low}, limit {limit})" for code, low, limit in rows]
    return (not rows, _offenders(names, "accounts went below their limit") if rows
            else "no leg took an account below its overdraft limit")


def _freezes(conn: Connection) -> tuple[bool, str]:
    """No debit of an account while it was frozen (no credit either, frozen for both), and
    nothing at all after it was closed."""
    rows = conn.execute(text(f"""
        WITH ev AS (SELECT account_id, event, direction, until, transfer_id_max,
                           LEAD(transfer_id_max) OVER (PARTITION BY account_id ORDER BY id)
                             AS next_max,
                           LEAD(id) OVER (PARTITION BY account_id ORDER BY id) AS next_id
                    FROM account_events WHERE event IN ('freeze', 'unfreeze', 'close')),
        legs AS ({_LEGS})
        SELECT a.code, ev.event, l.id FROM ev
        JOIN legs l ON l.account_id = ev.account_id
                   AND l.id > COALESCE(ev.transfer_id_max, 0)
                   AND (ev.next_id IS NULL OR l.id <= COALESCE(ev.next_max, 0))
        JOIN accounts a ON a.id = ev.account_id
        WHERE ev.event = 'close'
           OR (ev.event = 'freeze' AND (l.side = 0 OR ev.direction = 'both')
               AND (ev.until IS NULL OR l.created_at < ev.until))
        ORDER BY a.code, l.id""")).all()
    names = [f"{code} transfer {tid} (while {'closed' if event == 'close' else 'frozen'})"
             for code, event, tid in rows]
    return (not rows, _offenders(names, "legs moved a frozen or closed account") if rows
            else "no frozen account was debited, no closed account moved")


def _reversals(conn: Connection) -> tuple[bool, str]:
    """A reversed command and its reversal net to zero per account (a released hold's
    escrow counted as its payer's available account, where its reversal pays back)."""
    rows = conn.execute(text("""
        SELECT r.id, o.idempotency_key, o.type, o.status, c.status, c.type, a.code, x.delta
        FROM reversals r
        JOIN commands o ON o.id = r.original_command_id
        JOIN commands c ON c.id = r.command_id
        LEFT JOIN (SELECT command_id, debit_account_id AS account_id, -amount_minor AS delta
                   FROM transfers
                   UNION ALL SELECT command_id, credit_account_id, amount_minor FROM transfers
                  ) x ON x.command_id IN (r.command_id, r.original_command_id)
        LEFT JOIN accounts a ON a.id = x.account_id
        ORDER BY r.id""")).all()
    net: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    bad: set[str] = set()
    for _, key, type_, status, reversal_status, reversal_type, code, delta in rows:
        net[key]  # a reversal with no transfers at all still has its entry
        if status != "succeeded" or reversal_status != "succeeded" \
                or reversal_type != "reverse_command":
            bad.add(f"{key} ({type_} {status}, reversed by a {reversal_type} {reversal_status})")
        if code is not None:
            net[key][reversal_target(type_, code)] += delta
    for key, per_account in net.items():
        if not per_account or any(per_account.values()):
            bad.add(f"{key} (net {dict(per_account)})")
    names = sorted(bad)
    return (not names, _offenders(names, "reversals do not undo their original") if names
            else f"{len(net)} reversals net to zero with their originals")


def account_checks(conn: Connection) -> list[tuple[str, bool, str]]:
    """(name, ok, detail) of each check of this module; verify makes them its Checks."""
    out = []
    for name, run in (("balance_after_chain", _chain), ("no_balance_below_limit", _limits),
                      ("frozen_accounts_not_debited", _freezes),
                      ("reversals_net_to_zero", _reversals)):
        ok, detail = run(conn)
        out.append((name, ok, detail))
    return out
