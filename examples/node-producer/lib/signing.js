// The signing contract of walletq (README, "Producers in other languages"):
// Ed25519 over the RFC 8785 (JCS) canonical JSON of the command object exactly as sent,
// minus its `signature` member; the signature is base64url without padding (86 characters).
import { createPrivateKey, createPublicKey, sign, verify } from "node:crypto";
import canonicalize from "canonicalize";

export const SIGNATURE_PATTERN = /^[A-Za-z0-9_-]{86}$/;
export const PRODUCER_PATTERN = /^[A-Za-z0-9._-]{1,200}$/;

/** The exact text a producer signs: JCS of the command without its signature. */
export function signingInput(command) {
  const { signature: _ignored, ...body } = command;
  const text = canonicalize(body);
  if (typeof text !== "string") {
    throw new TypeError("a command must be a JSON object");
  }
  return text;
}

/** A private key object from PEM PKCS#8 text; refuses anything but Ed25519. */
export function privateKeyFromPem(pem) {
  const key = createPrivateKey({ key: pem, format: "pem" });
  if (key.asymmetricKeyType !== "ed25519") {
    throw new TypeError(`an Ed25519 key is needed, not ${key.asymmetricKeyType}`);
  }
  return key;
}

/** The command with `producer` set and its `signature`, ready to publish. */
export function signCommand(command, producer, privateKey) {
  if (!PRODUCER_PATTERN.test(producer)) {
    throw new TypeError("a producer name is 1-200 characters of A-Z a-z 0-9 . _ -");
  }
  if (command.producer !== undefined && command.producer !== producer) {
    throw new TypeError(`the command names producer ${command.producer}, not ${producer}`);
  }
  const { signature: _old, ...body } = command;
  const named = { ...body, producer };
  // Ed25519 hashes internally: the algorithm argument of crypto.sign is null.
  const signature = sign(null, Buffer.from(signingInput(named), "utf8"), privateKey);
  return { ...named, signature: signature.toString("base64url") };
}

/** Whether a signed command verifies under a PEM SPKI public key (what the worker checks). */
export function verifyCommand(command, publicKeyPem) {
  if (!SIGNATURE_PATTERN.test(command.signature ?? "")) {
    return false;
  }
  const key = createPublicKey({ key: publicKeyPem, format: "pem" });
  return verify(null, Buffer.from(signingInput(command), "utf8"), key,
    Buffer.from(command.signature, "base64url"));
}
