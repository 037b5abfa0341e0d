"""Servers a test may kill or configure as production does: never the shared ones, always
a private instance.

`PrivateRedis` is a redis-server of the test's own on a spare port, without persistence
(no RDB snapshot, no append-only file): restart() loses everything it held, as a
production Redis configured that way would. `PrivatePostgres` is a PostgreSQL cluster of
the test's own (initdb in a temporary folder), where every connection must give its
password (scram-sha-256), as in docker-compose.yml.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.servers import pg_bin

__all__ = ["PrivateRedis", "PrivatePostgres", "TlsFiles", "make_tls_files", "spare_port"]


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


def spare_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """`redis-server --port N --save "" --appendonly no`, in its own folder; with `tls`
    (CA, certificate and key files) it listens for TLS only (`--tls-port N --port 0`)."""

    def __init__(self, folder: Path, port: int | None = None, tls: TlsFiles | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.binary = binary
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or spare_port()
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = folder / "redis.log"

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def _listen_args(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        return ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "no"]

    def client(self) -> redis.Redis:
        if self.tls is None:
            return redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        return redis.Redis(host="127.0.0.1", port=self.port, ssl=True, ssl_ca_certs=str(self.tls.ca),
                           socket_connect_timeout=0.5)

    def start(self, timeout_s: float = 10.0) -> PrivateRedis:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [self.binary, *self._listen_args(), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                conn = self.client()
                try:
                    if conn.ping():
                        return self
                finally:
                    conn.close()
            except redis.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private redis-server did not start on {self.port}:\n"
                                   + self.log_path.read_text(errors="replace")[-2000:])
            time.sleep(0.05)

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
    """initdb with scram-sha-256 for every connection, then `postgres` on a spare port;
    run as the `postgres` OS user when the tests run as root (PostgreSQL refuses root)."""

    def __init__(self, superuser_password: str) -> None:
        initdb, server = pg_bin("initdb"), pg_bin("postgres")
        if initdb is None or server is None:
            raise RuntimeError("PostgreSQL server binaries are not installed (apt-get install -y postgresql)")
        self.initdb, self.server = initdb, server
        self.password = superuser_password
        self.port = spare_port()
        self.folder = Path(tempfile.mkdtemp(prefix="walletq-pg-"))
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.folder / "postgres.log"

    def start(self, timeout_s: float = 30.0) -> PrivatePostgres:
        password_file = self.folder / "superuser-password"
        password_file.write_text(self.password)
        if self.user is not None:
            shutil.chown(password_file, self.user)
        subprocess.run([self.initdb, "-D", str(self.folder / "data"), "-U", "postgres",
                        "--auth=scram-sha-256", f"--pwfile={password_file}", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, user=self.user)
        password_file.unlink()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [self.server, "-D", str(self.folder / "data"), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.folder}",
             "-c", "fsync=off", "-c", "max_connections=50"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, user=self.user)
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            ready = subprocess.run([pg_bin("pg_isready") or "pg_isready", "-h", "127.0.0.1", "-p",
                                    str(self.port)], capture_output=True, check=False)
            if ready.returncode == 0:
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("private postgres did not start:\n"
                                   + self.log_path.read_text(errors="replace")[-2000:])
            time.sleep(0.1)

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then the folder goes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)
