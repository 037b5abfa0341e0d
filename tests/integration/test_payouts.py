"""payout_batch on real PostgreSQL (and once on SQLite), through the command executor."""

from __future__ import annotations

import dataclasses
import threading
from decimal import Decimal

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from services import payouts, schema, sweep
from services.atomic_transaction_manager import InvalidCommandError
from services.command_executor import execute_command
from services.db import get_engine
from services.payouts import payout_item_rows, payout_progress
from services.verify import verify_ledger
from tests.support.builders import item, payout
from tests.support.ledger import assert_ledger_sound
from tests.support.outbox import age
from tests.support.publishing import FakePublisher
from tests.support.signing import signed


def batch(key, items, **fields):
    """A payout_batch command, signed as the test's producer (an admin: any funding account)."""
    return signed(payout(key, items, **fields))


def outcomes(engine, settings, key):
    with engine.connect() as conn:
        return {row["reference"]: (row["outcome"], row["error"])
                for row in payout_item_rows(conn, key, settings.asset_scale)}


def times_paid(engine, reference_prefix=""):
    """How many transfers paid each reference (joined through the items that paid them)."""
    i = schema.payout_items
    with engine.connect() as conn:
        rows = conn.execute(select(i.c.reference, func.count()).where(
            i.c.outcome == "paid", i.c.reference.like(f"{reference_prefix}%"))
            .group_by(i.c.reference)).all()
    return dict(rows)


def count_transfers(engine, kind="payout"):
    with engine.connect() as conn:
        return conn.execute(text("SELECT COUNT(*), COALESCE(SUM(amount_minor), 0) FROM transfers "
                                 "WHERE kind = :k"), {"k": kind}).one()


@pytest.fixture(autouse=True)
def _no_hooks():
    yield
    payouts.AFTER_CHUNK_HOOKS.clear()


# --- schema -----------------------------------------------------------------------------


def test_the_migrated_database_matches_the_schema_module(engine):
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                schema.metadata)
    assert diff == []


def test_the_database_refuses_a_second_payment_of_a_reference_from_one_account(
        service, engine, settings):
    service.admin_create_tokens("10.00")
    execute_command(batch("once", [item("ann", "1.00", "once-1")]), engine=engine,
                    settings=settings)
    insert = text("INSERT INTO payout_items (command_id, item_index, user_id, amount_minor, "
                  "reference, outcome, error_code, funding_account_id) SELECT command_id, 1, "
                  "'bob', 100, reference, :outcome, :error, funding_account_id FROM payout_items")
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(insert, {"outcome": "paid", "error": None})
    with engine.begin() as conn:  # a reference may be rejected or a duplicate any number of times
        conn.execute(insert, {"outcome": "rejected", "error": "insufficient_balance"})
    checks = {check.name: check for check in verify_ledger(engine, settings.asset_scale)}
    assert not checks["commands_have_their_transfers"].ok  # an item the batch never decided
    assert "2 items; the batch decided 1" in checks["commands_have_their_transfers"].detail
    assert all(check.ok for name, check in checks.items() if name != "commands_have_their_transfers")


# --- independent items ------------------------------------------------------------------


def test_ten_thousand_items_pay_until_the_treasury_runs_dry(service, engine, settings):
    service.admin_create_tokens("1000000.00")
    for n in range(50):
        service.admin_sell_tokens_to_user(f"known-{n}", "1.00")
    treasury_minor = 1_000_000_00 - 50_00
    # Items to 50 known users and to unknown-but-valid ones, amounts 1.01 .. 300.00.
    rows, expected, left = [], {}, treasury_minor
    for n in range(10_000):
        user = f"known-{n % 50}" if n % 7 == 0 else f"new-{n}"
        minor = 101 + (n * 7919) % 29_900
        rows.append(item(user, f"{minor // 100}.{minor % 100:02d}", f"inv-{n}"))
        if minor <= left:
            left -= minor
            expected[f"inv-{n}"] = ("paid", None)
        else:
            expected[f"inv-{n}"] = ("rejected", "insufficient_balance")
    paid_minor = treasury_minor - left
    assert 0 < sum(o == "paid" for o, _ in expected.values()) < 10_000  # runs dry part-way

    record = execute_command(batch("payday-1", rows), engine=engine, settings=settings)

    assert record.status == "succeeded"
    result = record.result
    n_paid = sum(o == "paid" for o, _ in expected.values())
    assert result["paid"] == n_paid and result["rejected"] == 10_000 - n_paid
    assert result["duplicate"] == 0
    assert result["chunks"] == -(-10_000 // settings.payout_chunk_items)
    assert Decimal(result["amount_paid"]) == Decimal(paid_minor) / 100
    assert result["rejected_by_code"] == {"insufficient_balance": 10_000 - n_paid}
    assert outcomes(engine, settings, "payday-1") == expected
    assert count_transfers(engine) == (n_paid, paid_minor)
    assert service.balance("new-1").available == Decimal(rows[1]["amount"])
    assert service.balance("known-0").available == Decimal("1.00") + sum(
        Decimal(r["amount"]) for n, r in enumerate(rows)
        if r["user"] == "known-0" and expected[f"inv-{n}"][0] == "paid")
    assert_ledger_sound(engine, settings)


def test_a_reference_paid_before_is_a_duplicate_in_a_later_batch(service, engine, settings):
    service.admin_create_tokens("100.00")
    execute_command(batch("b-1", [item("ann", "1.00", "r-1"), item("bob", "2.00", "r-2")]),
                    engine=engine, settings=settings)
    second = execute_command(batch("b-2", [item("ann", "1.00", "r-1"), item("cat", "3.00", "r-3")]),
                             engine=engine, settings=settings)
    assert second.result["paid"] == 1 and second.result["duplicate"] == 1
    assert outcomes(engine, settings, "b-2") == {"r-1": ("duplicate", None), "r-3": ("paid", None)}
    assert service.balance("ann").available == Decimal("1.00")
    balances = {row["account"]: row["balance"] for row in service.balances()}
    assert balances["platform:treasury"] == Decimal("94.00")
    assert_ledger_sound(engine, settings)


def test_the_same_batch_again_returns_its_stored_outcome(service, engine, settings):
    service.admin_create_tokens("10.00")
    command = batch("again", [item("ann", "1.00", "a-1")])
    first = execute_command(command, engine=engine, settings=settings)
    second = execute_command(command, engine=engine, settings=settings)
    assert second.result == first.result and second.attempts == 1
    assert count_transfers(engine) == (1, 100)


def test_a_batch_with_a_bad_row_is_refused_whole_naming_the_row(engine, settings):
    rows = [item("ann", "1.00", "x-1"), item("bob", "1.005", "x-2")]
    with pytest.raises(InvalidCommandError) as caught:
        execute_command(batch("bad", rows), engine=engine, settings=settings)
    assert "items.1.amount" in caught.value.message
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM commands")).scalar_one() == 0


# --- funding accounts -------------------------------------------------------------------


@pytest.mark.parametrize("account", ["system:external", "system:issuance", "user:ann:escrow",
                                     "somewhere"])
def test_only_the_platform_or_a_users_available_account_may_fund(service, engine, settings,
                                                                  account):
    record = execute_command(batch("f-1", [item("bob", "1.00", "f-1")], from_account=account),
                             engine=engine, settings=settings)
    assert record.status == "rejected" and record.error["code"] == "forbidden"
    assert count_transfers(engine) == (0, 0)
    assert_ledger_sound(engine, settings)


def test_a_user_pays_others_from_their_wallet_but_not_themself(service, engine, settings):
    service.admin_create_tokens("10.00")
    service.admin_sell_tokens_to_user("boss", "5.00")
    record = execute_command(
        batch("u-1", [item("bob", "2.00", "u-1"), item("boss", "1.00", "u-2"),
                      item("cat", "4.00", "u-3")], from_account="user:boss:available"),
        engine=engine, settings=settings)
    assert outcomes(engine, settings, "u-1") == {
        "u-1": ("paid", None), "u-2": ("rejected", "forbidden"),
        "u-3": ("rejected", "insufficient_balance")}
    assert service.balance("boss").available == Decimal("3.00")
    unknown = execute_command(batch("u-2", [item("bob", "1.00", "u-9")],
                                    from_account="user:nobody:available"),
                              engine=engine, settings=settings)
    assert unknown.status == "rejected" and unknown.error["code"] == "unknown_user"
    assert record.result["paid"] == 1
    assert_ledger_sound(engine, settings)


def test_a_user_pays_out_down_to_their_overdraft_limit_and_no_further(service, engine,
                                                                     settings):
    service.admin_create_tokens("10.00")
    service.admin_sell_tokens_to_user("boss", "5.00")
    service.execute({"type": "set_account_limit", "idempotency_key": "limit-boss", "user": "boss",
                     "limit": "3.00"})
    record = execute_command(
        batch("od-1", [item("bob", "6.00", "od-1"), item("cat", "3.00", "od-2"),
                       item("dan", "2.00", "od-3")], from_account="user:boss:available"),
        engine=engine, settings=settings)
    assert outcomes(engine, settings, "od-1") == {
        "od-1": ("paid", None), "od-2": ("rejected", "limit_exceeded"), "od-3": ("paid", None)}
    assert record.result["paid"] == 2
    assert service.balance("boss").available == Decimal("-3.00")
    refused = execute_command(batch("od-2", [item("eve", "0.01", "od-4")], atomic=True,
                                    from_account="user:boss:available"),
                              engine=engine, settings=settings)
    assert refused.status == "rejected" and refused.error["code"] == "limit_exceeded"
    assert_ledger_sound(engine, settings)


def test_a_user_pays_out_what_their_daily_debit_limit_leaves_today(service, engine, settings):
    """Item by item, across chunks (each chunk reads the day's legs again under the lock)."""
    service.admin_create_tokens("100.00")
    service.admin_sell_tokens_to_user("boss", "50.00")
    service.transfer_tokens_between_users("boss", "ann", "1.00", idempotency_key="today")
    service.execute({"type": "set_account_limit", "idempotency_key": "daily-boss", "user": "boss",
                     "limit": "0", "daily_debit_limit": "4.00"})
    settings = dataclasses.replace(settings, payout_chunk_items=2)
    record = execute_command(
        batch("d-1", [item(u, "1.00", f"d-{u}") for u in ("b1", "b2", "b3", "b4", "b5")],
              from_account="user:boss:available"), engine=engine, settings=settings)
    assert record.result["chunks"] == 3 and record.result["paid"] == 3
    assert [outcomes(engine, settings, "d-1")[f"d-{u}"] for u in ("b1", "b2", "b3", "b4", "b5")
            ] == [("paid", None)] * 3 + [("rejected", "limit_exceeded")] * 2
    assert service.balance("boss").available == Decimal("46.00")
    refused = execute_command(batch("d-2", [item("eve", "0.01", "d-eve")], atomic=True,
                                    from_account="user:boss:available"),
                              engine=engine, settings=settings)
    assert refused.status == "rejected" and refused.error["code"] == "limit_exceeded"
    assert "daily debit limit" in refused.error["message"]
    assert_ledger_sound(engine, settings)


def test_the_fees_account_funds_a_payout_and_an_empty_one_pays_nothing(engine, settings):
    record = execute_command(batch("fees-1", [item("bob", "1.00", "fe-1")],
                                   from_account="platform:fees"), engine=engine, settings=settings)
    assert record.status == "succeeded" and record.result["rejected"] == 1
    assert outcomes(engine, settings, "fees-1") == {"fe-1": ("rejected", "insufficient_balance")}
    assert_ledger_sound(engine, settings)


# --- atomic -----------------------------------------------------------------------------


def test_an_atomic_batch_with_one_item_it_cannot_cover_pays_nothing(service, engine, settings):
    service.admin_create_tokens("10.00")
    rows = [item(f"p-{n}", "1.00", f"at-{n}") for n in range(10)] + [item("last", "0.01", "at-x")]
    record = execute_command(batch("atomic-1", rows, atomic=True), engine=engine,
                             settings=settings)
    assert record.status == "rejected" and record.error["code"] == "insufficient_balance"
    assert "item 10" in record.error["message"]
    assert count_transfers(engine) == (0, 0)
    with engine.connect() as conn:
        progress = payout_progress(conn, "atomic-1", settings.asset_scale)
        assert conn.execute(text("SELECT COUNT(*) FROM accounts WHERE kind = 'user_available'")
                            ).scalar_one() == 0
    assert progress["paid"] == 0 and progress["status"] == "rejected"
    ok = execute_command(batch("atomic-2", rows[:10], atomic=True), engine=engine,
                         settings=settings)
    assert ok.status == "succeeded" and ok.result["paid"] == 10 and ok.result["chunks"] == 1
    assert_ledger_sound(engine, settings)


def test_payouts_done_reads_each_batch_status_and_items_decided_as_progress_does(
        service, engine, settings):
    """What `walletq payout` polls: the same figures payout_progress gives, for a batch not
    started (no batch row: 0 decided), one stopped mid-way and one ended; unknown keys absent."""
    service.admin_create_tokens("100000.00")
    chunk_items = settings.payout_chunk_items
    rows = [item(f"d-{n % 50}", "1.00", f"dn-{n}") for n in range(2 * chunk_items)]
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO commands (idempotency_key, type, payload, payload_hash, "
                          "status, attempts, created_at, updated_at) VALUES ('waiting', "
                          "'payout_batch', '{}', repeat('0', 64), 'accepted', 0, now(), now())"))

    def crash(key, chunks_done):
        raise Crash(f"{key} died after chunk {chunks_done}")

    payouts.AFTER_CHUNK_HOOKS.append(crash)
    with pytest.raises(Crash):
        execute_command(batch("half", rows), engine=engine, settings=settings)
    payouts.AFTER_CHUNK_HOOKS.clear()
    execute_command(batch("whole", rows[:10]), engine=engine, settings=settings)
    with engine.connect() as conn:
        done = payouts.payouts_done(conn, ["waiting", "half", "whole", "nobody"])
        progress = {key: payout_progress(conn, key, settings.asset_scale)
                    for key in ("half", "whole")}
    assert done == {"waiting": ("accepted", 0), "half": ("processing", chunk_items),
                    "whole": ("succeeded", 10)}
    assert all(done[key] == (p["status"], p["done"]) for key, p in progress.items())


# --- crashes and races ------------------------------------------------------------------


class Crash(Exception):
    pass


def test_a_crash_after_the_first_chunk_resumes_and_pays_each_item_once(
        service, engine, settings):
    service.admin_create_tokens("100000.00")
    chunk_items = settings.payout_chunk_items
    rows = [item(f"c-{n % 300}", "1.25", f"cr-{n}") for n in range(2 * chunk_items)]

    def crash(key, chunks_done):
        if chunks_done == 1:
            raise Crash(f"{key} died after chunk {chunks_done}")

    payouts.AFTER_CHUNK_HOOKS.append(crash)
    with pytest.raises(Crash):
        execute_command(batch("crash-1", rows), engine=engine, settings=settings)
    with engine.connect() as conn:
        progress = payout_progress(conn, "crash-1", settings.asset_scale)
    assert progress["status"] == "processing" and progress["done"] == chunk_items
    assert count_transfers(engine) == (chunk_items, chunk_items * 125)
    payouts.AFTER_CHUNK_HOOKS.clear()

    record = execute_command(batch("crash-1", rows), engine=engine, settings=settings)

    assert record.status == "succeeded" and record.attempts == 2
    n = 2 * chunk_items
    assert record.result["paid"] == n
    assert set(times_paid(engine, "cr-").values()) == {1} and len(times_paid(engine)) == n
    assert count_transfers(engine) == (n, n * 125)
    assert service.balance("c-0").available == Decimal("1.25") * len(range(0, n, 300))
    assert_ledger_sound(engine, settings)


def test_a_crash_after_chunk_two_resumes_from_the_last_committed_chunk(
        service, engine, settings, monkeypatch):
    from services import settings as settings_module

    monkeypatch.setenv("WALLETQ_PAYOUT_CHUNK_ITEMS", "50")
    settings_module.reset_settings()
    small = settings_module.get_settings()
    service.admin_create_tokens("1000.00")
    rows = [item(f"s-{n}", "0.50", f"sm-{n}") for n in range(420)]
    seen = []

    def crash(key, chunks_done):
        seen.append(chunks_done)
        if chunks_done == 2:
            raise Crash("after chunk 2")

    payouts.AFTER_CHUNK_HOOKS.append(crash)
    with pytest.raises(Crash):
        execute_command(batch("small", rows), engine=engine, settings=small)
    assert count_transfers(engine) == (100, 100 * 50)
    payouts.AFTER_CHUNK_HOOKS.remove(crash)
    record = execute_command(batch("small", rows), engine=engine, settings=small)
    assert seen == [1, 2]
    assert record.result["chunks"] == 9 and record.result["paid"] == 420
    assert set(times_paid(engine, "sm-").values()) == {1}
    assert_ledger_sound(engine, settings)


def test_two_batches_sharing_references_at_once_pay_each_reference_once(
        service, engine, settings):
    service.admin_create_tokens("100000.00")
    shared = [item(f"sh-{n}", "3.00", f"shared-{n}") for n in range(1_200)]
    own_a = [item(f"a-{n}", "1.00", f"only-a-{n}") for n in range(300)]
    own_b = [item(f"b-{n}", "1.00", f"only-b-{n}") for n in range(300)]
    commands = [batch("race-a", own_a[:150] + shared + own_a[150:]),
                batch("race-b", shared[::-1] + own_b)]
    records, errors = {}, []
    barrier = threading.Barrier(2)

    def run(command):
        try:
            barrier.wait()
            records[command["idempotency_key"]] = execute_command(command, engine=engine,
                                                                  settings=settings)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in commands]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    a, b = records["race-a"].result, records["race-b"].result
    assert a["paid"] + b["paid"] == 1_200 + 600
    assert a["duplicate"] + b["duplicate"] == 1_200
    paid = times_paid(engine)
    assert len(paid) == 1_800 and set(paid.values()) == {1}
    for n in (0, 599, 1_199):
        assert service.balance(f"sh-{n}").available == Decimal("3.00")
    assert_ledger_sound(engine, settings)


def test_a_batch_left_processing_is_not_swept_while_it_progresses(
        service, engine, settings, monkeypatch):
    """Each committed chunk restarts the command's clock, so a long batch that is moving
    is never republished, however long it has been running; a stalled one is."""
    from services import settings as settings_module

    monkeypatch.setenv("WALLETQ_PAYOUT_CHUNK_ITEMS", "10")
    settings_module.reset_settings()
    small = settings_module.get_settings()
    service.admin_create_tokens("100.00")
    swept = []

    def after_chunk(key, chunks_done):
        if chunks_done == 1:
            age(engine, key, 3600)  # as if the batch had started an hour ago and stalled
            stalled = sweep.run_once(FakePublisher(), engine=engine, settings=small, grace_s=60)
            swept.append(stalled.found)
            age(engine, key, 3600)  # undo the sweep's own restart of the clock
        elif chunks_done == 2:  # chunk 2 committed since: the batch is moving again
            publisher = FakePublisher()
            moving = sweep.run_once(publisher, engine=engine, settings=small, grace_s=60)
            swept.append(moving.found)
            assert publisher.published == []

    payouts.AFTER_CHUNK_HOOKS.append(after_chunk)
    record = execute_command(batch("hb", [item(f"u{n}", "1.00", f"hb-{n}") for n in range(30)]),
                             engine=engine, settings=small)
    assert record.status == "succeeded" and record.result["chunks"] == 3
    assert swept == [1, 0]
    assert_ledger_sound(engine, settings)


# --- embedded -----------------------------------------------------------------------------


def test_a_payout_on_embedded_sqlite(sqlite_env):
    settings = sqlite_env
    engine = get_engine(settings)
    execute_command(signed({"type": "admin_create_tokens", "idempotency_key": "m", "amount": "5.00"}),
                    engine=engine, settings=settings)
    rows = [item(f"q-{n}", "1.00", f"sq-{n}") for n in range(7)]
    record = execute_command(batch("sq-1", rows), engine=engine, settings=settings)
    assert record.result["paid"] == 5 and record.result["rejected"] == 2
    again = execute_command(batch("sq-2", rows[:2]), engine=engine, settings=settings)
    assert again.result["duplicate"] == 2
    assert_ledger_sound(engine, settings)
