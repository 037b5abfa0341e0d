"""A `rediss://` broker: TLS that verifies the server, against WALLETQ_BROKER_CA_FILE.

kombu's default for a rediss:// URL without options is to accept any certificate; walletq
sets CERT_REQUIRED and hostname checking, so a broker whose certificate the CA did not
sign is refused, and the whole pipeline runs over TLS with the right CA."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu.exceptions import OperationalError

from tests.e2e.fault_servers import PrivateRedis, TlsFiles, make_tls_files
from worker.celery_app import make_app
from worker.client import WalletClient


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[PrivateRedis, TlsFiles]]:
    files = make_tls_files(tmp_path / "tls")
    server = PrivateRedis(tmp_path / "redis", tls=files).start()
    try:
        yield server, files
    finally:
        server.stop()


def test_the_pipeline_runs_over_tls_and_refuses_a_broker_it_cannot_verify(
        tls_redis, pipeline_env, worker_factory, tmp_path):
    server, files = tls_redis
    tls = {"WALLETQ_BROKER_URL": server.url, "WALLETQ_BROKER_CA_FILE": str(files.ca)}
    worker = worker_factory(env=tls)
    client = WalletClient.from_env({**os.environ, **pipeline_env, **tls})
    try:
        client.submit({"type": "credit_wallet", "idempotency_key": "tls-1", "user": "alice",
                       "amount": "3.00"})
        record = client.wait("tls-1", timeout=30)
        assert record is not None and record.status == "succeeded", worker.log_tail()
    finally:
        client.close()

    other_ca = make_tls_files(tmp_path / "other").ca  # not the CA that signed the server
    for env in ({"WALLETQ_BROKER_URL": server.url},  # the system's CAs: not this one either
                {**tls, "WALLETQ_BROKER_CA_FILE": str(other_ca)}):
        app = make_app({**os.environ, **pipeline_env, **env})
        try:
            with pytest.raises(OperationalError, match="CERTIFICATE_VERIFY_FAILED"), \
                    app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=0)
        finally:
            app.close()
