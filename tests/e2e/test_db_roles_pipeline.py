"""The whole pipeline as walletq's database roles, never a superuser: a real worker as the
worker role, the producer client as the producer role, beat with no database credentials at
all, `walletq verify` as the read-only role."""

from __future__ import annotations

import os
from decimal import Decimal

from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url

from services.settings import reset_settings
from tests.e2e.test_commands_end_to_end import EXPECTED, PHASES
from tests.support.beat import start_beat, stop_beat
from tests.support.builders import credit
from tests.support.cli import walletq
from tests.support.ledger import assert_report_sound
from tests.support.outbox import accept_only
from worker.client import WalletClient


def test_the_pipeline_runs_as_the_worker_and_producer_roles_and_beat_needs_no_database(
        db_roles, worker_factory, pipeline_env, monkeypatch, pg_admin: Engine, tmp_path):
    worker = worker_factory(env={"WALLETQ_DATABASE_URL": db_roles["worker"],
                                 "WALLETQ_SWEEP_GRACE_S": "0.2"})
    monkeypatch.setenv("WALLETQ_DATABASE_URL", db_roles["producer"])
    reset_settings()
    client = WalletClient.from_env()
    try:
        for phase in PHASES:
            for command in phase:
                client.submit(command)
            ended = client.wait_all([c["idempotency_key"] for c in phase], timeout=30)
            assert {r.status for r in ended.values()} == {"succeeded"}, (
                [r.to_dict() for r in ended.values()], worker.log_tail())
        duplicate = client.submit(PHASES[0][0])  # read, not locked: the producer may not lock
        assert duplicate.status == "succeeded"
        for user, (available, escrow) in EXPECTED.items():
            assert client.balance(user) == {"available": Decimal(available),
                                            "escrow": Decimal(escrow)}

        # A command recorded and never published: beat (no database URL at all) sends the
        # sweep, the worker (its role) republishes it, the worker applies it.
        accept_only(credit("lost", "alice", "4.00"), client.engine, client.settings)
        beat_env = {key: value for key, value in {**os.environ, **pipeline_env}.items()
                    if key != "WALLETQ_DATABASE_URL"}
        beat_env.update({"WALLETQ_SWEEP_INTERVAL_S": "0.5", "WALLETQ_HOME": str(tmp_path / "beat")})
        beat = start_beat(beat_env, tmp_path / "beat-schedule")
        try:
            lost = client.wait("lost", timeout=30)
        finally:
            beat_log = stop_beat(beat)
        assert lost is not None and lost.status == "succeeded", (beat_log[-2000:], worker.log_tail())
        assert not (tmp_path / "beat" / "walletq.db").exists()  # beat opened no database

        database = make_url(db_roles["worker"]).database
        with pg_admin.connect() as conn:
            users = set(conn.execute(text(
                "SELECT usename FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid()"),
                {"db": database}).scalars())
        assert users == {make_url(db_roles[kind]).username for kind in ("worker", "producer")}
    finally:
        client.close()

    verify = walletq("--json", "verify", env={"WALLETQ_DATABASE_URL": db_roles["readonly"]})
    assert verify.exit_code == 0, verify
    assert_report_sound(verify.json())
