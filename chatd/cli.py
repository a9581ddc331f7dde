"""The command line: ``chatd [serve] --config FILE``, ``chatd token ...``,
``chatd user add ...``, ``chatd room create|add-member|list ...``,
``chatd backup --to FILE``, ``chatd migrate --from-sqlite FILE``.

Every failure a user can cause (a bad config, a busy port) is one line on
stderr and a non-zero exit: 2 for usage and config errors, 1 for the rest.
Never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import signal
import sqlite3
import sys
from collections.abc import Sequence

import trio

from chatd import __version__
from chatd.admin import add_commands
from chatd.auth import MAX_USER_ID, issue
from chatd.config import Config, load
from chatd.errors import ConfigError, StorageError
from chatd.migrate import add_command as add_migrate
from chatd.server import ChatServer

log = logging.getLogger("chatd")
#: The most open files chatd asks for when the hard limit is unlimited.
MAX_OPEN_FILES = 1_048_576


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``chatd`` and of the zipapp."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help", "--version")):
        args.insert(0, "serve")
    parser = _parser()
    ns = parser.parse_args(args)
    try:
        config = load(ns.config)
    except ConfigError as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 2
    try:
        result: int = ns.func(config, ns)
    except KeyboardInterrupt:
        return 130
    except sqlite3.Error as exc:
        print(f"chatd: database {config.storage.sqlite_path}: {exc}", file=sys.stderr)
        return 1
    except StorageError as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 1
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatd",
        description="A self-hosted real-time chat daemon (WebSocket, JWT, SQLite).",
    )
    parser.add_argument("--version", action="version", version=f"chatd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server (the default command)")
    _config_arg(serve)
    serve.set_defaults(func=_serve)

    token = commands.add_parser("token", help="print a token signed with the config's jwt_secret")
    _config_arg(token)
    token.add_argument("--user-id", type=_user_id, required=True, help="the user's integer id")
    token.add_argument("--username", required=True, help="the user's display name")
    token.add_argument(
        "--ttl", type=_positive, default=86400.0, help="lifetime in seconds (default 86400)"
    )
    token.set_defaults(func=_token)

    add_commands(commands, _config_arg, _user_id)
    add_migrate(commands, _config_arg)
    return parser


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="the chatd TOML config")


def _user_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= MAX_USER_ID:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_USER_ID}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _token(config: Config, ns: argparse.Namespace) -> int:
    if not 1 <= len(ns.username) <= 64:
        print("chatd: --username must be 1 to 64 characters", file=sys.stderr)
        return 2
    try:
        print(issue(config, ns.user_id, ns.username, ns.ttl))
    except ValueError as exc:
        print(f"chatd: {config.source}: {exc}", file=sys.stderr)
        return 2
    return 0


#: The cyclic collector's first threshold while serving (Python's default is
#: 700). A message lives in several objects until its commit is acknowledged;
#: with the default, the collector ran every few dozen messages and swept the
#: long-lived generations too (about 7 µs a message, pauses of tens of ms).
#: Objects freed by reference counting do not count towards it, so garbage
#: held back is bounded (measured: no collection in 40,000 messages of the
#: commit scenario, against 600 with the default).
GC_THRESHOLD = 10_000


def _serve(config: Config, ns: argparse.Namespace) -> int:
    del ns
    setup_logging(config.logging.level)
    raise_open_files()
    # Everything imported so far lives as long as the process: out of the
    # collector's sight, so that a full collection walks only what serving
    # created.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    try:
        trio.run(serve_until_signalled, config)
    except (OSError, StorageError, BaseExceptionGroup) as exc:
        cause = _first_cause(exc)
        if isinstance(cause, StorageError):
            print(f"chatd: cannot start: {cause}", file=sys.stderr)
            return 1
        if cause is None:
            raise
        print(
            f"chatd: cannot serve on {config.server.host}:{config.server.port} "
            f"with database {config.storage.sqlite_path}: {cause}",
            file=sys.stderr,
        )
        return 1
    return 0


def raise_open_files() -> tuple[int, int]:
    """Raise the soft limit of open files to the hard one (as Go's runtime
    does): each connection is a descriptor, and a shell's default soft
    limit (often 1,024) would refuse connections long before the machine
    runs out. The limits after, (soft, hard); logged when raised."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        target = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (OSError, ValueError) as exc:  # pragma: no cover - refused: keep the soft one
                log.warning("open files: cannot raise the limit from %d: %s", soft, exc)
                return soft, hard
            log.info("open files: soft limit raised from %d to %d (the hard limit)", soft, target)
            return target, hard
    return soft, hard


def _first_cause(exc: BaseException) -> OSError | StorageError | None:
    """The OSError or StorageError inside ``exc`` (Trio wraps task errors in
    groups)."""
    if isinstance(exc, OSError | StorageError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_cause(inner)
            if found is not None:
                return found
    return None


async def serve_until_signalled(config: Config) -> None:
    """Run a server until SIGINT or SIGTERM (a second one stops at once);
    SIGHUP reloads the config file's rooms, limits and API settings."""
    server = ChatServer(config)
    wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    with trio.open_signal_receiver(*wanted) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        await _reload(server, config.source)
                    elif server.draining:
                        log.warning("second %s: stopping now", name)
                        nursery.cancel_scope.cancel()
                        return
                    else:
                        log.info("%s: shutting down", name)
                        server.stop()

            nursery.start_soon(watch)
            await server.run()
            nursery.cancel_scope.cancel()


async def _reload(server: ChatServer, path: str) -> None:
    """Reload ``path``; a bad file is logged and the running config kept."""
    try:
        config = load(path)
    except ConfigError as exc:
        log.error("SIGHUP: config not reloaded: %s", exc)
        return
    if server.draining:
        return
    try:
        await server.reload(config)
    except Exception as exc:  # the store refused the new rooms
        log.error("SIGHUP: config not reloaded: %s", exc)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # coredis logs its own retries at INFO ("No matching script", the first
    # use of each Lua script on a Redis): chatd reports what matters itself.
    logging.getLogger("coredis").setLevel(max(logging.WARNING, logging.getLogger().level))
