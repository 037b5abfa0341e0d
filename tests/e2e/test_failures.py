"""The real roads to `failed`, each under a real worker, each followed by a redrive that succeeds:
Celery's retries running out on a lock that is never released, a permanent database error,
and the soft time limit. A failed command moved nothing; after the fix, `walletq redrive`
sends it again under its key and it succeeds once."""

from __future__ import annotations

import re

from sqlalchemy import text

from tests.support.builders import credit, debit
from tests.support.cli import walletq
from tests.support.ledger import assert_ledger_sound, audit_outcomes, transfers
from worker.celery_app import EXECUTE_TASK

CELERY_RETRY = rf"Task {re.escape(EXECUTE_TASK)}\[[^\]]+\] retry:"


def redrive_until_succeeded(client, worker, key: str) -> None:
    done = walletq("redrive", key, "--json")
    assert done.exit_code == 0, done
    assert done.json()["status"] == "accepted" and done.json()["error"] is None
    record = client.wait(key, timeout=30)
    assert record.status == "succeeded", worker.log_tail()


def test_a_command_whose_celery_retries_run_out_fails_and_a_redrive_succeeds(
        worker_factory, client):
    worker = worker_factory(env={"WALLETQ_LOCK_TIMEOUT_MS": "200", "WALLETQ_TASK_RETRIES_MAX": "1",
                                 "WALLETQ_TASK_BACKOFF_S_MAX": "1",
                                 "WALLETQ_RETRY_BACKOFF_S": "0.01",
                                 "WALLETQ_RETRY_BACKOFF_S_MAX": "0.05"})
    client.submit(credit("dep", "alice", "10.00"))
    assert client.wait("dep", timeout=20).status == "succeeded"
    with client.engine.connect() as blocker:  # another program holds alice's account row
        blocker.begin()
        blocker.execute(text("SELECT 1 FROM accounts WHERE code = 'user:alice:available'"
                             " FOR UPDATE"))
        client.submit(debit("wd", "alice", "4.00"))
        failed = client.wait("wd", timeout=60)
        blocker.rollback()
    assert failed.status == "failed", worker.log_tail()
    assert failed.error["code"] == "concurrent_operation"
    assert "55P03" in failed.error["message"]  # lock_not_available
    assert len(re.findall(CELERY_RETRY, worker.log_text())) == 1  # WALLETQ_TASK_RETRIES_MAX
    assert transfers(client.engine, "wd") == []

    redrive_until_succeeded(client, worker, "wd")
    assert len(transfers(client.engine, "wd")) == 1
    assert client.balance("alice")["available"] == 6
    assert audit_outcomes(client.engine, "wd") == [("failed", "concurrent_operation"),
                                                   ("redriven", "concurrent_operation"),
                                                   ("succeeded", None)]
    again = walletq("redrive", "wd", "--json")
    assert again.exit_code == 1 and again.json()["error"]["code"] == "not_failed"
    assert walletq("redrive", "nope").exit_code == 1
    assert_ledger_sound(client.engine, client.settings)


def test_a_permanent_database_error_fails_at_once_and_a_redrive_after_the_fix_succeeds(
        worker, client):
    # A bad deployment: a trigger that makes one write fail with numeric_value_out_of_range.
    with client.engine.begin() as conn:
        conn.execute(text("""
            CREATE FUNCTION test_refuse_4242() RETURNS trigger AS $$
            BEGIN
                IF NEW.amount_minor = 4242 THEN
                    RAISE EXCEPTION 'out of range for the test' USING ERRCODE = '22003';
                END IF;
                RETURN NEW;
            END $$ LANGUAGE plpgsql"""))
        conn.execute(text("CREATE TRIGGER test_refuse_4242 BEFORE INSERT ON transfers"
                          " FOR EACH ROW EXECUTE FUNCTION test_refuse_4242()"))
    client.submit(credit("dep-4242", "bob", "42.42"))
    failed = client.wait("dep-4242", timeout=30)
    assert failed.status == "failed", worker.log_tail()
    assert failed.error["code"] == "internal"
    assert "database refused" in failed.error["message"]
    assert "out of range for the test" in failed.error["message"]
    assert failed.attempts == 1 and not re.findall(CELERY_RETRY, worker.log_text())  # no retry
    assert transfers(client.engine, "dep-4242") == []

    with client.engine.begin() as conn:
        conn.execute(text("DROP TRIGGER test_refuse_4242 ON transfers"))
    redrive_until_succeeded(client, worker, "dep-4242")
    assert str(client.balance("bob")["available"]) == "42.42"
    assert audit_outcomes(client.engine, "dep-4242") == [("failed", "internal"),
                                                         ("redriven", "internal"),
                                                         ("succeeded", None)]
    assert_ledger_sound(client.engine, client.settings)


def test_a_command_past_the_soft_time_limit_fails_and_a_redrive_succeeds(worker_factory, client):
    # A time limit of 6 s makes the soft limit 1 s; the command sleeps 3 s in its transaction.
    slow = worker_factory(env={"WALLETQ_TASK_TIME_LIMIT_S": "6", "WALLETQ_TEST_DELAY_S": "3"})
    client.submit(credit("slow", "carol", "5.00"))
    failed = client.wait("slow", timeout=30)
    assert failed.status == "failed", slow.log_tail()
    assert failed.error["code"] == "internal"
    assert failed.error["message"].startswith("SoftTimeLimitExceeded")
    assert transfers(client.engine, "slow") == []
    slow.stop()

    fixed = worker_factory()
    redrive_until_succeeded(client, fixed, "slow")
    assert len(transfers(client.engine, "slow")) == 1
    assert audit_outcomes(client.engine, "slow") == [("failed", "internal"),
                                                     ("redriven", "internal"), ("succeeded", None)]
    assert_ledger_sound(client.engine, client.settings)
