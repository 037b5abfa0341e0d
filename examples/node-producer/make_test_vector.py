"""Writes test-vector.json: a command, a private key, and the signature walletq expects.

Run once (`python make_test_vector.py > test-vector.json`) with the `cryptography` and
`rfc8785` packages; Ed25519 is deterministic, so the signature never changes. The Node
producer's tests sign the same command with the same key and must produce the same
signature; walletq's tests verify it with the worker's own code.
"""

from __future__ import annotations

import base64
import hashlib
import json

import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# A key nobody uses: derived from a public phrase, so anyone can re-derive it.
SEED = hashlib.sha256(b"walletq signing test vector").digest()
COMMAND = {
    "type": "payout_batch",
    "idempotency_key": "payday-2026-11-29",
    "producer": "node-shop",
    "from_account": "platform:treasury",
    "items": [{"user": "bob", "amount": "12.00", "reference": "inv-881"},
              {"user": "carol", "amount": "7.50", "reference": "inv-882"}],
    "atomic": False,
    "memo": "Café ☕ \"November\"\npayday",
}


def main() -> None:
    key = Ed25519PrivateKey.from_private_bytes(SEED)
    signing_input = rfc8785.dumps(COMMAND)
    signature = base64.urlsafe_b64encode(key.sign(signing_input)).rstrip(b"=").decode()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    print(json.dumps({
        "command": COMMAND,
        "private_key_pem": private_pem,
        "public_key_pem": public_pem,
        "signing_input": signing_input.decode("utf-8"),
        "signature": signature,
    }, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
