"""Prepared statements (services.prepared): the same rows as the statement sent as text,
prepared once per connection, surviving a rollback and a failure, and off when switched off."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest
from sqlalchemy import bindparam, select, text
from sqlalchemy.engine import Connection, Engine

from services import schema
from services.bulk_sql import Pending, execute_reusable, execute_together
from services.db import get_engine
from services.settings import load_settings
from services.wallet_service import WalletService
from tests.support.ledger import assert_ledger_sound

_ACCOUNTS_LIKE = text("SELECT code FROM accounts WHERE code LIKE :prefix || '%' "
                      "AND code NOT LIKE 'user:%x' ORDER BY code")
_ONE_COMMAND = select(schema.commands.c.idempotency_key, schema.commands.c.status).where(
    schema.commands.c.idempotency_key == bindparam("key"))


def _prepared(conn: Connection) -> set[str]:
    return set(conn.execute(text(
        "SELECT name FROM pg_prepared_statements WHERE name LIKE 'wq_%'")).scalars())


def test_a_reusable_statement_is_prepared_once_per_connection_and_gives_the_same_rows(
        service: WalletService, engine: Engine) -> None:
    for user in ("ann", "bob"):
        service.credit_wallet(user, Decimal("1.00"), idempotency_key=f"seed-{user}")
    with engine.connect() as conn:
        plain = conn.execute(_ACCOUNTS_LIKE, {"prefix": "user:"}).scalars().all()
        assert _prepared(conn) == set()
        first = execute_reusable(conn, _ACCOUNTS_LIKE, {"prefix": "user:"}).scalars().all()
        names = _prepared(conn)
        assert len(names) == 1
        again = execute_reusable(conn, _ACCOUNTS_LIKE, {"prefix": "user:"}).scalars().all()
        assert _prepared(conn) == names
        assert plain == first == again == ["user:ann:available", "user:bob:available"]
        row = execute_reusable(conn, _ONE_COMMAND, {"key": "seed-ann"}).one()
        assert tuple(row) == ("seed-ann", "succeeded")
        assert len(_prepared(conn)) == 2


def test_a_prepared_statement_outlives_a_rollback_and_a_failed_round_trip_is_recovered(
        engine: Engine) -> None:
    with engine.connect() as conn:
        with conn.begin() as tx:
            execute_reusable(conn, _ONE_COMMAND, {"key": "nothing"}).all()
            tx.rollback()
        assert len(_prepared(conn)) == 1
        conn.rollback()
        # A round trip that fails before the server reaches the PREPARE it carries: what
        # the connection believes it prepared is wrong; the next round trip starts afresh.
        with pytest.raises(Exception, match="division by zero"), conn.begin():
            execute_together(conn, [Pending(text("SELECT 1 / 0"), {}),
                                    Pending(_ACCOUNTS_LIKE, {"prefix": "x"}, reusable=True)])
        for _ in range(2):
            with conn.begin():
                assert execute_reusable(conn, _ACCOUNTS_LIKE, {"prefix": "x"}).all() == []
                assert execute_reusable(conn, _ONE_COMMAND, {"key": "nothing"}).all() == []
        assert len(_prepared(conn)) == 2


def test_switched_off_nothing_is_prepared_and_commands_apply_the_same(
        walletq_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALLETQ_PREPARED_STATEMENTS", "0")
    settings = load_settings()
    engine = get_engine(settings)
    service = WalletService(engine, settings)
    rng = random.Random(3)
    users = ["ann", "bob", "cy"]
    for user in users:
        service.credit_wallet(user, Decimal("5.00"), idempotency_key=f"seed-{user}")
    for i in range(20):
        payer, payee = rng.sample(users, 2)
        service.transfer_tokens_between_users(payer, payee, Decimal("0.10"),
                                              idempotency_key=f"t-{i}")
    with engine.connect() as conn:
        assert _prepared(conn) == set()
    assert sum(service.balance(u).available for u in users) == Decimal("15.00")
    assert_ledger_sound(engine, settings)
