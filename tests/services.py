"""Moved to ``tests/helpers/services.py``; this name stays for bench/cluster.py
and bench/pgstore.py, which import it (the tests do not)."""

from tests.helpers.servers import free_port
from tests.helpers.services import postgres_server, redis_server

__all__ = ["free_port", "postgres_server", "redis_server"]
