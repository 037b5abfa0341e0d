// The Node signer against walletq's test vector (make_test_vector.py, Python's cryptography
// and rfc8785): the same command and key must give the same bytes and the same signature.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import test from "node:test";
import { createPrivateKey } from "node:crypto";
import { privateKeyFromPem, signCommand, signingInput, verifyCommand } from "../lib/signing.js";
import { queueFor } from "../lib/queues.js";

const vector = JSON.parse(readFileSync(new URL("../test-vector.json", import.meta.url), "utf8"));

test("the signing input is the RFC 8785 text walletq signs", () => {
  assert.equal(signingInput(vector.command), vector.signing_input);
  assert.equal(signingInput({ ...vector.command, signature: "x" }), vector.signing_input);
});

test("the signature is the test vector's, 86 characters of base64url", () => {
  const key = privateKeyFromPem(vector.private_key_pem);
  const signed = signCommand(vector.command, "node-shop", key);
  assert.equal(signed.signature, vector.signature);
  assert.match(signed.signature, /^[A-Za-z0-9_-]{86}$/);
  assert.ok(verifyCommand(signed, vector.public_key_pem));
});

test("a changed amount no longer verifies", () => {
  const tampered = structuredClone({ ...vector.command, signature: vector.signature });
  tampered.items[0].amount = "1200.00";
  assert.ok(!verifyCommand(tampered, vector.public_key_pem));
});

test("key order and re-signing change nothing", () => {
  const key = privateKeyFromPem(vector.private_key_pem);
  const reversed = Object.fromEntries(Object.entries(vector.command).reverse());
  const resigned = signCommand({ ...reversed, signature: "old" }, "node-shop", key);
  assert.equal(resigned.signature, vector.signature);
});

test("a command naming another producer is not signed", () => {
  const key = privateKeyFromPem(vector.private_key_pem);
  assert.throws(() => signCommand(vector.command, "someone-else", key), /names producer/);
});

test("payout batches go to payouts, everything else to commands, under the prefix", () => {
  assert.equal(queueFor("payout_batch", "clients"), "clientspayouts");
  assert.equal(queueFor("credit_wallet", "clients"), "clientscommands");
  assert.equal(queueFor("credit_wallet"), "commands");
});

test("the README's short vector (seed 00 01 ... 1f) holds too", () => {
  const seed = Buffer.from(Array.from({ length: 32 }, (_, i) => i));
  // PKCS#8 for Ed25519 is a fixed 16-byte prefix and the 32-byte seed (RFC 8410).
  const der = Buffer.concat([Buffer.from("302e020100300506032b657004220420", "hex"), seed]);
  const key = createPrivateKey({ key: der, format: "der", type: "pkcs8" });
  const command = { type: "credit_wallet", idempotency_key: "dep-81", user: "alice", amount: "10.00" };
  const signed = signCommand(command, "web-1", key);
  assert.equal(signingInput(signed),
    '{"amount":"10.00","idempotency_key":"dep-81","producer":"web-1","type":"credit_wallet","user":"alice"}');
  assert.equal(signed.signature,
    "wBc1nRZK3w9qu1aU1kzHLWw7qyDBctJHqUXogQhDkbRzX3IFh__k3yDMz9EC5OQDUDpt97J32vqPo3uf0OmHDg");
});
