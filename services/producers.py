"""Producers: the tables `producers`, `producer_keys` and `producer_permissions`, and the
only module that writes them (roles and their permissions are read here too).

A producer is a named principal with one role, permissions of its own beyond the role's,
and Ed25519 public keys with validity times. Managing producers is an operator's action
(`walletq producer ...`, with the database owner's credentials); each change writes an
audit row in its own transaction. The worker only reads them, through
services.authentication's short-lived cache.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from services import schema
from services.audit import log_financial_operation
from services.command_store import aware
from services.command_types import GRANTABLE
from services.errors import ProducerError
from services.signing import PRODUCER_PATTERN, key_id, public_key_from_text, public_key_text

__all__ = ["ProducerKey", "Producer", "load", "list_producers", "create", "add_key", "rotate",
           "revoke", "role_permissions", "LOCAL_ADMIN"]

#: The producer an embedded deployment creates for itself (services.producer_identity).
LOCAL_ADMIN = "local-admin"

_p, _k, _pp = schema.producers, schema.producer_keys, schema.producer_permissions
_r, _rp = schema.roles, schema.role_permissions


def _aware(moment: datetime | None) -> datetime | None:
    return None if moment is None else aware(moment)


@dataclass(frozen=True)
class ProducerKey:
    key_id: str
    public_text: str
    public_key: Ed25519PublicKey
    valid_from: datetime
    valid_until: datetime | None
    revoked_at: datetime | None

    def valid_at(self, moment: datetime) -> bool:
        """Within its validity window at `moment`; a revocation ends the window when it
        happened (what verify asks: was this key good when the command was accepted?)."""
        ends = [end for end in (self.valid_until, self.revoked_at) if end is not None]
        return self.valid_from <= moment and all(moment < end for end in ends)

    def to_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "public_key": self.public_text,
                "valid_from": _iso(self.valid_from), "valid_until": _iso(self.valid_until),
                "revoked_at": _iso(self.revoked_at)}


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Producer:
    id: int
    name: str
    role: str
    status: str
    #: The role's permissions and the producer's own: what it may do.
    permissions: frozenset[str]
    #: The producer's own, granted with --allow.
    granted: frozenset[str]
    #: Newest first: a producer signs with its newest key, tried first.
    keys: tuple[ProducerKey, ...]
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.status == "active"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "status": self.status,
                "allow": sorted(self.granted), "created_at": _iso(self.created_at),
                "revoked_at": _iso(self.revoked_at), "keys": [k.to_dict() for k in self.keys]}


def role_permissions(conn: Connection) -> dict[str, frozenset[str]]:
    """Every role and its permissions, as the database holds them."""
    found: dict[str, set[str]] = {name: set() for name in conn.execute(select(_r.c.name)).scalars()}
    for role, permission in conn.execute(select(_rp.c.role, _rp.c.permission)):
        found.setdefault(role, set()).add(permission)
    return {role: frozenset(granted) for role, granted in found.items()}


def _keys(conn: Connection, producer_ids: Iterable[int]) -> dict[int, list[ProducerKey]]:
    ids = list(producer_ids)
    found: dict[int, list[ProducerKey]] = {pid: [] for pid in ids}
    if not ids:
        return found
    rows = conn.execute(select(_k).where(_k.c.producer_id.in_(ids)).order_by(_k.c.id.desc()))
    for row in rows:
        found[row.producer_id].append(ProducerKey(
            row.key_id, row.public_key, public_key_from_text(row.public_key),
            _aware(row.valid_from), _aware(row.valid_until), _aware(row.revoked_at)))  # type: ignore[arg-type]
    return found


def _granted(conn: Connection, producer_ids: Iterable[int]) -> dict[int, set[str]]:
    ids = list(producer_ids)
    found: dict[int, set[str]] = {pid: set() for pid in ids}
    if ids:
        for pid, permission in conn.execute(select(_pp.c.producer_id, _pp.c.permission)
                                            .where(_pp.c.producer_id.in_(ids))):
            found[pid].add(permission)
    return found


def _producers(conn: Connection, rows: list[Any]) -> list[Producer]:
    ids = [row.id for row in rows]
    keys, granted = _keys(conn, ids), _granted(conn, ids)
    by_role = role_permissions(conn) if rows else {}
    return [Producer(row.id, row.name, row.role, row.status,
                     by_role.get(row.role, frozenset()) | granted[row.id],
                     frozenset(granted[row.id]), tuple(keys[row.id]),
                     _aware(row.created_at), _aware(row.revoked_at))  # type: ignore[arg-type]
            for row in rows]


def load(conn: Connection, name: str) -> Producer | None:
    """The producer of this name, with its permissions and keys; None when there is none."""
    row = conn.execute(select(_p).where(_p.c.name == name)).one_or_none()
    return None if row is None else _producers(conn, [row])[0]


def list_producers(conn: Connection) -> list[Producer]:
    return _producers(conn, list(conn.execute(select(_p).order_by(_p.c.name))))


# --- management (an operator's transaction; each change leaves an audit row) ---------------


def _audit(conn: Connection, outcome: str, producer: str, **detail: Any) -> None:
    log_financial_operation(conn, command_id=None, idempotency_key=None, command_type="producer",
                            outcome=outcome, detail={"producer": producer, **detail})


def _check_new(conn: Connection, name: str, role: str, allow: Iterable[str]) -> list[str]:
    if not re.fullmatch(PRODUCER_PATTERN, name):
        raise ProducerError(f"a producer's name is 1-200 characters of A-Z a-z 0-9 . _ -, "
                            f"not {name[:60]!r}")
    roles = role_permissions(conn)
    if role not in roles:
        raise ProducerError(f"no role {role[:60]!r}; the roles are {', '.join(sorted(roles))}")
    granted = sorted(set(allow))
    unknown = [p for p in granted if p not in GRANTABLE]
    if unknown:
        raise ProducerError(f"cannot allow {', '.join(unknown)[:200]}: a permission is a command "
                            f"type or one of override_fee, payout_any_account")
    if conn.execute(select(_p.c.id).where(_p.c.name == name)).first() is not None:
        raise ProducerError(f"producer {name!r} exists already")
    return granted


def _insert_key(conn: Connection, producer_id: int, public_key: Ed25519PublicKey,
                now: datetime) -> str:
    text = public_key_text(public_key)
    if conn.execute(select(_k.c.id).where(_k.c.public_key == text)).first() is not None:
        raise ProducerError("this public key is registered already: a key belongs to one "
                            "producer, once")
    kid = key_id(text)
    conn.execute(insert(_k).values(producer_id=producer_id, key_id=kid, public_key=text,
                                   valid_from=now, created_at=now))
    return kid


def create(conn: Connection, name: str, role: str, public_key: Ed25519PublicKey, *,
           allow: Iterable[str] = (), now: datetime | None = None) -> Producer:
    """A new producer with one key, valid from now."""
    now = now or datetime.now(UTC)
    granted = _check_new(conn, name, role, allow)
    producer_id = conn.execute(insert(_p).values(name=name, role=role, status="active",
                                                 created_at=now).returning(_p.c.id)).scalar_one()
    if granted:
        conn.execute(insert(_pp), [{"producer_id": producer_id, "permission": p} for p in granted])
    kid = _insert_key(conn, producer_id, public_key, now)
    _audit(conn, "created", name, role=role, allow=granted, key_id=kid)
    found = load(conn, name)
    assert found is not None
    return found


def _active(conn: Connection, name: str) -> Producer:
    found = load(conn, name)
    if found is None:
        raise ProducerError(f"no producer {name[:200]!r}")
    if not found.active:
        raise ProducerError(f"producer {name!r} is revoked; create another")
    return found


def add_key(conn: Connection, name: str, public_key: Ed25519PublicKey, *,
            now: datetime | None = None) -> Producer:
    """One more key for an active producer, valid from now; its other keys stay valid."""
    now = now or datetime.now(UTC)
    producer = _active(conn, name)
    kid = _insert_key(conn, producer.id, public_key, now)
    _audit(conn, "key_added", name, key_id=kid)
    found = load(conn, name)
    assert found is not None
    return found


def rotate(conn: Connection, name: str, public_key: Ed25519PublicKey, *, grace_s: float = 0.0,
           now: datetime | None = None) -> Producer:
    """A new key from now; every older key stops verifying new commands `grace_s` from now.

    A command accepted while an old key was valid stays verifiable with it, by the worker
    (a republish, a redrive) and by `walletq verify`.
    """
    now = now or datetime.now(UTC)
    producer = _active(conn, name)
    ends = now + timedelta(seconds=grace_s)
    ended = [k.key_id for k in producer.keys
             if k.revoked_at is None and (k.valid_until is None or k.valid_until > ends)]
    if ended:
        conn.execute(update(_k).where(_k.c.key_id.in_(ended))
                     .values(valid_until=ends))
    kid = _insert_key(conn, producer.id, public_key, now)
    _audit(conn, "rotated", name, key_id=kid, ended=ended, valid_until=_iso(ends))
    found = load(conn, name)
    assert found is not None
    return found


def revoke(conn: Connection, name: str, *, now: datetime | None = None) -> Producer:
    """Revoke the producer and every key of it: no command of it runs any more, even one
    accepted before (revocation is for a key that may be in someone else's hands)."""
    now = now or datetime.now(UTC)
    producer = _active(conn, name)
    conn.execute(update(_p).where(_p.c.id == producer.id).values(status="revoked", revoked_at=now))
    conn.execute(update(_k).where(_k.c.producer_id == producer.id, _k.c.revoked_at.is_(None))
                 .values(revoked_at=now))
    _audit(conn, "revoked", name, keys=[k.key_id for k in producer.keys])
    found = load(conn, name)
    assert found is not None
    return found
