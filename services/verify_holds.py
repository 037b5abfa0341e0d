"""verify's hold checks (docs/ARCHITECTURE.md, "Invariants" 4 and 9).

4. Each payer's escrow balance equals what remains of their open holds.
9. Each hold adds up: what opened it is its amount; what its releases moved (payee and fee)
   is its `released_minor`, their fees its `fee_minor`; what its refund or expiry moved is
   its `refunded_minor`; so amount = released + refunded + remaining, and it is open exactly
   while something remains. A hold's commands are found by the `hold_id` of the succeeded
   releases, refunds and expiries (the payload), their transfers by command.
"""

from __future__ import annotations

import json
from collections import defaultdict

from sqlalchemy import text
from sqlalchemy.engine import Connection

__all__ = ["escrow_problems", "hold_problems"]

_RELEASE = "release_from_escrow"
_RETURNS = ("refund_from_escrow", "expire_hold")


def escrow_problems(conn: Connection) -> list[str]:
    rows = conn.execute(text("""
        SELECT u.user_id, COALESCE(e.balance_minor, 0), COALESCE(h.total, 0)
        FROM (SELECT user_id FROM accounts WHERE kind = 'user_escrow'
              UNION SELECT payer FROM holds WHERE status = 'held') u
        LEFT JOIN accounts e ON e.kind = 'user_escrow' AND e.user_id = u.user_id
        LEFT JOIN (SELECT payer, SUM(amount_minor - released_minor - refunded_minor) AS total
                   FROM holds WHERE status = 'held' GROUP BY payer) h ON h.payer = u.user_id
        WHERE COALESCE(e.balance_minor, 0) <> COALESCE(h.total, 0)
        ORDER BY u.user_id""")).all()
    return [f"{user} (escrow {bal}, open holds {held})" for user, bal, held in rows]


def _moved_per_hold(conn: Connection) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Per hold id: what its succeeded releases moved, their fees, what its returns moved."""
    rows = conn.execute(text("""
        SELECT c.type, c.payload, COALESCE(x.total, 0), COALESCE(x.fees, 0)
        FROM commands c
        LEFT JOIN (SELECT command_id, SUM(amount_minor) AS total,
                          SUM(CASE WHEN kind = 'fee' THEN amount_minor ELSE 0 END) AS fees
                   FROM transfers GROUP BY command_id) x ON x.command_id = c.id
        WHERE c.status = 'succeeded'
          AND c.type IN ('release_from_escrow', 'refund_from_escrow', 'expire_hold')""")
    ).yield_per(5_000)
    released: dict[str, int] = defaultdict(int)
    fees: dict[str, int] = defaultdict(int)
    returned: dict[str, int] = defaultdict(int)
    for type_, payload, total, fee in rows:
        hold_id = json.loads(payload).get("hold_id")
        if type_ == _RELEASE:
            released[hold_id] += total
            fees[hold_id] += fee
        elif type_ in _RETURNS:
            returned[hold_id] += total
    return released, fees, returned


def hold_problems(conn: Connection) -> tuple[list[str], int]:
    """The holds that do not add up, and how many holds were checked."""
    released, fees, returned = _moved_per_hold(conn)
    rows = conn.execute(text("""
        SELECT h.hold_id, h.amount_minor, h.released_minor, h.refunded_minor, h.fee_minor,
               h.status,
               (SELECT COALESCE(SUM(amount_minor), 0) FROM transfers WHERE command_id = h.opened_by)
        FROM holds h ORDER BY h.id""")).all()
    bad = []
    for hold_id, amount, rel, ref, fee, status, opened in rows:
        remaining = amount - rel - ref
        problems = []
        if opened != amount:
            problems.append(f"opened with {opened}")
        if rel != released[hold_id] or (fee or 0) != fees[hold_id]:
            problems.append(f"released {rel} (fee {fee}), its releases moved "
                            f"{released[hold_id]} (fee {fees[hold_id]})")
        if ref != returned[hold_id]:
            problems.append(f"refunded {ref}, its refund or expiry moved {returned[hold_id]}")
        if remaining < 0 or (status == "held") != (remaining > 0):
            problems.append(f"{status} with {remaining} remaining")
        if problems:
            bad.append(f"hold {hold_id} (amount {amount}: {'; '.join(problems)})")
    return bad, len(rows)
