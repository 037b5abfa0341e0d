"""Throughput against its ceilings, measured in one run on this machine. Not a test.

    python bench/throughput.py [--runs 3] [--burst 2000] [--submit 10000] [--workers 1]
                               [--concurrency 2] [--sql-clients 4]

Each run, on a database and queues of its own (bench/harness.py):

  ceilings   the Celery no-op task through the same workers (walletq's Celery settings);
             one producer publishing (apply_async); a transfer in raw SQL (psycopg2, no
             walletq: two balance updates, an insert, a commit) by --sql-clients clients;
             pgbench's built-in transaction by one client (five statements, one durable
             commit: the ceiling of one command in process; skipped without pgbench)
  walletq    one command in process (WalletService, one connection); a burst of single
             transfers submitted at once (submit_many), first submit -> all terminal;
             submit_many and `walletq submit -` of --submit commands (record + publish);
             hot accounts: a burst of releases (every one credits platform:fees) and of
             sales (every one debits platform:treasury) against a burst of transfers
             between random users; and, as the profile of the releases' figure, the
             same releases with a fee of 0 (no leg on a hot row)

and prints each walletq figure as a ratio of its ceiling. With --runs N the median of each
figure (and ratio) over the runs is printed too. Durable commits: synchronous_commit as the
server has it (printed). The machine's load is printed: on a shared machine, compare
ratios of one run, never one day's figure with another's.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg2
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu import CpuMeter  # noqa: E402 - after the path is set
from bench.harness import (  # noqa: E402 - after the path is set
    REDIS_URL,
    Scratch,
    commands_ended,
    machine_load,
    median_of,
    noop_rate,
    print_table,
    progress,
    wait_until,
)

USERS = 200


def single_client_rate(url: str, seconds: int = 5) -> float:
    """pgbench's TPC-B-like transaction (three updates, a select, an insert, one commit) by
    one client, on the run's database: what one connection's round trips and durable
    commits allow. NaN when pgbench is not installed."""
    found = shutil.which("pgbench") or next(
        iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"), reverse=True)), None)
    if found is None:
        return float("nan")
    u = make_url(url)
    env = {**os.environ, "PGHOST": u.host or "127.0.0.1", "PGPORT": str(u.port or 5432),
           "PGUSER": u.username or "postgres", "PGDATABASE": u.database or "",
           "PGPASSWORD": u.password or ""}
    subprocess.run([found, "-i", "-q", "-s", "1"], env=env, check=True, capture_output=True)
    try:
        done = subprocess.run([found, "-c", "1", "-T", str(seconds), "-n"], env=env,
                              check=True, capture_output=True, text=True)
    finally:  # its four tables dropped again: the run's database is walletq's
        subprocess.run([found, "-i", "-I", "d"], env=env, check=True, capture_output=True)
    match = re.search(r"tps = ([0-9.]+)", done.stdout)
    return float(match.group(1)) if match else float("nan")


def raw_sql_rate(url: str, transfers: int, clients: int) -> float:
    """Transfers per second in plain SQL: the database's ceiling for the same movement."""
    dsn = url.replace("postgresql+psycopg2://", "postgresql://")
    setup = psycopg2.connect(dsn)
    with setup, setup.cursor() as cur:
        cur.execute("CREATE TABLE bench_accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL "
                    "CHECK (balance >= 0))")
        cur.execute("CREATE TABLE bench_transfers (id BIGSERIAL PRIMARY KEY, debit INT NOT NULL "
                    "REFERENCES bench_accounts, credit INT NOT NULL REFERENCES bench_accounts, "
                    "amount BIGINT NOT NULL CHECK (amount > 0))")
        cur.execute("INSERT INTO bench_accounts SELECT g, 1000000000 FROM generate_series(1, 1000) g")
    setup.close()

    def client(n: int, seed: int) -> None:
        rng = random.Random(seed)
        conn = psycopg2.connect(dsn)
        with conn.cursor() as cur:
            for _ in range(n):
                a, b = sorted(rng.sample(range(1, 1001), 2))
                cur.execute("UPDATE bench_accounts SET balance = balance - 1 WHERE id = %s", (a,))
                cur.execute("UPDATE bench_accounts SET balance = balance + 1 WHERE id = %s", (b,))
                cur.execute("INSERT INTO bench_transfers (debit, credit, amount) VALUES (%s, %s, 1)",
                            (a, b))
                conn.commit()
        conn.close()

    threads = [threading.Thread(target=client, args=(transfers // clients, i)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return transfers // clients * clients / (time.perf_counter() - started)


def transfer(key: str, rng: random.Random, users: list[str]) -> dict[str, Any]:
    payer, payee = rng.sample(users, 2)
    return {"type": "transfer_tokens_between_users", "idempotency_key": key,
            "from_user": payer, "to_user": payee, "amount": "0.01"}


def burst(client: Any, engine: Any, commands: list[dict[str, Any]]) -> float:
    """Commands per second, first submit -> all terminal."""
    keys = [c["idempotency_key"] for c in commands]
    started = time.perf_counter()
    answers = client.submit_many(commands)
    assert not [a for a in answers if isinstance(a, Exception)], answers[:3]
    wait_until(lambda: commands_ended(engine, keys) == len(keys), poll_s=0.01)
    return len(keys) / (time.perf_counter() - started)


def in_process_rate(n: int, users: list[str]) -> dict[str, float]:
    """The rate, and where each command's time goes: this process's CPU (Python, the
    driver), the PostgreSQL backend's CPU, and the rest (waiting: round trips, the commit's
    flush to disk, scheduling)."""
    from services.wallet_service import WalletService

    service = WalletService()
    meter = CpuMeter(service.engine, [], REDIS_URL)
    rng = random.Random(1)
    meter.start()
    started = time.perf_counter()
    for i in range(n):
        payer, payee = rng.sample(users, 2)
        service.transfer_tokens_between_users(payer, payee, "0.01", idempotency_key=f"ip-{i}")
    elapsed = time.perf_counter() - started
    cpu = meter.per_command(n)
    wall_ms = elapsed * 1e3 / n
    return {"in_process": n / elapsed, "in_process_py_ms": cpu["producer"],
            "in_process_pg_ms": cpu["postgres"],
            "in_process_wait_ms": wall_ms - cpu["producer"] - cpu["postgres"]}


def cli_submit_rate(scratch: Scratch, lines: list[dict[str, Any]]) -> float:
    text = "".join(json.dumps(line) + "\n" for line in lines)
    walletq = str(Path(sys.executable).parent / "walletq")
    started = time.perf_counter()
    done = subprocess.run([walletq, "--json", "submit", "-"], input=text, capture_output=True,
                          text=True, env={**os.environ, **scratch.env}, check=False)
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-2000:]
    return len(lines) / elapsed


def one_run(args: argparse.Namespace, run: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    with Scratch() as scratch:
        from services.db import get_engine
        from services.settings import get_settings
        from worker.client import WalletClient

        engine = get_engine(get_settings())
        progress(f"run {run}: Celery no-op, {args.burst:,} messages")
        figures["noop"], figures["publish"] = noop_rate(scratch, args.burst, args.workers,
                                                        args.concurrency)
        progress(f"run {run}: raw SQL transfers, {args.sql_clients} clients")
        figures["sql"] = raw_sql_rate(scratch.url, args.burst, args.sql_clients)
        progress(f"run {run}: pgbench, one client")
        figures["pgbench"] = single_client_rate(scratch.url)
        client = WalletClient.from_env()
        users = [f"u{i}" for i in range(USERS)]
        rng = random.Random(run)
        with scratch.workers_running(args.workers, args.concurrency):
            progress(f"run {run}: seeding {USERS} users and the treasury")
            seed = [{"type": "credit_wallet", "idempotency_key": f"seed-{u}", "user": u,
                     "amount": "100000.00"} for u in users]
            seed.append({"type": "admin_create_tokens", "idempotency_key": "mint",
                         "amount": "100000000.00"})
            burst(client, engine, seed)
            progress(f"run {run}: one command in process")
            figures.update(in_process_rate(500, users))
            progress(f"run {run}: a burst of {args.burst:,} transfers")
            figures["burst"] = burst(client, engine, [transfer(f"b-{i}", rng, users)
                                                      for i in range(args.burst)])
            progress(f"run {run}: hot accounts (releases, sales) against transfers")
            holds = [{"type": "transfer_to_escrow", "idempotency_key": f"h-{i}",
                      "hold_id": f"o-{i}", "amount": "1.00", **dict(zip(
                          ("payer", "payee"), rng.sample(users, 2), strict=True))}
                     for i in range(args.burst)]
            burst(client, engine, holds)
            figures["transfers"] = burst(client, engine, [transfer(f"t-{i}", rng, users)
                                                          for i in range(args.burst)])
            figures["releases"] = burst(client, engine, [
                {"type": "release_from_escrow", "idempotency_key": f"r-{i}", "hold_id": f"o-{i}"}
                for i in range(args.burst)])
            # The profile of the releases' gap: the same releases with a fee of 0 touch no hot
            # row (no fee leg), so hot-fee releases / fee-free releases is the hot row's cost
            # and fee-free releases / transfers the cost of being a release (hold + escrow).
            burst(client, engine, [{**hold, "idempotency_key": f"z{hold['idempotency_key']}",
                                    "hold_id": f"z{hold['hold_id']}", "fee_rate": "0"}
                                   for hold in holds])
            figures["releases_no_fee"] = burst(client, engine, [
                {"type": "release_from_escrow", "idempotency_key": f"zr-{i}", "hold_id": f"zo-{i}"}
                for i in range(args.burst)])
            figures["sales"] = burst(client, engine, [
                {"type": "admin_sell_tokens_to_user", "idempotency_key": f"s-{i}",
                 "user": rng.choice(users), "amount": "0.01"} for i in range(args.burst)])
        progress(f"run {run}: submit_many and `walletq submit -` of {args.submit:,}, no worker")
        started = time.perf_counter()
        answers = client.submit_many([transfer(f"m-{i}", rng, users) for i in range(args.submit)])
        figures["submit_many"] = len(answers) / (time.perf_counter() - started)
        figures["submit_cli"] = cli_submit_rate(scratch, [transfer(f"c-{i}", rng, users)
                                                          for i in range(args.submit)])
        client.close()
        from services.verify import verify_ledger

        failed = [c.name for c in verify_ledger(engine, get_settings().asset_scale) if not c.ok]
        assert not failed, f"walletq verify failed: {failed}"
        with engine.connect() as conn:
            figures["_sync"] = 1.0 if conn.exec_driver_sql("SHOW synchronous_commit").scalar() \
                == "on" else 0.0
    return figures


def report(title: str, f: dict[str, float], args: argparse.Namespace) -> None:
    hot = min(f["releases"], f["sales"])
    print_table(title, [
        (f"Celery no-op task, {args.workers} worker(s) x {args.concurrency}",
         f"{f['noop']:,.0f} msg/s", "(ceiling)"),
        ("one producer publishing (apply_async)", f"{f['publish']:,.0f} msg/s", "(ceiling)"),
        (f"raw SQL transfer, {args.sql_clients} psycopg2 clients", f"{f['sql']:,.0f} tx/s",
         "(ceiling)"),
        (f"burst of {args.burst:,} transfers, submit -> all terminal",
         f"{f['burst']:,.0f} cmd/s",
         f"{f['burst'] / f['noop']:.2f} x no-op (goal >= 1.0), {f['burst'] / f['sql']:.2f} x SQL"),
        ("pgbench's transaction, one client (5 statements, 1 commit)",
         f"{f['pgbench']:,.0f} tx/s", "(ceiling)"),
        ("one command in process (WalletService, one connection)",
         f"{f['in_process']:,.0f} cmd/s",
         f"{f['in_process'] / f['pgbench']:.2f} x pgbench (goal >= 500/s; the issue's day: "
         "500 of pgbench's 700 = 0.71 x)"),
        ("  where each of its milliseconds goes",
         f"{1e3 / f['in_process']:.2f} ms",
         f"Python {f['in_process_py_ms']:.2f}, PostgreSQL {f['in_process_pg_ms']:.2f}, "
         f"waiting (round trips, commit flush) {f['in_process_wait_ms']:.2f}"),
        (f"submit_many of {args.submit:,} (record + publish)", f"{f['submit_many']:,.0f} cmd/s",
         f"{f['submit_many'] / f['publish']:.2f} x apply_async (goal >= 3,000/s)"),
        (f"`walletq submit -` of {args.submit:,} lines (whole process)",
         f"{f['submit_cli']:,.0f} cmd/s", f"{f['submit_cli'] / f['publish']:.2f} x apply_async"),
        (f"burst of {args.burst:,} transfers between random users", f"{f['transfers']:,.0f} cmd/s",
         "(baseline of the hot rows)"),
        (f"burst of {args.burst:,} releases (all credit platform:fees)",
         f"{f['releases']:,.0f} cmd/s", f"{f['releases'] / f['transfers']:.2f} x transfers"),
        (f"burst of {args.burst:,} releases with fee 0 (no hot row: the profile)",
         f"{f['releases_no_fee']:,.0f} cmd/s",
         f"{f['releases_no_fee'] / f['transfers']:.2f} x transfers; hot fee costs "
         f"{1 - f['releases'] / f['releases_no_fee']:.0%}"),
        (f"burst of {args.burst:,} sales (all debit platform:treasury)",
         f"{f['sales']:,.0f} cmd/s", f"{f['sales'] / f['transfers']:.2f} x transfers"),
        ("hot accounts, the slower of the two", f"{hot:,.0f} cmd/s",
         f"{hot / f['transfers']:.2f} x transfers (goal >= 0.9)"),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--submit", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--sql-clients", type=int, default=4)
    args = parser.parse_args()
    runs = []
    for run in range(1, args.runs + 1):
        before = machine_load()
        figures = one_run(args, run)
        runs.append(figures)
        report(f"run {run} of {args.runs} ({before} before, {machine_load()} after; "
               f"synchronous_commit={'on' if figures['_sync'] else 'off'})", figures, args)
    if args.runs > 1:
        medians = median_of(runs)
        ratios = {f"{name}/{base}": median_of([{"r": r[name] / r[base]} for r in runs])["r"]
                  for name, base in (("burst", "noop"), ("in_process", "pgbench"),
                                     ("submit_many", "publish"),
                                     ("releases", "transfers"), ("releases_no_fee", "transfers"),
                                     ("releases", "releases_no_fee"), ("sales", "transfers"))}
        report(f"median of {args.runs} runs", medians, args)
        print("median ratios of the runs: " + ", ".join(
            f"{name} {value:.2f}" for name, value in ratios.items()))


if __name__ == "__main__":
    main()
