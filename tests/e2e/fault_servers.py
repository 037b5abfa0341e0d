"""Servers a test may kill or configure as production does: never the shared ones, always
a private instance.

`PrivateRedis` is a redis-server of the test's own, without persistence (no RDB snapshot,
no append-only file): restart() loses everything it held, as a production Redis configured
that way would; with TLS files it listens for TLS only. `PrivatePostgres` is a PostgreSQL
cluster of the test's own (initdb in a temporary folder), where every connection must give
its password (scram-sha-256), as in docker-compose.yml; crash() stops it the way a power
cut would (immediate shutdown: no checkpoint) and start() brings it back on its port.
`PrivateRabbit` is a RabbitMQ node of the test's own (its own node name, ports, database
and configuration in a temporary folder); restart() SIGKILLs it and starts it again with
its database (durable queues come back), restart(lose=True) without (every queue gone).

A port is never "found free, released, used later" (another process may take it in
between): the server binds a candidate port itself, and on a bind failure the next
candidate is tried (`on_a_free_port`). A server only counts as started when the one
answering on the port is this process, not somebody else's: Redis's INFO process_id,
PostgreSQL's postmaster.pid saying `ready` while our postmaster runs.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import random
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import amqp
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.servers import pg_bin
from tests.support.polling import eventually

__all__ = ["PrivateRedis", "PrivatePostgres", "PrivateRabbit", "PortTaken", "TlsFiles", "make_tls_files",
           "candidate_ports", "on_a_free_port", "start_serving", "BIND_FAILED"]

#: Below Linux's ephemeral range (32768-60999), where clients' own ports come from.
CANDIDATE_PORTS = range(20_000, 30_000)
ATTEMPTS_MAX = 20
#: What redis-server, postgres (and any server on Linux) logs when its port is taken.
BIND_FAILED = "Address already in use"
#: What a RabbitMQ (Erlang) node logs when one of its ports is taken.
BIND_FAILED_ERLANG = "eaddrinuse"

T = TypeVar("T")


class PortTaken(RuntimeError):
    """Raised when the server could not bind its port: another process listens there."""


def candidate_ports() -> list[int]:
    """A random handful of ports below the ephemeral range, to try in turn."""
    return random.sample(CANDIDATE_PORTS, ATTEMPTS_MAX)


def on_a_free_port(launch: Callable[[int], T], ports: Iterable[int] | None = None
                   ) -> tuple[int, T]:
    """`launch(port)` on the first candidate it can bind; it raises PortTaken to move on."""
    candidates = list(ports) if ports is not None else candidate_ports()
    for port in candidates:
        try:
            return port, launch(port)
        except PortTaken:
            continue
    raise RuntimeError(f"no free port among {candidates}")


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls_files(folder: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A throwaway CA and a server certificate for `host`, signed by it (PEM files)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
                    issuer_key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    pem = serialization.Encoding.PEM
    files.ca.write_bytes(certificate("walletq test CA", ca_key, "walletq test CA", ca_key, True)
                         .public_bytes(pem))
    files.cert.write_bytes(certificate(host, server_key, "walletq test CA", ca_key, False).public_bytes(pem))
    files.key.write_bytes(server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return files


def _log_since(path: Path, start: int) -> str:
    return path.read_bytes()[start:].decode(errors="replace") if path.exists() else ""


def start_serving(argv: list[str], log_path: Path, port: int,
                  serving: Callable[[int, int], bool], timeout_s: float,
                  **popen: Any) -> subprocess.Popen[bytes]:
    """`argv` in a session of its own, its output appended to `log_path`, once
    `serving(port, pid)` says the server on `port` is up and is this process. PortTaken if
    it exits on a bind failure; RuntimeError on any other exit; AssertionError (the process
    killed) if it serves nothing by `timeout_s`."""
    log_start = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, **popen)

    def up() -> bool:
        if proc.poll() is not None:
            output = _log_since(log_path, log_start)
            if BIND_FAILED in output or BIND_FAILED_ERLANG in output:
                raise PortTaken(f"{argv[0]} on {port}: {output[-300:]}")
            raise RuntimeError(f"{argv[0]} exited on {port}:\n{output[-3000:]}")
        return serving(port, proc.pid)

    try:
        eventually(up, timeout_s, describe=lambda: _log_since(log_path, log_start)[-3000:])
    except AssertionError:
        proc.kill()
        proc.wait(10)
        raise
    return proc


class PrivateRedis:
    """`redis-server --port N --save "" --appendonly no`, in its own folder; with `tls`
    (CA, certificate and key files) it listens for TLS only (`--tls-port N --port 0`)."""

    def __init__(self, folder: Path, ports: Iterable[int] | None = None,
                 tls: TlsFiles | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.binary = binary
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.candidates = list(ports) if ports is not None else candidate_ports()
        self.tls = tls
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = folder / "redis.log"

    @property
    def url(self) -> str:
        assert self.port is not None, "not started"
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def _listen_args(self, port: int) -> list[str]:
        if self.tls is None:
            return ["--port", str(port)]
        return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(self.tls.cert),
                "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "no"]

    def _connect(self, port: int, **options: Any) -> redis.Redis:
        if self.tls is not None:
            options.update(ssl=True, ssl_ca_certs=str(self.tls.ca))
        return redis.Redis(host="127.0.0.1", port=port, **options)

    def client(self) -> redis.Redis:
        assert self.port is not None, "not started"
        return self._connect(self.port)

    def start(self, timeout_s: float = 10.0) -> PrivateRedis:
        """Start on the first candidate port this server can bind (its own port on a restart)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        if self.port is not None:
            self._launch(self.port, timeout_s)
        else:
            self.port, _ = on_a_free_port(lambda port: self._launch(port, timeout_s),
                                          self.candidates)
        return self

    def _launch(self, port: int, timeout_s: float) -> None:
        self.proc = start_serving(
            [self.binary, *self._listen_args(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            self.log_path, port, self._serves, timeout_s)

    def _serves(self, port: int, pid: int) -> bool:
        """Whether the server answering on the port is the process `pid`."""
        # No retry: redis-py's default retries a silent listener for ten seconds.
        conn = self._connect(port, socket_connect_timeout=0.5, socket_timeout=0.5,
                             retry=Retry(NoBackoff(), 0))
        try:
            return int(conn.info("server")["process_id"]) == pid
        except redis.RedisError:  # nobody there yet, or somebody who is not a Redis
            return False
        finally:
            conn.close()

    def stop(self) -> None:
        """SIGKILL: nothing is saved (there is nothing to save with persistence off anyway)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        """Kill and start again on the same port: an empty server, every queue gone."""
        self.stop()
        self.start()


class PrivatePostgres:
    """initdb with scram-sha-256 for every connection, then `postgres` on a free candidate
    port; run as the `postgres` OS user when the tests run as root (PostgreSQL refuses root)."""

    def __init__(self, superuser_password: str, ports: Iterable[int] | None = None) -> None:
        initdb, server = pg_bin("initdb"), pg_bin("postgres")
        if initdb is None or server is None:
            raise RuntimeError("PostgreSQL server binaries are not installed (apt-get install -y postgresql)")
        self.initdb, self.server = initdb, server
        self.password = superuser_password
        self.candidates = list(ports) if ports is not None else candidate_ports()
        self.port: int | None = None
        self.folder = Path(tempfile.mkdtemp(prefix="walletq-pg-"))
        self.data = self.folder / "data"
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.folder / "postgres.log"

    def start(self, timeout_s: float = 30.0) -> PrivatePostgres:
        if self.port is not None:  # after crash(): the same cluster, on its port
            self._launch(self.port, timeout_s)
            return self
        password_file = self.folder / "superuser-password"
        password_file.write_text(self.password)
        if self.user is not None:
            shutil.chown(password_file, self.user)
        subprocess.run([self.initdb, "-D", str(self.data), "-U", "postgres",
                        "--auth=scram-sha-256", f"--pwfile={password_file}", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, user=self.user)
        password_file.unlink()
        try:
            self.port, _ = on_a_free_port(lambda port: self._launch(port, timeout_s),
                                          self.candidates)
        except BaseException:
            self.stop()  # the folder goes
            raise
        return self

    def _launch(self, port: int, timeout_s: float) -> None:
        self.proc = start_serving(
            [self.server, "-D", str(self.data), "-p", str(port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.folder}",
             "-c", "fsync=off", "-c", "max_connections=50"],
            self.log_path, port, self._ready, timeout_s, user=self.user)

    def _ready(self, port: int, pid: int) -> bool:
        """Our postmaster's own word (postmaster.pid: its pid on line 1, its port on line 4,
        its status on line 8): the process `pid` bound `port` and accepts connections."""
        try:
            lines = [line.strip() for line in (self.data / "postmaster.pid").read_text().splitlines()]
        except FileNotFoundError:
            return False
        return len(lines) >= 8 and lines[0] == str(pid) and lines[3] == str(port) \
            and lines[7] == "ready"

    def crash(self) -> None:
        """Immediate shutdown (SIGQUIT): no checkpoint, crash recovery at the next start."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then the folder goes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


class PrivateRabbit:
    """A RabbitMQ node of its own: node name, AMQP and distribution ports, configuration,
    database and logs in a temporary folder (never the machine's node on 5672). Run as the
    `rabbitmq` OS user when the tests run as root (its Erlang cookie, for rabbitmqctl)."""

    def __init__(self, ports: Iterable[int] | None = None) -> None:
        packaged = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
        binary = str(packaged) if packaged.exists() else shutil.which("rabbitmq-server")
        if binary is None:
            raise RuntimeError("rabbitmq-server is not installed (apt-get install -y rabbitmq-server)")
        self.binary = binary
        self.candidates = list(ports) if ports is not None else candidate_ports()
        self.port: int | None = None
        self.name = f"walletq{uuid.uuid4().hex[:8]}"
        self.node = f"{self.name}@localhost"
        self.folder = Path(tempfile.mkdtemp(prefix="walletq-rabbit-"))
        self.user: str | None = None
        self.home = self.folder
        if os.geteuid() == 0:
            entry = pwd.getpwnam("rabbitmq")
            self.user, self.home = "rabbitmq", Path(entry.pw_dir)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.folder / "rabbitmq.log"

    @property
    def url(self) -> str:
        assert self.port is not None, "not started"
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self, port: int) -> dict[str, str]:
        config = self.folder / "rabbitmq.conf"
        # cluster_name: what the node tells every client, so a start can tell it is ours.
        config.write_text(f"listeners.tcp.default = 127.0.0.1:{port}\n"
                          f"cluster_name = {self.name}\n")
        (self.folder / "rabbitmq-env.conf").write_text("")  # not the machine's NODENAME
        (self.folder / "enabled_plugins").write_text("[].\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        return {**env, "HOME": str(self.home), "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_PORT": str(port),
                # Below the candidate range, so never a candidate AMQP port of another test.
                "RABBITMQ_DIST_PORT": str(port - 10_000),
                "RABBITMQ_CONFIG_FILE": str(config),
                "RABBITMQ_CONF_ENV_FILE": str(self.folder / "rabbitmq-env.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.folder / "log"), "RABBITMQ_LOGS": "-"}

    def start(self, timeout_s: float = 90.0) -> PrivateRabbit:
        """Start on the first candidate port it can bind (its own port on a restart)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        if self.port is not None:
            self._launch(self.port, timeout_s)
        else:
            self.port, _ = on_a_free_port(lambda port: self._launch(port, timeout_s),
                                          self.candidates)
        return self

    def _launch(self, port: int, timeout_s: float) -> None:
        if self.user is not None:
            for sub in ("mnesia", "log"):
                (self.folder / sub).mkdir(exist_ok=True)
                shutil.chown(self.folder / sub, self.user, self.user)
        try:
            self.proc = start_serving([self.binary], self.log_path, port, self._serves,
                                      timeout_s, env=self._env(port), user=self.user,
                                      cwd=str(self.folder))
        except BaseException:
            self._kill_group()
            raise

    def _serves(self, port: int, pid: int) -> bool:
        """Whether the node answering on the port is ours (the cluster name we gave it)."""
        conn = amqp.Connection(f"127.0.0.1:{port}", userid="guest", password="guest",
                               connect_timeout=1)
        try:
            conn.connect()
            return conn.server_properties.get("cluster_name") == self.name
        except Exception:  # nobody there yet, or booting
            return False
        finally:
            try:
                conn.collect()
            except Exception:
                pass

    def _kill_group(self) -> None:
        """SIGKILL every process of the node's session (the Erlang VM started by the
        script, which start_serving's own kill would miss)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if self.proc is not None and os.getsid(int(entry.name)) == self.proc.pid:
                    os.kill(int(entry.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue

    def kill(self) -> None:
        """SIGKILL the node: the Erlang VM and its helpers, nothing flushed."""
        if self.proc is not None:
            self._kill_group()
            self.proc.wait(10)

    def restart(self, *, lose: bool = False) -> None:
        """SIGKILL, then start on the same port: with its database (durable queues and
        their messages come back), or with `lose` without it (every queue gone)."""
        self.kill()
        if lose:
            shutil.rmtree(self.folder / "mnesia", ignore_errors=True)
        self.start()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.folder, ignore_errors=True)
