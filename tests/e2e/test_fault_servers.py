"""The private servers of the fault tests start where nobody else is listening."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

import psycopg2
import pytest

from tests.e2e.fault_servers import PrivatePostgres, PrivateRedis, candidate_ports


def test_a_private_redis_whose_port_is_taken_binds_the_next_candidate(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        server = PrivateRedis(tmp_path / "redis",
                              ports=[taken, *PrivateRedis(tmp_path / "unused").candidates])
        try:
            server.start()
            assert server.port != taken
            assert int(server.client().info("server")["process_id"]) == server.proc.pid
            server.client().set("k", "v")
            server.restart()  # the same port, an empty server
            assert server.client().get("k") is None
        finally:
            server.stop()


def test_a_private_redis_never_mistakes_another_redis_on_its_port_for_itself(
        tmp_path: Path) -> None:
    first = PrivateRedis(tmp_path / "first").start()
    try:
        assert first.port is not None
        second = PrivateRedis(tmp_path / "second", ports=[first.port, *first.candidates[1:]])
        try:
            second.start()
            assert second.port != first.port
            assert int(second.client().info("server")["process_id"]) == second.proc.pid
        finally:
            second.stop()
    finally:
        first.stop()


def test_a_private_postgres_whose_port_is_taken_binds_the_next_candidate_and_checks_passwords(
        ) -> None:
    password = secrets.token_urlsafe(16)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        server = PrivatePostgres(password, ports=[taken, *candidate_ports()])
        try:
            server.start()
            assert server.port != taken
            conn = psycopg2.connect(host="127.0.0.1", port=server.port, dbname="postgres",
                                    user="postgres", password=password)
            try:
                cursor = conn.cursor()
                cursor.execute("SELECT current_setting('port')::int")
                assert cursor.fetchone() == (server.port,)
            finally:
                conn.close()
            with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
                psycopg2.connect(host="127.0.0.1", port=server.port, dbname="postgres",
                                 user="postgres", password="guessed")
        finally:
            server.stop()
