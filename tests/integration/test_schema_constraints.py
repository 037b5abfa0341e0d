"""What must never happen is refused by the database itself, whatever the code above it does.

Raw inserts and updates, bypassing the services, on PostgreSQL and on embedded SQLite.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import insert, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from services import schema
from services.db import get_engine
from services.settings import get_settings
from services.wallet_service import WalletService
from tests.support.builders import item, payout
from tests.support.ledger import count

a, c, t, h = schema.accounts, schema.commands, schema.transfers, schema.holds


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest) -> Engine:
    request.getfixturevalue("walletq_env" if request.param == "postgresql" else "sqlite_env")
    return get_engine(get_settings())


@pytest.fixture
def pg(walletq_env: dict[str, str]) -> Engine:
    return get_engine(get_settings())


def command_row(key: str = "k-1", **over: Any) -> dict[str, Any]:
    return {"idempotency_key": key, "type": "credit_wallet", "payload": "{}",
            "payload_hash": "0" * 64, "status": "processing", **over}


def account_row(code: str, kind: str = "user_available", may_go_negative: bool = False,
                **over: Any) -> dict[str, Any]:
    return {"code": code, "kind": kind, "user_id": None, "may_go_negative": may_go_negative,
            "balance_minor": 0, **over}


@pytest.fixture
def ids(db: Engine) -> dict[str, int]:
    """One command and two accounts, for the rows the tests try to write."""
    with db.begin() as conn:
        command_id = conn.execute(insert(c).values(**command_row())).inserted_primary_key[0]
        alice = conn.execute(insert(a).values(**account_row("user:alice:available"))).inserted_primary_key[0]
        ext = conn.execute(insert(a).values(**account_row("system:external", "external", True))
                           ).inserted_primary_key[0]
    return {"command": command_id, "alice": alice, "external": ext}


def refused(engine: Engine, statement: Any, match: str, error: type[Exception] = IntegrityError) -> None:
    with pytest.raises(error, match=match), engine.begin() as conn:
        conn.execute(statement)


def transfer(ids: dict[str, int], **over: Any) -> Any:
    row = {"command_id": ids["command"], "debit_account_id": ids["external"],
           "credit_account_id": ids["alice"], "amount_minor": 100, "kind": "credit", **over}
    return insert(t).values(**row)


# --- accounts ---------------------------------------------------------------------------


def test_an_account_that_may_not_go_negative_cannot_be_set_below_zero(
    db: Engine, ids: dict[str, int]
) -> None:
    refused(db, update(a).where(a.c.id == ids["alice"]).values(balance_minor=-1),
            "balance_nonnegative")
    refused(db, insert(a).values(**account_row("platform:fees", "fees", balance_minor=-5)),
            "balance_nonnegative")


def test_an_account_that_may_go_negative_can(db: Engine, ids: dict[str, int]) -> None:
    with db.begin() as conn:
        conn.execute(update(a).where(a.c.id == ids["external"]).values(balance_minor=-10**15))


def test_an_account_code_is_unique_non_empty_and_of_a_known_kind(
    db: Engine, ids: dict[str, int]
) -> None:
    refused(db, insert(a).values(**account_row("user:alice:available")), "unique|UNIQUE|duplicate")
    refused(db, insert(a).values(**account_row("")), "code_length")
    refused(db, insert(a).values(**account_row("user:x:other", kind="savings")), "ck_accounts_kind")


# --- transfers --------------------------------------------------------------------------


def test_a_transfer_amount_must_be_positive(db: Engine, ids: dict[str, int]) -> None:
    for amount_minor in (0, -100):
        refused(db, transfer(ids, amount_minor=amount_minor), "amount_positive")


def test_a_transfer_must_move_between_two_different_accounts(db: Engine, ids: dict[str, int]) -> None:
    refused(db, transfer(ids, debit_account_id=ids["alice"]), "distinct_accounts")


def test_a_transfer_must_reference_an_existing_command_and_existing_accounts(
    db: Engine, ids: dict[str, int]
) -> None:
    for column in ("command_id", "debit_account_id", "credit_account_id"):
        refused(db, transfer(ids, **{column: 999_999}), "foreign key|FOREIGN KEY")
    with db.begin() as conn:
        conn.execute(transfer(ids))  # the same row, well formed, is accepted


# --- commands ---------------------------------------------------------------------------


def test_an_idempotency_key_exists_once(db: Engine, ids: dict[str, int]) -> None:
    refused(db, insert(c).values(**command_row("k-1", type="debit_wallet")),
            "unique|UNIQUE|duplicate")


def test_a_command_status_is_one_of_the_lifecycle(db: Engine, ids: dict[str, int]) -> None:
    refused(db, insert(c).values(**command_row("k-2", status="done")), "ck_commands_status")


def test_a_command_has_an_error_code_exactly_when_it_was_refused(
    db: Engine, ids: dict[str, int]
) -> None:
    refused(db, insert(c).values(**command_row("k-2", status="rejected")), "error_iff_refused")
    refused(db, insert(c).values(**command_row("k-3", status="failed")), "error_iff_refused")
    refused(db, insert(c).values(**command_row("k-4", status="succeeded", error_code="internal")),
            "error_iff_refused")
    with db.begin() as conn:
        conn.execute(insert(c).values(**command_row("k-5", status="rejected",
                                                    error_code="insufficient_balance")))


def test_an_empty_idempotency_key_is_refused(db: Engine, ids: dict[str, int]) -> None:
    refused(db, insert(c).values(**command_row("")), "key_length")


def test_an_audit_event_must_reference_an_existing_command(db: Engine, ids: dict[str, int]) -> None:
    refused(db, insert(schema.audit_events).values(
        command_id=999_999, command_type="credit_wallet", outcome="succeeded", accounts=[],
        amounts=[], detail={}), "foreign key|FOREIGN KEY")


# --- holds ------------------------------------------------------------------------------


def hold(ids: dict[str, int], **over: Any) -> Any:
    row = {"hold_id": "o-1", "payer": "alice", "payee": "bob", "amount_minor": 500,
           "status": "held", "opened_by": ids["command"], **over}
    return insert(h).values(**row)


HOLD_VIOLATIONS = [
    ({"payee": "alice"}, "distinct_users"),
    ({"amount_minor": 0}, "amount_positive"),
    ({"status": "lost", "closed_by": "COMMAND", "released_minor": 500}, "ck_holds_status"),
    ({"fee_minor": 501}, "fee_range"),
    ({"fee_minor": -1}, "fee_range"),
    ({"status": "released", "released_minor": 500}, "closed_iff_not_held"),
    ({"closed_by": "COMMAND"}, "closed_iff_not_held"),
    ({"opened_by": 999_999}, "foreign key|FOREIGN KEY"),
    # Migration 0006: partial capture and expiry.
    ({"released_minor": -1}, "parts_non_negative"),
    ({"refunded_minor": -1}, "parts_non_negative"),
    ({"status": "refunded", "closed_by": "COMMAND", "released_minor": 300, "refunded_minor": 201},
     "parts_within_amount"),
    ({"released_minor": 500}, "open_iff_remaining"),
    ({"status": "expired", "closed_by": "COMMAND", "refunded_minor": 499}, "open_iff_remaining"),
]


def test_a_hold_that_makes_no_sense_is_refused(db: Engine, ids: dict[str, int]) -> None:
    for over, match in HOLD_VIOLATIONS:
        values = {k: ids["command"] if v == "COMMAND" else v for k, v in over.items()}
        refused(db, hold(ids, **values), match)


def test_a_hold_id_exists_once(db: Engine, ids: dict[str, int]) -> None:
    with db.begin() as conn:
        conn.execute(hold(ids))
    refused(db, hold(ids, payer="carol"), "unique|UNIQUE|duplicate")


# --- text length (PostgreSQL: SQLite does not enforce VARCHAR lengths) -------------------


def test_text_longer_than_its_column_is_refused_on_postgresql(pg: Engine) -> None:
    too_long = [
        insert(c).values(**command_row("k" * 201)),
        insert(c).values(**command_row("k-2", type="t" * 41)),
        insert(c).values(**command_row("k-2", status="rejected", error_code="e" * 41)),
        insert(c).values(**command_row("k-2", status="rejected", error_code="internal",
                                       error_message="m" * 2001)),
        insert(a).values(**account_row("c" * 221)),
        insert(a).values(**account_row("user:u:available", user_id="u" * 201)),
        insert(h).values(hold_id="o" * 201, payer="a", payee="b", amount_minor=1, status="held",
                         opened_by=1),
    ]
    for statement in too_long:
        refused(pg, statement, "too long", DataError)


def test_text_of_exactly_the_column_length_is_accepted_on_postgresql(pg: Engine) -> None:
    with pg.begin() as conn:
        conn.execute(insert(c).values(**command_row("k" * 200)))
        conn.execute(insert(a).values(**account_row("c" * 220, user_id="u" * 200)))


def test_a_payload_over_four_megabytes_is_refused_on_postgresql(pg: Engine) -> None:
    refused(pg, insert(c).values(**command_row("k-2", payload="x" * (4 * 1024 * 1024 + 1))),
            "payload_length")


APPEND_ONLY = ["transfers", "audit_events", "payout_items"]


@pytest.mark.parametrize("statement", ["UPDATE {table} SET command_id = command_id",
                                       "DELETE FROM {table}"])
@pytest.mark.parametrize("table", APPEND_ONLY)
def test_the_append_only_function_refuses_with_restrict_violation_on_postgresql(
    pg: Engine, table: str, statement: str
) -> None:
    service = WalletService(pg, get_settings())
    service.admin_create_tokens("10.00")
    service.execute(payout("pay-1", [item("bob", "1.00", "r-1")]))
    rows_before = count(pg, table)
    assert rows_before > 0
    with pytest.raises(DBAPIError) as caught, pg.begin() as conn:
        conn.execute(text(statement.format(table=table)))
    assert caught.value.orig.pgcode == "23001"  # type: ignore[union-attr]  # restrict_violation
    assert f"{table} is append-only" in str(caught.value.orig)
    assert count(pg, table) == rows_before
