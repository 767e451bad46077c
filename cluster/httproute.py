"""Personal intercepts: the traffic-agent's per-request HTTP/1.1 routing.

An intercept with filters (`--http-header K=V`, `--http-path-prefix|equal|regex`)
takes only the requests that match them; every other request goes on to the app
unchanged, on the same client connection when keep-alive mixes them.

HTTP/1.1 is parsed by httptools (bindings of llhttp, Node.js's parser, the one
uvicorn uses): the client's requests, and each upstream's responses (the app, or
one tunnel per intercept).  Framing -- Content-Length, chunked, upgrades and
CONNECT, keep-alive -- is llhttp's.  What is ours is the relay around it, which
no library does: which request goes where, in order, on one client connection.
It is written for the per-request cost (issue 12: a request the filters do not
take must cost the app's clients little):

  * the client's connection and the app's are asyncio Protocols: a request is
    parsed and written to the app in the callback that read it, and the app's
    answer is written to the client in the callback that read that -- no task
    wake-up, no future, per request;
  * responses are relayed byte for byte (parsed only to know where they end);
    a request head is written from llhttp's fields (names as received), its body
    as received (chunked bodies re-framed, trailers kept).

What llhttp leaves to the caller, and we decide: a response to HEAD ends with its
head; a 2xx to CONNECT and a 101 switch the connection to raw bytes; a response
without Content-Length or chunked framing ends when the upstream closes.

A connection whose first bytes are not an HTTP/1.1 request is spliced to the app
untouched (the bytes read so far included): a filter never breaks a client.

`probe()` tells whether the app's port speaks HTTP/1.1; the agent runs it when
it is given a filtered intercept and reports the answer to the manager, which
fails such an intercept on a port that does not (the connector shows why).

Runs inside the cluster image: Python 3.11, httptools, h11 (the probe; wiretaps'
records) and the stdlib.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any, Awaitable, Callable, Hashable, Protocol

import h11
import httptools

from .relay import take_buffered
from tpnb.common.httpfilter import Filter, check, describe, filter_key, is_filtered  # noqa: F401 - re-exported

log = logging.getLogger("tpnb.agent.http")

CHUNK = 256 * 1024
#: how long the protocol probe waits for the app's answer
PROBE_TIMEOUT = 3.0
#: "http/1.1", or "tcp: <why>" (AgentSession.app_protocol)
HTTP1 = "http/1.1"
#: bytes buffered for a side that is not ready (a slow upstream, requests waiting behind others)
#: before the client's connection stops being read
HIGH_WATER = 1 << 20
#: at most this many pipelined requests wait behind the one being served before reading stops
MAX_QUEUED = 32


# ------------------------------------------------------------------ upstreams

class Upstream(Protocol):
    async def send(self, data: bytes) -> None: ...
    async def recv(self) -> bytes: ...          # b"" at the end
    async def send_eof(self) -> None: ...
    def close(self) -> None: ...


class StreamUpstream:
    """A TCP connection (the app on the pod's loopback)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, host: str, port: int, timeout: float = 10.0) -> StreamUpstream:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> bytes:
        return await self.reader.read(CHUNK)

    async def send_eof(self) -> None:
        if self.writer.can_write_eof():
            with contextlib.suppress(OSError):
                self.writer.write_eof()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class TunnelUpstream:
    """An opened AgentHub tunnel (pb.TunnelFrame stream) to the intercepting laptop."""

    def __init__(self, chan: Any, pb: Any) -> None:
        self.chan, self.pb = chan, pb
        self._ended = False

    async def send(self, data: bytes) -> None:
        await self.chan.send(self.pb.TunnelFrame(data=data))

    async def recv(self) -> bytes:
        while not self._ended:
            frame = await self.chan.recv()
            if frame is None:
                raise ConnectionResetError("the tunnel ended without end-of-stream")
            kind = frame.WhichOneof("kind")
            if kind == "data":
                if frame.data:
                    return bytes(frame.data)
            elif kind == "eof":
                self._ended = True
            elif kind == "error":
                raise ConnectionResetError(frame.error or "the laptop's side failed")
        return b""

    async def send_eof(self) -> None:
        with contextlib.suppress(Exception):
            await self.chan.send(self.pb.TunnelFrame(eof=self.pb.Empty()))

    def close(self) -> None:
        fn = getattr(self.chan, "cancel", None)
        if fn is not None:
            with contextlib.suppress(Exception):
                fn()


# ------------------------------------------------------------------ legs (upstream connections)

class Leg(Protocol):
    """One upstream connection as the router drives it: writes never wait (they are buffered and
    the router is told to stop reading the client when too much is), what the upstream sends
    arrives through `router._up_data/_up_eof/_up_lost`."""

    def attach(self, router: HttpRouter) -> None: ...
    def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...


class TcpLeg(asyncio.Protocol):
    """A TCP connection to the app (the pod's loopback) as an asyncio Protocol: its bytes reach the
    router in the callback that read them."""

    def __init__(self) -> None:
        self.router: HttpRouter | None = None
        self.transport: asyncio.Transport | None = None
        self._early: list[tuple[str, Any]] = []  # what happened before `attach`

    @classmethod
    async def connect(cls, host: str, port: int, timeout: float = 10.0) -> TcpLeg:
        loop = asyncio.get_running_loop()
        _, leg = await asyncio.wait_for(loop.create_connection(cls, host, port), timeout)
        return leg

    def attach(self, router: HttpRouter) -> None:
        self.router = router
        for kind, arg in self._early:
            if kind == "data":
                router._up_data(self, arg)
            elif kind == "eof":
                router._up_eof(self)
            else:
                router._up_lost(self, arg)
        self._early.clear()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.router is not None:
            self.router._up_data(self, data)
        else:
            self._early.append(("data", data))

    def eof_received(self) -> bool:
        if self.router is not None:
            self.router._up_eof(self)
        else:
            self._early.append(("eof", None))
        return True  # half-closed: a switched connection may still send the other way

    def connection_lost(self, exc: Exception | None) -> None:
        if self.router is not None:
            self.router._up_lost(self, exc)
        else:
            self._early.append(("lost", exc))

    def pause_writing(self) -> None:
        if self.router is not None:
            self.router._pause_client(self)

    def resume_writing(self) -> None:
        if self.router is not None:
            self.router._resume_client(self)

    # Leg
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and self.transport.can_write_eof():
            with contextlib.suppress(OSError):
                self.transport.write_eof()

    def pause_reading(self) -> None:
        if self.transport is not None and self.transport.is_reading():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and not self.transport.is_reading():
            self.transport.resume_reading()

    def close(self) -> None:
        self.router = None
        if self.transport is not None:
            self.transport.close()


class _TaskLeg:
    """An `Upstream` with async send/recv (an intercept's tunnel to a laptop) as a Leg: two tasks,
    owned here and cancelled by `close`."""

    def __init__(self, stream: Upstream) -> None:
        self.stream = stream
        self.router: HttpRouter | None = None
        self._out: deque[bytes | None] = deque()  # None: end of stream
        self._queued = 0
        self._wake = asyncio.Event()
        self._reading = asyncio.Event()
        self._reading.set()
        self._tasks: list[asyncio.Task[None]] = []

    def attach(self, router: HttpRouter) -> None:
        self.router = router
        self._tasks = [asyncio.ensure_future(self._send_loop()), asyncio.ensure_future(self._recv_loop())]

    async def _send_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._out:
                    item = self._out.popleft()
                    if item is None:
                        await self.stream.send_eof()
                        continue
                    await self.stream.send(item)
                    self._queued -= len(item)
                    if self._queued <= HIGH_WATER // 2 and self.router is not None:
                        self.router._resume_client(self)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the router decides what a lost upstream means
            if self.router is not None:
                self.router._up_lost(self, exc)

    async def _recv_loop(self) -> None:
        try:
            while True:
                await self._reading.wait()
                data = await self.stream.recv()
                if self.router is None:
                    return
                if not data:
                    self.router._up_eof(self)
                    return
                self.router._up_data(self, data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            if self.router is not None:
                self.router._up_lost(self, exc)

    def write(self, data: bytes) -> None:
        self._out.append(data)
        self._queued += len(data)
        self._wake.set()
        if self._queued > HIGH_WATER and self.router is not None:
            self.router._pause_client(self)

    def write_eof(self) -> None:
        self._out.append(None)
        self._wake.set()

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def close(self) -> None:
        self.router = None
        for t in self._tasks:
            t.cancel()
        self.stream.close()


# ------------------------------------------------------------------ requests

class NotHTTP(Exception):
    """The client's first bytes are not an HTTP/1.1 request (`raw`: all bytes read so far)."""

    def __init__(self, raw: bytes) -> None:
        super().__init__("not HTTP/1.1")
        self.raw = raw


class Request:
    """One request head, as `choose`, the filters and wiretaps see it (the attributes of an
    h11.Request: `headers` with lowercased names)."""

    __slots__ = ("method", "target", "raw_headers", "headers", "http_version", "keep_alive", "upgrade",
                 "chunked", "has_body")

    def __init__(self, method: bytes, target: bytes, raw_headers: list[tuple[bytes, bytes]],
                 http_version: bytes, keep_alive: bool, upgrade: bool) -> None:
        self.method, self.target, self.http_version = method, target, http_version
        self.keep_alive, self.upgrade = keep_alive, upgrade
        self.raw_headers = raw_headers
        self.headers = [(n.lower(), v) for n, v in raw_headers]
        self.chunked = self.has_body = False
        for n, v in self.headers:
            if n == b"transfer-encoding":  # llhttp refuses a request whose last coding is not chunked
                self.chunked = self.has_body = True
            elif n == b"content-length" and v.strip() not in (b"", b"0"):
                self.has_body = True

    def head(self) -> bytes:
        """The head as the upstream gets it: request line and header lines as parsed, CRLF-framed."""
        return b"%s %s HTTP/%s\r\n%s\r\n" % (self.method, self.target, self.http_version,
                                           b"".join([b"%s: %s\r\n" % hv for hv in self.raw_headers]))

    def without_upgrade(self, drop_all: bool) -> None:
        """Decline `Upgrade: h2c` (or, `drop_all`, every upgrade): a server may ignore an upgrade
        (RFC 9110 7.8), and one accepted here would hand every later stream of the connection to
        wherever this first request went."""
        raw = _decline_upgrade(self.raw_headers, None if drop_all else b"h2c")
        if raw is not self.raw_headers:
            self.raw_headers = raw
            self.headers = [(n.lower(), v) for n, v in raw]
            self.upgrade = self.method == b"CONNECT" or any(n == b"upgrade" for n, _ in self.headers)


_UNSET: Any = object()


class _Msg:
    """A request on its way: its head, its body's wire bytes not yet written, where it goes."""

    __slots__ = ("req", "out", "complete", "key", "leg", "ex", "early", "answered")

    def __init__(self) -> None:
        self.req: Request | None = None
        self.out: list[bytes] = []
        self.complete = False
        self.key: Hashable = _UNSET
        self.early: list[bytes] = []  # body bytes parsed before a wiretap's Exchange existed
        self.leg: Leg | None = None
        self.ex: Exchange | None = None
        self.answered = False


class _Requests:
    """httptools callbacks for the client's side: a `_Msg` per request, queued on the router."""

    def __init__(self, router: HttpRouter) -> None:
        self.router = router
        self.cur: _Msg | None = None
        self.url = b""
        self.hdrs: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] | None = None  # a list once a chunked body started
        self.in_message = False
        #: continuing `cont`'s body behind a made-up head (see HttpRouter._resume)
        self.cont: _Msg | None = None
        self.synthetic = False
        self.skipping = False  # llhttp ends an upgrade request at its head, body or not
        self.parser = httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self.in_message = True
        if self.cont is not None:
            self.cur, self.cont, self.synthetic = self.cont, None, True
            return
        self.cur = _Msg()
        self.url = b""
        self.hdrs = []
        self.trailers = None

    def on_url(self, url: bytes) -> None:
        if not self.synthetic:
            self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.synthetic:
            return
        if self.trailers is not None:
            self.trailers.append((name, value.rstrip(b" \t")))
        else:
            self.hdrs.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        m = self.cur
        assert m is not None
        if self.synthetic:
            self.synthetic = False
            self.trailers = [] if m.req is not None and m.req.chunked else None
            return
        p = self.parser
        req = m.req = Request(p.get_method(), self.url, self.hdrs, p.get_http_version().encode("ascii"),
                              p.should_keep_alive(), p.should_upgrade())
        if req.upgrade:
            # h2c always; any upgrade of a request with a body too (llhttp does not read the body of an
            # upgrade request: we read it as a plain one's, see HttpRouter._resume)
            req.without_upgrade(drop_all=req.has_body and req.method != b"CONNECT")
        self.skipping = p.should_upgrade() and req.has_body
        if req.chunked:
            self.trailers = []
        self.router._queued(m)

    def on_body(self, body: bytes) -> None:
        m = self.cur
        assert m is not None and m.req is not None
        m.out.append(b"%x\r\n%s\r\n" % (len(body), body) if m.req.chunked else body)
        if m.ex is not None:
            m.ex.request_data(body)
        elif m.leg is None and self.router.tap is not None:
            m.early.append(body)
        self.router.backlog += len(body)

    def on_message_complete(self) -> None:
        m = self.cur
        assert m is not None and m.req is not None
        if self.skipping:  # the body follows: HttpRouter._resume reads it
            self.skipping = False
            return
        self.in_message = False
        if m.req.chunked:
            m.out.append(b"0\r\n%s\r\n" % b"".join([b"%s: %s\r\n" % hv for hv in self.trailers or ()]))
        self.trailers = None
        m.complete = True


class _Response:
    """httptools callbacks for one response from the upstream serving `m`: where it ends, whether
    the connection switches protocols, whether both connections may be kept."""

    def __init__(self, m: _Msg) -> None:
        assert m.req is not None
        self.m = m
        self.head_only = m.req.method == b"HEAD"
        self.connect = m.req.method == b"CONNECT"
        self.headers_done = False  # the final (non-1xx) head
        self.framed = False        # Content-Length or Transfer-Encoding: else it ends at the upstream's close
        self.keep_alive = False
        self.done = False
        self.switched = False
        self.extra = False         # bytes after the response's end: neither side is reused
        self.error = ""
        self.reason = b""
        self.hdrs: list[tuple[bytes, bytes]] = []
        self.parser = httptools.HttpResponseParser(self)

    def feed(self, data: bytes) -> None:
        if self.done:
            self.extra = True
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self.parser.get_status_code() == 101:
                self.done = self.switched = True
            else:
                self.error = "an unexpected protocol switch"
        except httptools.HttpParserError as exc:
            if not self.done:
                self.error = str(exc) or type(exc).__name__

    def at_eof(self) -> bool:
        """The upstream closed: whether that ends the response (one without framing) properly."""
        if not self.done and self.headers_done and not self.framed:
            self.done, self.keep_alive = True, False
        return self.done

    def on_message_begin(self) -> None:
        if self.done:
            self.extra = True

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        n = name.lower()
        if n == b"content-length" or n == b"transfer-encoding":
            self.framed = True
        if self.m.ex is not None:
            self.hdrs.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        p = self.parser
        status = p.get_status_code()
        ex = self.m.ex
        if ex is not None:
            _tap_response(ex, status, self.reason, self.hdrs, p.get_http_version())
        if status < 200:
            self.reason, self.hdrs, self.framed = b"", [], False  # 1xx: the final head follows
            return
        self.headers_done = True
        self.keep_alive = p.should_keep_alive()
        if self.connect and status < 300:
            self.done = self.switched = True   # a tunnel: the rest is raw bytes
        elif self.head_only:
            self.done = True                   # llhttp does not know the request; its head ends it

    def on_body(self, body: bytes) -> None:
        if self.m.ex is not None and not self.done:
            self.m.ex.response_data(body)

    def on_message_complete(self) -> None:
        if self.headers_done:
            self.done = True


def _tap_response(ex: Exchange, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                  version: str) -> None:
    """A wiretap sees h11's events (cluster/wiretap.py): built only when one is watching."""
    try:
        cls = h11.InformationalResponse if status < 200 else h11.Response
        ex.response(cls(status_code=status, headers=headers, reason=reason, http_version=version))
    except Exception:  # noqa: BLE001 - a copy never breaks the answer
        log.debug("wiretap: response head %d not representable", status)


def _decline_upgrade(headers: list[tuple[bytes, bytes]], token: bytes | None) -> list[tuple[bytes, bytes]]:
    """`headers` without the Upgrade token `token` (None: every token), and without what goes with it
    (HTTP2-Settings; `upgrade` in Connection once no token is left).  The same list when unchanged."""
    def tokens(v: bytes, drop: set[bytes] | None) -> bytes:
        kept = (t for t in (x.strip() for x in v.split(b",")) if t)
        return b", ".join(t for t in kept if drop is not None and t.lower() not in drop)

    ups = [v for n, v in headers if n.lower() == b"upgrade"]
    if not ups or (token is not None and not any(token in v.lower() for v in ups)):
        return headers
    drop = None if token is None else {token}
    rest = [tokens(v, drop) for v in ups]
    gone = {b"http2-settings"} | (set() if any(rest) else {b"upgrade"})
    out = []
    for n, v in headers:
        low = n.lower()
        if low == b"http2-settings" or (low == b"upgrade" and not any(rest)):
            continue
        if low in (b"upgrade", b"connection"):
            v = tokens(v, drop) if low == b"upgrade" else tokens(v, gone)
            if not v:
                continue
        out.append((n, v))
    return out


# ------------------------------------------------------------------ the router

class Exchange(Protocol):
    """Sees one request/response as it passes (a wiretap's copy, cluster/wiretap.py).  Its methods
    must return at once and never raise: the client's answer does not wait for them."""

    def request_data(self, data: bytes) -> None: ...
    def response(self, ev: h11.Response | h11.InformationalResponse) -> None: ...
    def response_data(self, data: bytes) -> None: ...
    def done(self, error: str = "") -> None: ...


Choose = Callable[[Request], Hashable]
#: `connect(key)`: that key's upstream -- a Leg (TcpLeg.connect for the app), an async Upstream
#: (a tunnel), or None when it refused (the client gets a 502)
Connect = Callable[[Hashable], Awaitable["Leg | Upstream | None"]]
#: `tap(key, request)`: an Exchange to show this request and its response, or None
Tap = Callable[[Hashable, Request], "Exchange | None"]

_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_REFUSED_BODY = b"tpnb: the intercepting laptop did not answer\n"
_REFUSED = (b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY))


class HttpRouter(asyncio.Protocol):
    """Serves one client connection: each request goes where `choose` says.

    `choose(request)` returns a key (the app's or an intercept's); `connect(key)` opens that
    upstream.  One upstream connection per key is kept for the client connection's lifetime while
    both ends keep it alive.  Requests are served one at a time, in order (pipelined ones wait).

    The client's connection (accepted as asyncio streams: `reader`, `writer`) is driven as a
    Protocol while `run()` runs; the connection goes back to its streams when it turns out not to
    be HTTP (NotHTTP), so that the caller can splice it to the app.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 choose: Choose, connect: Connect, first: bytes = b"", tap: Tap | None = None) -> None:
        self.reader, self.writer = reader, writer
        self.transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
        self.choose, self.connect, self.tap = choose, connect, tap
        self.first = first
        self.routed: dict[Hashable, int] = {}
        self.legs: dict[Hashable, Leg] = {}
        self.queue: deque[_Msg] = deque()   # parsed, not yet sent anywhere
        self.cur: _Msg | None = None        # sent to its leg, its answer not complete yet
        self.resp: _Response | None = None
        self.req = _Requests(self)
        self.raw: bytearray | None = bytearray()  # the bytes before the first head (for NotHTTP)
        self.held: bytearray | None = None        # client bytes after an upgrade request, until its answer
        self.switched: Leg | None = None          # raw bytes both ways with this leg
        self.backlog = 0                          # body bytes waiting behind the request being served
        self.bad = False                          # a malformed request follows the queued ones
        self.client_eof = self.up_eof = False
        self._connecting: asyncio.Task[None] | None = None
        self._paused: set[Any] = set()            # why the client's connection is not being read
        self._client_full = False                 # the client's send buffer is full
        self._orig: asyncio.BaseProtocol | None = None
        self.done: asyncio.Future[None] | None = None

    # ---------------------------------------------------------- lifetime
    async def run(self) -> None:
        """Until the client (or an upstream's framing) ends the connection.  Raises NotHTTP when the
        very first request does not parse (nothing was sent anywhere then)."""
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        t = self.transport
        self._orig = t.get_protocol()
        pending = self.first + take_buffered(self.reader)
        eof = self.reader.at_eof()
        t.set_protocol(self)
        if not t.is_reading() and not t.is_closing():
            t.resume_reading()
        try:
            if pending:
                self.data_received(pending)
            if eof:
                self.eof_received()
            if t.is_closing():
                self.connection_lost(None)
            await self.done
        finally:
            self._teardown()
            if self._connecting is not None:
                self._connecting.cancel()
                await asyncio.gather(self._connecting, return_exceptions=True)

    def _teardown(self) -> None:
        for leg in self.legs.values():
            leg.close()
        self.legs.clear()
        if self.switched is not None:
            self.switched.close()
        for m in ([self.cur] if self.cur else []) + list(self.queue):
            if m.ex is not None:
                m.ex.done("the connection ended")
                m.ex = None

    def _finish(self, exc: BaseException | None = None) -> None:
        if self.done is None or self.done.done():
            return
        if exc is None:
            self.done.set_result(None)
            return
        for m in [self.cur] if self.cur else []:
            if m.ex is not None:
                m.ex.done(str(exc) or type(exc).__name__)
                m.ex = None
        self.done.set_exception(exc)

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        """Runs a step from a callback: what it raises ends the connection (raised by `run`)."""
        if self.done is None or self.done.done():
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001
            self._finish(exc)

    def _not_http(self) -> None:
        """The first request did not parse: give the connection back to its streams (run raises)."""
        raw = bytes(self.raw or b"")
        if self._orig is not None:
            self.transport.set_protocol(self._orig)  # type: ignore[arg-type]
            if self.client_eof:
                self._orig.eof_received()  # type: ignore[attr-defined]
        if not self.transport.is_reading() and not self.transport.is_closing():
            self.transport.resume_reading()
        self._finish(NotHTTP(raw))

    # ---------------------------------------------------------- the client's side (asyncio.Protocol)
    def data_received(self, data: bytes) -> None:
        if self.switched is not None:
            self.switched.write(data)
        elif self.held is not None:
            self.held += data
            if len(self.held) > HIGH_WATER:
                self._pause_client("held")
        else:
            self._guard(self._feed, data)

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.switched is not None:
            self.switched.write_eof()
            if self.up_eof:
                self._finish()
        else:
            self._guard(self._client_ended)
        return True  # half-closed: the answer still goes out

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is None or self.done.done():
            return
        if self.switched is not None or (self.cur is None and not self.queue and not self.req.in_message):
            self._finish()
        else:
            self._finish(ConnectionResetError("the client's connection was lost"))

    def pause_writing(self) -> None:
        self._client_full = True
        leg = self.switched or (self.cur.leg if self.cur is not None else None)
        if leg is not None:
            leg.pause_reading()

    def resume_writing(self) -> None:
        self._client_full = False
        leg = self.switched or (self.cur.leg if self.cur is not None else None)
        if leg is not None:
            leg.resume_reading()

    def _pause_client(self, why: Any) -> None:
        if not self._paused:
            with contextlib.suppress(Exception):
                self.transport.pause_reading()
        self._paused.add(why)

    def _resume_client(self, why: Any) -> None:
        if why in self._paused:
            self._paused.discard(why)
            if not self._paused and not self.transport.is_closing():
                with contextlib.suppress(Exception):
                    self.transport.resume_reading()

    def _feed(self, data: bytes) -> None:
        if self.raw is not None:
            self.raw += data
        try:
            self.req.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_pause(data[exc.args[0]:])
        except httptools.HttpParserError:
            if self.raw is not None and not self.queue:
                self._not_http()
                return
            self.bad = True  # answered (400) once the requests before it are
            self._pause_client("bad")
        if self.raw is not None and self.queue:
            self.raw = None
        self._advance()

    def _upgrade_pause(self, rest: bytes) -> None:
        """llhttp stopped after an upgrade request (or CONNECT): `rest` is another protocol if the
        upstream switches, else the next request -- held until the answer tells which."""
        m = self.req.cur
        if m is None or m.req is None or m.req.upgrade is False or m.req.has_body:
            self._resume(rest, m)  # declined (h2c, or with a body): plain HTTP goes on
            return
        self.held = bytearray(rest)

    def _resume(self, rest: bytes, m: _Msg | None) -> None:
        """Parse on after an upgrade request that did not switch.  A body llhttp skipped (it does for
        upgrade requests) is read behind a made-up head of the same framing."""
        self.req.parser = httptools.HttpRequestParser(self.req)
        if m is not None and m.req is not None and m.req.has_body and not m.complete:
            self.req.cont = m
            framing = (b"transfer-encoding: chunked" if m.req.chunked
                       else b"content-length: " + next(v for n, v in m.req.headers if n == b"content-length"))
            self.req.parser.feed_data(b"POST / HTTP/1.1\r\n%s\r\n\r\n" % framing)
        self.held = None
        if rest:
            self._feed(rest)

    def _client_ended(self) -> None:
        if self.raw is not None and self.raw:
            self._not_http()  # a first request cut short: the app gets what came, as before
            return
        if self.req.in_message or (self.cur is not None and not self.cur.complete):
            raise ConnectionResetError("the client ended the connection inside a request")
        self._advance()

    def _queued(self, m: _Msg) -> None:
        self.queue.append(m)
        if len(self.queue) > MAX_QUEUED:
            self._pause_client("queue")

    # ---------------------------------------------------------- routing
    def _advance(self) -> None:
        """Moves requests on: the current one's body to its leg; once its answer is complete, the next
        one to where `choose` says."""
        while True:
            m = self.cur
            if m is None:
                if not self.queue:
                    if self.bad:
                        self.transport.write(_BAD_REQUEST)
                        self._finish()
                    elif self.client_eof:
                        self._finish()
                    return
                if not self._dispatch(self.queue[0]):
                    return
                if "queue" in self._paused and len(self.queue) < MAX_QUEUED:
                    self._resume_client("queue")
                m = self.cur
                assert m is not None
            if m.out:
                data = b"".join(m.out) if len(m.out) > 1 else m.out[0]
                m.out.clear()
                self.backlog = 0
                assert m.leg is not None
                m.leg.write(data)
                if "backlog" in self._paused:
                    self._resume_client("backlog")
            if not m.answered:
                if self.backlog > HIGH_WATER:
                    self._pause_client("backlog")
                return
            if not self._next_cycle(m):
                return

    def _dispatch(self, m: _Msg) -> bool:
        req = m.req
        assert req is not None
        if m.key is _UNSET:
            m.key = self.choose(req)
        leg = self.legs.get(m.key)
        if leg is None:
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._connect(m.key))
            return False
        self.queue.popleft()
        self.cur, m.leg = m, leg
        self.routed[m.key] = self.routed.get(m.key, 0) + 1
        if self.tap is not None:
            m.ex = self.tap(m.key, req)
            if m.ex is not None:
                for piece in m.early:
                    m.ex.request_data(piece)
            m.early.clear()
        self.resp = _Response(m)
        head = req.head()
        if m.out:
            head += b"".join(m.out)
            m.out.clear()
            self.backlog = 0
        if self._client_full:
            leg.pause_reading()
        leg.write(head)
        return True

    async def _connect(self, key: Hashable) -> None:
        try:
            got = await self.connect(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._connecting = None
            self._finish(exc)
            return
        self._connecting = None
        if self.done is None or self.done.done():
            if got is not None:
                got.close()
            return
        if got is None:
            self.transport.write(_REFUSED)
            self._finish()
            return
        leg: Leg = got if hasattr(got, "attach") else _TaskLeg(got)  # type: ignore[arg-type, assignment]
        self.legs[key] = leg
        leg.attach(self)
        self._guard(self._advance)

    def _next_cycle(self, m: _Msg) -> bool:
        """The current answer is complete: True when the next request may go."""
        r = self.resp
        assert r is not None and m.leg is not None
        self.cur, self.resp = None, None
        if m.ex is not None:
            m.ex.done()
            m.ex = None
        if r.switched:
            if not (m.req is not None and m.req.upgrade):
                raise ConnectionResetError("the upstream switched protocols unasked")
            self._switch(m.leg)
            return False
        keep = r.keep_alive and not r.extra and m.complete and m.req is not None and m.req.keep_alive
        if not keep:
            self.legs.pop(m.key, None)
            m.leg.close()
            self._finish()
            return False
        if self.held is not None:  # an upgrade that did not happen: parse on
            self._resume(bytes(self.held), None)
            self._resume_client("held")
        return True

    def _switch(self, leg: Leg) -> None:
        """After a 101 (e.g. WebSocket) or a CONNECT's 2xx: raw bytes both ways."""
        for other in [v for v in self.legs.values() if v is not leg]:
            other.close()
        self.legs.clear()
        self.switched = leg
        held, self.held = bytes(self.held or b""), None
        if held:
            leg.write(held)
        self._resume_client("held")
        if self.client_eof:
            leg.write_eof()

    # ---------------------------------------------------------- the upstreams' side (from legs)
    def _up_data(self, leg: Leg, data: bytes) -> None:
        if self.done is None or self.done.done():
            return
        if leg is self.switched:
            self.transport.write(data)
            return
        m, r = self.cur, self.resp
        if m is None or m.leg is not leg or r is None:
            self._drop(leg)  # an idle upstream spoke unasked: that connection is not reused
            return
        self.transport.write(data)  # the answer's bytes, unchanged
        r.feed(data)
        if r.error:
            self._finish(ConnectionResetError(f"the upstream's answer is not HTTP/1.1: {r.error}"))
        elif r.done and not m.answered:
            m.answered = True
            self._guard(self._advance)

    def _up_eof(self, leg: Leg) -> None:
        if self.done is None or self.done.done():
            return
        if leg is self.switched:
            self.up_eof = True
            if self.transport.can_write_eof():
                with contextlib.suppress(OSError):
                    self.transport.write_eof()
            if self.client_eof:
                self._finish()
            return
        m, r = self.cur, self.resp
        if m is None or m.leg is not leg or r is None:
            self._drop(leg)
            return
        if not r.at_eof():
            self._finish(ConnectionResetError("the upstream closed before its response ended"))
            return
        if not m.answered:
            m.answered = True
            self._guard(self._advance)

    def _up_lost(self, leg: Leg, exc: BaseException | None) -> None:
        if self.done is None or self.done.done():
            return
        m = self.cur
        if leg is self.switched:
            self._finish(None if exc is None else ConnectionResetError(str(exc)))
        elif m is not None and m.leg is leg and not m.answered:
            if exc is None:
                self._up_eof(leg)
            else:
                self._finish(exc if isinstance(exc, (ConnectionError, OSError)) else ConnectionResetError(str(exc)))
        else:
            self._drop(leg)

    def _drop(self, leg: Leg) -> None:
        for k, v in list(self.legs.items()):
            if v is leg:
                del self.legs[k]
        leg.close()


def decline_h2c_upgrade(req: h11.Request) -> h11.Request:
    """`req` without `Upgrade: h2c` (see Request.without_upgrade); `req` itself when it has none."""
    headers = list(req.headers)
    out = _decline_upgrade(headers, b"h2c")
    if out is headers:
        return req
    return h11.Request(method=req.method, target=req.target, headers=out, http_version=req.http_version)


async def _next(conn: h11.Connection, recv: Callable[[], Awaitable[bytes]]) -> Any:
    while True:
        ev = conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        conn.receive_data(await recv())


# ------------------------------------------------------------------ the protocol probe

async def probe(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str:
    """"http/1.1" if the app answers an HTTP/1.1 request (any status), else "tcp: <why>".

    Sends `OPTIONS * HTTP/1.1` (no resource of the app is asked for).  Raises
    OSError when nothing listens (the caller retries: the app may still be starting).
    """
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    conn = h11.Connection(h11.CLIENT)
    got = bytearray()
    try:
        writer.write(conn.send(h11.Request(method="OPTIONS", target="*", headers=[
            ("host", f"{host}:{port}"), ("user-agent", "tpnb-traffic-agent (protocol probe)"),
            ("connection", "close")])))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

        async def recv() -> bytes:
            data = await reader.read(4096)
            if len(got) < 64:
                got.extend(data[: 64 - len(got)])
            return data

        try:
            async with asyncio.timeout(timeout):
                while True:
                    ev = await _next(conn, recv)
                    if isinstance(ev, (h11.Response, h11.InformationalResponse)):
                        if isinstance(ev, h11.Response):
                            return HTTP1
                        continue
                    if isinstance(ev, h11.ConnectionClosed):
                        return "tcp: it closed the connection without answering an HTTP/1.1 request"
        except TimeoutError:
            if got:
                return f"tcp: it answered an HTTP/1.1 request with {bytes(got)!r}"
            return f"tcp: it did not answer an HTTP/1.1 request within {timeout:.0f} s"
        except h11.RemoteProtocolError:
            h2 = len(got) >= 9 and got[3] == 0x04  # a SETTINGS frame first: HTTP/2 prior knowledge (gRPC)
            why = " (HTTP/2 without upgrade, as gRPC speaks it: see h2route.probe)" if h2 else ""
            return f"tcp: it answered an HTTP/1.1 request with {bytes(got[:32])!r}{why}"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
