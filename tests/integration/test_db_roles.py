"""The least-privilege database, tried as an attacker holding one role's credentials would:
each statement below is one the role must not be able to run, on real PostgreSQL."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from services import db_roles as db_roles_module
from services import refusals
from services.db import upgrade
from services.settings import load_settings
from services.wallet_service import WalletService
from worker.cli import cli

#: Each append-only table and a column it has.
APPEND_ONLY_TABLES = {"transfers": "amount_minor", "audit_events": "outcome", "payout_items": "outcome",
                      "refusals": "error_code"}
INSUFFICIENT_PRIVILEGE = "42501"


@pytest.fixture
def as_role(db_roles: dict[str, str]) -> Iterator[Any]:
    """as_role("worker") → an engine logged in as the test database's worker role."""
    engines: list[Engine] = []

    def connect(kind: str) -> Engine:
        engine = create_engine(db_roles[kind], poolclass=NullPool)
        engines.append(engine)
        return engine

    yield connect
    for engine in engines:
        engine.dispose()


@pytest.fixture
def ledger(service: WalletService) -> WalletService:
    """A ledger with a row in every table, written by walletq as the superuser did so far."""
    service.admin_create_tokens("1000.00", idempotency_key="mint-1")
    service.admin_sell_tokens_to_user("alice", "100.00", idempotency_key="sale-1")
    service.execute({"type": "payout_batch", "idempotency_key": "pay-1",
                     "items": [{"user": "bob", "amount": "1.00", "reference": "r-1"}]})
    with service.engine.begin() as conn:
        refusals.append(conn, key="mint-2", producer="test-web", authenticated=True,
                        command_type="admin_create_tokens",
                        error={"code": "forbidden", "message": "not in role web"}, source="worker")
    return service


def refused(engine: Engine, statement: str, sqlstate: str = INSUFFICIENT_PRIVILEGE,
            params: dict[str, Any] | None = None) -> str:
    with pytest.raises(DBAPIError) as caught, engine.begin() as conn:
        conn.execute(text(statement), params or {})
    assert caught.value.orig.pgcode == sqlstate, (statement, caught.value.orig)  # type: ignore[union-attr]
    return str(caught.value.orig)


def test_db_roles_makes_four_login_roles_without_superpowers_and_is_idempotent(
        ledger: WalletService, db_roles: dict[str, str], pg_admin: Engine) -> None:
    result = CliRunner().invoke(cli, ["--json", "db", "roles"], catch_exceptions=False)
    assert result.exit_code == 0, result.output  # the second run: nothing left to create
    rows = {row["kind"]: row for row in json.loads(result.stdout)["roles"]}
    assert list(rows) == list(db_roles_module.ROLE_KINDS)
    assert [row["created"] for row in rows.values()] == [False] * 4
    assert {row["role"] for row in rows.values()} == {make_url(u).username for u in db_roles.values()}
    with pg_admin.connect() as conn:
        attributes = conn.execute(text(
            "SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls "
            "FROM pg_roles WHERE rolname = ANY(:names)"),
            {"names": [row["role"] for row in rows.values()]}).all()
    assert [tuple(a) for a in attributes] == [(True, False, False, False, False, False)] * 4
    with create_engine(db_roles["readonly"], poolclass=NullPool).connect() as conn:
        owners = set(conn.execute(text(
            "SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")).scalars())
    assert owners == {rows["owner"]["role"]}


@pytest.mark.parametrize("table", APPEND_ONLY_TABLES)
def test_the_worker_role_cannot_truncate_delete_or_update_an_append_only_table(
        ledger: WalletService, as_role: Any, table: str) -> None:
    worker = as_role("worker")
    column = APPEND_ONLY_TABLES[table]
    for statement in (f"TRUNCATE {table}", f"DELETE FROM {table}",
                      f"UPDATE {table} SET {column} = {column}", f"ALTER TABLE {table} DISABLE TRIGGER ALL",
                      f"DROP TRIGGER {table}_append_only ON {table}"):
        message = refused(worker, statement)
        assert "permission denied" in message or "must be owner" in message
    with worker.connect() as conn:
        assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() > 0


def test_the_worker_role_cannot_delete_or_truncate_anything(ledger: WalletService, as_role: Any) -> None:
    worker = as_role("worker")
    for table in db_roles_module.TABLE_PRIVILEGES:
        refused(worker, f"DELETE FROM {table}")
        refused(worker, f"TRUNCATE {table}")


def test_no_role_can_turn_the_triggers_off_with_session_replication_role(as_role: Any) -> None:
    for kind in db_roles_module.ROLE_KINDS:
        refused(as_role(kind), "SET session_replication_role = replica")


def test_the_producer_role_cannot_write_accounts_transfers_or_outcomes(
        ledger: WalletService, as_role: Any) -> None:
    producer = as_role("producer")
    refused(producer, "UPDATE accounts SET balance_minor = balance_minor + 100")
    refused(producer, "INSERT INTO accounts (code, kind, may_go_negative) "
                      "VALUES ('user:mallory:available', 'user_available', false)")
    refused(producer, "INSERT INTO transfers (command_id, debit_account_id, credit_account_id, "
                      "amount_minor, kind) SELECT 1, 1, 2, 100, 'credit'")
    refused(producer, "INSERT INTO audit_events (command_type, outcome, accounts, amounts, detail) "
                      "VALUES ('x', 'succeeded', '[]', '[]', '{}')")
    refused(producer, "UPDATE commands SET status = 'succeeded'")
    refused(producer, "SELECT * FROM commands FOR UPDATE")
    refused(producer, "DELETE FROM commands")
    refused(producer, "UPDATE holds SET status = 'refunded'")
    # A forged outcome squatting a key: the row policy lets a producer insert accepted rows only.
    row = ("INSERT INTO commands (idempotency_key, type, payload, payload_hash, status, attempts, "
           "completed_at) VALUES (:key, 'credit_wallet', '{}', repeat('0', 64), :status, 0, "
           ":completed_at)")
    message = refused(producer, row, params={"key": "squat", "status": "succeeded",
                                             "completed_at": "2026-01-01T00:00:00Z"})
    assert "row-level security" in message
    with producer.begin() as conn:
        conn.execute(text(row), {"key": "fair", "status": "accepted", "completed_at": None})
        balances = conn.execute(text("SELECT count(*) FROM accounts")).scalar_one()
        progress = conn.execute(text("SELECT count(*) FROM payout_items")).scalar_one()
    assert balances > 0 and progress == 1


def test_the_readonly_role_reads_every_table_and_writes_none(ledger: WalletService, as_role: Any) -> None:
    readonly = as_role("readonly")
    with readonly.connect() as conn:
        for table in db_roles_module.TABLE_PRIVILEGES:
            conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
        assert conn.execute(text("SELECT count(*) FROM commands")).scalar_one() == 3
    refused(readonly, "UPDATE accounts SET balance_minor = 0")
    refused(readonly, "INSERT INTO commands (idempotency_key, type, payload, payload_hash, status) "
                      "VALUES ('k', 'credit_wallet', '{}', repeat('0', 64), 'accepted')")


@pytest.mark.parametrize("table", APPEND_ONLY_TABLES)
def test_truncate_of_an_append_only_table_is_refused_even_for_the_owner_and_a_superuser(
        ledger: WalletService, as_role: Any, engine: Engine, table: str) -> None:
    for who in (as_role("owner"), engine):
        message = refused(who, f"TRUNCATE {table} CASCADE", sqlstate="23001")
        assert f"{table} is append-only; TRUNCATE refused" in message


def test_only_the_owner_runs_migrations_and_they_keep_every_roles_grants(
        ledger: WalletService, db_roles: dict[str, str], as_role: Any) -> None:
    owner_settings = load_settings({**os.environ, "WALLETQ_DATABASE_URL": db_roles["owner"]})
    worker_settings = load_settings({**os.environ, "WALLETQ_DATABASE_URL": db_roles["worker"]})
    with pytest.raises(DBAPIError):
        upgrade(worker_settings, "0004")  # a downgrade drops triggers: the worker may not
    upgrade(owner_settings, "0004")       # the owner may: down below the truncate triggers
    upgrade(owner_settings, "head")       # and up again, the grants re-applied
    refused(as_role("worker"), "TRUNCATE transfers")
    refused(as_role("worker"), "DELETE FROM audit_events")
    refused(as_role("owner"), "TRUNCATE audit_events", sqlstate="23001")
    service = WalletService(settings=worker_settings)
    service.admin_sell_tokens_to_user("alice", "1.00", idempotency_key="sale-2")
    service.engine.dispose()


def test_a_grant_added_by_hand_is_taken_back_by_the_next_migration(
        ledger: WalletService, db_roles: dict[str, str], engine: Engine, as_role: Any) -> None:
    worker = make_url(db_roles["worker"]).username
    with engine.begin() as conn:
        conn.execute(text(f'GRANT DELETE, TRUNCATE ON audit_events TO "{worker}"'))
    upgrade(load_settings({"WALLETQ_DATABASE_URL": db_roles["owner"]}))
    refused(as_role("worker"), "DELETE FROM audit_events")
