"""WalletClient's outbox on PostgreSQL, with a fake broker: what it records, what it publishes,
and what it leaves for the sweep when the broker is down or fails half-way through a burst.

`FakePublisher` stands for the broker; `WalletService.execute` stands for the worker."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from decimal import Decimal

import pytest

from services import sweep
from services.atomic_transaction_manager import IdempotencyConflictError, InvalidCommandError
from services.command_store import CommandRecord
from services.settings import Settings
from services.wallet_service import WalletService
from tests.support.builders import credit
from tests.support.cli import walletq
from tests.support.ledger import assert_ledger_sound, record, transfers
from tests.support.outbox import accept_only, age
from tests.support.publishing import FakePublisher
from worker.client import WalletClient

CREDIT = credit("dep-1", "alice", "10.00")
DEAD_BROKER = "redis://127.0.0.1:1/0"


@pytest.fixture
def broker() -> FakePublisher:
    return FakePublisher()


@pytest.fixture
def client(walletq_env: dict[str, str], broker: FakePublisher) -> Iterator[WalletClient]:
    wallet = WalletClient.from_env()
    real = wallet.publisher
    wallet.publisher = broker  # type: ignore[assignment]
    yield wallet
    wallet.publisher = real
    wallet.close()


def sweep_now(service: WalletService) -> tuple[sweep.SweepCounts, list[str]]:
    """A sweep (grace 0) through a broker that is up: its counts and what it published."""
    broker = FakePublisher()
    counts = sweep.run_once(broker, engine=service.engine, settings=service.settings, grace_s=0)
    return counts, broker.published


def work(service: WalletService, records: list[CommandRecord]) -> None:
    """What a worker does with the published messages."""
    for rec in records:
        assert service.execute(rec.payload_dict()).status == "succeeded"


def test_a_duplicate_submit_returns_the_record_and_publishes_nothing(
        client: WalletClient, broker: FakePublisher, service: WalletService,
        settings: Settings) -> None:
    first = client.submit(CREDIT)
    assert broker.published == ["dep-1"] and first.status == "accepted"
    fresh_duplicate = client.submit(dict(CREDIT))  # still accepted, well within the grace
    assert fresh_duplicate.id == first.id and broker.published == ["dep-1"]
    work(service, [first])
    again = client.submit(dict(CREDIT))
    assert again.id == first.id and again.status == "succeeded"
    assert broker.published == ["dep-1"]  # no second message for the worker
    assert len(transfers(service.engine, "dep-1")) == 1
    assert_ledger_sound(service.engine, settings)


def test_a_stuck_duplicate_is_published_again(client: WalletClient, broker: FakePublisher,
                                              service: WalletService) -> None:
    # Recorded but never published (a producer that died between commit and publish).
    accept_only(CREDIT, service.engine, service.settings)
    client.submit(CREDIT)
    assert broker.published == []  # within the grace: the first producer may still publish
    age(service.engine, "dep-1", 3600)
    assert client.submit(CREDIT).status == "accepted"
    assert broker.published == ["dep-1"]


def test_a_conflicting_or_invalid_submit_raises_and_records_nothing(
        client: WalletClient, broker: FakePublisher, service: WalletService,
        settings: Settings) -> None:
    client.submit(CREDIT)
    before = record(service.engine, "dep-1")
    with pytest.raises(IdempotencyConflictError):
        client.submit({**CREDIT, "amount": "11.00"})
    with pytest.raises(InvalidCommandError):
        client.submit({**CREDIT, "idempotency_key": "dep-2", "amount": 10.0})
    assert client.status("dep-2") is None
    assert record(service.engine, "dep-1") == before
    assert broker.published == ["dep-1"]
    work(service, [before])
    assert client.balance("alice")["available"] == Decimal("10.00")
    assert_ledger_sound(service.engine, settings)


def _deep(levels: int) -> object:
    value: object = "x"
    for _ in range(levels):
        value = {"n": value}
    return value


def test_a_command_over_the_bounds_is_refused_once_signed_or_not_and_records_nothing(
        client: WalletClient, broker: FakePublisher, service: WalletService) -> None:
    """Admission no longer walks an object's bounds a second time after signing it: the walk
    before signing (or, for a command signed elsewhere, before admitting it) still refuses."""
    deep = {**CREDIT, "idempotency_key": "deep-1", "memo": _deep(50)}
    oversized = {**CREDIT, "idempotency_key": "big-1", "memo": "m" * (5 * 1024 * 1024)}
    signed_elsewhere = {**deep, "producer": "test-admin", "signature": "A" * 86}
    for command, reason in ((deep, "more than 8 deep"), (oversized, "bytes"),
                            (signed_elsewhere, "more than 8 deep")):
        with pytest.raises(InvalidCommandError) as refused:
            client.admit(command)
        assert reason in refused.value.message
        with pytest.raises(InvalidCommandError):
            client.submit(command)
    assert [client.status(key) for key in ("deep-1", "big-1")] == [None, None]
    assert broker.published == []


def test_submit_answers_accepted_when_the_broker_is_down_and_the_sweep_delivers_it(
        client: WalletClient, broker: FakePublisher, service: WalletService,
        caplog: pytest.LogCaptureFixture) -> None:
    broker.down = True
    with caplog.at_level(logging.WARNING, "walletq.client"):
        accepted = client.submit(CREDIT)
    assert accepted.status == "accepted" and broker.refused == ["dep-1"]
    assert "could not publish dep-1" in caplog.text
    counts, published = sweep_now(service)
    assert (counts.found, counts.republished) == (1, 1) and published == ["dep-1"]


def test_submit_many_with_the_broker_down_records_every_command_for_the_sweep(
        client: WalletClient, broker: FakePublisher, service: WalletService,
        caplog: pytest.LogCaptureFixture) -> None:
    broker.down = True
    commands = [credit(f"many-{n}", f"u{n}", "1.00") for n in range(5)]
    with caplog.at_level(logging.WARNING, "walletq.client"):
        answers = client.submit_many(commands)
    assert [a.status for a in answers] == ["accepted"] * 5  # type: ignore[union-attr]
    assert broker.published == [] and len(broker.refused) == 5
    assert "could not publish 5 commands" in caplog.text
    counts, published = sweep_now(service)
    assert counts.republished == 5 and sorted(published) == [f"many-{n}" for n in range(5)]


def test_a_burst_failing_half_way_leaves_exactly_the_unsent_commands_for_the_sweep(
        client: WalletClient, broker: FakePublisher, service: WalletService,
        settings: Settings) -> None:
    # Messages of two keys each; the broker takes the first, then the connection drops.
    client.settings = dataclasses.replace(client.settings, coalesce_max=2)
    broker.accept_max = 2
    commands = [credit(f"burst-{n}", "bob", "1.00") for n in range(6)]
    answers = client.submit_many(commands)
    assert all(isinstance(a, CommandRecord) and a.status == "accepted" for a in answers), answers
    assert broker.published == ["burst-0", "burst-1"]
    work(service, [a for a in answers if isinstance(a, CommandRecord)][:2])
    counts, published = sweep_now(service)
    assert published == ["burst-2", "burst-3", "burst-4", "burst-5"], counts
    work(service, [record(service.engine, key) for key in published])
    assert client.balance("bob")["available"] == Decimal("6.00")
    assert_ledger_sound(service.engine, settings)


def test_submit_lines_with_the_broker_down_accepts_every_line_and_exits_0(
        walletq_env: dict[str, str], service: WalletService) -> None:
    lines = "".join(f'{{"type": "credit_wallet", "idempotency_key": "line-{n}", "user": "al",'
                    f' "amount": "1.00"}}\n' for n in range(3))
    done = walletq("--json", "submit", "-", stdin=lines, env={"WALLETQ_BROKER_URL": DEAD_BROKER},
                   process=True)  # in process, click 8.5 warns that get_text_stream is deprecated
    assert done.exit_code == 0, done
    assert [(r["idempotency_key"], r["status"]) for r in done.json_lines()] == [
        (f"line-{n}", "accepted") for n in range(3)]
    counts, published = sweep_now(service)
    assert counts.republished == 3 and sorted(published) == [f"line-{n}" for n in range(3)]


def test_a_stream_over_many_chunks_answers_each_command_in_order_with_its_own_answer(
        client: WalletClient, broker: FakePublisher) -> None:
    # Chunks of 4: a duplicate of a command two chunks back, an invalid command and a
    # conflicting one in the middle, a duplicate within one chunk; each gets its own answer.
    commands: list[object] = [credit(f"s-{n}", "al", "1.00") for n in range(10)]
    commands[5] = {"type": "credit_wallet", "idempotency_key": "s-bad", "user": "al",
                   "amount": "-1"}
    commands[6] = credit("s-0", "al", "1.00")             # recorded two chunks before
    commands[7] = credit("s-1", "al", "9.00")             # s-1 with another payload
    commands.insert(9, credit("s-8", "al", "1.00"))       # s-8 twice in one chunk
    answers = list(client.submit_stream(commands, chunk_size=4))
    assert len(answers) == len(commands)
    kinds = [a.idempotency_key if isinstance(a, CommandRecord) else a.code for a in answers]
    assert kinds == ["s-0", "s-1", "s-2", "s-3", "s-4", "invalid_command", "s-0",
                     "idempotency_conflict", "s-8", "s-8", "s-9"]
    first, again = answers[0], answers[6]
    assert isinstance(first, CommandRecord) and isinstance(again, CommandRecord)
    assert again.id == first.id  # the stored record, not a second one
    assert sorted(broker.published) == sorted(f"s-{n}" for n in (0, 1, 2, 3, 4, 8, 9))


def test_a_stream_with_the_broker_down_tries_it_once_and_leaves_every_chunk_for_the_sweep(
        client: WalletClient, broker: FakePublisher, service: WalletService,
        caplog: pytest.LogCaptureFixture) -> None:
    broker.down = True
    commands = [credit(f"down-{n}", f"u{n}", "1.00") for n in range(7)]
    with caplog.at_level(logging.WARNING, "walletq.client"):
        answers = list(client.submit_stream(commands, chunk_size=2))
    assert [a.status for a in answers] == ["accepted"] * 7  # type: ignore[union-attr]
    assert broker.calls == 1  # not one wait on a dead broker per chunk
    assert "did not publish 5 more commands" in caplog.text
    counts, published = sweep_now(service)
    assert counts.republished == 7 and sorted(published) == sorted(f"down-{n}" for n in range(7))


def test_submit_lines_answers_a_long_stream_line_by_line(
        walletq_env: dict[str, str], service: WalletService) -> None:
    # Over two of the client's chunks: blank lines, a bad line in the middle and a
    # duplicate of the first line near the end keep their own line numbers and answers.
    lines = [f'{{"type": "credit_wallet", "idempotency_key": "long-{n}", "user": "al",'
             f' "amount": "1.00"}}' for n in range(1200)]
    lines[3] = ""
    lines[700] = "not json"
    lines[1100] = lines[0]
    done = walletq("--json", "submit", "-", stdin="\n".join(lines) + "\n",
                   env={"WALLETQ_BROKER_URL": DEAD_BROKER}, process=True)
    assert done.exit_code == 1, done
    answers = done.json_lines()
    assert len(answers) == 1199
    assert answers[3]["idempotency_key"] == "long-4"  # line 4 was blank: no answer
    assert answers[699] == {"line": 701, "error": answers[699]["error"]}
    assert answers[699]["error"]["code"] == "invalid_command"
    assert answers[1099]["idempotency_key"] == "long-0"
    assert answers[-1]["idempotency_key"] == "long-1199"
    assert {a.get("status") for a in answers} == {"accepted", None}
    _, published = sweep_now(service)  # every recorded line is left for the sweep
    assert len(set(published)) == 1200 - 3  # blank, bad and duplicate lines record nothing
