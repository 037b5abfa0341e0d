"""Pipeline commands: submit, status, refusals, commands, sweep, redrive, demo.

Exit codes: 0 ok; 1 a refusal (invalid command, idempotency conflict, unknown key, a
command that is not failed given to redrive, a line of `submit -` refused); 2 bad usage;
3 `status --wait` timed out before the command ended (the record is printed anyway).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from typing import Any, TextIO

import click

from services import command_store, outbox, sweep
from services.command_status import ALL as STATUSES
from services.command_status import ENDED
from services.command_store import CommandRecord
from services.db import get_engine
from services.errors import BusinessRuleError
from services.refusals import Refusal
from services.settings import get_settings
from worker.cli.base import Output, cli, ensure_schema, json_option, pass_output

__all__ = ["submit", "status", "refusals_command", "commands", "sweep_command", "redrive", "demo"]
#: Lines of `submit -` shown per table (people's output).
SUBMIT_LINES_PER_BATCH = 1000
#: JSON answers of `submit -` written (and flushed) at once: one write per chunk recorded.
JSON_LINES_PER_WRITE = 500
_SUBMIT_COLUMNS = ["line", "key", "status", "error"]
_COLUMNS = ["key", "type", "status", "error", "attempts", "created", "completed"]


def _client() -> Any:
    from worker.client import WalletClient

    return WalletClient.from_env()


def _row(record: CommandRecord) -> list[Any]:
    error = record.error
    return [record.idempotency_key, record.type, record.status,
            f"{error['code']}: {error['message']}"[:80] if error else "",
            record.attempts, command_store.iso(record.created_at),
            command_store.iso(record.completed_at)]


def _show_records(out: Output, title: str, records: list[CommandRecord]) -> None:
    if out.as_json:
        for record in records:
            out.json(record.to_dict())
    else:
        out.table(title, _COLUMNS, [_row(r) for r in records], right=["attempts"])


def _show_record(out: Output, record: CommandRecord | dict[str, Any]) -> None:
    """A command record (or a refusal in its shape): JSON, or a table of its fields."""
    data = record.to_dict() if isinstance(record, CommandRecord) else record
    if out.as_json:
        out.json(data)
        return
    error = data.pop("error")
    data["error"] = f"{error['code']}: {error['message']}" if error else ""
    data["result"] = json.dumps(data["result"]) if data["result"] is not None else ""
    out.table(None, ["field", "value"], list(data.items()))


@cli.command()
@click.argument("command_json", metavar="JSON|-")
@json_option
@pass_output
def submit(out: Output, command_json: str) -> None:
    """Submit one command (JSON), or JSON lines from stdin with `-`: one answer per line."""
    ensure_schema(get_settings())
    client = _client()
    try:
        if command_json == "-":
            ok = _submit_lines(out, client, click.get_text_stream("stdin"))
            if not ok:
                raise SystemExit(1)
            return
        _show_record(out, client.submit(command_json))
    finally:
        client.close()


def _numbered(stream: TextIO, numbers: deque[int]) -> Iterator[str]:
    """The stream's commands, their line numbers queued in `numbers` as each is read."""
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue  # a blank line is no command, and gets no answer
        numbers.append(number)
        yield line


def _submit_lines(out: Output, client: Any, stream: TextIO) -> bool:
    """Answer each line in order, as the client records and publishes the stream chunk by
    chunk; JSON goes out a chunk per write, tables SUBMIT_LINES_PER_BATCH lines each."""
    all_ok = True
    numbers: deque[int] = deque()
    printed: list[str] = []
    rows: list[list[Any]] = []
    for answer in client.submit_stream(_numbered(stream, numbers)):
        number = numbers.popleft()
        if isinstance(answer, BusinessRuleError):
            all_ok = False
            if out.as_json:
                printed.append(out.dumps({"line": number, "error": {
                    "code": answer.code, "message": answer.message}}))
            else:
                rows.append([number, answer.ids.get("idempotency_key", ""), "refused",
                             f"{answer.code}: {answer.message}"[:100]])
        elif out.as_json:
            printed.append(out.dumps(answer.to_dict()))
        else:
            rows.append([number, answer.idempotency_key, answer.status, ""])
        if len(printed) >= JSON_LINES_PER_WRITE:
            out.json_lines(printed)
            printed = []
        if len(rows) >= SUBMIT_LINES_PER_BATCH:
            out.table(None, _SUBMIT_COLUMNS, rows, right=["line"])
            rows = []
    if printed:
        out.json_lines(printed)
    if rows:
        out.table(None, _SUBMIT_COLUMNS, rows, right=["line"])
    return all_ok


@cli.command()
@click.argument("key")
@click.option("--wait", "wait_s", type=click.FloatRange(0, 3600), default=None, metavar="SECONDS",
              help="wait up to SECONDS for the command to succeed, be rejected or fail")
@json_option
@pass_output
def status(out: Output, key: str, wait_s: float | None) -> None:
    """A command's status, result and error."""
    ensure_schema(get_settings())
    client = _client()
    try:
        record = client.status(key) if wait_s is None else client.wait(key, timeout=wait_s)
        if record is None:
            return _status_of_refused(out, client, key)
    finally:
        client.close()
    _show_record(out, record)
    if wait_s is not None and record.status not in ENDED:
        if not out.as_json:
            out.warn(f"still {record.status} after {wait_s:g} s")
        raise SystemExit(3)


def _refused_record(refusal: Refusal) -> dict[str, Any]:
    """A refusal in the shape of a command record, status `refused` (no key was taken)."""
    at = command_store.iso(refusal.created_at)
    return {"idempotency_key": refusal.idempotency_key, "type": refusal.command_type,
            "producer": refusal.producer, "status": "refused", "result": None,
            "error": refusal.error, "attempts": 0, "created_at": at, "completed_at": at,
            "authenticated": refusal.authenticated}


def _status_of_refused(out: Output, client: Any, key: str) -> None:
    """No command under the key: its latest refusal, if a command sent under it was refused."""
    found = client.refusals(key)
    if not found:
        out.fail(f"no command with idempotency key {key!r}", 1, "not_found")
    _show_record(out, _refused_record(found[0]))


@cli.command("refusals")
@click.argument("key")
@click.option("--producer", default=None, help="only refusals of commands naming this producer")
@json_option
@pass_output
def refusals_command(out: Output, key: str, producer: str | None) -> None:
    """Refusals of commands sent under KEY that took no key (unauthenticated, forbidden, conflict)."""
    ensure_schema(get_settings())
    client = _client()
    try:
        found = client.refusals(key, producer)
    finally:
        client.close()
    if out.as_json:
        for refusal in found:
            out.json(refusal.to_dict())
        return
    out.table(f"refusals under {key}", ["at", "producer", "authenticated", "type", "error"],
              [[command_store.iso(r.created_at), r.producer, r.authenticated, r.command_type,
                f"{r.error_code}: {r.error_message}"[:120]] for r in found])


@cli.command()
@click.option("--status", "status_", type=click.Choice(STATUSES), default=None)
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10_000))
@json_option
@pass_output
def commands(out: Output, status_: str | None, limit: int) -> None:
    """List commands, oldest first."""
    settings = get_settings()
    ensure_schema(settings)
    with get_engine(settings).connect() as conn:
        records = command_store.list_records(conn, status=status_, limit=limit)
    _show_records(out, f"commands{f' ({status_})' if status_ else ''}", records)


@cli.command("sweep")
@click.option("--grace", "grace_s", type=click.FloatRange(0), default=None, metavar="SECONDS",
              help="republish commands untouched for this long (default WALLETQ_SWEEP_GRACE_S)")
@json_option
@pass_output
def sweep_command(out: Output, grace_s: float | None) -> None:
    """Republish commands stuck before a terminal status (what beat runs)."""
    ensure_schema(get_settings())
    client = _client()
    try:
        counts = sweep.run_once(client.publisher, engine=client.engine,
                                settings=client.settings, grace_s=grace_s)
    finally:
        client.close()
    if out.as_json:
        out.json(counts.to_dict())
    else:
        data = counts.to_dict()
        out.table("sweep", list(data), [list(data.values())], right=list(data))
    if counts.publish_failed:
        raise SystemExit(1)


@cli.command()
@click.argument("key")
@json_option
@pass_output
def redrive(out: Output, key: str) -> None:
    """Send a failed command again, under the same key."""
    settings = get_settings()
    ensure_schema(settings)
    record, moved = outbox.mark_redriven(key, engine=get_engine(settings), settings=settings)
    if record is None:
        out.fail(f"no command with idempotency key {key!r}", 1, "not_found")
        return
    if not moved:
        out.fail(f"{key} is {record.status}, not failed: only a failed command is re-driven",
                 1, "not_failed")
        return
    client = _client()
    try:
        client.publish_again(record)
    except Exception as exc:  # noqa: BLE001 - it is accepted now: the sweep delivers it
        if not out.as_json:
            out.warn(f"could not publish ({exc}); the sweep will deliver it")
    finally:
        client.close()
    _show_record(out, record)


@cli.command()
@click.option("--timeout", "timeout_s", type=click.FloatRange(1, 600), default=45.0,
              show_default=True, help="give up when the worker has not finished by then")
@json_option
@pass_output
def demo(out: Output, timeout_s: float) -> None:
    """Run a marketplace scenario end to end, with a worker of its own."""
    from worker import demo as demo_module

    ok = demo_module.run(out, timeout_s=timeout_s)
    if not ok:
        raise SystemExit(1)

