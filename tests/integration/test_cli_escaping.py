"""Operators' screens: stored text is shown as it is, never obeyed. Markup (`[/x]` once made
`walletq status` crash with MarkupError; `[link=...]` made a link in the terminal) and ANSI
escapes go through every command that prints records, as a producer or an attacker could
store them, and must print literally, control characters in their visible `\\x1b` form."""

from __future__ import annotations

import json

from sqlalchemy import text
from sqlalchemy.engine import Engine

from services import refusals
from services.settings import Settings
from services.wallet_service import WalletService
from tests.support.builders import credit, debit, hold
from tests.support.cli import walletq

MARKUP = "[/x] [link=http://e]"
HOSTILE = f"{MARKUP}\x1b[31mred\x1b]8;;http://e\x07"
SHOWN = f"{MARKUP}\\x1b[31mred\\x1b]8;;http://e\\x07"
KEY = "evil[/x]\x1b[2J"
KEY_SHOWN = "evil[/x]\\x1b[2J"
WIDE = {"COLUMNS": "400"}


def _literal(args: tuple[str, ...], *expected: str) -> str:
    result = walletq(*args, env=WIDE)
    shown = result.stdout + result.stderr
    assert result.exit_code in (0, 1), result  # 1: verify reports what was written by hand
    assert "\x1b" not in shown and "\x07" not in shown, (args, shown)
    for text_ in expected:
        assert text_ in shown, (args, shown)
    return shown


def test_markup_and_ansi_escapes_print_literally_through_every_command_that_prints_records(
        service: WalletService, engine: Engine, settings: Settings) -> None:
    service.execute(credit("dep-1", "alice", "10.00"))
    assert service.execute(debit("wd-1", "alice", "99.00")).status == "rejected"
    # Written behind walletq's back (an owner's UPDATE): a key and an error message no
    # validation would let in. Every screen must still show them as they are.
    with engine.begin() as conn:
        conn.execute(text("UPDATE commands SET idempotency_key = :k WHERE idempotency_key = 'dep-1'"),
                     {"k": KEY})
        conn.execute(text("UPDATE commands SET error_message = :m WHERE idempotency_key = 'wd-1'"),
                     {"m": HOSTILE})
        refusals.append(conn, key="k-h", producer=None, authenticated=False,
                        command_type=HOSTILE, error={"code": "unauthenticated", "message": HOSTILE},
                        source="worker")

    _literal(("status", "wd-1"), SHOWN)
    _literal(("status", KEY), KEY_SHOWN)
    _literal(("commands",), KEY_SHOWN, SHOWN)
    _literal(("commands", "--status", "rejected"), SHOWN)
    _literal(("refusals", "k-h"), SHOWN)
    _literal(("history", "alice"), KEY_SHOWN)
    _literal(("balances",))
    _literal(("producer", "list"))
    _literal(("verify",), KEY_SHOWN)
    # --json escapes as JSON does: the text is there, its control characters as \u001b.
    as_json = walletq("--json", "status", "wd-1")
    assert as_json.json()["error"]["message"] == HOSTILE and "\x1b" not in as_json.stdout


def test_an_error_naming_hostile_input_prints_literally(service: WalletService) -> None:
    # The fee rate is quoted in the error: markup in it once went to the terminal as markup.
    bad = hold("h-1", "o-1", "alice", "bob", "1.00", fee_rate=HOSTILE)
    _literal(("submit", json.dumps(bad)), MARKUP)
