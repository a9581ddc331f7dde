"""What several nodes share through Redis: rate limits and presence.

Each module does its I/O only through a ``coredis`` client that the caller
has entered (``async with coredis.Redis.from_url(url) as client``), and keeps
every key under the cluster's ``[bus] prefix``. Their Lua scripts compute
some key names themselves, so they need one Redis server (>= 6.2), not a
Redis Cluster.
"""
