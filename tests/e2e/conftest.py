"""End-to-end fixtures: a REAL `celery -A worker worker` subprocess on the test's database.

Use `pipeline_env` for the environment (a fresh PostgreSQL database from `walletq_env`,
the test's broker, queue names of the test's own), `worker` for one started worker, or
`worker_factory` to start several or with options. `client` is a WalletClient on that
environment. Every worker is stopped (SIGKILL if need be) and the test's Redis keys (or
RabbitMQ queues) are deleted at teardown.

The broker is Redis unless the test is parametrized by `broker_kind`: `@on_both_brokers`
runs it on Redis and on RabbitMQ (the shared node on 5672; a test that restarts RabbitMQ
starts its own, tests/e2e/fault_servers.py). `broker` says which one and whether it is idle.

    def test_something(worker, client):
        client.submit({...})
        worker.kill()                       # SIGKILL the whole worker (main + pool processes)
        worker.start()                      # the same worker again, same queues
        assert client.wait("key", timeout=20).status == "succeeded"

    def test_slow(worker_factory):
        w = worker_factory(concurrency=4, env={"WALLETQ_TEST_DELAY_S": "0.5"})
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from services import settings as settings_module
from services.db import dispose_engines
from tests import servers
from tests.support.broker import broker_idle, queue_state
from tests.support.polling import eventually
from tests.support.rabbit import delete_walletq_queues, in_queue_counts, rabbit_idle, ready_counts

REDIS_DB = 0
BROKER_URL = f"{servers.REDIS_URL}/{REDIS_DB}"
RABBITMQ_URL = servers.RABBITMQ_URL
READY_TIMEOUT_S = 30.0
BROKERS = ("redis", "rabbitmq")

#: Run a test on each broker (the fixtures below read `broker_kind`).
on_both_brokers = pytest.mark.parametrize("broker_kind", BROKERS, indirect=True)


@dataclass(frozen=True)
class Broker:
    """The test's broker: its kind, URL, and (RabbitMQ) the node rabbitmqctl should ask."""

    kind: str
    url: str
    node: str | None = None

    def idle(self, prefix: str) -> bool:
        """Nothing waits and nothing is in flight under the prefix: every delivery ended."""
        if self.kind == "redis":
            return broker_idle(self.url, prefix)
        return rabbit_idle(self.url, prefix, self.node)

    def state(self, prefix: str) -> dict[str, int]:
        if self.kind == "redis":
            return queue_state(self.url, prefix)
        from celeryconfig import QueueNames

        names = QueueNames(prefix)
        ready = ready_counts(self.url, names.all() + names.dead())
        return {**{f"{k} (ready)": v for k, v in ready.items() if v},
                **in_queue_counts(prefix, self.node)}


class WorkerProcess:
    """One `celery -A worker worker` subprocess, in its own process group.

    start() waits until the worker consumes its queues (a ready file written by the
    worker_ready signal); stop() is a warm shutdown (SIGTERM: running tasks finish);
    kill() is SIGKILL of the main process and its pool children at once; kill_pool_child()
    SIGKILLs one pool process only (the main process then re-queues its message:
    task_reject_on_worker_lost). restart() = stop (or kill) then start.
    """

    def __init__(self, env: dict[str, str], folder: Path, name: str, concurrency: int = 2,
                 queues: list[str] | None = None, extra_args: list[str] | None = None) -> None:
        self.env = dict(env)
        self.folder = folder
        self.name = name
        self.concurrency = concurrency
        self.queues = queues
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.ready_file = folder / f"{name}.ready"
        self.log_path = folder / f"{name}.log"

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel=INFO",
                "-c", str(self.concurrency), "-P", "prefork", "-n", f"{self.name}@%h",
                "--without-mingle", "--without-gossip", "--without-heartbeat"]
        if self.queues:
            args += ["-Q", ",".join(self.queues)]
        return args + self.extra_args

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> WorkerProcess:
        assert not self.alive, "worker already running"
        self.ready_file.unlink(missing_ok=True)
        env = {**self.env, "WALLETQ_WORKER_READY_FILE": str(self.ready_file)}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=str(self.folder))
        log.close()
        self.starts += 1
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{self.log_tail()}")
            return self.ready_file.exists()

        try:
            eventually(ready, timeout_s, describe=self.log_tail)
        except AssertionError:
            self.kill()
            raise
        return self

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """Warm shutdown; SIGKILL after timeout_s. Returns the exit code."""
        if not self.alive:
            return self.proc.returncode if self.proc else None
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int | None:
        """SIGKILL the worker's whole process group: nothing gets to ack or clean up."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        code = self.proc.wait(10)
        self.ready_file.unlink(missing_ok=True)
        return code

    def pool_pids(self) -> list[int]:
        """The pool (child) processes of the running worker."""
        if not self.alive:
            return []
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in children.read_text().split()] if children.exists() else []

    def kill_pool_child(self) -> int | None:
        """SIGKILL one pool process (the first); the main process replaces it."""
        pids = self.pool_pids()
        if not pids:
            return None
        os.kill(pids[0], signal.SIGKILL)
        return pids[0]

    def restart(self, *, kill: bool = False) -> WorkerProcess:
        self.kill() if kill else self.stop()
        return self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


@pytest.fixture
def queue_prefix() -> str:
    return f"wqt{uuid.uuid4().hex[:10]}."


@pytest.fixture(scope="session")
def redis_up() -> None:
    problem = servers.ensure_redis()
    if problem:
        pytest.exit(problem, returncode=3)


@pytest.fixture(scope="session")
def rabbitmq_up() -> None:
    problem = servers.ensure_rabbitmq()
    if problem:
        pytest.exit(problem, returncode=3)


@pytest.fixture
def broker_kind(request: pytest.FixtureRequest) -> str:
    """`redis` unless parametrized (on_both_brokers)."""
    return str(getattr(request, "param", "redis"))


@pytest.fixture
def broker(broker_kind: str, request: pytest.FixtureRequest) -> Broker:
    if broker_kind == "rabbitmq":
        request.getfixturevalue("rabbitmq_up")
        return Broker("rabbitmq", RABBITMQ_URL)
    request.getfixturevalue("redis_up")
    return Broker("redis", BROKER_URL)


@pytest.fixture
def pipeline_env(broker: Broker, walletq_env: dict[str, str], queue_prefix: str,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """walletq_env plus the test's broker and its own queue names; set in os.environ."""
    extra = {"WALLETQ_BROKER_URL": broker.url, "WALLETQ_QUEUE_PREFIX": queue_prefix,
             "WALLETQ_SWEEP_GRACE_S": "60"}
    for key, value in extra.items():
        monkeypatch.setenv(key, value)
    settings_module.reset_settings()
    yield {**walletq_env, **extra}
    if broker.kind == "redis":
        _delete_redis_keys(queue_prefix)
    else:
        delete_walletq_queues(broker.url, queue_prefix)


def _delete_redis_keys(prefix: str) -> None:
    """The test's queues and unacked bookkeeping, and kombu's bindings of its exchanges."""
    conn = redis.Redis.from_url(BROKER_URL)
    try:
        for pattern in (f"{prefix}*", f"_kombu.binding*.{prefix}*"):
            keys = list(conn.scan_iter(match=pattern, count=1000))
            if keys:
                conn.delete(*keys)
    finally:
        conn.close()


@pytest.fixture
def worker_factory(pipeline_env: dict[str, str], tmp_path: Path
                   ) -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers on the test's env: factory(concurrency=2, env=None, queues=None,
    extra_args=None, start=True). `env` adds to / overrides the test's WALLETQ_* env."""
    workers: list[WorkerProcess] = []
    folder = tmp_path / "workers"
    folder.mkdir()

    def factory(concurrency: int = 2, env: dict[str, str] | None = None,
                queues: list[str] | None = None, extra_args: list[str] | None = None,
                start: bool = True) -> WorkerProcess:
        full_env = {**os.environ, **pipeline_env, **(env or {})}
        process = WorkerProcess(full_env, folder, f"w{len(workers) + 1}", concurrency, queues,
                                extra_args)
        workers.append(process)
        return process.start() if start else process

    yield factory
    for process in workers:
        process.kill()


@pytest.fixture
def worker(worker_factory: Callable[..., WorkerProcess]) -> WorkerProcess:
    """One started worker (concurrency 2) consuming the test's three queues."""
    return worker_factory()


@pytest.fixture
def client(pipeline_env: dict[str, str]) -> Iterator[object]:
    from worker.client import WalletClient

    wallet = WalletClient.from_env()
    yield wallet
    wallet.close()
    dispose_engines()

