// Where each command type goes: the queue, which on Redis is the list key of that name.
export const TASK_NAME = "walletq.execute_command";

/** WALLETQ_QUEUE_PREFIX + "payouts" for payout batches, + "commands" for every other type. */
export function queueFor(commandType, prefix = "") {
  return `${prefix}${commandType === "payout_batch" ? "payouts" : "commands"}`;
}
