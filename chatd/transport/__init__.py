"""The I/O edge: one TCP port, HTTP through h11, WebSocket through wsproto."""
