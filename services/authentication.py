"""Who sent a command: its producer's keys, kept a few seconds per process, and the check of
its signature.

One signature verification per command on the common path: the producer's keys are tried
newest first (a producer signs with its newest key). A producer's role, permissions and
keys are cached per process for `WALLETQ_PRODUCER_CACHE_S` (default 5 s): a revocation or
rotation takes effect in every worker within that time, and at once in the process that
made it. A signature no cached key verifies is tried once more against a fresh read before
it is refused, so a key added a moment ago is never refused for the cache's sake.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from services import producers
from services.errors import UnauthenticatedError
from services.producers import Producer, ProducerKey
from services.signing import Signed, SigningError, decode_signature, verifies

__all__ = ["ProducerDirectory", "DIRECTORY", "authenticate", "Principal"]

#: Producers remembered per process; beyond this the cache starts afresh (names the
#: database does not know are never cached, so a flood of them costs reads, not memory).
_ENTRIES_MAX = 1_000


class ProducerDirectory:
    """Producers by database and name, each remembered for a bounded time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], tuple[float, Producer]] = {}

    def get(self, engine: Engine, name: str, ttl_s: float, *, fresh: bool = False
            ) -> Producer | None:
        return self.lookup(engine, name, ttl_s, fresh=fresh)[0]

    def lookup(self, engine: Engine, name: str, ttl_s: float, *, fresh: bool = False
               ) -> tuple[Producer | None, bool]:
        """(the producer or None, whether it came from the cache rather than the database)."""
        cache_key = (engine.url.render_as_string(hide_password=True), name)
        now = self._clock()
        if not fresh and ttl_s > 0:
            with self._lock:
                entry = self._entries.get(cache_key)
            if entry is not None and entry[0] > now:
                return entry[1], True
        with engine.connect() as conn:
            found = producers.load(conn, name)
        with self._lock:
            if found is None:
                self._entries.pop(cache_key, None)
            elif ttl_s > 0:
                if len(self._entries) >= _ENTRIES_MAX:
                    self._entries.clear()
                self._entries[cache_key] = (now + ttl_s, found)
        return found, False

    def forget(self, name: str | None = None) -> None:
        """Drop what is remembered (of one producer, or of all): its next read is fresh."""
        with self._lock:
            if name is None:
                self._entries.clear()
            else:
                for cache_key in [k for k in self._entries if k[1] == name]:
                    del self._entries[cache_key]


#: The process's directory (a forked worker starts with its parent's copy; entries expire).
DIRECTORY = ProducerDirectory()


@dataclass(frozen=True)
class Principal:
    """An authenticated producer and the key its signature verified with."""

    producer: Producer
    key: ProducerKey


def _verifying_key(producer: Producer, data: bytes, signature: bytes) -> ProducerKey | None:
    for key in producer.keys:
        if key.revoked_at is None and verifies(key.public_key, data, signature):
            return key
    return None


def _own_key(producer: Producer, public_text: str) -> ProducerKey | None:
    """The producer's unrevoked key with this public half: what signed, in this process."""
    return next((key for key in producer.keys
                 if key.revoked_at is None and key.public_text == public_text), None)


def authenticate(signed: Signed, *, engine: Engine, ttl_s: float,
                 directory: ProducerDirectory = DIRECTORY, signer_public: str | None = None
                 ) -> Principal:
    """The producer whose key verifies this signature; UnauthenticatedError otherwise.

    Checks the producer is active and the key not revoked; when the key was valid is the
    caller's question (it depends on when the command was accepted). `signer_public`: the
    caller signed this very text a moment ago with that key (an edge signing as its
    producer): the key must be one of the producer's, and no verification is needed.
    """
    try:
        signature = decode_signature(signed.signature)
    except SigningError as exc:
        raise UnauthenticatedError(str(exc)) from None
    data = signed.text.encode("utf-8")

    def find(found: Producer | None) -> ProducerKey | None:
        if found is None:
            return None
        if signer_public is not None:
            return _own_key(found, signer_public)
        return _verifying_key(found, data, signature)

    producer, cached = directory.lookup(engine, signed.producer, ttl_s)
    key = find(producer)
    if cached and (key is None or producer is None or not producer.active):
        producer, _ = directory.lookup(engine, signed.producer, ttl_s, fresh=True)
        key = find(producer)
    if producer is None:
        raise UnauthenticatedError(f"unknown producer {signed.producer!r}",
                                   producer=signed.producer)
    if not producer.active:
        raise UnauthenticatedError(f"producer {signed.producer!r} is revoked",
                                   producer=signed.producer)
    if key is None:
        raise UnauthenticatedError(
            f"the signature does not verify with any valid key of producer {signed.producer!r}",
            producer=signed.producer)
    return Principal(producer, key)
