// A walletq producer: signs commands, publishes them with celery-node to the queue walletq's
// worker consumes, and reads outcomes back from PostgreSQL (walletq keeps no result backend).
import { randomUUID } from "node:crypto";
import celery from "celery-node";
import pg from "pg";
import { queueFor, TASK_NAME } from "./queues.js";
import { privateKeyFromPem, signCommand } from "./signing.js";

const TERMINAL = new Set(["succeeded", "rejected", "failed"]);
const POLL_MS = 200;

export class WalletqProducer {
  /**
   * brokerUrl: redis://[:password@]host:port/db; databaseUrl: postgresql://role[:password]@host/db
   * (the producer role: it may read commands, refusals and balances); queuePrefix: the
   * deployment's WALLETQ_QUEUE_PREFIX; producer and privateKeyPem: who signs.
   */
  constructor({ brokerUrl, databaseUrl, queuePrefix = "", producer, privateKeyPem }) {
    this.prefix = queuePrefix;
    this.producer = producer;
    this.key = privateKeyFromPem(privateKeyPem);
    // The client is used for its task message and its broker only: no result backend.
    this.celery = celery.createClient(brokerUrl, brokerUrl);
    this.pool = databaseUrl ? new pg.Pool({ connectionString: databaseUrl, max: 2 }) : null;
  }

  /** Sign and publish one command; resolves once Redis holds the message. */
  async submit(command) {
    const signed = signCommand(command, this.producer, this.key);
    const queue = queueFor(signed.type, this.prefix);
    const message = this.celery.createTaskMessage(randomUUID(), TASK_NAME, [signed], {});
    // celery-node's sendTask() does not hand back the publish: a failed LPUSH would go
    // unnoticed. The broker's publish() does, so a producer knows the message is queued.
    await this.celery.broker.isReady();
    await this.celery.broker.publish(message.body, "", queue, message.headers, message.properties);
    return signed;
  }

  /** What became of a key: this producer's command under it, and its refusals (newest first). */
  async outcome(key) {
    if (!this.pool) {
      throw new Error("no database URL: outcomes are read from walletq's database");
    }
    const commands = await this.pool.query(
      "SELECT status, result, error_code, error_message, created_at, completed_at FROM commands "
      + "WHERE idempotency_key = $1 AND producer = $2", [key, this.producer]);
    const refusals = await this.pool.query(
      "SELECT error_code, error_message, authenticated, command_type, created_at FROM refusals "
      + "WHERE idempotency_key = $1 AND producer = $2 ORDER BY id DESC LIMIT 20", [key, this.producer]);
    const row = commands.rows[0];
    return {
      idempotency_key: key,
      status: row ? row.status : (refusals.rows.length ? "refused" : null),
      result: row ? row.result : null,
      error: row && row.error_code ? { code: row.error_code, message: row.error_message } : null,
      refusals: refusals.rows.map((r) => ({
        error: { code: r.error_code, message: r.error_message },
        authenticated: r.authenticated, type: r.command_type, at: r.created_at.toISOString(),
      })),
    };
  }

  /** Poll until the command is terminal (or, with refused, until a refusal exists). */
  async wait(key, { timeoutMs = 10_000, refused = false } = {}) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = await this.outcome(key);
      const done = refused ? found.refusals.length > 0
        : TERMINAL.has(found.status) || found.status === "refused";
      if (done || Date.now() >= deadline) {
        return { ...found, timed_out: !done };
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  }

  async close() {
    await this.celery.broker.disconnect();
    if (this.pool) {
      await this.pool.end();
    }
  }
}
