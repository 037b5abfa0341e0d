"""The producer an edge signs as: WALLETQ_PRODUCER with its key file, or, embedded, its own.

The edges (WalletClient, WalletService, the CLI) sign the commands that reach them without
a signature. With WALLETQ_PRODUCER set they sign as that producer with the key in
WALLETQ_PRODUCER_KEY_FILE. With no producer set, an embedded deployment (no
WALLETQ_DATABASE_URL) creates on first use a producer `local-admin` (role admin) and its
key under WALLETQ_HOME/producers (0600), so the zero-setup path stays zero-setup and is
signed too. A server deployment with no producer set signs nothing: an unsigned command is
refused as unauthenticated, naming what to set.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from sqlalchemy.engine import Connection, Engine

from services import producers
from services.errors import ProducerError, UnauthenticatedError
from services.permissions import ADMIN, SYSTEM
from services.settings import Settings, SettingsError
from services.signing import (
    Signer,
    SigningError,
    new_private_key,
    public_key_text,
    read_private_key,
    write_private_key,
)
from services.unit_of_work import run_transaction

__all__ = ["signer_for", "local_admin_key_file", "system_signer_for"]

log = logging.getLogger("walletq.producers")

_lock = threading.Lock()


def local_admin_key_file(settings: Settings) -> Path:
    return settings.home / "producers" / f"{producers.LOCAL_ADMIN}.key"


def _local_admin(engine: Engine, settings: Settings) -> Signer:
    """The embedded deployment's own admin producer and key, made on first use."""
    return _made_here(engine, settings, producers.LOCAL_ADMIN, ADMIN, local_admin_key_file(settings))


def _made_here(engine: Engine, settings: Settings, name: str, role: str, path: Path) -> Signer:
    """A producer of this home and its key file, made (or given a new key) on first use."""
    with _lock:
        if not path.exists():
            try:
                write_private_key(path, new_private_key())
            except SigningError:
                pass  # another process wrote it a moment ago: read theirs
        key = read_private_key(path)
        public = key.public_key()

        def register(conn: Connection) -> None:
            found = producers.load(conn, name)
            if found is None:
                producers.create(conn, name, role, public)
            elif public_key_text(public) not in {k.public_text for k in found.keys}:
                # The key file was replaced (or the database): its owner is this home.
                producers.add_key(conn, name, public)

        try:
            run_transaction(engine, settings, f"{name} producer", register)
        except ProducerError as exc:
            raise UnauthenticatedError(f"embedded producer {name!r}: {exc.message}") from None
    return Signer(name, key)


def system_signer_for(settings: Settings, engine: Engine) -> Signer | None:
    """The producer the expiry pass signs `expire_hold` as (role `system`): its key file
    (WALLETQ_SYSTEM_PRODUCER_KEY_FILE) when it exists; embedded, `walletq-system` made on
    first use; None on a server with no key file (`walletq producer create NAME --role
    system` makes one)."""
    name, path = settings.system_producer, settings.system_producer_key_file
    assert name is not None and path is not None
    if settings.embedded:
        return _made_here(engine, settings, name, SYSTEM, path)
    if not path.exists():
        return None
    try:
        return Signer(name, read_private_key(path))
    except SigningError as exc:
        raise SettingsError(f"WALLETQ_SYSTEM_PRODUCER={name}: {exc}") from None


def signer_for(settings: Settings, engine: Engine) -> Signer | None:
    """The producer this process signs as (see the module's docstring); None: none."""
    if settings.producer is not None:
        assert settings.producer_key_file is not None
        try:
            return Signer(settings.producer, read_private_key(settings.producer_key_file))
        except SigningError as exc:
            raise SettingsError(f"WALLETQ_PRODUCER={settings.producer}: {exc} (set "
                                "WALLETQ_PRODUCER_KEY_FILE to the key `walletq producer "
                                "create` wrote)") from None
    if settings.embedded:
        return _local_admin(engine, settings)
    return None
