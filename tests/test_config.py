"""chatd.config: load()/from_dict() validation, and the CLI's handling of configs.

Every configuration problem must be one ``ConfigError`` line naming the file
and the key; the command line turns it into ``chatd: ...`` on stderr, exit 2.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest

from chatd.config import Config, from_dict, load
from chatd.errors import ConfigError
from tests.helpers.servers import REPO, free_port

EXAMPLE = REPO / "chatd.toml.example"
SECRET = "config-test-secret-of-at-least-32-bytes!"
SRC = "t.toml"


def build(**sections: Any) -> Config:
    """from_dict with a valid HS256 secret unless ``auth`` is given."""
    doc: dict[str, Any] = {"auth": {"jwt_secret": SECRET}}
    doc.update(sections)
    return from_dict(doc, source=SRC)


def refused(doc: dict[str, Any], pattern: str) -> str:
    """Assert from_dict refuses ``doc`` with a one-line message matching ``pattern``."""
    with pytest.raises(ConfigError, match=pattern) as info:
        from_dict(doc, source=SRC)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{SRC}: ")
    return text


# --- valid configs ------------------------------------------------------------


def test_example_file_loads() -> None:
    config = load(EXAMPLE)
    assert config.source == str(EXAMPLE)
    assert config.rooms.public == ("general", "random")
    assert config.rooms.private == {"staff": (1, 2)}
    assert config.auth.algorithms == ("HS256",)
    assert config.server.port == 8080
    assert config.limits.messages_per_minute == 10
    assert config.limits.messages_per_hour == 100
    assert config.public_key == ""


def test_defaults_and_source() -> None:
    config = build()
    assert config.source == SRC
    assert config.server.host == "127.0.0.1"
    assert config.storage.synchronous == "normal"
    assert config.storage.checkpoint_interval_seconds == 1.0
    assert config.storage.wal_max_bytes == 256 << 20
    assert config.auth.jwt_secret == SECRET


@pytest.mark.parametrize("port", [0, 1, 8080, 65535])
def test_port_bounds_accepted(port: int) -> None:
    assert build(server={"port": port}).server.port == port


def test_load_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[auth]\njwt_secret = "{SECRET}"\n[rooms]\npublic = ["lobby"]\n'
        "[rooms.private]\nops = [3, 4]\n",
        encoding="utf-8",
    )
    config = load(path)
    assert config.source == str(path)
    assert config.rooms.public == ("lobby",)
    assert config.rooms.private == {"ops": (3, 4)}


# --- one-line errors from from_dict --------------------------------------------


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {"limits": {"messages_per_minute": "10"}},
            "t.toml: [limits] messages_per_minute: Expected `int`, got `str`",
        ),
        (
            {"server": {"compression": "yes"}},
            "t.toml: [server] compression: Expected `bool`, got `str`",
        ),
        ({"server": {"prot": 1}}, "t.toml: [server] prot: unknown key"),
        ({"rooms": {"prvate": {}}}, "t.toml: [rooms] prvate: unknown key"),
        ({"sever": {}}, "t.toml: [sever]: unknown section"),
        ({"server": {"port": 70000}}, "t.toml: [server] port: Expected `int` <= 65535"),
        ({"server": {"port": -1}}, "t.toml: [server] port: Expected `int` >= 0"),
        ({"source": "x"}, "t.toml: source: unknown key"),
        ({"public_key": "x"}, "t.toml: public_key: unknown key"),
        (
            {"server": {"idle_timeout_seconds": 30, "ping_interval_seconds": 30}},
            "t.toml: [server] idle_timeout_seconds: must be longer than ping_interval_seconds",
        ),
        (
            {"server": {"idle_timeout_seconds": 10, "ping_interval_seconds": 30}},
            "t.toml: [server] idle_timeout_seconds: must be longer than ping_interval_seconds",
        ),
        (
            {"limits": {"messages_per_hour": 5, "messages_per_minute": 10}},
            "t.toml: [limits] messages_per_hour: must be at least messages_per_minute",
        ),
        (
            {"rooms": {"public": ["a", "a"]}},
            "t.toml: [rooms] public: a room is listed twice",
        ),
        (
            {"storage": {"backend": "postgres"}},
            't.toml: [storage] dsn: required when backend = "postgres"',
        ),
        (
            {"bus": {"backend": "redis"}},
            't.toml: [bus] backend: "redis" needs [storage] backend = "postgres"'
            " (nodes must share one store)",
        ),
        ({"bus": {"backend": "nats"}}, "t.toml: [bus] backend: Invalid enum value 'nats'"),
        ({"storage": {"pool_size": 0}}, "t.toml: [storage] pool_size: Expected `int` >= 1"),
        (
            {"storage": {"checkpoint_interval_seconds": 0}},
            "t.toml: [storage] checkpoint_interval_seconds: Expected `float` >= 0.01",
        ),
        (
            {"storage": {"checkpoint_interval_seconds": "1s"}},
            "t.toml: [storage] checkpoint_interval_seconds: Expected `float`, got `str`",
        ),
        (
            {"storage": {"wal_max_bytes": 4096}},
            "t.toml: [storage] wal_max_bytes: Expected `int` >= 1048576",
        ),
        (
            {"storage": {"wal_max_bytes": 1.5}},
            "t.toml: [storage] wal_max_bytes: Expected `int`, got `float`",
        ),
        (
            {"rooms": {"public": ["a"], "private": {"a": [1]}}},
            "t.toml: [rooms] public: ['a'] also declared in [rooms.private]",
        ),
        (
            {"rooms": {"public": ["a"], "owners": {"b": [1]}}},
            "t.toml: [rooms.owners] b: not a room of [rooms] public or [rooms.private]",
        ),
        (
            {"rooms": {"public": ["a"], "owners": {"a": [1]}, "moderators": {"a": [2, 1]}}},
            "t.toml: [rooms.moderators] a: [1] also in [rooms.owners]",
        ),
        (
            {"rooms": {"public": ["a"], "moderators": {"a": [0]}}},
            "t.toml: [rooms.moderators] a: expected a list of user ids (integers >= 1)",
        ),
        (
            {"retention": {"room_days": -1}},
            "t.toml: [retention] room_days: Expected `int` >= 0",
        ),
        (
            {"retention": {"direct_days": 36501}},
            "t.toml: [retention] direct_days: Expected `int` <= 36500",
        ),
        (
            {"retention": {"rooms": {"general": "30"}}},
            "t.toml: [retention.rooms] general: expected a whole number of days from 0"
            " (for ever) to 36500",
        ),
        (
            {"retention": {"days": 30}},
            "t.toml: [retention] days: unknown key",
        ),
        (
            {"retention": {"batch_size": 0}},
            "t.toml: [retention] batch_size: Expected `int` >= 1",
        ),
        (
            {"rooms": {"public": ["a"], "owners": {"a b": [1]}}},
            "t.toml: [rooms.owners] 'a b': a room name is 1 to 64 letters, digits or ._:@-",
        ),
    ],
)
def test_error_message(doc: dict[str, Any], message: str) -> None:
    full = {"auth": {"jwt_secret": SECRET}, **doc}
    assert refused(full, re.escape(message)) == message


@pytest.mark.parametrize("members", [["a"], [True], [1.5], [0], [-3], [2**63], 1, "1,2"])
def test_private_room_members_must_be_user_ids(members: Any) -> None:
    message = "t.toml: [rooms.private] staff: expected a list of user ids (integers >= 1)"
    doc = {"auth": {"jwt_secret": SECRET}, "rooms": {"private": {"staff": members}}}
    assert refused(doc, re.escape(message)) == message


@pytest.mark.parametrize("name", ["bad name", "", "a" * 65, "room/1", "r\u00e9\n"])
def test_private_room_name_refused(name: str) -> None:
    doc = {"auth": {"jwt_secret": SECRET}, "rooms": {"private": {name: [1]}}}
    refused(doc, re.escape(f"t.toml: [rooms.private] {name!r}: a room name is 1 to 64"))


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("bad name", "Expected `str` matching regex"),
        ("", "Expected `str` of length >= 1"),
        ("a" * 65, "Expected `str` of length <= 64"),
        ("x/y", "Expected `str` matching regex"),
    ],
)
def test_public_room_name_refused(name: str, what: str) -> None:
    doc = {"auth": {"jwt_secret": SECRET}, "rooms": {"public": ["ok", name]}}
    refused(doc, re.escape(f"t.toml: [rooms] public[1]: {what}"))


def test_public_room_name_with_trailing_newline_refused() -> None:
    with pytest.raises(ConfigError, match=r"\[rooms\] public\[0\]"):
        build(rooms={"public": ["general\n"]})


@pytest.mark.parametrize("name", ["general", "a.b", "x:y", "u@h", "a-b_c", "caf\u00e9", "a" * 64])
def test_room_names_accepted(name: str) -> None:
    config = build(
        rooms={"public": [name], "private": {name + "p" if len(name) < 64 else "p": [1]}}
    )
    assert config.rooms.public == (name,)


# --- auth section -----------------------------------------------------------------


def test_hs256_without_secret_refused() -> None:
    refused({}, re.escape("t.toml: [auth] jwt_secret: required for ['HS256']"))


@pytest.mark.parametrize("algorithms", [["HS256", "RS256"], ["ES256", "HS512"]])
def test_mixing_hmac_and_public_key_algorithms_refused(algorithms: list[str]) -> None:
    doc = {"auth": {"jwt_secret": SECRET, "algorithms": algorithms}}
    refused(
        doc,
        re.escape("t.toml: [auth] algorithms: do not mix HS* with public-key algorithms"),
    )


def test_unsupported_and_empty_algorithms_refused() -> None:
    refused(
        {"auth": {"jwt_secret": SECRET, "algorithms": ["none"]}},
        re.escape("t.toml: [auth] algorithms: unsupported ['none']"),
    )
    refused(
        {"auth": {"jwt_secret": SECRET, "algorithms": []}},
        re.escape("t.toml: [auth] algorithms: name at least one algorithm"),
    )


def test_rs256_without_public_key_file_refused() -> None:
    refused(
        {"auth": {"algorithms": ["RS256"]}},
        re.escape("t.toml: [auth] public_key_file: required for ['RS256']"),
    )


def test_rs256_missing_key_file_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    doc = {"auth": {"algorithms": ["RS256"], "public_key_file": str(missing)}}
    text = refused(doc, re.escape("t.toml: [auth] public_key_file: cannot read"))
    assert text.endswith(f"{str(missing)!r}: No such file or directory")


def test_rs256_key_file_not_utf8_refused(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(b"\xff\xfe not a pem")
    doc = {"auth": {"algorithms": ["RS256"], "public_key_file": str(key)}}
    refused(doc, re.escape(f"t.toml: [auth] public_key_file: cannot read {str(key)!r}: "))


def test_rs256_key_file_is_a_directory_refused(tmp_path: Path) -> None:
    doc = {"auth": {"algorithms": ["RS256"], "public_key_file": str(tmp_path)}}
    refused(doc, re.escape(f"cannot read {str(tmp_path)!r}: Is a directory"))


def test_rs256_key_file_read_into_public_key(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----\n")
    config = from_dict({"auth": {"algorithms": ["RS256"], "public_key_file": str(key)}})
    assert config.public_key == key.read_text()


# --- load(): file-level errors -------------------------------------------------------


def load_refused(path: Path, pattern: str) -> str:
    with pytest.raises(ConfigError, match=pattern) as info:
        load(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ")
    return text


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    text = load_refused(path, "cannot read the config file")
    assert text == f"{path}: cannot read the config file: No such file or directory"


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server\nport = 1\n")
    load_refused(path, re.escape(f"{path}: not valid TOML: ") + r".*line 1")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nhost = "caf\xe9"\n')
    assert load_refused(path, "not UTF-8") == f"{path}: the config file is not UTF-8 text"


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text(f'[auth]\njwt_secret = "{SECRET}"\n[server]\nport = "80"\n')
    text = load_refused(path, re.escape(f"{path}: [server] port: Expected `int`, got `str`"))
    assert text == f"{path}: [server] port: Expected `int`, got `str`"


# --- the command line ----------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatd", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "cannot read the config file"),
        ("[server\n", "not valid TOML"),
        (f'[auth]\njwt_secret = "{SECRET}"\n[server]\nport = 99999\n', "[server] port"),
        (f'[auth]\njwt_secret = "{SECRET}"\n[bogus]\n', "[bogus]: unknown section"),
    ],
)
@pytest.mark.parametrize("command", [[], ["serve"]])
def test_cli_bad_config(
    tmp_path: Path, content: str | None, needle: str, command: list[str]
) -> None:
    path = tmp_path / "bad.toml"
    if content is not None:
        path.write_text(content)
    result = run_cli(*command, "--config", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"chatd: {path}: ")
    assert needle in lines[0]
    assert result.stdout == ""


def test_cli_token(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(f'[auth]\njwt_secret = "{SECRET}"\n')
    result = run_cli("token", "--config", str(path), "--user-id", "7", "--username", "bob")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["user_id"] == 7
    assert claims["username"] == "bob"
    assert claims["sub"] == "7"
    assert claims["exp"] - claims["iat"] == 86400
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "another-secret-of-at-least-32-bytes!!", algorithms=["HS256"])


def test_cli_token_refused_for_rs256_config(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n")
    path = tmp_path / "rs.toml"
    path.write_text(f'[auth]\nalgorithms = ["RS256"]\npublic_key_file = "{key}"\n')
    result = run_cli("token", "--config", str(path), "--user-id", "7", "--username", "bob")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"chatd: {path}: ")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("command", [[], ["serve"], ["token"]])
def test_cli_help(command: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: chatd")
    assert "Traceback" not in result.stderr
    if command:
        assert "--config" in result.stdout
    else:
        assert "serve" in result.stdout and "token" in result.stdout
    if command == ["token"]:
        assert "--user-id" in result.stdout and "--username" in result.stdout


def test_cli_unreachable_postgres_is_one_line(tmp_path: Path) -> None:
    """A node whose PostgreSQL cannot be reached at start says so in one
    line (no traceback) and exits 1, for systemd to try again."""
    path = tmp_path / "node.toml"
    path.write_text(
        "[server]\nport = 0\n"
        f'[auth]\njwt_secret = "{SECRET}"\n'
        '[storage]\nbackend = "postgres"\n'
        f'dsn = "host=127.0.0.1 port={free_port()} dbname=chatd connect_timeout=2"\n'
    )
    result = run_cli("--config", str(path))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("chatd: cannot start: database 127.0.0.1:"), result.stderr
    assert "Traceback" not in result.stderr and "connection failed" in lines[-1]


# --- modes whose modules are an extra of the package ----------------------------


@pytest.mark.parametrize(
    ("sections", "missing", "key", "extra"),
    [
        (
            {"storage": {"backend": "postgres", "dsn": "host=db"}},
            "psycopg",
            "[storage] backend",
            "cluster",
        ),
        (
            {"storage": {"backend": "postgres", "dsn": "host=db"}, "bus": {"backend": "redis"}},
            "coredis",
            "[bus] backend",
            "cluster",
        ),
        (
            {"webhooks": {"url": "https://example.com/hook", "secret": "whsec_" + "A" * 24}},
            "httpx",
            "[webhooks] url",
            "webhooks",
        ),
    ],
)
def test_a_mode_whose_modules_are_missing_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, sections: dict[str, Any], missing: str, key: str, extra: str
) -> None:
    """(As ``pip install chatd`` without the extra: the module not found.)"""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == missing else find_spec(name, *a),
    )
    doc = {"auth": {"jwt_secret": SECRET}, **sections}
    text = refused(doc, re.escape(f"{key}: needs {missing}, which is not installed"))
    assert f"pip install 'chatd[{extra}]'" in text
    # installed (as in this environment and the zipapp): accepted
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    from_dict(doc, source=SRC)
