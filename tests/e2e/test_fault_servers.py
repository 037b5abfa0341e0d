"""The private servers of the fault tests start where nobody else is listening."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.e2e.fault_servers import PrivateRedis


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
