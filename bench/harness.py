"""What the benchmarks share: a scratch database and broker namespace of the run's own, a
producer to sign as, worker subprocesses, the Celery no-op ceiling, and the figures' print.

Everything is created for the run and removed at its end: a database walletq_bench_<random>
on postgresql://postgres@127.0.0.1:5432 (WALLETQ_TEST_PG_URL to change), Redis keys under a
prefix of the run's own on redis://127.0.0.1:6379/0 (WALLETQ_TEST_REDIS_URL).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PG_URL = os.environ.get("WALLETQ_TEST_PG_URL",
                        "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("WALLETQ_TEST_REDIS_URL", "redis://127.0.0.1:6379") + "/0"


def scratch_database() -> tuple[str, str]:
    """A database of the run's own: (its name, its URL); drop it with drop_database."""
    name = f"walletq_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(make_url(PG_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


def drop_database(name: str) -> None:
    admin = create_engine(make_url(PG_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def machine_load() -> str:
    """The 1-minute load average against the cores: figures taken above ~1 per core are noise."""
    load = os.getloadavg()[0]
    return f"load average {load:.2f} on {os.cpu_count()} cores"


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the runs (the runs' ratios are medians of their own)."""
    return {name: statistics.median(run[name] for run in runs) for name in runs[0]}


class Scratch:
    """A database, a home folder, queue names and a producer of the run's own."""

    def __init__(self, extra_env: dict[str, str] | None = None) -> None:
        self.tag = uuid.uuid4().hex[:10]
        self.db_name = f"walletq_bench_{self.tag}"
        self.admin = create_engine(make_url(PG_URL), isolation_level="AUTOCOMMIT", pool_size=1)
        self.url = make_url(PG_URL).set(database=self.db_name).render_as_string(hide_password=False)
        self.folder = Path(tempfile.mkdtemp(prefix="walletq-bench-"))
        self.prefix = f"bench{self.tag}."
        self.env = {
            "WALLETQ_DATABASE_URL": self.url,
            "WALLETQ_BROKER_URL": REDIS_URL,
            "WALLETQ_QUEUE_PREFIX": self.prefix,
            "WALLETQ_HOME": str(self.folder / "home"),
            "WALLETQ_STATEMENT_TIMEOUT_MS": "120000",
            **(extra_env or {}),
        }
        self.workers: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Scratch:
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db_name}"'))
        for key in [k for k in os.environ if k.startswith("WALLETQ_")]:
            del os.environ[key]
        os.environ.update(self.env)
        from services.db import upgrade
        from services.settings import get_settings, reset_settings

        reset_settings()
        upgrade(get_settings())
        self._producer()
        return self

    def _producer(self) -> None:
        """An admin producer this process (and the CLI it runs) signs as."""
        from services.db import get_engine
        from services.producers import create
        from services.settings import get_settings, reset_settings
        from services.signing import new_private_key, write_private_key

        name = f"bench-{self.tag}"
        key = new_private_key()
        write_private_key(self.folder / f"{name}.key", key)
        with get_engine(get_settings()).begin() as conn:
            create(conn, name, "admin", key.public_key())
        self.env.update({"WALLETQ_PRODUCER": name,
                         "WALLETQ_PRODUCER_KEY_FILE": str(self.folder / f"{name}.key")})
        os.environ.update(self.env)
        reset_settings()

    def __exit__(self, *exc: object) -> None:
        self.stop_workers()
        from services.db import dispose_engines

        dispose_engines()
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        self.admin.dispose()
        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()

    # --- processes -----------------------------------------------------------------------

    def start_worker(self, concurrency: int, app: str = "worker", env: dict[str, str] | None = None,
                     queues: str = "commands,payouts") -> subprocess.Popen[bytes]:
        n = len(self.workers) + 1
        ready = self.folder / f"worker{n}.ready"
        log = (self.folder / f"worker{n}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", app, "worker", "--loglevel=WARNING",
             "-c", str(concurrency), "-P", "prefork", "-n", f"bench{self.tag}-{n}@%h",
             "-Q", ",".join(f"{self.prefix}{q}" for q in queues.split(",")),
             "--without-mingle", "--without-gossip", "--without-heartbeat"],
            env={**os.environ, **self.env, **(env or {}), "WALLETQ_WORKER_READY_FILE": str(ready)},
            stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start; see {self.folder}/worker{n}.log")
            time.sleep(0.05)
        self.workers.append(proc)
        return proc

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        self.workers.clear()

    @contextmanager
    def workers_running(self, count: int, concurrency: int, app: str = "worker",
                        env: dict[str, str] | None = None) -> Iterator[None]:
        try:
            for _ in range(count):
                self.start_worker(concurrency, app, env)
            yield
        finally:
            self.stop_workers()

    def queues_drained(self) -> bool:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            for key in client.scan_iter(match=f"{self.prefix}*"):
                kind = client.type(key)
                if (kind == b"list" and client.llen(key)) or (
                        key.endswith(b"unacked") and client.hlen(key)):
                    return False
            return True
        finally:
            client.close()


def wait_until(condition: Callable[[], bool], timeout_s: float = 600, poll_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the benchmark's condition was not met in time")
        time.sleep(poll_s)


def noop_rate(scratch: Scratch, n: int, workers: int, concurrency: int) -> tuple[float, float]:
    """The Celery ceiling, measured with walletq's own configuration (Redis, acks_late,
    prefetch 1, no result backend) and a task that does nothing: (messages/s through the
    workers, messages/s one producer publishes)."""
    from bench.noop import NOOP_TASK, make_noop_app

    app = make_noop_app()
    queue = f"{scratch.prefix}commands"
    with scratch.workers_running(workers, concurrency, app="bench.noop"):
        started = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for _ in range(n):
                app.send_task(NOOP_TASK, args=[{}], queue=queue, routing_key=queue,
                              producer=producer, ignore_result=True)
        published = time.perf_counter()
        wait_until(scratch.queues_drained, poll_s=0.005)
        ended = time.perf_counter()
    app.close()
    return n / (ended - started), n / (published - started)


def commands_ended(engine: Any, keys: list[str]) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT COUNT(*) FROM commands WHERE idempotency_key = ANY(:k) "
            "AND status IN ('succeeded', 'rejected', 'failed')"), {"k": keys}).scalar_one())


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    """Rows of (what, figure, ratio to its ceiling)."""
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}")
    print(f"{'what':<{width}}  {'figure':>22}  ratio")
    print("-" * (width + 32))
    for what, figure, ratio in rows:
        print(f"{what:<{width}}  {figure:>22}  {ratio}")
