"""GET /metrics: the Prometheus exposition, and every figure moving under a
real load driven over WebSocket (room messages, direct messages, a bad
frame, a rate limit, a reconnect, a bad token, a slow consumer closed 1013),
the SQLite store's WAL checkpoints, on the main port or on ``[server]
metrics_listen``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from wsproto.events import CloseConnection

from chatd.config import Config
from chatd.errors import ErrorCode
from chatd.server import ChatServer
from chatd.store.sqlite import SqliteStore
from tests.helpers.clients import closed_with, connect
from tests.helpers.http_client import http_request
from tests.helpers.raw import raw_ws
from tests.helpers.servers import running

pytestmark = pytest.mark.usefixtures("collect_garbage")


class Samples:
    """One scrape: sample name and labels -> value."""

    def __init__(self, text: str) -> None:
        self.values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                self.values[key] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.values.get((name, frozenset(labels.items())), 0.0)


async def scrape(port: int) -> Samples:
    reply = await http_request(port, "GET", "/metrics")
    assert reply.status == 200, reply
    assert reply.headers["content-type"].startswith("text/plain"), reply.headers
    return Samples(reply.body.decode("utf-8"))


async def scrape_until(port: int, check: Callable[[Samples], bool]) -> Samples:
    """Scrape until ``check`` holds (the server may still be finishing a
    disconnect when the client is done)."""
    with trio.fail_after(10):
        while True:
            samples = await scrape(port)
            if check(samples):
                return samples
            await trio.testing.wait_all_tasks_blocked()


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return after(name, **labels) - before(name, **labels)


# === 1. the exposition ===========================================================


async def test_metrics_is_prometheus_text(server: ChatServer) -> None:
    reply = await http_request(server.port, "GET", "/metrics")
    assert reply.status == 200
    content_type = reply.headers["content-type"]
    assert content_type.startswith("text/plain")
    assert "version=" in content_type
    text = reply.body.decode("utf-8")
    assert "# HELP chatd_connections " in text
    assert "# TYPE chatd_connections gauge" in text
    samples = Samples(text)
    assert samples.types["chatd_connections"] == "gauge"
    for counter in (
        "chatd_connects",
        "chatd_disconnects",
        "chatd_reconnects",
        "chatd_auth_failures",
        "chatd_rate_limited",
        "chatd_slow_consumer_closes",
        "chatd_messages",
    ):
        assert samples.types[counter] == "counter", counter
        assert (f"{counter}_total", frozenset()) in samples.values, counter
    for histogram in (
        "chatd_delivery_latency_seconds",
        "chatd_store_commit_seconds",
        "chatd_store_group_size",
        "chatd_sqlite_checkpoint_seconds",
    ):
        assert samples.types[histogram] == "histogram", histogram
    assert samples.types["chatd_sqlite_checkpoints"] == "counter"
    for gauge in (
        "chatd_sqlite_wal_bytes",
        "chatd_sqlite_wal_frames",
        "chatd_sqlite_wal_frames_left",
    ):
        assert samples.types[gauge] == "gauge", gauge
    assert samples("chatd_connections") == 0
    assert samples("chatd_connects_total") == 0
    # labelled counters are there at 0 before their first event (alerts and
    # rate() see the first one as an increase)
    zero = [
        *(("chatd_errors_total", {"code": code.value}) for code in ErrorCode),
        *(("chatd_retention_purged_messages_total", {"kind": k}) for k in ("room", "direct")),
        *(("chatd_message_changes_total", {"kind": k}) for k in ("edited", "deleted")),
        ("chatd_sqlite_checkpoints_total", {"mode": "RESTART", "result": "busy"}),
    ]
    for name, labels in zero:
        key = (name, frozenset(labels.items()))
        assert samples.values.get(key) == 0.0, (name, labels)


async def test_metrics_head_is_200_without_body(server: ChatServer) -> None:
    reply = await http_request(server.port, "HEAD", "/metrics")
    assert reply.status == 200
    assert reply.body == b""


# === 2. every figure moves under load ===============================================


async def test_every_figure_moves_under_a_real_load(make_config: Callable[..., Config]) -> None:
    config = make_config(
        rooms={"public": ["general", "random", "bulk"]},
        limits={
            "messages_per_minute": 2,
            "messages_per_hour": 100,
            "max_content_length": 600_000,
            "max_frame_bytes": 1 << 21,
        },
        server={"send_buffer_bytes": 4096},
    )
    async with running(config) as srv:
        port = srv.port
        with trio.fail_after(60):
            start = await scrape(port)
            assert start("chatd_connections") == 0

            async with (
                connect(srv, 1, "alice") as alice,
                connect(srv, 2, "bob") as bob,
                connect(srv, 3, "carol") as carol,
            ):
                await alice.join("general")
                await bob.join("general")
                await alice.expect("user_connected")
                await carol.join("general")
                await alice.expect("user_connected")
                await bob.expect("user_connected")
                s1 = await scrape(port)
                assert s1("chatd_connections") == 3
                assert delta(s1, start, "chatd_connects_total") == 3
                assert delta(s1, start, "chatd_frames_in_total", type="join_room") == 3
                assert delta(s1, start, "chatd_frames_out_total", type="join_room_ack") == 3
                # alice saw bob and carol, bob saw carol.
                assert delta(s1, start, "chatd_frames_out_total", type="user_connected") == 3

                # One room message, three members: three frames out.
                await alice.send(
                    "room_message", {"room": "general", "content": "hello"}, request_id="m"
                )
                for client in (alice, bob, carol):
                    await client.expect("room_message")
                s2 = await scrape(port)
                assert delta(s2, s1, "chatd_frames_in_total", type="room_message") == 1
                assert delta(s2, s1, "chatd_frames_out_total", type="room_message") == 3
                assert delta(s2, s1, "chatd_messages_total") == 1
                assert delta(s2, s1, "chatd_delivery_latency_seconds_count") == 1
                assert delta(s2, s1, "chatd_store_commit_seconds_count") >= 1
                assert delta(s2, s1, "chatd_store_group_size_count") >= 1
                assert delta(s2, s1, "chatd_store_group_size_sum") >= 1

                # A direct message: the recipient and the sender.
                await bob.send(
                    "direct_message", {"to_user_id": 3, "content": "psst"}, request_id="d"
                )
                assert (await bob.expect("direct_message"))["request_id"] == "d"
                assert (await carol.expect("direct_message"))["data"]["content"] == "psst"
                # Bad JSON.
                await carol.send_raw("{not json")
                bad = await carol.expect("error")
                assert bad["data"]["code"] == "INVALID_FORMAT"
                s3 = await scrape(port)
                assert delta(s3, s2, "chatd_frames_in_total", type="direct_message") == 1
                assert delta(s3, s2, "chatd_frames_out_total", type="direct_message") == 2
                assert delta(s3, s2, "chatd_messages_total") == 1
                assert delta(s3, s2, "chatd_errors_total", code="INVALID_FORMAT") == 1
                assert delta(s3, s2, "chatd_frames_out_total", type="error") == 1

                # A rate limit: two messages a minute, the third is refused.
                async with connect(srv, 4, "dave") as dave:
                    await dave.join("random")
                    for n in range(3):
                        await dave.send(
                            "room_message", {"room": "random", "content": f"r{n}"}, request_id=n
                        )
                    # The refusal is sent at once, the copies after their commit.
                    frames = {}
                    for _ in range(3):
                        frame = await dave.recv()
                        frames[frame["request_id"]] = frame
                    assert frames[0]["type"] == frames[1]["type"] == "room_message"
                    assert frames[2]["type"] == "error"
                    assert frames[2]["data"]["code"] == "RATE_LIMITED"
                    s4 = await scrape(port)
                    assert s4("chatd_connections") == 4
                assert delta(s4, s3, "chatd_errors_total", code="RATE_LIMITED") == 1
                assert delta(s4, s3, "chatd_rate_limited_total") == 1
                assert delta(s4, s3, "chatd_messages_total") == 2
                assert delta(s4, s3, "chatd_frames_in_total", type="room_message") == 3

                # A bad token: refused, counted, not a connection.
                async with connect(srv, token="not-a-jwt") as intruder:
                    refused = await intruder.expect("error")
                    assert refused["data"]["code"] == "AUTH_FAILED"
                    await closed_with(intruder, 4001)

                # bob goes and comes back within the reconnect window.
                s5 = await scrape_until(port, lambda s: s("chatd_connections") == 3)
                assert delta(s5, s4, "chatd_auth_failures_total") == 1
                assert delta(s5, s4, "chatd_connects_total") == 0
                assert delta(s5, start, "chatd_disconnects_total") == 1  # dave
                assert delta(s5, start, "chatd_reconnects_total") == 0
            s6 = await scrape_until(port, lambda s: s("chatd_connections") == 0)
            assert delta(s6, start, "chatd_disconnects_total") == 4
            async with connect(srv, 2, "bob") as bob_again:
                await bob_again.nothing_pending()
                s7 = await scrape(port)
                assert s7("chatd_connections") == 1
                assert delta(s7, s6, "chatd_reconnects_total") == 1
                assert delta(s7, s6, "chatd_connects_total") == 1

            # A slow consumer: a raw client with a tiny receive buffer that
            # never reads, fed ~1 MB history pages until it is closed 1013.
            async with raw_ws(srv, user_id=30, username="stalled", rcvbuf=4096) as stalled:
                await stalled.send_json("join_room", {"room": "bulk"})
                await stalled.expect("join_room_ack")
                async with connect(srv, 31, "eve") as eve:
                    await eve.join("bulk")
                    for n in range(2):
                        await eve.send(
                            "room_message",
                            {"room": "bulk", "content": f"{n}" * 500_000},
                            request_id=n,
                        )
                        assert (await eve.expect("room_message", wait=30))["request_id"] == n
                    s8 = await scrape(port)
                    # Two messages, two members each (stalled and eve).
                    assert delta(s8, s7, "chatd_frames_out_total", type="room_message") == 4

                    # If those two did not fill its buffers, ~1 MB history
                    # pages will.
                    for _ in range(12):
                        if (await scrape(port))("chatd_slow_consumer_closes_total") >= 1:
                            break
                        try:
                            await stalled.send_json("room_history", {"room": "bulk", "limit": 100})
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            break
                    s9 = await scrape_until(
                        port, lambda s: s("chatd_slow_consumer_closes_total") >= 1
                    )
                    assert delta(s9, start, "chatd_slow_consumer_closes_total") == 1
                    # Now it reads: the close is 1013 (or the socket's end).
                    code: int | None = None
                    while True:
                        event = await stalled.next_event(timeout=30)
                        if event is None:
                            break
                        if isinstance(event, CloseConnection):
                            code = event.code
                            await stalled.send(event.response())
                            break
                    assert code == 1013
                    s10 = await scrape_until(port, lambda s: s("chatd_connections") == 1)
            end = await scrape_until(port, lambda s: s("chatd_connections") == 0)

    # Totals over the whole load.
    assert end("chatd_connections") == 0
    assert delta(end, start, "chatd_connects_total") == 7
    assert delta(end, start, "chatd_disconnects_total") == 7
    assert delta(end, start, "chatd_reconnects_total") == 1
    assert delta(end, start, "chatd_auth_failures_total") == 1
    assert delta(end, start, "chatd_slow_consumer_closes_total") == 1
    assert delta(end, start, "chatd_rate_limited_total") == 1
    assert delta(end, start, "chatd_errors_total", code="INVALID_FORMAT") == 1
    assert delta(end, start, "chatd_errors_total", code="RATE_LIMITED") == 1
    assert delta(end, start, "chatd_errors_total", code="AUTH_FAILED") == 1
    # alice, bob, carol, dave, stalled, eve.
    assert delta(end, start, "chatd_frames_in_total", type="join_room") == 6
    # alice's 1, dave's 3 (one refused), eve's 2.
    assert delta(end, start, "chatd_frames_in_total", type="room_message") == 6
    assert delta(end, start, "chatd_frames_in_total", type="direct_message") == 1
    # 3 (general) + 2 (dave alone in random) + 4 (bulk).
    assert delta(end, start, "chatd_frames_out_total", type="room_message") == 9
    assert delta(end, start, "chatd_frames_out_total", type="direct_message") == 2
    committed = 1 + 1 + 2 + 2
    assert delta(end, start, "chatd_messages_total") == committed
    assert delta(end, start, "chatd_delivery_latency_seconds_count") == committed
    assert delta(end, start, "chatd_delivery_latency_seconds_sum") >= 0
    commits = delta(end, start, "chatd_store_commit_seconds_count")
    assert commits >= 1
    assert delta(end, start, "chatd_store_commit_seconds_sum") > 0
    assert delta(end, start, "chatd_store_group_size_count") == commits
    # Every message is one operation of some group (user upserts add more).
    assert delta(end, start, "chatd_store_group_size_sum") >= committed
    assert s10("chatd_connections") == 1


async def test_sqlite_checkpoints_show_on_metrics(make_config: Callable[..., Config]) -> None:
    """A round asked of the server's store (its timer is an hour away): the
    PASSIVE checkpoint and the WAL it found; then, with nothing committed
    since, the TRUNCATE that empties the -wal file."""
    config = make_config(storage={"checkpoint_interval_seconds": 3600, "wal_max_bytes": 2 << 20})
    async with running(config) as srv:
        store = srv.ctx.store
        assert isinstance(store, SqliteStore)
        assert store.checkpoint_interval == 3600
        with trio.fail_after(30):
            async with connect(srv, 1, "alice") as alice:
                await alice.join("general")
                await alice.send("room_message", {"room": "general", "content": "hi"})
                await alice.expect("room_message")
            (passive,) = await store.checkpoint()
            s1 = await scrape(srv.port)
            assert s1("chatd_sqlite_checkpoints_total", mode="PASSIVE", result="done") == 1
            assert s1("chatd_sqlite_checkpoint_seconds_count", mode="PASSIVE") == 1
            assert s1("chatd_sqlite_wal_frames") == passive.frames > 0
            assert s1("chatd_sqlite_wal_frames_left") == 0
            assert s1("chatd_sqlite_wal_bytes") == passive.wal_bytes > 0

            done = await store.checkpoint()
            assert [c.mode for c in done] == ["PASSIVE", "TRUNCATE"]
            s2 = await scrape(srv.port)
            assert s2("chatd_sqlite_checkpoints_total", mode="TRUNCATE", result="done") == 1
            assert s2("chatd_sqlite_checkpoint_seconds_count", mode="TRUNCATE") == 1
            assert s2("chatd_sqlite_checkpoints_total", mode="RESTART", result="done") == 0
            assert s2("chatd_sqlite_wal_bytes") == 0


# === 3. metrics on their own listener ===============================================


async def test_metrics_listen_serves_metrics_elsewhere_and_404_on_main_port(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(server={"metrics_listen": "127.0.0.1:0"})
    async with running(config) as srv:
        assert srv.metrics_port not in (0, srv.port)
        reply = await http_request(srv.metrics_port, "GET", "/metrics")
        assert reply.status == 200
        assert reply.headers["content-type"].startswith("text/plain")
        assert Samples(reply.body.decode())("chatd_connections") == 0

        # The main port: no /metrics, but the rest as usual.
        main = await http_request(srv.port, "GET", "/metrics")
        assert main.status == 404
        assert b"chatd_connections" not in main.body
        health = await http_request(srv.port, "GET", "/healthz")
        assert health.status == 200
        assert health.json()["status"] == "ok"
        assert (await http_request(srv.port, "GET", "/readyz")).status == 200

        # The metrics port: /metrics only.
        assert (await http_request(srv.metrics_port, "GET", "/healthz")).status == 404
        assert (await http_request(srv.metrics_port, "GET", "/readyz")).status == 404
        assert (await http_request(srv.metrics_port, "GET", "/")).status == 404

        # It counts the main port's connections.
        async with connect(srv, 1, "alice") as alice:
            await alice.join("general")
            samples = await scrape(srv.metrics_port)
            assert samples("chatd_connections") == 1
            assert samples("chatd_connects_total") == 1
            assert samples("chatd_frames_in_total", type="join_room") == 1


async def test_metrics_on_main_port_by_default(server: ChatServer) -> None:
    assert server.metrics_port == 0
    async with connect(server, 1, "alice") as alice:
        await alice.nothing_pending()
        samples = await scrape(server.port)
    assert samples("chatd_connections") == 1
    assert samples("chatd_frames_in_total", type="ping") == 1
    assert samples("chatd_frames_out_total", type="pong") == 1


def test_reconnect_window_counts_and_forgets() -> None:
    """A user back within the window is a reconnect; one back later is not;
    users gone longer than the window are forgotten as time goes on (oldest
    first, a step at a time: no rebuild of the whole table per disconnect)."""
    from chatd.metrics import RECONNECT_WINDOW, Metrics

    m = Metrics()
    for uid in range(1000):
        m.connected(uid, 0.0)
        m.disconnected(uid, 0.0)
    m.connected(1, RECONNECT_WINDOW - 1)  # back in time
    assert m.reconnects._value.get() == 1
    m.disconnected(1, RECONNECT_WINDOW - 1)
    m.connected(5000, RECONNECT_WINDOW + 1)
    m.disconnected(5000, RECONNECT_WINDOW + 1)  # prunes everyone gone at 0.0
    assert set(m._gone) == {1, 5000}
    m.connected(2, RECONNECT_WINDOW + 2)  # gone too long: not a reconnect
    assert m.reconnects._value.get() == 1
