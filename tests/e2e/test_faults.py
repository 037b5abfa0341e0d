"""Faults under a real `celery worker`: whatever dies, every command ends exactly once.

Each test breaks something for real — SIGKILL of a whole worker mid-transaction, a Redis
without persistence restarted under its queue, PostgreSQL connections terminated under
load, a storm of lock conflicts and deadlocks, garbage on the queue — then asserts the
exact effects (one set of transfers per succeeded command, none for a rejected one, one
terminal audit row per command, exact balances) and ends with the ledger verify passing.

Servers are never restarted here: the Redis a test restarts is a private redis-server on a
spare port (tests/e2e/fault_servers.py); pg_terminate_backend is aimed at the test's own
database only. The figures (recovery time, retries) are printed: run with `-s` to see them.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import pytest
from kombu import Exchange, Producer
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import Engine, make_url

from services import schema, sweep
from services.command_status import ENDED
from services.db import get_engine
from services.settings import get_settings
from tests.e2e.conftest import WorkerProcess, on_both_brokers
from tests.e2e.fault_servers import PrivateRedis
from tests.support.broker import broker_idle, queue_state, queued_commands
from tests.support.builders import credit, debit, transfer
from tests.support.cli import walletq
from tests.support.ledger import assert_ledger_sound
from tests.support.pg import close_connections, settled_deadlocks
from tests.support.polling import eventually
from worker.celery_app import EXECUTE_TASK
from worker.client import WalletClient

TERMINAL = ("succeeded", "rejected", "failed")


# --- helpers ----------------------------------------------------------------------------


def submit_all(client: WalletClient, commands: Iterable[dict[str, Any]]) -> list[str]:
    answers = client.submit_many(list(commands))
    for answer in answers:
        assert not isinstance(answer, Exception), answer
    return [answer.idempotency_key for answer in answers]


def wait_terminal(client: WalletClient, keys: list[str], timeout_s: float,
                  workers: Iterable[WorkerProcess] = ()) -> dict[str, Any]:
    records = client.wait_all(keys, timeout=timeout_s)
    pending = {k: (records[k].status if k in records else None) for k in keys
               if k not in records or records[k].status not in TERMINAL}
    tails = "\n".join(w.log_tail(30) for w in workers)
    assert not pending, f"{len(pending)} not terminal: {list(pending.items())[:5]}\n{tails}"
    return records


def command_rows(keys: list[str]) -> dict[str, Any]:
    c = schema.commands
    with get_engine(get_settings()).connect() as conn:
        rows = conn.execute(select(c.c.idempotency_key, c.c.status, c.c.attempts, c.c.error_code)
                            .where(c.c.idempotency_key.in_(keys))).all()
    return {row.idempotency_key: row for row in rows}


def transfers_per_key() -> Counter[str]:
    c, t = schema.commands, schema.transfers
    with get_engine(get_settings()).connect() as conn:
        rows = conn.execute(select(c.c.idempotency_key, func.count())
                            .select_from(t.join(c, c.c.id == t.c.command_id))
                            .group_by(c.c.idempotency_key)).all()
    return Counter({key: n for key, n in rows})


def terminal_audits_per_key() -> Counter[str]:
    a = schema.audit_events
    with get_engine(get_settings()).connect() as conn:
        rows = conn.execute(select(a.c.idempotency_key, func.count())
                            .where(a.c.outcome.in_(TERMINAL))
                            .group_by(a.c.idempotency_key)).all()
    return Counter({key: n for key, n in rows})


def assert_exactly_once(expected: dict[str, str]) -> dict[str, Any]:
    """Each key has the expected terminal status, exactly one terminal audit row, and one
    transfer when it succeeded (these commands all move money in one transfer), none else."""
    rows = command_rows(list(expected))
    statuses = {key: row.status for key, row in rows.items()}
    assert statuses == expected, {k: (statuses.get(k), v) for k, v in expected.items()
                                  if statuses.get(k) != v}
    transfers = transfers_per_key()
    wrong = {k: transfers[k] for k, status in expected.items()
             if transfers[k] != (1 if status == "succeeded" else 0)}
    assert not wrong, f"transfers per command (expected 1 / 0): {wrong}"
    audits = terminal_audits_per_key()
    doubled = {k: audits[k] for k in expected if audits[k] != 1}
    assert not doubled, f"terminal audit rows per command (expected 1): {doubled}"
    return rows


def expected_balances(commands: list[dict[str, Any]], statuses: dict[str, str]
                      ) -> dict[str, Decimal]:
    """What every user holds after the succeeded commands, computed from their payloads."""
    balances: Counter[str] = Counter()
    for cmd in commands:
        if statuses[cmd["idempotency_key"]] != "succeeded":
            continue
        amount = Decimal(cmd["amount"])
        if cmd["type"] == "credit_wallet":
            balances[cmd["user"]] += amount
        elif cmd["type"] == "debit_wallet":
            balances[cmd["user"]] -= amount
        else:
            balances[cmd["from_user"]] -= amount
            balances[cmd["to_user"]] += amount
    return dict(balances)


def assert_balances(client: WalletClient, balances: dict[str, Decimal]) -> None:
    actual = {user: client.balance(user)["available"] for user in balances}
    assert actual == balances


def log_count(workers: Iterable[WorkerProcess], pattern: str) -> int:
    regex = re.compile(pattern)
    return sum(len(regex.findall(w.log_text())) for w in workers)


def current_database_name() -> str:
    return make_url(get_settings().database_url).database


def open_write_transactions() -> int:
    """Worker transactions of the test's database that have written (an xid) and not ended."""
    with get_engine(get_settings()).connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_xid IS NOT NULL")).scalar_one())


# --- 1. SIGKILL of the whole worker mid-transaction ----------------------------------------


@on_both_brokers
def test_a_worker_killed_mid_transaction_ends_every_command_exactly_once(
        worker_factory, client, broker):
    seed = credit("seed", "alice", "100.00")
    submit_all(client, [seed])
    # 0.3 s inside each transaction of two commands: a kill lands mid-transaction.
    slow = worker_factory(concurrency=2, env={"WALLETQ_TEST_DELAY_S": "0.3",
                                              "WALLETQ_COALESCE_MAX": "2"})
    wait_terminal(client, ["seed"], 20, [slow])
    commands = []
    for i in range(20):
        commands.append(credit(f"k-credit-{i}", f"u{i}", f"{i + 1}.00"))
        commands.append(transfer(f"k-transfer-{i}", "alice", "bob", "1.00"))
    keys = submit_all(client, commands)

    eventually(lambda: sum(r.status == "succeeded" for r in command_rows(keys).values()) >= 5,
               30, describe=slow.log_tail)
    # A command's first delivery runs in one transaction (the lean path): mid-transaction,
    # its row is still `accepted` to everyone else, so the open transaction itself is what
    # we wait for (on a loaded machine a pool process may sit between two commands at any
    # given moment); the kill lands while one is open.
    eventually(open_write_transactions, 30, describe=slow.log_tail)
    slow.kill()  # SIGKILL of the main process and its pool children: nothing acks
    at_kill = command_rows(keys)
    done = [k for k, r in at_kill.items() if r.status == "succeeded"]
    in_flight = [k for k, r in at_kill.items() if r.status not in ENDED]
    print(f"\n[kill] at SIGKILL: {len(done)} succeeded, {len(in_flight)} not ended "
          f"(mid-transaction or still queued), of {len(keys)}")
    assert in_flight, "every command had ended before the kill"
    transfers = transfers_per_key()
    assert all(transfers[k] == 0 for k in in_flight), "a cut transaction left transfers"

    slow.start()
    # On Redis the killed worker's messages sit in the unacked set until the visibility
    # timeout (an hour): the sweep republishes the commands left `processing` (grace 0: at
    # once). RabbitMQ requeued them when the connection dropped, and the restarted worker
    # may have run some already: the sweep finds fewer. A republished duplicate is harmless.
    swept = walletq("sweep", "--grace", "0", "--json")
    assert swept.exit_code == 0, swept
    counts = swept.json()
    print(f"[kill] walletq sweep ({broker.kind}): {counts}")
    if broker.kind == "redis":
        assert counts["republished"] >= len(in_flight)
    wait_terminal(client, keys, 60, [slow])

    rows = assert_exactly_once({k: "succeeded" for k in keys})
    assert all(rows[k].attempts >= 1 for k in in_flight)
    assert_balances(client, {"alice": Decimal("80.00"), "bob": Decimal("20.00"),
                             **{f"u{i}": Decimal(i + 1) for i in range(20)}})
    assert slow.alive
    assert_ledger_sound(client.engine, client.settings)


# --- 2. Redis restarted without persistence: the queue is lost ----------------------------


@pytest.fixture
def private_redis(tmp_path) -> Iterable[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis").start()
    yield server
    server.stop()


def test_a_lost_redis_queue_is_recovered_by_the_sweep(worker_factory, pipeline_env, private_redis,
                                                      queue_prefix, monkeypatch):
    broker = {"WALLETQ_BROKER_URL": private_redis.url}
    monkeypatch.setenv("WALLETQ_BROKER_URL", private_redis.url)
    client = WalletClient.from_env({**os.environ, **broker})
    try:
        commands = [credit(f"lost-{i}", f"u{i % 20}", "1.50") for i in range(180)]
        # Refused by a business rule: users who have no wallet. Terminal all the same.
        commands += [debit(f"lost-refused-{i}", f"nobody{i}", "1.00") for i in range(20)]
        keys = submit_all(client, commands)  # no worker yet: everything waits in Redis
        assert queued_commands(private_redis.url, queue_prefix) == len(keys)

        private_redis.restart()  # no RDB, no AOF: the queue is gone
        restarted = time.monotonic()
        assert queue_state(private_redis.url, queue_prefix) == {}
        worker = worker_factory(concurrency=2, env=broker)  # consuming an empty queue
        assert {r.status for r in command_rows(keys).values()} == {"accepted"}

        swept_at = time.monotonic()
        counts = sweep.run_once(client.publisher, engine=client.engine, settings=client.settings, grace_s=0.5)
        assert counts.found == len(keys) and counts.republished == len(keys), counts
        wait_terminal(client, keys, 60, [worker])
        ended = time.monotonic()
        print(f"\n[lost queue] {len(keys)} commands lost with the queue; sweep republished "
              f"{counts.republished} in {counts.elapsed_s:.3f} s; all terminal "
              f"{ended - swept_at:.2f} s after the sweep started, "
              f"{ended - restarted:.2f} s after the Redis restart (incl. worker start)")

        expected = {k: "succeeded" for k in keys if not k.startswith("lost-refused-")}
        expected.update({k: "rejected" for k in keys if k.startswith("lost-refused-")})
        rows = assert_exactly_once(expected)
        assert {rows[k].error_code for k in keys if expected[k] == "rejected"} == {"unknown_user"}
        assert_balances(client, {f"u{i}": Decimal("13.50") for i in range(20)})
        eventually(lambda: broker_idle(private_redis.url, queue_prefix), 10,
                   describe=lambda: queue_state(private_redis.url, queue_prefix))
        assert worker.alive
        assert_ledger_sound(client.engine, client.settings)
    finally:
        client.close()


# --- 3. PostgreSQL connections terminated under load ---------------------------------------


def seed_users(client: WalletClient, users: list[str], amount: str,
               workers: Iterable[WorkerProcess]) -> None:
    seeds = [credit(f"seed-{user}", user, amount) for user in users]
    wait_terminal(client, submit_all(client, seeds), 30, workers)


def random_transfers(prefix: str, users: list[str], n: int, rng: random.Random
                     ) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        payer, payee = rng.sample(users, 2)
        out.append(transfer(f"{prefix}-{i}", payer, payee, f"{rng.randint(1, 300)}.{i % 100:02d}"))
    return out


IN_PROCESS_RETRY = r"transient error \w+, retry \d+"
CELERY_RETRY = rf"Task {re.escape(EXECUTE_TASK)}\[[^\]]+\] retry:"
#: Connections of the test's database inside a transaction: a worker mid-command.
_TERMINATE_IN_FLIGHT = text(
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db"
    " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    " AND state IN ('active', 'idle in transaction')")


@pytest.mark.slow
def test_terminated_postgres_connections_are_retried_and_nothing_doubles(
        worker_factory, client, pg_admin):
    # One command per transaction (no coalescing), 50 ms inside each: there is nearly always
    # one in flight for the kills to cut.
    worker = worker_factory(concurrency=3, env={"WALLETQ_TASK_BACKOFF_S_MAX": "1",
                                                "WALLETQ_TASK_RETRIES_MAX": "10",
                                                "WALLETQ_COALESCE_MAX": "1",
                                                "WALLETQ_TEST_DELAY_S": "0.05"})
    users = ["ann", "ben", "cat", "dan"]
    seed_users(client, users, "1000.00", [worker])
    rng = random.Random(3)
    # Amounts up to 300: some transfers are legitimately refused (insufficient balance).
    commands = random_transfers("pgkill", users, 200, rng)
    keys = submit_all(client, commands)

    # Terminate the connections of commands in flight until the workers have retried
    # several times; the test's own connections are idle meanwhile, and never cut.
    database = current_database_name()
    terminated = 0

    def cut_until_retried() -> bool:
        nonlocal terminated
        with pg_admin.connect() as conn:
            terminated += len(conn.execute(_TERMINATE_IN_FLIGHT, {"db": database}).all())
        return terminated >= 5 and log_count([worker], IN_PROCESS_RETRY) >= 3

    eventually(cut_until_retried, 60, describe=worker.log_tail)
    records = wait_terminal(client, keys, 120, [worker])
    statuses = {k: records[k].status for k in keys}

    counted = Counter(statuses.values())
    attempts_over_1 = sum(r.attempts > 1 for r in command_rows(keys).values())
    in_process = log_count([worker], IN_PROCESS_RETRY)
    celery_retries = log_count([worker], CELERY_RETRY)
    print(f"\n[pg_terminate] terminated {terminated} backends mid-transaction; "
          f"{len(keys)} commands: {dict(counted)}; in-process retries {in_process}, "
          f"Celery retries {celery_retries}, commands with attempts > 1: {attempts_over_1}")
    assert set(counted) <= {"succeeded", "rejected"}, counted
    rows = assert_exactly_once(statuses)
    assert {rows[k].error_code for k in keys if statuses[k] == "rejected"} <= {
        "insufficient_balance"}
    assert_balances(client, {u: b + Decimal("1000.00") for u, b in
                             _with_all(expected_balances(commands, statuses), users).items()})
    assert worker.alive
    assert_ledger_sound(client.engine, client.settings)


def _with_all(balances: dict[str, Decimal], users: list[str]) -> dict[str, Decimal]:
    return {user: balances.get(user, Decimal(0)) for user in users}


# --- 4. A deadlock storm --------------------------------------------------------------------


class LockOrderReverser:
    """A foreign client that locks two accounts in the opposite (descending id) order.

    walletq locks accounts by ascending id, so its own transactions wait for each other
    but never deadlock; this client makes real deadlocks with them (PostgreSQL 40P01).
    Its sessions wait 150 ms before looking for a deadlock, the workers' 20 ms, so the
    workers' transactions are mostly the victims — and must be retried whole. (A waiter
    looks for a deadlock once: a cycle that closes later is found by the reverser.)
    """

    def __init__(self, url: str, codes: list[str]) -> None:
        self.engine: Engine = create_engine(url, isolation_level="READ COMMITTED")
        self.codes = codes
        self.stop = threading.Event()
        self.cycles = 0
        self.errors = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = random.Random(4)
        lock = text("SELECT id FROM accounts WHERE code = :code FOR UPDATE")
        while not self.stop.is_set():
            first, second = sorted(rng.sample(self.codes, 2), key=self.codes.index, reverse=True)
            try:
                with self.engine.begin() as conn:
                    conn.execute(text("SET LOCAL deadlock_timeout = '150ms'"))
                    conn.execute(lock, {"code": first})
                    time.sleep(0.03)
                    conn.execute(lock, {"code": second})
                self.cycles += 1
            except Exception:  # noqa: BLE001 - this client is expendable
                self.errors += 1
            time.sleep(0.02)

    def __enter__(self) -> LockOrderReverser:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.engine.dispose()


def account_codes_by_id(users: list[str]) -> list[str]:
    a = schema.accounts
    codes = [f"user:{user}:available" for user in users]
    with get_engine(get_settings()).connect() as conn:
        return list(conn.execute(select(a.c.code).where(a.c.code.in_(codes)).order_by(a.c.id))
                    .scalars())


@pytest.mark.slow
def test_a_deadlock_storm_completes_with_retries_and_nothing_doubles(
        worker_factory, client, pg_admin):
    database = current_database_name()
    with pg_admin.connect() as conn:
        # New sessions on the test's database only: look for deadlocks after 20 ms.
        conn.execute(text(f'ALTER DATABASE "{database}" SET deadlock_timeout = \'20ms\''))
    # One command per transaction (no coalescing): many transactions to deadlock.
    env = {"WALLETQ_TEST_DELAY_S": "0.01", "WALLETQ_TASK_BACKOFF_S_MAX": "1",
           "WALLETQ_TASK_RETRIES_MAX": "10", "WALLETQ_COALESCE_MAX": "1"}
    workers = [worker_factory(concurrency=3, env=env) for _ in range(2)]
    users = ["ada", "bob", "cy"]
    seed_users(client, users, "1000.00", workers)
    codes = account_codes_by_id(users)
    rng = random.Random(5)
    # Every pair in both directions, amounts small enough that nothing runs dry.
    commands = [transfer(f"storm-{i}", *rng.sample(users, 2), f"{rng.randint(1, 5)}.00")
                for i in range(180)]
    started = time.monotonic()
    with LockOrderReverser(get_settings().database_url, codes) as reverser:
        keys = submit_all(client, commands)
        records = wait_terminal(client, keys, 150, workers)
    elapsed = time.monotonic() - started
    statuses = {k: records[k].status for k in keys}

    in_process = log_count(workers, IN_PROCESS_RETRY)
    by_code = Counter(re.findall(r"transient error (\w+), retry", "".join(w.log_text() for w in workers)))
    celery_retries = log_count(workers, CELERY_RETRY)
    attempts_over_1 = sum(r.attempts > 1 for r in command_rows(keys).values())
    print(f"\n[deadlock storm] {len(keys)} transfers on {len(users)} accounts by 2 workers x 3 in "
          f"{elapsed:.1f} s; foreign lock-order reverser {reverser.cycles} cycles "
          f"({reverser.errors} failed); in-process retries {in_process} {dict(by_code)}; "
          f"Celery retries {celery_retries}; commands with attempts > 1: {attempts_over_1}")
    assert set(statuses.values()) == {"succeeded"}, Counter(statuses.values())
    assert in_process > 0 and by_code["40P01"] > 0, "no deadlock was retried"
    assert_exactly_once(statuses)
    assert_balances(client, {u: b + Decimal("1000.00") for u, b in
                             _with_all(expected_balances(commands, statuses), users).items()})
    assert all(w.alive for w in workers)
    assert_ledger_sound(client.engine, client.settings)
    # PostgreSQL saw the deadlocks the workers retried (read once every backend has exited).
    for w in workers:
        w.stop()
    close_connections(client.engine)  # the test's own (dispose_engines() keeps them open)
    assert settled_deadlocks(pg_admin, database) >= by_code["40P01"]


# --- 5. Poison messages ----------------------------------------------------------------------


def _task_headers(task: str, args_repr: str = "()") -> dict[str, Any]:
    task_id = str(uuid.uuid4())
    return {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None,
            "group": None, "shadow": None, "eta": None, "expires": None, "retries": 0,
            "timelimit": [None, None], "argsrepr": args_repr, "kwargsrepr": "{}",
            "origin": "test_faults", "ignore_result": True}


@on_both_brokers
def test_poison_messages_are_refused_acked_and_the_worker_goes_on(
        worker, client, broker, queue_prefix):
    """What test_delivery.py does not cover: garbage at the message level (the body, its
    serialisation, the task name, the Celery envelope), published raw with kombu."""
    app = client.publisher.app
    queue = client.publisher.queues.commands
    exchange = Exchange(f"{queue_prefix}walletq", type="direct")
    pickled = credit("pickled", "mallory", "1000.00")
    envelope_embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    poison: list[tuple[str, bytes, str, str, dict[str, Any]]] = [
        ("non-JSON body, task headers", b"\xff{not json", "application/json", "utf-8",
         _task_headers(EXECUTE_TASK)),
        ("non-JSON body, no headers", b"{{{ garbage", "application/json", "utf-8", {}),
        ("pickle-serialised task", pickle.dumps(([pickled], {}, envelope_embed)),
         "application/x-python-serialize", "binary", _task_headers(EXECUTE_TASK)),
        ("unknown task name", json.dumps([[credit("unknown-task", "eve", "5.00")], {},
                                          envelope_embed]).encode(), "application/json",
         "utf-8", _task_headers("walletq.no_such_task")),
        ("envelope not [args, kwargs, embed]", json.dumps({"not": "an envelope"}).encode(),
         "application/json", "utf-8", _task_headers(EXECUTE_TASK)),
        ("JSON that is no task message", json.dumps({"hello": "world"}).encode(),
         "application/json", "utf-8", {}),
    ]
    with app.connection_for_write() as conn:
        producer = Producer(conn.default_channel, exchange=exchange)
        for _name, body, content_type, encoding, headers in poison:
            producer.publish(body, routing_key=queue, content_type=content_type,
                             content_encoding=encoding, headers=headers, serializer=None,
                             delivery_mode=2)
    client.submit(credit("after-poison", "alice", "2.00"))
    record = client.wait("after-poison", timeout=30)
    assert record.status == "succeeded", worker.log_tail()

    eventually(lambda: broker.idle(queue_prefix), 30,
               describe=lambda: (broker.state(queue_prefix), worker.log_tail()))
    assert client.status("pickled") is None, "a pickled message was executed"
    assert client.status("unknown-task") is None
    log = worker.log_text()
    assert "ContentDisallowed" in log or "disallowed" in log.lower(), worker.log_tail()
    assert "no_such_task" in log
    # Still consuming: a second command after all that garbage.
    client.submit(credit("after-poison-2", "alice", "3.00"))
    assert client.wait("after-poison-2", timeout=30).status == "succeeded", worker.log_tail()
    assert worker.alive
    assert client.balance("alice")["available"] == Decimal("5.00")
    assert_exactly_once({"after-poison": "succeeded", "after-poison-2": "succeeded"})
    print(f"\n[poison] {len(poison)} poison messages refused and acked; worker alive, queue empty")
    assert_ledger_sound(client.engine, client.settings)
