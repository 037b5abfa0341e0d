"""The worker fixture itself: a real worker answers, survives SIGKILL and a restart."""

from __future__ import annotations

from tests.support.ledger import assert_ledger_sound


def test_a_real_worker_answers_a_submitted_command(worker, client):
    client.submit({"type": "credit_wallet", "idempotency_key": "dep-1", "user": "alice",
                   "amount": "10.00"})
    record = client.wait("dep-1", timeout=20)
    assert record.status == "succeeded", worker.log_tail()
    assert str(client.balance("alice")["available"]) == "10.00"
    assert_ledger_sound(client.engine, client.settings)


def test_a_killed_worker_restarts_on_the_same_queues(worker, client):
    worker.kill()
    assert not worker.alive
    client.submit({"type": "credit_wallet", "idempotency_key": "dep-2", "user": "bob",
                   "amount": "1.00"})
    worker.start()
    assert client.wait("dep-2", timeout=20).status == "succeeded", worker.log_tail()
    assert worker.starts == 2
    assert_ledger_sound(client.engine, client.settings)
