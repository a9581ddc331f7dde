"""deploy/: the systemd unit passes ``systemd-analyze verify``, the production
config loads, and the two agree on paths and timeouts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from chatd.config import Config, load
from chatd.store.schema import connect, migrate
from tests.helpers.servers import REPO

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "chatd.service"
CONFIG = DEPLOY / "chatd.toml"
ZIPAPP = "/opt/chatd/chatd.pyz"
CONFIG_PATH = "/etc/chatd/chatd.toml"


def unit_settings(text: str) -> dict[str, list[str]]:
    """``[Section] Key`` -> every value given (systemd allows repeats)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def one(settings: dict[str, list[str]], key: str) -> str:
    (value,) = settings[f"Service.{key}"]
    return value


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


@pytest.fixture
def production() -> Config:
    return load(CONFIG)


def test_the_production_config_loads(production: Config) -> None:
    assert production.source == str(CONFIG)
    assert production.server.host == "127.0.0.1"  # behind the reverse proxy
    assert production.auth.algorithms == ("HS256",) and production.auth.jwt_secret
    assert "REPLACE" in production.auth.jwt_secret  # a placeholder, never a real secret
    assert PurePosixPath(production.storage.sqlite_path).is_absolute()


def test_the_production_config_runs_a_store(tmp_path: Path) -> None:
    """The same file with its paths under tmp_path: a real database is made."""
    text = CONFIG.read_text().replace("/var/lib/chatd", str(tmp_path / "state"))
    copy = tmp_path / "chatd.toml"
    copy.write_text(text)
    config = load(copy)
    assert config.storage.sqlite_path == str(tmp_path / "state" / "chatd.db")
    Path(config.storage.sqlite_path).parent.mkdir()
    conn = connect(config.storage.sqlite_path, synchronous=config.storage.synchronous)
    try:
        assert migrate(conn) >= 1
    finally:
        conn.close()


def test_the_unit_agrees_with_the_config(production: Config) -> None:
    settings = unit_settings(UNIT.read_text())
    exec_start = one(settings, "ExecStart").split()
    assert exec_start[0] == "/usr/bin/python3"
    assert exec_start[1:] == [ZIPAPP, "--config", CONFIG_PATH]

    # The database lives in the StateDirectory, the only writable place
    # under ProtectSystem=strict besides the cache.
    state = one(settings, "StateDirectory")
    assert PurePosixPath(production.storage.sqlite_path).parent == PurePosixPath("/var/lib", state)
    # shiv unpacks into the CacheDirectory (%C is /var/cache).
    cache = one(settings, "CacheDirectory")
    assert f"SHIV_ROOT=%C/{cache}" in settings["Service.Environment"]
    assert one(settings, "ProtectSystem") == "strict"
    assert "ReadWritePaths" not in " ".join(settings)

    # systemd waits for chatd's own graceful stop, with room to commit.
    assert one(settings, "KillSignal") == "SIGTERM"
    timeout = seconds(one(settings, "TimeoutStopSec"))
    assert timeout >= 2 * production.server.shutdown_timeout_seconds + 10

    assert one(settings, "Restart") == "on-failure"
    assert one(settings, "User") == "chatd"
    assert one(settings, "CapabilityBoundingSet") == ""
    assert one(settings, "NoNewPrivileges") == "yes"
    assert one(settings, "RestrictAddressFamilies").split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert production.server.port > 1023  # no CAP_NET_BIND_SERVICE needed


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on the unit, silent and successful.

    What it checks: every directive is known and its value parses (a bad
    value is only a warning, so any output fails this test), the unit's
    dependencies load, and ExecStart's program exists and is executable.
    It does not run the service, check the arguments (the zipapp, the
    config) or apply the sandbox. So the copy it verifies differs from
    deploy/chatd.service only in paths that exist on this machine: the
    interpreter when /usr/bin/python3 is missing, the zipapp (the built
    chatd.pyz, else a stub) and the config (a temporary copy)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (not a systemd machine)")
    text = UNIT.read_text()
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        text = text.replace(f"ExecStart={python} ", f"ExecStart={sys.executable} ")
    zipapp = REPO / "chatd.pyz"
    if not zipapp.is_file():
        zipapp = tmp_path / "chatd.pyz"
        zipapp.write_text("#!/usr/bin/env python3\n")
        zipapp.chmod(0o755)
    config = tmp_path / "chatd.toml"
    shutil.copy(CONFIG, config)
    text = text.replace(ZIPAPP, str(zipapp)).replace(CONFIG_PATH, str(config))
    unit = tmp_path / "chatd.service"
    unit.write_text(text)
    done = subprocess.run(
        [tool, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "", done.stdout + done.stderr


def test_systemd_analyze_verify_is_not_blind(tmp_path: Path) -> None:
    """The same check fails on a misspelt directive and a missing program."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (not a systemd machine)")
    unit = tmp_path / "chatd.service"
    unit.write_text(
        UNIT.read_text()
        .replace("ProtectSystem=", "ProtectSytem=")
        .replace("ExecStart=/usr/bin/python3 ", f"ExecStart={tmp_path}/missing/python3 ")
    )
    done = subprocess.run(
        [tool, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "ProtectSytem" in done.stderr and "missing/python3" in done.stderr


def test_the_cluster_node_config_loads() -> None:
    """deploy/cluster/node.toml (docs/scaling.md) is a valid config of a node
    on PostgreSQL and Redis, behind the proxy it names."""
    node = load(DEPLOY / "cluster" / "node.toml")
    assert node.storage.backend == "postgres" and node.storage.dsn
    assert node.bus.backend == "redis" and node.bus.node_id == "node1"
    assert node.server.trusted_proxies == ("10.0.0.10",)
    assert node.server.drain_grace_seconds > 0
    drop_in = (DEPLOY / "cluster" / "chatd.service.d" / "cluster.conf").read_text()
    assert "After=network-online.target" in drop_in
