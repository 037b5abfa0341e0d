"""Signatures of commands: what is signed, how, and the key files that sign.

A producer signs a command with Ed25519 over the RFC 8785 (JCS) canonical JSON of the
command object exactly as sent, minus its `signature` member; the signature travels in
`signature`, base64url without padding (86 characters, the only encoding accepted). Keys:
a private key file is PEM PKCS#8, unencrypted, readable by its owner only (0600); a public
key is registered from PEM SubjectPublicKeyInfo and stored as its 32 raw bytes, base64url.
This module is pure: no database, no setting.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.command_fields import JsonNumber

__all__ = [
    "PRODUCER_PATTERN",
    "SIGNATURE_PATTERN",
    "SIGNATURE_CHARS",
    "SigningError",
    "Signed",
    "Signer",
    "signing_input",
    "signed_form",
    "encode_signature",
    "decode_signature",
    "verifies",
    "new_private_key",
    "public_key_text",
    "public_key_from_text",
    "public_key_from_pem",
    "public_key_pem",
    "key_id",
    "read_private_key",
    "write_private_key",
]

PRODUCER_PATTERN = r"^[A-Za-z0-9._-]{1,200}$"
SIGNATURE_CHARS = 86  # 64 bytes, base64url, no padding
SIGNATURE_PATTERN = r"^[A-Za-z0-9_-]{86}$"
_PUBLIC_KEY_CHARS = 43  # 32 bytes, base64url, no padding
_KEY_FILE_BYTES_MAX = 16_384


class SigningError(ValueError):
    """Raised when an object cannot be signed or verified as given, or a key cannot be read."""


def _plain(value: Any) -> Any:
    """JSON numbers kept as text by the strict loader become floats again, as JCS wants them."""
    if isinstance(value, JsonNumber):
        return float(value.text)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


_JCS_INT_MAX = 2**53 - 1  # RFC 8785 writes integers as IEEE doubles: beyond, no canonical form


def _json_agrees_with_jcs(value: Any) -> bool:
    """Whether the json module's sorted compact text of `value` is its RFC 8785 form, as
    far as types go: only dicts with str keys, lists, str, bool, None and safe integers
    (floats are spelled differently, other keys are coerced by json). The text must also be
    ASCII (keys then sort alike by code point and by UTF-16 unit; no lone surrogate).
    Walked once, without recursion; the payload's depth was bounded before it came here."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            for key, child in item.items():
                if type(key) is not str:
                    return False
                child_kind = type(child)
                if child_kind is str or child is None or child_kind is bool:
                    continue
                if child_kind is int:
                    if -_JCS_INT_MAX <= child <= _JCS_INT_MAX:
                        continue
                    return False
                stack.append(child)
        elif kind is list:
            stack.extend(item)
        elif kind is int:
            if not -_JCS_INT_MAX <= item <= _JCS_INT_MAX:
                return False
        elif not (kind is str or item is None or kind is bool):
            return False
    return True


def _fast_jcs(body: dict[str, Any]) -> bytes | None:
    """RFC 8785 through the json module's C encoder (escapes, separators and key order are
    the same for the values `_json_agrees_with_jcs` admits); None where they might differ.
    rfc8785 walks in Python: ~40 ms per 1,000 payout items, paid by signer and verifier."""
    if not _json_agrees_with_jcs(body):
        return None
    text = json.dumps(body, ensure_ascii=False, sort_keys=True, separators=(",", ":"),
                      allow_nan=False)
    return text.encode("ascii") if text.isascii() else None


def signing_input(obj: Mapping[str, Any]) -> bytes:
    """The bytes a producer signs: JCS of the object without its `signature` member."""
    body = {key: value for key, value in obj.items() if key != "signature"}
    fast = _fast_jcs(body)
    if fast is not None:
        return fast
    try:
        try:
            return rfc8785.dumps(body)
        except rfc8785.CanonicalizationError:
            # Loaded from JSON text by the strict loader: numbers kept as text. The walk is
            # paid only then, not for the decoded objects a broker hands over.
            return rfc8785.dumps(_plain(body))
    except (rfc8785.CanonicalizationError, TypeError, ValueError, UnicodeError,
            RecursionError) as exc:
        raise SigningError(f"the command has no RFC 8785 canonical form: {str(exc)[:200]}") from None


def encode_signature(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_signature(text: Any) -> bytes:
    """The 64 bytes of a signature in its one accepted spelling; SigningError otherwise."""
    if not isinstance(text, str) or not re.fullmatch(SIGNATURE_PATTERN, text):
        raise SigningError(f"a signature is {SIGNATURE_CHARS} characters of base64url "
                           "without padding")
    raw = base64.urlsafe_b64decode(text + "==")
    # Two spellings of one signature (the last character's spare bits) would be two
    # different stored texts for one signature: only the canonical one is accepted.
    if encode_signature(raw) != text:
        raise SigningError("the signature is not in canonical base64url")
    return raw


def verifies(public_key: Ed25519PublicKey, data: bytes, signature: bytes) -> bool:
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class Signed:
    """What a producer signed (the JCS text), its signature, and the producer it names."""

    producer: str
    text: str
    signature: str

    def message(self) -> dict[str, Any]:
        """The command object to publish: what was signed, plus its signature."""
        data: dict[str, Any] = json.loads(self.text)
        data["signature"] = self.signature
        return data


def signed_form(obj: Mapping[str, Any]) -> Signed:
    """The signed form of a command object that carries `producer` and `signature`."""
    producer, signature = obj.get("producer"), obj.get("signature")
    if not isinstance(producer, str) or not re.fullmatch(PRODUCER_PATTERN, producer):
        raise SigningError("`producer` must be 1-200 characters of A-Z a-z 0-9 . _ -")
    decode_signature(signature)
    text = signing_input(obj).decode("utf-8")
    return Signed(producer, text, str(signature))


@dataclass(frozen=True)
class Signer:
    """A producer's name and private key: signs command objects that carry no signature."""

    producer: str
    private_key: Ed25519PrivateKey

    def sign(self, obj: Mapping[str, Any]) -> tuple[dict[str, Any], Signed]:
        """The object with `producer` filled and its `signature`, and its signed form."""
        named = obj.get("producer", self.producer)
        if named != self.producer:
            raise SigningError(f"the command names producer {str(named)[:200]!r}; this process "
                               f"signs as {self.producer!r}")
        body = {key: value for key, value in obj.items() if key != "signature"}
        body["producer"] = self.producer
        data = signing_input(body)
        signature = encode_signature(self.private_key.sign(data))
        return {**body, "signature": signature}, Signed(self.producer, data.decode("utf-8"),
                                                         signature)


# --- keys -------------------------------------------------------------------------------


def new_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_text(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def public_key_from_text(text: str) -> Ed25519PublicKey:
    if len(text) != _PUBLIC_KEY_CHARS:
        raise SigningError(f"a stored public key is {_PUBLIC_KEY_CHARS} characters")
    try:
        return Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(text + "="))
    except (ValueError, binascii.Error) as exc:
        raise SigningError(f"not an Ed25519 public key: {exc}") from None


def key_id(public_text: str) -> str:
    """A short, stable name for a public key (16 hex digits of its SHA-256)."""
    return hashlib.sha256(public_text.encode("ascii")).hexdigest()[:16]


def public_key_from_pem(data: bytes) -> Ed25519PublicKey:
    """A PEM SubjectPublicKeyInfo holding an Ed25519 key; SigningError for anything else."""
    try:
        key = serialization.load_pem_public_key(data[:_KEY_FILE_BYTES_MAX])
    except (ValueError, TypeError) as exc:
        raise SigningError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"an Ed25519 public key is needed, not {type(key).__name__}")
    return key


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def read_private_key(path: Path) -> Ed25519PrivateKey:
    """An unencrypted PEM PKCS#8 Ed25519 private key file."""
    try:
        data = path.read_bytes()[:_KEY_FILE_BYTES_MAX]
    except OSError as exc:
        raise SigningError(f"cannot read the key file {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write the key as PEM PKCS#8, mode 0600, never over an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SigningError(f"{path} exists: a key file is never overwritten") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    os.chmod(path, 0o600)  # whatever the umask said
