"""Payouts against their ceiling, measured in one run. Not a test.

    python bench/payouts.py [--runs 3] [--items 10000] [--big 100000] [--workers 2]
                            [--concurrency 1] [--chunk N]

Each run, on a database and queues of its own (bench/harness.py):

  ceiling  a minimal set-based payout in raw SQL (psycopg2, one client, chunks of the same
           size): lock the funder, open the wallets, insert the transfers from arrays,
           update the balances, commit
  (a)      --items payouts as one payout_batch command through the workers
  (a')     --big payouts through `walletq payout FILE.csv` (the whole process: read and
           validate the file, submit its batches, wait for the workers, report)
  (a'')    the same file paid again under another key: every item a duplicate, nothing paid
  phases   where a chunk's time goes, from --items paid in this process (lock, decide, pay,
           progress, commit)

and prints items/s with each as a ratio of the ceiling, and of the goal (20,000 items/s).
Durable commits (synchronous_commit as the server has it, printed).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (  # noqa: E402 - after the path is set
    Scratch,
    commands_ended,
    machine_load,
    median_of,
    print_table,
    progress,
    wait_until,
)

GOAL_ITEMS_S = 20_000


def payout_rows(prefix: str, n: int) -> list[dict[str, str]]:
    """n payouts of 1.00 to 99.99 to n new users; references unique per scenario."""
    rows = []
    for i in range(n):
        minor = 100 + (i * 7919) % 9_900
        rows.append({"user": f"{prefix}-u{i}", "amount": f"{minor // 100}.{minor % 100:02d}",
                     "reference": f"{prefix}-r{i}"})
    return rows


def raw_sql_rate(url: str, n: int, chunk: int) -> float:
    """Items per second of a minimal set-based payout in plain SQL, one client."""
    dsn = url.replace("postgresql+psycopg2://", "postgresql://")
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE sql_accounts (id BIGSERIAL PRIMARY KEY, code TEXT UNIQUE NOT NULL, "
                    "balance BIGINT NOT NULL CHECK (balance >= 0))")
        cur.execute("CREATE TABLE sql_transfers (id BIGSERIAL PRIMARY KEY, debit BIGINT NOT NULL "
                    "REFERENCES sql_accounts, credit BIGINT NOT NULL REFERENCES sql_accounts, "
                    "amount BIGINT NOT NULL CHECK (amount > 0))")
        cur.execute("INSERT INTO sql_accounts (code, balance) VALUES ('funder', 1000000000000)")
    started = time.perf_counter()
    with conn.cursor() as cur:
        for start in range(0, n, chunk):
            codes = [f"w{i}" for i in range(start, min(n, start + chunk))]
            amounts = [100 + i % 9_900 for i in range(len(codes))]
            cur.execute("SELECT id FROM sql_accounts WHERE code = 'funder' FOR UPDATE")
            funder = cur.fetchone()[0]
            cur.execute("INSERT INTO sql_accounts (code, balance) SELECT unnest(%s::text[]), 0 "
                        "RETURNING id", (codes,))
            ids = [row[0] for row in cur.fetchall()]
            cur.execute("INSERT INTO sql_transfers (debit, credit, amount) SELECT %s, "
                        "unnest(%s::bigint[]), unnest(%s::bigint[])", (funder, ids, amounts))
            cur.execute("UPDATE sql_accounts SET balance = balance + v.d FROM unnest("
                        "%s::bigint[], %s::bigint[]) AS v(id, d) WHERE sql_accounts.id = v.id",
                        (ids + [funder], amounts + [-sum(amounts)]))
            conn.commit()
    conn.close()
    return n / (time.perf_counter() - started)


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["user", "amount", "reference"])
        writer.writeheader()
        writer.writerows(rows)


def cli_payout(scratch: Scratch, path: Path, key: str) -> tuple[float, dict[str, Any]]:
    walletq = str(Path(sys.executable).parent / "walletq")
    started = time.perf_counter()
    done = subprocess.run([walletq, "--json", "payout", str(path), "--key", key], capture_output=True,
                          text=True, env={**os.environ, **scratch.env}, check=False)
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    return elapsed, json.loads(done.stdout.splitlines()[-1])


def phases(n: int) -> tuple[dict[str, float], int]:
    """The same n payouts paid in this process: seconds per chunk phase."""
    from services import payouts
    from services.wallet_service import WalletService

    payouts.TIMINGS.reset()
    WalletService().execute({"type": "payout_batch", "idempotency_key": "bench-phases",
                             "items": payout_rows("phase", n)})
    return dict(payouts.TIMINGS.seconds), payouts.TIMINGS.chunks


def one_run(args: argparse.Namespace, run: int) -> tuple[dict[str, float], dict[str, float], int]:
    extra = {"WALLETQ_PAYOUT_CHUNK_ITEMS": str(args.chunk)} if args.chunk else {}
    with Scratch(extra) as scratch:
        from services.db import get_engine
        from services.settings import get_settings
        from services.wallet_service import WalletService
        from worker.client import WalletClient

        settings = get_settings()
        engine = get_engine(settings)
        chunk = settings.payout_chunk_items
        figures: dict[str, float] = {}
        progress(f"run {run}: raw SQL payout, {args.big:,} items in chunks of {chunk:,}")
        figures["sql"] = raw_sql_rate(scratch.url, args.big, chunk)
        WalletService().admin_create_tokens(f"{(args.items + 2 * args.big) * 100}.00",
                                            idempotency_key="mint")
        client = WalletClient.from_env()
        with scratch.workers_running(args.workers, args.concurrency):
            progress(f"run {run}: (a) {args.items:,} as one payout batch")
            started = time.perf_counter()
            client.submit({"type": "payout_batch", "idempotency_key": "bench-a",
                           "items": payout_rows("a", args.items)})
            wait_until(lambda: commands_ended(engine, ["bench-a"]) == 1, poll_s=0.01)
            figures["batch"] = args.items / (time.perf_counter() - started)
            progress(f"run {run}: (a') {args.big:,} through `walletq payout`")
            path = scratch.folder / "payouts.csv"
            write_csv(path, payout_rows("big", args.big))
            elapsed, report = cli_payout(scratch, path, "bench-big")
            assert report["paid"] == args.big, report
            figures["cli"] = args.big / elapsed
            progress(f"run {run}: (a'') the same file again under another key")
            elapsed, again = cli_payout(scratch, path, "bench-big-again")
            assert (again["paid"], again["duplicate"]) == (0, args.big), again
            figures["again"] = args.big / elapsed
        client.close()
        progress(f"run {run}: phases, {args.items:,} in process")
        seconds, chunks = phases(args.items)
        from services.verify import verify_ledger

        failed = [c.name for c in verify_ledger(engine, settings.asset_scale) if not c.ok]
        assert not failed, f"walletq verify failed: {failed}"
        with engine.connect() as conn:
            figures["_sync"] = 1.0 if conn.exec_driver_sql("SHOW synchronous_commit").scalar() \
                == "on" else 0.0
    return figures, seconds, chunks


def report(title: str, f: dict[str, float], args: argparse.Namespace) -> None:
    print_table(title, [
        ("minimal set-based payout in raw SQL, one client", f"{f['sql']:,.0f} items/s",
         "(ceiling)"),
        (f"(a)   {args.items:,} as one payout_batch, {args.workers} worker(s) x {args.concurrency}",
         f"{f['batch']:,.0f} items/s", f"{f['batch'] / f['sql']:.2f} x SQL"),
        (f"(a')  {args.big:,} through `walletq payout` (whole process)", f"{f['cli']:,.0f} items/s",
         f"{f['cli'] / f['sql']:.2f} x SQL, {f['cli'] / GOAL_ITEMS_S:.2f} x goal 20,000/s"),
        ("(a'') the same file again, another key (all duplicates)", f"{f['again']:,.0f} items/s",
         f"{f['again'] / f['sql']:.2f} x SQL"),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=None,
                        help="items per chunk (default: WALLETQ_PAYOUT_CHUNK_ITEMS or its default)")
    args = parser.parse_args()
    runs = []
    for run in range(1, args.runs + 1):
        before = machine_load()
        figures, seconds, chunks = one_run(args, run)
        runs.append(figures)
        report(f"run {run} of {args.runs} ({before} before, {machine_load()} after; "
               f"synchronous_commit={'on' if figures['_sync'] else 'off'})", figures, args)
        body = sum(v for k, v in seconds.items() if k != "transaction")
        rest_ms = (seconds.get("transaction", 0.0) - body) / max(chunks, 1) * 1e3
        print(f"per chunk of the in-process run ({chunks} chunks): " + ", ".join(
            f"{phase} {seconds.get(phase, 0.0) / max(chunks, 1) * 1e3:.1f} ms"
            for phase in ("lock", "decide", "pay", "progress"))
            + f", commit and the rest {rest_ms:.1f} ms")
    if args.runs > 1:
        report(f"median of {args.runs} runs", median_of(runs), args)


if __name__ == "__main__":
    main()
