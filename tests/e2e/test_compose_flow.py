"""docker-compose.yml, run without Docker: the commands and environments of its services,
read from the file itself, against a private PostgreSQL that checks every password
(scram-sha-256) and a private Redis started by the compose file's own command (requirepass).
Only hostnames, ports and the secrets' folder are translated; a typo in the file fails here.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
import yaml

from tests.e2e.fault_servers import PrivatePostgres, on_a_free_port, start_serving
from tests.support.cli import WALLETQ_BIN, CliResult, walletq
from tests.support.env import strip_walletq_env
from tests.support.ledger import assert_report_sound
from tests.support.polling import eventually

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
ROLE_SECRETS = ("walletq_owner", "walletq_worker", "walletq_producer", "walletq_readonly")


class Deployment:
    """The compose file's services, translated to this machine."""

    def __init__(self, folder: Path, pg: PrivatePostgres) -> None:
        self.folder, self.pg = folder, pg
        self.redis_port: int | None = None  # start_redis() picks it
        self.secrets = folder / "secrets"
        self.home = folder / "home"
        self.processes: list[subprocess.Popen[bytes]] = []

    def translate(self, value: str) -> str:
        for old, new in (("$$", "$"), ("/run/secrets", str(self.secrets)),
                         ("postgres:5432", f"127.0.0.1:{self.pg.port}"),
                         ("redis://redis:6379", f"redis://127.0.0.1:{self.redis_port}"),
                         ("/var/lib/walletq", str(self.home))):
            value = value.replace(old, new)
        return value

    def env(self, service: str, **extra: str) -> dict[str, str]:
        spec = SERVICES[service]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WALLETQ_", "FLOWER_"))}
        env.update({k: self.translate(str(v)) for k, v in (spec.get("environment") or {}).items()})
        for env_file in spec.get("env_file", []):
            path = self.secrets / Path(env_file).name
            env.update(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        return {**env, **extra}

    def command(self, service: str) -> list[str]:
        argv = [self.translate(arg) for arg in SERVICES[service]["command"]]
        programs = {"walletq": [WALLETQ_BIN], "celery": [sys.executable, "-m", "celery"]}
        return programs.get(argv[0], [argv[0]]) + argv[1:]

    def run(self, service: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(service), env=self.env(service, **extra), cwd=self.folder,
                              capture_output=True, text=True, timeout=120, check=False)

    def start(self, service: str, **extra: str) -> Path:
        """The service's command in the background; its log file."""
        log = self.folder / f"{service}.log"
        with log.open("ab") as out:
            self.processes.append(subprocess.Popen(
                self.command(service), env=self.env(service, **extra), cwd=self.folder,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        return log

    def start_on_a_free_port(self, service: str, command: Callable[[int], list[str]],
                             serving: Callable[[int, int], bool]) -> tuple[int, Path]:
        """The service on the first candidate port it can bind (a bind failure in its log:
        the next one), once `serving(port, pid)` says the server there is up and is this
        process."""
        def launch(port: int) -> Path:
            log = self.folder / f"{service}-{port}.log"
            self.processes.append(start_serving(command(port), log, port, serving, 60,
                                                env=self.env(service), cwd=self.folder))
            return log

        return on_a_free_port(launch)

    def healthcheck(self, service: str, **extra: str) -> subprocess.CompletedProcess[str]:
        test = [self.translate(part) for part in SERVICES[service]["healthcheck"]["test"]]
        argv = ["sh", "-c", test[1]] if test[0] == "CMD-SHELL" else test[1:]
        if argv[0] == "python":
            argv[0] = sys.executable
        argv = [re.sub(r"\bcelery -A", f"{sys.executable} -m celery -A", a) for a in argv]
        return subprocess.run(argv, env=self.env(service, **extra), cwd=self.folder,
                              capture_output=True, text=True, timeout=60, check=False)

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait(10)


def make_secrets(folder: Path) -> None:
    """What the README tells an operator to make: one password per file, Flower's env file."""
    folder.mkdir(mode=0o700)
    for name in ("postgres_password", "redis_password", *ROLE_SECRETS):
        (folder / name).write_text(secrets.token_urlsafe(24) + "\n")
    # A password a URL must quote: it reaches the worker through WALLETQ_DATABASE_PASSWORD_FILE.
    (folder / "walletq_worker").write_text("w0rk:er@/#%?" + secrets.token_urlsafe(8) + "\n")
    (folder / "flower.env").write_text(f"FLOWER_BASIC_AUTH=admin:{secrets.token_urlsafe(12)}\n")


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    strip_walletq_env(monkeypatch)  # every WALLETQ_* a process sees comes from the compose file
    make_secrets(tmp_path / "secrets")
    pg = PrivatePostgres((tmp_path / "secrets" / "postgres_password").read_text().strip()).start()
    deploy = Deployment(tmp_path, pg)
    deploy.home.mkdir()
    try:
        yield deploy
    finally:
        deploy.stop()
        pg.stop()


def http_status(url: str, user_password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user_password:
        request.add_header("Authorization", "Basic " + base64.b64encode(user_password.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


def test_the_compose_file_keeps_its_secrets_out_and_binds_flower_to_loopback() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert not re.search(r"(?i)(password|passwd|secret)\s*[:=]\s*[^/\s\"]+\s*$", text, re.M)
    assert "PASSWORD:" not in text  # only *_PASSWORD_FILE variables
    for name, spec in SERVICES.items():
        url = (spec.get("environment") or {}).get("WALLETQ_DATABASE_URL", "")
        assert "postgres@" not in url or name == "roles", f"{name} runs as the superuser"
    users = {name: re.search(r"//([^@:]+)@", spec["environment"]["WALLETQ_DATABASE_URL"])[1]
             for name, spec in SERVICES.items() if "WALLETQ_DATABASE_URL" in (spec.get("environment") or {})}
    assert users == {"roles": "postgres", "migrate": "walletq_owner",
                     "system-producer": "walletq_owner", "worker-1": "walletq_worker",
                     "worker-2": "walletq_worker"}  # beat and Flower: no database at all
    assert SERVICES["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    assert "--requirepass" in " ".join(SERVICES["redis"]["command"])


def start_redis(d: Deployment) -> None:
    """Redis by the compose file's own command (the image's entrypoint aside), on a free
    port; up once the compose file's healthcheck passes there (its password: this Redis)."""
    script = d.command("redis")[2].replace("docker-entrypoint.sh ", "")
    health = d.translate(SERVICES["redis"]["healthcheck"]["test"][1])
    password = (d.secrets / "redis_password").read_text().strip()

    def healthy(port: int, pid: int) -> bool:
        check = health.replace("redis-cli", f"redis-cli -p {port}")
        if subprocess.run(["sh", "-c", check], capture_output=True, check=False).returncode:
            return False
        conn = redis.Redis(port=port, password=password)  # `exec`: sh became redis-server
        try:
            return int(conn.info("server")["process_id"]) == pid
        except redis.RedisError:  # another Redis, whose password is not ours
            return False
        finally:
            conn.close()

    d.redis_port, _ = d.start_on_a_free_port(
        "redis", lambda port: ["sh", "-c", f"{script} --port {port} --bind 127.0.0.1 "
                                           f"--dir {shlex.quote(str(d.folder))}"], healthy)


def create_database(d: Deployment) -> None:
    """What the postgres image does with POSTGRES_DB."""
    conn = psycopg2.connect(host="127.0.0.1", port=d.pg.port, dbname="postgres", user="postgres",
                            password=d.pg.password)
    conn.autocommit = True
    conn.cursor().execute("CREATE DATABASE walletq")
    conn.close()


def as_role(d: Deployment, role: str) -> dict[str, str]:
    """A client of walletq outside compose (a producer, an operator) as the README sets it up:
    its role in the URL, its password in a file, the broker's password in another."""
    return d.env("beat", WALLETQ_DATABASE_URL=f"postgresql+psycopg2://{role}@127.0.0.1:{d.pg.port}/walletq",
                 WALLETQ_DATABASE_PASSWORD_FILE=str(d.secrets / role))


def client(env: dict[str, str], *args: str) -> CliResult:
    """`walletq --json ARGS` as a client outside compose, in a process of its own (it holds
    no connection once it ended)."""
    return walletq("--json", *args, env=env, process=True)


def database_users(d: Deployment) -> set[str]:
    with psycopg2.connect(host="127.0.0.1", port=d.pg.port, dbname="walletq", user="postgres",
                          password=d.pg.password) as conn:
        cursor = conn.cursor()
        cursor.execute("SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = 'walletq' "
                       "AND pid <> pg_backend_pid()")
        users = {row[0] for row in cursor.fetchall()}
    conn.close()
    return users


def check_flower(d: Deployment) -> None:
    def command(port: int) -> list[str]:
        return [arg.replace("--address=0.0.0.0", "--address=127.0.0.1")
                .replace("--port=5555", f"--port={port}") for arg in d.command("flower")]

    port, _ = d.start_on_a_free_port(
        "flower", command,
        lambda port, _pid: http_status(f"http://127.0.0.1:{port}/healthcheck") == 200)
    base = f"http://127.0.0.1:{port}"
    assert http_status(f"{base}/") == 401
    assert http_status(f"{base}/", "admin:wrong") == 401
    assert http_status(f"{base}/workers", d.env("flower")["FLOWER_BASIC_AUTH"]) == 200


def test_the_compose_services_run_as_their_roles_with_passwords_checked(deployment: Deployment) -> None:
    d = deployment
    start_redis(d)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=d.redis_port).ping()
    create_database(d)
    # The one-shot jobs, in order; the system producer's job again, as at every start.
    for job in ("roles", "migrate", "system-producer", "system-producer"):
        done = d.run(job)
        assert done.returncode == 0, (job, done.stdout + done.stderr)
    assert json.loads(done.stdout)["created"] is False
    worker_log = d.start("worker-1", WALLETQ_WORKER_READY_FILE=str(d.folder / "w.ready"))
    eventually((d.folder / "w.ready").exists, 60, describe=lambda: tail(worker_log))

    # The operator registers a producer (as the owner), the web tier signs as it.
    key = d.folder / "shop.key"
    created = client(as_role(d, "walletq_owner"), "producer", "create", "shop", "--role", "admin",
                     "--key-out", str(key))
    assert created.exit_code == 0, created
    producer = {**as_role(d, "walletq_producer"), "WALLETQ_PRODUCER": "shop",
                "WALLETQ_PRODUCER_KEY_FILE": str(key)}
    mint = '{"type": "admin_create_tokens", "idempotency_key": "mint-1", "amount": "5.00"}'
    submitted = client(producer, "submit", mint)
    assert submitted.exit_code == 0, submitted
    status = client(producer, "status", "mint-1", "--wait", "30")
    assert status.json_lines()[0]["status"] == "succeeded", (status, tail(worker_log))

    ping = d.healthcheck("worker-1", HOSTNAME=socket.gethostname())
    assert ping.returncode == 0, ping.stdout + ping.stderr
    # A hold that expires in a second: beat's expiry pass, run by the worker, signs its
    # expire_hold with the key the system-producer job made.
    for command in ('{"type": "admin_sell_tokens_to_user", "idempotency_key": "sale-1", '
                    '"user": "ann", "amount": "2.00"}',
                    '{"type": "transfer_to_escrow", "idempotency_key": "hold-1", "hold_id": '
                    '"h-1", "payer": "ann", "payee": "bob", "amount": "2.00", '
                    '"expires_in_s": 1}'):
        assert client(producer, "submit", command).exit_code == 0
    beat_log = d.start("beat", WALLETQ_SWEEP_INTERVAL_S="0.5", WALLETQ_EXPIRY_INTERVAL_S="0.5")
    eventually(lambda: "walletq.sweep" in beat_log.read_text(errors="replace"), 60,
               describe=lambda: tail(beat_log))
    expired = client(producer, "status", "expire:h-1", "--wait", "60")
    assert expired.json_lines()[0]["status"] == "succeeded", (expired, tail(worker_log))
    assert d.healthcheck("beat").returncode == 0
    check_flower(d)

    assert database_users(d) == {"walletq_worker"}  # beat and Flower hold no connection
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host="127.0.0.1", port=d.pg.port, dbname="walletq", user="walletq_worker",
                         password="guessed")
    verify = client(as_role(d, "walletq_readonly"), "verify")
    assert verify.exit_code == 0, verify
    assert_report_sound(verify.json())
