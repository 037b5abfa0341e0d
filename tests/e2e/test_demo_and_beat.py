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
        assert report["outcomes"] == {"succeeded": 18, "rejected": 2}
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
