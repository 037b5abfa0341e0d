"""Server-side prepared statements for the statements every command runs (PostgreSQL).

A statement sent as text is parsed and planned by the server each time: for the ledger's
flush that is more than half its cost. The first time a connection meets one of these
statements it sends `PREPARE` with it (in the same round trip); from then on `EXECUTE`
with the parameters, planned once per connection. Statements are named by a digest of
their text, so two processes, or two versions of a statement, never share a name.

A prepared statement outlives a rollback, not its connection: the names a connection has
prepared are kept in the connection's own `info` and vanish with it. When a round trip
that prepared fails, what the server kept is unknown, so the next one deallocates
everything first. A pooler in transaction mode (pgbouncer) would hand a connection's
prepared statements to strangers: set WALLETQ_PREPARED_STATEMENTS=0 behind one.
Elsewhere (SQLite, another driver) statements run as they always did.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy.engine import Connection, CursorResult
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

__all__ = ["Template", "template", "prepared_text", "run_texts", "supported"]

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
_INFO_KEY = "walletq.prepared"
_DIRTY = "walletq.prepared.dirty"


@dataclass(frozen=True)
class Template:
    """A statement as PostgreSQL prepares it: its name, its text with $n placeholders, the
    parameters in $n order and the driver's conversion of each (JSON, say)."""

    name: str
    body: str
    names: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]
    compiled: SQLCompiler

    def arguments(self, params: dict[str, Any]) -> tuple[Any, ...]:
        """The parameters with the statement's own values filled in (a column's constant in
        an insert), converted as the driver would."""
        bound = self.compiled.construct_params(params) or {}
        return tuple(value if processor is None else processor(value)
                     for value, processor in zip((bound[name] for name in self.names),
                                                 self.processors, strict=True))


_templates: dict[int, tuple[ClauseElement, Template]] = {}


def supported(conn: Connection) -> bool:
    """PostgreSQL through psycopg2, unless the deployment turned prepared statements off."""
    return (conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg2"
            and conn.get_execution_options().get("walletq_prepared", True))


def template(conn: Connection, statement: ClauseElement) -> Template:
    """The statement compiled once (statements are module constants or cached builders:
    keyed by identity, kept with the statement so that its id cannot be reused)."""
    found = _templates.get(id(statement))
    if found is not None and found[0] is statement:
        return found[1]
    compiled = cast(SQLCompiler, statement.compile(dialect=conn.dialect))
    order: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in order:
            order.append(name)
        return f"${order.index(name) + 1}"

    body = _PLACEHOLDER.sub(number, str(compiled)).replace("%%", "%")
    processors: dict[str, Callable[[Any], Any]] = {}
    for name, processor in compiled._bind_processors.items():  # noqa: SLF001 - the driver's
        if not callable(processor):  # a tuple parameter: none of these statements has one
            raise TypeError(f"{name}: a tuple parameter cannot be prepared")
        processors[name] = processor
    made = Template("wq_" + hashlib.sha256(body.encode()).hexdigest()[:24], body, tuple(order),
                    tuple(processors.get(name) for name in order), compiled)
    _templates[id(statement)] = (statement, made)
    return made


def prepared_text(conn: Connection, statement: ClauseElement, params: dict[str, Any],
                  cursor: Any, encoding: str) -> str:
    """`EXECUTE` of the statement with its arguments bound by the driver, preceded by its
    `PREPARE` the first time this connection meets it."""
    made = template(conn, statement)
    names = _prepared_names(conn)
    arguments = made.arguments(params)
    marks = ", ".join(["%s"] * len(arguments))
    call = f"EXECUTE {made.name}({marks})" if arguments else f"EXECUTE {made.name}"
    text = cursor.mogrify(call, arguments).decode(encoding) if arguments else call
    if made.name in names:
        return text
    names.add(made.name)
    return f"PREPARE {made.name} AS {made.body};\n{text}"


def _prepared_names(conn: Connection) -> set[str]:
    info = conn.connection.info
    names: set[str] = info.setdefault(_INFO_KEY, set())
    return names


def run_texts(conn: Connection, texts: Sequence[str]) -> CursorResult[Any]:
    """Send the statements in one round trip; the last one's rows come back. A failure
    leaves the connection's prepared statements unknown: the next round trip starts by
    deallocating them all."""
    info = conn.connection.info
    if info.pop(_DIRTY, False):
        texts = ["DEALLOCATE ALL", *texts]
    try:
        return conn.execution_options(no_parameters=True).exec_driver_sql(";\n".join(texts))
    except BaseException:
        if any(text.startswith("PREPARE ") for text in texts):
            info[_DIRTY] = True
            info[_INFO_KEY] = set()
        raise
