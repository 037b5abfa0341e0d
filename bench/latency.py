"""Latency of single commands under a steady load: accepted -> terminal, from the records'
own timestamps. Not a test.

    python bench/latency.py [--rates 50,100,150,200,250,300] [--seconds 10] [--concurrency 2]
                            [--runs 1] [--plot docs/latency.png]

One worker (concurrency 2) and one producer calling `WalletClient.submit` once per command
on a fixed schedule (open loop: the schedule never waits for an answer; a submit that runs
late is sent at once, and counted). For each offered rate: the throughput achieved (commands
per second from the first acceptance to the last completion) and p50/p95/p99/max of
completed_at - created_at. `--plot FILE.png` draws throughput and p99 against the offered
load (matplotlib: pip install -e '.[bench]'). With --runs N, each rate's figures are the
median of N runs.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu import PARTS, CpuMeter  # noqa: E402 - after the path is set
from bench.harness import (  # noqa: E402 - after the path is set
    REDIS_URL,
    Scratch,
    commands_ended,
    machine_load,
    progress,
    wait_until,
)

USERS = 100


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def steady(client: Any, engine: Any, rate: float, seconds: float, tag: str,
           meter: CpuMeter) -> dict[str, float]:
    rng = random.Random(tag)
    users = [f"u{i}" for i in range(USERS)]
    n = int(rate * seconds)
    keys = [f"{tag}-{i}" for i in range(n)]
    late = 0
    meter.start()
    started = time.perf_counter()
    for i, key in enumerate(keys):
        due = started + i / rate
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        elif wait < -0.005:
            late += 1
        payer, payee = rng.sample(users, 2)
        client.submit({"type": "transfer_tokens_between_users", "idempotency_key": key,
                       "from_user": payer, "to_user": payee, "amount": "0.01"})
    wait_until(lambda: commands_ended(engine, keys) == n, poll_s=0.05)
    cpu = meter.per_command(n)
    from sqlalchemy import text

    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT EXTRACT(EPOCH FROM completed_at - created_at), created_at, completed_at "
            "FROM commands WHERE idempotency_key = ANY(:k)"), {"k": keys}).all()
    latencies = [float(row[0]) * 1e3 for row in rows]
    span = (max(row[2] for row in rows) - min(row[1] for row in rows)).total_seconds()
    return {"offered": rate, "achieved": n / span, "p50": percentile(latencies, 0.50),
            "p95": percentile(latencies, 0.95), "p99": percentile(latencies, 0.99),
            "max": max(latencies), "late": late / n,
            **{f"cpu {part}": ms for part, ms in cpu.items()}}


def plot(path: Path, rows: list[dict[str, float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offered = [r["offered"] for r in rows]
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(offered, [r["achieved"] for r in rows], "o-", color="tab:blue", label="throughput")
    left.plot(offered, offered, ":", color="gray", label="offered = achieved")
    left.set_xlabel("offered load (commands/s)")
    left.set_ylabel("throughput (commands/s)", color="tab:blue")
    right = left.twinx()
    right.plot(offered, [r["p99"] for r in rows], "s-", color="tab:red", label="p99 latency")
    right.plot(offered, [r["p50"] for r in rows], "^--", color="tab:orange", label="p50 latency")
    right.axhline(25, color="tab:red", linestyle=":", linewidth=1)
    right.set_ylabel("accepted -> terminal (ms)", color="tab:red")
    lines = left.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    left.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    left.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="50,100,150,200,250,300")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    load_before = machine_load()
    per_rate: dict[float, list[dict[str, float]]] = {rate: [] for rate in rates}
    with Scratch() as scratch:
        from services.db import get_engine
        from services.settings import get_settings
        from worker.client import WalletClient

        engine = get_engine(get_settings())
        client = WalletClient.from_env()
        with scratch.workers_running(1, args.concurrency):
            meter = CpuMeter(engine, [proc.pid for proc in scratch.workers], REDIS_URL)
            seed = [{"type": "credit_wallet", "idempotency_key": f"seed-u{i}", "user": f"u{i}",
                     "amount": "100000.00"} for i in range(USERS)]
            client.submit_many(seed)
            wait_until(lambda: commands_ended(engine, [c["idempotency_key"] for c in seed])
                       == USERS)
            for run in range(1, args.runs + 1):
                for rate in rates:
                    progress(f"run {run}: {rate:g} commands/s for {args.seconds:g} s")
                    per_rate[rate].append(steady(client, engine, rate, args.seconds,
                                                 f"r{run}-{rate:g}", meter))
        client.close()
    rows = [{name: statistics.median(r[name] for r in per_rate[rate]) for name in per_rate[rate][0]}
            for rate in rates]
    title = (f"one worker x {args.concurrency}, one producer, open loop, {args.seconds:g} s per "
             f"rate, median of {args.runs} run(s); {load_before}")
    print(f"\nlatency accepted -> terminal ({title})")
    print(f"{'offered/s':>10} {'achieved/s':>11} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'late':>6}")
    for r in rows:
        print(f"{r['offered']:>10.0f} {r['achieved']:>11.0f} {r['p50']:>8.1f} {r['p95']:>8.1f} "
              f"{r['p99']:>8.1f} {r['max']:>8.1f} {r['late']:>6.0%}")
    print("goal at 250/s: p50 <= 5 ms, p99 <= 25 ms")
    cores = os.cpu_count() or 1
    print(f"\nCPU per command (ms), by part; the machine's {cores} cores spent at that rate "
          "allow at most cores x 1000 / total commands per second")
    print(f"{'offered/s':>10} " + " ".join(f"{part:>12}" for part in PARTS)
          + f" {'total':>8} {'CPU bound/s':>12}")
    for r in rows:
        total = sum(r[f"cpu {part}"] for part in PARTS)
        print(f"{r['offered']:>10.0f} " + " ".join(f"{r[f'cpu {part}']:>12.2f}" for part in PARTS)
              + f" {total:>8.2f} {cores * 1000 / total:>12.0f}")
    if args.plot is not None:
        plot(args.plot, rows, title)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
