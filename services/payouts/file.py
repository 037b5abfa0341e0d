"""A payout file: CSV rows (user, amount, reference) validated whole, then split into batches.

Shared by `walletq payout` and any web tier that takes payout files: a bad row is named by
its line and nothing is submitted. A file larger than the item limit becomes several
`payout_batch` commands with keys KEY.1, KEY.2, ...; KEY defaults to one derived from the
file's content and the funding account, so paying the same file again finds the same
commands and pays nothing twice.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.command_fields import NAME_PATTERN, NAME_RULE, CommandLimits
from services.money import AmountError, parse_amount

__all__ = ["CSV_COLUMNS", "FILE_BYTES_MAX", "PayoutFile", "PayoutFileError", "read_payout_csv",
           "parse_payout_csv", "derived_key", "batch_commands", "line_of"]

CSV_COLUMNS = ("user", "amount", "reference")
# A file of a million rows is ~50 MB; beyond that, split it first.
FILE_BYTES_MAX = 256 * 1024 * 1024
PROBLEMS_SHOWN_MAX = 10
_ID_RE = re.compile(NAME_PATTERN)
_ID_RULE = NAME_RULE


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


def read_payout_csv(path: Path, limits: CommandLimits) -> PayoutFile:
    """The file at `path`, every row validated up front (see parse_payout_csv)."""
    size = path.stat().st_size
    if size > FILE_BYTES_MAX:  # refused before it is read into memory
        raise PayoutFileError([f"{size} bytes; at most {FILE_BYTES_MAX}"])
    return parse_payout_csv(path.read_bytes(), limits)


def parse_payout_csv(data: bytes, limits: CommandLimits) -> PayoutFile:
    """Every row validated up front; PayoutFileError names each bad one by its line."""
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
    rows, lines, problems = _rows(reader, _columns(header, reader.line_num), limits)
    if problems:
        raise PayoutFileError(problems)
    if not rows:
        raise PayoutFileError(["empty file: a header and no rows"])
    return PayoutFile(rows, lines, hashlib.sha256(data).hexdigest())


def _rows(reader: Any, columns: dict[str, int], limits: CommandLimits
          ) -> tuple[list[dict[str, str]], list[int], list[str]]:
    """The sound rows and their lines, and every problem of the others, in file order."""
    rows, lines, problems = [], [], []
    first_line: dict[str, int] = {}
    width = len(columns)
    at_user, at_amount, at_reference = columns["user"], columns["amount"], columns["reference"]
    for fields in reader:
        # A sound row, as most are, is taken here; any other is looked at by _row, which
        # names its problems (a blank line is skipped there too).
        if len(fields) == width:
            user, amount = fields[at_user].strip(), fields[at_amount].strip()
            reference = fields[at_reference].strip()
            if _ID_RE.fullmatch(user) and _ID_RE.fullmatch(reference) \
                    and reference not in first_line and _amount_ok(amount, limits):
                first_line[reference] = reader.line_num
                rows.append({"user": user, "amount": amount, "reference": reference})
                lines.append(reader.line_num)
                continue
        if not any(f.strip() for f in fields):
            continue
        line = reader.line_num
        row, row_problems = _row(fields, columns, line, limits)
        if row is not None and row["reference"] in first_line:
            row_problems.append(f"line {line}: reference {row['reference']!r} repeats line "
                                f"{first_line[row['reference']]}")
        if row is not None:
            first_line.setdefault(row["reference"], line)
        problems += row_problems
        if row is not None and not row_problems:
            rows.append(row)
            lines.append(line)
    return rows, lines, problems


def _amount_ok(amount: str, limits: CommandLimits) -> bool:
    try:
        parse_amount(amount, scale=limits.scale, max_minor=limits.amount_max_minor)
    except AmountError:
        return False
    return True


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


def _row(fields: list[str], columns: dict[str, int], line: int, limits: CommandLimits
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
        parse_amount(row["amount"], scale=limits.scale, max_minor=limits.amount_max_minor)
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


def line_of(payout_file: PayoutFile, part: int, index: int, items_max: int) -> int:
    """The file line of item `index` of batch `part` (0-based) of a split file."""
    return payout_file.lines[part * items_max + index]

