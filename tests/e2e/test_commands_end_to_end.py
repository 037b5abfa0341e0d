"""Every command type, submitted through WalletClient and through `walletq submit`,
answered by a real `celery worker` on PostgreSQL and Redis."""

from __future__ import annotations

from decimal import Decimal

from tests.support.cli import walletq
from tests.support.ledger import assert_ledger_sound, transfers

# Phases: a command of one phase may depend on an earlier phase's effect, never on one
# of its own (the worker runs two at a time, in any order).
PHASES = [
    [{"type": "admin_create_tokens", "idempotency_key": "mint-1", "amount": "1000.00"},
     {"type": "credit_wallet", "idempotency_key": "dep-1", "user": "bob", "amount": "40.00",
      "memo": "card top-up"}],
    [{"type": "admin_sell_tokens_to_user", "idempotency_key": "sale-1", "user": "alice",
      "amount": "300.00"},
     {"type": "debit_wallet", "idempotency_key": "wd-1", "user": "bob", "amount": "15.00"}],
    [{"type": "transfer_tokens_between_users", "idempotency_key": "t-1", "from_user": "alice",
      "to_user": "bob", "amount": "20.50"},
     {"type": "transfer_to_escrow", "idempotency_key": "o-1-hold", "hold_id": "o-1",
      "payer": "alice", "payee": "carol", "amount": "100.00"},
     {"type": "transfer_to_escrow", "idempotency_key": "o-2-hold", "hold_id": "o-2",
      "payer": "alice", "payee": "carol", "amount": "30.00"}],
    [{"type": "release_from_escrow", "idempotency_key": "o-1-done", "hold_id": "o-1",
      "fee_rate": "0.10"},
     {"type": "refund_from_escrow", "idempotency_key": "o-2-cancel", "hold_id": "o-2"},
     {"type": "payout_batch", "idempotency_key": "payday-1", "from_account": "platform:treasury",
      "items": [{"user": "dave", "amount": "12.00", "reference": "inv-1"},
                {"user": "erin", "amount": "8.00", "reference": "inv-2"}]}],
    [{"type": "user_sell_tokens_to_admin", "idempotency_key": "cash-1", "user": "carol",
      "amount": "50.00"}],
]

EXPECTED = {
    # alice: 300 - 20.50 - 100 - 30 + 30 (refund)
    "alice": ("179.50", "0.00"),
    "bob": ("45.50", "0.00"),       # 40 - 15 + 20.50
    "carol": ("40.00", "0.00"),     # 100 - 10 fee - 50 cashed out
    "dave": ("12.00", "0.00"),
    "erin": ("8.00", "0.00"),
}


def _check_outcome(client) -> None:
    for phase in PHASES:
        for command in phase:
            record = client.status(command["idempotency_key"])
            assert record.status == "succeeded", record.to_dict()
    for user, (available, escrow) in EXPECTED.items():
        balance = client.balance(user)
        assert balance == {"available": Decimal(available), "escrow": Decimal(escrow)}, user
    assert len(transfers(client.engine, "o-1-done")) == 2  # payee and fee
    assert_ledger_sound(client.engine, client.settings)


def test_every_command_type_through_the_client_is_applied_by_the_worker(worker, client):
    for phase in PHASES:
        records = [client.submit(command) for command in phase]
        assert {r.status for r in records} <= {"accepted", "processing", "succeeded"}
        ended = client.wait_all([c["idempotency_key"] for c in phase], timeout=30)
        assert all(r.status == "succeeded" for r in ended.values()), (
            [r.to_dict() for r in ended.values()], worker.log_tail())
    _check_outcome(client)


def test_every_command_type_through_walletq_submit_is_applied_by_the_worker(worker, client):
    import json

    for phase in PHASES:
        lines = "".join(json.dumps(command) + "\n" for command in phase)
        done = walletq("--json", "submit", "-", stdin=lines, process=True)
        assert done.exit_code == 0, done
        answers = done.json_lines()
        assert [a["idempotency_key"] for a in answers] == [c["idempotency_key"] for c in phase]
        for command in phase:
            waited = walletq("status", command["idempotency_key"], "--wait", "30", "--json")
            assert waited.exit_code == 0, (waited, worker.log_tail())
            assert waited.json()["status"] == "succeeded"
    _check_outcome(client)


def test_a_single_command_submitted_by_the_cli_prints_its_record(worker, client):
    done = walletq("submit", '{"type": "credit_wallet", "idempotency_key": "d-9", '
                   '"user": "zoe", "amount": "3.00"}', "--json", process=True)
    assert done.exit_code == 0, done
    record = done.json()
    assert record["idempotency_key"] == "d-9" and record["type"] == "credit_wallet"
    assert record["status"] in ("accepted", "processing", "succeeded")
    assert set(record) == {"idempotency_key", "type", "status", "result", "error", "attempts",
                           "created_at", "completed_at"}
    assert client.wait("d-9", timeout=20).status == "succeeded"
    assert_ledger_sound(client.engine, client.settings)


def test_a_business_refusal_is_a_rejected_outcome_not_a_task_failure(worker, client):
    client.submit({"type": "debit_wallet", "idempotency_key": "wd-x", "user": "ghost",
                   "amount": "1.00"})
    record = client.wait("wd-x", timeout=20)
    assert record.status == "rejected"
    assert record.error["code"] == "unknown_user"
    assert record.attempts == 1
    assert "Traceback" not in worker.log_text()
    assert_ledger_sound(client.engine, client.settings)
