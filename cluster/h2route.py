"""Personal intercepts over HTTP/2 (h2c, as gRPC speaks it): the agent's per-stream routing.

One HTTP/2 connection multiplexes many requests (a gRPC channel sends every call of
a client on one), so a filter cannot pick a destination per connection as a global
intercept does, and not per request in sequence as cluster/httproute.py does for
HTTP/1.1: it must pick one per *stream*.  The agent therefore terminates the
client's connection (h2 as the server), evaluates the filter on each stream's
request headers (`:path` is the gRPC method, gRPC metadata are plain headers), and
opens each stream on an HTTP/2 connection of its own to the chosen destination
(h2 as a client): one to the app, one per intercept through its tunnel, streams
multiplexed on each.  HEADERS, DATA, trailers (grpc-status), RST_STREAM and
GOAWAY are relayed; DATA is acknowledged to its sender (its flow-control window
reopened) only once the other side has taken it, so a slow receiver slows its
sender and no buffer grows beyond the windows (plus, per stream, a copy of a small
request until its answer starts: a stream the app refuses unprocessed is sent again).
GOAWAY frames are handled beside h2 (see `_GoAways`).

Why by hand: the framing, HPACK, stream states and flow-control arithmetic are the
h2 library's (hyperframe's for the GOAWAY frames); h2 itself does no I/O and no
proxying, and the Python proxies that can route HTTP/2 requests (mitmproxy) are whole
applications with their own loop and dependency tree, too heavy for a sidecar beside
every workload.  The relay here is the glue only: which stream goes where, and
moving frames and window credit between the connections.

A client's connection preface is recognised by `sniff()` before h11 sees any byte
(`PRI * HTTP/2.0` would otherwise parse as an HTTP/1 request line).  `probe()`
tells whether the app's port answers an HTTP/2 preface; the agent asks it when the
HTTP/1.1 probe failed, and reports "h2c" to the manager, which then accepts
filtered intercepts on that port.

Runs inside the cluster image: Python 3.11, h2 (with hpack, hyperframe) and the stdlib.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Hashable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import Frame, GoAwayFrame

from .httproute import Upstream

log = logging.getLogger("tpnb.agent.h2")

#: the client connection preface (RFC 9113 section 3.4)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: AgentSession.app_protocol of an app that answers HTTP/2 with prior knowledge
H2C = "h2c"
CHUNK = 256 * 1024
PROBE_TIMEOUT = 3.0
#: our receive windows (per stream; the connection's is raised to CONN_WINDOW)
STREAM_WINDOW = 1 << 20
CONN_WINDOW = 16 << 20
MAX_STREAMS = 256
#: a request of at most this many body bytes is kept until its answer starts, to be sent again
#: on a new connection if the app refuses the stream unprocessed (REFUSED_STREAM, or GOAWAY)
REPLAY_LIMIT = 64 * 1024
_CLOSED = (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError, ValueError)


@dataclass(frozen=True)
class H2Request:
    """What a filter sees of one stream: `target` is `:path`, `headers` every header (lowercase names,
    pseudo-headers included), as bytes -- the shape `choose` gets from the HTTP/1.1 router too."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]

    @classmethod
    def from_headers(cls, headers: list[tuple[bytes, bytes]]) -> H2Request:
        pseudo = {n: v for n, v in headers if n.startswith(b":")}
        return cls(pseudo.get(b":method", b""), pseudo.get(b":path", b""), list(headers))


def is_grpc(headers: list[tuple[bytes, bytes]]) -> bool:
    """A gRPC call's headers (content-type application/grpc, +proto etc.); shared with the wiretap."""
    return any(n == b"content-type" and v.startswith(b"application/grpc") for n, v in headers)


Choose = Callable[[Any], Hashable]
Connect = Callable[[Hashable], Awaitable[Upstream | None]]


async def sniff(reader: asyncio.StreamReader) -> bytes:
    """The client's first bytes: PREFACE when it speaks HTTP/2 with prior knowledge, else the bytes
    read so far (reading stops as soon as they differ from the preface, or at the end)."""
    got = b""
    while len(got) < len(PREFACE):
        data = await reader.read(len(PREFACE) - len(got))
        if not data:
            return got
        got += data
        if not PREFACE.startswith(got):
            return got
    return got


# ------------------------------------------------------------------ GOAWAY, before h2 sees it

class _GoAways:
    """Takes GOAWAY frames out of a peer's byte stream (whole frames; framing per RFC 9113 4.1,
    parsed by hyperframe) so that h2 never sees them.

    h2 moves its connection to CLOSED on a received GOAWAY and then rejects every later frame
    (python-hyper/h2 issue 1199), so the streams that the GOAWAY lets finish -- all of them up to
    its last_stream_id, e.g. when a gRPC server closes a connection by age or on shutdown -- would
    die with it.  We keep h2's connection open, handle the GOAWAY ourselves (no new streams there;
    the ones above last_stream_id were not processed), and let the rest finish.
    """

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes | GoAwayFrame]:
        """Bytes for h2 and GoAwayFrames, in order; an incomplete frame waits for more data."""
        buf = self.buf
        buf += data
        out: list[bytes | GoAwayFrame] = []
        start = pos = 0
        while len(buf) - pos >= 9:
            end = pos + 9 + int.from_bytes(buf[pos:pos + 3], "big")
            if end > len(buf):
                break
            if buf[pos + 3] == GoAwayFrame.type:
                try:
                    frame, _ = Frame.parse_frame_header(memoryview(bytes(buf[pos:pos + 9])))
                    frame.parse_body(memoryview(bytes(buf[pos + 9:end])))
                except Exception:  # malformed: h2 says so to the peer
                    pos = end
                    continue
                if pos > start:
                    out.append(bytes(buf[start:pos]))
                out.append(frame)  # type: ignore[arg-type]
                start = end
            pos = end
        if pos > start:
            out.append(bytes(buf[start:pos]))
        del buf[:pos]
        return out


# ------------------------------------------------------------------ one side of the relay

def _conn(client: bool) -> h2.connection.H2Connection:
    # the client's headers are validated (and normalised) once, as they arrive, and relayed as they
    # are; the answers of the app and of the laptops (their own HTTP/2 servers) are relayed unchecked
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=client, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False, validate_inbound_headers=not client))
    conn.initiate_connection()
    settings: dict[int, int] = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW}
    if client:
        settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
    else:
        settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = MAX_STREAMS
    conn.update_settings(settings)
    conn.increment_flow_control_window(CONN_WINDOW - 65535)
    return conn


class _Side:
    """An h2 connection and the byte pipe under it; `send_data` honours the peer's windows."""

    def __init__(self, conn: h2.connection.H2Connection, send: Callable[[bytes], Awaitable[None]],
                 write_now: Callable[[bytes], None] | None = None) -> None:
        self.conn, self._send, self._write_now = conn, send, write_now
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._kicked: asyncio.Future[None] | None = None
        self._dirty = False
        self._soon = False
        self.streams: dict[int, _Stream] = {}   # our stream id on this connection -> the relayed stream

    async def flush(self) -> None:
        async with self._lock:  # one writer at a time, bytes in h2's order
            data = self.conn.data_to_send()
            if data:
                await self._send(data)

    def kick(self) -> None:
        """Flush soon, without the caller waiting on this side's pipe (a slow laptop's tunnel
        must not hold up the client's reads, nor the app's streams)."""
        self._dirty = True
        if self._write_now is not None:   # a socket: one write per loop turn, no task
            if not self._soon:
                self._soon = True
                asyncio.get_running_loop().call_soon(self._write_pending)
        elif self._kicked is None or self._kicked.done():
            self._kicked = asyncio.ensure_future(self._kick())

    def _write_pending(self) -> None:
        self._soon = False
        if self._lock.locked():   # an awaited flush is writing: it or the next kick takes the rest
            self._kicked = asyncio.ensure_future(self._kick())
            return
        data = self.conn.data_to_send()
        if data and self._write_now is not None:
            self._write_now(data)

    async def _kick(self) -> None:
        while self._dirty:
            self._dirty = False
            try:
                await self.flush()
            except Exception:  # the pipe broke: its reader finds out and cleans up
                return

    def changed(self) -> None:
        """A window or the open-stream count moved: wake the senders waiting for it."""
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    async def send_data(self, sid: int, data: bytes, end: bool = False) -> None:
        view = memoryview(data)
        while True:
            ev = self._changed
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window > 0 or not view:
                n = min(window, len(view))
                last = end and n == len(view)
                if n or last:
                    self.conn.send_data(sid, bytes(view[:n]), end_stream=last)
                view = view[n:]
                self.kick()
                if not view:
                    return
            else:
                await ev.wait()

    def ack(self, sid: int, n: int) -> None:
        """`n` flow-controlled bytes of stream `sid` were passed on: reopen the sender's window."""
        if n:
            with contextlib.suppress(*_CLOSED):
                self.conn.acknowledge_received_data(n, sid)


class _UpSide(_Side):
    def __init__(self, key: Hashable, stream: Upstream, conn: h2.connection.H2Connection) -> None:
        writer = getattr(stream, "writer", None)   # a StreamUpstream (the app): its socket
        super().__init__(conn, stream.send, writer.write if writer is not None else None)
        self.key, self.stream = key, stream
        self.reader: asyncio.Task[None] | None = None
        self.draining = False   # GOAWAY received or the connection ended: no new streams


@dataclass
class _Stream:
    """One client stream, relayed to one upstream stream."""

    down_id: int
    key: Hashable
    c2s: asyncio.Queue[tuple[Any, ...]] = field(default_factory=asyncio.Queue)
    s2c: asyncio.Queue[tuple[Any, ...]] = field(default_factory=asyncio.Queue)
    up: _UpSide | None = None
    up_id: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    answered: bool = False   # response headers went to the client
    req_ends: bool = False   # the request was one HEADERS frame with END_STREAM (kept so on relay)
    resp_ends: bool = False  # likewise the response (gRPC's trailers-only answers must stay one frame)
    c2s_done: bool = False
    s2c_done: bool = False
    closed: bool = False
    replay: list[tuple[Any, ...]] | None = field(default_factory=list)   # what went upstream so far
    replay_size: int = 0
    retried: bool = False
    gen: int = 0   # bumped when the stream moves to another upstream connection

    def keep(self, item: tuple[Any, ...]) -> None:
        if self.replay is not None:
            self.replay_size += len(item[1]) if item[0] == "data" else 0
            if self.replay_size > REPLAY_LIMIT or len(self.replay) >= 64:
                self.replay = None   # too big to keep: such a stream is not sent again
            else:
                self.replay.append(item)


# ------------------------------------------------------------------ the router

class H2Router:
    """Serves one client HTTP/2 connection: each stream goes where `choose` says.

    `choose(H2Request)` returns a key (the app's or an intercept's); `connect(key)` opens a byte
    pipe to it (None: refused, and the stream gets a 502).  One upstream HTTP/2 connection per key
    is kept while the client's lasts (a new one after the old one said GOAWAY or ended).
    `first`: bytes already read from the client (the preface that `sniff` saw).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 choose: Choose, connect: Connect, first: bytes = b"") -> None:
        self.reader, self.writer = reader, writer
        self.choose, self.connect = choose, connect
        self.first = first
        self.down = _Side(_conn(client=False), self._write_down, writer.write)
        self.ups: dict[Hashable, _UpSide] = {}
        self._connecting: dict[Hashable, asyncio.Future[_UpSide | None]] = {}
        self._all_ups: set[_UpSide] = set()
        self.routed: dict[Hashable, int] = {}
        self.replayed = 0   # streams sent again after an upstream refused them

    async def _write_down(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def run(self) -> None:
        """Until the client ends the connection (or breaks the protocol: it gets a GOAWAY)."""
        goaways = _GoAways()
        try:
            parts: list[Any] = [self.first] if self.first else []   # the preface: not framed
            seen = len(self.first)
            while True:
                try:
                    for part in parts:
                        if isinstance(part, GoAwayFrame):   # the client will open no more streams
                            log.debug("client said GOAWAY (%s)", part.error_code)
                            continue
                        for ev in self.down.conn.receive_data(part):
                            self._on_down(ev)
                except h2.exceptions.ProtocolError as exc:
                    log.debug("client broke HTTP/2: %s", exc)
                    with contextlib.suppress(Exception):
                        await self.down.flush()   # h2 queued the GOAWAY
                    return
                self.down.kick()   # h2's own answers (SETTINGS and PING acks)
                for up in list(self._all_ups):
                    up.kick()             # resets relayed to it
                data = await self.reader.read(CHUNK)
                if not data:
                    return
                unframed = max(0, len(PREFACE) - seen)   # the rest of the preface, if `first` had not all
                seen += len(data)
                parts = ([data[:unframed]] if unframed else []) + goaways.feed(data[unframed:])
        finally:
            await self._close()

    def goaway(self) -> None:
        """Ask the client to open no more streams here (the agent is stopping); the streams it has
        finish.  Written beside h2, not through it: h2 would refuse every frame after its own GOAWAY."""
        frame = GoAwayFrame(0)
        frame.last_stream_id, frame.error_code = self.down.conn.highest_inbound_stream_id, 0
        with contextlib.suppress(Exception):
            self.writer.write(self.down.conn.data_to_send() + frame.serialize())

    async def _close(self) -> None:
        for st in list(self.down.streams.values()):
            self._finish(st)
        for t in [t for up in self._all_ups for t in (up.reader,) if t is not None]:
            t.cancel()
        for up in self._all_ups:
            up.stream.close()
        for fut in self._connecting.values():
            fut.cancel()
        self._all_ups.clear()
        self.ups.clear()

    # ---------------------------------------------------------- client -> upstream
    def _on_down(self, ev: Any) -> None:
        E = h2.events
        if isinstance(ev, E.RequestReceived):
            key = self.choose(H2Request.from_headers(list(ev.headers)))
            st = _Stream(ev.stream_id, key, req_ends=ev.stream_ended is not None)
            self.down.streams[ev.stream_id] = st
            self.routed[key] = self.routed.get(key, 0) + 1
            st.c2s.put_nowait(("headers", list(ev.headers)))
            st.tasks.append(asyncio.ensure_future(self._c2s(st)))
            return
        st = self.down.streams.get(getattr(ev, "stream_id", 0) or 0)
        if isinstance(ev, E.DataReceived):
            if st is None or st.closed:
                self.down.ack(ev.stream_id, ev.flow_controlled_length)
            else:
                st.c2s.put_nowait(("data", ev.data, ev.flow_controlled_length))
        elif isinstance(ev, E.TrailersReceived) and st is not None:
            st.c2s.put_nowait(("trailers", list(ev.headers)))
        elif isinstance(ev, E.StreamEnded) and st is not None and not st.req_ends:
            st.c2s.put_nowait(("end",))
        elif isinstance(ev, E.StreamReset) and st is not None:
            if st.up is not None and st.up_id:
                with contextlib.suppress(*_CLOSED):
                    st.up.conn.reset_stream(st.up_id, ev.error_code)
            self._finish(st)
        elif isinstance(ev, (E.WindowUpdated, E.RemoteSettingsChanged)):
            self.down.changed()

    async def _upstream(self, key: Hashable) -> _UpSide | None:
        up = self.ups.get(key)
        if up is not None and not up.draining:
            return up
        fut = self._connecting.get(key)
        if fut is None:
            fut = self._connecting[key] = asyncio.ensure_future(self._open(key))
            fut.add_done_callback(lambda _f, k=key: self._connecting.pop(k, None))
        return await asyncio.shield(fut)

    async def _open(self, key: Hashable) -> _UpSide | None:
        stream = await self.connect(key)
        if stream is None:
            return None
        up = _UpSide(key, stream, _conn(client=True))
        self.ups[key] = up
        self._all_ups.add(up)
        up.reader = asyncio.ensure_future(self._read_up(up))
        up.kick()
        return up

    async def _c2s(self, st: _Stream) -> None:
        pending = 0   # flow-controlled bytes taken from the client and not yet acknowledged
        try:
            _, headers = await st.c2s.get()
            up = await self._ready(st.key)
            if up is None:
                await self._refuse(st, headers)
                return
            self._open_up(st, up, headers)
            if st.req_ends:
                return
            while True:
                item = await st.c2s.get()
                st.keep(item[:2])
                if item[0] == "data":
                    pending = item[2]
                    await up.send_data(st.up_id, item[1])
                    self.down.ack(st.down_id, pending)
                    pending = 0
                    self.down.kick()
                    continue
                if item[0] == "trailers":
                    up.conn.send_headers(st.up_id, item[1], end_stream=True)
                else:  # end
                    up.conn.end_stream(st.up_id)
                up.kick()
                up.changed()
                return
        except _CLOSED:
            return   # the stream was reset meanwhile (its reset reaches the other side)
        except Exception as exc:  # the upstream's pipe broke under a send
            log.debug("stream %d to %r: %s", st.down_id, st.key or "app", exc)
            self._reset_down(st, h2.errors.ErrorCodes.CANCEL if st.answered else h2.errors.ErrorCodes.REFUSED_STREAM)
        finally:
            self.down.ack(st.down_id, pending)
            self._drain(st.c2s, self.down, st.down_id)
            st.c2s_done = True
            if st.s2c_done:
                self._finish(st, reset=False)

    async def _ready(self, key: Hashable) -> _UpSide | None:
        """The upstream connection for `key`, once it can take one more stream (None: unreachable)."""
        try:
            up = await self._upstream(key)
            while up is not None and (up.draining or up.conn.open_outbound_streams
                                      >= up.conn.remote_settings.max_concurrent_streams):
                if up.draining:   # it said GOAWAY or ended meanwhile: a new connection
                    up = await self._upstream(key)
                else:
                    await up.wait_changed()
            return up
        except Exception as exc:  # connect() failed in a way it did not turn into None
            log.info("cannot reach %r: %s", key or "app", exc)
            return None

    def _open_up(self, st: _Stream, up: _UpSide, headers: list[tuple[bytes, bytes]]) -> None:
        st.up, st.up_id = up, up.conn.get_next_available_stream_id()
        up.conn.send_headers(st.up_id, headers, end_stream=st.req_ends)
        st.keep(("headers", headers))
        up.streams[st.up_id] = st
        st.tasks.append(asyncio.ensure_future(self._s2c(st)))
        up.kick()

    def _retry(self, st: _Stream) -> bool:
        """Send a refused (unprocessed) stream again on a new connection, once, if it is small and
        complete and nothing of its answer came yet."""
        if st.closed or st.retried or st.answered or not st.c2s_done or not st.replay or st.up is None:
            return False
        st.retried = True
        st.up.streams.pop(st.up_id, None)
        me = asyncio.current_task()
        for t in st.tasks:
            if t is not me:
                t.cancel()
        st.gen += 1
        st.tasks, st.s2c, st.s2c_done = [], asyncio.Queue(), False
        st.up, st.up_id = None, 0
        st.tasks.append(asyncio.ensure_future(self._replay(st)))
        return True

    async def _replay(self, st: _Stream) -> None:
        items, st.replay = st.replay or [], None
        try:
            up = await self._ready(st.key)
            if up is None:
                self._reset_down(st, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            log.debug("stream %d: refused by %r, sent again", st.down_id, st.key or "app")
            self.replayed += 1
            self._open_up(st, up, items[0][1])
            for item in items[1:]:
                if item[0] == "data":
                    await up.send_data(st.up_id, item[1])
                elif item[0] == "trailers":
                    up.conn.send_headers(st.up_id, item[1], end_stream=True)
                else:
                    up.conn.end_stream(st.up_id)
            up.kick()
        except _CLOSED:
            return
        except Exception as exc:
            log.debug("stream %d to %r: %s", st.down_id, st.key or "app", exc)
            self._reset_down(st, h2.errors.ErrorCodes.REFUSED_STREAM)

    async def _refuse(self, st: _Stream, headers: list[tuple[bytes, bytes]]) -> None:
        """The destination did not answer: gRPC calls fail UNAVAILABLE (a trailers-only answer), other
        requests get a 502."""
        msg = b"tpnb: the intercepting laptop did not answer"
        with contextlib.suppress(*_CLOSED):
            if is_grpc(headers):
                self.down.conn.send_headers(st.down_id, [
                    (b":status", b"200"), (b"content-type", b"application/grpc"),
                    (b"grpc-status", b"14"), (b"grpc-message", msg)], end_stream=True)
            else:
                self.down.conn.send_headers(st.down_id, [(b":status", b"502"), (b"content-type", b"text/plain")])
                await self.down.send_data(st.down_id, msg + b"\n", end=True)
            st.answered = True
            self.down.kick()
        st.s2c_done = True
        self._reset_down(st, h2.errors.ErrorCodes.NO_ERROR)   # a no-op when the client's side ended

    # ---------------------------------------------------------- upstream -> client
    async def _read_up(self, up: _UpSide) -> None:
        why = "ended"
        goaways = _GoAways()
        try:
            while data := await up.stream.recv():
                for part in goaways.feed(data):
                    if isinstance(part, GoAwayFrame):
                        self._goaway(up, part.last_stream_id)
                        continue
                    for ev in up.conn.receive_data(part):
                        self._on_up(up, ev)
                up.kick()
                self.down.kick()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # ProtocolError, ConnectionError, TunnelError, ...
            why = f"failed: {exc}"
        log.debug("upstream %r %s", up.key or "app", why)
        up.draining = True
        if self.ups.get(up.key) is up:
            del self.ups[up.key]
        for st in list(up.streams.values()):   # streams it never finished: reset at the client, after
            self._up_reset(st, None)            # what it did send
        up.stream.close()
        self._all_ups.discard(up)
        up.changed()
        with contextlib.suppress(Exception):
            await self.down.flush()

    def _on_up(self, up: _UpSide, ev: Any) -> None:
        E = h2.events
        if isinstance(ev, (E.WindowUpdated, E.RemoteSettingsChanged)):
            up.changed()
            return
        if isinstance(ev, E.ConnectionTerminated):   # (GOAWAYs are taken out before h2; see _GoAways)
            self._goaway(up, ev.last_stream_id)
            return
        if isinstance(ev, E.PushedStreamReceived):   # we disabled push; refuse one anyway
            with contextlib.suppress(*_CLOSED):
                up.conn.reset_stream(ev.pushed_stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        sid = getattr(ev, "stream_id", 0) or 0
        st = up.streams.get(sid)
        if isinstance(ev, E.DataReceived):
            if st is None or st.closed:
                up.ack(sid, ev.flow_controlled_length)
            else:
                st.s2c.put_nowait(("data", ev.data, ev.flow_controlled_length))
        elif st is None:
            return
        elif isinstance(ev, E.ResponseReceived) and ev.stream_ended is not None:
            st.resp_ends = True
            st.s2c.put_nowait(("trailers", list(ev.headers)))   # sent as one HEADERS with END_STREAM
        elif isinstance(ev, (E.ResponseReceived, E.InformationalResponseReceived)):
            st.s2c.put_nowait(("headers", list(ev.headers)))
        elif isinstance(ev, E.TrailersReceived):
            st.s2c.put_nowait(("trailers", list(ev.headers)))
        elif isinstance(ev, E.StreamEnded):
            if not st.resp_ends:
                st.s2c.put_nowait(("end",))
            up.changed()
        elif isinstance(ev, E.StreamReset):
            self._up_reset(st, ev.error_code)
            up.changed()

    def _goaway(self, up: _UpSide, last_stream_id: int | None) -> None:
        """No new streams on `up`; those above last_stream_id were not processed: refused."""
        log.debug("upstream %r said GOAWAY (last stream %s)", up.key or "app", last_stream_id)
        up.draining = True
        if self.ups.get(up.key) is up:
            del self.ups[up.key]
        for sid, st in list(up.streams.items()):
            if last_stream_id is not None and sid > last_stream_id:
                self._up_reset(st, h2.errors.ErrorCodes.REFUSED_STREAM)
        up.changed()

    def _up_reset(self, st: _Stream, code: int | None) -> None:
        """The upstream reset a stream (None: its connection ended): the client's stream is reset
        after what came before (in order, by its s2c pump), or now if the response was complete.
        A stream refused unprocessed is sent again instead, when it can be (`_retry`)."""
        if code == h2.errors.ErrorCodes.REFUSED_STREAM and self._retry(st):
            return
        if st.s2c_done:
            self._reset_down(st, h2.errors.ErrorCodes.CANCEL if code is None else code)
        else:
            st.s2c.put_nowait(("reset", code))

    async def _s2c(self, st: _Stream) -> None:
        assert st.up is not None
        up, sid, q, gen, pending = st.up, st.up_id, st.s2c, st.gen, 0
        try:
            while True:
                item = await q.get()
                if item[0] == "headers":
                    self.down.conn.send_headers(st.down_id, item[1])
                    st.answered = True
                    st.replay = None
                    self.down.kick()
                elif item[0] == "data":
                    pending = item[2]
                    await self.down.send_data(st.down_id, item[1])
                    up.ack(sid, pending)
                    pending = 0
                    up.kick()
                elif item[0] == "reset":   # the upstream reset the stream, or its connection ended
                    code = item[1]
                    if code is None:
                        code = h2.errors.ErrorCodes.CANCEL if st.answered else h2.errors.ErrorCodes.REFUSED_STREAM
                    self._reset_down(st, code)
                    self.down.kick()
                    return
                else:
                    if item[0] == "trailers":
                        self.down.conn.send_headers(st.down_id, item[1], end_stream=True)
                        st.answered = True
                    else:
                        self.down.conn.end_stream(st.down_id)
                    self.down.kick()
                    return
        except _CLOSED:
            return
        except Exception as exc:  # the client's pipe broke under a send
            log.debug("stream %d from %r: %s", st.down_id, st.key or "app", exc)
            self._reset_down(st, h2.errors.ErrorCodes.CANCEL)
        finally:
            up.ack(sid, pending)
            self._drain(q, up, sid)
            if st.gen == gen:   # (else the stream went on to another connection: not done)
                st.s2c_done = True
                if st.c2s_done:
                    self._finish(st, reset=False)

    # ---------------------------------------------------------- ending streams
    def _reset_down(self, st: _Stream, code: int) -> None:
        with contextlib.suppress(*_CLOSED):
            self.down.conn.reset_stream(st.down_id, code)
        self._finish(st)

    def _finish(self, st: _Stream, reset: bool = True) -> None:
        """Forget a stream; `reset`: its pumps stop now (else both have ended)."""
        if st.closed:
            return
        st.closed = True
        self.down.streams.pop(st.down_id, None)
        if st.up is not None:
            st.up.streams.pop(st.up_id, None)
        me = asyncio.current_task()
        if reset:
            for t in st.tasks:
                if t is not me:
                    t.cancel()
        self._drain(st.c2s, self.down, st.down_id)
        if st.up is not None:
            self._drain(st.s2c, st.up, st.up_id)
            st.up.changed()

    @staticmethod
    def _drain(q: asyncio.Queue[tuple[Any, ...]], side: _Side, sid: int) -> None:
        """Data that will never be passed on still counts against the connection's window: ack it."""
        while not q.empty():
            item = q.get_nowait()
            if item[0] == "data":
                side.ack(sid, item[2])


# ------------------------------------------------------------------ the protocol probe

async def probe(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str:
    """H2C if the port answers an HTTP/2 connection preface with its SETTINGS, else "tcp: <why>".

    Sends the preface and an empty SETTINGS frame only (no request).  Raises OSError when
    nothing listens."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    got = bytearray()
    try:
        writer.write(conn.data_to_send())
        await writer.drain()
        async with asyncio.timeout(timeout):
            while data := await reader.read(4096):
                got.extend(data[: max(0, 64 - len(got))])
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RemoteSettingsChanged):
                        return H2C
        return "tcp: it closed the connection on an HTTP/2 connection preface"
    except TimeoutError:
        return f"tcp: it did not answer an HTTP/2 connection preface within {timeout:.0f} s"
    except h2.exceptions.ProtocolError:
        return f"tcp: it answered an HTTP/2 connection preface with {bytes(got[:32])!r}"
    except ConnectionError:
        what = f" after {bytes(got[:32])!r}" if got else ""
        return f"tcp: it reset the connection on an HTTP/2 connection preface{what}"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
