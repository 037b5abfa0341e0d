"""Signing a command: what is signed (RFC 8785 of the object minus its signature), the one
spelling of a signature, key files, and the plain rules of permissions and key validity."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from services.commands import load_json
from services.permissions import EVERYTHING, OVERRIDE_FEE, allows, missing
from services.producers import ProducerKey
from services.signing import (
    Signer,
    SigningError,
    _fast_jcs,
    decode_signature,
    encode_signature,
    key_id,
    public_key_from_pem,
    public_key_from_text,
    public_key_pem,
    public_key_text,
    read_private_key,
    signed_form,
    signing_input,
    verifies,
    write_private_key,
)

# A test vector: the key whose 32-byte seed is 00 01 02 ... 1f. The expected signature was
# checked against OpenSSL (`openssl pkeyutl -sign -rawin` over VECTOR_SIGNED, base64url).
VECTOR_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
VECTOR_PUBLIC = "A6EHv_POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg"
VECTOR_COMMAND = {"type": "credit_wallet", "idempotency_key": "dep-81", "user": "alice",
                  "amount": "10.00", "producer": "web-1"}
VECTOR_SIGNED = ('{"amount":"10.00","idempotency_key":"dep-81","producer":"web-1",'
                 '"type":"credit_wallet","user":"alice"}')
VECTOR_SIGNATURE = ("wBc1nRZK3w9qu1aU1kzHLWw7qyDBctJHqUXogQhDkbRzX3IFh__k3yDMz9EC5OQDUDpt97J32vqPo3uf0OmHDg")


def test_the_test_vector_signs_to_the_signature_openssl_computed() -> None:
    obj, signed = Signer("web-1", VECTOR_KEY).sign(VECTOR_COMMAND)
    assert signed.text == VECTOR_SIGNED
    assert signed.signature == obj["signature"] == VECTOR_SIGNATURE
    assert len(signed.signature) == 86 and "=" not in signed.signature
    assert public_key_text(VECTOR_KEY.public_key()) == VECTOR_PUBLIC


def test_what_is_signed_is_the_jcs_of_the_object_without_its_signature() -> None:
    shuffled = dict(reversed(list(VECTOR_COMMAND.items())))
    assert signing_input({**shuffled, "signature": "x"}) == VECTOR_SIGNED.encode()
    assert signing_input({"b": "é", "a": [1, 2.5, None, True]}) == \
        '{"a":[1,2.5,null,true],"b":"é"}'.encode()


def test_a_command_loaded_strictly_from_text_signs_as_the_same_object_does() -> None:
    text = json.dumps({**VECTOR_COMMAND, "amount": 10.5, "memo": "x"})
    strict = load_json(text)  # numbers kept as text
    assert signing_input(strict) == signing_input(json.loads(text))


_FLAT_VALUES = st.one_of(st.text(), st.text(alphabet=st.characters(max_codepoint=127)),
                         st.booleans(), st.none(), st.integers(), st.floats(allow_nan=False))


@given(st.dictionaries(st.one_of(st.text(), st.text(alphabet=st.characters(max_codepoint=127))),
                       _FLAT_VALUES, max_size=8))
def test_the_flat_object_shortcut_signs_exactly_what_rfc_8785_gives(body: dict[str, object]) -> None:
    # Flat ASCII objects skip the pure-Python canonicaliser; the bytes must not change.
    body.pop("signature", None)
    try:
        expected = rfc8785.dumps(body)
    except rfc8785.CanonicalizationError:
        with pytest.raises(SigningError):
            signing_input(body)
        return
    assert signing_input(body) == expected


def test_ascii_control_characters_sign_as_rfc_8785_escapes_them() -> None:
    text = "".join(chr(c) for c in range(128))
    assert signing_input({"memo": text, "z": None, "a": False}) == \
        rfc8785.dumps({"memo": text, "z": None, "a": False})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2**60, object()])
def test_an_object_without_a_canonical_form_cannot_be_signed(value: object) -> None:
    with pytest.raises(SigningError, match="canonical"):
        signing_input({**VECTOR_COMMAND, "amount": value})


def test_a_signature_verifies_over_what_was_signed_only() -> None:
    obj, signed = Signer("web-1", VECTOR_KEY).sign(VECTOR_COMMAND)
    public = VECTOR_KEY.public_key()
    signature = decode_signature(signed.signature)
    assert verifies(public, signing_input(obj), signature)
    assert not verifies(public, signing_input({**obj, "amount": "1000.00"}), signature)
    assert not verifies(Ed25519PrivateKey.generate().public_key(), signing_input(obj), signature)


def test_a_signature_has_one_spelling() -> None:
    raw = decode_signature(VECTOR_SIGNATURE)
    assert encode_signature(raw) == VECTOR_SIGNATURE
    # The last character carries 2 bits and 4 spare ones: "g" and "h" decode alike.
    assert VECTOR_SIGNATURE[-1] == "g"
    with pytest.raises(SigningError, match="canonical"):
        decode_signature(VECTOR_SIGNATURE[:-1] + "h")
    for bad in (VECTOR_SIGNATURE + "==", VECTOR_SIGNATURE[:-1], "+" * 86, None, 5):
        with pytest.raises(SigningError):
            decode_signature(bad)


def test_the_signed_form_needs_a_producer_and_a_signature_of_the_right_shape() -> None:
    obj, signed = Signer("web-1", VECTOR_KEY).sign(VECTOR_COMMAND)
    assert signed_form(obj) == signed
    assert signed.message() == obj
    with pytest.raises(SigningError, match="producer"):
        signed_form({**obj, "producer": "a:b"})
    with pytest.raises(SigningError, match="86"):
        signed_form({**obj, "signature": "short"})


def test_a_signer_fills_its_producer_and_refuses_a_command_naming_another() -> None:
    bare = {k: v for k, v in VECTOR_COMMAND.items() if k != "producer"}
    obj, signed = Signer("web-1", VECTOR_KEY).sign(bare)
    assert obj["producer"] == "web-1" and signed.signature == VECTOR_SIGNATURE
    with pytest.raises(SigningError, match="names producer 'web-2'"):
        Signer("web-1", VECTOR_KEY).sign({**bare, "producer": "web-2"})


def test_a_private_key_file_is_written_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "web-1.key"
    write_private_key(path, VECTOR_KEY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8
    with pytest.raises(SigningError, match="never overwritten"):
        write_private_key(path, Ed25519PrivateKey.generate())
    assert public_key_text(read_private_key(path).public_key()) == VECTOR_PUBLIC


def test_a_key_file_that_is_not_an_unencrypted_ed25519_key_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "ec.key"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(SigningError, match="not an Ed25519 key"):
        read_private_key(other)
    locked = tmp_path / "locked.key"
    locked.write_bytes(VECTOR_KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(SigningError, match="unencrypted"):
        read_private_key(locked)
    with pytest.raises(SigningError, match="cannot read"):
        read_private_key(tmp_path / "missing.key")


def test_a_public_key_comes_from_pem_spki_and_is_stored_as_43_characters() -> None:
    pem = public_key_pem(VECTOR_KEY.public_key())
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    text = public_key_text(public_key_from_pem(pem))
    assert text == VECTOR_PUBLIC and len(text) == 43
    assert public_key_text(public_key_from_text(text)) == text
    assert len(key_id(text)) == 16
    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(SigningError, match="Ed25519"):
        public_key_from_pem(ec_pem)
    with pytest.raises(SigningError, match="PEM"):
        public_key_from_pem(b"not a key")


# --- permissions and key validity: plain rules ------------------------------------------


def test_a_role_allows_its_types_and_everything_allows_all() -> None:
    assert allows({"credit_wallet"}, "credit_wallet")
    assert not allows({"credit_wallet"}, "admin_create_tokens")
    assert allows({EVERYTHING}, "a_type_registered_next_year")
    assert missing({"release_from_escrow"}, ["release_from_escrow", OVERRIDE_FEE]) == [OVERRIDE_FEE]
    assert missing({EVERYTHING}, ["release_from_escrow", OVERRIDE_FEE]) == []


def test_a_key_is_valid_from_its_start_until_its_end_or_its_revocation() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    hour = timedelta(hours=1)

    def key(until: datetime | None = None, revoked: datetime | None = None) -> ProducerKey:
        public = VECTOR_KEY.public_key()
        return ProducerKey("k", public_key_text(public), public, start, until, revoked)

    assert key().valid_at(start) and key().valid_at(start + 1000 * hour)
    assert not key().valid_at(start - hour)
    assert key(until=start + hour).valid_at(start + hour / 2)
    assert not key(until=start + hour).valid_at(start + hour)
    assert key(revoked=start + hour).valid_at(start + hour / 2)  # accepted before it
    assert not key(until=start + 2 * hour, revoked=start + hour).valid_at(start + hour)


_JSON_LEAVES = (st.none() | st.booleans() | st.integers(-(2**60), 2**60)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
                | st.sampled_from(["\x00", "\x1f", "\u2028", "\ue000", "\U0001f600", '"\\',
                                   "\b\f\n\r\t", "\x7f"]))
_JSON_VALUES = st.recursive(_JSON_LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=4) | st.sampled_from(["\ue000", "\U0001f600", "a"]), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=6), _JSON_VALUES, max_size=5))
def test_the_fast_canonical_form_is_rfc8785_byte_for_byte(body: dict[str, object]) -> None:
    """The json-module path is taken only where it writes what rfc8785 writes."""
    try:
        expected: bytes | None = rfc8785.dumps(body)
    except (rfc8785.CanonicalizationError, UnicodeError):
        expected = None
    fast = _fast_jcs(body)
    assert fast is None or fast == expected


def test_a_payout_batch_takes_the_fast_canonical_form() -> None:
    body = {"type": "payout_batch", "idempotency_key": "p-1", "producer": "web-1",
            "atomic": False, "items": [{"user": f"u{i}", "amount": "1.50", "reference": f"r{i}"}
                                       for i in range(100)]}
    assert _fast_jcs(body) == rfc8785.dumps(body)
    assert _fast_jcs({**body, "memo": "é"}) is None and _fast_jcs({**body, "n": 2**60}) is None
    assert _fast_jcs({**body, "x": 1.5}) is None and _fast_jcs({1: "a"}) is None  # type: ignore[dict-item]
