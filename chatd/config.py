"""The configuration: TOML in, one frozen, validated object out.

``load(path)`` reads the file with :mod:`tomllib`, converts it with msgspec into
the typed structs below (unknown keys are refused, so a typo is caught at
start), then checks what types alone cannot say. Every problem becomes one
``ConfigError`` line that names the file and the key, e.g.::

    chatd.toml: [limits] messages_per_minute: Expected `int`, got `str`

Every setting has a default; ``chatd.toml.example`` documents each one.
Relative paths are taken from the working directory.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import ipaddress
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from chatd.errors import ConfigError
from chatd.origins import PATTERN as ORIGIN_PATTERN

#: ``\Z``, not ``$``: msgspec searches, and ``$`` would let "general\n" through.
ROOM_NAME_PATTERN = r"^[\w.:@-]+\Z"
RoomName = Annotated[str, Meta(min_length=1, max_length=64, pattern=ROOM_NAME_PATTERN)]
UserId = Annotated[int, Meta(ge=1, le=2**63 - 1)]
Seconds = Annotated[float, Meta(gt=0, le=86400)]
PositiveInt = Annotated[int, Meta(ge=1, le=2**31 - 1)]

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section, frozen=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8080
    #: Whole HTTP request / WebSocket upgrade must arrive within this.
    handshake_timeout_seconds: Seconds = 10.0
    #: Server sends a WebSocket ping this often.
    ping_interval_seconds: Seconds = 30.0
    #: A connection silent for this long is dropped.
    idle_timeout_seconds: Seconds = 75.0
    #: Bytes queued for one connection before it is closed as too slow (1013).
    send_buffer_bytes: Annotated[int, Meta(ge=4096)] = 1 << 20
    #: Accept permessage-deflate when a client offers it.
    compression: bool = True
    #: On SIGTERM/SIGINT, how long to wait for clients to finish closing.
    shutdown_timeout_seconds: Seconds = 5.0
    #: On SIGTERM, how long /readyz answers 503 (so a load balancer moves
    #: traffic away) before chatd stops accepting and closes connections.
    drain_grace_seconds: Annotated[float, Meta(ge=0, le=3600)] = 0.0
    #: "host:port" to serve /metrics on instead of the main port ("" = main port).
    metrics_listen: str = ""
    #: WebSocket connections open at once, in all; more are closed with 1013.
    max_connections: Annotated[int, Meta(ge=1)] = 10_000
    #: WebSocket connections open at once from one client address (1013 past it).
    max_connections_per_address: Annotated[int, Meta(ge=1)] = 256
    #: Addresses of reverse proxies whose X-Forwarded-For / X-Real-IP name the
    #: client (for the per-address limit and the logs). Others are not believed.
    trusted_proxies: tuple[str, ...] = ()
    #: Development only: POST /dev/token mints a token for any name, to
    #: loopback clients, and only when ``host`` is a loopback address.
    dev_tokens: bool = False
    #: Origins whose pages may open a WebSocket (``*`` patterns; none: any
    #: origin): others get 403 at the handshake (chatd/origins.py).
    allowed_origins: tuple[str, ...] = ()


class AuthConfig(_Section, frozen=True):
    jwt_secret: str = ""
    algorithms: tuple[str, ...] = ("HS256",)
    public_key_file: str = ""
    leeway_seconds: Annotated[float, Meta(ge=0, le=3600)] = 10.0
    require_exp: bool = True
    #: When non-empty, tokens must carry this ``iss`` / ``aud``.
    issuer: str = ""
    audience: str = ""


class StorageConfig(_Section, frozen=True):
    #: "sqlite" (one node, the default) or "postgres" (several nodes share it).
    backend: Literal["sqlite", "postgres"] = "sqlite"
    sqlite_path: str = "data/chatd.db"
    #: PostgreSQL connection string (libpq form), for backend = "postgres".
    dsn: str = ""
    #: PostgreSQL connections used for reads (the writer has its own).
    pool_size: Annotated[int, Meta(ge=1, le=100)] = 4
    #: SQLite ``synchronous``: "normal" survives a killed process; "full" also
    #: survives power loss, at a cost in commit throughput.
    synchronous: Literal["normal", "full"] = "normal"
    #: SQLite: seconds between WAL checkpoints, run on a thread of their own
    #: (PASSIVE: they never hold up a commit).
    checkpoint_interval_seconds: Annotated[float, Meta(ge=0.01, le=3600)] = 1.0
    #: SQLite: WAL content past which a checkpoint makes the writer start the
    #: WAL over (RESTART), so the -wal file stops growing at about this size.
    wal_max_bytes: Annotated[int, Meta(ge=1 << 20, le=1 << 40)] = 256 << 20


class RoomsConfig(_Section, frozen=True):
    public: tuple[RoomName, ...] = ("general", "random")
    private: dict[RoomName, tuple[UserId, ...]] = msgspec.field(default_factory=dict)
    #: Roles in the config's rooms, set at each start (never taken back:
    #: ``chatd room set-role ... member`` does that).
    owners: dict[RoomName, tuple[UserId, ...]] = msgspec.field(default_factory=dict)
    moderators: dict[RoomName, tuple[UserId, ...]] = msgspec.field(default_factory=dict)

    def roles(self, room: str) -> dict[int, Literal["owner", "moderator"]]:
        """The roles the config gives in ``room``."""
        roles: dict[int, Literal["owner", "moderator"]] = {
            uid: "moderator" for uid in self.moderators.get(room, ())
        }
        roles.update({uid: "owner" for uid in self.owners.get(room, ())})
        return roles


class LimitsConfig(_Section, frozen=True):
    messages_per_minute: PositiveInt = 10
    messages_per_hour: PositiveInt = 100
    max_content_length: Annotated[int, Meta(ge=1, le=1_000_000)] = 4000
    max_frame_bytes: Annotated[int, Meta(ge=1024, le=64 << 20)] = 65536
    #: Invalid frames a connection may send per minute (burst of the same
    #: size) before it is closed with 1008.
    invalid_frames_per_minute: PositiveInt = 30
    #: join_room, room_history, dm_history and room_members per user per minute (burst of
    #: the same size): their own bucket, more generous than messages'.
    reads_per_minute: PositiveInt = 120
    #: Most entries in one client message_batch (INVALID_FORMAT past it).
    max_batch_entries: Annotated[int, Meta(ge=1, le=1000)] = 100
    #: Largest history page; a request's limit is clamped to 1..this.
    max_history_page: Annotated[int, Meta(ge=1, le=1000)] = 100
    #: Longest audio message, in seconds (``duration``).
    max_audio_seconds: Annotated[float, Meta(gt=0, le=86400)] = 3600.0
    #: Most messages replayed by join_room with since_id.
    recovery_max_messages: Annotated[int, Meta(ge=0, le=100_000)] = 1000
    #: Most members listed in join_room_ack (member_count says how many are
    #: online; room_members pages the rest), and in each list of a
    #: room_presence summary.
    ack_members: Annotated[int, Meta(ge=1, le=1000)] = 100
    #: Above this many members online in a room, presence changes there are
    #: sent as one room_presence summary a second instead of one
    #: user_connected / user_disconnected per change to every member.
    presence_max_members: Annotated[int, Meta(ge=1, le=10_000_000)] = 100
    #: Rooms with more members online than this send no read receipts
    #: (every member would get one per reader per second).
    receipts_max_members: Annotated[int, Meta(ge=0, le=10_000_000)] = 50
    #: typing frames per user per minute (burst of the same size); a start
    #: is relayed at most once per 2 s whatever this is.
    typing_per_minute: PositiveInt = 60
    #: Seconds after sending it that its author may edit a message (0: no
    #: limit). Deletions have no window.
    edit_window_seconds: Annotated[int, Meta(ge=0, le=10 * 365 * 86400)] = 0
    #: A search still reading after this many milliseconds answers with
    #: what it has found (has_more, and where to go on from).
    search_time_ms: Annotated[int, Meta(ge=1, le=60_000)] = 250


class ApiConfig(_Section, frozen=True):
    #: Bearer keys accepted by POST /api/publish (none: the API is off).
    keys: tuple[Annotated[str, Meta(min_length=16)], ...] = ()
    #: Rate limits of the system sender (all API calls together).
    messages_per_minute: PositiveInt = 600
    messages_per_hour: PositiveInt = 20000
    #: Largest ``data`` object a notification may carry, JSON-encoded.
    max_data_bytes: Annotated[int, Meta(ge=0, le=65536)] = 8192


class WebhooksConfig(_Section, frozen=True):
    """Deliveries to the application's backend (docs/webhooks.md)."""

    #: Where deliveries are POSTed ("" = webhooks off).
    url: str = ""
    #: The signing secret, ``whsec_`` + base64 (Standard Webhooks).
    secret: str = ""
    #: While rotating: the secret before ``secret``; deliveries carry both
    #: signatures until it is removed.
    previous_secret: str = ""
    #: Which events are sent.
    events: tuple[Literal["message.created", "message.unread"], ...] = (
        "message.created",
        "message.unread",
    )
    #: How long after a message a user away is told of it, when still unread.
    debounce_seconds: Annotated[float, Meta(ge=0, le=86400)] = 60.0
    #: One attempt's time limit (connect, send, answer).
    timeout_seconds: Annotated[float, Meta(gt=0, le=300)] = 5.0
    #: Attempts of a delivery before it is given up (logged, counted).
    max_attempts: Annotated[int, Meta(ge=1, le=1000)] = 10


class BusConfig(_Section, frozen=True):
    """How nodes tell each other about messages and presence."""

    #: "local" (one node) or "redis" (several nodes; needs the postgres store).
    backend: Literal["local", "redis"] = "local"
    url: str = "redis://127.0.0.1:6379/0"
    #: Prefix of every Redis key and channel: nodes with the same prefix are
    #: one cluster.
    prefix: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[\w.:-]+\Z")] = "chatd"
    #: This node's name in the cluster ("" = host name, port and a random tag).
    node_id: str = ""
    #: Presence entries of a node that stops renewing them expire after this.
    lease_seconds: Annotated[float, Meta(ge=1, le=3600)] = 15.0


class LoggingConfig(_Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"


#: Days messages are kept: 0 keeps them for ever; at most 100 years.
Days = Annotated[int, Meta(ge=0, le=36500)]


class RetentionConfig(_Section, frozen=True):
    """How long messages are kept (``chatd/retention.py``)."""

    #: Rooms' messages, in days (0: for ever).
    room_days: Days = 0
    #: Conversations' messages (and the system sender's notifications to a
    #: user), in days (0: for ever).
    direct_days: Days = 0
    #: A room's own number of days, instead of ``room_days`` (0: for ever).
    rooms: dict[RoomName, Days] = msgspec.field(default_factory=dict)
    #: Messages deleted per writer operation: what bounds how long a purge
    #: holds the writer at a time.
    batch_size: Annotated[int, Meta(ge=1, le=10000)] = 100
    #: Seconds between two passes over the channels.
    interval_seconds: Annotated[float, Meta(ge=1, le=86400)] = 300.0


class Config(_Section, frozen=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    rooms: RoomsConfig = msgspec.field(default_factory=RoomsConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    webhooks: WebhooksConfig = msgspec.field(default_factory=WebhooksConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    bus: BusConfig = msgspec.field(default_factory=BusConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    #: Where the config came from, for messages; not a TOML key.
    source: str = "<defaults>"
    #: The public key's PEM text, read from ``auth.public_key_file``.
    public_key: str = ""


def load(path: str | Path) -> Config:
    """Read, parse and validate the config file at ``path``."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read the config file: {exc.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: the config file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: not valid TOML: {exc}") from None
    return from_dict(doc, source=name)


def from_dict(doc: dict[str, object], *, source: str = "<dict>") -> Config:
    """Validate an already-parsed document (tests build configs this way)."""
    for reserved in ("source", "public_key"):
        if reserved in doc:
            raise ConfigError(f"{source}: {reserved}: unknown key")
    _check_private_rooms(doc, source)
    _check_retention_rooms(doc, source)
    try:
        config = msgspec.convert(doc, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(str(exc))}") from None
    config = msgspec.structs.replace(config, source=source)
    return _check(config)


#: The [rooms.X] tables of room name -> user ids.
_ROOM_TABLES = ("private", "owners", "moderators")


def _check_private_rooms(doc: dict[str, object], source: str) -> None:
    """msgspec cannot name a dict's key in its errors; name the room here."""
    rooms = doc.get("rooms")
    for table in _ROOM_TABLES:
        named = rooms.get(table) if isinstance(rooms, dict) else None
        if not isinstance(named, dict):
            continue
        for name, members in named.items():
            _check_room_name(name, f"{source}: [rooms.{table}]")
            if not isinstance(members, list) or not all(
                type(m) is int and 1 <= m < 2**63 for m in members
            ):
                raise ConfigError(
                    f"{source}: [rooms.{table}] {name}: expected a list of user ids (integers >= 1)"
                )


def _check_room_name(name: str, where: str) -> None:
    """A room name used as a table's key (msgspec cannot name the key)."""
    if not re.fullmatch(ROOM_NAME_PATTERN, name) or len(name) > 64:
        raise ConfigError(f"{where} {name!r}: a room name is 1 to 64 letters, digits or ._:@-")


def _check_retention_rooms(doc: dict[str, object], source: str) -> None:
    """[retention.rooms]: name the room, as ``_check_private_rooms``."""
    retention = doc.get("retention")
    rooms = retention.get("rooms") if isinstance(retention, dict) else None
    if not isinstance(rooms, dict):
        return
    for name, days in rooms.items():
        _check_room_name(name, f"{source}: [retention.rooms]")
        if type(days) is not int or not 0 <= days <= 36500:
            raise ConfigError(
                f"{source}: [retention.rooms] {name}: "
                "expected a whole number of days from 0 (for ever) to 36500"
            )


def _describe(message: str) -> str:
    """Turn msgspec's ``... - at `$.limits.port``` into ``[limits] port: ...``."""
    match = re.fullmatch(r"(.*) - at `\$\.?(.*)`", message, flags=re.S)
    if not match:
        unknown = re.fullmatch(r"Object contains unknown field `(.*)`", message)
        return f"[{unknown.group(1)}]: unknown section" if unknown else message
    what, where = match.groups()
    unknown = re.fullmatch(r"Object contains unknown field `(.*)`", what)
    if unknown:
        where = f"{where}.{unknown.group(1)}" if where else unknown.group(1)
        what = "unknown key"
    return f"{_key(where)}: {what}"


def _key(path: str) -> str:
    parts = path.split(".")
    if len(parts) == 1:
        return f"[{parts[0]}]"
    if parts[0] == "rooms" and parts[1] in _ROOM_TABLES and len(parts) > 2:
        return f"[rooms.{parts[1]}] {'.'.join(parts[2:])}"
    return f"[{parts[0]}] {'.'.join(parts[1:])}"


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def split_address(address: str) -> tuple[str, int]:
    """``"127.0.0.1:9090"`` or ``"[::1]:9090"`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def _check(config: Config) -> Config:
    """Rules that span keys or touch the file system."""
    src = config.source
    auth = config.auth
    algorithms = set(auth.algorithms)
    if not algorithms:
        raise ConfigError(f"{src}: [auth] algorithms: name at least one algorithm")
    unknown = algorithms - HMAC_ALGORITHMS - KEY_ALGORITHMS
    if unknown:
        raise ConfigError(f"{src}: [auth] algorithms: unsupported {sorted(unknown)}")
    if algorithms & HMAC_ALGORITHMS and algorithms & KEY_ALGORITHMS:
        raise ConfigError(f"{src}: [auth] algorithms: do not mix HS* with public-key algorithms")
    public_key = ""
    if algorithms & HMAC_ALGORITHMS:
        if not auth.jwt_secret:
            raise ConfigError(f"{src}: [auth] jwt_secret: required for {sorted(algorithms)}")
    else:
        if not auth.public_key_file:
            raise ConfigError(f"{src}: [auth] public_key_file: required for {sorted(algorithms)}")
        try:
            public_key = Path(auth.public_key_file).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(
                f"{src}: [auth] public_key_file: cannot read {auth.public_key_file!r}: {reason}"
            ) from None
    both = set(config.rooms.public) & set(config.rooms.private)
    if both:
        raise ConfigError(f"{src}: [rooms] public: {sorted(both)} also declared in [rooms.private]")
    if len(set(config.rooms.public)) != len(config.rooms.public):
        raise ConfigError(f"{src}: [rooms] public: a room is listed twice")
    declared = {*config.rooms.public, *config.rooms.private}
    for table in ("owners", "moderators"):
        for name in getattr(config.rooms, table):
            if name not in declared:
                raise ConfigError(
                    f"{src}: [rooms.{table}] {name}: not a room of [rooms] public"
                    " or [rooms.private]"
                )
    for name, owners in config.rooms.owners.items():
        twice = set(owners) & set(config.rooms.moderators.get(name, ()))
        if twice:
            raise ConfigError(
                f"{src}: [rooms.moderators] {name}: {sorted(twice)} also in [rooms.owners]"
            )
    if config.server.idle_timeout_seconds <= config.server.ping_interval_seconds:
        raise ConfigError(
            f"{src}: [server] idle_timeout_seconds: must be longer than ping_interval_seconds"
        )
    if config.limits.messages_per_hour < config.limits.messages_per_minute:
        raise ConfigError(
            f"{src}: [limits] messages_per_hour: must be at least messages_per_minute"
        )
    if config.api.messages_per_hour < config.api.messages_per_minute:
        raise ConfigError(f"{src}: [api] messages_per_hour: must be at least messages_per_minute")
    hooks = config.webhooks
    if hooks.url:
        if not hooks.url.lower().startswith(("http://", "https://")):
            raise ConfigError(f"{src}: [webhooks] url: must be an http:// or https:// URL")
        for key in ("secret", "previous_secret"):
            value = getattr(hooks, key)
            if (value or key == "secret") and webhook_key(value) is None:
                raise ConfigError(
                    f"{src}: [webhooks] {key}: must be whsec_ followed by base64"
                    " (at least 16 bytes)"
                )
    if config.server.metrics_listen:
        try:
            split_address(config.server.metrics_listen)
        except ValueError as exc:
            raise ConfigError(f"{src}: [server] metrics_listen: {exc}") from None
    for proxy in config.server.trusted_proxies:
        try:
            ipaddress.ip_address(proxy)
        except ValueError:
            raise ConfigError(
                f"{src}: [server] trusted_proxies: {proxy!r} is not an IP address"
            ) from None
    if config.storage.backend == "postgres" and not config.storage.dsn:
        raise ConfigError(f'{src}: [storage] dsn: required when backend = "postgres"')
    if config.bus.backend == "redis" and config.storage.backend != "postgres":
        raise ConfigError(
            f'{src}: [bus] backend: "redis" needs [storage] backend = "postgres"'
            " (nodes must share one store)"
        )
    for origin in config.server.allowed_origins:
        if not ORIGIN_PATTERN.match(origin):
            raise ConfigError(
                f"{src}: [server] allowed_origins: {origin!r} is not an origin"
                ' (scheme://host[:port], "*" for any run of characters, or "null")'
            )
    _check_installed(config, src)
    if config.server.dev_tokens:
        if config.server.host not in LOOPBACK_HOSTS:
            raise ConfigError(
                f"{src}: [server] dev_tokens: only allowed when host is a loopback address"
            )
        if not algorithms & HMAC_ALGORITHMS:
            raise ConfigError(f"{src}: [server] dev_tokens: needs an HS* jwt_secret to sign with")
    return msgspec.structs.replace(config, public_key=public_key)


#: What a mode of the config needs installed beyond chatd's own
#: dependencies (the zipapp has everything; ``pip install chatd`` has not),
#: and the extra of ``pyproject.toml`` that installs it.
_EXTRAS: tuple[tuple[str, Callable[[Config], bool], tuple[str, ...], str], ...] = (
    ("[storage] backend", lambda c: c.storage.backend == "postgres", ("psycopg",), "cluster"),
    ("[bus] backend", lambda c: c.bus.backend == "redis", ("coredis",), "cluster"),
    ("[webhooks] url", lambda c: bool(c.webhooks.url), ("httpx",), "webhooks"),
)


def _check_installed(config: Config, src: str) -> None:
    """A mode whose modules are not installed: one line naming the key
    and the extra to install."""
    for key, wanted, modules, extra in _EXTRAS:
        if not wanted(config):
            continue
        missing = [name for name in modules if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(
                f"{src}: {key}: needs {', '.join(missing)}, which is not installed:"
                f" pip install 'chatd[{extra}]' (the chatd.pyz zipapp has it)"
            )


def webhook_key(secret: str) -> bytes | None:
    """A Standard Webhooks secret's key (``whsec_`` + base64), or None."""
    if not secret.startswith("whsec_"):
        return None
    try:
        key = base64.b64decode(secret[len("whsec_") :], validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) >= 16 else None
