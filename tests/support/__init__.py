"""Helpers every layer of the suite shares, each written once.

- polling: `eventually(predicate, deadline_s)`, the one way a test waits for asynchronous work;
- env: the process environment without the WALLETQ_* variables;
- builders: command dicts of every type (payout batches and items included);
- cli: the one `walletq` runner, in this process or as the installed console script;
- ledger: `assert_ledger_sound(engine, settings)` and plain-SQL reads of the ledger;
- publishing: `FakePublisher`, a CommandPublisher that records and can refuse;
- broker: what a test's Redis queues hold, and a raw task message as a foreign producer
  pushes it;
- beat: `celery beat` as a process of the test's own.
"""
