"""`celery -A worker beat` as a process of the test's own: started in a process group of
its own, so that stopping it stops everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["start_beat", "stop_beat"]


def start_beat(env: Mapping[str, str], schedule: Path) -> subprocess.Popen[bytes]:
    """Beat with `env` as its whole environment and its schedule file at `schedule`; its
    output (stdout and stderr) is what stop_beat() returns."""
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker", "beat",
                             "--loglevel=INFO", "-s", str(schedule)],
                            env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_beat(beat: subprocess.Popen[bytes]) -> str:
    """SIGTERM the beat's process group; its log."""
    os.killpg(beat.pid, signal.SIGTERM)
    return beat.communicate(timeout=20)[0].decode(errors="replace")
