"""Submitting against its ceiling, side by side: submit_many and `walletq submit -` of the
same number of transfers, and one producer's apply_async. Not a test.

    python bench/submit.py [--runs 3] [--submit 10000]

Each run, on a database and queues of its own (bench/harness.py), with no worker: the
Celery no-op publish rate of one producer (apply_async, the ceiling); submit_many of
--submit transfers in this process (sign, admit, record, publish); `walletq --json submit
-` of as many lines, the whole process timed (start-up included), as bench/throughput.py
times it. With --runs N the median of each figure is printed too. The machine's load is
printed: compare figures of one run, never one day's with another's.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import Scratch, machine_load, median_of, print_table, progress  # noqa: E402
from bench.throughput import USERS, cli_submit_rate, transfer  # noqa: E402


def publish_rate(scratch: Scratch, n: int) -> float:
    """One producer's apply_async of the no-op task, n messages over one connection."""
    from bench.noop import NOOP_TASK, make_noop_app

    app = make_noop_app()
    queue = f"{scratch.prefix}commands"
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            app.send_task(NOOP_TASK, args=[{}], queue=queue, routing_key=queue,
                          producer=producer, ignore_result=True)
    elapsed = time.perf_counter() - started
    app.close()
    return n / elapsed


def one_run(n: int, run: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    with Scratch() as scratch:
        from worker.client import WalletClient

        users = [f"u{i}" for i in range(USERS)]
        rng = random.Random(run)
        progress(f"run {run}: apply_async of {n:,} no-op messages")
        figures["publish"] = publish_rate(scratch, n)
        progress(f"run {run}: submit_many of {n:,}")
        client = WalletClient.from_env()
        commands = [transfer(f"m-{i}", rng, users) for i in range(n)]
        started = time.perf_counter()
        answers = client.submit_many(commands)
        figures["submit_many"] = len(answers) / (time.perf_counter() - started)
        assert not [a for a in answers if isinstance(a, Exception)], answers[:3]
        client.close()
        progress(f"run {run}: `walletq submit -` of {n:,} lines")
        figures["submit_cli"] = cli_submit_rate(scratch, [transfer(f"c-{i}", rng, users)
                                                          for i in range(n)])
    return figures


def report(title: str, f: dict[str, float], n: int) -> None:
    print_table(title, [
        ("one producer publishing (apply_async)", f"{f['publish']:,.0f} /s", "(ceiling)"),
        (f"submit_many of {n:,} (sign, admit, record, publish)", f"{f['submit_many']:,.0f} /s",
         f"{f['submit_many'] / f['publish']:.2f} x apply_async (goal >= 3,000/s)"),
        (f"`walletq submit -` of {n:,} lines (whole process)", f"{f['submit_cli']:,.0f} /s",
         f"{f['submit_cli'] / f['publish']:.2f} x apply_async (goal >= 3,000/s)")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--submit", type=int, default=10_000)
    args = parser.parse_args()
    runs = []
    for run in range(1, args.runs + 1):
        before = machine_load()
        runs.append(one_run(args.submit, run))
        report(f"run {run} of {args.runs} ({before} before, {machine_load()} after)",
               runs[-1], args.submit)
    if args.runs > 1:
        report(f"median of {args.runs} runs", median_of(runs), args.submit)


if __name__ == "__main__":
    main()
