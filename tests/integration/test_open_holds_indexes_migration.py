"""Migration 0011: the payer and expiry indexes of `holds` hold open holds only; the
questions asked of them (a payer's open holds, the holds due) are answered from them; and
the migration comes down again."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from services.db import alembic_config, dispose_engines, get_engine, upgrade
from services.settings import Settings, get_settings
from services.wallet_service import WalletService
from tests.support.ledger import assert_ledger_sound

_OPEN_INDEXES = {"ix_holds_open_expires_at", "ix_holds_open_payer"}


@pytest.fixture
def pg(walletq_env: dict[str, str]) -> Engine:
    engine = get_engine(get_settings())
    service = WalletService(engine, get_settings())
    service.credit_wallet("ann", "50.00", idempotency_key="credit-ann")
    for n in range(6):
        service.transfer_to_escrow(f"h-{n}", "ann", "bob", "1.00", expires_in_s=3600,
                                   idempotency_key=f"hold-{n}")
    for n in range(3):
        service.release_from_escrow(f"h-{n}", idempotency_key=f"release-{n}")
    return engine


def _indexes(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'holds' "
            "AND indexname NOT IN ('pk_holds', 'uq_holds_hold_id')")).all())


def test_the_holds_indexes_are_partial_on_open_holds(pg: Engine) -> None:
    indexes = _indexes(pg)
    assert set(indexes) == _OPEN_INDEXES
    assert all("WHERE ((status)::text = 'held'::text)" in d for d in indexes.values()), indexes


@pytest.mark.parametrize("question", ["payer", "due"])
def test_the_questions_asked_of_open_holds_use_them(pg: Engine, question: str) -> None:
    if question == "payer":
        query = "SELECT hold_id FROM holds WHERE payer = 'ann' AND status = 'held'"
    else:
        # services.expiry's question, as it asks it
        query = ("SELECT id FROM holds WHERE status = 'held' AND expires_at IS NOT NULL "
                 "AND expires_at <= now() ORDER BY id")
    with pg.connect() as conn:
        conn.execute(text("SET enable_seqscan = off"))
        plan = "\n".join(conn.execute(text(f"EXPLAIN {query}")).scalars())
    # A table this small lets the planner take either; neither is a scan of every hold.
    assert "Seq Scan" not in plan and any(index in plan for index in _OPEN_INDEXES), plan
    assert WalletService(pg, get_settings()).open_holds("ann") == [
        {"hold_id": f"h-{n}", "payee": "bob", "amount": Decimal("1.00")} for n in (3, 4, 5)]


def test_0011_comes_down_to_the_full_indexes_and_goes_up_again(pg: Engine,
                                                               settings: Settings) -> None:
    from alembic import command

    dispose_engines()
    command.downgrade(alembic_config(settings.database_url), "0010")
    engine = get_engine(settings)
    assert set(_indexes(engine)) == {"ix_holds_payer_status", "ix_holds_status_expires_at"}
    dispose_engines()
    upgrade(settings)
    engine = get_engine(settings)
    assert set(_indexes(engine)) == _OPEN_INDEXES
    WalletService(engine, settings).refund_from_escrow("h-3", idempotency_key="refund-3")
    assert_ledger_sound(engine, settings)
