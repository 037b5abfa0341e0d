"""Bring up what the tests need: PostgreSQL, Redis and RabbitMQ, started when installed but
down.

When one is missing, the message says exactly what to install; the tests never run
against a half-configured machine.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess

from tests.support.polling import eventually

PG_URL = os.environ.get("WALLETQ_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("WALLETQ_TEST_REDIS_URL", "redis://127.0.0.1:6379")
RABBITMQ_URL = os.environ.get("WALLETQ_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")

INSTALL_HINT = (
    "walletq's tests need PostgreSQL (trust auth for user postgres on 127.0.0.1:5432), "
    "Redis (127.0.0.1:6379) and RabbitMQ (guest/guest on 127.0.0.1:5672).\n"
    "  Debian/Ubuntu: apt-get install -y postgresql redis-server rabbitmq-server\n"
    "  or point WALLETQ_TEST_PG_URL / WALLETQ_TEST_REDIS_URL / WALLETQ_TEST_RABBITMQ_URL at "
    "running servers."
)


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _wait(host: str, port: int, timeout_s: float) -> bool:
    try:
        eventually(lambda: port_open(host, port), timeout_s)
    except AssertionError:
        return False
    return True


def ensure_postgres() -> str | None:
    """None when PostgreSQL answers (started here if need be), else why not."""
    if port_open("127.0.0.1", 5432):
        return None
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions or not shutil.which("pg_ctlcluster"):
        return "PostgreSQL is not installed.\n" + INSTALL_HINT
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
                   check=False, capture_output=True)
    return None if _wait("127.0.0.1", 5432, 30) else "PostgreSQL did not start.\n" + INSTALL_HINT


def ensure_redis() -> str | None:
    if port_open("127.0.0.1", 6379):
        return None
    if not shutil.which("redis-server"):
        return "Redis is not installed.\n" + INSTALL_HINT
    folder = "/var/lib/redis" if os.path.isdir("/var/lib/redis") else "/tmp"
    subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379",
                    "--save", "", "--appendonly", "no", "--dir", folder], check=False,
                   capture_output=True)
    return None if _wait("127.0.0.1", 6379, 15) else "Redis did not start.\n" + INSTALL_HINT


def ensure_rabbitmq() -> str | None:
    """None when RabbitMQ answers on 5672 (started here if installed but down), else why not."""
    if port_open("127.0.0.1", 5672):
        return None
    if not shutil.which("rabbitmq-server"):
        return "RabbitMQ is not installed.\n" + INSTALL_HINT
    subprocess.run(["rabbitmq-server", "-detached"], check=False, capture_output=True)
    # A node boots in seconds to a minute (Erlang VM, then its database).
    return None if _wait("127.0.0.1", 5672, 120) else "RabbitMQ did not start.\n" + INSTALL_HINT


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server binary (initdb, postgres), for fault tests that run their own cluster."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None
