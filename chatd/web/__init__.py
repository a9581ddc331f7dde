"""The browser client served at ``/``: static files shipped inside the package
(and so inside the zipapp), read once at start.

``index.html`` loads the reference ``WebSocketClient`` class, the protocol
document's, unchanged (``websocket-client.js``) and ``app.js``, which builds
the page on it. No build step, no third-party code.
"""

from __future__ import annotations

from importlib import resources

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

#: The page may load only its own files and talk only to its own server.
SECURITY_HEADERS = [
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-cache"),
]


def load_assets() -> dict[str, tuple[str, bytes]]:
    """URL path -> (content type, body) for every file of this package."""
    assets: dict[str, tuple[str, bytes]] = {}
    for entry in resources.files(__name__).iterdir():
        name = entry.name
        suffix = name[name.rfind(".") :] if "." in name else ""
        if entry.is_file() and suffix in TYPES:
            assets["/" + name] = (TYPES[suffix], entry.read_bytes())
    if "/index.html" in assets:
        assets["/"] = assets["/index.html"]
    return assets
