"""What signing costs: per command, and on the whole submit and execute paths, in one run.

    python bench/signing.py [--commands 1000] [--crypto 5000] [--rounds 5]

1. The crypto alone (no database): the RFC 8785 form of a typical command, signing it
   (form + Ed25519 + base64url), verifying it (form + decode + Ed25519), in microseconds.
2. The submit path (WalletClient.submit: sign, admit, record in the outbox, publish) against
   the same path with signing and verification left out (the command signed beforehand,
   then validated, recorded and published), on PostgreSQL + Redis.
3. The execute path in process (execute_command: admit with one verification, claim, apply)
   against the same with the signature checked beforehand (validation, claim, apply).

The two halves of 2 and 3 alternate in rounds, so that the machine's noise falls on both.
Uses WALLETQ_DATABASE_URL when set (migrated), else a scratch database on
postgresql://postgres@127.0.0.1:5432 dropped afterwards; WALLETQ_BROKER_URL or
redis://127.0.0.1:6379/0, with queue names of the run's own, deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import drop_database as _drop  # bench/harness.py: the benchmarks' scratch database
from harness import scratch_database as _scratch_database
from rich.console import Console
from rich.table import Table

COMMAND = {"type": "transfer_tokens_between_users", "idempotency_key": "t-000000",
           "from_user": "alice-0001", "to_user": "bob-0002", "amount": "12.50",
           "memo": "order 81"}


def _per_call_us(fn: Callable[[int], Any], n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - started) / n * 1e6


def crypto_costs(n: int) -> dict[str, float]:
    from services.signing import (
        Signer,
        decode_signature,
        new_private_key,
        signed_form,
        signing_input,
        verifies,
    )

    key = new_private_key()
    signer = Signer("bench", key)
    public = key.public_key()
    commands = [{**COMMAND, "idempotency_key": f"t-{i:06d}"} for i in range(n)]
    signed = [signer.sign(c)[0] for c in commands]
    raw = [signing_input(s) for s in signed]
    signatures = [decode_signature(s["signature"]) for s in signed]

    def verify(i: int) -> None:
        form = signed_form(signed[i])
        assert verifies(public, form.text.encode(), decode_signature(form.signature))

    return {
        "RFC 8785 form of the command": _per_call_us(lambda i: signing_input(commands[i]), n),
        "Ed25519 sign alone": _per_call_us(lambda i: key.sign(raw[i]), n),
        "Ed25519 verify alone": _per_call_us(lambda i: public.verify(signatures[i], raw[i]), n),
        "sign a command (form + Ed25519 + base64url)": _per_call_us(
            lambda i: signer.sign(commands[i]), n),
        "verify a command (form + decode + Ed25519)": _per_call_us(verify, n),
    }


def _delete_queues(broker_url: str, prefix: str) -> None:
    import redis

    conn = redis.Redis.from_url(broker_url)
    try:
        keys = list(conn.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            conn.delete(*keys)
    finally:
        conn.close()


def _rounds(paths: dict[str, Callable[[list[dict[str, Any]]], None]],
            batches: dict[str, list[list[dict[str, Any]]]]) -> dict[str, float]:
    """Alternate the paths round by round; the median per-command time of each, in µs. The
    first batch of each path warms connections and caches up and is not counted."""
    per_round: dict[str, list[float]] = {name: [] for name in paths}
    for name, run in paths.items():
        run(batches[name].pop(0))
    for index in range(len(next(iter(batches.values())))):
        for name, run in paths.items():
            batch = batches[name][index]
            started = time.perf_counter()
            run(batch)
            per_round[name].append((time.perf_counter() - started) / len(batch) * 1e6)
    return {name: statistics.median(times) for name, times in per_round.items()}


def _producer(folder: Path) -> Any:
    """A scratch admin producer of the run's own, which this process signs as."""
    from services.db import get_engine, upgrade
    from services.producers import create
    from services.settings import get_settings
    from services.signing import new_private_key, write_private_key

    settings = get_settings()
    if os.environ.get("WALLETQ_BENCH_SCRATCH"):
        upgrade(settings)
    name = f"bench-{uuid.uuid4().hex[:6]}"
    key = new_private_key()
    write_private_key(folder / f"{name}.key", key)
    with get_engine(settings).begin() as conn:
        create(conn, name, "admin", key.public_key())
    os.environ.update({"WALLETQ_PRODUCER": name,
                       "WALLETQ_PRODUCER_KEY_FILE": str(folder / f"{name}.key")})
    from worker.client import WalletClient

    return WalletClient.from_env()


def _batches(make: Callable[[str], dict[str, Any]], n: int, rounds: int, sign: Any
             ) -> list[list[dict[str, Any]]]:
    """`rounds` batches of n/rounds commands, and one more to warm up with."""
    per = max(1, n // rounds)
    run = uuid.uuid4().hex[:6]
    batches = [[make(f"{run}-{r}-{i}") for i in range(per)] for r in range(rounds + 1)]
    return [[sign(c) for c in batch] for batch in batches] if sign else batches


def submit_costs(client: Any, n: int, rounds: int) -> dict[str, float]:
    from services.command_fields import CommandLimits
    from services.commands import parse_command
    from services.outbox import record_accepted
    from services.signing import signed_form

    limits = CommandLimits.from_settings(client.settings)

    def signing(batch: list[dict[str, Any]]) -> None:
        for command in batch:
            client.submit(command)

    def presigned(batch: list[dict[str, Any]]) -> None:
        for obj in batch:
            accepted = record_accepted(parse_command(obj, limits), signed_form(obj),
                                       engine=client.engine, settings=client.settings)
            client.publisher.publish(accepted.record)

    def transfer(tag: str) -> dict[str, Any]:
        return {**COMMAND, "idempotency_key": f"t-{tag}"}

    sign = lambda c: client.signer.sign(c)[0]  # noqa: E731
    return _rounds({"submit, signing and verifying": signing,
                    "submit, signed beforehand, not verified": presigned},
                   {"submit, signing and verifying": _batches(transfer, n, rounds, None),
                    "submit, signed beforehand, not verified": _batches(transfer, n, rounds,
                                                                        sign)})


def execute_costs(client: Any, n: int, rounds: int) -> dict[str, float]:
    """A credit (no balance needed), verified as it runs or verified beforehand."""
    from services.admission import Admitted, admit
    from services.command_executor import execute_admitted, execute_command
    from services.command_fields import CommandLimits
    from services.commands import parse_command

    limits = CommandLimits.from_settings(client.settings)
    engine, settings = client.engine, client.settings

    def credit(tag: str) -> dict[str, Any]:
        return {"type": "credit_wallet", "idempotency_key": f"c-{tag}", "user": "u1",
                "amount": "1.00"}

    sign = lambda c: client.signer.sign(c)[0]  # noqa: E731
    verifying_batches = _batches(credit, n, rounds, sign)
    verified_batches = _batches(credit, n, rounds, sign)
    admitted: dict[str, Admitted] = {}
    for obj in (obj for batch in verified_batches for obj in batch):
        found = admit(obj, engine=engine, settings=settings)
        assert isinstance(found, Admitted)
        admitted[obj["idempotency_key"]] = found

    def verifying(batch: list[dict[str, Any]]) -> None:
        for obj in batch:
            execute_command(obj, engine=engine, settings=settings)

    def verified(batch: list[dict[str, Any]]) -> None:
        for obj in batch:
            parse_command(obj, limits)  # validation, which ran before signatures existed too
            execute_admitted(admitted[obj["idempotency_key"]], engine=engine, settings=settings)

    return _rounds({"execute, verifying": verifying, "execute, verified beforehand": verified},
                   {"execute, verifying": verifying_batches,
                    "execute, verified beforehand": verified_batches})


def pipeline_costs(n: int, rounds: int, folder: Path) -> dict[str, float]:
    client = _producer(folder)
    try:
        return {**submit_costs(client, n, rounds), **execute_costs(client, n, rounds)}
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=1000,
                        help="commands per path for the submit and execute paths")
    parser.add_argument("--crypto", type=int, default=5000, help="iterations of the crypto alone")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-database", action="store_true", help="the crypto figures only")
    args = parser.parse_args()

    crypto = crypto_costs(args.crypto)
    paths: dict[str, float] = {}
    if not args.no_database:
        scratch = None
        folder = Path(tempfile.mkdtemp(prefix="walletq-bench-"))
        if not os.environ.get("WALLETQ_DATABASE_URL"):
            scratch, os.environ["WALLETQ_DATABASE_URL"] = _scratch_database()
            os.environ["WALLETQ_BENCH_SCRATCH"] = "1"
        os.environ.setdefault("WALLETQ_BROKER_URL", "redis://127.0.0.1:6379/0")
        prefix = f"bench{uuid.uuid4().hex[:6]}."
        os.environ["WALLETQ_QUEUE_PREFIX"] = prefix
        os.environ["WALLETQ_HOME"] = str(folder)
        try:
            paths = pipeline_costs(args.commands, args.rounds, folder)
        finally:
            _delete_queues(os.environ["WALLETQ_BROKER_URL"], prefix)
            if scratch:
                from services.db import dispose_engines

                dispose_engines()
                _drop(scratch)

    table = Table(title="signing costs per command (µs), one run")
    table.add_column("what")
    table.add_column("µs per command", justify="right")
    for what, us in crypto.items():
        table.add_row(what, f"{us:,.1f}")
    if paths:
        for what, us in paths.items():
            table.add_row(what, f"{us:,.0f}")
        submit_extra = (paths["submit, signing and verifying"]
                        - paths["submit, signed beforehand, not verified"])
        execute_extra = paths["execute, verifying"] - paths["execute, verified beforehand"]
        table.add_row("[bold]signing + verifying on the submit path[/bold]",
                      f"{submit_extra:+,.0f} "
                      f"({submit_extra / paths['submit, signed beforehand, not verified']:+.0%})")
        table.add_row("[bold]verifying on the execute path[/bold]",
                      f"{execute_extra:+,.0f} "
                      f"({execute_extra / paths['execute, verified beforehand']:+.0%})")
    Console().print(table)


if __name__ == "__main__":
    main()
