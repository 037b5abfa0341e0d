"""Every command ends, with a real worker: a bug ends its command `failed`/`internal` naming
the exception; a message that kills its pool process on every delivery is quarantined as
`poison` after WALLETQ_DELIVERY_MAX deliveries (counted in the database across the deaths)
and dropped; a redrive after the fix runs it once. The faults are WALLETQ_TEST_FAULT, which
settings refuse unless WALLETQ_TEST_MODE=1."""

from __future__ import annotations

from tests.e2e.conftest import BROKER_URL
from tests.support.broker import broker_idle, queue_state
from tests.support.builders import credit
from tests.support.cli import walletq
from tests.support.ledger import assert_ledger_sound, audit_outcomes, transfers
from tests.support.polling import eventually


def _idle(worker, queue_prefix: str) -> None:
    eventually(lambda: broker_idle(BROKER_URL, queue_prefix), 30,
               describe=lambda: (queue_state(BROKER_URL, queue_prefix), worker.log_tail()))


def test_an_injected_bug_ends_its_command_failed_internal_with_one_audit_row(
        worker_factory, client, queue_prefix):
    worker = worker_factory(env={"WALLETQ_TEST_FAULT": "raise:bug-1"})
    client.submit(credit("bug-1", "alice", "3.00"))
    failed = client.wait("bug-1", timeout=30)
    assert failed.status == "failed", worker.log_tail()
    assert failed.error["code"] == "internal"
    assert failed.error["message"].startswith("KeyError: "), failed.error
    assert transfers(client.engine, "bug-1") == []
    # What Flower shows of the task (its task-succeeded event's result is this same repr):
    # the command's status and error, not a bare SUCCESS with None.
    assert "'idempotency_key': 'bug-1', 'status': 'failed', 'error': {'code': 'internal'" \
        in worker.log_text(), worker.log_tail()
    # A duplicate of the failed command gets its stored outcome: the first error stands,
    # no second audit row.
    client.publish_again(client.status("bug-1"))
    client.submit(credit("marker", "zed", "1.00"))
    assert client.wait("marker", timeout=30).status == "succeeded"
    _idle(worker, queue_prefix)
    assert client.status("bug-1").error == failed.error
    assert audit_outcomes(client.engine, "bug-1") == [("failed", "internal")]
    assert_ledger_sound(client.engine, client.settings)


def test_a_message_that_kills_its_pool_process_every_time_ends_poison_and_redrive_runs_it(
        worker_factory, client, queue_prefix):
    worker = worker_factory(concurrency=1, env={
        "WALLETQ_TEST_FAULT": "exit:poison-1", "WALLETQ_DELIVERY_MAX": "2",
        "WALLETQ_TASK_RETRIES_MAX": "1"})
    pid = worker.pid
    client.submit(credit("poison-1", "alice", "3.00"))
    poisoned = client.wait("poison-1", timeout=60)
    assert poisoned.status == "failed", worker.log_tail()
    assert poisoned.error["code"] == "poison", poisoned.error
    # The first delivery died in its transaction (nothing counted); the next three were
    # each counted by their claim before they ran; the third was over the limit.
    assert poisoned.attempts == 3 and "delivered 3 times" in poisoned.error["message"]
    assert worker.log_text().count("WALLETQ_TEST_FAULT: the process ends") == 3
    _idle(worker, queue_prefix)  # the message was dropped, not requeued
    assert worker.alive and worker.pid == pid
    assert transfers(client.engine, "poison-1") == []
    assert audit_outcomes(client.engine, "poison-1") == [("failed", "poison")]

    listed = walletq("--json", "commands", "--status", "failed")
    assert [r["idempotency_key"] for r in listed.json_lines()] == ["poison-1"], listed
    assert listed.json_lines()[0]["error"]["code"] == "poison"

    worker.stop()  # the fix: the same worker without the fault
    worker.env.pop("WALLETQ_TEST_FAULT")
    worker.start()
    redriven = walletq("redrive", "poison-1", "--json")
    assert redriven.exit_code == 0 and redriven.json()["attempts"] == 0, redriven
    assert client.wait("poison-1", timeout=30).status == "succeeded", worker.log_tail()
    assert len(transfers(client.engine, "poison-1")) == 1
    assert audit_outcomes(client.engine, "poison-1") == [
        ("failed", "poison"), ("redriven", "poison"), ("succeeded", None)]
    assert_ledger_sound(client.engine, client.settings)
