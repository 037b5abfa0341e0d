"""The README's test vector (examples/node-producer/test-vector.json) holds for walletq's
own signing code, as it does for the Node example's: one contract, two implementations."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from services import signing

VECTOR = json.loads((Path(__file__).resolve().parents[2] / "examples" / "node-producer"
                     / "test-vector.json").read_text(encoding="utf-8"))


def test_the_vectors_signature_verifies_with_the_workers_code() -> None:
    sent = {**VECTOR["command"], "signature": VECTOR["signature"]}
    form = signing.signed_form(sent)
    assert form.text == VECTOR["signing_input"]
    public = signing.public_key_from_pem(VECTOR["public_key_pem"].encode())
    assert signing.verifies(public, form.text.encode(), signing.decode_signature(form.signature))


def test_walletqs_signer_produces_the_vectors_signature() -> None:
    key = serialization.load_pem_private_key(VECTOR["private_key_pem"].encode(), password=None)
    signer = signing.Signer("node-shop", key)  # type: ignore[arg-type]
    message, _ = signer.sign({k: v for k, v in VECTOR["command"].items() if k != "producer"})
    assert message["signature"] == VECTOR["signature"]


def test_the_vector_is_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert VECTOR["signature"] in readme
    assert VECTOR["private_key_pem"].splitlines()[1] in readme
