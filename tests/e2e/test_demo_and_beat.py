"""The embedded demo on a fresh home, and beat running the sweep on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.conftest import assert_ledger_verifies
from tests.e2e.helpers import accept_only, start_beat, stop_beat, walletq


def test_the_demo_runs_embedded_on_a_fresh_home_twice(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALLETQ_")}
    env["WALLETQ_HOME"] = str(tmp_path / "fresh-home")
    for _ in range(2):
        started = time.monotonic()
        done = subprocess.run([str(Path(sys.executable).parent / "walletq"), "--json", "demo"],
                              env=env, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
        report = json.loads(done.stdout)
        assert report["verify"]["ok"], report["verify"]
        assert report["outcomes"] == {"succeeded": 17, "rejected": 2}
        assert {r["error"]["code"] for r in report["refused_at_submit"]} == {
            "invalid_command", "idempotency_conflict"}
        assert len(report["duplicates"]) == 1
        assert time.monotonic() - started < 60
    assert (tmp_path / "fresh-home" / "walletq.db").exists()
    # The worker the demo started is gone.
    assert not list((tmp_path / "fresh-home").glob("demo-*.ready"))


def test_beat_runs_the_sweep_that_delivers_a_lost_command(worker_factory, client, pipeline_env,
                                                          tmp_path):
    # The sweep runs in the worker, with the worker's grace period.
    worker = worker_factory(env={"WALLETQ_SWEEP_GRACE_S": "0.2"})
    accept_only({"type": "credit_wallet", "idempotency_key": "lost",
                                   "user": "alice", "amount": "4.00"})
    env = {**os.environ, **pipeline_env, "WALLETQ_SWEEP_INTERVAL_S": "0.5",
           "WALLETQ_SWEEP_GRACE_S": "0.2"}
    beat = start_beat(env, tmp_path / "beat-schedule")
    try:
        record = client.wait("lost", timeout=30)
    finally:
        beat_log = stop_beat(beat)
    assert record.status == "succeeded", (beat_log[-2000:], worker.log_tail())
    assert "walletq.sweep" in beat_log
    assert walletq("verify").returncode == 0
    assert_ledger_verifies()
