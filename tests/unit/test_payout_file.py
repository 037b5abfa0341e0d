"""A payout file read whole: the rows it keeps, and every problem named by its line, exactly
as a row-by-row reading (`_row` on every line) names them, whatever mix of sound and bad
rows, blank lines, spaces and repeated references the file holds."""

from __future__ import annotations

import csv
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.command_fields import CommandLimits
from services.payouts.file import PayoutFileError, _columns, _row, parse_payout_csv

LIMITS = CommandLimits(scale=2, amount_max_minor=10**6)


def row_by_row(data: bytes, limits: CommandLimits) -> tuple[list[dict[str, str]], list[int],
                                                             list[str]]:
    """Every line through _row, as the reader did before it took sound rows itself."""
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""))
    header = next(fields for fields in reader if any(f.strip() for f in fields))
    columns = _columns(header, reader.line_num)
    rows, lines, problems = [], [], []
    first_line: dict[str, int] = {}
    for fields in reader:
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


def read(data: bytes) -> tuple[list[dict[str, str]], list[int], list[str]]:
    try:
        found = parse_payout_csv(data, LIMITS)
    except PayoutFileError as exc:
        return [], [], exc.problems
    return found.rows, found.lines, []


_ID = st.sampled_from(["bob", "r-1", "r-2", "r-3", " r-1 ", "a:b", "", " ", "x" * 201, "é"])
_AMOUNT = st.sampled_from(["1.00", "0.5", " 2 ", "0", "1.001", "10000.00", "10000.01", "-1",
                           "x", ""])
_LINE = st.one_of(
    st.tuples(_ID, _AMOUNT, _ID).map(list),
    st.lists(st.sampled_from(["bob", "1.00", "r-9", ""]), max_size=5),  # too few, too many
)


@settings(max_examples=300, deadline=None)
@given(order=st.permutations(["user", "amount", "reference"]),
       lines=st.lists(_LINE, min_size=1, max_size=12))
def test_the_file_reads_as_row_by_row_reading_does(order: list[str],
                                                    lines: list[list[str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(order)
    for fields in lines:
        if len(fields) == 3:  # the line's user, amount, reference, in the header's order
            by_name = dict(zip(["user", "amount", "reference"], fields, strict=True))
            fields = [by_name[name] for name in order]
        writer.writerow(fields)
    data = buffer.getvalue().encode()
    rows, found_lines, problems = row_by_row(data, LIMITS)
    if not problems and not rows:
        problems = ["empty file: a header and no rows"]
    expected = ([], [], problems) if problems else (rows, found_lines, [])
    assert read(data) == expected


@pytest.mark.parametrize(("body", "problem"), [
    ("bob,1.00,r-1\nann,x,r-2\n", "line 3: amount"),
    ("bob,1.00,r-1\nann,2.00,r-1\n", "line 3: reference 'r-1' repeats line 2"),
    ("bob,1.00,a:b\nann,2.00,a:b\n", "line 3: reference 'a:b' repeats line 2"),
])
def test_a_bad_row_after_sound_ones_is_named_by_its_line(body: str, problem: str) -> None:
    with pytest.raises(PayoutFileError) as refused:
        parse_payout_csv(("user,amount,reference\n" + body).encode(), LIMITS)
    assert any(p.startswith(problem) for p in refused.value.problems), refused.value.problems
