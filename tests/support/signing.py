"""Signing raw command objects in tests, as a producer would, with the session's test keys.

The session's producers (tests/conftest.py creates them in the migrated template, so every
test database has them): `test-admin` (role admin, what WALLETQ_PRODUCER names in
walletq_env), `test-web`, `test-payments`, `test-treasury`. Tests that hand a raw dict to
`execute_command`, `execute_message` or `send_task` sign it here first:

    execute_command(signed({"type": "credit_wallet", ...}), engine=engine, settings=settings)
    signed(command, "test-web")                 # as another producer
    signed(command, key=other_private_key)      # with a key the producer does not hold
    command, signature = prepared(raw)           # for command_store.claim / accept

With no producer named, `signed` signs as the test's own producer: WALLETQ_PRODUCER of the
environment (test-admin), or, embedded, the deployment's `local-admin` (made on first use).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.command_fields import CommandLimits
from services.commands import Command, parse_command
from services.db import get_engine
from services.permissions import ADMIN, PAYMENTS, TREASURY, WEB
from services.producer_identity import signer_for
from services.settings import get_settings
from services.signing import (
    Signed,
    Signer,
    new_private_key,
    read_private_key,
    signed_form,
    write_private_key,
)

__all__ = ["ADMIN_PRODUCER", "TEST_PRODUCERS", "KEYS", "make_keys", "signed", "signer",
           "key_file", "prepared"]

ADMIN_PRODUCER = "test-admin"
#: name → role of the producers every test database holds.
TEST_PRODUCERS = {ADMIN_PRODUCER: ADMIN, "test-web": WEB, "test-payments": PAYMENTS,
                  "test-treasury": TREASURY}
#: name → private key file, filled once per session by make_keys().
KEYS: dict[str, Path] = {}
_loaded: dict[Path, Ed25519PrivateKey] = {}


def make_keys(folder: Path) -> dict[str, Path]:
    """One key file (0600) per test producer, written once per session."""
    for name in TEST_PRODUCERS:
        path = folder / f"{name}.key"
        if not path.exists():
            write_private_key(path, new_private_key())
        KEYS[name] = path
    return KEYS


def key_file(producer: str = ADMIN_PRODUCER) -> Path:
    return KEYS[producer]


def _key(path: Path) -> Ed25519PrivateKey:
    if path not in _loaded:
        _loaded[path] = read_private_key(path)
    return _loaded[path]


def signer(producer: str | None = None, *, key: Ed25519PrivateKey | None = None,
           key_path: Path | None = None) -> Signer:
    """A Signer for a test producer (or any name, with the key given); with neither, the
    test environment's own producer."""
    if producer is None and key is None and key_path is None:
        settings = get_settings()
        own = signer_for(settings, get_engine(settings))
        assert own is not None, "the test environment has no producer"
        return own
    name = producer or ADMIN_PRODUCER
    return Signer(name, key or _key(key_path or KEYS[name]))


def signed(command: dict[str, Any], producer: str | None = None, *,
           key: Ed25519PrivateKey | None = None, key_path: Path | None = None) -> dict[str, Any]:
    """The command with `producer` and its `signature`, as that producer would send it."""
    body = {k: v for k, v in command.items() if k not in ("producer", "signature")}
    return signer(producer, key=key, key_path=key_path).sign(body)[0]


def prepared(command: dict[str, Any], producer: str | None = None,
             limits: CommandLimits | None = None) -> tuple[Command, Signed]:
    """The validated command and its signed form, as command_store.claim/accept take them."""
    obj = signed(command, producer)
    return parse_command(obj, limits or CommandLimits()), signed_form(obj)
