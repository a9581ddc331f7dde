"""A webhook receiver for bench/webhooks.py: answers every POST with 204 at
once (HTTP/1.1, keep-alive, h11 on Trio) and, when stopped (SIGTERM),
prints how many requests and messages it got.

    python bench/webhook_receiver.py PORT
"""

from __future__ import annotations

import json
import signal
import sys
from functools import partial

import h11
import trio

counts = {"requests": 0, "messages": 0, "unread": 0}


async def serve(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    body = b""
    async with stream:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                counts["requests"] += 1
                payload = json.loads(body)
                if payload["type"] == "message.created":
                    counts["messages"] += len(payload["data"]["messages"])
                else:
                    counts["unread"] += 1
                body = b""
                reply = h11.Response(status_code=204, headers=[])
                await stream.send_all(conn.send(reply) + (conn.send(h11.EndOfMessage()) or b""))
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return


async def main(port: int) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio.serve_tcp, serve, port, host="127.0.0.1"))
            async for _ in signals:
                nursery.cancel_scope.cancel()
    print(json.dumps(counts))


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
