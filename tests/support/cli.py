"""The one way the suite runs `walletq`: in this process (fast; the default) or as the
installed console script in a process of its own (where the process is the point: a fresh
interpreter, the real entry point, a run beside a worker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from services import settings as settings_module

__all__ = ["walletq", "CliResult", "WALLETQ_BIN"]

WALLETQ_BIN = str(Path(sys.executable).parent / "walletq")
#: Wide enough that rich never folds a table cell the tests look for.
_TERMINAL = {"COLUMNS": "200"}


@dataclass(frozen=True)
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[Any]:
        """Every non-blank line of stdout, parsed (the `--json` output of any command)."""
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    def json(self) -> Any:
        """The one JSON document stdout holds."""
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return f"exit {self.exit_code}\nstdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}"


def walletq(*args: str, stdin: str | None = None, env: Mapping[str, str] | None = None,
            process: bool = False, timeout_s: float = 120) -> CliResult:
    """Run `walletq ARGS`; `env` adds to (or overrides) this process's environment.

    In process, the settings cached by services.settings are dropped before and after, so
    the command reads the environment as it stands, and the test's next read does too.
    """
    if process:
        done = subprocess.run([WALLETQ_BIN, *args], input=stdin, capture_output=True, text=True,
                              env={**os.environ, **_TERMINAL, **(env or {})}, timeout=timeout_s,
                              check=False)
        return CliResult(done.returncode, done.stdout, done.stderr)
    from worker.cli import cli

    settings_module.reset_settings()
    try:
        result = CliRunner().invoke(cli, list(args), input=stdin, env={**_TERMINAL, **(env or {})},
                                    catch_exceptions=False)
    finally:
        settings_module.reset_settings()
    return CliResult(result.exit_code, result.stdout, result.stderr)
