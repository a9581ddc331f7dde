"""The common WebSocket upgrade request, read and answered directly.

h11 parses every request on the port, and wsproto's handshake
(``WSConnection.initiate_upgrade_connection``) then writes an upgrade
request out again and parses it a second time with an h11 connection of its
own: about a fifth of a handshake's CPU. ``read_upgrade`` reads the request
that browsers and client libraries send, in one pass, when the whole head
came in the first read; ``response`` writes the 101 as wsproto's h11 would.

It takes only requests that h11 and wsproto accept and read alike, and
leaves every other one to them (``None``): so a request read here gets
exactly the answer it would get through h11 and wsproto, and an odd or
malformed one still gets theirs. What it takes, all of:

* the whole head in ``data``, at most ``MAX_HEAD`` bytes, every line ending
  in CRLF; the request line ``GET <target> HTTP/1.1`` with an origin-form
  target (one ``/`` first) and no fragment;
* header lines ``name: value``, the name a token, the value visible ASCII
  with inner spaces or tabs (h11's grammar, without its obs-text, control
  characters and folded lines);
* no Content-Length or Transfer-Encoding; exactly one each of Host,
  Connection, Upgrade, Sec-WebSocket-Key and Sec-WebSocket-Version;
* ``Upgrade: websocket`` (any case), a Connection token ``upgrade`` (any
  case), ``Sec-WebSocket-Version: 13``, a Host IDNA reads as ASCII (no
  ``xn--``).

Sec-WebSocket-Extensions and Sec-WebSocket-Protocol are split as wsproto
splits them (every such header, comma-separated, stripped). Which extensions
and subprotocol are agreed is the gate's (``handshake.py``), with wsproto's
own ``server_extensions_handshake``.
"""

from __future__ import annotations

import re

from wsproto.utilities import generate_accept_token

#: The largest head read here (h11's limit, ``http.MAX_HEAD_BYTES``, is twice
#: as large: a head this size never passes it).
MAX_HEAD = 8192

# h11's header_field with vchar for its field_vchar (no obs-text, no
# control characters), then CRLF: name, value.
_NAME = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_VALUE = rb"(?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?"
_FIELD = rb"(%s):[ \t]*(%s)[ \t]*\r\n" % (_NAME, _VALUE)
_HEAD = re.compile(
    rb"GET (/[\x21-\x7e]*) HTTP/1\.1\r\n((?:%s:[ \t]*%s[ \t]*\r\n)*)\r\n" % (_NAME, _VALUE)
)
_FIELDS = re.compile(_FIELD)
#: Headers that must come exactly once (wsproto reads the last of several).
_ONCE = (b"host", b"connection", b"upgrade", b"sec-websocket-key", b"sec-websocket-version")


class Upgrade:
    """A WebSocket upgrade request read by ``read_upgrade``.

    ``headers`` are as h11 gives them (names in lower case, values without
    surrounding whitespace, in order); ``path`` and ``query`` are
    ``urlsplit``'s of the target; ``extensions`` and ``subprotocols`` are
    the offers as wsproto lists them."""

    __slots__ = ("extensions", "headers", "key", "path", "query", "subprotocols", "target")

    def __init__(
        self,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        key: bytes,
        extensions: list[str],
        subprotocols: list[str],
    ) -> None:
        self.target = target
        self.headers = headers
        self.key = key
        self.extensions = extensions
        self.subprotocols = subprotocols
        path, _, query = target.decode("ascii").partition("?")
        self.path = path
        self.query = query


def read_upgrade(data: bytes) -> tuple[Upgrade, bytes] | None:
    """The upgrade request at the start of ``data`` and the bytes after it,
    or None: not the common case (see the module's docstring), for h11."""
    head = _HEAD.match(data, 0, MAX_HEAD)
    if head is None:
        return None
    target = head[1]
    if target.startswith(b"//") or b"#" in target:
        return None  # a network-path reference or a fragment: urlsplit's business
    headers: list[tuple[bytes, bytes]] = []
    once: dict[bytes, bytes] = {}
    extensions: list[str] = []
    subprotocols: list[str] = []
    for raw_name, value in _FIELDS.findall(head[2]):
        name = raw_name.lower()
        headers.append((name, value))
        if name in _ONCE:
            if name in once:
                return None
            once[name] = value
        elif name == b"sec-websocket-extensions":
            extensions.extend(_split(value))
        elif name == b"sec-websocket-protocol":
            subprotocols.extend(_split(value))
        elif name == b"content-length" or name == b"transfer-encoding":
            return None
    if len(once) != len(_ONCE):
        return None
    if (
        once[b"upgrade"].lower() != b"websocket"
        or once[b"sec-websocket-version"] != b"13"
        or b"xn--" in once[b"host"]
        or not any(t.strip().lower() == b"upgrade" for t in once[b"connection"].split(b","))
    ):
        return None
    request = Upgrade(target, headers, once[b"sec-websocket-key"], extensions, subprotocols)
    return request, data[head.end() :]


def _split(value: bytes) -> list[str]:
    """wsproto's ``split_comma_header`` (the value is ASCII here)."""
    return [piece.decode("ascii").strip() for piece in value.split(b",")]


def response(key: bytes, subprotocol: str | None, extensions: bytes | None) -> bytes:
    """The 101 for ``key``, byte for byte what wsproto's handshake writes
    (through h11) for that subprotocol and agreed extensions."""
    parts = [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: ",
        generate_accept_token(key),
        b"\r\n",
    ]
    if subprotocol is not None:
        parts += [b"Sec-WebSocket-Protocol: ", subprotocol.encode("ascii"), b"\r\n"]
    if extensions is not None:
        parts += [b"Sec-WebSocket-Extensions: ", extensions, b"\r\n"]
    parts.append(b"\r\n")
    return b"".join(parts)
