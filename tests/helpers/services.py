"""Real PostgreSQL and Redis servers for the tests of several nodes.

``postgres_server()`` and ``redis_server()`` start throwaway servers on
loopback, each in its own temporary directory and on a free port, from the
distribution's binaries (``.ci/run`` installs them; on Debian: packages
``postgresql`` and ``redis-server``). They give back ``None`` and a reason
when the binaries are missing, so the tests that need them are skipped with
that reason instead of failing. ``CHATD_TEST_POSTGRES_DSN`` and
``CHATD_TEST_REDIS_URL`` point the tests at servers of your own instead.

PostgreSQL refuses to run as root: as root, its directory is given to the
``postgres`` user (which Debian's package creates) and it is started as that
user. Each test gets a fresh database (``new_database``) and its own Redis
key prefix, so tests never see each other's data.

``unavailable(reason)`` skips a test whose server cannot start (or fails it
under ``CHATD_REQUIRE_SERVICES=1``, as CI sets). To cut a test off from a
server and restore it, see ``tests.helpers.proxies``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.servers import free_port


def _wait_port(port: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        time.sleep(0.05)
    return False


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@dataclass
class Postgres:
    """A running PostgreSQL server (or one given by the environment)."""

    host: str
    port: int
    user: str
    process: subprocess.Popen[bytes] | None = None
    directory: Path | None = None
    databases: list[str] = field(default_factory=list)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    def new_database(self) -> str:
        """Create an empty database; return its DSN."""
        import psycopg

        name = f"chatd_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return self.dsn(name)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class Redis:
    """A running Redis server (or one given by the environment)."""

    host: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    directory: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        """(Re)start the server process on the same port."""
        binary = shutil.which("redis-server")
        assert binary is not None and self.directory is not None
        self.process = subprocess.Popen(
            [
                binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if not _wait_port(self.port):
            raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def close(self) -> None:
        self.stop()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def postgres_server() -> tuple[Postgres | None, str]:
    """Start a PostgreSQL server, or say why not."""
    given = os.environ.get("CHATD_TEST_POSTGRES_DSN")
    if given:
        import psycopg

        info = psycopg.conninfo.conninfo_to_dict(given)
        return Postgres(
            str(info.get("host", "127.0.0.1")),
            int(info.get("port", 5432)),
            str(info.get("user", "postgres")),
        ), ""
    initdb, postgres = _pg_bin("initdb"), _pg_bin("postgres")
    if initdb is None or postgres is None:
        return None, "PostgreSQL is not installed (no initdb/postgres; apt install postgresql)"
    directory = Path(tempfile.mkdtemp(prefix="chatd-pg-"))
    data = directory / "data"
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            return None, "running as root and there is no 'postgres' user to run PostgreSQL as"
        os.chown(directory, user.pw_uid, user.pw_gid)

    def demote() -> None:
        if user is not None:
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

    role = user.pw_name if user is not None else pwd.getpwuid(os.geteuid()).pw_name
    init = subprocess.run(
        [initdb, "-D", str(data), "-U", role, "-A", "trust", "--no-sync", "-E", "UTF8"],
        preexec_fn=demote,
        capture_output=True,
    )
    if init.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        return None, f"initdb failed: {init.stderr.decode(errors='replace').strip()[-300:]}"
    port = free_port()
    process = subprocess.Popen(
        [
            postgres, "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
            "-k", str(directory), "-c", "fsync=off", "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off", "-c", "max_connections=200",
        ],
        preexec_fn=demote,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    server = Postgres("127.0.0.1", port, role, process, directory)
    if not _wait_port(port):
        server.stop()
        return None, "PostgreSQL did not start listening within 20 s"
    # The port answers a little before the server accepts logins.
    import psycopg

    deadline = time.monotonic() + 20
    while True:
        try:
            psycopg.connect(server.dsn(), connect_timeout=2).close()
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                server.stop()
                return None, "PostgreSQL did not accept connections within 20 s"
            time.sleep(0.1)
    return server, ""


def redis_server() -> tuple[Redis | None, str]:
    """Start a Redis server, or say why not."""
    given = os.environ.get("CHATD_TEST_REDIS_URL")
    if given:
        from urllib.parse import urlsplit

        parts = urlsplit(given)
        return Redis(parts.hostname or "127.0.0.1", parts.port or 6379), ""
    if shutil.which("redis-server") is None:
        return None, "Redis is not installed (redis-server not found; apt install redis-server)"
    directory = Path(tempfile.mkdtemp(prefix="chatd-redis-"))
    server = Redis("127.0.0.1", free_port(), directory=directory)
    try:
        server.start()
    except RuntimeError as exc:
        server.close()
        return None, str(exc)
    return server, ""


def unavailable(reason: str) -> None:
    """Skip, saying why; under CHATD_REQUIRE_SERVICES=1 (CI), fail instead."""
    import pytest  # here: bench/ imports this module without pytest's help

    if os.environ.get("CHATD_REQUIRE_SERVICES") == "1":
        pytest.fail(f"CHATD_REQUIRE_SERVICES=1 but {reason}")
    pytest.skip(reason)


@contextlib.contextmanager
def own_redis() -> Iterator[Redis]:
    """A Redis server of one test's own (for tests that stop and restart it)."""
    server, reason = redis_server()
    if server is None or server.process is None:
        import pytest

        if server is not None:
            pytest.skip("a Redis of its own is needed (CHATD_TEST_REDIS_URL is set)")
        pytest.skip(reason)
    try:
        yield server
    finally:
        server.close()
