"""`walletq demo`: a marketplace scenario end to end, through a worker started here.

Runs embedded on a fresh machine (SQLite and the filesystem broker under WALLETQ_HOME) or
against PostgreSQL and Redis when the WALLETQ_* variables point there. Every key and user
carries a run id, so running it twice is safe: the second run is a second marketplace day.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services import command_store, expiry
from services.command_status import ENDED
from services.command_store import CommandRecord
from services.db import get_engine
from services.errors import BusinessRuleError
from services.operations.escrow import expiry_key
from services.producer_identity import system_signer_for
from services.settings import Settings, get_settings
from services.verify import verify_ledger
from services.wallet_service import WalletService
from worker.cli.base import Output, ensure_schema
from worker.client import WalletClient

__all__ = ["run", "scenario", "DemoWorker"]

WORKER_READY_TIMEOUT_S = 30.0


class DemoWorker:
    """A `celery -A worker worker` subprocess with this process's environment."""

    def __init__(self, settings: Settings, run_id: str) -> None:
        self.ready_file = settings.home / f"demo-{run_id}.ready"
        self.log_path = settings.home / "demo-worker.log"
        self.name = f"demo-{run_id}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "WALLETQ_WORKER_READY_FILE": str(self.ready_file)}
        args = [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel=WARNING",
                "-c", "2", "-n", f"{self.name}@%h", "--without-mingle", "--without-gossip",
                "--without-heartbeat"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
        while not self.ready_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the demo's worker did not start; see {self.log_path}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.ready_file.unlink(missing_ok=True)


def scenario(run_id: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """The phases of a marketplace day; each phase runs once the previous one has ended."""
    k = f"demo-{run_id}"
    u = {name: f"{name}-{run_id}" for name in ("alice", "bob", "carol", "dave", "erin")}

    def cmd(type_: str, key: str, **fields: Any) -> dict[str, Any]:
        return {"type": type_, "idempotency_key": f"{k}-{key}", **fields}

    def hold(key: str, payer: str, payee: str, amount: str, **extra: Any) -> dict[str, Any]:
        return cmd("transfer_to_escrow", key, hold_id=f"{k}-{key}", payer=u[payer],
                   payee=u[payee], amount=amount, **extra)

    return [
        ("the platform mints tokens", [cmd("admin_create_tokens", "mint", amount="10000.00")]),
        ("users buy tokens", [
            cmd("admin_sell_tokens_to_user", "sale-alice", user=u["alice"], amount="500.00"),
            cmd("admin_sell_tokens_to_user", "sale-bob", user=u["bob"], amount="300.00"),
            cmd("admin_sell_tokens_to_user", "sale-carol", user=u["carol"], amount="200.00"),
            cmd("credit_wallet", "deposit-erin", user=u["erin"], amount="15.00"),
        ]),
        ("clients pay into escrow; friends transfer", [
            hold("order-1", "alice", "dave", "120.00"),
            hold("order-2", "bob", "erin", "80.00"),
            hold("order-3", "carol", "dave", "50.00"),
            hold("order-4", "alice", "erin", "40.00"),
            # Never paid for: it expires in a second, and the expiry pass refunds it.
            hold("order-5", "bob", "dave", "30.00", expires_in_s=1),
            cmd("transfer_tokens_between_users", "gift-1", from_user=u["alice"],
                to_user=u["bob"], amount="25.00"),
            cmd("transfer_tokens_between_users", "gift-2", from_user=u["carol"],
                to_user=u["bob"], amount="10.50"),
        ]),
        ("work delivered: releases with fees, a refund, bad inputs", [
            # A partial capture: 50.00 of order-1 now, the rest when the work is done; a
            # release of more than remains is refused (hold_exceeded).
            cmd("release_from_escrow", "order-1-part", hold_id=f"{k}-order-1", amount="50.00"),
            cmd("release_from_escrow", "order-1-over", hold_id=f"{k}-order-1", amount="999.00"),
            cmd("release_from_escrow", "order-2-done", hold_id=f"{k}-order-2", fee_rate="0.05"),
            cmd("refund_from_escrow", "order-3-cancel", hold_id=f"{k}-order-3"),
            cmd("release_from_escrow", "order-4-done", hold_id=f"{k}-order-4"),
            # Refused by the worker: more than bob has; a hold that does not exist.
            cmd("transfer_tokens_between_users", "too-much", from_user=u["bob"],
                to_user=u["alice"], amount="99999.00"),
            cmd("release_from_escrow", "no-such-hold", hold_id=f"{k}-order-404"),
            # Refused at submit: a float amount; a key reused for another payload.
            {"type": "credit_wallet", "idempotency_key": f"{k}-float", "user": u["bob"],
             "amount": 1.5},
            cmd("admin_create_tokens", "mint", amount="99.00"),
            # A duplicate: the same mint again, one effect.
            cmd("admin_create_tokens", "mint", amount="10000.00"),
        ]),
        ("an operator reverses a mistaken gift", [
            cmd("reverse_command", "gift-2-reversed", original_key=f"{k}-gift-2",
                reason="sent to the wrong user"),
        ]),
        ("providers cash out; the rest of order-1 is released", [
            cmd("release_from_escrow", "order-1-done", hold_id=f"{k}-order-1"),
            cmd("user_sell_tokens_to_admin", "cashout-dave", user=u["dave"], amount="60.00"),
            cmd("debit_wallet", "withdraw-erin", user=u["erin"], amount="20.00"),
        ]),
    ]


def _run_phases(client: WalletClient, phases: list[tuple[str, list[dict[str, Any]]]],
                progress: Callable[[str, int], None], deadline: float
                ) -> tuple[dict[str, CommandRecord], list[tuple[str, BusinessRuleError]], list[str]]:
    outcomes: dict[str, CommandRecord] = {}
    refused: list[tuple[str, BusinessRuleError]] = []
    duplicates: list[str] = []
    submitted: set[str] = set()
    for title, commands in phases:
        answers = client.submit_many(commands)
        keys = []
        for command, answer in zip(commands, answers, strict=True):
            if isinstance(answer, BusinessRuleError):
                refused.append((str(command.get("idempotency_key")), answer))
            elif answer.idempotency_key in submitted:
                duplicates.append(answer.idempotency_key)
            else:
                keys.append(answer.idempotency_key)
                submitted.add(answer.idempotency_key)
        progress(title, len(commands) - len(keys))
        pending = list(dict.fromkeys(keys))
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} commands of {title!r} did not end in time")
            latest = client.wait_all(pending, timeout=0.2)
            done = [k for k in pending if k in latest and latest[k].status in ENDED]
            outcomes.update({k: latest[k] for k in done})
            progress(title, len(done))
            pending = [k for k in pending if k not in done]
    return outcomes, refused, duplicates


def run(out: Output, *, timeout_s: float = 120.0) -> bool:
    """The whole demo; True when every command ended as planned and the ledger verifies."""
    settings = get_settings()
    ensure_schema(settings)
    run_id = time.strftime("%m%d%H%M%S") + uuid.uuid4().hex[:4]
    where = "embedded (SQLite + filesystem broker under " + str(settings.home) + ")" \
        if settings.embedded else settings.database_url.split("@")[-1]
    if not out.as_json:
        out.say(f"walletq demo run {run_id}: {where}", "bold")
    phases = scenario(run_id)
    total = sum(len(commands) for _, commands in phases)
    worker = DemoWorker(settings, run_id)
    client = WalletClient.from_env()
    started = time.monotonic()
    try:
        worker.start()
        with Progress(TextColumn("{task.description:<55}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), disable=out.as_json, console=out.console) as bar:
            task = bar.add_task("starting", total=total)
            outcomes, refused, duplicates = _run_phases(
                client, phases, lambda title, n: bar.update(task, description=title, advance=n),
                started + timeout_s)
        expired = _expire_unpaid(settings, f"demo-{run_id}-order-5", started + timeout_s)
        if expired is not None:
            outcomes[expired.idempotency_key] = expired
    finally:
        worker.stop()
        client.close()
    return _report(out, settings, run_id, outcomes, refused, duplicates,
                   time.monotonic() - started)


def _expire_unpaid(settings: Settings, hold_id: str, deadline: float) -> CommandRecord | None:
    """Once the unpaid hold's time has come, one expiry pass (as beat runs it); its command.
    None on a server without the system producer's key (`walletq expire-holds` says how)."""
    engine = get_engine(settings)
    signer = system_signer_for(settings, engine)
    if signer is None:
        return None
    service = WalletService(engine, settings)
    while service.hold(hold_id)["status"] == "held":
        if time.monotonic() > deadline:
            raise TimeoutError(f"hold {hold_id} did not expire in time")
        if not expiry.run_once(engine, settings, signer).found:
            time.sleep(0.2)  # its second has not passed yet
    with engine.connect() as conn:
        return command_store.get_record(conn, expiry_key(hold_id))


def _report(out: Output, settings: Settings, run_id: str, outcomes: dict[str, CommandRecord],
            refused: list[tuple[str, BusinessRuleError]], duplicates: list[str],
            elapsed_s: float) -> bool:
    balances = [row for row in WalletService(settings=settings).balances()
                if run_id in row["account"] or not row["account"].startswith("user:")]
    checks = verify_ledger(get_engine(settings), settings.asset_scale)
    ok = all(check.ok for check in checks)
    prefix = f"demo-{run_id}-"
    holds = [h for h in WalletService(settings=settings).holds(limit=1_000)
             if h["hold_id"].startswith(prefix)]
    by_status: dict[str, int] = {}
    for record in outcomes.values():
        by_status[record.status] = by_status.get(record.status, 0) + 1
    if out.as_json:
        out.json({"run_id": run_id, "elapsed_s": round(elapsed_s, 2), "outcomes": by_status,
                  "refused_at_submit": [{"key": key, "error": exc.to_dict()}
                                        for key, exc in refused],
                  "duplicates": duplicates,
                  "commands": [r.to_dict() for r in outcomes.values()],
                  "holds": holds, "balances": balances,
                  "verify": {"ok": ok, "checks": [c.to_dict() for c in checks]}})
        return ok

    def short(key: str) -> str:  # expire:demo-RUN-order-5 → expire:order-5
        return key.replace(prefix, "")

    out.table(f"commands (keys {prefix}…)", ["key", "type", "status", "error"],
              [[short(r.idempotency_key), r.type, r.status, (r.error or {}).get("code", "")]
               for r in outcomes.values()]
              + [[short(key), "", "refused at submit", exc.code] for key, exc in refused]
              + [[short(key), outcomes[key].type, "duplicate", "same record, one effect"]
                 for key in duplicates])
    columns = ["status", "amount", "released", "refunded", "remaining", "fee"]
    out.table("holds: a partial capture (order-1), an expiry (order-5)", ["hold", *columns],
              [[short(h["hold_id"]), *[h[c] for c in columns]] for h in reversed(holds)],
              right=columns[1:])
    out.table(f"balances after run {run_id}", ["account", "balance"],
              [[row["account"], row["balance"]] for row in balances], right=["balance"])
    out.table("walletq verify", ["check", "ok", "detail"],
              [[c.name, "ok" if c.ok else "FAILED", c.detail] for c in checks])
    summary = ", ".join(f"{n} {status}" for status, n in sorted(by_status.items()))
    out.say(f"{len(outcomes)} commands ({summary}), {len(refused)} refused at submit, "
            f"{len(duplicates)} duplicate, "
            f"in {elapsed_s:.1f} s — " + ("all invariants hold" if ok else "invariants broken"),
            "green" if ok else "red")
    return ok


