"""Which web pages may open a WebSocket to chatd: ``[server] allowed_origins``.

Pure. Browsers send ``Origin`` with every WebSocket handshake, and a page
on another site could otherwise open a connection with whatever token it
got hold of (a query-string token in a log, a development token). With
``allowed_origins`` set, an upgrade whose ``Origin`` matches none of its
patterns is refused with 403 before the upgrade (``handshake.Gate``). A
request without ``Origin`` is not a browser's and is let through: the
check is about browsers, which always send it. A server listening on a
loopback address also lets through loopback origins (its own page, with
development tokens), whatever the list says. Unset (the default), every
origin is let through, as before.

A pattern is an origin (``https://chat.example.com``, ``http://localhost:3000``)
where ``*`` stands for any run of characters but ``/``
(``https://*.example.com``, ``http://localhost:*``); ``*`` alone lets
every origin through, and ``null`` the opaque origin of sandboxed pages and
``file:`` URLs. Case does not count (origins' schemes and hosts are
case-insensitive).
"""

from __future__ import annotations

import re
from functools import lru_cache

#: What a pattern may be (checked when the config is read).
PATTERN = re.compile(r"^(\*|null|(https?|\*)://[^/\s]+)$", re.IGNORECASE)
#: The origins of pages served by a server on a loopback address.
_LOOPBACK = re.compile(r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$", re.IGNORECASE)


@lru_cache(maxsize=8)
def _compiled(patterns: tuple[str, ...]) -> re.Pattern[str]:
    parts = ("[^/]*".join(re.escape(piece) for piece in p.split("*")) for p in patterns)
    return re.compile("^(" + "|".join(parts) + ")$", re.IGNORECASE)


def allowed(origin: str | None, patterns: tuple[str, ...], loopback: bool) -> bool:
    """Whether an upgrade with this ``Origin`` (None: none sent) may go on."""
    if not patterns or origin is None or "*" in patterns:
        return True
    if loopback and _LOOPBACK.match(origin):
        return True
    return _compiled(patterns).match(origin) is not None
