"""Exact limits: a balance leaving the signed 64-bit range is refused in Python before SQLite
is asked (SQLite once stored a REAL 9.3e18 and reported `succeeded`); `verify` reports a row
it cannot read instead of crashing; the embedded database and broker are their user's only."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

import celeryconfig
from services.boundary import PAYLOAD_BYTES_MAX
from services.db import get_engine
from services.errors import FinancialIntegrityError
from services.settings import Settings
from services.verify import verify_ledger
from services.wallet_service import WalletService
from tests.support.builders import credit, payout
from tests.support.cli import walletq
from tests.support.ledger import CHECKS


def test_a_sqlite_balance_past_64_bits_is_refused_and_nothing_becomes_a_real(
        sqlite_env: Settings) -> None:
    # The largest amount the settings allow (10^17 minor units) with a payout size that
    # keeps their product inside 64 bits: 92 credits fit, the 93rd would not.
    settings = dataclasses.replace(sqlite_env, amount_max_minor=10**17, payout_items_max=90)
    engine = get_engine(settings)
    service = WalletService(engine, settings)
    biggest = "1000000000000000.00"
    for i in range(92):
        assert service.execute(credit(f"c-{i}", "alice", biggest)).status == "succeeded"
    with pytest.raises(FinancialIntegrityError, match="signed 64-bit"):
        service.execute(credit("c-92", "alice", biggest))
    with engine.connect() as conn:
        kinds = conn.execute(text("SELECT DISTINCT typeof(balance_minor) FROM accounts")).scalars()
        assert set(kinds) == {"integer"}
        assert conn.execute(text("SELECT balance_minor FROM accounts WHERE code = "
                                 "'user:alice:available'")).scalar_one() == 92 * 10**17
    assert all(check.ok for check in verify_ledger(engine, settings.asset_scale))


def test_verify_reports_a_row_it_cannot_read_and_runs_every_other_check(
        service: WalletService, engine: Engine, settings: Settings) -> None:
    service.execute(credit("dep-1", "alice", "10.00"))
    with engine.begin() as conn:  # written behind walletq's back: not JSON at all
        conn.execute(text("UPDATE commands SET payload = '{not json' WHERE idempotency_key = 'dep-1'"))
    checks = {check.name: check for check in verify_ledger(engine, settings.asset_scale)}
    assert set(checks) >= set(CHECKS)  # every check ran, the broken one too
    broken = checks["commands_have_their_transfers"]
    assert not broken.ok and "dep-1" in broken.detail and "unreadable row" in broken.detail
    assert checks["sum_of_balances_is_zero"].ok and checks["balance_equals_transfers"].ok


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_embedded_database_and_broker_folders_are_their_users_only(
        sqlite_env: Settings) -> None:
    database = Path(sqlite_env.database_url.removeprefix("sqlite:///"))
    assert _mode(database) == 0o600 and _mode(database.parent) == 0o700
    celeryconfig.prepare_broker_folders({"WALLETQ_HOME": str(sqlite_env.home)})
    folders = [path for path in sqlite_env.home.rglob("*") if path.is_dir()]
    assert folders and all(_mode(folder) == 0o700 for folder in folders), [
        (folder, oct(_mode(folder))) for folder in folders]
    made = sqlite_env.home / "made-after.txt"
    made.write_text("x")  # what kombu writes now: this process's umask keeps it private
    assert _mode(made) == 0o600


def _deep(levels: int) -> object:
    value: object = "x"
    for _ in range(levels):
        value = {"n": value}
    return value


def test_walletq_submit_refuses_deep_duplicate_and_oversized_commands_naming_why(
        walletq_env: dict[str, str], engine: Engine) -> None:
    deep = json.dumps({**credit("deep-1", "alice", "1.00"), "memo": _deep(500)})
    twice = json.dumps(credit("dup-1", "alice", "1.00"))[:-1] + ', "amount": "999.00"}'
    # Valid item by item, and its text within the limit; its canonical form ("1" stored as
    # "1.00") is not: refused at validation, never an IntegrityError at the INSERT.
    items = [{"user": "u" * 200, "amount": "1", "reference": f"{i:0>179}"} for i in range(10_000)]
    huge = json.dumps(payout("big-1", items), separators=(",", ":"))
    assert len(huge) <= PAYLOAD_BYTES_MAX
    for line, reason in ((deep, "more than 8 deep"), (twice, "appears twice"),
                         (huge, "canonical form")):
        done = walletq("--json", "submit", line)
        assert done.exit_code == 1, done
        answer = done.json()
        assert answer["error"]["code"] == "invalid_command" and reason in answer["error"]["message"]
        assert "Traceback" not in done.stdout + done.stderr
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM commands")).scalar_one() == 0
