"""`walletq payout FILE.csv` and `walletq payout-status KEY`: batch payouts from a CSV file.

The file is read, validated whole and split into batches by services.payouts.file (a bad
row is named by its line and nothing is submitted); this module submits the batches,
shows their progress and reports. Re-running the same payout finds the same commands and
pays nothing twice (and a reference already paid from that account, under any key, is
reported as a duplicate).

Exit codes: 0 every batch ran to its end (items may still be rejected: see the report);
1 a batch was refused whole or failed, or a refusal (idempotency conflict, unknown key);
2 the file or the options are invalid (nothing submitted); 3 timed out waiting (the
batches go on: see `walletq payout-status KEY`).
"""

from __future__ import annotations

import csv
import gc
import io
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.admission import sign_if_unsigned
from services.command_fields import CommandLimits
from services.command_status import ENDED
from services.commands import parse_command
from services.db import get_engine
from services.errors import FinancialIntegrityError, InvalidCommandError
from services.payouts.file import (
    PayoutFile,
    PayoutFileError,
    batch_commands,
    derived_key,
    line_of,
    read_payout_csv,
)
from services.payouts.store import (
    payout_item_rows,
    payout_progress,
    payout_totals,
    payouts_done,
)
from services.settings import Settings, get_settings
from services.wallet_service import WalletService
from worker.cli.base import Output, cli, ensure_schema, json_option, pass_output

__all__ = ["payout", "payout_status"]

REJECTED_SHOWN_MAX = 20
POLL_S = 0.05


# --- submitting and watching ------------------------------------------------------------


@dataclass
class SyncRunner:
    """--sync: the batches executed one after another in a thread of this process."""

    commands: list[dict[str, Any]]
    settings: Settings
    error: BaseException | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="walletq-payout", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            wallets = WalletService(get_engine(self.settings), self.settings)
            for command in self.commands:
                wallets.execute(command)  # signed as this process's producer
        except BaseException as exc:  # noqa: BLE001 - reported by the watcher
            self.error = exc

    @property
    def done(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()


def _submit(out: Output, commands: list[dict[str, Any]]) -> None:
    """Every batch signed and admitted (validated, once) before any is recorded: a refusal
    submits none. Unsigned here: a batch the client signs is not verified again."""
    from worker.client import WalletClient

    client = WalletClient.from_env()
    try:
        try:
            admitted = [client.admit(command) for command in commands]
        except InvalidCommandError as exc:
            out.fail(f"nothing submitted: {exc.message}", 2)
        for parsed, signed in admitted:
            client.submit_admitted(parsed, signed)
    finally:
        client.close()


@contextmanager
def _bulk() -> Iterator[None]:
    """The cyclic collector paused while the file is read and its batches admitted and
    submitted: hundreds of thousands of acyclic objects (rows, items, models) set off full
    collections that walked the whole heap again and again (admitting 10 batches of 10,000
    took 1.0 s instead of 0.5). What is still alive after it (the file's rows) lives until
    the process ends: frozen, it is not walked again, not even at exit."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _progress(keys: Sequence[str], settings: Settings) -> list[dict[str, Any]]:
    with get_engine(settings).connect() as conn:
        found = [payout_progress(conn, key, settings.asset_scale) for key in keys]
    return [p for p in found if p is not None]


def _done(keys: Sequence[str], settings: Settings) -> tuple[int, bool]:
    """(items decided, every batch ended), in one narrow read: what each poll needs."""
    with get_engine(settings).connect() as conn:
        found = payouts_done(conn, keys)
    ended = len(found) == len(keys) and all(status in ENDED for status, _ in found.values())
    return sum(done for _, done in found.values()), ended


def _watch(out: Output, keys: list[str], items: int, settings: Settings, timeout_s: float,
           runner: SyncRunner | None) -> list[dict[str, Any]]:
    """Poll until every batch ended or the deadline; then each batch's full progress, read
    once (the polls read only what the bar shows)."""
    deadline = time.monotonic() + timeout_s
    columns = (TextColumn("paying"), BarColumn(), MofNCompleteColumn(), TextColumn("items"),
               TimeElapsedColumn())
    with Progress(*columns, console=out.err, disable=out.as_json, transient=False) as bar:
        task = bar.add_task("payout", total=items)
        while True:
            done, ended = _done(keys, settings)
            bar.update(task, completed=done)
            if runner is not None and runner.done and runner.error is not None:
                raise runner.error
            if ended or time.monotonic() >= deadline:
                return _progress(keys, settings)
            time.sleep(POLL_S)


def _rejected_items(states: Sequence[dict[str, Any]], settings: Settings,
                    payout_file: PayoutFile | None, items_max: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with get_engine(settings).connect() as conn:
        for part, state in enumerate(states):
            for item in payout_item_rows(conn, state["idempotency_key"], settings.asset_scale,
                                         outcome="rejected", limit=REJECTED_SHOWN_MAX * 5):
                if payout_file is not None:
                    item["line"] = line_of(payout_file, part, item["index"], items_max)
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
            out.say(f"{s['idempotency_key']} {s['status']}: {s['error']['code']}: "
                    f"{s['error']['message']}", "red")


def _report(out: Output, source: str, from_account: str, states: list[dict[str, Any]],
            rejected: list[dict[str, Any]], timed_out: bool) -> None:
    totals = payout_totals(states)
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
        out.say(f"still running: {totals['done']} of {totals['items']} items decided; "
                f"see `walletq payout-status {states[0]['idempotency_key'] if states else ''}`",
                "yellow")


def _batches(out: Output, file: Path, from_account: str, key: str | None, atomic: bool,
             sync: bool, settings: Settings) -> tuple[PayoutFile, list[dict[str, Any]]]:
    """The file read and validated whole, as batch commands; signed here and validated when
    this process pays them (--sync). A bad file or batch exits 2, nothing submitted."""
    limits = CommandLimits.from_settings(settings)
    try:
        payout_file = read_payout_csv(file, limits)
        key = key or derived_key(payout_file, from_account)
        unsigned = batch_commands(payout_file, from_account, key, atomic,
                                  settings.payout_items_max)
    except OSError as exc:
        out.fail(f"{file}: {exc.strerror or exc}", 2)
    except PayoutFileError as exc:
        out.fail(f"{file}: nothing submitted:\n{exc}", 2)
    ensure_schema(settings)
    if not sync:  # the worker path: the client signs and admits each, once (_submit)
        return payout_file, unsigned
    signer = WalletService(settings=settings).signer  # this process's producer
    try:
        commands = [sign_if_unsigned(command, signer)[0] for command in unsigned]
        for command in commands:
            parse_command(command, limits)
    except InvalidCommandError as exc:
        out.fail(f"nothing submitted: {exc.message}", 2)
    return payout_file, commands


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
    with _bulk():
        payout_file, commands = _batches(out, file, from_account, key, atomic, sync, settings)
    keys = [command["idempotency_key"] for command in commands]
    runner = None
    if sync:
        runner = SyncRunner(commands, settings)
        runner.start()
    else:
        with _bulk():
            _submit(out, commands)
        if no_wait:
            states = _progress(keys, settings)
            _report(out, str(file), from_account, states, [], True)
            return
        if not out.as_json:
            out.warn(f"submitted {len(keys)} batch(es) to the payouts queue; waiting for a "
                     "worker (celery -A worker worker)")
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
    settings = get_settings()
    ensure_schema(settings)
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
    totals = payout_totals(states)
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
