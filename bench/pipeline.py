"""Commands per second through one worker: a burst of 1,000 transfers on PostgreSQL + Redis.

    python bench/pipeline.py [--commands 1000] [--concurrency 2] [--users 50]

Uses WALLETQ_DATABASE_URL when set (it must be migrated), otherwise creates a scratch
database on postgresql://postgres@127.0.0.1:5432 and drops it afterwards. The broker is
WALLETQ_BROKER_URL or redis://127.0.0.1:6379/0, with queues of the run's own. Submits the
burst with WalletClient.submit_many (one transaction per 500 commands, one producer
connection), then times until every command is terminal.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, text

SCRATCH_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


def _scratch_database() -> tuple[str, str]:
    name = f"walletq_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(SCRATCH_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, SCRATCH_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def _drop(name: str) -> None:
    admin = create_engine(SCRATCH_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _start_worker(env: dict[str, str], concurrency: int, folder: Path) -> subprocess.Popen[bytes]:
    ready = folder / "worker.ready"
    log = (folder / "worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel=WARNING",
         "-c", str(concurrency), "--without-mingle", "--without-gossip", "--without-heartbeat",
         "-n", f"bench{uuid.uuid4().hex[:6]}@%h"],
        env={**env, "WALLETQ_WORKER_READY_FILE": str(ready)}, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker did not start; see {folder / 'worker.log'}")
        time.sleep(0.05)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--users", type=int, default=50)
    args = parser.parse_args()

    scratch = None
    env = dict(os.environ)
    folder = Path(tempfile.mkdtemp(prefix="walletq-bench-"))
    if not env.get("WALLETQ_DATABASE_URL"):
        scratch, env["WALLETQ_DATABASE_URL"] = _scratch_database()
    env.setdefault("WALLETQ_BROKER_URL", "redis://127.0.0.1:6379/0")
    env["WALLETQ_QUEUE_PREFIX"] = f"bench{uuid.uuid4().hex[:6]}."
    env["WALLETQ_HOME"] = str(folder)
    os.environ.update(env)

    from services.db import upgrade
    from services.settings import get_settings
    from services.verify import verify_ledger
    from worker.client import WalletClient

    proc = None
    try:
        if scratch:
            upgrade(get_settings())
        client = WalletClient.from_env()
        proc = _start_worker(env, args.concurrency, folder)
        run = uuid.uuid4().hex[:6]
        users = [f"u{i}-{run}" for i in range(args.users)]
        seed = [{"type": "credit_wallet", "idempotency_key": f"seed-{u}", "user": u,
                 "amount": "1000.00"} for u in users]
        client.submit_many(seed)
        client.wait_all([c["idempotency_key"] for c in seed], timeout=120)

        burst = [{"type": "transfer_tokens_between_users", "idempotency_key": f"t-{run}-{i}",
                  "from_user": users[i % len(users)], "to_user": users[(i * 7 + 1) % len(users)],
                  "amount": "1.25"} for i in range(args.commands)]
        burst = [c for c in burst if c["from_user"] != c["to_user"]]
        started = time.perf_counter()
        answers = client.submit_many(burst)
        submitted_s = time.perf_counter() - started
        ended = client.wait_all([c["idempotency_key"] for c in burst], timeout=600)
        total_s = time.perf_counter() - started
        statuses: dict[str, int] = {}
        for record in ended.values():
            statuses[record.status] = statuses.get(record.status, 0) + 1
        # The same kind of transfer executed in this process, no queue: the ratio is what
        # the queue costs (the machine is noisy; compare figures of one run only).
        from services.command_executor import execute_command

        baseline = [dict(c, idempotency_key=f"b-{c['idempotency_key']}") for c in burst[:200]]
        base_started = time.perf_counter()
        settings = get_settings()
        for command in baseline:
            execute_command(command, engine=client.engine, settings=settings)
        baseline_rate = len(baseline) / (time.perf_counter() - base_started)
        settings = get_settings()
        ok = all(c.ok for c in verify_ledger(client.engine, settings.asset_scale))
        client.close()
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        if scratch:
            from services.db import dispose_engines

            dispose_engines()
            _drop(scratch)

    n = len(burst)
    table = Table(title=f"{n} transfers through one worker (concurrency {args.concurrency}), "
                        "PostgreSQL + Redis")
    for column in ("measure", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    table.add_row("accepted by submit_many", str(sum(1 for a in answers if hasattr(a, "status"))))
    table.add_row("submit_many (record + publish)", f"{submitted_s:.2f} s  "
                  f"({n / submitted_s:,.0f} commands/s)")
    table.add_row("first submit → all terminal", f"{total_s:.2f} s")
    table.add_row("end-to-end throughput", f"{n / total_s:,.0f} commands/s")
    table.add_row("same transfers in process, no queue", f"{baseline_rate:,.0f} commands/s "
                  "(one process)")
    table.add_row("outcomes", ", ".join(f"{v} {k}" for k, v in sorted(statuses.items())))
    table.add_row("walletq verify", "ok" if ok else "FAILED")
    Console().print(table)


if __name__ == "__main__":
    main()
