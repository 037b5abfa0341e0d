"""Many rows in one statement, on PostgreSQL and SQLite alike; several statements in one
round trip on PostgreSQL.

On PostgreSQL a bulk insert is one statement of unnested arrays whose text does not
depend on the number of rows, so it is compiled once and sent in one round trip; each
array travels as one literal string parsed by the server (`pg_array`). SQLite gets an
executemany. `execute_together` sends statements built by their tables' owners in one
round trip (psycopg2 runs several statements in one execute): the end of a transaction
writes balances, transfers, outcomes and audit rows at the price of one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Boolean, Integer, Table, insert, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, CursorResult
from sqlalchemy.sql.elements import TextClause

from services import prepared

__all__ = ["pg_array", "insert_rows", "insert_ignoring_conflicts", "Pending", "Deferred",
           "execute_together", "execute_reusable"]


def pg_array(values: Sequence[Any]) -> str:
    """A PostgreSQL array literal ('{...}'), sent as one string and parsed by array_in.

    A list parameter reaches the server as ARRAY[v1, v2, ...]: one expression node per
    element to parse and plan, ~15 ms per column of 5,000 values; this costs a fraction."""
    if not values:
        return "{}"
    first = values[0]
    if isinstance(first, str):
        try:
            joined = '","'.join(values)  # the common case: no NULL, nothing to escape
        except TypeError:
            joined = None
        if joined is not None and "\\" not in joined and '"' not in joined:
            return '{"' + joined + '"}'
    elif type(first) is int and None not in values:
        return "{" + ",".join(map(str, values)) + "}"
    first = next((v for v in values if v is not None), None)
    if isinstance(first, bool):
        return "{" + ",".join("NULL" if v is None else ("t" if v else "f") for v in values) + "}"
    if isinstance(first, int):
        return "{" + ",".join("NULL" if v is None else str(int(v)) for v in values) + "}"
    return "{" + ",".join(
        "NULL" if v is None else '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
        for v in values) + "}"


@functools.lru_cache(maxsize=16)
def _unnest_insert(table: Table, names: tuple[str, ...]) -> TextClause:
    def array_type(name: str) -> str:
        type_ = table.c[name].type
        for kind, sql in ((BigInteger, "BIGINT"), (Integer, "INTEGER"), (Boolean, "BOOLEAN")):
            if isinstance(type_, kind):
                return f"{sql}[]"
        return "TEXT[]"

    arrays = ", ".join(f"CAST(:{name} AS {array_type(name)})" for name in names)
    return text(f"INSERT INTO {table.name} ({', '.join(names)}) SELECT * FROM unnest({arrays})")


def insert_rows(conn: Connection, table: Table, columns: dict[str, list[Any]]) -> None:
    """Insert the rows given column by column (every list of one length), in one statement."""
    if not next(iter(columns.values())):
        return
    if conn.dialect.name == "postgresql":
        conn.execute(_unnest_insert(table, tuple(columns)),
                     {name: pg_array(values) for name, values in columns.items()})
        return
    rows = [dict(zip(columns, values, strict=True))
            for values in zip(*columns.values(), strict=True)]
    conn.execute(insert(table), rows)


def insert_ignoring_conflicts(
    conn: Connection, table: Any, rows: Sequence[dict[str, Any]], index_elements: list[str]
) -> int:
    """INSERT ... ON CONFLICT DO NOTHING, on PostgreSQL and SQLite alike; rows inserted."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(table).on_conflict_do_nothing(index_elements=index_elements)
    if len(rows) == 1:
        return conn.execute(stmt.values(**rows[0])).rowcount
    return conn.execute(stmt, list(rows)).rowcount


@dataclass(frozen=True)
class Pending:
    """A statement and its parameters, built by its table's owner, not yet sent.
    `reusable`: the statement is a constant, prepared once per connection
    (services.prepared)."""

    statement: Any
    params: dict[str, Any]
    reusable: bool = False


@dataclass(frozen=True)
class Deferred:
    """A write whose parameters are known only when it is sent: rows a transaction changes
    several times are written once, as they end up (`build`; None: nothing to write)."""

    build: Callable[[], Pending | None]


def execute_together(conn: Connection, pending: Sequence[Pending]) -> CursorResult[Any] | None:
    """Run the statements in order in one round trip (psycopg2), each with its parameters
    bound by the driver as always; the last one's rows come back. Elsewhere, one by one."""
    if not pending:
        return None
    if conn.dialect.name != "postgresql" or conn.dialect.driver != "psycopg2" or (
            len(pending) == 1 and not (pending[0].reusable and prepared.supported(conn))):
        result = None
        for item in pending:
            result = conn.execute(item.statement, item.params)
        return result
    from psycopg2.extensions import encodings

    raw = conn.connection.driver_connection
    encoding = encodings[raw.encoding]  # type: ignore[union-attr]
    prepare = prepared.supported(conn)
    cursor = raw.cursor()  # type: ignore[union-attr]
    try:
        texts = []
        for item in pending:
            if item.reusable and prepare:
                texts.append(prepared.prepared_text(conn, item.statement, item.params, cursor,
                                                    encoding))
                continue
            compiled = item.statement.compile(dialect=conn.dialect)
            texts.append(cursor.mogrify(str(compiled), compiled.construct_params(item.params))
                         .decode(encoding))
    finally:
        cursor.close()
    return prepared.run_texts(conn, texts)


def execute_reusable(conn: Connection, statement: Any, params: dict[str, Any]
                     ) -> CursorResult[Any]:
    """One constant statement: prepared once per connection where that is supported."""
    result = execute_together(conn, [Pending(statement, params, reusable=True)])
    assert result is not None
    return result
