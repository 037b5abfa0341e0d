"""`walletq payout FILE.csv` and `walletq payout-status KEY`: batch payouts from a CSV file.

The file (header `user,amount,reference`) is validated whole before anything is sent: a
bad row is named by its line and nothing is submitted. A file larger than the item limit
(WALLETQ_PAYOUT_ITEMS_MAX) becomes several batches with keys KEY.1, KEY.2, ...; KEY
defaults to one derived from the file's content and the funding account, so re-running
the same payout finds the same commands and pays nothing twice (and a reference already
paid from that account, under any key, is reported as a duplicate).

Exit codes: 0 every batch ran to its end (items may still be rejected: see the report);
1 a batch was refused whole or failed, or a refusal (idempotency conflict, unknown key);
2 the file or the options are invalid (nothing submitted); 3 timed out waiting (the
batches go on: see `walletq payout-status KEY`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.atomic_transaction_manager import FinancialIntegrityError, InvalidCommandError
from services.command_executor import execute_command
from services.commands import ID_PATTERN, parse_command
from services.db import get_engine
from services.money import AmountError, parse_amount
from services.payouts import payout_item_rows, payout_progress
from services.settings import Settings, get_settings
from worker.cli.base import Output, cli, ensure_schema, json_option, pass_output

__all__ = ["PayoutFile", "PayoutFileError", "read_payout_csv", "batch_commands", "payout",
           "payout_status"]

CSV_COLUMNS = ("user", "amount", "reference")
ENDED = frozenset({"succeeded", "rejected", "failed"})
# A file of a million rows is ~50 MB; beyond that, split it first.
FILE_BYTES_MAX = 256 * 1024 * 1024
PROBLEMS_SHOWN_MAX = 10
REJECTED_SHOWN_MAX = 20
POLL_S = 0.2
_ID_RE = re.compile(ID_PATTERN)
_ID_RULE = "must be 1-200 characters of A-Z a-z 0-9 . _ : -"


class PayoutFileError(ValueError):
    """Raised when a payout file is not acceptable; names each bad row. Nothing is submitted."""

    def __init__(self, problems: Sequence[str]) -> None:
        shown = list(problems[:PROBLEMS_SHOWN_MAX])
        more = len(problems) - len(shown)
        super().__init__("\n".join(shown + ([f"... and {more} more"] if more else [])))
        self.problems = list(problems)


@dataclass(frozen=True)
class PayoutFile:
    rows: list[dict[str, str]]  # user, amount, reference
    lines: list[int]  # the file line of each row, for the report
    digest: str  # sha256 of the file's bytes


def read_payout_csv(path: Path, settings: Settings) -> PayoutFile:
    """Every row validated up front; PayoutFileError names each bad one by its line."""
    data = path.read_bytes()
    if len(data) > FILE_BYTES_MAX:
        raise PayoutFileError([f"{len(data)} bytes; at most {FILE_BYTES_MAX}"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PayoutFileError([f"not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next((fields for fields in reader if any(f.strip() for f in fields)), None)
    if header is None:
        raise PayoutFileError(["empty file; expected a header line "
                               f"{','.join(CSV_COLUMNS)} and one row per payout"])
    columns = _columns(header, reader.line_num)
    rows, lines, problems = [], [], []
    first_line: dict[str, int] = {}
    for fields in reader:
        if not any(f.strip() for f in fields):
            continue
        line = reader.line_num
        row, row_problems = _row(fields, columns, line, settings)
        if row is not None and row["reference"] in first_line:
            row_problems.append(f"line {line}: reference {row['reference']!r} repeats line "
                                f"{first_line[row['reference']]}")
        if row is not None:
            first_line.setdefault(row["reference"], line)
        problems += row_problems
        if row is not None and not row_problems:
            rows.append(row)
            lines.append(line)
    if problems:
        raise PayoutFileError(problems)
    if not rows:
        raise PayoutFileError(["empty file: a header and no rows"])
    return PayoutFile(rows, lines, hashlib.sha256(data).hexdigest())


def _columns(header: list[str], line: int) -> dict[str, int]:
    names = [name.strip().lower() for name in header]
    missing = [c for c in CSV_COLUMNS if c not in names]
    unknown = [n for n in names if n not in CSV_COLUMNS]
    repeated = sorted({n for n in names if names.count(n) > 1})
    problems = []
    if missing:
        problems.append(f"line {line} (header): missing column {', '.join(missing)}; "
                        f"expected {','.join(CSV_COLUMNS)}")
    if unknown:
        problems.append(f"line {line} (header): unknown column {', '.join(map(repr, unknown))}")
    if repeated:
        problems.append(f"line {line} (header): column {', '.join(repeated)} repeated")
    if problems:
        raise PayoutFileError(problems)
    return {name: names.index(name) for name in CSV_COLUMNS}


def _row(fields: list[str], columns: dict[str, int], line: int, settings: Settings
         ) -> tuple[dict[str, str] | None, list[str]]:
    if len(fields) != len(columns):
        return None, [f"line {line}: {len(fields)} fields; expected {len(columns)} "
                      f"({','.join(CSV_COLUMNS)})"]
    row = {name: fields[index].strip() for name, index in columns.items()}
    problems = []
    for name in ("user", "reference"):
        if not _ID_RE.fullmatch(row[name]):
            problems.append(f"line {line}: {name} {row[name][:40]!r} {_ID_RULE}")
    try:
        parse_amount(row["amount"], scale=settings.asset_scale, max_minor=settings.amount_max_minor)
    except AmountError as exc:
        problems.append(f"line {line}: amount {exc}")
    return row, problems


def derived_key(payout_file: PayoutFile, from_account: str) -> str:
    """The same file paid from the same account is the same payout."""
    digest = hashlib.sha256(f"{from_account}\n{payout_file.digest}".encode()).hexdigest()
    return f"payout-{digest[:32]}"


def batch_commands(payout_file: PayoutFile, from_account: str, key: str, atomic: bool,
                   items_max: int) -> list[dict[str, Any]]:
    """The file as payout_batch commands of at most `items_max` items; KEY, or KEY.1, KEY.2, ..."""
    rows = payout_file.rows
    parts = [rows[start:start + items_max] for start in range(0, len(rows), items_max)]
    keys = [key] if len(parts) == 1 else [f"{key}.{n}" for n in range(1, len(parts) + 1)]
    commands = []
    for part_key, part in zip(keys, parts, strict=True):
        command: dict[str, Any] = {"type": "payout_batch", "idempotency_key": part_key,
                                   "from_account": from_account, "items": part}
        if atomic:
            command["atomic"] = True
        commands.append(command)
    return commands


# --- submitting and watching ------------------------------------------------------------


@dataclass
class SyncRunner:
    """--sync: the batches executed one after another in a thread of this process."""

    commands: list[dict[str, Any]]
    error: BaseException | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="walletq-payout", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for command in self.commands:
                execute_command(command)
        except BaseException as exc:  # noqa: BLE001 - reported by the watcher
            self.error = exc

    @property
    def done(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()


def _submit(commands: list[dict[str, Any]]) -> None:
    from worker.client import WalletClient

    client = WalletClient.from_env()
    try:
        for command in commands:
            client.submit(command)
    finally:
        client.close()


def _progress(keys: Sequence[str], settings: Settings) -> list[dict[str, Any]]:
    with get_engine(settings).connect() as conn:
        found = [payout_progress(conn, key, settings.asset_scale) for key in keys]
    return [p for p in found if p is not None]


def _watch(out: Output, keys: list[str], items: int, settings: Settings, timeout_s: float,
           runner: SyncRunner | None) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    columns = (TextColumn("paying"), BarColumn(), MofNCompleteColumn(), TextColumn("items"),
               TimeElapsedColumn())
    with Progress(*columns, console=out.err, disable=out.as_json, transient=False) as bar:
        task = bar.add_task("payout", total=items)
        while True:
            states = _progress(keys, settings)
            bar.update(task, completed=sum(s.get("done", 0) for s in states))
            ended = len(states) == len(keys) and all(s["status"] in ENDED for s in states)
            if runner is not None and runner.done and runner.error is not None:
                raise runner.error
            if ended or time.monotonic() >= deadline:
                return states
            time.sleep(POLL_S)


def _totals(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    reasons: dict[str, int] = {}
    for state in states:
        for code, count in (state.get("rejected_by_code") or {}).items():
            reasons[code] = reasons.get(code, 0) + count
    return {
        "batches": len(states),
        "items": sum(s.get("items", 0) for s in states),
        "done": sum(s.get("done", 0) for s in states),
        "paid": sum(s.get("paid", 0) for s in states),
        "rejected": sum(s.get("rejected", 0) for s in states),
        "duplicate": sum(s.get("duplicate", 0) for s in states),
        "amount_paid": str(sum((Decimal(s.get("amount_paid", "0")) for s in states), Decimal(0))),
        "rejected_by_code": reasons,
    }


def _rejected_items(states: Sequence[dict[str, Any]], settings: Settings,
                    payout_file: PayoutFile | None, items_max: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with get_engine(settings).connect() as conn:
        for part, state in enumerate(states):
            for item in payout_item_rows(conn, state["idempotency_key"], settings.asset_scale,
                                         outcome="rejected", limit=REJECTED_SHOWN_MAX * 5):
                if payout_file is not None:
                    item["line"] = payout_file.lines[part * items_max + item["index"]]
                rows.append({"batch": state["idempotency_key"], **item})
    return rows


def _show_batches(out: Output, title: str, states: Sequence[dict[str, Any]]) -> None:
    out.table(title, ["batch", "status", "decided", "paid", "rejected", "duplicate",
                      "amount paid"],
              [[s["idempotency_key"], s["status"], f"{s.get('done')}/{s.get('items')}",
                s.get("paid"), s.get("rejected"), s.get("duplicate"), s.get("amount_paid")]
               for s in states],
              right=["decided", "paid", "rejected", "duplicate", "amount paid"])
    for s in states:
        if s.get("error"):
            out.say(f"[red]{s['idempotency_key']} {s['status']}:[/red] {s['error']['code']}: "
                    f"{s['error']['message']}")


def _report(out: Output, source: str, from_account: str, states: list[dict[str, Any]],
            rejected: list[dict[str, Any]], timed_out: bool) -> None:
    totals = _totals(states)
    if out.as_json:
        out.json({"file": source, "from_account": from_account, **totals,
                  "complete": not timed_out, "batches": states,
                  "rejected_items": rejected[:REJECTED_SHOWN_MAX * 5]})
        return
    _show_batches(out, f"payout of {source} from {from_account}", states)
    if rejected:
        out.table(f"rejected items (first {min(len(rejected), REJECTED_SHOWN_MAX)})",
                  ["line", "user", "amount", "reference", "reason"],
                  [[r.get("line", r["index"]), r["user"], r["amount"], r["reference"], r["error"]]
                   for r in rejected[:REJECTED_SHOWN_MAX]], right=["amount"])
    reasons = ", ".join(f"{code} {n}" for code, n in sorted(totals["rejected_by_code"].items()))
    out.say(f"paid {totals['paid']} items, total {totals['amount_paid']}; "
            f"rejected {totals['rejected']}{f' ({reasons})' if reasons else ''}; "
            f"duplicates {totals['duplicate']} (paid before: nothing paid again)")
    if timed_out:
        out.say(f"[yellow]still running: {totals['done']} of {totals['items']} items decided; "
                f"see `walletq payout-status {states[0]['idempotency_key'] if states else ''}`"
                "[/yellow]")


@cli.command("payout")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--from", "from_account", default="platform:treasury", show_default=True,
              help="the funding account: platform:treasury, platform:fees or user:ID:available")
@click.option("--key", default=None,
              help="idempotency key (default: derived from the file's content and --from)")
@click.option("--atomic", is_flag=True, help="all or nothing (per batch of at most the item limit)")
@click.option("--sync", is_flag=True, help="pay in this process, without a worker")
@click.option("--no-wait", is_flag=True, help="submit and return at once")
@click.option("--timeout", "timeout_s", default=3600.0, show_default=True,
              type=click.FloatRange(0), help="seconds to wait for the worker")
@json_option
@pass_output
def payout(out: Output, file: Path, from_account: str, key: str | None, atomic: bool, sync: bool,
           no_wait: bool, timeout_s: float) -> None:
    """Pay a CSV file (header user,amount,reference) out in batches, showing progress."""
    settings = get_settings()
    try:
        payout_file = read_payout_csv(file, settings)
        key = key or derived_key(payout_file, from_account)
        commands = batch_commands(payout_file, from_account, key, atomic,
                                  settings.payout_items_max)
        for command in commands:
            parse_command(command)
    except OSError as exc:
        out.fail(f"{file}: {exc.strerror or exc}", 2)
    except PayoutFileError as exc:
        out.fail(f"{file}: nothing submitted:\n{exc}", 2)
    except InvalidCommandError as exc:
        out.fail(f"nothing submitted: {exc.message}", 2)
    ensure_schema(settings)
    keys = [command["idempotency_key"] for command in commands]
    runner = None
    if sync:
        runner = SyncRunner(commands)
        runner.start()
    else:
        _submit(commands)
        if no_wait:
            states = _progress(keys, settings)
            _report(out, str(file), from_account, states, [], True)
            return
        if not out.as_json:
            out.err.print(f"submitted {len(keys)} batch(es) to the payouts queue; waiting for a "
                          "worker (celery -A worker worker)", highlight=False)
    states = _watch(out, keys, len(payout_file.rows), settings, timeout_s, runner)
    timed_out = not (len(states) == len(keys) and all(s["status"] in ENDED for s in states))
    rejected = _rejected_items(states, settings, payout_file, settings.payout_items_max)
    _report(out, str(file), from_account, states, rejected, timed_out)
    if timed_out:
        raise SystemExit(3)
    if any(s["status"] != "succeeded" for s in states):
        raise SystemExit(1)


# --- payout-status ----------------------------------------------------------------------


def resolve_keys(key: str, settings: Settings) -> list[dict[str, Any]]:
    """KEY's batch, or the parts KEY.1, KEY.2, ... of a file split into batches."""
    found = _progress([key], settings)
    if found:
        return found
    parts: list[dict[str, Any]] = []
    while True:
        part = _progress([f"{key}.{len(parts) + 1}"], settings)
        if not part:
            return parts
        parts += part


@cli.command("payout-status")
@click.argument("key")
@click.option("--items", "show_items", is_flag=True, help="every item's outcome too")
@click.option("--csv", "as_csv", is_flag=True, help="the items as CSV (implies --items)")
@json_option
@pass_output
def payout_status(out: Output, key: str, show_items: bool, as_csv: bool) -> None:
    """A payout's progress, totals and (with --items) per-item outcomes."""
    ensure_schema()
    settings = get_settings()
    states = resolve_keys(key, settings)
    if not states:
        raise FinancialIntegrityError(f"no payout {key!r} (nor {key}.1)")
    if any(s["type"] != "payout_batch" for s in states):
        raise InvalidCommandError(f"{key!r} is a {states[0]['type']} command, not a payout")
    if as_csv:
        _items_csv(states, settings)
        return
    items = _items(states, settings) if show_items else {}
    if out.as_json:
        for state in states:
            out.json({**state, **({"items": items[state["idempotency_key"]]} if show_items
                                  else {})})
        return
    _show_batches(out, f"payout {key}", states)
    totals = _totals(states)
    out.say(f"{totals['done']} of {totals['items']} items decided: paid {totals['paid']} "
            f"(total {totals['amount_paid']}), rejected {totals['rejected']}, duplicates "
            f"{totals['duplicate']}")
    for batch_key, rows in items.items():
        out.table(f"items of {batch_key}", ["index", "user", "amount", "reference", "outcome",
                                            "error"],
                  [[r["index"], r["user"], r["amount"], r["reference"], r["outcome"], r["error"]]
                   for r in rows], right=["index", "amount"])


def _items(states: Sequence[dict[str, Any]], settings: Settings) -> dict[str, list[dict[str, Any]]]:
    with get_engine(settings).connect() as conn:
        return {s["idempotency_key"]: payout_item_rows(conn, s["idempotency_key"],
                                                       settings.asset_scale)
                for s in states}


def _items_csv(states: Sequence[dict[str, Any]], settings: Settings) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["batch", "index", "user", "amount", "reference", "outcome", "error"])
    for batch_key, rows in _items(states, settings).items():
        for r in rows:
            writer.writerow([batch_key, r["index"], r["user"], r["amount"], r["reference"],
                             r["outcome"], r["error"] or ""])
    click.echo(buffer.getvalue(), nl=False)
