"""One WebSocket connection: wsproto for the protocol, our own outbound path.

One task per connection, the connection's own (an idle connection holds no
other task, nursery or buffer):

* it **reads**: waits for the socket to become readable, parses the common
  client frames itself (a whole text message, a close, a ping, a pong) and
  feeds every other frame to wsproto's frame parser,
  and hands each complete text message to the session, in order, without a
  task switch per frame (see ``_reader``);
* a **writer** task exists only while there is something the kernel did not
  take (or, with ``?batch=1``, frames to batch): it drains the outbound
  buffer, everything pending in one ``writev``, waiting for the socket to
  become writable when the kernel's buffer is full, and ends when the buffer
  is empty;
* the **heartbeat** is one timer in the run's shared heap (``timers.py``):
  a ping every ``ping_interval``, the connection dropped after
  ``idle_timeout`` without a byte from the peer.

``send`` never blocks and never switches task: while nothing is buffered it
writes straight to the non-blocking socket; what the kernel does not take
goes to the buffer, in order, for the writer. A peer whose buffer passes
``send_buffer_bytes`` is too slow: what it has not started receiving is
dropped and it is closed with 1013, and no other connection waits for it.

Each connection is handed the node's ``Fanout`` (``fanout.py``), which
corks the writes of a commit group (each member's frames of the group leave
in one ``writev``) and gathers a room's consecutive messages into runs. A
pending run is the fan-out's; ``send`` and ``close`` end it before anything
else is written, so every connection gets its frames in the order sent.

Data frames are built once by the hub (``frames.OutFrame``) and written as
they are; wsproto builds only the control frames (ping, pong, close), so the
two never interleave within a message.

The connection's life is one state, ``self.state`` (``wire.State``: OPEN,
LOCAL_CLOSING, REMOTE_CLOSING, CLOSED, GONE), kept and changed by the
``Wire`` alone; this module only reads it. Beside it the connection keeps
its outbound buffer and whether a writer task is draining it, which are the
buffer's business, not the connection's life.

Batching: a client that connected with ``?batch=1`` gets its frames through
the writer task instead, which wraps everything that piled up since its last
turn into one ``message_batch`` frame (one frame alone is sent as it is).

Closing: ``close(code)`` queues the close frame and gives the peer
``CLOSE_TIMEOUT`` seconds to answer before the socket is closed anyway. A
connection that ends with the peer's bytes unread, or without its close
frame, lingers (``_linger``): closing such a socket would make the kernel
reset it and drop what the peer has not read yet, our close frame too. Once
the session has closed the connection (a refused token, too many invalid
frames, a client sending on into a saturated node), the reader stops at
once: the frames after, which nobody would handle, are dropped unparsed by
the linger instead of read one by one until the peer's close frame comes.

Memory: an idle connection keeps only this object, wsproto's frame parser
(the handshake objects are dropped once upgraded), one cancel scope and one
timer; the outbound buffer and the writer's events are made when first needed
and dropped when empty.
"""

from __future__ import annotations

import logging
import math
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Protocol

import trio
import trio.lowlevel
from wsproto import WSConnection
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, TextMessage

from chatd.auth import Identity
from chatd.errors import CloseCode
from chatd.protocol import batch_payload
from chatd.transport.fanout import Fanout
from chatd.transport.frames import OutFrame, unmask
from chatd.transport.timers import timers
from chatd.transport.wire import (
    CLOSED,
    GONE,
    LOCAL_CLOSING,
    OPEN,
    REMOTE_CLOSING,
    State,
    Wire,
)

log = logging.getLogger("chatd.transport")

RECEIVE_SIZE = 65536
CLOSE_TIMEOUT = 5.0
#: Seconds a connection closed with the peer's bytes unread, or its close
#: frame not come, reads and drops them before the socket is closed.
LINGER = 2.0
#: Seconds from a read of at least ``BIG_READ`` bytes with no read finding
#: the socket empty after which the peer is ``behind``: it sends faster
#: than this node reads.
BEHIND = 1.0
BIG_READ = 16384
#: ``drained`` returns once less than this is buffered.
LOW_WATER = 65536
#: Most buffers handed to one ``writev`` (Linux IOV_MAX is 1024).
WRITEV_MAX = 512


async def _linger(sock: trio.socket.SocketType) -> None:
    """A lingering close (RFC 9112 §9.6): end our side (what we wrote
    goes, then FIN), read and drop what the peer still sends until it
    closes or ``LINGER`` seconds pass, then close. A task of its own, so
    the connection's end (its session, presence) does not wait for it."""
    try:
        sock.shutdown(socket.SHUT_WR)
        with trio.move_on_after(LINGER):
            while await sock.recv(RECEIVE_SIZE):
                pass
    except OSError:  # the peer is gone already
        pass
    finally:
        sock.close()


def _unread(fd: int) -> bool:
    """Whether bytes from the peer wait in the socket, unread."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _read(fd: int) -> bytes | None:
    """What the socket has (b"" at its end or on an error), None for nothing
    yet. A function of its own: an exception raised in the reader's frame
    would make Python keep a frame object for it as long as it lives."""
    try:
        return os.read(fd, RECEIVE_SIZE)
    except BlockingIOError:
        return None
    except OSError:
        return b""


class MessageHandler(Protocol):
    async def handle_text(self, raw: str) -> None: ...
    async def handle_binary(self) -> None: ...


class WebSocketConnection:
    """An accepted WebSocket on a Trio socket stream."""

    __slots__ = (
        "__weakref__",
        "_batch",
        "_batch_bytes",
        "_fanout",
        "_fd",
        "_full_since",
        "_head_started",
        "_idle_timeout",
        "_limit",
        "_max_message_bytes",
        "_next_ping",
        "_on_slow",
        "_out",
        "_out_bytes",
        "_ping_interval",
        "_progress",
        "_received",
        "_scope",
        "_stream",
        "_wall",
        "_window_bits",
        "_writing",
        "_ws",
        "close_code",
        "identity",
        "last_seen",
    )

    def __init__(
        self,
        stream: trio.SocketStream,
        ws: Wire | WSConnection,
        identity: Identity,
        fanout: Fanout[WebSocketConnection],
        *,
        window_bits: int | None,
        send_buffer_bytes: int,
        ping_interval: float,
        idle_timeout: float,
        batch: bool = False,
        wall: Callable[[], float] = time.time,
        on_slow: Callable[[], None] | None = None,
        max_message_bytes: int | None = None,
        received: bytes = b"",
    ) -> None:
        """``ws``: the accepted connection's frame parser (or a wsproto
        connection past its handshake, whose parser is taken).
        ``max_message_bytes``: the largest message the reader parses
        itself (the server passes its ``max_frame_bytes``); None leaves
        every frame to wsproto. ``received``: bytes read with the upgrade
        request, before the connection existed."""
        #: Who is connected (fixed for the connection's life: a refreshed
        #: token names the same user).
        self.identity = identity
        self._fanout = fanout
        self._stream = stream
        self._fd = stream.socket.fileno()
        # Only the frame parser is kept: a handshake's h11 state and request
        # go with its WSConnection (see wire.py).
        self._ws = ws if isinstance(ws, Wire) else Wire.take(ws)
        self._window_bits = window_bits
        self._limit = send_buffer_bytes
        self._ping_interval = ping_interval
        self._idle_timeout = idle_timeout
        self._max_message_bytes = max_message_bytes
        self._received = received
        self._next_ping = math.inf
        #: What the kernel has not taken yet: made on first need, dropped once
        #: empty (a list: an empty deque is 760 bytes, on every connection
        #: that was ever written to in a cork or past the kernel's buffer).
        self._out: list[bytes | memoryview] | None = None
        self._out_bytes = 0
        #: The first buffered item was partly written: it must go out whole.
        self._head_started = False
        #: A writer task is running (or about to).
        self._writing = False
        #: Set (and dropped) by the writer each time it has written, when
        #: someone waits for it.
        self._progress: trio.Event | None = None
        #: With ``?batch=1``: frames waiting for the writer to batch them.
        self._batch: list[OutFrame] | None = [] if batch else None
        self._batch_bytes = 0
        self._wall = wall
        self._on_slow = on_slow
        self._scope: trio.CancelScope | None = None
        self.last_seen = trio.current_time()
        #: Since when no read has found the socket empty, from a big read
        #: on (None: the last one did, or all were small).
        self._full_since: float | None = None
        #: Close code sent or received, for logs and tests.
        self.close_code: int | None = None

    @property
    def state(self) -> State:
        """Where the connection is in its life (``wire.State``)."""
        return self._ws.state

    @property
    def behind(self) -> bool:
        """Whether the peer sends faster than this node reads it: for
        ``BEHIND`` seconds, from a big read on, no read has found the
        socket empty, so what the session handles now was sent about that
        long ago at least."""
        since = self._full_since
        return since is not None and trio.current_time() - since >= BEHIND

    @property
    def open(self) -> bool:
        """Whether data frames still flow both ways."""
        return self._ws.state is OPEN

    # --- sending (synchronous, never blocks) ------------------------------------

    def send(self, frame: OutFrame) -> None:
        """Queue one data frame for this connection."""
        fanout = self._fanout
        if fanout.run is not None:  # a run's frames go first: they were sent first
            fanout.end_run()
        if self._ws.state is not OPEN:
            return
        batch = self._batch
        if batch is None:
            self._write(frame.wire(self._window_bits))
            return
        self._batch_bytes += len(frame.payload)
        if self._out_bytes + self._batch_bytes > self._limit:
            self._too_slow()
            return
        batch.append(frame)
        self._kick()

    def send_joined(self, frames: list[OutFrame], joined: dict[int | None, bytes]) -> None:
        """Queue a run's frames (``fanout.Fanout``); ``joined`` keeps their
        joined bytes for each compression setting, shared by the run's
        members."""
        if self._ws.state is not OPEN:
            return
        if self._batch is not None:
            for frame in frames:
                self.send(frame)
            return
        bits = self._window_bits
        data = joined.get(bits)
        if data is None:
            if len(frames) == 1:
                data = frames[0].wire(bits)
            else:
                data = b"".join([frame.wire(bits) for frame in frames])
            joined[bits] = data
        self._write(data)

    def send_raw(self, data: bytes) -> None:
        """Queue bytes that are already framed (the handshake's 101)."""
        self._write(data, force=True)

    def _write_control(self, data: bytes) -> None:
        """A control frame goes after every data frame queued before it."""
        self._flush_batch()
        self._write(data, force=True)

    def _flush_batch(self) -> None:
        batch = self._batch
        if not batch:
            return
        self._batch = []
        self._batch_bytes = 0
        frame = batch[0] if len(batch) == 1 else OutFrame(batch_payload(batch, self._wall()))
        self._write(frame.wire(self._window_bits), force=True)

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake with ``code`` (from OPEN; once closing,
        closed or gone, nothing more happens)."""
        fanout = self._fanout
        if fanout.run is not None:  # frames sent before the close go before it
            fanout.end_run()
        ws = self._ws
        if not ws.can_close():
            return
        self.close_code = code
        self._write_control(ws.send(CloseConnection(code, reason[:100])))
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, trio.current_time() + CLOSE_TIMEOUT)

    def _buffer(self) -> list[bytes | memoryview]:
        out = self._out
        if out is None:
            out = self._out = []
        return out

    def _write(self, data: bytes, *, force: bool = False) -> None:
        if self._ws.state is GONE:
            return
        if not self._out:
            fanout = self._fanout
            if fanout.corking:  # written once, with the rest, at uncork
                fanout.defer(self)
                self._buffer().append(data)
                self._out_bytes += len(data)
                return
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._abort(exc)
                return
            if sent == len(data):
                return
            self._head_started = sent > 0
            self._buffer().append(memoryview(data)[sent:])
            self._out_bytes += len(data) - sent
            self._kick()
            return
        if not force and self._out_bytes + len(data) > self._limit:
            self._too_slow()
            return
        self._out.append(data)
        self._out_bytes += len(data)
        if not self._fanout.corking:
            # (While corked, a connection with data buffered either has its
            # writer running or is in the corked list, flushed at uncork.)
            self._kick()

    def flush(self) -> None:
        """Write what is buffered in one ``writev`` now (the fan-out calls it
        at the end of a corked block); the writer task gets what the kernel
        does not take."""
        out = self._out
        if self._ws.state is GONE or not out:
            return
        try:
            sent = self._write_buffered(out)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._abort(exc)
            return
        self._consume(sent)
        if self._out:
            self._kick()

    def _write_buffered(self, out: list[bytes | memoryview]) -> int:
        """Hand the kernel what is buffered (one ``write`` for one buffer);
        how many bytes it took."""
        if len(out) == 1:
            return os.write(self._fd, out[0])
        return os.writev(self._fd, out[:WRITEV_MAX])

    def _too_slow(self) -> None:
        log.warning(
            "WS_SLOW: UserID=%d, Buffered=%d bytes: closing 1013",
            self.identity.user_id,
            self._out_bytes,
        )
        if self._on_slow is not None:
            self._on_slow()
        out = self._out
        keep = out[0] if self._head_started and out else None
        if out:
            out.clear()
        self._out_bytes = 0
        if self._batch is not None:
            self._batch = []
            self._batch_bytes = 0
        if keep is not None and out is not None:
            out.append(keep)
            self._out_bytes = len(keep)
        self.close(CloseCode.TRY_AGAIN_LATER, "Slow consumer")

    def _abort(self, exc: BaseException | None = None) -> None:
        """The socket is gone or hopeless: stop everything now."""
        ws = self._ws
        if ws.state is not GONE and exc is not None:
            log.debug("WS_ABORT: UserID=%d: %s", self.identity.user_id, exc)
        ws.abort()
        if self._out:
            self._out.clear()
        self._out_bytes = 0
        if self._scope is not None:
            self._scope.cancel()

    # --- the connection's task ----------------------------------------------------

    async def run(self, handler: MessageHandler) -> None:
        """Serve the connection until it closes; the socket is closed after."""
        self._next_ping = trio.current_time() + self._ping_interval
        heap = timers()
        heartbeat = heap.schedule(self._next_ping, self)
        # Closed before running (a refused token): CLOSE_TIMEOUT to go.
        deadline = math.inf if self._ws.state is OPEN else trio.current_time() + CLOSE_TIMEOUT
        try:
            with trio.CancelScope(deadline=deadline) as scope:
                self._scope = scope
                try:
                    await self._reader(handler)
                except Exception:  # a bug in a handler ends this connection, not the node
                    log.exception("WS_ERROR: UserID=%d", self.identity.user_id)
                    self.close(CloseCode.INTERNAL_ERROR, "Internal error")
                if self._out or self._batch:  # (a scope only when there is something to wait for)
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await self._flushed()
        finally:
            # Our close sent and the peer's not come, or its bytes left
            # unread: closing now would make the kernel reset the
            # connection and drop what the peer has not taken in yet, our
            # close frame with it (a client that sent a frame too large, or
            # one more frame after ours, would never learn why).
            linger = self._ws.state is LOCAL_CLOSING or _unread(self._fd)
            self._ws.abort()
            heap.cancel(heartbeat)
            if linger:  # (on a copy of the socket: its owner closes this one)
                try:
                    copy = self._stream.socket.dup()
                except OSError:  # out of file descriptors: closed at once, as before
                    pass
                else:
                    trio.lowlevel.spawn_system_task(_linger, copy)
            # Closed at once: trio.aclose_forcefully would raise and catch a
            # Cancelled here (about 45 µs) for nothing.
            self._stream.socket.close()

    async def _reader(self, handler: MessageHandler) -> None:
        """Parse the client's frames and hand each text message on, in order,
        without a task switch per frame.

        The common frame (a whole text message in one masked frame, no RSV
        bits, at most ``max_message_bytes``) is parsed here: unmasked,
        decoded and handed on without wsproto, whose parser costs about
        10 µs a frame. So is a whole control frame (a close, ping or pong:
        FIN, no RSV bit, masked), which ``Wire.control`` turns into the event
        wsproto would make of it (a close wsproto would refuse goes to
        wsproto). Every other frame (fragments, binary, compressed, invalid
        UTF-8, anything malformed) is handed to wsproto whole, in order, so
        wsproto's state and its checks (1002, 1007, 1009) stay exactly as if
        it had seen every frame (control frames do not touch its message
        state). A frame declaring more
        than ``max_message_bytes`` ends the fast path: from there on wsproto
        gets every byte (and refuses that frame at its header)."""
        ws = self._ws
        fd = self._fd
        limit = self._max_message_bytes
        slow = limit is None
        #: wsproto holds the first fragments of a data message: the rest of
        #: it (and anything in between) goes to wsproto too.
        fragmented = False
        parts: list[str] = []
        buf: bytes | bytearray = self._received
        self._received = b""
        #: The last read was short: the kernel had nothing more then.
        drained = False
        while True:
            pos = 0
            size = len(buf)
            while not slow and size - pos >= 2:
                assert limit is not None
                b0 = buf[pos]
                b1 = buf[pos + 1]
                length = b1 & 0x7F
                head = pos + 2
                if length == 126:
                    if size - pos < 4:
                        break
                    length = (buf[pos + 2] << 8) | buf[pos + 3]
                    head = pos + 4
                    if length < 126:  # not the fewest bytes: wsproto fails it (1002)
                        slow = True
                        break
                elif length == 127:
                    if size - pos < 10:
                        break
                    length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                    head = pos + 10
                    if length < 0x10000:  # (as above)
                        slow = True
                        break
                if b1 & 0x80:
                    head += 4  # the masking key
                if length > limit:
                    slow = True
                    break
                end = head + length
                if end > size:
                    break  # the rest of the frame is still to come
                if b0 == 0x81 and b1 & 0x80 and not fragmented:
                    try:
                        text = unmask(buf[head:end], buf[head - 4 : head]).decode()
                    except UnicodeDecodeError:
                        pass  # wsproto closes with 1007
                    else:
                        pos = end
                        if ws.state is OPEN:
                            await handler.handle_text(text)
                            if ws.state is not OPEN:  # closed by the session: read no more
                                return
                        text = ""  # (not kept while the connection waits)
                        continue
                elif 0x88 <= b0 <= 0x8A and b1 & 0x80 and length <= 125 and ws.parsing:
                    # A whole close, ping or pong (FIN, no RSV bit, masked).
                    event = ws.control(b0 & 0x0F, unmask(buf[head:end], buf[head - 4 : head]))
                    if event is not None:
                        pos = end
                        if await self._event(handler, parts, event):
                            return
                        event = None
                        continue
                if b0 & 0x0F < 0x8:  # a data frame: fragmented until one with FIN
                    fragmented = not b0 & 0x80
                ws.receive_data(bytes(buf[pos:end]))
                pos = end
                if await self._events(handler, parts):
                    return
            if pos:
                buf = buf[pos:]
            if slow and buf:
                ws.receive_data(bytes(buf))
                buf = b""
            if await self._events(handler, parts):
                return
            # One schedule point per chunk read, not two as with
            # ``receive_some`` (a checkpoint after every read, and a wait when
            # the socket is empty; each costs a pass through Trio's scheduler):
            # after a short read, wait until the socket is readable, then read;
            # after a full one, yield once and read again (so too while the
            # peer may be ``behind``: only a read that finds nothing says
            # it is not).
            try:
                if drained and self._full_since is None:
                    await trio.lowlevel.wait_readable(fd)
                else:
                    await trio.lowlevel.checkpoint()
            except trio.ClosedResourceError:
                return
            data = _read(fd)
            if data is None:
                drained = True
                self._full_since = None
                continue
            if not data:
                return
            size = len(data)
            drained = size < RECEIVE_SIZE
            now = self.last_seen = trio.current_time()
            # Whether the peer is ``behind``: a big read starts the count, a
            # read that finds nothing after a turn ends it. (Not a short
            # read: the kernel's receive queue holds what the TCP window
            # lets in, often less than a full read when the node reads
            # slowly, while a peer far ahead keeps the rest in its own
            # send buffer and refills the queue as soon as it is read.)
            if self._full_since is None and size >= BIG_READ:
                self._full_since = now
            if buf:  # a frame split across reads: grow one buffer, not copies
                if not isinstance(buf, bytearray):
                    buf = bytearray(buf)
                buf += data
            else:
                buf = data
            data = None

    async def _events(self, handler: MessageHandler, parts: list[str]) -> bool:
        """Handle what wsproto has parsed; True once the reader must stop."""
        for event in self._ws.events():
            if await self._event(handler, parts, event):
                return True
        state = self._ws.state
        return state is CLOSED or state is GONE

    async def _event(self, handler: MessageHandler, parts: list[str], event: Event) -> bool:
        """Handle one event; True once the reader must stop."""
        ws = self._ws
        if isinstance(event, TextMessage):
            if ws.state is not OPEN:
                return False
            parts.append(event.data)
            if event.message_finished:
                text = parts[0] if len(parts) == 1 else "".join(parts)
                parts.clear()
                await handler.handle_text(text)
                return ws.state is not OPEN  # (closed by the session: read no more)
        elif isinstance(event, BytesMessage):
            if event.message_finished and ws.state is OPEN:
                await handler.handle_binary()
                return ws.state is not OPEN
        elif isinstance(event, Ping):
            if ws.state is OPEN:
                self._write_control(ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            if ws.state is OPEN:
                # wsproto found a protocol error (1002, 1007, 1009):
                # it is ours to send the close.
                self.close(event.code, event.reason or "")
                return True
            if ws.state is REMOTE_CLOSING:
                self.close_code = self.close_code or event.code
                self._write_control(ws.send(event.response()))
            return True
        return False

    def _kick(self) -> None:
        """Make sure a writer runs for what is buffered."""
        if self._writing or self._ws.state is GONE:
            return
        self._writing = True
        trio.lowlevel.spawn_system_task(self._writer, name="chatd.transport.writer")

    async def _writer(self) -> None:
        """Write what is buffered (and batch what is waiting); end when the
        buffer is empty. A system task: it must not raise."""
        try:
            while self._ws.state is not GONE:
                self._flush_batch()
                out = self._out
                if not out:
                    return
                try:
                    sent = self._write_buffered(out)
                except BlockingIOError:
                    sent = 0
                except InterruptedError:  # pragma: no cover
                    continue
                except OSError as exc:
                    self._abort(exc)
                    return
                self._consume(sent)
                self._progressed()
                if self._out:
                    try:
                        await trio.lowlevel.wait_writable(self._fd)
                    except (trio.ClosedResourceError, trio.BusyResourceError) as exc:
                        self._abort(exc)
                        return
        except Exception as exc:  # pragma: no cover - a bug; never crash the run
            log.exception("WS_WRITER: UserID=%d", self.identity.user_id)
            self._abort(exc)
        finally:
            self._writing = False
            self._progressed()

    def _progressed(self) -> None:
        progress = self._progress
        if progress is not None:
            self._progress = None
            progress.set()

    def _consume(self, sent: int) -> None:
        self._out_bytes -= sent
        out = self._out
        assert out is not None
        done = 0
        while sent:
            head = out[done]
            if sent >= len(head):
                sent -= len(head)
                done += 1
                self._head_started = False
            else:
                out[done] = memoryview(head)[sent:]
                self._head_started = True
                sent = 0
        if done == len(out):
            self._out = None
        elif done:
            del out[:done]

    async def drained(self) -> None:
        """Return once less than ``LOW_WATER`` bytes are buffered for this
        connection (at once when it is no longer open): a replay sends its
        next page only then, so it never holds more than that and a page."""
        while self._out_bytes + self._batch_bytes > LOW_WATER and self._ws.state is OPEN:
            await self._next_progress()

    async def _flushed(self) -> None:
        """Return once everything queued has been handed to the kernel."""
        self._flush_batch()
        while self._out and self._ws.state is not GONE:
            await self._next_progress()

    async def _next_progress(self) -> None:
        """Wait until the writer has written (``_progressed``)."""
        progress = self._progress
        if progress is None:
            progress = self._progress = trio.Event()
        await progress.wait()

    # --- the heartbeat (called by the run's timer task) ---------------------------

    def on_timer(self, now: float) -> float | None:
        if self._ws.state is GONE:
            return None
        idle_deadline = self.last_seen + self._idle_timeout
        if now >= idle_deadline:
            if not _unread(self._fd):
                log.info("WS_IDLE: UserID=%d: no sign of life, dropping", self.identity.user_id)
                self._abort()
                return None
            # The peer did speak: its bytes wait unread while the reader is
            # busy in a handler (a join in a reconnect storm, a slow store).
            self.last_seen = now
            idle_deadline = now + self._idle_timeout
        if now >= self._next_ping:
            self._next_ping = now + self._ping_interval
            if self._ws.state is OPEN:
                self._write_control(self._ws.send(Ping(b"chatd")))
        return min(self._next_ping, idle_deadline)
