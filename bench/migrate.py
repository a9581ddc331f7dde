"""How fast ``chatd migrate`` moves a database: ``.venv/bin/python bench/migrate.py
[--messages 1000000] [--dsn DSN]``.

Builds a SQLite database of ``--messages`` messages in 1,000 rooms with the
search benchmark's corpus (bench/search.py: French-like words, 4-18 a
message, indexed as a node indexes them), adds an edit to one message in
100, then runs ``python -m chatd migrate`` into a fresh PostgreSQL database
(a throwaway server from the distribution's binaries unless ``--dsn``:
fsync off, so this measures chatd and PostgreSQL's CPU, not a disk) and
reports the copy's and the check's seconds and messages a second, from the
command's own output, and the two databases' sizes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import search  # noqa: E402  (bench/search.py: the corpus)
from pgstore import postgres  # noqa: E402  (a throwaway PostgreSQL)


def build(db: Path, messages: int) -> float:
    started = time.monotonic()
    corpus = search.Corpus(messages)
    search.build_sqlite(corpus, db, ROOT)
    from chatd.store.schema import connect
    from chatd.store.sqlite import change_message
    from chatd.store import Change

    conn = connect(str(db))
    conn.execute("BEGIN IMMEDIATE")
    edits = conn.execute("SELECT id, user_id FROM messages WHERE id % 100 = 1").fetchall()
    for message_id, author in edits:
        done = change_message(conn, Change(message_id, author, "2024-01-01T00:00:00.000Z", "modifié"))
        assert not isinstance(done, Exception), done
    conn.execute("COMMIT")
    conn.close()
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--dsn", help="a PostgreSQL to create the target database in")
    args = parser.parse_args()
    with postgres(args.dsn) as dsn, tempfile.TemporaryDirectory(prefix="chatd-migrate-") as tmp:
        db = Path(tmp) / "chatd.db"
        print(f"building {args.messages:,} messages ...", flush=True)
        print(f"  built in {build(db, args.messages):.1f} s", flush=True)
        name = f"chatd_migrate_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        target = re.sub(r"dbname=\S+", f"dbname={name}", dsn)
        if target == dsn:
            target = f"{dsn} dbname={name}"
        config = Path(tmp) / "new.toml"
        config.write_text(
            f'[auth]\njwt_secret = "{"x" * 32}"\n'
            f'[storage]\nbackend = "postgres"\ndsn = "{target}"\n'
        )
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "chatd", "migrate", "--config", str(config),
             "--from-sqlite", str(db)],
            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        wall = time.monotonic() - started
        print(done.stderr, end="")
        if done.returncode != 0:
            return 1
        copied = float(re.search(r"copied in ([\d.]+) s", done.stderr).group(1))  # type: ignore[union-attr]
        checked = float(re.search(r"checked in ([\d.]+) s", done.stderr).group(1))  # type: ignore[union-attr]
        with psycopg.connect(target) as conn:
            pg_bytes = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        print(
            f"{args.messages:,} messages: copied in {copied:.1f} s"
            f" ({args.messages / copied:,.0f} messages/s), checked in {checked:.1f} s,"
            f" {wall:.1f} s in all; SQLite {db.stat().st_size / 2**20:,.0f} MiB,"
            f" PostgreSQL {pg_bytes / 2**20:,.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
