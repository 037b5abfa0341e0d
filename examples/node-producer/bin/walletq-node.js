#!/usr/bin/env node
// walletq-node submit '<json>' | status KEY [--wait SECONDS] [--refused]
// Prints one JSON object per line. Exit codes: 0 ok, 1 refused or not found, 2 bad usage,
// 3 timed out. Settings come from the environment (README, "Producers in other languages").
import { readFileSync } from "node:fs";
import { WalletqProducer } from "../lib/producer.js";

function withPasswordFile(url, fileVariable) {
  const file = process.env[fileVariable];
  if (!url || !file) {
    return url;
  }
  const parsed = new URL(url);
  parsed.password = readFileSync(file, "utf8").replace(/\r?\n$/, "");
  return parsed.toString();
}

function settings() {
  const missing = ["WALLETQ_BROKER_URL", "WALLETQ_PRODUCER", "WALLETQ_PRODUCER_KEY_FILE"]
    .filter((name) => !process.env[name]);
  if (missing.length) {
    throw new UsageError(`set ${missing.join(", ")}`);
  }
  const database = (process.env.WALLETQ_DATABASE_URL || "").replace(/^postgresql\+\w+:/, "postgresql:");
  return {
    brokerUrl: withPasswordFile(process.env.WALLETQ_BROKER_URL, "WALLETQ_BROKER_PASSWORD_FILE"),
    databaseUrl: withPasswordFile(database, "WALLETQ_DATABASE_PASSWORD_FILE"),
    queuePrefix: process.env.WALLETQ_QUEUE_PREFIX || "",
    producer: process.env.WALLETQ_PRODUCER,
    privateKeyPem: readFileSync(process.env.WALLETQ_PRODUCER_KEY_FILE, "utf8"),
  };
}

class UsageError extends Error {}

async function main(argv) {
  const [verb, subject, ...options] = argv;
  if (!["submit", "status"].includes(verb) || !subject) {
    throw new UsageError("usage: walletq-node submit '<json>' | status KEY [--wait SECONDS] [--refused]");
  }
  const producer = new WalletqProducer(settings());
  try {
    if (verb === "submit") {
      const signed = await producer.submit(JSON.parse(subject));
      console.log(JSON.stringify(signed));
      return 0;
    }
    const waitAt = options.indexOf("--wait");
    const found = waitAt >= 0
      ? await producer.wait(subject, { timeoutMs: Number(options[waitAt + 1]) * 1000,
        refused: options.includes("--refused") })
      : await producer.outcome(subject);
    console.log(JSON.stringify(found));
    if (found.timed_out) {
      return 3;
    }
    return found.status === null || found.status === "refused" ? 1 : 0;
  } finally {
    await producer.close();
  }
}

main(process.argv.slice(2)).then((code) => { process.exitCode = code; }, (error) => {
  console.error(`error: ${error.message}`);
  process.exitCode = error instanceof UsageError || error instanceof SyntaxError ? 2 : 1;
});
