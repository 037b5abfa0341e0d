// The Node signer against walletq's test vector (make_test_vector.py, Python's cryptography
// and rfc8785): the same command and key must give the same bytes and the same signature.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import test from "node:test";
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
