"""What a cluster costs per unit of work, for the capacity model of
docs/scaling.md: ``.venv/bin/python bench/cluster_load.py [--quick] [--out FILE]``.

A 2-core machine cannot show a cluster scaling out; it can show what each
message, delivery and node costs, which is what a capacity model needs.

Topologies, one after the other, each on fresh data: one node on SQLite
(the reference: ``bench/load.py``'s server), then clusters of 1, 2 and 3
nodes sharing one PostgreSQL and one Redis (throwaway servers from the
distribution's binaries, as the tests start them: fsync off, so the figures
are CPU, not a disk). Pinning: every chatd node on CPU 0 (so the nodes of a
cluster share one core, and a saturated run's throughput is per core);
PostgreSQL, Redis and the load generator (``bench/worker.py`` processes) on
CPU 1.

Scenarios on each topology (room members spread evenly over the nodes, in
order; the publisher is the first member, on node 0):

* ``room100`` and ``room10``: one publisher at a fixed ``--rate`` (200)
  msgs/s into a room of 100 (and of 10), ``--seconds`` (8) measured after
  1 s of warm-up: publish-to-last-recipient p50/p99, and the CPU seconds of
  each chatd node, of PostgreSQL (the postmaster and all its backends) and
  of Redis over the window (``/proc``), per message.
* ``fanout``: the room of 100 at saturation: ``--publishers`` (16, on node
  0) each keeping ``--window`` (8) messages in flight; deliveries/s, and
  chatd's CPU per delivery (every node together) against the SQLite
  node's. (More publishers than ``bench/load.py``'s 4 x 32: on a cluster
  each message waits for its rate limit's round trip to Redis before the
  next frame of its connection is read, so a few connections with deep
  windows measure that round trip, not the nodes.)
* ``commit``: 20 connections, each alone in its own room (spread over the
  nodes), each keeping 32 messages in flight: messages committed a second,
  and each process's CPU per message (the cost of a message with no
  fan-out: the direct-message shape).

The model (docs/scaling.md) is fitted on the 1-node and 3-node clusters
and predicts the 2-node cluster's CPU at ``room100`` and at ``commit``;
the script prints the predictions beside the measurements. A node's CPU at
a fixed rate R into a room whose members it holds m of: ``R * (s + m * d)``
on the sender's node, ``R * (r + m * d)`` on another node with members,
``R * x`` on a node without any (every node reads every message: one Redis
channel); ``s``: a message sent and committed, ``r``: a message received
from another node and delivered, ``d``: a delivery, ``x``: a message read
and dropped; PostgreSQL ``R * p``; Redis ``R * (b0 + b1 * nodes)``.
``--report FILE`` prints the model of a saved run again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from load import (  # noqa: E402
    MONO,
    Pool,
    Server,
    cpu_of,
    log,
    pct,
    pin_tree,
    process_tree,
    split,
)

from tests.helpers.services import postgres_server, redis_server  # noqa: E402

#: The chatd nodes' CPU; PostgreSQL's, Redis's and the load generator's.
NODE_CPUS = {0}
REST_CPUS = {1}
ROOMS = ["room100", "room10", "fan100"] + [f"c{k}" for k in range(20)]


class Topology:
    """``nodes`` chatd processes: one on SQLite (``cluster`` False), or a
    cluster on the PostgreSQL and Redis given."""

    def __init__(self, tmp: Path, nodes: int, cluster: bool, pg: Any, redis: Any) -> None:
        self.name = f"{nodes}-node cluster" if cluster else "SQLite node"
        self.cluster = cluster
        self.servers: list[Server] = []
        self.pg, self.redis = pg, redis
        dsn = pg.new_database() if cluster else ""
        prefix = f"b{uuid.uuid4().hex[:8]}"
        for i in range(nodes):
            server = Server("chatd", False, tmp, ROOMS)
            if cluster:
                cfg = Path(server.cmd[-1])
                cfg.write_text(
                    server.config_text.replace(
                        f'sqlite_path = "{server.db}"', f'backend = "postgres"\ndsn = "{dsn}"'
                    )
                    + f'[bus]\nbackend = "redis"\nurl = "{redis.url}"\nprefix = "{prefix}"\n'
                    f'node_id = "node{i}"\n'
                )
            self.servers.append(server)

    def start(self) -> None:
        for server in self.servers:
            server.start(NODE_CPUS)
        if self.pg is not None:
            pin_tree(self.pg.process.pid, REST_CPUS)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def pids(self) -> dict[str, list[int]]:
        out = {f"node{i}": [s.pid] for i, s in enumerate(self.servers)}
        if self.cluster:
            out["postgres"] = process_tree(self.pg.process.pid)
            out["redis"] = [self.redis.process.pid]
        return out


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        os.sched_setaffinity(0, REST_CPUS)
        self.pool = Pool(args.procs, REST_CPUS)
        self.uid = 0

    def uids(self, n: int) -> int:
        self.uid += n + 1000
        return self.uid - n

    def connect(self, topo: Topology, n: int, room: str | None, worker: int | None = None,
                rooms: list[str] | None = None) -> int:  # fmt: skip
        """``n`` members spread evenly over the nodes, node 0's first; all on
        ``worker`` (else spread over the workers too)."""
        opened = 0
        shares = split(n, len(topo.servers))
        done = 0
        for server, share in zip(topo.servers, shares, strict=True):
            parts = [share] if worker is not None else split(share, self.pool.n)
            cmds: list[dict[str, Any] | None] = [None] * self.pool.n
            for w, part in enumerate(parts):
                index = worker if worker is not None else w
                cmd: dict[str, Any] = {"op": "connect", "n": part, "port": server.port}
                cmd.update(deflate=False, room=room, uid0=self.uids(part), concurrency=50)
                if rooms:
                    cmd["rooms"] = rooms[done : done + part]
                done += part
                cmds[index] = cmd
            opened += sum(r.get("opened", 0) for r in self.pool.call(cmds, 120))
        self.pool.all({"op": "drain", "quiet": 0.5, "limit": 30}, timeout=60)
        return opened

    def measure(self, topo: Topology, cmds: list[dict[str, Any] | None], t0: int, t1: int,
                timeout: float) -> tuple[dict[str, float], list[dict[str, Any]]]:  # fmt: skip
        """Start ``cmds``, read every process's CPU at t0 and t1, gather."""
        self.pool.send(cmds)
        time.sleep(max(0.0, (t0 - MONO()) / 1e9))
        pids = topo.pids()
        before = {k: cpu_of(v) for k, v in pids.items()}
        time.sleep(max(0.0, (t1 - MONO()) / 1e9))
        after = {k: cpu_of(v) for k, v in pids.items()}
        return {k: after[k] - before[k] for k in pids}, self.pool.gather(cmds, timeout)

    def close(self) -> None:
        self.pool.all({"op": "close_all", "limit": 5.0}, timeout=60)
        time.sleep(1.0)

    def window(self, seconds: float) -> tuple[int, int]:
        t0 = MONO() + int((self.args.warm + 0.5) * 1e9)
        return t0, t0 + int(seconds * 1e9)

    # --- scenarios ---

    def fixed(self, topo: Topology, room: str, members: int) -> dict[str, Any]:
        a = self.args
        opened = self.connect(topo, members, room, worker=0)
        t0, t1 = self.window(a.seconds)
        cmds: list[dict[str, Any] | None] = [None] * self.pool.n
        cmds[0] = {"op": "latency", "t0": t0, "t1": t1, "warm": a.warm, "room": room,
                   "size": 100, "rate": a.rate, "publish": True}  # fmt: skip
        cpu, replies = self.measure(topo, cmds, t0, t1, a.seconds + a.warm + 60)
        self.close()
        lat = [
            (last - sent) / 1e6
            for sent, last, count in replies[0]["latency"].values()
            if t0 <= sent <= t1 and count >= opened
        ]
        seconds = (t1 - t0) / 1e9
        sent = len([1 for s, _, _ in replies[0]["latency"].values() if t0 <= s <= t1])
        res = {
            "members": opened,
            "rate": sent / seconds,
            "complete": len(lat),
            "p50_ms": pct(lat, 0.5),
            "p99_ms": pct(lat, 0.99),
            "cores": {k: v / seconds for k, v in cpu.items()},
        }
        log(
            f"  {room}: {opened} members at {res['rate']:.0f} msgs/s: p50 {res['p50_ms']:.2f}"
            f" p99 {res['p99_ms']:.2f} ms; cores "
            + ", ".join(f"{k} {v:.3f}" for k, v in res["cores"].items())
        )
        return res

    def fanout(self, topo: Topology) -> dict[str, Any]:
        a = self.args
        opened = self.connect(topo, a.members, "fan100", worker=0)
        # the publishers are the first clients of worker 0: node 0's
        t0, t1 = self.window(a.seconds)
        cmds: list[dict[str, Any] | None] = [None] * self.pool.n
        cmds[0] = {"op": "fanout", "t0": t0, "t1": t1, "warm": a.warm, "room": "fan100",
                   "size": 100, "window": a.window, "publishers": a.publishers}  # fmt: skip
        cpu, replies = self.measure(topo, cmds, t0, t1, a.seconds + a.warm + 60)
        self.close()
        seconds = (t1 - t0) / 1e9
        deliveries = replies[0]["rx"] / seconds
        nodes = sum(v for k, v in cpu.items() if k.startswith("node"))
        res = {
            "members": opened,
            "deliveries_per_s": deliveries,
            "cores": {k: v / seconds for k, v in cpu.items()},
            "node_us_per_delivery": nodes / max(1.0, replies[0]["rx"]) * 1e6,
        }
        log(
            f"  fanout: {deliveries:,.0f} deliveries/s, chatd {res['node_us_per_delivery']:.3f}"
            " µs/delivery; cores " + ", ".join(f"{k} {v:.2f}" for k, v in res["cores"].items())
        )
        return res

    def commit(self, topo: Topology) -> dict[str, Any]:
        a = self.args
        rooms = [f"c{k}" for k in range(20)]
        opened = self.connect(topo, 20, None, rooms=rooms)
        t0, t1 = self.window(a.seconds)
        cmd = {"op": "commit", "t0": t0, "t1": t1, "warm": a.warm, "size": 100, "window": 32}
        cpu, replies = self.measure(topo, [dict(cmd) for _ in range(self.pool.n)], t0, t1, 90)
        self.close()
        acked = sum(r["acked"] for r in replies)
        seconds = (t1 - t0) / 1e9
        res = {
            "connections": opened,
            "msgs_per_s": acked / seconds,
            "cores": {k: v / seconds for k, v in cpu.items()},
            "us_per_msg": {k: v / max(1, acked) * 1e6 for k, v in cpu.items()},
        }
        log(
            f"  commit: {res['msgs_per_s']:,.0f} msgs/s; µs/msg "
            + ", ".join(f"{k} {v:.1f}" for k, v in res["us_per_msg"].items())
        )
        return res


def model(results: dict[str, Any]) -> dict[str, Any]:
    """Unit costs from the 1- and 3-node clusters; the 2-node prediction."""
    one, three, two = (results[f"cluster{k}"] for k in (1, 3, 2))
    r100 = one["room100"]
    rate = r100["rate"]
    # one node holds every member: R (s + m d)
    s, d = fit(one)
    # three nodes: the others receive; each holds a third
    t = three["room100"]
    held = split(t["members"], 3)
    r = sum(t["cores"][f"node{i}"] / t["rate"] - held[i] * d for i in (1, 2)) / 2
    p = (r100["cores"]["postgres"] / rate + t["cores"]["postgres"] / t["rate"]) / 2
    b1 = (t["cores"]["redis"] / t["rate"] - r100["cores"]["redis"] / rate) / 2
    b0 = r100["cores"]["redis"] / rate - b1
    # every node reads every message of the cluster (one Redis channel):
    # with no members of its room, it reads and drops it (the commit
    # scenario: each connection alone in its room, spread over the nodes)
    def nodes_per_msg(topology: dict[str, Any]) -> float:
        used = topology["commit"]["us_per_msg"]
        return sum(v for k, v in used.items() if k.startswith("node")) / 1e6

    dropped = (nodes_per_msg(three) - nodes_per_msg(one)) / 2
    units = {"s_us": s * 1e6, "r_us": r * 1e6, "d_us": d * 1e6, "p_us": p * 1e6,
             "b0_us": b0 * 1e6, "b1_us": b1 * 1e6, "x_us": dropped * 1e6,
             "commit_us": nodes_per_msg(one) * 1e6}  # fmt: skip
    w = two["room100"]
    held2 = split(w["members"], 2)
    rate2 = w["rate"]
    predicted = {
        "node0": rate2 * (s + held2[0] * d),
        "node1": rate2 * (r + held2[1] * d),
        "postgres": rate2 * p,
        "redis": rate2 * (b0 + 2 * b1),
    }
    measured = {k: w["cores"][k] for k in predicted}
    ratios = {k: predicted[k] / measured[k] if measured[k] else float("nan") for k in predicted}
    total_p = sum(predicted.values())
    total_m = sum(measured.values())
    # and the commit scenario's chatd CPU a message on two nodes
    commit_predicted = nodes_per_msg(one) + dropped
    commit_ratio = commit_predicted / nodes_per_msg(two)
    return {"units": units, "predicted_cores": predicted, "measured_cores": measured,
            "ratios": ratios, "total_ratio": total_p / total_m,
            "commit_two_nodes_us": [commit_predicted * 1e6, nodes_per_msg(two) * 1e6],
            "commit_ratio": commit_ratio}  # fmt: skip


#: The shapes of docs/scaling.md's table: (what, messages a second,
#: deliveries per message, how many nodes hold members of a message's room
#: or conversation when there are n nodes: connections spread evenly).
SHAPES = (
    ("many small rooms: 5,000 online, 200 msgs/s into rooms of 50 online", 200, 50,
     lambda n: min(n, 50)),
    ("a few huge rooms: 20,000 online in 2 rooms, 50 msgs/s", 50, 10_000, lambda n: n),
    ("mostly direct messages: 5,000 online, 300 msgs/s, 3 devices a side", 300, 6,
     lambda n: min(n, 6)),
)  # fmt: skip
#: The share of one core a node is planned to use (the rest: bursts, joins,
#: a reconnect storm).
UTILISATION = 0.6


def fit(topology: dict[str, Any]) -> tuple[float, float]:
    """(s, d) in seconds from a topology's room10 and room100 on one node."""
    r100, r10 = topology["room100"], topology["room10"]
    d = (r100["cores"]["node0"] / r100["rate"] - r10["cores"]["node0"] / r10["rate"]) / (
        r100["members"] - r10["members"]
    )
    return r100["cores"]["node0"] / r100["rate"] - r100["members"] * d, d


def plan(units: dict[str, float], sqlite: tuple[float, float]) -> list[dict[str, Any]]:
    """What each shape needs, from the unit costs (µs)."""
    s, r, d = units["s_us"] / 1e6, units["r_us"] / 1e6, units["d_us"] / 1e6
    rows = []
    for what, rate, per, reach in SHAPES:
        single = rate * (sqlite[0] + per * sqlite[1])
        nodes, cores = 1, 0.0
        for nodes in range(1, 257):
            x = units["x_us"] / 1e6
            cores = rate * (s + (reach(nodes) - 1) * r + (nodes - reach(nodes)) * x + per * d)
            if cores / nodes <= UTILISATION:
                break
        rows.append({
            "shape": what, "msgs_per_s": rate, "deliveries_per_s": rate * per,
            "sqlite_node_cores": single, "nodes": nodes, "chatd_cores": cores,
            "postgres_cores": rate * units["p_us"] / 1e6,
            "redis_cores": rate * (units["b0_us"] + nodes * units["b1_us"]) / 1e6,
        })  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warm", type=float, default=1.0)
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--publishers", type=int, default=16, help="fanout's publishers")
    parser.add_argument("--window", type=int, default=8, help="messages each keeps in flight")
    parser.add_argument("--quick", action="store_true", help="short windows: a check, not a measure")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report", type=Path, help="no run: the model of a saved --out")
    args = parser.parse_args()
    if args.report:
        results = json.loads(args.report.read_text())
        report(results)
        return 0
    if args.quick:
        args.seconds, args.rate = 1.0, 50.0
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs 2 CPUs (chatd on one, the rest on the other)")
    pg, why = postgres_server()
    if pg is None:
        sys.exit(f"no PostgreSQL: {why}")
    redis, why = redis_server()
    if redis is None:
        pg.stop()
        sys.exit(f"no Redis: {why}")
    pin_tree(redis.process.pid, REST_CPUS)
    run = Run(args)
    tmp = Path(tempfile.mkdtemp(prefix="chatd-cluster-"))
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    try:
        for key, nodes, cluster in (("sqlite", 1, False), ("cluster1", 1, True),
                                    ("cluster2", 2, True), ("cluster3", 3, True)):  # fmt: skip
            topo = Topology(tmp, nodes, cluster, pg if cluster else None, redis)
            log(f"{topo.name}")
            topo.start()
            try:
                results[key] = {
                    "room100": run.fixed(topo, "room100", 100),
                    "room10": run.fixed(topo, "room10", 10),
                    "fanout": run.fanout(topo),
                    "commit": run.commit(topo),
                }
            finally:
                topo.stop()
    finally:
        run.pool.close()
        redis.close()
        pg.stop()
    report(results)
    out = args.out or Path(tempfile.mkstemp(prefix="chatd-cluster-", suffix=".json")[1])
    out.write_text(json.dumps(results, indent=1))
    log(f"results: {out}")
    return 0


def report(results: dict[str, Any]) -> None:
    """The model of a run (into ``results``), and what it says."""
    results["model"] = model(results)
    sq = fit(results["sqlite"])
    results["model"]["sqlite_units"] = {"s_us": sq[0] * 1e6, "d_us": sq[1] * 1e6}
    results["model"]["plans"] = plan(results["model"]["units"], sq)
    m = results["model"]
    log("unit costs (µs): " + ", ".join(f"{k} {v:.1f}" for k, v in m["units"].items()))
    log(
        "2-node room100, predicted/measured cores: "
        + ", ".join(
            f"{k} {m['predicted_cores'][k]:.3f}/{m['measured_cores'][k]:.3f}" for k in m["ratios"]
        )
        + f"; total {m['total_ratio']:.3f}"
    )
    log(
        "2-node commit, chatd µs a message predicted/measured: "
        + "/".join(f"{v:.1f}" for v in m["commit_two_nodes_us"])
        + f" ({m['commit_ratio']:.3f})"
    )
    log("SQLite node (µs): " + ", ".join(f"{k} {v:.1f}" for k, v in m["sqlite_units"].items()))
    for row in m["plans"]:
        log(
            f"{row['shape']}: one SQLite node {row['sqlite_node_cores']:.2f} cores;"
            f" cluster {row['nodes']} node(s), chatd {row['chatd_cores']:.2f} cores,"
            f" PostgreSQL {row['postgres_cores']:.3f}, Redis {row['redis_cores']:.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
