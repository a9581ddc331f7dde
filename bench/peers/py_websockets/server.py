"""A small chat server on Python's ``websockets`` (asyncio): a peer that
chatd's benchmark measures against (see docs/benchmarks.md).

It speaks the subset of chatd's protocol the benchmark uses, in the same JSON
shape, and keeps everything in memory (nothing is persisted):

- ``ws://HOST:PORT/ws/chat?token=JWT``: HS256 checked with PyJWT (``exp``
  required, 10 s leeway); a bad token is refused with HTTP 401.
- ``join_room {room}`` -> ``join_room_ack {room, success, message, members}``.
- ``room_message {room, content}`` -> ``room_message`` to every member, the
  sender included, with a server-assigned increasing ``id`` and
  ``created_at``; only the sender's copy carries its ``request_id``. The
  shared frame is encoded once and sent with ``websockets.broadcast()``.

Usage: ``python server.py --port 9002 --secret S [--deflate] [--max-seconds 900]``.
It exits on SIGTERM/SIGINT or after ``--max-seconds``, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from websockets.asyncio.server import ServerConnection, broadcast, serve

ROOMS: dict[str, set[ServerConnection]] = {}
IDENTS: dict[ServerConnection, tuple[int, str]] = {}
SEQ = 0


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dumps(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def make_verifier(secret: str):  # type: ignore[no-untyped-def]
    def process_request(connection: ServerConnection, request: Any) -> Any:
        url = urlsplit(request.path)
        if url.path != "/ws/chat":
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        token = (parse_qs(url.query).get("token") or [""])[0]
        try:
            claims = jwt.decode(
                token, secret, algorithms=["HS256"], leeway=10, options={"require": ["exp"]}
            )
            user_id = claims["user_id"]
            if type(user_id) is not int or user_id < 1:
                raise ValueError("user_id")
        except Exception:
            return connection.respond(HTTPStatus.UNAUTHORIZED, "bad token\n")
        IDENTS[connection] = (user_id, str(claims.get("username") or f"user{user_id}"))
        return None

    return process_request


def error(code: str, message: str, request_id: Any) -> str:
    frame: dict[str, Any] = {
        "type": "error",
        "data": {"code": code, "message": message},
        "timestamp": now_iso(),
    }
    if request_id is not None:
        frame["request_id"] = request_id
    return dumps(frame)


def join_ack(room: str, members: set[ServerConnection], rid: Any) -> str:
    """The ack, listing the room's users. Built here, not in ``handler``:
    locals of the handler live as long as the connection waits for its next
    frame, and in a room of 10,000 the member list is a few MB a connection."""
    seen = {IDENTS[m][0]: IDENTS[m][1] for m in members}
    ack: dict[str, Any] = {
        "type": "join_room_ack",
        "data": {
            "room": room,
            "success": True,
            "message": "Joined room successfully",
            "members": [{"user_id": u, "username": n} for u, n in seen.items()],
        },
        "timestamp": now_iso(),
    }
    if rid is not None:
        ack["request_id"] = rid
    return dumps(ack)


async def handler(ws: ServerConnection) -> None:
    global SEQ
    user_id, username = IDENTS[ws]
    joined: set[str] = set()
    try:
        async for raw in ws:
            if not isinstance(raw, str):
                await ws.send(error("INVALID_FORMAT", "binary frames are not supported", None))
                continue
            try:
                msg = json.loads(raw)
                data = msg.get("data") or {}
                rid = msg.get("request_id")
                kind = msg.get("type")
            except (ValueError, AttributeError):
                await ws.send(error("INVALID_FORMAT", "not JSON", None))
                continue
            if kind == "join_room":
                room = data.get("room")
                if not isinstance(room, str) or not room:
                    await ws.send(error("INVALID_FORMAT", "room required", rid))
                    continue
                members = ROOMS.setdefault(room, set())
                members.add(ws)
                joined.add(room)
                await ws.send(join_ack(room, members, rid))
            elif kind == "room_message":
                room = data.get("room")
                members = ROOMS.get(room)  # type: ignore[arg-type]
                if not members or ws not in members:
                    await ws.send(error("PERMISSION_DENIED", "not in room", rid))
                    continue
                content = data.get("content")
                if not isinstance(content, str) or not content.strip():
                    await ws.send(error("INVALID_FORMAT", "content", rid))
                    continue
                SEQ += 1
                now = now_iso()
                frame: dict[str, Any] = {
                    "type": "room_message",
                    "data": {
                        "id": SEQ,
                        "room": room,
                        "user_id": user_id,
                        "username": username,
                        "content": content,
                        "message_type": "text",
                        "created_at": now,
                    },
                    "timestamp": now,
                    "user_id": user_id,
                }
                shared = dumps(frame)
                if rid is None:
                    broadcast(members, shared)
                else:
                    broadcast([m for m in members if m is not ws], shared)
                    frame["request_id"] = rid
                    await ws.send(dumps(frame))
            else:
                await ws.send(error("INVALID_FORMAT", "unsupported type", rid))
    except Exception:  # a connection reset ends this connection only
        pass
    finally:
        for room in joined:
            members = ROOMS.get(room)
            if members is not None:
                members.discard(ws)
                if not members:
                    del ROOMS[room]
        IDENTS.pop(ws, None)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9002)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--deflate", action="store_true", help="accept permessage-deflate")
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args()
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.cancel)
    async with serve(
        handler,
        args.host,
        args.port,
        process_request=make_verifier(args.secret),
        compression="deflate" if args.deflate else None,
        max_size=1 << 20,
        backlog=4096,
    ):
        print(
            f"websockets peer listening on {args.host}:{args.port} deflate={args.deflate}",
            flush=True,
        )
        try:
            await asyncio.wait_for(stop, args.max_seconds)
        except (TimeoutError, asyncio.CancelledError):
            pass


if __name__ == "__main__":
    asyncio.run(main())
