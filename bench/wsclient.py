"""A minimal WebSocket client for the load generator, on asyncio protocols.

Just enough of RFC 6455 / RFC 7692 for measuring a chat server on loopback:
the HTTP upgrade, masked client frames (a fresh random mask per frame, XORed
as one big integer), a frame reader that walks every frame of a received
chunk in one loop without a task switch per frame, answers to pings, the
closing handshake, and permessage-deflate decoding with one
``zlib.decompressobj`` per connection (which works both with and without the
server's context takeover).

What a received frame is *for* depends on ``Client.mode``, set by the worker
(``bench/worker.py``): counting deliveries, timing a latency probe embedded
in the content, or waiting for the client's own copy. Times are
``time.monotonic_ns()`` (CLOCK_MONOTONIC, system-wide on Linux, so the
publisher's clock and every receiver's clock in other processes are the same
clock), read once per received chunk.

Two more modes serve the big-room and reconnect-storm scenarios: ``PRESENCE``
counts every frame a connection receives, its bytes and the presence frames
among them (``user_connected``/``user_disconnected``, or a summarised
``room_presence``), and notes when the awaited ``join_room_ack`` arrived;
``STORM`` does the same and hands each ``room_message``'s ``id`` and probe
seq to ``on_msg``. Both read whole chunks at a time where they can (the
frame headers walked, the rest found with ``bytes.count``/``find``). A frame
much larger than a read (a ``join_room_ack`` listing 10,000 members is about
400 KB) is gathered as a list of reads and joined once, not re-copied on
every read. A close frame's code and reason are kept (``close_code``).
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
import zlib
from collections import deque
from typing import Any

MONO = time.monotonic_ns
RECV_SIZE = 65536
TAIL = b"\x00\x00\xff\xff"
ROOM_MESSAGE = b'{"type":"room_message"'
REQUEST_ID = b'"request_id"'
LAT_MARK = b'"content":"L'
ID_MARK = b'"id":'
PRESENCE_MARKS = (b'"user_connected"', b'"user_disconnected"')
SUMMARY_MARK = b'"room_presence"'
NOT_RECOVERED = b'"recovered":false'

# modes
IDLE, COUNT, LATENCY, OWN, PRESENCE, STORM = 0, 1, 2, 3, 4, 5


def frame(payload: bytes, opcode: int = 1) -> bytes:
    """A masked client frame (FIN set)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
    mask = os.urandom(4)
    if not n:
        return head + mask
    key = (mask * ((n + 3) // 4))[:n]
    masked = (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        n, "little"
    )
    return head + mask + masked


CLOSE_1000 = struct.pack("!H", 1000)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def frame_size(buf: bytes) -> int:
    """The whole size (header included) of the server frame starting
    ``buf``; 0 while its header is incomplete."""
    n = len(buf)
    if n < 2:
        return 0
    ln = buf[1] & 127
    if ln < 126:
        return 2 + ln
    if ln == 126:
        return 4 + ((buf[2] << 8) | buf[3]) if n >= 4 else 0
    return 10 + int.from_bytes(buf[2:10], "big") if n >= 10 else 0


def probe(seq: int, sent_ns: int) -> bytes:
    """The start of a latency probe's content."""
    return b"L%d:%d:" % (seq, sent_ns)


def seq_at(data: bytes, mark: int) -> int:
    """The seq of the probe whose ``LAT_MARK`` starts at ``mark``."""
    j = mark + len(LAT_MARK)
    return int(data[j : data.index(b":", j)])


def probe_seq(payload: bytes | memoryview) -> int:
    """The seq of the probe in a room_message payload (-1: none)."""
    data = bytes(payload)
    j = data.find(LAT_MARK)
    return -1 if j < 0 else seq_at(data, j)


def probes(chunks: list[tuple[int, int, int, int]]) -> tuple[dict[int, list[int]], int]:
    """Per seq [latest arrival ns, connections it reached], from the chunks
    of every connection of a worker; and how many chunks were not a run of
    consecutive seqs (counted, not used: a probe lost or out of order)."""
    out: dict[int, list[int]] = {}
    bad = 0
    for now, first, last, n in chunks:
        if last - first + 1 != n:
            bad += 1
            continue
        for seq in range(first, last + 1):
            rec = out.get(seq)
            if rec is None:
                out[seq] = [now, 1]
            else:
                rec[1] += 1
                if now > rec[0]:
                    rec[0] = now
    return out, bad


class Stats:
    """Per-worker counters shared by all its clients (one process, one thread)."""

    def __init__(self) -> None:
        self.counting = False
        self.rx = 0  # room_message frames received while counting
        self.other = 0  # other text frames while counting
        # latency probes, one entry per received chunk: (arrival_ns, first
        # seq, last seq, frames); seqs arrive in order on each connection, so
        # a chunk of n probes from a to a+n-1 is all that needs keeping
        # (``probes`` turns them into per-seq results after the window).
        self.lat_chunks: list[tuple[int, int, int, int]] = []
        self.own_lat: list[int] = []  # send -> own copy, ns (while counting)
        self.own_rx = 0
        self.last_rx_ns = 0
        # PRESENCE / STORM modes
        self.presence = 0  # user_connected / user_disconnected frames
        self.summaries = 0  # room_presence frames


class Client(asyncio.Protocol):
    """One WebSocket connection. ``ready`` resolves on 101, ``closed`` on loss."""

    def __init__(self, stats: Stats, target: str, deflate: bool) -> None:
        loop = asyncio.get_running_loop()
        self.stats = stats
        self.target = target
        self.offer_deflate = deflate
        self.ready: asyncio.Future[bool] = loop.create_future()
        self.ready.add_done_callback(_retrieve)  # (a failed connect nobody awaits)
        self.closed: asyncio.Future[bool] = loop.create_future()
        self.waiter: asyncio.Future[bytes] | None = None  # next frame containing waiter_key
        self.waiter_key = b""
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.inflater: Any = None
        self.buf = b""
        self.mode = IDLE
        self.frag: list[bytes] = []
        self.frag_rsv1 = False
        # publisher / own-copy state
        self.sent: deque[int] = deque()
        self.on_own: Any = None  # callback(client, now) after an own copy
        self.close_sent = False
        # the close frame received: code (1005: none in it) and reason
        self.close_code: int | None = None
        self.close_reason = ""
        # a large frame being gathered: its reads so far, their bytes, its size
        self.parts: list[bytes] | None = None
        self.have = 0
        self.need = 0
        # PRESENCE / STORM modes: what this connection received
        self.rx_bytes = 0
        self.frames_rx = 0
        self.presence_rx = 0
        self.ack_ns = 0  # when the awaited frame (``expect``) arrived
        self.not_recovered = False  # its join_room_ack said "recovered": false
        self.on_msg: Any = None  # STORM: callback(client, id, seq, now) per room_message

    # --- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        # asyncio reads up to 256 KiB a time into a fresh bytes object: above
        # glibc's mmap threshold, so every read was an mmap, page faults and
        # an mremap/munmap (a fifth of this process's CPU at chatd's latency
        # point). 64 KiB stays on the heap.
        transport.max_size = RECV_SIZE
        key = base64.b64encode(os.urandom(16)).decode()
        ext = (
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
            if self.offer_deflate
            else ""
        )
        transport.write(
            (
                f"GET {self.target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{ext}\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before 101"))
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed"))
        if not self.closed.done():
            self.closed.set_result(True)

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    self.abort()
                return
            head, data = self.buf[:end], self.buf[end + 4 :]
            self.buf = b""
            if not head.startswith(b"HTTP/1.1 101"):
                if not self.ready.done():
                    self.ready.set_exception(
                        ConnectionError(head.split(b"\r\n", 1)[0].decode("latin-1"))
                    )
                self.abort()
                return
            self.upgraded = True
            if b"permessage-deflate" in head.lower():
                self.inflater = zlib.decompressobj(-15)
            if not self.ready.done():  # (cancelled: its wait timed out)
                self.ready.set_result(True)
            if not data:
                return
        self.rx_bytes += len(data)
        if self.parts is not None:  # a large frame: join its reads once
            self.parts.append(data)
            self.have += len(data)
            if self.have < self.need:
                return
            buf = b"".join(self.parts)
            self.parts = None
            size = self.need
            if self.mode >= PRESENCE and self._large(buf, size, MONO()):
                if len(buf) == size:
                    self.buf = b""
                    return
                buf = buf[size:]
        else:
            buf = self.buf + data if self.buf else data
        n = len(buf)
        i = 0
        now = MONO()
        if (self.mode == COUNT or self.mode == LATENCY) and self._fast(buf, n, now):
            return
        if self.mode >= PRESENCE:
            i, frames = self._plain(buf, n)
            if i >= 0:
                if frames:
                    self._account(buf, 0, i, frames, now)
                self._keep(buf, i, n)
                return
            i = 0
        stats = self.stats
        mode = self.mode
        counting = stats.counting
        lat_n = 0
        lat_first = lat_last = b""
        while n - i >= 2:
            b0 = buf[i]
            ln = buf[i + 1] & 127
            h = i + 2
            if ln == 126:
                if n - i < 4:
                    break
                ln = (buf[i + 2] << 8) | buf[i + 3]
                h = i + 4
            elif ln == 127:
                if n - i < 10:
                    break
                ln = int.from_bytes(buf[i + 2 : i + 10], "big")
                h = i + 10
            end = h + ln
            if end > n:
                break
            i = end
            op = b0 & 15
            if op == 1 or op == 0:
                if not b0 & 0x80:  # a fragment: keep it
                    if op == 1:
                        self.frag_rsv1 = bool(b0 & 0x40)
                    self.frag.append(buf[h:end])
                    continue
                if op == 0:
                    self.frag.append(buf[h:end])
                    payload = b"".join(self.frag)
                    rsv1 = self.frag_rsv1
                    self.frag = []
                else:
                    payload = None
                    rsv1 = b0 & 0x40
                if rsv1:
                    payload = self.inflater.decompress((payload or buf[h:end]) + TAIL)
                if mode >= PRESENCE:
                    if payload is None:
                        payload = buf[h:end]
                    self._account(payload, 0, len(payload), 1, now)
                    continue
                if (mode == COUNT or mode == LATENCY) and payload is None:
                    is_rm = buf.startswith(ROOM_MESSAGE, h)
                else:
                    if payload is None:
                        payload = buf[h:end]
                    is_rm = payload.startswith(ROOM_MESSAGE)
                if not is_rm:
                    if counting:
                        stats.other += 1
                    if self.waiter is not None and self.waiter_key in (payload or buf[h:end]):
                        if not self.waiter.done():
                            self.waiter.set_result(payload or buf[h:end])
                        self.waiter = None
                    continue
                if counting:
                    stats.rx += 1
                stats.last_rx_ns = now
                if mode == LATENCY and payload is None:
                    payload = memoryview(buf)[h:end]
                if mode == LATENCY:
                    # only the chunk's first and last probe are parsed (below)
                    assert payload is not None
                    if lat_n == 0:
                        lat_first = payload
                    lat_last = payload
                    lat_n += 1
                elif mode == OWN:
                    if payload is None:
                        payload = buf[h:end]
                    if REQUEST_ID in payload and self.sent:
                        sent = self.sent.popleft()
                        if counting:
                            stats.own_rx += 1
                            stats.own_lat.append(now - sent)
                        if self.on_own is not None:
                            self.on_own(self, now)
            elif op == 9:  # ping -> pong (none after our close frame)
                if not self.close_sent:
                    self.send_raw(frame(buf[h:end], 0xA))
            elif op == 0xA:  # pong
                if self.waiter is not None and self.waiter_key == b"<pong>":
                    if not self.waiter.done():
                        self.waiter.set_result(b"")
                    self.waiter = None
            elif op == 8:  # close
                if self.close_code is None:
                    self.close_code = (buf[h] << 8) | buf[h + 1] if ln >= 2 else 1005
                    self.close_reason = bytes(buf[h + 2 : end]).decode("utf-8", "replace")
                if not self.close_sent:
                    self.close_sent = True
                    self.send_raw(frame(buf[h : h + 2] if ln >= 2 else b"", 8))
                if self.waiter is not None and self.waiter_key == b"<close>":
                    if not self.waiter.done():
                        self.waiter.set_result(b"")
                    self.waiter = None
                if self.transport is not None:
                    self.transport.close()
        self._keep(buf, i, n)
        if lat_n:
            first, last = probe_seq(lat_first), probe_seq(lat_last)
            if first >= 0 and last >= 0:
                stats.lat_chunks.append((now, first, last, lat_n))

    def _fast(self, buf: bytes, n: int, now: int) -> bool:
        """Count deliveries (and note latency probes) reading only the frame
        headers: when every complete frame of ``buf`` is a whole, plain text
        frame and each holds one room_message, they are counted with
        ``bytes.count``. False (nothing done): anything else, for the
        frame-by-frame path."""
        i, frames = self._plain(buf, n, large=False)
        if not frames or buf.count(ROOM_MESSAGE, 0, i) != frames:
            return False
        stats = self.stats
        if self.mode == LATENCY:
            if buf.count(LAT_MARK, 0, i) != frames:
                return False
            first = seq_at(buf, buf.find(LAT_MARK, 0, i))
            last = seq_at(buf, buf.rfind(LAT_MARK, 0, i))
            stats.lat_chunks.append((now, first, last, frames))
        if stats.counting:
            stats.rx += frames
        stats.last_rx_ns = now
        self._keep(buf, i, n)
        return True

    def _keep(self, buf: bytes, i: int, n: int) -> None:
        """Keep ``buf[i:]``, the start of the next frame, for the next read;
        when that frame is much larger than a read, gather it in ``parts``."""
        if i >= n:
            self.buf = b""
            return
        rest = buf[i:] if i else buf
        size = frame_size(rest)
        if size - len(rest) > RECV_SIZE:
            self.parts = [rest]
            self.have = len(rest)
            self.need = size
            self.buf = b""
        else:
            self.buf = rest

    def _large(self, buf: bytes, size: int, now: int) -> bool:
        """PRESENCE / STORM: the large frame ``buf[:size]`` (a join_room_ack
        listing thousands of members), counted without scanning it all: the
        awaited key is near its start, ``recovered`` near its end. False
        (nothing done) for anything else (a large room message, a fragment)."""
        if buf[0] != 0x81:
            return False
        ln = buf[1] & 127
        h = 2 if ln < 126 else 4 if ln == 126 else 10
        if buf.startswith(ROOM_MESSAGE, h):
            return False
        self.frames_rx += 1
        self.stats.last_rx_ns = now
        if self.waiter is not None and buf.find(self.waiter_key, h, h + 64) >= 0:
            self.ack_ns = now
            if buf.find(NOT_RECOVERED, max(h, size - 160), size) >= 0:
                self.not_recovered = True
            waiter, self.waiter = self.waiter, None
            if not waiter.done():
                waiter.set_result(b"")
        return True

    @staticmethod
    def _plain(buf: bytes, n: int, large: bool = True) -> tuple[int, int]:
        """(end of the last complete frame, frames) when every complete
        frame of ``buf`` is a whole text frame (``large``: of any length;
        otherwise under 64 KiB); (-1, 0) otherwise."""
        i = frames = 0
        while n - i >= 2:
            if buf[i] != 0x81:
                return -1, 0
            ln = buf[i + 1]
            if ln < 126:
                end = i + 2 + ln
            elif ln == 126:
                if n - i < 4:
                    break
                end = i + 4 + ((buf[i + 2] << 8) | buf[i + 3])
            elif not large:
                return -1, 0
            else:
                if n - i < 10:
                    break
                end = i + 10 + int.from_bytes(buf[i + 2 : i + 10], "big")
            if end > n:
                break
            i = end
            frames += 1
        return i, frames

    def _account(self, buf: bytes, lo: int, hi: int, frames: int, now: int) -> None:
        """PRESENCE / STORM: ``frames`` whole text frames in ``buf[lo:hi]``
        (headers included, which no marker can match)."""
        stats = self.stats
        stats.last_rx_ns = now
        self.frames_rx += frames
        pres = buf.count(PRESENCE_MARKS[0], lo, hi) + buf.count(PRESENCE_MARKS[1], lo, hi)
        summ = buf.count(SUMMARY_MARK, lo, hi)
        if pres or summ:
            stats.presence += pres
            stats.summaries += summ
            self.presence_rx += pres + summ
        if self.waiter is not None:
            j = buf.find(self.waiter_key, lo, hi)
            if j >= 0:
                self.ack_ns = now
                # the ack's own fields come before anything else it could hold
                k = buf.find(NOT_RECOVERED, j, hi)
                if k >= 0 and buf.find(ROOM_MESSAGE, j, k) < 0:
                    self.not_recovered = True
                waiter, self.waiter = self.waiter, None
                if not waiter.done():
                    waiter.set_result(b"")
        if self.mode == STORM and self.on_msg is not None:
            p = buf.find(ROOM_MESSAGE, lo, hi)
            while p >= 0:
                j = buf.find(ID_MARK, p, hi)
                e = buf.find(b",", j, hi)
                msg_id = int(buf[j + len(ID_MARK) : e])
                nxt = buf.find(ROOM_MESSAGE, e, hi)
                k = buf.find(LAT_MARK, e, hi if nxt < 0 else nxt)
                seq = -1
                if k >= 0:
                    k += len(LAT_MARK)
                    seq = int(buf[k : buf.find(b":", k, hi)])
                self.on_msg(self, msg_id, seq, now)
                p = nxt

    # --- actions -------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_text(self, text: bytes) -> None:
        self.send_raw(frame(text, 1))

    def expect(self, key: bytes) -> asyncio.Future[bytes]:
        """A future for the next text frame containing ``key`` (or ``<pong>``, ``<close>``)."""
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        # a connection lost before the frame fails the future; nobody may be
        # waiting on it any more (given up at a deadline): retrieve it here
        fut.add_done_callback(_retrieve)
        self.waiter = fut
        self.waiter_key = key
        return fut

    def start_close(self) -> None:
        if not self.close_sent:
            self.close_sent = True
            self.send_raw(frame(CLOSE_1000, 8))

    def abort(self) -> None:
        """Close now with a RST (SO_LINGER 0), leaving no TIME_WAIT behind."""
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.transport.abort()

    @property
    def is_open(self) -> bool:
        return self.upgraded and not self.closed.done()
