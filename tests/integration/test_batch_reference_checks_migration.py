"""Migration 0010: audit rows' and holds' commands are checked once per statement, not by
a foreign key per row: a statement naming one missing command among many is refused
whole, with the foreign key's SQLSTATE and name; a hold's update checks only what it
changed; and the migration comes down again."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from services.db import alembic_config, dispose_engines, get_engine, upgrade
from services.settings import Settings, get_settings
from services.wallet_service import WalletService
from tests.support.ledger import assert_ledger_sound

_AUDIT = ("INSERT INTO audit_events (command_id, idempotency_key, command_type, outcome, "
          "accounts, amounts, detail) SELECT unnest(CAST(:ids AS BIGINT[])), 'k', "
          "'credit_wallet', 'succeeded', '[]', '[]', '{}'")
_HOLD = ("INSERT INTO holds (hold_id, payer, payee, amount_minor, status, opened_by) "
         "VALUES (:hold, 'ann', 'bob', 100, 'held', :opened_by)")
_CLOSE = ("UPDATE holds SET status = 'refunded', refunded_minor = amount_minor, "
          "closed_by = :closed_by, closed_at = now() WHERE hold_id = :hold")
_CONSTRAINTS = ("fk_audit_events_command_id_commands", "fk_holds_closed_by_commands",
                "fk_holds_opened_by_commands")


@pytest.fixture
def pg(walletq_env: dict[str, str]) -> Engine:
    engine = get_engine(get_settings())
    service = WalletService(engine, get_settings())
    service.credit_wallet("ann", "5.00", idempotency_key="credit-ann")
    service.transfer_to_escrow("h-1", "ann", "bob", "1.00", idempotency_key="hold-1")
    return engine


def _command_ids(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT id FROM commands ORDER BY id")).scalars())


def _foreign_keys(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(text(
            "SELECT conname FROM pg_constraint WHERE contype = 'f' AND conrelid IN "
            "('audit_events'::regclass, 'holds'::regclass)")).scalars())


def _refused(engine: Engine, statement: str, params: dict[str, object], constraint: str) -> None:
    with pytest.raises(IntegrityError, match=constraint) as caught, engine.begin() as conn:
        conn.execute(text(statement), params)
    assert caught.value.orig.pgcode == "23503"  # type: ignore[union-attr]


def test_an_audit_insert_naming_one_missing_command_among_many_is_refused_whole(pg: Engine
                                                                                ) -> None:
    ids = _command_ids(pg)
    with pg.connect() as conn:
        before = conn.execute(text("SELECT count(*) FROM audit_events")).scalar_one()
    _refused(pg, _AUDIT, {"ids": [*ids, 999_999]}, "fk_audit_events_command_id_commands")
    with pg.begin() as conn:  # every id known, and a row naming no command: accepted
        conn.execute(text(_AUDIT), {"ids": [*ids, None]})
        after = conn.execute(text("SELECT count(*) FROM audit_events")).scalar_one()
    assert after == before + len(ids) + 1


def test_a_hold_naming_a_missing_command_is_refused_on_insert_and_on_update(pg: Engine) -> None:
    known = _command_ids(pg)[0]
    _refused(pg, _HOLD, {"hold": "h-2", "opened_by": 999_999}, "fk_holds_opened_by_commands")
    _refused(pg, _CLOSE, {"hold": "h-1", "closed_by": 999_998}, "fk_holds_closed_by_commands")
    _refused(pg, "UPDATE holds SET opened_by = 999997 WHERE hold_id = 'h-1'", {},
             "fk_holds_opened_by_commands")
    with pg.begin() as conn:
        conn.execute(text(_HOLD), {"hold": "h-3", "opened_by": known})
        conn.execute(text(_CLOSE), {"hold": "h-3", "closed_by": known})


def test_a_hold_update_checks_only_the_references_it_changed(pg: Engine) -> None:
    """As a foreign key: an update that leaves opened_by and closed_by alone looks nothing
    up (a command id that vanished could not be told apart, and none ever does)."""
    with pg.begin() as conn:
        conn.execute(text("ALTER TABLE holds DISABLE TRIGGER holds_references_insert"))
        conn.execute(text(_HOLD), {"hold": "h-orphan", "opened_by": 999_996})
        conn.execute(text("ALTER TABLE holds ENABLE TRIGGER holds_references_insert"))
    with pg.begin() as conn:
        assert conn.execute(text("UPDATE holds SET fee_rate = '0.01' WHERE hold_id = 'h-orphan'")
                            ).rowcount == 1
    _refused(pg, "UPDATE holds SET opened_by = opened_by - 1 WHERE hold_id = 'h-orphan'", {},
             "fk_holds_opened_by_commands")


def test_0010_comes_down_to_the_foreign_keys_and_goes_up_again(pg: Engine,
                                                               settings: Settings) -> None:
    from alembic import command

    assert _foreign_keys(pg) == []
    dispose_engines()
    command.downgrade(alembic_config(settings.database_url), "0009")
    engine = get_engine(settings)
    assert _foreign_keys(engine) == sorted(_CONSTRAINTS)
    _refused(engine, _HOLD, {"hold": "h-4", "opened_by": 999_999}, "fk_holds_opened_by_commands")
    dispose_engines()
    upgrade(settings)
    engine = get_engine(settings)
    assert _foreign_keys(engine) == []
    service = WalletService(engine, settings)
    service.release_from_escrow("h-1", idempotency_key="release-1")
    assert_ledger_sound(engine, settings)
