"""The operator commands against a real worker: status, commands, sweep, redrive, submit -.

What the client records and publishes is tested with a fake broker in
tests/integration/test_client_outbox.py; here the messages really travel."""

from __future__ import annotations

from decimal import Decimal

from tests.support.builders import credit, debit
from tests.support.cli import walletq
from tests.support.ledger import assert_ledger_sound, transfers
from tests.support.outbox import accept_only, age
from worker.client import WalletClient

CREDIT = credit("dep-1", "alice", "10.00")
DEAD_BROKER = "redis://127.0.0.1:1/0"


def test_submit_returns_the_accepted_record_when_the_broker_is_down_and_the_sweep_delivers_it(
        worker, client, pipeline_env):
    broken = WalletClient.from_env({**pipeline_env, "WALLETQ_BROKER_URL": DEAD_BROKER})
    try:
        record = broken.submit(CREDIT)
    finally:
        broken.close()
    assert record.status == "accepted"
    assert client.status("dep-1").status == "accepted"
    swept = walletq("sweep", "--grace", "0", "--json")
    assert swept.exit_code == 0, swept
    assert swept.json()["republished"] == 1
    assert client.wait("dep-1", timeout=20).status == "succeeded", worker.log_tail()
    assert_ledger_sound(client.engine, client.settings)


def test_status_and_commands_answer_in_json_and_for_people(worker, client):
    client.submit(CREDIT)
    client.submit(debit("wd-1", "nobody", "1.00"))
    done = walletq("status", "dep-1", "--wait", "20", "--json")
    assert done.exit_code == 0 and done.json()["status"] == "succeeded"
    assert done.json()["result"] is not None
    assert client.wait("wd-1", timeout=20).status == "rejected"
    human = walletq("status", "wd-1")
    assert human.exit_code == 0 and "unknown_user" in human.stdout
    missing = walletq("--json", "status", "nope")
    assert missing.exit_code == 1
    assert missing.json()["error"]["code"] == "not_found"
    listed = walletq("commands", "--json")
    assert [r["idempotency_key"] for r in listed.json_lines()] == ["dep-1", "wd-1"]
    rejected = walletq("commands", "--status", "rejected", "--limit", "5", "--json")
    assert [r["idempotency_key"] for r in rejected.json_lines()] == ["wd-1"]
    assert walletq("commands", "--status", "bogus").exit_code == 2
    assert_ledger_sound(client.engine, client.settings)


def test_status_wait_times_out_with_exit_3_while_the_command_is_not_done(client):
    accept_only(CREDIT, client.engine, client.settings)  # no worker, nothing published
    done = walletq("status", "dep-1", "--wait", "0.5", "--json")
    assert done.exit_code == 3
    assert done.json()["status"] == "accepted"
    assert_ledger_sound(client.engine, client.settings)


def test_sweep_republishes_only_what_is_stuck(worker, client):
    for n in range(3):
        accept_only({**CREDIT, "idempotency_key": f"lost-{n}"}, client.engine, client.settings)
    fresh = walletq("sweep", "--json")  # default grace (60 s): nothing is old enough
    assert fresh.json()["republished"] == 0
    for n in range(3):
        age(client.engine, f"lost-{n}", 120)
    swept = walletq("sweep", "--json")
    counts = swept.json()
    assert swept.exit_code == 0 and counts["republished"] == 3 and counts["found"] == 3
    ended = client.wait_all([f"lost-{n}" for n in range(3)], timeout=20)
    assert {r.status for r in ended.values()} == {"succeeded"}
    assert client.balance("alice")["available"] == Decimal("30.00")
    assert_ledger_sound(client.engine, client.settings)


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
    done = walletq("--json", "submit", "-", stdin=lines, process=True)
    assert done.exit_code == 1
    answers = done.json_lines()
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
    ok = walletq("--json", "submit", "-", stdin=lines.splitlines()[0] + "\n", process=True)
    assert ok.exit_code == 0
    assert len(transfers(client.engine, "a-1")) == 1
    assert_ledger_sound(client.engine, client.settings)


def test_a_broker_url_that_is_unreachable_still_leaves_the_cli_submit_accepted(client):
    done = walletq("--json", "submit", '{"type": "admin_create_tokens", "idempotency_key": "m-1",'
                   ' "amount": "5.00"}', env={"WALLETQ_BROKER_URL": DEAD_BROKER})
    assert done.exit_code == 0, done
    assert done.json()["status"] == "accepted"
    assert client.status("m-1").status == "accepted"
    assert_ledger_sound(client.engine, client.settings)
