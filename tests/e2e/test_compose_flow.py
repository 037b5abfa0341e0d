"""docker-compose.yml, run without Docker: the commands and environments of its services,
read from the file itself, against a private PostgreSQL that checks every password
(scram-sha-256) and a private Redis started by the compose file's own command (requirepass).
Only hostnames, ports and the secrets' folder are translated; a typo in the file fails here.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
import yaml

from tests.e2e.fault_servers import PrivatePostgres, spare_port
from tests.e2e.helpers import WALLETQ, json_lines

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
ROLE_SECRETS = ("walletq_owner", "walletq_worker", "walletq_producer", "walletq_readonly")


class Deployment:
    """The compose file's services, translated to this machine."""

    def __init__(self, folder: Path, pg: PrivatePostgres, redis_port: int) -> None:
        self.folder, self.pg, self.redis_port = folder, pg, redis_port
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
        programs = {"walletq": [WALLETQ], "celery": [sys.executable, "-m", "celery"]}
        return programs.get(argv[0], [argv[0]]) + argv[1:]

    def run(self, service: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(service), env=self.env(service, **extra), cwd=self.folder,
                              capture_output=True, text=True, timeout=120, check=False)

    def start(self, service: str, command: list[str] | None = None, **extra: str) -> Path:
        log = self.folder / f"{service}.log"
        with log.open("ab") as out:
            self.processes.append(subprocess.Popen(
                command or self.command(service), env=self.env(service, **extra), cwd=self.folder,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        return log

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


def wait_for(predicate: Any, what: str, log: Path | None = None, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise AssertionError(f"{what} did not happen within {timeout_s} s\n{tail}")
        time.sleep(0.1)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    make_secrets(tmp_path / "secrets")
    pg = PrivatePostgres((tmp_path / "secrets" / "postgres_password").read_text().strip()).start()
    deploy = Deployment(tmp_path, pg, spare_port())
    deploy.home.mkdir()
    try:
        yield deploy
    finally:
        deploy.stop()
        pg.stop()


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


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
    assert users == {"roles": "postgres", "migrate": "walletq_owner", "worker-1": "walletq_worker",
                     "worker-2": "walletq_worker"}  # beat and Flower: no database at all
    assert SERVICES["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    assert "--requirepass" in " ".join(SERVICES["redis"]["command"])


def start_redis(d: Deployment) -> None:
    """Redis by the compose file's own command (the image's entrypoint aside), on a spare port."""
    script = d.command("redis")[2].replace("docker-entrypoint.sh ", "")
    d.start("redis", ["sh", "-c", f"{script} --port {d.redis_port} --bind 127.0.0.1 "
                                  f"--dir {shlex.quote(str(d.folder))}"])
    wait_for(lambda: port_open(d.redis_port), "redis up", d.folder / "redis.log")
    health = d.translate(SERVICES["redis"]["healthcheck"]["test"][1])
    assert subprocess.run(["sh", "-c", health.replace("redis-cli", f"redis-cli -p {d.redis_port}")],
                          check=False).returncode == 0


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


def walletq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WALLETQ, "--json", *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


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
    port = spare_port()
    argv = [arg.replace("--address=0.0.0.0", "--address=127.0.0.1").replace("--port=5555", f"--port={port}")
            for arg in d.command("flower")]
    log = d.start("flower", argv)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: http_status(f"{base}/healthcheck") == 200, "flower up", log)
    assert http_status(f"{base}/") == 401
    assert http_status(f"{base}/", "admin:wrong") == 401
    assert http_status(f"{base}/workers", d.env("flower")["FLOWER_BASIC_AUTH"]) == 200


def test_the_compose_services_run_as_their_roles_with_passwords_checked(deployment: Deployment) -> None:
    d = deployment
    start_redis(d)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=d.redis_port).ping()
    create_database(d)
    for job in ("roles", "migrate"):
        done = d.run(job)
        assert done.returncode == 0, (job, done.stdout + done.stderr)
    worker_log = d.start("worker-1", WALLETQ_WORKER_READY_FILE=str(d.folder / "w.ready"))
    wait_for(lambda: (d.folder / "w.ready").exists(), "the worker ready", worker_log)

    # The operator registers a producer (as the owner), the web tier signs as it.
    key = d.folder / "shop.key"
    created = walletq(as_role(d, "walletq_owner"), "producer", "create", "shop", "--role", "admin",
                      "--key-out", str(key))
    assert created.returncode == 0, created.stdout + created.stderr
    producer = {**as_role(d, "walletq_producer"), "WALLETQ_PRODUCER": "shop",
                "WALLETQ_PRODUCER_KEY_FILE": str(key)}
    mint = '{"type": "admin_create_tokens", "idempotency_key": "mint-1", "amount": "5.00"}'
    assert walletq(producer, "submit", mint).returncode == 0
    status = walletq(producer, "status", "mint-1", "--wait", "30")
    assert json_lines(status.stdout)[0]["status"] == "succeeded", worker_log.read_text()[-3000:]

    ping = d.healthcheck("worker-1", HOSTNAME=socket.gethostname())
    assert ping.returncode == 0, ping.stdout + ping.stderr
    beat_log = d.start("beat", WALLETQ_SWEEP_INTERVAL_S="0.5")
    wait_for(lambda: "walletq.sweep" in beat_log.read_text(errors="replace"), "a sweep sent", beat_log)
    assert d.healthcheck("beat").returncode == 0
    check_flower(d)

    assert database_users(d) == {"walletq_worker"}  # beat and Flower hold no connection
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host="127.0.0.1", port=d.pg.port, dbname="walletq", user="walletq_worker",
                         password="guessed")
    verify = walletq(as_role(d, "walletq_readonly"), "verify")
    assert verify.returncode == 0 and json_lines(verify.stdout)[0]["ok"], verify.stdout + verify.stderr
