"""Benchmark: batch payouts against single commands, through the same worker. Not a test.

In one run, on a database of its own (walletq_bench_<random>, dropped at the end) and a
worker subprocess of its own (`celery -A worker worker`, Redis broker, queues of its own):

  (a)  10,000 payouts as `walletq payout` does it: one payout_batch command
  (b)  the same 10,000 payouts as 10,000 admin_sell_tokens_to_user commands
  (a') 100,000 payouts as (a): the file split into batches of WALLETQ_PAYOUT_ITEMS_MAX

and prints items/s for each and the ratio a/b, then where the time goes: the client's
submit, the queue and claim, the chunks; and per chunk phase (lock, decide, insert,
update, progress, commit) from the same 10,000 paid in this process.
Each scenario pays fresh users (their wallets are opened by the payment), so each does
the same work. `--sync` measures the services without the queue: every scenario runs in
this process. Durable commits: the script reports the server's synchronous_commit.

    python bench/payouts.py [--items 10000] [--big 100000] [--concurrency 2] [--sync]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PG_URL = os.environ.get("WALLETQ_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
BROKER_URL = os.environ.get("WALLETQ_TEST_REDIS_URL", "redis://127.0.0.1:6379") + "/0"


def payout_rows(prefix: str, n: int) -> list[dict[str, str]]:
    """n payouts of 1.00 to 99.99 to n users; references unique per scenario."""
    rows = []
    for i in range(n):
        minor = 100 + (i * 7919) % 9_900
        rows.append({"user": f"{prefix}-u{i}", "amount": f"{minor // 100}.{minor % 100:02d}",
                     "reference": f"{prefix}-r{i}"})
    return rows


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tag = uuid.uuid4().hex[:10]
        self.db_name = f"walletq_bench_{self.tag}"
        self.admin = create_engine(make_url(PG_URL), isolation_level="AUTOCOMMIT", pool_size=1)
        self.url = make_url(PG_URL).set(database=self.db_name).render_as_string(hide_password=False)
        self.folder = Path(tempfile.mkdtemp(prefix="walletq-bench-"))
        self.env = {
            "WALLETQ_DATABASE_URL": self.url,
            "WALLETQ_BROKER_URL": BROKER_URL,
            "WALLETQ_QUEUE_PREFIX": f"bench{self.tag}.",
            "WALLETQ_HOME": str(self.folder / "home"),
            "WALLETQ_STATEMENT_TIMEOUT_MS": "120000",
        }
        if args.chunk is not None:
            self.env["WALLETQ_PAYOUT_CHUNK_ITEMS"] = str(args.chunk)
        self.worker: subprocess.Popen[bytes] | None = None

    # --- set-up and tear-down -----------------------------------------------------------

    def setup(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db_name}"'))
        os.environ.update(self.env)
        from services.db import upgrade
        from services.settings import get_settings, reset_settings

        reset_settings()
        upgrade(get_settings())

    def start_worker(self) -> None:
        ready = self.folder / "worker.ready"
        log = (self.folder / "worker.log").open("ab")
        env = {**os.environ, **self.env, "WALLETQ_WORKER_READY_FILE": str(ready)}
        prefix = self.env["WALLETQ_QUEUE_PREFIX"]
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel=WARNING",
             "-c", str(self.args.concurrency), "-P", "prefork", "-n", f"bench{self.tag}@%h",
             "-Q", f"{prefix}commands,{prefix}payouts", "--without-mingle", "--without-gossip",
             "--without-heartbeat"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start; see {self.folder / 'worker.log'}")
            time.sleep(0.05)

    def teardown(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.worker.pid, 9)
                self.worker.wait(10)
        from services.db import dispose_engines

        dispose_engines()
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        self.admin.dispose()

    # --- scenarios ----------------------------------------------------------------------

    def mint(self, amount: str) -> None:
        from services.command_executor import execute_command

        execute_command({"type": "admin_create_tokens", "idempotency_key": f"mint-{uuid.uuid4().hex}",
                         "amount": amount}, **_runtime())

    def run_batches(self, prefix: str, n: int) -> dict[str, Any]:
        """(a): the rows as `walletq payout` sends them: batches of at most the item limit."""
        from services.payouts.file import PayoutFile, batch_commands
        from services.settings import get_settings

        rows = payout_rows(prefix, n)
        commands = batch_commands(PayoutFile(rows, list(range(n)), prefix), "platform:treasury",
                                  f"bench-{prefix}", False, get_settings().payout_items_max)
        keys = [c["idempotency_key"] for c in commands]
        timing = self.pay(commands, keys, batch_size=1, poll_s=0.01)
        return {"items": n, **timing, "spans": self.batch_spans(keys), "paid": self.paid(keys)}

    def run_singles(self, prefix: str, n: int) -> dict[str, Any]:
        """(b): one admin_sell_tokens_to_user command per payout."""
        rows = payout_rows(prefix, n)
        commands = [{"type": "admin_sell_tokens_to_user", "idempotency_key": f"bench-{r['reference']}",
                     "user": r["user"], "amount": r["amount"]} for r in rows]
        keys = [c["idempotency_key"] for c in commands]
        return {"items": n, **self.pay(commands, keys, batch_size=1000, poll_s=0.1)}

    def pay(self, commands: list[dict[str, Any]], keys: list[str], *, batch_size: int,
            poll_s: float) -> dict[str, float]:
        """Execute in process (--sync), or submit (batch_size at a time) and wait for the worker."""
        started = time.perf_counter()
        if self.args.sync:
            from services.command_executor import execute_command

            for command in commands:
                execute_command(command, **_runtime())
            submitted = time.perf_counter()
        else:
            client = self.client()
            for start in range(0, len(commands), batch_size):
                chunk = commands[start:start + batch_size]
                if batch_size == 1:
                    client.submit(chunk[0])
                else:
                    client.submit_many(chunk)
            submitted = time.perf_counter()
            self.wait(keys, poll_s=poll_s)
        return {"seconds": time.perf_counter() - started, "submit_s": submitted - started}

    def client(self) -> Any:
        from worker.client import WalletClient

        if not hasattr(self, "_client"):
            self._client = WalletClient.from_env()
        return self._client

    def wait(self, keys: list[str], poll_s: float) -> None:
        engine = _runtime()["engine"]
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                left = conn.execute(text(
                    "SELECT COUNT(*) FROM commands WHERE idempotency_key = ANY(:k) "
                    "AND status IN ('succeeded', 'rejected', 'failed')"), {"k": keys}).scalar_one()
            if left == len(keys):
                return
            time.sleep(poll_s)
        raise TimeoutError(f"{len(keys)} commands did not end; see {self.folder / 'worker.log'}")

    def batch_spans(self, keys: list[str]) -> dict[str, float]:
        """From the database: accepted → first chunk started → last chunk committed."""

        with _runtime()["engine"].connect() as conn:
            row = conn.execute(text(
                "SELECT EXTRACT(EPOCH FROM MIN(b.created_at) - MIN(c.created_at)),"
                " EXTRACT(EPOCH FROM MAX(b.completed_at) - MIN(b.created_at)) "
                "FROM commands c JOIN payout_batches b ON b.command_id = c.id "
                "WHERE c.idempotency_key = ANY(:k)"), {"k": keys}).one()
        return {"to_first_chunk_s": float(row[0]), "chunks_s": float(row[1])}

    def paid(self, keys: list[str]) -> int:

        with _runtime()["engine"].connect() as conn:
            return int(conn.execute(text(
                "SELECT SUM(b.items_paid) FROM commands c JOIN payout_batches b "
                "ON b.command_id = c.id WHERE c.idempotency_key = ANY(:k)"), {"k": keys}).scalar_one())

    def phases(self, n: int) -> tuple[dict[str, float], int, float]:
        """The same n payouts paid in this process: seconds per chunk phase."""
        from services import payouts
        from services.command_executor import execute_command
        from services.commands import CommandLimits, parse_command
        from services.settings import get_settings

        rows = payout_rows("phase", n)
        command = {"type": "payout_batch", "idempotency_key": "bench-phases", "items": rows}
        started = time.perf_counter()
        parsed = parse_command(command, CommandLimits.from_settings(get_settings()))
        parse_s = time.perf_counter() - started
        payouts.TIMINGS.reset()
        execute_command(parsed, **_runtime())
        return dict(payouts.TIMINGS.seconds), payouts.TIMINGS.chunks, parse_s


def _runtime() -> dict[str, Any]:
    """The engine and settings of this process's WALLETQ_* environment."""
    from services.db import get_engine
    from services.settings import get_settings

    settings = get_settings()
    return {"engine": get_engine(settings), "settings": settings}


def _rate(result: dict[str, Any]) -> float:
    return result["items"] / result["seconds"]


def report(bench: Bench, a: dict[str, Any], b: dict[str, Any], big: dict[str, Any],
           phases: tuple[dict[str, float], int, float], sync_commit: str) -> None:
    mode = "in process (--sync)" if bench.args.sync else (
        f"worker, concurrency {bench.args.concurrency}, Redis")
    print(f"\nwalletq payouts benchmark: {mode}; chunk {bench.args.chunk} items; "
          f"synchronous_commit={sync_commit}")
    line = f"{'scenario':<52} {'items':>8} {'seconds':>9} {'items/s':>10}"
    print(line + "\n" + "-" * len(line))
    rows: list[tuple[str, dict[str, Any]]] = [
        (f"(a)  {a['items']:,} payouts, payout_batch", a),
        (f"(b)  {b['items']:,} single admin_sell_tokens_to_user", b),
        (f"(a') {big['items']:,} payouts, payout_batch x{-(-big['items'] // bench.items_max)}", big),
    ][:3 if big["items"] else 2]
    for name, result in rows:
        print(f"{name:<52} {result['items']:>8,} {result['seconds']:>9.2f} {_rate(result):>10,.0f}")
    print(f"{'ratio a/b':<52} {'':>8} {'':>9} {_rate(a) / _rate(b):>9.1f}x")
    print("\nwhere the time goes")
    for name, result in (("(a)", a), ("(a')", big))[:2 if big["items"] else 1]:
        spans = result["spans"]
        print(f"  {name:<5} client submit (validate, record, publish) {result['submit_s']:.3f} s; "
              f"accepted -> first chunk {spans['to_first_chunk_s']:.3f} s; "
              f"chunks {spans['chunks_s']:.3f} s")
    seconds, chunks, parse_s = phases
    body = sum(v for k, v in seconds.items() if k != "transaction")
    commit = seconds.get("transaction", 0.0) - body
    print(f"  per chunk, {bench.args.items:,} payouts in process ({chunks} chunks; parsing the command "
          f"{parse_s * 1e3:.0f} ms):")
    for phase in ("lock", "decide", "insert", "update", "progress"):
        print(f"    {phase:<9} {seconds.get(phase, 0.0) / max(chunks, 1) * 1e3:7.2f} ms")
    print(f"    {'commit+':<9} {commit / max(chunks, 1) * 1e3:7.2f} ms  (begin, command lock, "
          "batch read, commit)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=None,
                        help="items per chunk (default: WALLETQ_PAYOUT_CHUNK_ITEMS or its default)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--sync", action="store_true", help="no queue: run in this process")
    args = parser.parse_args()
    bench = Bench(args)
    bench.setup()
    try:
        from services.settings import get_settings

        bench.items_max = get_settings().payout_items_max
        args.chunk = get_settings().payout_chunk_items
        with _runtime()["engine"].connect() as conn:
            sync_commit = conn.execute(text("SHOW synchronous_commit")).scalar_one()
        if not args.sync:
            bench.start_worker()
        bench.mint(f"{(args.items * 3 + args.big) * 100}.00")
        def step(what: str) -> None:
            return print(f"... {what}", file=sys.stderr, flush=True)
        step(f"(a) {args.items:,} as one payout batch")
        a = bench.run_batches("a", args.items)
        step(f"(b) {args.items:,} single commands")
        b = bench.run_singles("b", args.items)
        step(f"(a') {args.big:,} as payout batches")
        big = bench.run_batches("big", args.big) if args.big else {"items": 0, "paid": 0}
        step("phases in process")
        phases = bench.phases(args.items)
        assert a["paid"] == args.items and big["paid"] == args.big, "not every payout was paid"
        report(bench, a, b, big, phases, sync_commit)
    finally:
        bench.teardown()


if __name__ == "__main__":
    main()
