"""Servers a fault test may kill: never the shared ones, always a private instance.

`PrivateRedis` is a redis-server of the test's own, without persistence (no RDB snapshot,
no append-only file): restart() loses everything it held, as a production Redis configured
that way would. Its port is never "found free, released, used later" (another process may
take it in between): the server binds a candidate port itself, and on a bind failure the
next candidate is tried. A server only counts as started when the one answering on the
port is this process (its INFO process_id), not somebody else's.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.polling import eventually

__all__ = ["PrivateRedis", "PortTaken"]

#: Below Linux's ephemeral range (32768-60999), where clients' own ports come from.
CANDIDATE_PORTS = range(20_000, 30_000)
ATTEMPTS_MAX = 20
_BIND_FAILED = "Address already in use"


class PortTaken(RuntimeError):
    """Raised when the server could not bind its port: another process listens there."""


class PrivateRedis:
    """`redis-server --port N --save "" --appendonly no`, in its own folder."""

    def __init__(self, folder: Path, ports: Iterable[int] | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.binary = binary
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.candidates = list(ports) if ports is not None else random.sample(
            CANDIDATE_PORTS, ATTEMPTS_MAX)
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = folder / "redis.log"

    @property
    def url(self) -> str:
        assert self.port is not None, "not started"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> PrivateRedis:
        """Start on the first candidate port this server can bind (its own port on a restart)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        if self.port is not None:
            self._launch(self.port, timeout_s)
            return self
        for port in self.candidates:
            try:
                self._launch(port, timeout_s)
            except PortTaken:
                continue
            self.port = port
            return self
        raise RuntimeError(f"no free port among {self.candidates}")

    def _launch(self, port: int, timeout_s: float) -> None:
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        proc = self.proc = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

        def answering() -> bool:
            if proc.poll() is not None:
                output = self.log_path.read_bytes()[log_start:].decode(errors="replace")
                if _BIND_FAILED in output:
                    raise PortTaken(f"port {port}: {output[-300:]}")
                raise RuntimeError(f"private redis-server exited on {port}:\n{output[-2000:]}")
            return self._serves(port, proc.pid)

        try:
            eventually(answering, timeout_s, describe=lambda: self.log_path.read_text()[-2000:])
        except AssertionError:
            self.stop()
            raise

    @staticmethod
    def _serves(port: int, pid: int) -> bool:
        """Whether the server answering on the port is the process `pid`."""
        # No retry: redis-py's default retries a silent listener for ten seconds.
        conn = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5,
                           socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
        try:
            return int(conn.info("server")["process_id"]) == pid
        except redis.RedisError:  # nobody there yet, or somebody who is not a Redis
            return False
        finally:
            conn.close()

    def stop(self) -> None:
        """SIGKILL: nothing is saved (there is nothing to save with persistence off anyway)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        """Kill and start again on the same port: an empty server, every queue gone."""
        self.stop()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)
