"""Migration 0007 backfills each leg's balance after it (and comes down again): a ledger
written before it verifies after it, its running balances derived from its transfers."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from services.db import dispose_engines, get_engine, upgrade
from services.settings import Settings
from services.wallet_service import WalletService
from tests.support.ledger import assert_ledger_sound, balances


def _downgrade(settings: Settings, revision: str) -> None:
    from alembic import command

    from services.db import alembic_config
    command.downgrade(alembic_config(settings.database_url), revision)


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_upgrading_to_0007_backfills_the_balance_after_each_leg(
        database: str, request: pytest.FixtureRequest) -> None:
    settings: Settings = request.getfixturevalue(
        "settings" if database == "postgresql" else "sqlite_env")
    engine: Engine = get_engine(settings)
    service = WalletService(engine, settings)
    service.admin_create_tokens("100.00")
    service.admin_sell_tokens_to_user("alice", "30.00")
    service.transfer_to_escrow("h-1", "alice", "bob", "10.00")
    service.release_from_escrow("h-1")
    service.transfer_tokens_between_users("bob", "alice", "2.00")
    before = balances(engine)
    dispose_engines()
    _downgrade(settings, "0005")
    engine = get_engine(settings)
    with engine.connect() as conn:
        columns = [row[1] for row in conn.execute(text(
            "SELECT 1, column_name FROM information_schema.columns WHERE "
            "table_name = 'transfers'" if database == "postgresql" else
            "PRAGMA table_info(transfers)"))]
    assert "debit_balance_after_minor" not in columns
    dispose_engines()
    upgrade(settings)
    engine = get_engine(settings)
    assert balances(engine) == before
    with engine.connect() as conn:
        nulls = conn.execute(text(
            "SELECT COUNT(*) FROM transfers WHERE debit_balance_after_minor IS NULL "
            "OR credit_balance_after_minor IS NULL")).scalar_one()
    assert nulls == 0
    assert_ledger_sound(engine, settings)
    service = WalletService(engine, settings)
    service.transfer_tokens_between_users("alice", "bob", "1.00")  # and it carries on
    assert_ledger_sound(engine, settings)
