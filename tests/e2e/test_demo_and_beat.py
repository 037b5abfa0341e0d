"""The embedded demo on a fresh home, and beat running the sweep on its own."""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.beat import start_beat, stop_beat
from tests.support.builders import credit
from tests.support.cli import walletq
from tests.support.env import strip_walletq_env
from tests.support.ledger import assert_ledger_sound
from tests.support.outbox import accept_only


def test_the_demo_runs_embedded_on_a_fresh_home_twice(tmp_path: Path, monkeypatch):
    strip_walletq_env(monkeypatch)
    env = {"WALLETQ_HOME": str(tmp_path / "fresh-home")}
    for _ in range(2):
        done = walletq("--json", "demo", env=env, process=True)
        assert done.exit_code == 0, done
        report = done.json()
        assert report["verify"]["ok"], report["verify"]
        # Issue 9: a reversal; a partial capture (and a release over the rest, refused), an expiry.
        assert report["outcomes"] == {"succeeded": 21, "rejected": 3}
        by_key = {c["idempotency_key"].split("-", 2)[-1]: c for c in report["commands"]}
        assert by_key["order-1-over"]["error"]["code"] == "hold_exceeded"
        expired = [c for c in report["commands"] if c["type"] == "expire_hold"]
        assert [c["status"] for c in expired] == ["succeeded"]
        holds = {h["hold_id"].rsplit("-", 2)[-2] + "-" + h["hold_id"].rsplit("-", 1)[-1]: h
                 for h in report["holds"]}
        assert (holds["order-1"]["status"], holds["order-1"]["released"]) == ("released", "120.00")
        assert (holds["order-5"]["status"], holds["order-5"]["refunded"]) == ("expired", "30.00")
        assert {r["error"]["code"] for r in report["refused_at_submit"]} == {
            "invalid_command", "idempotency_conflict"}
        assert len(report["duplicates"]) == 1
    assert (tmp_path / "fresh-home" / "walletq.db").exists()
    # The worker the demo started is gone.
    assert not list((tmp_path / "fresh-home").glob("demo-*.ready"))


def test_beat_runs_the_sweep_that_delivers_a_lost_command(worker_factory, client, pipeline_env,
                                                          tmp_path):
    # The sweep runs in the worker, with the worker's grace period.
    worker = worker_factory(env={"WALLETQ_SWEEP_GRACE_S": "0.2"})
    accept_only(credit("lost", "alice", "4.00"), client.engine, client.settings)
    env = {**os.environ, **pipeline_env, "WALLETQ_SWEEP_INTERVAL_S": "0.5",
           "WALLETQ_SWEEP_GRACE_S": "0.2"}
    beat = start_beat(env, tmp_path / "beat-schedule")
    try:
        record = client.wait("lost", timeout=30)
    finally:
        beat_log = stop_beat(beat)
    assert record.status == "succeeded", (beat_log[-2000:], worker.log_tail())
    assert "walletq.sweep" in beat_log
    assert walletq("verify").exit_code == 0
    assert_ledger_sound(client.engine, client.settings)


def test_beat_runs_the_expiry_pass_that_refunds_an_expired_hold(worker_factory, client,
                                                                pipeline_env, tmp_path):
    """Issue 9: beat publishes walletq.expire_holds; a worker runs it as the system producer
    (its key file given by WALLETQ_SYSTEM_PRODUCER_KEY_FILE) and the hold comes back."""
    from services import producers
    from services.permissions import SYSTEM
    from services.signing import new_private_key, write_private_key
    from services.wallet_service import WalletService

    key, key_file = new_private_key(), tmp_path / "system.key"
    write_private_key(key_file, key)
    with client.engine.begin() as conn:
        producers.create(conn, "walletq-system", SYSTEM, key.public_key())
    system_env = {"WALLETQ_SYSTEM_PRODUCER_KEY_FILE": str(key_file),
                  "WALLETQ_EXPIRY_INTERVAL_S": "0.5"}
    worker = worker_factory(env=system_env)
    service = WalletService(client.engine, client.settings)
    service.credit_wallet("alice", "10.00", idempotency_key="dep")
    service.transfer_to_escrow("o-1", "alice", "bob", "10.00", idempotency_key="h-1",
                               expires_in_s=1)
    service.release_from_escrow("o-1", amount="4.00", idempotency_key="r-1")
    beat = start_beat({**os.environ, **pipeline_env, **system_env}, tmp_path / "beat-schedule")
    try:
        record = client.wait("expire:o-1", timeout=60)
    finally:
        beat_log = stop_beat(beat)
    assert record is not None and record.status == "succeeded", (beat_log[-2000:],
                                                                  worker.log_tail())
    assert "walletq.expire_holds" in beat_log
    assert service.hold("o-1")["status"] == "expired"
    assert service.balance("alice").available == 6
    assert_ledger_sound(client.engine, client.settings)
