"""Migration 0008: a transfer's command and accounts are checked once per statement, not
by three foreign keys per row; the rows they name are never removed nor renumbered; a
command's length checks admit what they did without reading its payload; and the migration
comes down again."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from services.db import alembic_config, dispose_engines, get_engine, upgrade
from services.settings import Settings, get_settings
from services.wallet_service import WalletService
from tests.support.builders import item, payout
from tests.support.ledger import assert_ledger_sound

_INSERT = ("INSERT INTO transfers (command_id, debit_account_id, credit_account_id, "
           "amount_minor, kind) SELECT :command, :debit, unnest(CAST(:credits AS BIGINT[])), 1, "
           "'test'")


@pytest.fixture
def pg(walletq_env: dict[str, str]) -> Engine:
    engine = get_engine(get_settings())
    service = WalletService(engine, get_settings())
    service.admin_create_tokens("10.00")
    service.execute(payout("pay-1", [item("ann", "1.00", "r-1"), item("bob", "1.00", "r-2")]))
    return engine


def _ids(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        accounts = dict(conn.execute(text("SELECT code, id FROM accounts")).all())
        command = conn.execute(text("SELECT min(id) FROM commands")).scalar_one()
    return {"command": command, "treasury": accounts["platform:treasury"],
            "ann": accounts["user:ann:available"], "bob": accounts["user:bob:available"]}


def _foreign_keys(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(text(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'transfers'::regclass "
            "AND contype = 'f'")).scalars())


def test_a_statement_naming_one_missing_account_among_many_is_refused_whole(pg: Engine) -> None:
    ids = _ids(pg)
    for params in ({"credits": [ids["ann"], 999_999, ids["bob"]]},
                   {"credits": [ids["ann"]], "debit": 999_998},
                   {"credits": [ids["ann"]], "command": 999_997}):
        with pytest.raises(IntegrityError, match="foreign key") as caught, pg.begin() as conn:
            conn.execute(text(_INSERT), {"command": ids["command"], "debit": ids["treasury"],
                                         **params})
        assert caught.value.orig.pgcode == "23503"  # type: ignore[union-attr]
    with pg.begin() as conn:  # well formed, many rows at once: accepted
        conn.execute(text(_INSERT), {"command": ids["command"], "debit": ids["treasury"],
                                     "credits": [ids["ann"], ids["bob"]]})


@pytest.mark.parametrize("statement", [
    "DELETE FROM accounts WHERE code = 'user:ann:available'",
    "DELETE FROM commands WHERE idempotency_key = 'pay-1'",
    "UPDATE accounts SET id = id + 1000 WHERE code = 'user:ann:available'",
    "UPDATE commands SET id = id + 1000 WHERE idempotency_key = 'pay-1'",
    "TRUNCATE accounts CASCADE", "TRUNCATE commands CASCADE"])
def test_the_rows_transfers_name_are_never_removed_nor_renumbered(pg: Engine, statement: str
                                                                  ) -> None:
    with pytest.raises(DBAPIError) as caught, pg.begin() as conn:
        conn.execute(text(statement))
    assert caught.value.orig.pgcode == "23001"  # type: ignore[union-attr]  # restrict_violation


def _length_checks(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(text(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = "
            "'commands'::regclass AND conname LIKE '%payload_length'")).scalars())


def test_0008_comes_down_to_the_foreign_keys_and_goes_up_again(pg: Engine,
                                                               settings: Settings) -> None:
    from alembic import command

    assert _foreign_keys(pg) == []
    assert all("octet_length" in check for check in _length_checks(pg))
    dispose_engines()
    command.downgrade(alembic_config(settings.database_url), "0007")
    engine = get_engine(settings)
    assert _foreign_keys(engine) == ["fk_transfers_command_id_commands",
                                     "fk_transfers_credit_account_id_accounts",
                                     "fk_transfers_debit_account_id_accounts"]
    assert len(_length_checks(engine)) == 2
    assert not any("octet_length" in check for check in _length_checks(engine))
    with engine.begin() as conn:  # no trigger left behind: an account no transfer names goes
        conn.execute(text("INSERT INTO accounts (code, kind, user_id, may_go_negative, "
                          "balance_minor) VALUES ('user:tmp:available', 'user_available', "
                          "'tmp', false, 0)"))
        assert conn.execute(text("DELETE FROM accounts WHERE code = 'user:tmp:available'")
                            ).rowcount == 1
    dispose_engines()
    upgrade(settings)
    engine = get_engine(settings)
    assert _foreign_keys(engine) == []
    WalletService(engine, settings).execute(payout("pay-2", [item("cy", "1.00", "r-3")]))
    assert_ledger_sound(engine, settings)


@pytest.mark.parametrize("column", ["payload", "signed_payload"])
def test_a_commands_texts_are_bounded_in_characters_as_before(pg: Engine, column: str) -> None:
    """Four million two-byte characters fit (eight million bytes); one more does not, on
    insert or on update."""
    fits, over = "é" * 4_194_304, "é" * 4_194_305
    insert = text("INSERT INTO commands (idempotency_key, type, payload, payload_hash, status) "
                  "VALUES (:key, 'credit_wallet', '{}', :hash, 'accepted')")
    with pg.begin() as conn:
        conn.execute(insert, {"key": "long", "hash": "0" * 64})
        conn.execute(text(f"UPDATE commands SET {column} = :v WHERE idempotency_key = 'long'"),
                     {"v": fits})
    with pytest.raises(IntegrityError, match=f"{column}_length"), pg.begin() as conn:
        conn.execute(text(f"UPDATE commands SET {column} = :v WHERE idempotency_key = 'long'"),
                     {"v": over})
