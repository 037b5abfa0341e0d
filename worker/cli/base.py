"""The `walletq` group and what every command shares: --json, output, errors, the database."""

from __future__ import annotations

import json
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

__all__ = ["cli", "main", "json_option", "Output", "pass_output", "ensure_schema"]

F = TypeVar("F", bound=Callable[..., Any])


class Output:
    """Prints JSON for scripts or rich tables for people, and owns the exit code."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.console = Console()
        self.err = Console(stderr=True)

    def json(self, obj: Any) -> None:
        click.echo(json.dumps(obj, default=_default, sort_keys=False))

    def table(self, title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]],
              *, right: Sequence[str] = ()) -> None:
        table = Table(title=title, show_lines=False)
        for name in columns:
            table.add_column(name, justify="right" if name in right else "left")
        for row in rows:
            # Text, not markup: a cell may hold stored text a producer (or an attacker) wrote.
            table.add_row(*[Text("" if v is None else str(v)) for v in row])
        self.console.print(table)

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def fail(self, message: str, code: int = 1, error_code: str = "invalid_command") -> None:
        if self.as_json:
            self.json({"error": {"code": error_code, "message": message}})
        else:
            self.err.print(f"[red]error:[/red] {message}", highlight=False)
        raise SystemExit(code)


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
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
