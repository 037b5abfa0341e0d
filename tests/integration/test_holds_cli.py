"""`walletq holds` and `walletq expire-holds`, on PostgreSQL and on embedded SQLite."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from services.db import get_engine
from services.settings import get_settings
from services.wallet_service import WalletService
from tests.support.cli import walletq
from tests.support.ledger import assert_ledger_sound


@pytest.fixture(params=["postgresql", "sqlite"])
def ledger(request: pytest.FixtureRequest) -> WalletService:
    """alice holds 10.00 for bob (o-1, 4.00 of it released) and 5.00 for carol (o-2, expiring)."""
    request.getfixturevalue("walletq_env" if request.param == "postgresql" else "sqlite_env")
    service = WalletService(get_engine(get_settings()), get_settings())
    service.credit_wallet("alice", "100.00", idempotency_key="dep")
    service.transfer_to_escrow("o-1", "alice", "bob", "10.00", idempotency_key="h-1")
    service.release_from_escrow("o-1", amount="4.00", idempotency_key="r-1")
    service.transfer_to_escrow("o-2", "alice", "carol", "5.00", idempotency_key="h-2",
                               expires_in_s=3600)
    return service


def test_holds_lists_amount_released_refunded_remaining_filtered_by_user_and_status(
    ledger: WalletService,
) -> None:
    result = walletq("--json", "holds", "--user", "bob")
    assert result.exit_code == 0, result.stderr
    [rows] = result.json_lines()
    assert [(r["hold_id"], r["status"], r["amount"], r["released"], r["refunded"], r["remaining"])
            for r in rows] == [("o-1", "held", "10.00", "4.00", "0.00", "6.00")]
    [expiring] = walletq("--json", "holds", "--user", "carol").json_lines()[0]
    assert expiring["expires_at"] is not None
    assert walletq("--json", "holds", "--status", "expired").json_lines() == [[]]
    table = walletq("holds")
    assert table.exit_code == 0 and "o-1" in table.stdout and "6.00" in table.stdout
    assert walletq("holds", "--status", "nonsense").exit_code == 2


def test_expire_holds_runs_one_pass_and_prints_its_counts(ledger: WalletService) -> None:
    settings = get_settings()
    if not settings.embedded:  # a server needs its system producer made by an operator
        refused = walletq("--json", "expire-holds")
        assert refused.exit_code == 2 and "--role system" in refused.stdout
        key = settings.home / "producers" / "walletq-system.key"
        made = walletq("producer", "create", "walletq-system", "--role", "system",
                       "--key-out", str(key))
        assert made.exit_code == 0, made.stderr
    [counts] = walletq("--json", "expire-holds").json_lines()
    assert (counts["found"], counts["expired"]) == (0, 0)
    with ledger.engine.begin() as conn:
        conn.execute(text("UPDATE holds SET expires_at = :t WHERE hold_id = 'o-2'"),
                     {"t": datetime.now(UTC) - timedelta(seconds=1)})
    [counts] = walletq("--json", "expire-holds").json_lines()
    assert (counts["found"], counts["expired"], counts["refused"]) == (1, 1, {})
    assert counts["producer"] == "walletq-system"
    assert ledger.hold("o-2")["status"] == "expired"
    table = walletq("holds", "--status", "expired")
    assert "o-2" in table.stdout and "expired" in table.stdout
    assert_ledger_sound(ledger.engine, settings)
