"""A soak run: a random marketplace workload through real `celery worker` processes while
things break, then every invariant and a model of the balances.

    python bench/soak.py --commands 100000 --broker redis --workers 2 --seed 1
    python bench/soak.py --commands 2000 --broker rabbitmq --fault-every 5

Everything runs on private servers made for the run, so that the run can crash them: a
PostgreSQL cluster (initdb in a temporary folder) and a Redis server or a RabbitMQ node on
spare ports (tests/e2e/fault_servers.py). A signed producer (WalletClient, an admin key of
the run's own) submits credits, debits, transfers, holds, releases and refunds between
--users users. Every --fault-every seconds one fault, in turn:

- worker_kill: SIGKILL of a whole worker (main and pool processes), then a new start;
- broker_restart: the broker SIGKILLed and restarted without its data (every queue lost);
- pg_crash: PostgreSQL stopped as by a power cut (immediate shutdown), then restarted;
- conn_kill: pg_terminate_backend of every worker and producer connection;
- poison: raw messages no worker may run (not JSON, not a task envelope, an unsigned
  command, a command nested 500 levels deep); they must end refused, and no worker may die.

The sweep runs every few seconds, as beat would, and republishes what a lost queue dropped.
When every command is terminal: `walletq verify` (every ledger invariant), one terminal
audit row per command, no worker that died unless killed, and the balances of a model
built from the reported outcomes (each succeeded command's effect applied in memory) equal
to the database's. The table ends with the violations, which must be 0 (exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kombu import Exchange, Producer  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

from tests.e2e.conftest import Broker, WorkerProcess  # noqa: E402
from tests.e2e.fault_servers import PrivatePostgres, PrivateRabbit, PrivateRedis  # noqa: E402

TERMINAL = ("succeeded", "rejected", "failed")
FAULTS = ("worker_kill", "broker_restart", "pg_crash", "conn_kill", "poison")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- workload ------------------------------------------------------------------------------


class Workload:
    """Random marketplace commands; holds remembered so that releases and refunds name them."""

    def __init__(self, seed: int, users: int) -> None:
        self.rng = random.Random(seed)
        self.users = [f"u{i}" for i in range(users)]
        self.holds: list[str] = []
        self.n = 0
        self.run = uuid.uuid4().hex[:6]

    def _amount(self, low: int, high: int) -> str:
        return f"{self.rng.randint(low, high)}.{self.rng.randint(0, 99):02d}"

    def next(self) -> dict[str, Any]:
        self.n += 1
        key = f"s{self.run}-{self.n}"
        roll = self.rng.random()
        user, other = self.rng.sample(self.users, 2)
        if self.n <= len(self.users) or roll < 0.22:
            user = self.users[self.n - 1] if self.n <= len(self.users) else user
            return {"type": "credit_wallet", "idempotency_key": key, "user": user,
                    "amount": self._amount(50, 500)}
        if roll < 0.32:
            return {"type": "debit_wallet", "idempotency_key": key, "user": user,
                    "amount": self._amount(1, 80)}
        if roll < 0.70:
            return {"type": "transfer_tokens_between_users", "idempotency_key": key,
                    "from_user": user, "to_user": other, "amount": self._amount(1, 60)}
        if roll < 0.85 or not self.holds:
            hold_id = f"h{self.run}-{self.n}"
            self.holds.append(hold_id)
            return {"type": "transfer_to_escrow", "idempotency_key": key, "hold_id": hold_id,
                    "payer": user, "payee": other, "amount": self._amount(1, 40)}
        hold_id = self.holds.pop(self.rng.randrange(len(self.holds)))
        kind = "release_from_escrow" if roll < 0.95 else "refund_from_escrow"
        return {"type": kind, "idempotency_key": key, "hold_id": hold_id}


def model_balances(commands: dict[str, dict[str, Any]], outcomes: dict[str, tuple[str, Any]]
                   ) -> Counter[str]:
    """Account code → balance, from the succeeded commands' payloads and reported results,
    applied in command-id order (a release needs its hold's amount)."""
    model: Counter[str] = Counter()
    holds: dict[str, tuple[str, Decimal]] = {}
    for key, command in commands.items():
        if command["type"] == "transfer_to_escrow" and outcomes[key][0] == "succeeded":
            holds[command["hold_id"]] = (command["payer"], Decimal(command["amount"]))
    for key, command in commands.items():
        status, result = outcomes[key]
        if status != "succeeded":
            continue
        kind = command["type"]
        if kind == "credit_wallet":
            model[f"user:{command['user']}:available"] += Decimal(command["amount"])
        elif kind == "debit_wallet":
            model[f"user:{command['user']}:available"] -= Decimal(command["amount"])
        elif kind == "transfer_tokens_between_users":
            model[f"user:{command['from_user']}:available"] -= Decimal(command["amount"])
            model[f"user:{command['to_user']}:available"] += Decimal(command["amount"])
        elif kind == "transfer_to_escrow":
            model[f"user:{command['payer']}:available"] -= Decimal(command["amount"])
            model[f"user:{command['payer']}:escrow"] += Decimal(command["amount"])
        else:
            payer, amount = holds[command["hold_id"]]
            model[f"user:{payer}:escrow"] -= amount
            if kind == "refund_from_escrow":
                model[f"user:{payer}:available"] += amount
            else:
                fee = Decimal(str(result.get("fee", "0")))
                model[f"user:{result['payee']}:available"] += amount - fee
                model["platform:fees"] += fee
    return model


# --- the run -------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.folder = Path(tempfile.mkdtemp(prefix="walletq-soak-"))
        self.faults: Counter[str] = Counter()
        self.poison_sent: Counter[str] = Counter()
        self.violations: list[str] = []
        self.commands: dict[str, dict[str, Any]] = {}
        self.killed_by_us: set[int] = set()
        self.unexpected_deaths = 0
        self.sweeps = 0
        self.republished = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.pg = PrivatePostgres(uuid.uuid4().hex)
        self.broker: PrivateRedis | PrivateRabbit = (
            PrivateRabbit() if args.broker == "rabbitmq" else PrivateRedis(self.folder / "redis"))
        self.workers: list[WorkerProcess] = []

    # servers, database, producer, workers

    def setup(self) -> None:
        log(f"starting a private PostgreSQL and a private {self.args.broker} ...")
        self.pg.start()
        self.broker.start()
        self.admin_url = (f"postgresql+psycopg2://postgres:{self.pg.password}@127.0.0.1:"
                          f"{self.pg.port}/postgres")
        admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with admin.connect() as conn:
            conn.execute(text('CREATE DATABASE "walletq"'))
        admin.dispose()
        self.db_url = self.admin_url.rsplit("/", 1)[0] + "/walletq"
        self.prefix = f"soak{uuid.uuid4().hex[:6]}."
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith("WALLETQ_")}
        self.env.update({
            "WALLETQ_DATABASE_URL": self.db_url, "WALLETQ_BROKER_URL": self.broker.url,
            "WALLETQ_QUEUE_PREFIX": self.prefix, "WALLETQ_HOME": str(self.folder / "home"),
            "WALLETQ_SWEEP_GRACE_S": str(self.args.sweep_grace),
            "WALLETQ_STATEMENT_TIMEOUT_MS": "60000",
            "PYTHONPATH": str(ROOT),
        })
        os.environ.clear()
        os.environ.update(self.env)
        from services.db import upgrade
        from services.producers import create
        from services.settings import get_settings, reset_settings
        from services.signing import new_private_key, write_private_key

        reset_settings()
        upgrade(get_settings())
        key = new_private_key()
        write_private_key(self.folder / "soak.key", key)
        from services.db import get_engine

        with get_engine(get_settings()).begin() as conn:
            create(conn, "soak", "admin", key.public_key())
        self.env.update({"WALLETQ_PRODUCER": "soak",
                         "WALLETQ_PRODUCER_KEY_FILE": str(self.folder / "soak.key")})
        os.environ.update(self.env)
        reset_settings()
        from worker.client import WalletClient

        self.client = WalletClient.from_env(self.env)
        self.engine = create_engine(self.db_url, poolclass=NullPool)
        workers_folder = self.folder / "workers"
        workers_folder.mkdir()
        for n in range(self.args.workers):
            process = WorkerProcess(self.env, workers_folder, f"soak{n + 1}",
                                    self.args.concurrency, extra_args=["--loglevel=WARNING"])
            self.workers.append(process.start(timeout_s=120))
        log(f"{len(self.workers)} workers × {self.args.concurrency} on {self.broker.url}; "
            f"PostgreSQL on {self.pg.port}; folder {self.folder}")

    def teardown(self) -> None:
        for process in self.workers:
            process.kill()
        try:
            self.client.close()
        except Exception:
            pass
        self.broker.stop()
        self.pg.stop()

    # producing

    def submit(self, batch: list[dict[str, Any]]) -> None:
        """Until the batch is recorded: a PostgreSQL or broker outage only delays it (a
        resubmission of the same command is idempotent; what was recorded but not
        published is the sweep's)."""
        while not self.stop.is_set():
            try:
                answers = self.client.submit_many(batch)
            except Exception as exc:  # the database or broker down: again shortly
                log(f"submit failed ({type(exc).__name__}), retrying")
                time.sleep(0.5)
                continue
            errors = [a for a in answers if isinstance(a, Exception)]
            if errors:  # the workload is valid: a refusal here is a bug
                self.violations.append(f"{len(errors)} commands refused at submit: {errors[:3]}")
            return

    def produce(self) -> None:
        workload = Workload(self.args.seed, self.args.users)
        batch_size = 500
        while len(self.commands) < self.args.commands and not self.stop.is_set():
            while self.in_flight() > self.args.in_flight_max and not self.stop.is_set():
                time.sleep(0.2)
            batch = [workload.next() for _ in range(min(batch_size,
                                                          self.args.commands - len(self.commands)))]
            for command in batch:
                self.commands[command["idempotency_key"]] = command
            self.submit(batch)

    def in_flight(self) -> int:
        try:
            with self.engine.connect() as conn:
                return int(conn.execute(text(
                    "SELECT count(*) FROM commands WHERE status NOT IN "
                    "('succeeded', 'rejected', 'failed')")).scalar_one())
        except Exception:
            return self.args.in_flight_max + 1  # the database is down: wait

    def terminal_count(self) -> int:
        try:
            with self.engine.connect() as conn:
                return int(conn.execute(text(
                    "SELECT count(*) FROM commands WHERE status IN "
                    "('succeeded', 'rejected', 'failed')")).scalar_one())
        except Exception:
            return -1

    # faults

    def fault_loop(self) -> None:
        kinds = [kind for kind in FAULTS if kind in self.args.faults]
        turn = 0
        while not self.stop.wait(self.args.fault_every):
            kind = kinds[turn % len(kinds)]
            turn += 1
            log(f"fault {kind} ...")
            try:
                getattr(self, f"fault_{kind}")()
                self.faults[kind] += 1
                log(f"fault {kind} done ({sum(self.faults.values())} so far)")
            except Exception as exc:  # a fault that could not be made is reported, not fatal
                log(f"fault {kind} failed: {exc!r}")

    def fault_worker_kill(self) -> None:
        process = random.choice(self.workers)
        with self.lock:
            if process.pid is not None:
                self.killed_by_us.add(process.pid)
            process.kill()
            process.start(timeout_s=120)

    def fault_broker_restart(self) -> None:
        if isinstance(self.broker, PrivateRabbit):
            self.broker.restart(lose=True)
        else:
            self.broker.restart()

    def fault_pg_crash(self) -> None:
        self.pg.crash()
        time.sleep(1.0)  # down for a while, as a crashed server is
        self.pg.start(timeout_s=120)

    def fault_conn_kill(self) -> None:
        admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            with admin.connect() as conn:
                conn.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                    "datname = 'walletq' AND backend_type = 'client backend' "
                    "AND pid <> pg_backend_pid()"))
        finally:
            admin.dispose()

    def fault_poison(self) -> None:
        from worker.celery_app import EXECUTE_TASK

        embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        n = self.poison_sent["unsigned"] + 1
        unsigned = {"type": "credit_wallet", "idempotency_key": f"poison-unsigned-{n}",
                    "user": "mallory", "amount": "1000.00"}
        deep: Any = "1.00"
        for _ in range(500):
            deep = [deep]
        nested = {"type": "credit_wallet", "idempotency_key": f"poison-deep-{n}",
                  "user": "mallory", "amount": deep}
        messages = [
            ("not_json", b"\xff{not json"),
            ("not_an_envelope", json.dumps({"not": "an envelope"}).encode()),
            ("unsigned", json.dumps([[unsigned], {}, embed]).encode()),
        ]
        if "deep" in self.args.poison:
            messages.append(("deep", json.dumps([[nested], {}, embed]).encode()))
        names = self.client.publisher.queues
        with self.client.publisher.app.connection_for_write() as conn:
            producer = Producer(conn.default_channel,
                                exchange=Exchange(names.exchange, type="direct"))
            for kind, body in messages:
                task_id = str(uuid.uuid4())
                headers = {"lang": "py", "task": EXECUTE_TASK, "id": task_id,
                           "root_id": task_id, "parent_id": None, "group": None, "eta": None,
                           "expires": None, "retries": 0, "timelimit": [None, None],
                           "argsrepr": "()", "kwargsrepr": "{}", "origin": "soak"}
                producer.publish(body, routing_key=names.commands,
                                 content_type="application/json", content_encoding="utf-8",
                                 headers=headers, serializer=None, delivery_mode=2)
                self.poison_sent[kind] += 1

    # watching

    def watch_workers(self) -> None:
        """A worker that died without our SIGKILL is a violation; it is started again."""
        with self.lock:
            for process in self.workers:
                if process.proc is not None and not process.alive \
                        and process.proc.pid not in self.killed_by_us:
                    self.unexpected_deaths += 1
                    log(f"worker {process.name} died on its own (exit "
                        f"{process.proc.returncode}); restarting\n{process.log_tail(15)}")
                    self.killed_by_us.add(process.proc.pid)
                    process.kill()
                    try:
                        process.start(timeout_s=120)
                    except (RuntimeError, AssertionError) as exc:  # died again at once
                        log(f"worker {process.name} did not start: {str(exc)[:200]}")

    def sweep(self) -> None:
        from services import sweep as sweep_module
        from services.settings import get_settings

        try:
            counts = sweep_module.run_once(self.client.publisher, engine=self.client.engine,
                                           settings=get_settings())
            self.sweeps += 1
            self.republished += counts.republished
        except Exception as exc:
            log(f"sweep failed ({type(exc).__name__}); next time")

    def run(self) -> dict[str, Any]:
        self.setup()
        started = time.monotonic()
        producer = threading.Thread(target=self.produce, name="producer", daemon=True)
        faults = threading.Thread(target=self.fault_loop, name="faults", daemon=True)
        producer.start()
        faults.start()
        last_sweep = last_print = time.monotonic()
        deadline = started + self.args.timeout
        while True:
            now = time.monotonic()
            if now > deadline:
                self.violations.append(f"not every command terminal after {self.args.timeout} s")
                break
            self.watch_workers()
            if now - last_sweep >= self.args.sweep_every:
                self.sweep()
                last_sweep = now
            done = self.terminal_count()
            if now - last_print >= 5:
                rate = max(done, 0) / max(now - started, 1e-9)
                log(f"submitted {len(self.commands):,}/{self.args.commands:,}, terminal "
                    f"{done:,}, {rate:,.0f}/s, faults {dict(self.faults)}, sweeps "
                    f"{self.sweeps} (republished {self.republished})")
                last_print = now
            if not producer.is_alive() and done >= len(self.commands) \
                    and self.in_flight() == 0:
                if not faults.is_alive():
                    break
                # Faults go on until every command ended; then none more, and once more
                # until everything a last fault disturbed has ended too.
                self.stop.set()
                faults.join()
            time.sleep(0.5)
        self.stop.set()
        ended = time.monotonic()
        self.settle()
        figures = self.check()
        figures["duration_s"] = ended - started
        return figures

    def settle(self, timeout_s: float = 90.0) -> None:
        """Every command has ended; wait until the poison messages have too (the broker
        idle), so that a worker they killed is seen. On Redis a message whose worker died
        stays unacknowledged until the visibility timeout: the wait then ends at timeout_s."""
        node = self.broker.node if isinstance(self.broker, PrivateRabbit) else None
        broker = Broker(self.args.broker, self.broker.url, node)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.watch_workers()
            try:
                if broker.idle(self.prefix):
                    break
            except Exception:  # the broker restarting under the last fault
                pass
            time.sleep(1.0)
        else:
            log(f"the broker still holds messages after {timeout_s:.0f} s: "
                f"{broker.state(self.prefix)}")
        time.sleep(2.0)  # a worker that just failed takes a moment to exit
        self.watch_workers()
        self.dead_letters = 0
        if isinstance(self.broker, PrivateRabbit):
            from celeryconfig import QueueNames
            from tests.support.rabbit import ready_counts

            names = QueueNames(self.prefix)
            self.dead_letters = sum(ready_counts(self.broker.url, names.dead()).values())

    # checking

    def check(self) -> dict[str, Any]:
        log("every command terminal: checking")
        keys = list(self.commands)
        with self.engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT idempotency_key, status, result FROM commands "
                "WHERE idempotency_key = ANY(:k) ORDER BY id"), {"k": keys}).all()
            audits = dict(conn.execute(text(
                "SELECT idempotency_key, count(*) FROM audit_events WHERE outcome IN "
                "('succeeded', 'rejected', 'failed') AND idempotency_key = ANY(:k) "
                "GROUP BY idempotency_key"), {"k": keys}).all())
            balances = dict(conn.execute(text(
                "SELECT code, balance_minor FROM accounts WHERE code LIKE 'user:%' "
                "OR code = 'platform:fees'")).all())
            poison_recorded = int(conn.execute(text(
                "SELECT count(*) FROM commands WHERE idempotency_key LIKE 'poison-%'"
            )).scalar_one())
            poison_refused = int(conn.execute(text(
                "SELECT count(*) FROM refusals WHERE idempotency_key LIKE 'poison-%'"
            )).scalar_one())
        outcomes = {row.idempotency_key: (row.status, row.result) for row in rows}
        missing = [k for k in keys if k not in outcomes]
        if missing:
            self.violations.append(f"{len(missing)} commands never recorded: {missing[:3]}")
        not_terminal = [k for k, (s, _) in outcomes.items() if s not in TERMINAL]
        if not_terminal:
            self.violations.append(f"{len(not_terminal)} commands not terminal")
        bad_audits = [k for k in outcomes if audits.get(k, 0) != 1]
        if bad_audits:
            self.violations.append(f"{len(bad_audits)} commands without exactly one terminal "
                                   f"audit row: {bad_audits[:3]}")
        if poison_recorded:  # an unsigned command takes no key: refused, never recorded
            self.violations.append(f"{poison_recorded} poison commands recorded")
        if self.unexpected_deaths:
            self.violations.append(f"{self.unexpected_deaths} worker deaths nobody caused")
        ordered = {k: self.commands[k] for k in (r.idempotency_key for r in rows)}
        model = model_balances(ordered, outcomes) if not missing else Counter()
        wrong = {code: (balance, balances.get(code, 0)) for code, balance in model.items()
                 if int(balance * 100) != balances.get(code, 0)}
        wrong.update({code: (Decimal(0), minor) for code, minor in balances.items()
                      if code not in model and minor})
        if wrong:
            self.violations.append(f"{len(wrong)} balances differ from the model: "
                                   f"{list(wrong.items())[:3]}")
        verify = subprocess.run([sys.executable, "-c", "from worker.cli import main; main()",
                                 "verify", "--json"],
                                env=self.env, capture_output=True, text=True, cwd=str(ROOT))
        if verify.returncode != 0:
            self.violations.append(f"walletq verify exit {verify.returncode}: "
                                   f"{(verify.stdout + verify.stderr)[-500:]}")
        statuses = Counter(s for s, _ in outcomes.values())
        return {"statuses": statuses, "accounts_checked": len(model),
                "poison_refused": poison_refused,
                "verify": "passed" if verify.returncode == 0 else "FAILED"}


def print_report(args: argparse.Namespace, soak: Soak, figures: dict[str, Any]) -> None:
    statuses = figures["statuses"]
    total = sum(statuses.values())
    rows = [
        ("broker", args.broker),
        ("commands", f"{total:,} ({statuses['succeeded']:,} succeeded, "
                     f"{statuses['rejected']:,} rejected, {statuses['failed']:,} failed)"),
        ("workers", f"{args.workers} × {args.concurrency}"),
        *[(f"faults: {kind}", str(soak.faults[kind])) for kind in FAULTS],
        ("poison messages sent", f"{sum(soak.poison_sent.values())} {dict(soak.poison_sent)}"),
        # One a broker restart dropped before a worker saw it is neither: lost, harmlessly.
        ("unsigned poison refused (audited)", f"{figures['poison_refused']} of "
                                              f"{soak.poison_sent['unsigned']}"),
        ("dead-lettered (RabbitMQ)", str(soak.dead_letters)),
        ("worker deaths nobody caused", str(soak.unexpected_deaths)),
        ("sweeps (republished)", f"{soak.sweeps} ({soak.republished:,})"),
        ("duration", f"{figures['duration_s']:.1f} s"),
        ("throughput", f"{total / figures['duration_s']:,.0f} commands/s"),
        ("walletq verify", figures["verify"]),
        ("balances checked against the model", f"{figures['accounts_checked']:,} accounts"),
        ("violations", str(len(soak.violations))),
    ]
    width = max(len(what) for what, _ in rows)
    print(f"\nsoak: python bench/soak.py {' '.join(sys.argv[1:])}")
    print("-" * (width + 50))
    for what, figure in rows:
        print(f"{what:<{width}}  {figure}")
    for violation in soak.violations:
        print(f"VIOLATION: {violation}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=100_000)
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes per worker")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--fault-every", type=float, default=15.0, help="seconds between faults")
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help=f"comma-separated subset of {','.join(FAULTS)}")
    parser.add_argument("--poison", default="not_json,not_an_envelope,unsigned,deep",
                        help="poison kinds; `deep` is a command nested 500 levels")
    parser.add_argument("--sweep-every", type=float, default=5.0)
    parser.add_argument("--sweep-grace", type=float, default=20.0)
    parser.add_argument("--in-flight-max", type=int, default=5000,
                        help="the producer waits while more commands than this are open")
    parser.add_argument("--timeout", type=float, default=7200.0)
    args = parser.parse_args()
    args.faults = set(args.faults.split(","))
    args.poison = set(args.poison.split(","))
    soak = Soak(args)
    try:
        figures = soak.run()
    finally:
        soak.teardown()
    print_report(args, soak, figures)
    if soak.violations:
        print(f"workers' logs kept in {soak.folder / 'workers'}")
        sys.exit(1)
    shutil.rmtree(soak.folder, ignore_errors=True)


if __name__ == "__main__":
    main()
