"""The sweep on PostgreSQL with a fake broker: what it takes, in which order and how much per
run, what it does when a publish fails, and two sweeps at once."""

from __future__ import annotations

import logging
import threading

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from services import sweep
from services.atomic_transaction_manager import atomic_financial_operation
from services.settings import Settings
from services.wallet_service import WalletService
from tests.support.builders import credit
from tests.support.cli import walletq
from tests.support.outbox import accept_only, age
from tests.support.publishing import FakePublisher

GRACE_S = 60


def stuck(engine: Engine, settings: Settings, n: int, prefix: str = "lost") -> list[str]:
    """n commands recorded and never published, the first the oldest (n + 1 - i minutes)."""
    keys = [f"{prefix}-{i}" for i in range(n)]
    for i, key in enumerate(keys):
        accept_only(credit(key, "alice", "1.00"), engine, settings)
        age(engine, key, 60 * (n + 1 - i))
    return keys


def test_the_sweep_republishes_only_commands_stuck_past_the_grace_oldest_first(
        service: WalletService, engine: Engine, settings: Settings) -> None:
    keys = stuck(engine, settings, 3)
    accept_only(credit("fresh", "bob", "1.00"), engine, settings)
    done = accept_only(credit("done", "bob", "1.00"), engine, settings).record
    service.execute(done.payload_dict())
    age(engine, "done", 3600)  # ended long ago: never republished
    publisher = FakePublisher()
    counts = sweep.run_once(publisher, engine=engine, settings=settings, grace_s=GRACE_S)
    assert (counts.found, counts.republished, counts.publish_failed) == (3, 3, 0)
    assert publisher.published == keys
    # Their clocks restarted: a second run within the grace takes none of them again.
    assert sweep.run_once(FakePublisher(), engine=engine, settings=settings,
                          grace_s=GRACE_S).found == 0


def test_a_publish_failure_is_counted_logged_and_retried_by_a_later_run(
        engine: Engine, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    keys = stuck(engine, settings, 4)
    down = FakePublisher(refuse=keys[1:3])
    with caplog.at_level(logging.WARNING, "walletq.sweep"):
        counts = sweep.run_once(down, engine=engine, settings=settings, grace_s=GRACE_S)
    assert (counts.found, counts.republished, counts.publish_failed) == (4, 2, 2)
    assert down.published == [keys[0], keys[3]] and down.refused == keys[1:3]
    assert f"could not republish {keys[1]}" in caplog.text
    # The refused ones wait out a grace period like any other, then go again.
    assert sweep.run_once(FakePublisher(), engine=engine, settings=settings,
                          grace_s=GRACE_S).found == 0
    for key in keys[1:3]:
        age(engine, key, 3600)
    up = FakePublisher()
    assert sweep.run_once(up, engine=engine, settings=settings, grace_s=GRACE_S).republished == 2
    assert up.published == keys[1:3]


def test_walletq_sweep_exits_1_when_a_publish_fails(
        walletq_env: dict[str, str], engine: Engine, settings: Settings) -> None:
    stuck(engine, settings, 2)
    done = walletq("--json", "sweep", env={"WALLETQ_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert done.exit_code == 1, done
    assert {k: done.json()[k] for k in ("found", "republished", "publish_failed")} == {
        "found": 2, "republished": 0, "publish_failed": 2}


def test_a_run_takes_at_most_its_batches_and_leaves_the_rest_to_the_next_run(
        engine: Engine, settings: Settings) -> None:
    keys = stuck(engine, settings, 7)
    first = FakePublisher()
    counts = sweep.run_once(first, engine=engine, settings=settings, grace_s=GRACE_S,
                            batch_max=3, batches_max=2)
    assert (counts.found, counts.batches) == (6, 2)
    assert first.published == keys[:6]  # the oldest
    second = FakePublisher()
    counts = sweep.run_once(second, engine=engine, settings=settings, grace_s=GRACE_S,
                            batch_max=3, batches_max=2)
    assert (counts.found, counts.batches) == (1, 1) and second.published == keys[6:]


def test_a_run_stops_at_its_first_short_batch(engine: Engine, settings: Settings) -> None:
    stuck(engine, settings, 5)
    counts = sweep.run_once(FakePublisher(), engine=engine, settings=settings, grace_s=GRACE_S,
                            batch_max=2, batches_max=20)
    assert (counts.found, counts.batches) == (5, 3)


def test_a_run_with_no_grace_takes_each_stuck_command_once(
        engine: Engine, settings: Settings) -> None:
    """`walletq sweep --grace 0` by hand: the clocks a batch restarts are not stale for the
    run's next batch."""
    keys = stuck(engine, settings, 5)
    publisher = FakePublisher()
    counts = sweep.run_once(publisher, engine=engine, settings=settings, grace_s=0,
                            batch_max=2, batches_max=20)
    assert (counts.found, counts.republished, counts.batches) == (5, 5, 3)
    assert publisher.published == keys


def test_two_sweeps_at_once_publish_each_command_once(engine: Engine, settings: Settings) -> None:
    """Sweep A claims every stuck command and holds its transaction open; sweep B sees the
    same commands as stuck (A has not committed) but skips the rows A holds (SKIP LOCKED):
    it ends at once, taking none; once A commits their clocks are restarted."""
    keys = stuck(engine, settings, 20)
    a, b = FakePublisher(), FakePublisher()
    claimed, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def sweep_a() -> None:
        try:
            with atomic_financial_operation(engine, "sweep A"):
                sweep.run_once(a, engine=engine, settings=settings, grace_s=GRACE_S)
                claimed.set()
                release.wait(30)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            claimed.set()

    def sweep_b() -> None:
        try:
            sweep.run_once(b, engine=engine, settings=settings, grace_s=GRACE_S)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread_a = threading.Thread(target=sweep_a)
    thread_a.start()
    assert claimed.wait(30) and not errors, errors
    thread_b = threading.Thread(target=sweep_b)
    thread_b.start()
    try:
        thread_b.join(30)
        ended_while_a_held = not thread_b.is_alive()
    finally:
        release.set()
        thread_a.join(30)
        thread_b.join(30)
    assert not errors, errors
    assert ended_while_a_held
    assert a.published == keys and b.published == []


def test_a_row_locked_by_another_transaction_is_skipped_and_the_rest_republished(
        engine: Engine, settings: Settings) -> None:
    keys = stuck(engine, settings, 4)
    # A long apply (or an operator's session) holds one stuck row: the sweep must not wait
    # for it (a wait ends in lock timeouts, retried, then raised: nothing republished).
    with engine.connect() as holder:
        holder.begin()
        holder.execute(text("SELECT 1 FROM commands WHERE idempotency_key = :k FOR UPDATE"),
                       {"k": keys[1]})
        publisher = FakePublisher()
        counts = sweep.run_once(publisher, engine=engine, settings=settings, grace_s=GRACE_S)
        holder.rollback()
    assert (counts.found, counts.republished) == (3, 3)
    assert publisher.published == [keys[0], keys[2], keys[3]]
    # Once free, the next run takes it.
    assert sweep.run_once(FakePublisher(), engine=engine, settings=settings,
                          grace_s=GRACE_S).found == 1
