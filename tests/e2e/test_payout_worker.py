"""Payout batches through a real Celery worker: the payouts queue, SIGKILL mid-batch, the CLI."""

from __future__ import annotations

import json
import time

from click.testing import CliRunner
from sqlalchemy import func, select, text

from services import schema, sweep
from services.db import get_engine
from services.payouts import payout_progress
from services.settings import get_settings
from services.wallet_service import WalletService
from tests.e2e.conftest import assert_ledger_verifies
from worker.cli import cli


def batch(key, items, **fields):
    return {"type": "payout_batch", "idempotency_key": key, "items": items, **fields}


def items(prefix, n, amount="1.00", users=None):
    return [{"user": f"{users or prefix}-{i % 400 if users else i}", "amount": amount,
             "reference": f"{prefix}-{i}"} for i in range(n)]


def progress(key):
    settings = get_settings()
    with get_engine(settings).connect() as conn:
        return payout_progress(conn, key, settings.asset_scale)


def times_paid():
    i = schema.payout_items
    with get_engine(get_settings()).connect() as conn:
        return dict(conn.execute(select(i.c.reference, func.count())
                                 .where(i.c.outcome == "paid").group_by(i.c.reference)).all())


def payout_transfers():
    with get_engine(get_settings()).connect() as conn:
        return conn.execute(text("SELECT COUNT(*), COALESCE(SUM(amount_minor), 0) FROM transfers "
                                 "WHERE kind = 'payout'")).one()


def mint(amount):
    WalletService().admin_create_tokens(amount)


def test_a_batch_submitted_by_the_client_is_paid_by_the_worker(worker, client):
    mint("10000.00")
    client.submit(batch("w-1", items("w1", 3_000, users="pw")))
    record = client.wait("w-1", timeout=60)
    assert record.status == "succeeded", worker.log_tail()
    chunks = -(-3_000 // get_settings().payout_chunk_items)
    assert record.result["paid"] == 3_000 and record.result["chunks"] == chunks
    assert payout_transfers() == (3_000, 300_000)
    assert_ledger_verifies()


def test_a_worker_killed_mid_batch_completes_after_restart_paying_each_item_once(
        worker_factory, client):
    mint("10000.00")
    slow = worker_factory(env={"WALLETQ_TEST_DELAY_S": "0.25", "WALLETQ_PAYOUT_CHUNK_ITEMS": "100"})
    client.submit(batch("kill-1", items("k1", 1_500, amount="2.00", users="pk")))
    deadline = time.monotonic() + 30
    while (progress("kill-1").get("chunks_done") or 0) < 3:
        assert time.monotonic() < deadline, slow.log_tail()
        time.sleep(0.05)
    slow.kill()
    before = progress("kill-1")
    assert before["status"] == "processing" and 0 < before["done"] < 1_500
    assert payout_transfers() == (before["paid"], before["paid"] * 200)

    slow.start()
    # Redis gives a SIGKILLed worker's message back only after the visibility timeout;
    # the sweep republishes the command left `processing` (grace 0 here: at once).
    counts = sweep.run_once(client.publisher, engine=client.engine, settings=client.settings, grace_s=0)
    assert counts.republished >= 1
    record = client.wait("kill-1", timeout=90)

    assert record.status == "succeeded", slow.log_tail()
    assert record.result["paid"] == 1_500 and record.attempts >= 2
    paid = times_paid()
    assert len(paid) == 1_500 and set(paid.values()) == {1}
    assert payout_transfers() == (1_500, 1_500 * 200)
    assert_ledger_verifies()


def test_two_batches_sharing_references_submitted_at_once_pay_each_reference_once(
        worker_factory, client):
    mint("10000.00")
    worker_factory(concurrency=2, env={"WALLETQ_PAYOUT_CHUNK_ITEMS": "200"})
    shared = items("sh", 2_000, users="ps")
    client.submit(batch("share-a", shared + items("oa", 100)))
    client.submit(batch("share-b", shared[::-1] + items("ob", 100)))
    records = client.wait_all(["share-a", "share-b"], timeout=90)
    a, b = records["share-a"].result, records["share-b"].result
    assert a["paid"] + b["paid"] == 2_200 and a["duplicate"] + b["duplicate"] == 2_000
    paid = times_paid()
    assert len(paid) == 2_200 and set(paid.values()) == {1}
    assert_ledger_verifies()


def test_walletq_payout_submits_to_the_worker_and_reports(worker, client, tmp_path):
    mint("100.00")
    path = tmp_path / "pay.csv"
    path.write_text("user,amount,reference\nbob,30.00,c-1\ncat,40.00,c-2\ndan,50.00,c-3\n")
    result = CliRunner().invoke(cli, ["--json", "payout", str(path), "--timeout", "60"],
                                catch_exceptions=False)
    assert result.exit_code == 0, (result.output, worker.log_tail())
    report = json.loads(result.stdout)
    assert (report["paid"], report["rejected"], report["amount_paid"]) == (2, 1, "70.00")
    again = CliRunner().invoke(cli, ["--json", "payout", str(path), "--key", "second-run",
                                     "--timeout", "60"], catch_exceptions=False)
    assert json.loads(again.stdout)["duplicate"] == 2
    assert payout_transfers() == (2, 7_000)
    assert_ledger_verifies()
