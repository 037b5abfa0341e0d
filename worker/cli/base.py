"""The `walletq` group and what every command shares: --json, output, errors, the database."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from functools import wraps
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from services.db import get_engine, schema_is_current, upgrade
from services.errors import FinancialIntegrityError
from services.settings import Settings, SettingsError

__all__ = ["cli", "main", "json_option", "Output", "pass_output", "ensure_schema", "visible"]

F = TypeVar("F", bound=Callable[..., Any])


#: C0 and C1 control characters (ESC starts a terminal's escape sequences), DEL, and the
#: bidirectional overrides that reorder what a terminal shows (U+202A-U+202E, U+2066-U+2069).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL_OR_BREAK = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _visible(char: re.Match[str]) -> str:
    code = ord(char.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str, *, lines: bool = False) -> str:
    """Stored text as a terminal must show it: every control character as its escape
    (`\\x1b`), never obeyed; with `lines`, newlines and tabs are kept."""
    return (_CONTROL if lines else _CONTROL_OR_BREAK).sub(_visible, text)


class Output:
    """Prints JSON for scripts or rich tables for people, and owns the exit code.

    Nothing printed is read as markup, emoji codes or highlighting: a record's text may be
    what a producer (or an attacker) wrote ("[/x]" once crashed `walletq status`, and
    "[link=...]" made a link in an operator's terminal). Styles come only from `style=`.
    """

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.console = Console(markup=False, emoji=False, highlight=False)
        self.err = Console(stderr=True, markup=False, emoji=False, highlight=False)

    def json(self, obj: Any) -> None:
        click.echo(self.dumps(obj))

    @staticmethod
    def dumps(obj: Any) -> str:
        """One JSON line, as `json` prints it."""
        return json.dumps(obj, default=_default, sort_keys=False)

    def json_lines(self, lines: Sequence[str]) -> None:
        """Lines from `dumps`, in one write and one flush (not one per line)."""
        click.echo("\n".join(lines))

    def table(self, title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]],
              *, right: Sequence[str] = ()) -> None:
        table = Table(title=None if title is None else Text(visible(title)), show_lines=False)
        for name in columns:
            table.add_column(Text(name), justify="right" if name in right else "left")
        for row in rows:
            # Text, not markup: a cell may hold stored text a producer (or an attacker) wrote.
            table.add_row(*[Text(visible(_cell(v))) for v in row])
        self.console.print(table)

    def say(self, text: str, style: str | None = None) -> None:
        self.console.print(Text(visible(text, lines=True), style=style or ""))

    def warn(self, text: str) -> None:
        self.err.print(Text(visible(text, lines=True)))

    def fail(self, message: str, code: int = 1, error_code: str = "invalid_command") -> None:
        if self.as_json:
            self.json({"error": {"code": error_code, "message": message}})
        else:
            self.err.print(Text.assemble(("error: ", "red"), visible(message, lines=True)))
        raise SystemExit(code)


def _cell(value: Any) -> str:
    """A table cell's text; an amount always fixed-point (str() of a Decimal at scale 8
    writes '6E-8')."""
    if value is None:
        return ""
    return format(value, "f") if isinstance(value, Decimal) else str(value)


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")  # never an exponent ('1E-8' at scale 8)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def json_option(func: F) -> F:
    """`--json` on every command too, so it is accepted before or after the command's name."""

    def remember(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        if value:
            ctx.ensure_object(dict)["json"] = True
        return value

    return click.option("--json", "as_json", is_flag=True, expose_value=False,
                        callback=remember, is_eager=True,
                        help="print JSON instead of tables")(func)


def pass_output(func: F) -> F:
    """Hand the command an Output, and turn walletq's typed errors into clear exits."""

    @click.pass_context
    @wraps(func)
    def wrapper(ctx: click.Context, *args: Any, **kwargs: Any) -> Any:
        out = Output(bool(ctx.find_root().ensure_object(dict).get("json")))
        try:
            return func(out, *args, **kwargs)
        except FinancialIntegrityError as exc:
            out.fail(exc.message, 1, exc.code)
        except SettingsError as exc:
            out.fail(str(exc), 2, "invalid_settings")

    return wrapper  # type: ignore[return-value]


def ensure_schema(settings: Settings) -> None:
    """Embedded mode creates its schema on first use; a server database must be upgraded."""
    if schema_is_current(get_engine(settings)):
        return
    if settings.embedded:
        upgrade(settings)
        return
    raise click.ClickException(
        f"the database at {settings.database_url.split('@')[-1]} has no walletq schema: "
        "run `walletq db upgrade`"
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
@click.pass_context
def cli(ctx: click.Context, as_json: bool) -> None:
    """walletq: idempotent financial commands, applied once each, on a double-entry ledger."""
    ctx.ensure_object(dict)
    if as_json:
        ctx.obj["json"] = True


def main(argv: Sequence[str] | None = None) -> None:
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="walletq")
    except SettingsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
