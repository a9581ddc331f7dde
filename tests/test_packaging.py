"""chatd installed with pip, as the package it is, in clean virtualenvs:
``pip install .`` runs the SQLite node and refuses a cluster config with one
line naming the extra to install; ``pip install .[cluster]`` runs a node on
PostgreSQL and Redis (the test run's own servers); ``chatd --version``.

Slow (each virtualenv installs chatd's dependencies from the package index,
a minute or so), so it runs as a stage of its own: ``.ci/run`` sets
``CHATD_PACKAGING=1``; without it the module is skipped, saying so. Run it
with ``CHATD_PACKAGING=1 ./build.sh test tests/test_packaging.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from chatd import __version__
from tests.helpers.servers import REPO, free_port
from tests.helpers.tokens import SECRET

pytestmark = pytest.mark.skipif(
    os.environ.get("CHATD_PACKAGING") != "1",
    reason="installs chatd into new virtualenvs from the package index (slow):"
    " CHATD_PACKAGING=1 runs it (.ci/run does)",
)

#: Seconds a node may take to answer /healthz after it starts.
START_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a source distribution of chatd holds, copied apart (an install
    from the working tree itself would leave build files in it)."""
    where = tmp_path_factory.mktemp("chatd-src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, where / name)
    shutil.copytree(REPO / "chatd", where / "chatd", ignore=shutil.ignore_patterns("__pycache__"))
    return where


def virtualenv(root: Path, requirement: str) -> Path:
    """A new virtualenv with ``requirement`` installed; its bin directory."""
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    bin_dir = root / "bin"
    subprocess.run(
        [str(bin_dir / "pip"), "install", "--quiet", "--disable-pip-version-check", requirement],
        check=True,
    )
    return bin_dir


@pytest.fixture(scope="module")
def plain(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return virtualenv(tmp_path_factory.mktemp("venv-plain"), str(source))


@pytest.fixture(scope="module")
def cluster(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return virtualenv(tmp_path_factory.mktemp("venv-cluster"), f"{source}[cluster]")


def config(tmp_path: Path, port: int, **sections: str) -> Path:
    """A config file: this port on loopback, the test secret, a database
    under ``tmp_path``, and ``sections`` (TOML text, by section name)."""
    text = (
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[auth]\njwt_secret = "{SECRET}"\n'
        f'[storage]\nsqlite_path = "{tmp_path / "chatd.db"}"\n'
        + sections.pop("storage", "")
        + "".join(f"[{name}]\n{body}" for name, body in sections.items())
    )
    path = tmp_path / "chatd.toml"
    path.write_text(text)
    return path


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@contextmanager
def serving(bin_dir: Path, config_file: Path, port: int) -> Iterator[subprocess.Popen[Any]]:
    """``chatd --config FILE`` from the virtualenv, until it answers
    /healthz; stopped (SIGTERM) at the end of the block."""
    node = subprocess.Popen(
        [str(bin_dir / "chatd"), "--config", str(config_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert node.poll() is None, node.communicate()[1].decode()
            try:
                if status(port, "/healthz") == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the node did not come up"
            time.sleep(0.2)
        yield node
    finally:
        node.terminate()
        node.wait(timeout=30)
        assert node.stderr is not None
        node.stderr.close()


def test_version(plain: Path) -> None:
    done = subprocess.run(
        [str(plain / "chatd"), "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"chatd {__version__}"


def test_pip_install_runs_the_sqlite_node(plain: Path, tmp_path: Path) -> None:
    port = free_port()
    with serving(plain, config(tmp_path, port), port) as node:
        assert status(port, "/readyz") == 200
    assert node.returncode == 0
    assert (tmp_path / "chatd.db").exists()


def cluster_sections(postgres: Any, redis: Any) -> dict[str, str]:
    return {
        "storage": f'backend = "postgres"\ndsn = "{postgres.new_database()}"\n',
        "bus": f'backend = "redis"\nurl = "{redis.url}"\n',
    }


def test_without_the_extra_a_cluster_config_is_refused_in_one_line(
    plain: Path, tmp_path: Path, postgres: Any, redis: Any
) -> None:
    port = free_port()
    file = config(tmp_path, port, **cluster_sections(postgres, redis))
    done = subprocess.run(
        [str(plain / "chatd"), "--config", str(file)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "[storage] backend: needs psycopg, which is not installed" in lines[0]
    assert "pip install 'chatd[cluster]'" in lines[0]


def test_the_cluster_extra_runs_a_node_on_postgresql_and_redis(
    cluster: Path, tmp_path: Path, postgres: Any, redis: Any
) -> None:
    port = free_port()
    file = config(tmp_path, port, **cluster_sections(postgres, redis))
    with serving(cluster, file, port) as node:
        assert status(port, "/readyz") == 200
    assert node.returncode == 0
    assert not (tmp_path / "chatd.db").exists()  # the messages went to PostgreSQL
