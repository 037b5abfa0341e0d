"""CPU seconds spent by each part of a run, read from /proc (Linux): where a command's cost
goes when the machine, not a lock, is the wall. Not a test.

The parts: this process (the producer: signing, admission, recording, publishing), each
worker's main process (Celery: fetching, the guard, handing to the pool) and its pool
processes (admission, the transaction), the PostgreSQL backends serving the run's database,
and the Redis server (shared: other users' work counts too).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine

TICK_S = 1 / os.sysconf("SC_CLK_TCK")
PARTS = ("producer", "worker main", "worker pool", "postgres", "redis")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (threads included); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) * TICK_S


def _group(pgid: int) -> list[int]:
    """The processes of a process group (a worker started in its own session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    found.append(int(entry.name))
            except ProcessLookupError:
                continue
    return found


def _redis_pid(redis_url: str) -> int | None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


class CpuMeter:
    """CPU seconds per part since `start`; `per_command` divides by the commands applied."""

    def __init__(self, engine: Engine, worker_pids: Iterable[int], redis_url: str) -> None:
        self.engine, self.worker_pids, self.redis_url = engine, list(worker_pids), redis_url
        self.before: dict[str, float] = {}

    def _backends(self) -> list[int]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()")).scalars())

    def read(self) -> dict[str, float]:
        main = sum(_cpu_s(pid) for pid in self.worker_pids)
        pool = sum(_cpu_s(pid) for leader in self.worker_pids for pid in _group(leader)
                   if pid != leader)
        redis_pid = _redis_pid(self.redis_url)
        return {"producer": _cpu_s(os.getpid()), "worker main": main, "worker pool": pool,
                "postgres": sum(_cpu_s(pid) for pid in self._backends()),
                "redis": _cpu_s(redis_pid) if redis_pid else 0.0}

    def start(self) -> None:
        self.before = self.read()

    def per_command(self, commands: int) -> dict[str, float]:
        """Milliseconds of CPU per command, by part, since `start`."""
        after = self.read()
        return {part: (after[part] - self.before.get(part, 0.0)) * 1e3 / commands
                for part in PARTS}
