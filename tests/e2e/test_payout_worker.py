"""Payout batches through a real Celery worker: the payouts queue, SIGKILL mid-batch (of the
whole worker, or of the one pool process running the batch), the CLI."""

from __future__ import annotations

from sqlalchemy import func, select, text

from services import schema, sweep
from services.payouts import payout_progress
from services.wallet_service import WalletService
from tests.support.builders import items, payout
from tests.support.cli import walletq
from tests.support.ledger import assert_ledger_sound
from tests.support.polling import eventually


def progress(client, key):
    with client.engine.connect() as conn:
        return payout_progress(conn, key, client.settings.asset_scale) or {}


def times_paid(client):
    i = schema.payout_items
    with client.engine.connect() as conn:
        return dict(conn.execute(select(i.c.reference, func.count())
                                 .where(i.c.outcome == "paid").group_by(i.c.reference)).all())


def payout_transfers(client):
    with client.engine.connect() as conn:
        return conn.execute(text("SELECT COUNT(*), COALESCE(SUM(amount_minor), 0) FROM transfers "
                                 "WHERE kind = 'payout'")).one()


def mint(client, amount):
    WalletService(client.engine, client.settings).admin_create_tokens(amount)


def chunks_done_at_least(client, key, n, worker):
    eventually(lambda: (progress(client, key).get("chunks_done") or 0) >= n, 30,
               describe=worker.log_tail)


def test_a_batch_submitted_by_the_client_is_paid_by_the_worker(worker, client):
    mint(client, "10000.00")
    client.submit(payout("w-1", items("w1", 3_000, users="pw")))
    record = client.wait("w-1", timeout=60)
    assert record.status == "succeeded", worker.log_tail()
    chunks = -(-3_000 // client.settings.payout_chunk_items)
    assert record.result["paid"] == 3_000 and record.result["chunks"] == chunks
    assert payout_transfers(client) == (3_000, 300_000)
    assert_ledger_sound(client.engine, client.settings)


def test_a_worker_killed_mid_batch_completes_after_restart_paying_each_item_once(
        worker_factory, client):
    mint(client, "10000.00")
    slow = worker_factory(env={"WALLETQ_TEST_DELAY_S": "0.25", "WALLETQ_PAYOUT_CHUNK_ITEMS": "100"})
    client.submit(payout("kill-1", items("k1", 1_500, amount="2.00", users="pk")))
    chunks_done_at_least(client, "kill-1", 3, slow)
    slow.kill()
    before = progress(client, "kill-1")
    assert before["status"] == "processing" and 0 < before["done"] < 1_500
    assert payout_transfers(client) == (before["paid"], before["paid"] * 200)

    slow.start()
    # Redis gives a SIGKILLed worker's message back only after the visibility timeout;
    # the sweep republishes the command left `processing` (grace 0 here: at once).
    counts = sweep.run_once(client.publisher, engine=client.engine, settings=client.settings,
                            grace_s=0)
    assert counts.republished >= 1
    record = client.wait("kill-1", timeout=90)

    assert record.status == "succeeded", slow.log_tail()
    assert record.result["paid"] == 1_500 and record.attempts >= 2
    paid = times_paid(client)
    assert len(paid) == 1_500 and set(paid.values()) == {1}
    assert payout_transfers(client) == (1_500, 1_500 * 200)
    assert_ledger_sound(client.engine, client.settings)


def test_a_pool_process_killed_mid_batch_gets_its_message_redelivered_by_the_broker(
        worker_factory, client):
    """acks_late + task_reject_on_worker_lost: the main process sees its child die and gives
    the message back to the queue at once; a new child resumes the batch. No sweep runs."""
    mint(client, "10000.00")
    slow = worker_factory(concurrency=1, env={"WALLETQ_TEST_DELAY_S": "0.25",
                                              "WALLETQ_PAYOUT_CHUNK_ITEMS": "100"})
    client.submit(payout("child-1", items("c1", 1_000, amount="2.00", users="pc")))
    chunks_done_at_least(client, "child-1", 2, slow)
    killed = slow.kill_pool_child()
    assert killed is not None
    record = client.wait("child-1", timeout=90)

    assert record.status == "succeeded", slow.log_tail()
    assert record.attempts == 2  # the first delivery, cut; the broker's redelivery
    assert record.result["paid"] == 1_000
    assert slow.alive and killed not in slow.pool_pids()
    assert "WorkerLostError" in slow.log_text()
    paid = times_paid(client)
    assert len(paid) == 1_000 and set(paid.values()) == {1}
    assert payout_transfers(client) == (1_000, 1_000 * 200)
    assert_ledger_sound(client.engine, client.settings)


def test_two_batches_sharing_references_submitted_at_once_pay_each_reference_once(
        worker_factory, client):
    mint(client, "10000.00")
    worker_factory(concurrency=2, env={"WALLETQ_PAYOUT_CHUNK_ITEMS": "200"})
    shared = items("sh", 2_000, users="ps")
    client.submit(payout("share-a", shared + items("oa", 100)))
    client.submit(payout("share-b", shared[::-1] + items("ob", 100)))
    records = client.wait_all(["share-a", "share-b"], timeout=90)
    a, b = records["share-a"].result, records["share-b"].result
    assert a["paid"] + b["paid"] == 2_200 and a["duplicate"] + b["duplicate"] == 2_000
    paid = times_paid(client)
    assert len(paid) == 2_200 and set(paid.values()) == {1}
    assert_ledger_sound(client.engine, client.settings)


def test_walletq_payout_submits_to_the_worker_and_reports(worker, client, tmp_path):
    mint(client, "100.00")
    path = tmp_path / "pay.csv"
    path.write_text("user,amount,reference\nbob,30.00,c-1\ncat,40.00,c-2\ndan,50.00,c-3\n")
    result = walletq("--json", "payout", str(path), "--timeout", "60")
    assert result.exit_code == 0, (result, worker.log_tail())
    report = result.json()
    assert (report["paid"], report["rejected"], report["amount_paid"]) == (2, 1, "70.00")
    again = walletq("--json", "payout", str(path), "--key", "second-run", "--timeout", "60")
    assert again.json()["duplicate"] == 2
    assert payout_transfers(client) == (2, 7_000)
    assert_ledger_sound(client.engine, client.settings)
