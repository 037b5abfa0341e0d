"""`walletq producer ...`: who may send commands. An operator's commands: they write the
producer tables, so they need the database owner's credentials (WALLETQ_DATABASE_URL of the
owner role), and each change leaves an audit row.

    walletq producer create NAME --role ROLE [--allow T,...] [--key-out FILE] [--exist-ok]
    walletq producer add NAME --role ROLE --public-key FILE [--allow T,...]
    walletq producer list
    walletq producer revoke NAME
    walletq producer rotate NAME [--key-out FILE] [--grace SECONDS]
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import Connection

from services import producers
from services.authentication import DIRECTORY
from services.db import get_engine
from services.errors import ProducerError
from services.producers import Producer
from services.settings import Settings, get_settings
from services.signing import (
    SigningError,
    key_id,
    new_private_key,
    public_key_from_pem,
    public_key_text,
    read_private_key,
    write_private_key,
)
from services.unit_of_work import run_transaction
from worker.cli.base import Output, cli, ensure_schema, json_option, pass_output

__all__ = ["producer"]

T = TypeVar("T")


def _allowed(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _change(settings: Settings, label: str, body: Callable[[Connection], T]) -> T:
    ensure_schema(settings)
    result = run_transaction(get_engine(settings), settings, label, body)
    DIRECTORY.forget()  # this process sees the change at once; workers within their cache
    return result


def _default_key_file(settings: Settings, name: str, suffix: str = "") -> Path:
    return settings.home / "producers" / f"{name}{suffix}.key"


def _show(out: Output, found: Producer, extra: dict[str, Any] | None = None) -> None:
    data = {**found.to_dict(), **(extra or {})}
    if out.as_json:
        out.json(data)
        return
    keys = "; ".join(f"{_key_summary(k)} (from {k['valid_from']})" for k in data.pop("keys"))
    out.table(None, ["field", "value"], [*[[k, v] for k, v in data.items()], ["keys", keys]])


def _write_key(path: Path, key: Ed25519PrivateKey) -> None:
    try:
        write_private_key(path, key)
    except SigningError as exc:
        raise ProducerError(str(exc)) from None
    except OSError as exc:
        raise ProducerError(f"cannot write {path}: {exc.strerror or exc}") from None


@cli.group()
def producer() -> None:
    """Producers: who may send commands, with which role and keys (an operator's commands)."""


@producer.command("create")
@click.argument("name")
@click.option("--role", required=True, help="web, payments, treasury, admin, system (or a role as data)")
@click.option("--allow", "allow", default=None, metavar="TYPE,...",
              help="permissions beyond the role's: command types, override_fee, payout_any_account")
@click.option("--key-out", "key_out", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="where to write the private key (0600; default "
              "WALLETQ_HOME/producers/NAME.key); never overwritten")
@click.option("--exist-ok", "exist_ok", is_flag=True,
              help="a producer of that name and role whose valid key the key file holds is "
              "fine as it is (a deployment's one-shot job, run at every start)")
@json_option
@pass_output
def create(out: Output, name: str, role: str, allow: str | None, key_out: Path | None,
           exist_ok: bool) -> None:
    """Create a producer and its first key pair; the private key goes to a file only its owner reads."""
    settings = get_settings()
    path = key_out or _default_key_file(settings, name)
    if exist_ok:
        found = _existing(settings, name, role, path)
        if found is not None:
            _show(out, found, {"key_file": str(path), "created": False})
            return
    if exist_ok and path.exists():
        # A key kept from before, in a database made afresh: registered as it is.
        try:
            public = read_private_key(path).public_key()
        except SigningError as exc:
            raise ProducerError(str(exc)) from None
        found = _change(settings, f"create producer {name}", lambda conn: producers.create(
            conn, name, role, public, allow=_allowed(allow)))
        _show(out, found, {"key_file": str(path), "created": True})
        return
    key = new_private_key()
    _write_key(path, key)
    try:
        found = _change(settings, f"create producer {name}", lambda conn: producers.create(
            conn, name, role, key.public_key(), allow=_allowed(allow)))
    except BaseException:
        path.unlink(missing_ok=True)  # a key no producer holds is of no use to anyone
        raise
    _show(out, found, {"key_file": str(path), "created": True,
                       "env": {"WALLETQ_PRODUCER": name,
                               "WALLETQ_PRODUCER_KEY_FILE": str(path.resolve())}})


def _existing(settings: Settings, name: str, role: str, path: Path) -> Producer | None:
    """The producer when it exists with this role, active, and the file holds one of its
    keys valid now; None when there is no such producer. Anything between is an error
    the operator must settle: another role, a revoked producer, a file that is missing or
    holds no key of its."""
    ensure_schema(settings)
    with get_engine(settings).connect() as conn:
        found = producers.load(conn, name)
    if found is None:
        return None
    if found.role != role or not found.active:
        raise ProducerError(f"producer {name!r} exists as {found.status} {found.role!r}, "
                            f"not active {role!r}")
    try:
        public = public_key_text(read_private_key(path).public_key())
    except SigningError as exc:
        raise ProducerError(f"producer {name!r} exists but {path} holds no key of it ({exc}): "
                            f"walletq producer rotate {name} --key-out {path}") from None
    now = datetime.now(UTC)
    if not any(k.public_text == public and k.valid_at(now) for k in found.keys):
        raise ProducerError(f"producer {name!r} exists but the key in {path} is not one of its "
                            f"valid keys: walletq producer rotate {name} --key-out FILE")
    return found


@producer.command("add")
@click.argument("name")
@click.option("--role", required=True)
@click.option("--public-key", "public_key", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="the producer's Ed25519 public key, PEM SubjectPublicKeyInfo")
@click.option("--allow", "allow", default=None, metavar="TYPE,...")
@json_option
@pass_output
def add(out: Output, name: str, role: str, public_key: Path, allow: str | None) -> None:
    """Register a producer whose key pair was made elsewhere (its private key never comes here)."""
    settings = get_settings()
    try:
        public = public_key_from_pem(public_key.read_bytes())
    except SigningError as exc:
        raise ProducerError(f"{public_key}: {exc}") from None
    found = _change(settings, f"add producer {name}", lambda conn: producers.create(
        conn, name, role, public, allow=_allowed(allow)))
    _show(out, found)


@producer.command("list")
@json_option
@pass_output
def list_(out: Output) -> None:
    """Every producer: role, own permissions, status and keys with their validity."""
    settings = get_settings()
    ensure_schema(settings)
    with get_engine(settings).connect() as conn:
        found = producers.list_producers(conn)
    if out.as_json:
        for item in found:
            out.json(item.to_dict())
        return
    out.table("producers", ["name", "role", "allow", "status", "keys"],
              [[p.name, p.role, ",".join(sorted(p.granted)), p.status,
                ", ".join(_key_summary(k.to_dict()) for k in p.keys)] for p in found])


def _key_summary(key: dict[str, Any]) -> str:
    until = f" until {key['valid_until']}" if key["valid_until"] else ""
    return f"{key['key_id']}{until}{' revoked' if key['revoked_at'] else ''}"


@producer.command("revoke")
@click.argument("name")
@json_option
@pass_output
def revoke(out: Output, name: str) -> None:
    """Revoke a producer and all its keys: none of its commands runs any more."""
    settings = get_settings()
    found = _change(settings, f"revoke producer {name}",
                    lambda conn: producers.revoke(conn, name))
    _show(out, found, {"takes_effect_within_s": settings.producer_cache_s})


@producer.command("rotate")
@click.argument("name")
@click.option("--key-out", "key_out", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="where to write the new private key (0600; default "
              "WALLETQ_HOME/producers/NAME.KEYID.key)")
@click.option("--grace", "grace_s", type=click.FloatRange(0, 30 * 86400), default=0.0,
              show_default=True, metavar="SECONDS",
              help="how long the old keys still sign new commands (to redeploy the producer)")
@json_option
@pass_output
def rotate(out: Output, name: str, key_out: Path | None, grace_s: float) -> None:
    """A new key for a producer; its old keys stop signing new commands (after --grace).

    Commands accepted while an old key was valid stay verifiable with it."""
    settings = get_settings()
    key = new_private_key()
    path = key_out or _default_key_file(settings, name,
                                        "." + key_id(public_key_text(key.public_key()))[:8])
    _write_key(path, key)
    try:
        found = _change(settings, f"rotate producer {name}", lambda conn: producers.rotate(
            conn, name, key.public_key(), grace_s=grace_s))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    _show(out, found, {"key_file": str(path), "created": True,
                       "env": {"WALLETQ_PRODUCER": name,
                               "WALLETQ_PRODUCER_KEY_FILE": str(path.resolve())}})
