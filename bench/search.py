"""Message search over a million messages: how long a ``search`` takes to
answer, by kind of query, on SQLite (FTS5) and on PostgreSQL (tsvector, GIN).

Usage (bench/.venv, which bench/run.sh makes)::

    python bench/search.py [--quick] [--messages 1000000] [--queries 500]
        [--warm 20] [--limit 20] [--store sqlite|postgres|both] [--root DIR]
        [--json FILE] [--keep DIR]

(``--keep DIR``: the SQLite file is built there and kept, for a look at it
afterwards.)

What it does
------------
* Corpus (deterministic, ``--seed``): a vocabulary of 20,000 French-like
  words (real ones, many accented: café, été, réunion, déploiement, cœur,
  ...; the rest made of French syllables, some accented), drawn with Zipf's
  law (the word of rank r with weight 1/r); messages of 4 to 18 words (the
  first capitalised half the time, some commas and a final . ? or !), 98% of
  them in 1,000 public rooms (``s0``..``s999``, each message in a room drawn
  at random), 2% direct messages among 1,000 users, a quarter of those to or
  from the searching user.
* SQLite: the file is made by chatd's own migrations (the ROOT's
  ``chatd.store.schema``), the messages written straight into ``messages``
  in transactions of 100,000 rows, each row indexed in ``messages_search``
  in the same transaction, as chatd's ``insert_message`` does (about a
  minute for a million).
* PostgreSQL (``--store postgres`` or ``both``; skipped, and said so, when
  its binaries are missing): a throwaway server (tests/helpers/services.py:
  fsync off), a database migrated by the ROOT's ``chatd.store.pgschema``,
  the same messages COPYed in (the trigger sets ``search``, the GIN index is
  kept as rows go in), then ``VACUUM ANALYZE``; chatd runs on it with
  ``[storage] backend = "postgres"`` (one node, local bus).
* chatd (bench/load.py's config, the rooms declared public, rate limits out
  of the way, ``search_time_ms`` left at its default) from ``--root``
  (default this tree) runs on CPU 0, and PostgreSQL with it; this process,
  the client (bench/wsclient.py), on the others. One connection sends
  ``--queries`` searches one at a time (after ``--warm`` not counted) and
  times each from the send to its ``search_results``.
* The queries, two words each, ``--limit`` (20) a page, mixed in a
  deterministic order: six kinds of words, each in two scopes (everything
  the user may read; one room, ``room``):
  - ``top``: two words of ranks 1-100; ``mid``: ranks 100-2,000; ``rare``:
    ranks past 2,000; ``mixed``: one top word and one rare one;
  - ``unaccented``: two accented words typed without their accents and in
    another case (``CAFE demain`` for ``café demain``);
  - ``prefix``: the first 3 or 4 letters of two words, ``caf* reu*``.
  The two words are taken from one message of the scope (a search for
  something seen), so every query has at least one match.
* Reported per kind and scope, and over all: answer time p50 / p99 / max,
  the mean number of messages answered, and the answers cut by the time
  budget (``has_more`` with fewer messages than asked for). Every answer is
  also checked against the corpus (the words folded as the indexes fold
  them: case and accents): the newest matching ids in the scope, in order,
  ``has_more`` when there are more; a cut answer the newest of them down to
  where it stopped. Differences are counted and shown (``mismatches``). The
  server's own ``chatd_search_seconds`` and ``chatd_searches_cut_total``
  (``/metrics``) are printed next to the client's figures.

The issue's target for search is on the commit rate: with the index on, within
15% of the rate without it. That is measured by bench/commits.py against the
tree before the index, e.g.::

    git archive c425ccb | tar -x -C /tmp/chatd-base
    python bench/commits.py --rounds 3 --content words /tmp/chatd-base .

(``--content words``: each message about 100 bytes of this vocabulary,
instead of 100 ``x``). Here nothing is asserted; ``--quick`` (20,000
messages, 60 queries) checks that the script works, and exits non-zero only
when a search failed or got no answer.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import unicodedata
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jwt  # noqa: E402
from load import (  # noqa: E402
    MONO,
    SECRET,
    Server,
    cpu_of,
    free_port,
    log,
    pct,
    pin_tree,
    proc_cpu,
    process_tree,
    raise_nofile,
)
from wsclient import Client, Stats  # noqa: E402

VOCABULARY = 20_000
ROOMS = 1_000
USERS = 1_000
#: The searching user (user 1 also writes in the rooms and direct messages).
ME = 1
DM_SHARE = 0.02
DM_MINE = 0.25
TOP, MID = 100, 2_000
KINDS = ("top", "mid", "rare", "mixed", "unaccented", "prefix")
SCOPES = ("all", "room")

# --- the vocabulary -----------------------------------------------------------

#: The most frequent words, in this order (ranks 1..).
FUNCTION_WORDS = """
de la le et les des en un une du est pour que qui dans ce il pas plus par sur
on ne se au avec son sa je tu nous vous ils elle mais ou comme tout bien aussi
très été être avoir fait peut faut déjà là où ça oui non merci quand après
encore même voilà donc alors car si leur cette ces mon ton
""".split()

#: Real words placed among the next ranks (a few of them in the top 100).
CONTENT_WORDS = """
café demain réunion équipe problème déploiement fenêtre données matin soir
semaine journée année début fin prêt pendant depuis réponse question idée
système serveur version écran clé accès sécurité réseau mémoire requête fichier
dossier élève école médecin santé hôpital pâtes gâteau château forêt île hôtel
côté goût coût août février décembre mercredi vendredi samedi dimanche lundi
mardi jeudi janvier juillet septembre octobre novembre avril juin mars mai
problèmes réunions équipes idées étape étapes général spécial différent
différence intérêt intéressant être même fête tête bête fenêtres lumière
rivière frère mère père père noël théâtre cinéma musée église marché
boulangerie pharmacie bibliothèque université étudiant étudiante professeur
collègue collègues client clients projet projets tâche tâches délai délais
livraison commande paiement facture reçu envoyé envoyer recevoir vérifier
vérification corrigé corriger testé tester erreur erreurs bogue mise jour
nouvelle nouveau ancien ancienne rapide lent lente léger lourd sûr sûre
peut-être désolé désolée félicitations bravo génial super parfait évidemment
déjà bientôt tôt tard hier aujourd maintenant toujours jamais souvent parfois
ensemble seul seule premier première dernier dernière prochain prochaine
réseau réseaux câble écouteur clavier souris téléphone ordinateur portable
logiciel matériel développeur développement production préproduction recette
intégration migration sauvegarde restauration redémarrage redémarrer arrêt
démarrage configuration paramètre paramètres mot passe utilisateur compte
connexion déconnexion session requêtes réponse réponses temps délai
cœur sœur œuvre nœud œil bœuf manœuvre
""".split()

_ONSETS = ("", "b", "c", "d", "f", "g", "j", "l", "m", "n", "p", "r", "s", "t", "v",
           "ch", "gr", "tr", "pl", "br", "cr", "fr", "pr", "qu", "bl", "gl", "vr")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "ou", "ai", "eau", "au", "on", "an", "in", "eu", "oi", "ie")
_ACCENTED = ("é", "é", "é", "è", "è", "ê", "â", "ô", "î", "û")
_CODAS = ("", "", "", "", "r", "s", "l", "n", "t", "x", "que", "tte", "lle", "nne", "sse",
          "ment", "tion", "ble", "re", "ge", "ce")  # fmt: skip


def fold(text: str) -> str:
    """A word as both indexes keep it: accents (and other marks) off,
    lower case (FTS5's ``remove_diacritics 2``, PostgreSQL's ``unaccent``
    and ``simple``; ``œ`` is a letter of its own here, as for FTS5)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()


def vocabulary(size: int = VOCABULARY, seed: int = 1) -> list[str]:
    """``size`` distinct words (distinct once folded too), by rank: the
    function words, then the real content words scattered over ranks up to
    2,500 among made-up ones (a few pinned in the top 100), then made-up
    ones. Made-up words have 2 or 3 syllables; a vowel may carry an
    accent."""
    rng = random.Random(seed)
    seen: set[str] = set()
    words: list[str] = []

    def add(word: str) -> bool:
        key = fold(word)
        if key in seen or not word.isalpha():
            return False
        seen.add(key)
        words.append(word)
        return True

    for w in FUNCTION_WORDS:
        add(w)
    content = [w for w in dict.fromkeys(CONTENT_WORDS) if w.isalpha()]
    pinned = ["demain", "café", "réunion", "équipe", "problème", "données", "été"]
    for w in pinned:
        add(w)
    rest = [w for w in content if w not in pinned]
    rng.shuffle(rest)

    def made_up() -> str:
        while True:
            n = rng.choice((2, 2, 3))
            word = "".join(
                rng.choice(_ONSETS) + rng.choice(_ACCENTED if rng.random() < 0.12 else _VOWELS)
                for _ in range(n)
            )
            word += rng.choice(_CODAS)
            if 4 <= len(word) <= 14 and fold(word) not in seen:
                return word

    # the real content words at random ranks between here and 2,500
    slots = sorted(rng.sample(range(len(words), 2_500), len(rest)))
    queue = list(rest)
    while len(words) < size:
        if queue and slots and len(words) >= slots[0]:
            slots.pop(0)
            if add(queue.pop(0)):
                continue
        add(made_up())
    return words[:size]


class Corpus:
    """The messages (deterministic for a seed): each one's words (ranks),
    text, channel; the inverted index the answers are checked against."""

    def __init__(self, messages: int, seed: int = 1) -> None:
        self.vocab = vocabulary(seed=seed)
        self.folded = [fold(w) for w in self.vocab]
        self.n = messages
        rng = random.Random(seed * 7919 + messages)
        cum = list(itertools.accumulate(1.0 / (r + 1) for r in range(len(self.vocab))))
        self.offsets = array("I", [0])
        self.ranks = array("H")
        self.room = array("h")  # -1: a direct message
        self.sender = array("I")
        self.to = array("I")  # 0: a room message
        self.contents: list[str] = []
        total = cum[-1]
        for _ in range(messages):
            k = rng.randint(4, 18)
            draws = [bisect.bisect(cum, rng.random() * total) for _ in range(k)]
            draws = [min(d, len(self.vocab) - 1) for d in draws]
            self.ranks.extend(draws)
            self.offsets.append(len(self.ranks))
            self.contents.append(self.sentence(rng, draws))
            if rng.random() < DM_SHARE:
                a, b = rng.randint(1, USERS), rng.randint(1, USERS)
                if rng.random() < DM_MINE:
                    a, b = (ME, b) if rng.random() < 0.5 else (b, ME)
                if a == b:
                    b = a % USERS + 1
                self.room.append(-1)
                self.sender.append(a)
                self.to.append(b)
            else:
                self.room.append(rng.randrange(ROOMS))
                self.sender.append(rng.randint(1, USERS))
                self.to.append(0)
        self._postings: dict[int, set[int]] | None = None
        self._room_ids: dict[int, list[int]] = {}

    def sentence(self, rng: random.Random, draws: list[int]) -> str:
        words = [self.vocab[d] for d in draws]
        if rng.random() < 0.5:
            words[0] = words[0][0].upper() + words[0][1:]
        for i in range(len(words) - 1):
            if rng.random() < 0.08:
                words[i] += ","
        end = rng.random()
        return " ".join(words) + (
            "." if end < 0.4 else "?" if end < 0.55 else "!" if end < 0.6 else ""
        )

    def words_of(self, i: int) -> list[int]:
        return list(self.ranks[self.offsets[i] : self.offsets[i + 1]])

    def channel(self, i: int) -> str:
        if self.room[i] >= 0:
            return f"r:s{self.room[i]}"
        a, b = sorted((self.sender[i], self.to[i]))
        return f"d:{a}:{b}"

    def rows(self) -> Any:
        """(channel, seq, user_id, username, to_user_id, content, created_at)
        in id order (message i gets id i + 1)."""
        seqs: dict[str, int] = {}
        base = time.time() - self.n  # one message a second up to now
        stamp = ""
        for i in range(self.n):
            channel = self.channel(i)
            seq = seqs[channel] = seqs.get(channel, 0) + 1
            if i % 1000 == 0:
                stamp = rfc3339(base + i)
            to = self.to[i] or None
            u = self.sender[i]
            yield (channel, seq, u, f"u{u}", to, self.contents[i], stamp)

    def channel_seqs(self) -> dict[str, int]:
        seqs: dict[str, int] = {}
        for i in range(self.n):
            c = self.channel(i)
            seqs[c] = seqs.get(c, 0) + 1
        return seqs

    # --- the oracle ---------------------------------------------------------------

    def postings(self) -> dict[int, set[int]]:
        """Rank -> the message indexes that have the word."""
        if self._postings is None:
            post: dict[int, set[int]] = {}
            for i in range(self.n):
                for r in self.ranks[self.offsets[i] : self.offsets[i + 1]]:
                    s = post.get(r)
                    if s is None:
                        s = post[r] = set()
                    s.add(i)
            self._postings = post
        return self._postings

    def room_messages(self, room: int) -> list[int]:
        if not self._room_ids:
            for i in range(self.n):
                self._room_ids.setdefault(self.room[i], []).append(i)
        return self._room_ids.get(room, [])

    def readable(self, i: int) -> bool:
        return self.room[i] >= 0 or ME in (self.sender[i], self.to[i])

    def expected(self, words: Sequence[tuple[str, bool]], room: int | None) -> list[int]:
        """Ids (newest first) of the messages of the scope with every word
        (folded text, prefix?)."""
        post = self.postings()
        sets = []
        for text, prefix in words:
            ranks = [
                r
                for r, f in enumerate(self.folded)
                if (f.startswith(text) if prefix else f == text)
            ]
            s: set[int] = set()
            for r in ranks:
                s |= post.get(r, set())
            sets.append(s)
        sets.sort(key=len)
        found = set.intersection(*sets) if sets else set()
        if room is None:
            ok = [i for i in found if self.readable(i)]
        else:
            ok = [i for i in found if self.room[i] == room]
        return sorted((i + 1 for i in ok), reverse=True)


def rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def contents(count: int, size: int = 100, seed: int = 2) -> list[str]:
    """``count`` texts of about ``size`` bytes (UTF-8) of the vocabulary,
    Zipf-drawn as the corpus (bench/commits.py ``--content words``)."""
    vocab = vocabulary()
    rng = random.Random(seed)
    cum = list(itertools.accumulate(1.0 / (r + 1) for r in range(len(vocab))))
    out = []
    for _ in range(count):
        words: list[str] = []
        n = -1
        while n < size:
            w = vocab[min(len(vocab) - 1, bisect.bisect(cum, rng.random() * cum[-1]))]
            words.append(w)
            n += len(w.encode()) + 1
        out.append(" ".join(words))
    return out


# --- the queries ----------------------------------------------------------------


def band(rank: int) -> str:
    return "top" if rank < TOP else "mid" if rank < MID else "rare"


def make_queries(corpus: Corpus, count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` queries, kinds and scopes in turn (shuffled), each with
    the words of one message of its scope."""
    rng = random.Random(seed)
    cells = [(k, s) for k in KINDS for s in SCOPES]
    order = [cells[i % len(cells)] for i in range(count)]
    rng.shuffle(order)
    vocab, folded = corpus.vocab, corpus.folded
    out = []
    for kind, scope in order:
        room = rng.randrange(ROOMS) if scope == "room" else None
        pool = corpus.room_messages(room) if room is not None else None
        pair: tuple[int, int] | None = None
        for _ in range(2000):
            i = rng.choice(pool) if pool else rng.randrange(corpus.n)
            if room is None and not corpus.readable(i):
                continue
            ranks = list(dict.fromkeys(corpus.words_of(i)))
            if kind in ("top", "mid", "rare"):
                cand = [r for r in ranks if band(r) == kind]
                if len(cand) >= 2:
                    pair = tuple(rng.sample(cand, 2))  # type: ignore[assignment]
            elif kind == "mixed":
                tops = [r for r in ranks if band(r) == "top"]
                rares = [r for r in ranks if band(r) == "rare"]
                if tops and rares:
                    pair = (rng.choice(tops), rng.choice(rares))
            elif kind == "unaccented":
                cand = [r for r in ranks if folded[r] != vocab[r] and "œ" not in vocab[r]]
                if len(cand) >= 2:
                    pair = tuple(rng.sample(cand, 2))  # type: ignore[assignment]
            else:  # prefix
                cand = [r for r in ranks if len(folded[r]) >= 5 and r < MID]
                if len(cand) >= 2:
                    pair = tuple(rng.sample(cand, 2))  # type: ignore[assignment]
            if pair:
                break
        if pair is None:  # (a tiny corpus) any two words
            pair = (rng.randrange(TOP), rng.randrange(TOP))
        if kind == "unaccented":
            a, b = folded[pair[0]], folded[pair[1]]
            shape = rng.randrange(3)
            typed = (
                [a.upper(), b] if shape == 0 else [a, b.upper()] if shape == 1 else [a.title(), b]
            )
            words = [(a, False), (b, False)]
        elif kind == "prefix":
            typed, words = [], []
            for r in pair:
                n = rng.choice((3, 4))
                stem = vocab[r][:n] if rng.random() < 0.5 else folded[r][:n]
                typed.append(stem + "*")
                words.append((fold(stem), True))
        else:
            typed = [vocab[r] for r in pair]
            words = [(folded[r], False) for r in pair]
        q = {"kind": kind, "scope": scope, "query": " ".join(typed), "words": words}
        if room is not None:
            q["room"] = f"s{room}"
            q["room_index"] = room
        out.append(q)
    return out


# --- the client ----------------------------------------------------------------------


def token(user_id: int) -> str:
    now = int(time.time())
    claims = {"user_id": user_id, "username": f"u{user_id}", "iat": now, "exp": now + 7200}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def ask(port: int, queries: list[dict[str, Any]], limit: int, wait: float) -> list[Any]:
    """Each query in turn on one connection: (ns from send to answer, the
    answer's JSON or None)."""
    loop = asyncio.get_running_loop()
    target = f"/ws/chat?token={token(ME)}"
    _, client = await loop.create_connection(
        lambda: Client(Stats(), target, False), "127.0.0.1", port
    )
    await asyncio.wait_for(client.ready, 10)
    out: list[Any] = []
    try:
        for n, q in enumerate(queries):
            rid = f"q{n}"
            data: dict[str, Any] = {"query": q["query"], "limit": limit}
            if "room" in q:
                data["room"] = q["room"]
            frame = {"type": "search", "data": data, "request_id": rid}
            fut = client.expect(b'"request_id":"%s"' % rid.encode())
            payload = json.dumps(frame, ensure_ascii=False).encode()
            t = MONO()
            client.send_text(payload)
            try:
                answer = await asyncio.wait_for(fut, wait)
            except Exception as exc:  # (counted as no answer)
                out.append((MONO() - t, {"type": "no answer", "error": repr(exc)}))
                if not client.is_open:
                    break
                continue
            out.append((MONO() - t, json.loads(answer)))
    finally:
        client.start_close()
        await asyncio.sleep(0.05)
        client.abort()
    return out


def check(
    corpus: Corpus, q: dict[str, Any], answer: dict[str, Any], limit: int
) -> tuple[str | None, int]:
    """What is wrong with ``answer`` (None: nothing), and how many messages
    of the scope match in all."""
    want = corpus.expected(q["words"], q.get("room_index"))
    data = answer.get("data") or {}
    got = [m["id"] for m in data.get("messages", [])]
    more, nxt = data.get("has_more"), data.get("next_before_id")
    if answer.get("type") != "search_results":
        return f"{answer.get('type')}: {json.dumps(data)[:200]}", len(want)
    if more and len(got) < limit:  # cut by the time budget: newest first down to nxt
        head = [i for i in want if nxt is not None and i >= nxt]
        if got != head:
            return (
                f"cut at {nxt}: got {got[:5]}.. ({len(got)}), want {head[:5]}.. ({len(head)})",
                len(want),
            )
        return None, len(want)
    if got != want[:limit]:
        return f"got {got[:5]}.. ({len(got)}), want {want[:5]}.. ({len(want)} in all)", len(want)
    if bool(more) != (len(want) > limit):
        return f"has_more {more} with {len(want)} matching", len(want)
    return None, len(want)


def summary(rows: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    ms = [r["ms"] for r in rows]
    return {
        "n": len(rows),
        "p50_ms": statistics.median(ms) if ms else float("nan"),
        "p99_ms": pct(ms, 0.99),
        "max_ms": max(ms) if ms else float("nan"),
        "mean_results": statistics.fmean(r["results"] for r in rows) if rows else 0.0,
        "mean_matching": statistics.fmean(r["matching"] for r in rows) if rows else 0.0,
        "cut": sum(1 for r in rows if r["cut"]),
        "has_more": sum(1 for r in rows if r["has_more"]),
        "errors": sum(1 for r in rows if r["error"]),
        "mismatches": sum(1 for r in rows if r["wrong"]),
    }


# --- /metrics -----------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("chatd_search", "chatd_searches")):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metric_delta(m0: dict[str, float], m1: dict[str, float]) -> dict[str, float]:
    keys = ("chatd_search_seconds_count", "chatd_search_seconds_sum", "chatd_searches_cut_total")
    return {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in keys}


# --- the stores ------------------------------------------------------------------------


def build_sqlite(corpus: Corpus, db: Path, root: Path) -> dict[str, Any]:
    """The corpus in a SQLite file made by ``root``'s migrations."""
    sys.path.insert(0, str(root))
    from chatd.store.schema import connect, migrate

    started = time.monotonic()
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(str(db))
    migrate(conn)
    conn.execute("PRAGMA synchronous = OFF")
    created = rfc3339(time.time() - corpus.n - 86400)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO users (id, username, created_at) VALUES (?, ?, ?)",
        [(u, f"u{u}", created) for u in range(1, USERS + 1)],
    )
    conn.executemany(
        "INSERT INTO rooms (name, private, created_at) VALUES (?, 0, ?)",
        [(f"s{r}", created) for r in range(ROOMS)],
    )
    conn.execute("COMMIT")
    sql = (
        "INSERT INTO messages (channel, seq, user_id, username, to_user_id, message_type,"
        " content, created_at) VALUES (?, ?, ?, ?, ?, 'text', ?, ?)"
    )
    chunk: list[Any] = []
    done = 0
    columns = [r[1] for r in conn.execute("PRAGMA table_info(search_backlog)")]
    above = "above" in columns

    def write(chunk: list[Any]) -> None:
        conn.execute("BEGIN")
        conn.executemany(sql, chunk)
        conn.execute(
            "INSERT INTO messages_search (rowid, content)"
            " SELECT id, content FROM messages WHERE id > ?",
            (done,),
        )
        if above:  # (indexed here, not by the writer: chatd.store.sqlite.index_tail)
            conn.execute("UPDATE search_backlog SET above = (SELECT max(id) + 1 FROM messages)")
        conn.execute("COMMIT")

    for row in corpus.rows():
        chunk.append(row)
        if len(chunk) == 100_000:
            write(chunk)
            done += len(chunk)
            chunk.clear()
            log(f"  sqlite: {done:,} / {corpus.n:,} messages")
    if chunk:
        write(chunk)
    seconds = time.monotonic() - started
    newest, rows = conn.execute("SELECT max(id), count(*) FROM messages").fetchone()
    segments = conn.execute("SELECT count(DISTINCT segid) FROM messages_search_idx").fetchone()[0]
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    if newest != corpus.n or rows != corpus.n:
        raise RuntimeError(f"sqlite: {rows} rows, newest id {newest}: want 1..{corpus.n}")
    return {
        "build_seconds": seconds,
        "db_bytes": db.stat().st_size,
        "fts_segments": segments,
    }


def build_postgres(corpus: Corpus, dsn: str, root: Path) -> dict[str, Any]:
    """The corpus in a fresh database migrated by ``root``'s pgschema."""
    import psycopg

    sys.path.insert(0, str(root))
    from chatd.store.pgschema import migrate

    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn)
        created = rfc3339(time.time() - corpus.n - 86400)
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO users (id, username, created_at) VALUES (%s, %s, %s)",
                [(u, f"u{u}", created) for u in range(1, USERS + 1)],
            )
            cur.executemany(
                "INSERT INTO rooms (name, private, created_at) VALUES (%s, false, %s)",
                [(f"s{r}", created) for r in range(ROOMS)],
            )
            cur.executemany(
                "INSERT INTO channels (name, seq, pos) VALUES (%s, %s, %s)",
                [(c, s, s) for c, s in corpus.channel_seqs().items()],
            )
        copy_sql = (
            "COPY messages (channel, seq, pos, user_id, username, to_user_id, message_type,"
            " content, created_at) FROM STDIN"
        )
        rows = corpus.rows()
        done = 0
        while done < corpus.n:
            n = min(100_000, corpus.n - done)
            with conn.transaction(), conn.cursor() as cur, cur.copy(copy_sql) as copy:
                for channel, seq, u, name, to, content, at in itertools.islice(rows, n):
                    copy.write_row((channel, seq, seq, u, name, to, "text", content, at))
            done += n
            log(f"  postgres: {done:,} / {corpus.n:,} messages")
        loaded = time.monotonic() - started
        conn.execute("VACUUM ANALYZE messages")
        newest, count, indexed = conn.execute(
            "SELECT max(id), count(*), count(search) FROM messages"
        ).fetchone()
        size = conn.execute(
            "SELECT pg_total_relation_size('messages'), pg_relation_size('messages_search')"
        ).fetchone()
    if newest != corpus.n or count != corpus.n or indexed != corpus.n:
        raise RuntimeError(f"postgres: {count} rows ({indexed} indexed), newest id {newest}")
    return {
        "build_seconds": time.monotonic() - started,
        "load_seconds": loaded,
        "db_bytes": size[0],
        "gin_bytes": size[1],
    }


def postgres_server() -> tuple[Any, str]:
    """tests/helpers/services.py's throwaway PostgreSQL (or the one
    ``CHATD_TEST_POSTGRES_DSN`` names). That module takes only ``free_port``
    from tests/helpers/servers.py, which needs pytest and chatd's server
    (not in bench/.venv): load.py's ``free_port`` stands in for it."""
    import types

    if "tests.helpers.servers" not in sys.modules:
        try:
            import pytest  # noqa: F401
        except ImportError:
            stub = types.ModuleType("tests.helpers.servers")
            stub.free_port = free_port  # type: ignore[attr-defined]
            sys.modules["tests.helpers.servers"] = stub
    sys.path.insert(0, str(HERE.parent))
    from tests.helpers.services import postgres_server as start

    return start()


# --- one store ---------------------------------------------------------------------------


def measure(
    args: argparse.Namespace,
    corpus: Corpus,
    queries: list[dict[str, Any]],
    tmp: Path,
    store: str,
    target: str,
    cpus: set[int] | None,
    pg_pid: int | None = None,
) -> dict[str, Any]:
    """chatd from ``args.root`` on ``target`` (a SQLite file or a DSN):
    the warm-up queries, then the measured ones."""
    rooms = [f"s{r}" for r in range(ROOMS)]
    server = Server("chatd", False, tmp, rooms, root=args.root)
    cfg = Path(server.cmd[-1])
    text = cfg.read_text()
    if store == "sqlite":
        text = text.replace(f'sqlite_path = "{server.db}"', f'sqlite_path = "{target}"')
    else:
        text = text.replace(
            f'sqlite_path = "{server.db}"', f'backend = "postgres"\ndsn = "{target}"'
        )
    cfg.write_text(text)
    log(f"{store}: {' '.join(server.cmd)}")
    server.start(cpus)
    out: dict[str, Any] = {"config": text}
    try:
        time.sleep(0.5)
        warm = queries[: args.warm]
        asyncio.run(ask(server.port, warm, args.limit, args.timeout))
        m0 = scrape(server.port)
        c0 = proc_cpu(server.pid)
        p0 = cpu_of(process_tree(pg_pid)) if pg_pid else 0.0
        started = time.monotonic()
        answers = asyncio.run(ask(server.port, queries[args.warm :], args.limit, args.timeout))
        wall = time.monotonic() - started
        out["chatd_cpu_s"] = proc_cpu(server.pid) - c0
        if pg_pid:
            out["postgres_cpu_s"] = cpu_of(process_tree(pg_pid)) - p0
        out["wall_s"] = wall
        out["metrics"] = metric_delta(m0, scrape(server.port))
    finally:
        tail = server.stop()
    errors = [ln for ln in tail.splitlines() if "ERROR" in ln or "Traceback" in ln]
    if errors:
        out["log_errors"] = errors[-10:]
    rows = []
    examples: list[str] = []
    for q, (ns, answer) in zip(queries[args.warm :], answers, strict=False):
        data = answer.get("data") or {}
        got = data.get("messages") or []
        wrong, matching = check(corpus, q, answer, args.limit)
        more = bool(data.get("has_more"))
        row = {
            "kind": q["kind"],
            "scope": q["scope"],
            "query": q["query"],
            "room": q.get("room"),
            "ms": ns / 1e6,
            "results": len(got),
            "matching": matching,
            "has_more": more,
            "cut": more and len(got) < args.limit,
            "next_before_id": data.get("next_before_id"),
            "error": answer.get("type") != "search_results",
            "wrong": wrong,
        }
        rows.append(row)
        if wrong and len(examples) < 10:
            examples.append(
                f"{q['kind']}/{q['scope']} {q['query']!r} {q.get('room') or ''}: {wrong}"
            )
    out["answered"] = len(answers)
    out["overall"] = summary(rows, args.limit)
    out["by_kind"] = {
        f"{k}/{s}": summary([r for r in rows if r["kind"] == k and r["scope"] == s], args.limit)
        for k in KINDS
        for s in SCOPES
    }
    out["by_scope"] = {s: summary([r for r in rows if r["scope"] == s], args.limit) for s in SCOPES}
    out["mismatch_examples"] = examples
    out["slowest"] = sorted(rows, key=lambda r: -r["ms"])[:10]
    out["queries"] = rows
    return out


def show(store: str, res: dict[str, Any], limit: int) -> None:
    b = res["build"]
    extra = ""
    if "fts_segments" in b:
        extra = f", {b['fts_segments']} FTS5 segments"
    if "gin_bytes" in b:
        extra = f", GIN {b['gin_bytes'] / 2**20:.0f} MiB, COPY {b['load_seconds']:.0f} s"
    print(f"\n{store}: {res['messages']:,} messages, built in {b['build_seconds']:.0f} s,"
          f" {b['db_bytes'] / 2**20:.0f} MiB{extra}")  # fmt: skip
    print(f"  {'kind/scope':18} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
          f" {'results':>7} {'matching':>9} {'cut':>4} {'wrong':>5}")  # fmt: skip
    rows = [*res["by_kind"].items(), *res["by_scope"].items(), ("overall", res["overall"])]
    for name, s in rows:
        print(
            f"  {name:18} {s['n']:4} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f} {s['max_ms']:8.2f}"
            f" {s['mean_results']:7.1f} {s['mean_matching']:9.0f} {s['cut']:4}"
            f" {s['mismatches']:5}"
        )
    m = res["metrics"]
    n = m["chatd_search_seconds_count"]
    mean = 1000 * m["chatd_search_seconds_sum"] / n if n else float("nan")
    o = res["overall"]
    pg = f", PostgreSQL {res['postgres_cpu_s']:.1f} s" if "postgres_cpu_s" in res else ""
    print(f"  server: {n:.0f} searches, mean {mean:.2f} ms (chatd_search_seconds),"
          f" chatd_searches_cut_total {m['chatd_searches_cut_total']:.0f}; client: has_more"
          f" {o['has_more']}, cut (has_more, under {limit}) {o['cut']}; CPU chatd"
          f" {res['chatd_cpu_s']:.1f} s{pg} over {res['wall_s']:.1f} s")  # fmt: skip
    for ex in res["mismatch_examples"]:
        print(f"  mismatch: {ex}")
    for err in res.get("log_errors", []):
        print(f"  log: {err}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--messages", type=int)
    parser.add_argument("--queries", type=int)
    parser.add_argument("--warm", type=int, help="queries not counted first (20; quick 5)")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--store", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--root", default=str(HERE.parent), help="chatd source tree")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=30.0, help="s for one answer")
    parser.add_argument("--json")
    parser.add_argument("--keep", help="build the databases in this directory and keep them")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    a = parser.parse_args()
    q = a.quick
    a.messages = a.messages or (20_000 if q else 1_000_000)
    a.queries = a.queries or (60 if q else 500)
    a.warm = a.warm if a.warm is not None else (5 if q else 20)
    a.root = Path(a.root).resolve()
    raise_nofile()
    ncpu = os.cpu_count() or 1
    server_cpus = {0} if a.pin and ncpu > 1 else None
    if server_cpus:
        os.sched_setaffinity(0, set(range(1, ncpu)))
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="chatd-search-"))
    tmp.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "messages": a.messages,
        "queries": a.queries,
        "warm": a.warm,
        "limit": a.limit,
        "root": str(a.root),
        "quick": q,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "stores": {},
    }
    failed = False
    try:
        started = time.monotonic()
        log(f"corpus: {a.messages:,} messages")
        corpus = Corpus(a.messages, a.seed)
        queries = make_queries(corpus, a.warm + a.queries, a.seed + 1)
        corpus.postings()
        out["corpus_seconds"] = time.monotonic() - started
        out["corpus"] = {
            "vocabulary": len(corpus.vocab),
            "words": len(corpus.ranks),
            "bytes": sum(len(c.encode()) for c in corpus.contents),
            "direct": sum(1 for r in corpus.room if r < 0),
            "examples": corpus.contents[:5],
        }
        stores = ["sqlite", "postgres"] if a.store == "both" else [a.store]
        for store in stores:
            res: dict[str, Any] = {"messages": a.messages}
            if store == "sqlite":
                db = tmp / "sqlite" / "chatd.db"
                log(f"sqlite: building {db}")
                res["build"] = build_sqlite(corpus, db, a.root)
                res.update(measure(a, corpus, queries, tmp, store, str(db), server_cpus))
            else:
                pg, why = postgres_server()
                if pg is None:
                    log(f"postgres: skipped: {why}")
                    out["stores"]["postgres"] = {"skipped": why}
                    continue
                try:
                    dsn = pg.new_database()
                    log(f"postgres: building {dsn}")
                    res["build"] = build_postgres(corpus, dsn, a.root)
                    pid = pg.process.pid if pg.process else None
                    if pid and server_cpus:
                        pin_tree(pid, server_cpus)
                    res.update(measure(a, corpus, queries, tmp, store, dsn, server_cpus, pid))
                finally:
                    pg.stop()
            out["stores"][store] = res
            show(store, res, a.limit)
            o = res["overall"]
            if o["errors"] or res["answered"] < a.queries:
                failed = True
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    summary_line = {
        store: {k: r["overall"][k] for k in ("p50_ms", "p99_ms", "max_ms", "cut", "mismatches")}
        for store, r in out["stores"].items()
        if "overall" in r
    }
    print(json.dumps({"scenario": "search", "messages": a.messages, **summary_line}))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
