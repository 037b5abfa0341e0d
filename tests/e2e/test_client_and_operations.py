"""WalletClient's outbox behaviour, and the operator commands: status, commands, sweep, redrive."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import update

from services import schema
from services.atomic_transaction_manager import IdempotencyConflictError, InvalidCommandError
from services.command_executor import record_failure
from services.db import get_engine
from services.settings import get_settings
from tests.e2e.conftest import BROKER_URL, assert_ledger_verifies
from tests.e2e.helpers import accept_only, json_lines, transfers_of, walletq
from worker.client import WalletClient

CREDIT = {"type": "credit_wallet", "idempotency_key": "dep-1", "user": "alice", "amount": "10.00"}


def _age(key: str, seconds: float) -> None:
    c = schema.commands
    with get_engine(get_settings()).begin() as conn:
        conn.execute(update(c).where(c.c.idempotency_key == key)
                     .values(updated_at=datetime.now(UTC) - timedelta(seconds=seconds)))


def test_a_duplicate_submit_returns_the_record_and_publishes_nothing(worker, client):
    first = client.submit(CREDIT)
    assert client.wait("dep-1", timeout=20).status == "succeeded"
    again = client.submit(dict(CREDIT))
    assert again.id == first.id and again.status == "succeeded"
    assert client.status("dep-1").attempts == 1  # no second message reached the worker
    assert transfers_of("dep-1") == 1
    assert_ledger_verifies()


def test_a_conflicting_or_invalid_submit_raises_and_records_nothing(worker, client):
    client.submit(CREDIT)
    with pytest.raises(IdempotencyConflictError):
        client.submit({**CREDIT, "amount": "11.00"})
    with pytest.raises(InvalidCommandError):
        client.submit({**CREDIT, "idempotency_key": "dep-2", "amount": 10.0})
    assert client.status("dep-2") is None
    assert client.wait("dep-1", timeout=20).result is not None
    assert client.balance("alice")["available"] == Decimal("10.00")
    assert_ledger_verifies()


def test_a_stuck_duplicate_is_published_again(worker, client):
    # Recorded but never published (a producer that died between commit and publish).
    accept_only(CREDIT)
    _age("dep-1", 3600)
    client.submit(CREDIT)
    assert client.wait("dep-1", timeout=20).status == "succeeded", worker.log_tail()
    assert_ledger_verifies()


def test_submit_returns_the_accepted_record_when_the_broker_is_down_and_the_sweep_delivers_it(
        worker, client, pipeline_env):
    broken = WalletClient.from_env({**pipeline_env, "WALLETQ_BROKER_URL": "redis://127.0.0.1:1/0"})
    try:
        record = broken.submit(CREDIT)
    finally:
        broken.close()
    assert record.status == "accepted"
    assert client.wait("dep-1", timeout=1).status == "accepted"
    swept = walletq("sweep", "--grace", "0", "--json")
    assert swept.returncode == 0, swept.stderr
    assert json_lines(swept.stdout)[0]["republished"] == 1
    assert client.wait("dep-1", timeout=20).status == "succeeded"
    assert_ledger_verifies()


def test_status_and_commands_answer_in_json_and_for_people(worker, client):
    client.submit(CREDIT)
    client.submit({"type": "debit_wallet", "idempotency_key": "wd-1", "user": "nobody",
                   "amount": "1.00"})
    done = walletq("status", "dep-1", "--wait", "20", "--json")
    assert done.returncode == 0 and json_lines(done.stdout)[0]["status"] == "succeeded"
    assert json_lines(done.stdout)[0]["result"] is not None
    assert client.wait("wd-1", timeout=20).status == "rejected"
    human = walletq("status", "wd-1")
    assert human.returncode == 0 and "unknown_user" in human.stdout
    missing = walletq("--json", "status", "nope")
    assert missing.returncode == 1
    assert json_lines(missing.stdout)[0]["error"]["code"] == "not_found"
    listed = walletq("commands", "--json")
    assert [r["idempotency_key"] for r in json_lines(listed.stdout)] == ["dep-1", "wd-1"]
    rejected = walletq("commands", "--status", "rejected", "--limit", "5", "--json")
    assert [r["idempotency_key"] for r in json_lines(rejected.stdout)] == ["wd-1"]
    assert walletq("commands", "--status", "bogus").returncode == 2
    assert_ledger_verifies()


def test_status_wait_times_out_with_exit_3_while_the_command_is_not_done(pipeline_env):
    accept_only(CREDIT)  # no worker, nothing published
    done = walletq("status", "dep-1", "--wait", "0.5", "--json")
    assert done.returncode == 3
    assert json_lines(done.stdout)[0]["status"] == "accepted"
    assert_ledger_verifies()


def test_sweep_republishes_only_what_is_stuck(worker, client):
    for n in range(3):
        accept_only({**CREDIT, "idempotency_key": f"lost-{n}"})
    fresh = walletq("sweep", "--json")  # default grace (60 s): nothing is old enough
    assert json_lines(fresh.stdout)[0]["republished"] == 0
    for n in range(3):
        _age(f"lost-{n}", 120)
    swept = walletq("sweep", "--json")
    counts = json_lines(swept.stdout)[0]
    assert swept.returncode == 0 and counts["republished"] == 3 and counts["found"] == 3
    ended = client.wait_all([f"lost-{n}" for n in range(3)], timeout=20)
    assert {r.status for r in ended.values()} == {"succeeded"}
    assert client.balance("alice")["available"] == Decimal("30.00")
    assert_ledger_verifies()


def test_redrive_sends_a_failed_command_again_and_refuses_others(worker, client):
    accept_only(CREDIT)
    record_failure("dep-1", {"code": "concurrent_operation", "message": "retries exhausted"},
                   engine=client.engine, settings=client.settings)
    assert client.status("dep-1").status == "failed"
    done = walletq("redrive", "dep-1", "--json")
    assert done.returncode == 0, done.stderr
    assert json_lines(done.stdout)[0]["status"] == "accepted"
    assert client.wait("dep-1", timeout=20).status == "succeeded"
    assert transfers_of("dep-1") == 1
    again = walletq("redrive", "dep-1", "--json")
    assert again.returncode == 1
    assert json_lines(again.stdout)[0]["error"]["code"] == "not_failed"
    assert walletq("redrive", "nope").returncode == 1
    assert_ledger_verifies()


def test_submit_lines_answers_every_line_in_order_and_exits_1_on_a_refusal(worker, client):
    lines = "\n".join([
        '{"type": "credit_wallet", "idempotency_key": "a-1", "user": "al", "amount": "1.00"}',
        'not json',
        '{"type": "credit_wallet", "idempotency_key": "a-1", "user": "al", "amount": "1.00"}',
        '{"type": "credit_wallet", "idempotency_key": "a-1", "user": "al", "amount": "2.00"}',
        '',
        '{"type": "credit_wallet", "idempotency_key": "a-2", "user": "al", "amount": 2}',
        '{"type": "credit_wallet", "idempotency_key": "a-3", "user": "al", "amount": "3.00"}',
    ]) + "\n"
    done = walletq("--json", "submit", "-", stdin=lines)
    assert done.returncode == 1
    answers = json_lines(done.stdout)
    assert len(answers) == 6
    assert answers[0]["idempotency_key"] == "a-1"
    assert answers[1] == {"line": 2, "error": answers[1]["error"]}
    assert answers[1]["error"]["code"] == "invalid_command"
    assert answers[2]["idempotency_key"] == "a-1"  # a duplicate counts as accepted
    assert answers[3]["line"] == 4 and answers[3]["error"]["code"] == "idempotency_conflict"
    assert answers[4]["line"] == 6 and answers[4]["error"]["code"] == "invalid_command"
    assert answers[5]["idempotency_key"] == "a-3"
    assert client.status("a-2") is None  # a refused line records nothing
    ended = client.wait_all(["a-1", "a-3"], timeout=20)
    assert {r.status for r in ended.values()} == {"succeeded"}
    assert client.balance("al")["available"] == Decimal("4.00")
    ok = walletq("--json", "submit", "-", stdin=lines.splitlines()[0] + "\n")
    assert ok.returncode == 0
    assert_ledger_verifies()


def test_a_broker_url_that_is_unreachable_still_leaves_the_cli_submit_accepted(pipeline_env):
    done = walletq("--json", "submit", '{"type": "admin_create_tokens", "idempotency_key": "m-1",'
                   ' "amount": "5.00"}', env={"WALLETQ_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert done.returncode == 0, done.stderr
    assert json_lines(done.stdout)[0]["status"] == "accepted"
    assert BROKER_URL.startswith("redis://")
    assert_ledger_verifies()
