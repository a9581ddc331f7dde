"""One PostgresStore writer's throughput: ``python bench/pgstore.py [--dsn DSN]``.

Without ``--dsn`` it starts a throwaway PostgreSQL from the distribution's
binaries (tests/helpers/services.py: fsync and synchronous_commit off, so this measures
chatd's side and PostgreSQL's CPU, not a disk). Two figures, in a fresh
database each time:

* one group's transaction alone (channel locks, ids, COPY, COMMIT), median of
  ``--groups`` groups of ``--size`` messages, and the client CPU it took on the
  writer thread (which shares the GIL with the Trio thread);
* appends through the Trio side (``append`` .. callbacks), as the server does.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
import statistics
import sys
import time
import uuid
from pathlib import Path

import psycopg
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatd.store import NewMessage
from chatd.store import postgres as pg
from chatd.store.pgschema import migrate


#: Each message's content: the same few words, or text from the search
#: benchmark's vocabulary (``--content words``).
CONTENTS = ["hello world " * 5]


def message(i: int, rooms: int) -> NewMessage:
    return NewMessage(
        user_id=1 + i % 50,
        username="alice",
        content=CONTENTS[i % len(CONTENTS)],
        message_type="text",
        created_at="2024-01-01T00:00:00.000Z",
        room=f"room{i % rooms}",
    )


def fresh(dsn: str) -> str:
    name = f"chatd_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return psycopg.conninfo.make_conninfo(dsn, dbname=name)


def one_group(dsn: str, groups: int, size: int, rooms: int) -> tuple[float, float]:
    store = pg.PostgresStore(dsn)
    conn = store._connect_writer()
    migrate(conn)
    walls, cpus = [], []
    try:
        for g in range(groups + 3):
            batch = [pg.Pending(None, message(i, rooms), print) for i in range(size)]
            wall, cpu = time.perf_counter(), time.thread_time()
            store._transaction(conn, batch)
            if g >= 3:  # warm-up
                walls.append(time.perf_counter() - wall)
                cpus.append(time.thread_time() - cpu)
    finally:
        conn.close()
    return statistics.median(walls), statistics.median(cpus)


async def through_trio(dsn: str, count: int, rooms: int) -> float:
    async with pg.open_postgres_store(dsn) as store:
        done = 0

        def callback(result: object) -> None:
            nonlocal done
            done += 1

        started = time.perf_counter()
        for i in range(count):
            await store.append(message(i, rooms), callback)
        await store.flush()
        assert done == count
        return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="a PostgreSQL to create databases in")
    parser.add_argument("--groups", type=int, default=30)
    parser.add_argument("--size", type=int, default=500)
    parser.add_argument("--appends", type=int, default=50_000)
    parser.add_argument("--content", choices=("hello", "words"), default="hello")
    args = parser.parse_args()
    if args.content == "words":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import search

        CONTENTS[:] = search.contents(4096)
    with postgres(args.dsn) as dsn:
        for rooms in (1, 10):
            wall, cpu = one_group(fresh(dsn), args.groups, args.size, rooms)
            print(
                f"group of {args.size}, {rooms:2} room(s): {wall * 1000:5.1f} ms"
                f" = {args.size / wall:8,.0f} rows/s; writer CPU {cpu * 1000:4.1f} ms"
            )
        for rooms in (1, 10):
            rate = trio.run(through_trio, fresh(dsn), args.appends, rooms)
            print(f"{args.appends} appends through Trio, {rooms:2} room(s): {rate:8,.0f} rows/s")


@contextmanager
def postgres(dsn: str | None) -> Iterator[str]:
    """``dsn``, or a throwaway PostgreSQL's for the block (tests/helpers/services.py)."""
    if dsn is not None:
        yield dsn
        return
    from tests.helpers.services import postgres_server

    server, reason = postgres_server()
    if server is None:
        sys.exit(f"no PostgreSQL: {reason}")
    try:
        yield server.dsn()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
