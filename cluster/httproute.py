"""Personal intercepts: the traffic-agent's per-request HTTP routing.

An intercept with filters (`--http-header K=V`, `--http-path-prefix|equal|regex`)
takes only the requests that match them; every other request goes on to the app
unchanged, on the same client connection when keep-alive mixes them.  HTTP/1.1
is parsed with h11 on both sides (the client's connection as a server, each
upstream -- the app, or one tunnel per intercept -- as a client), so framing
(Content-Length, chunked, HEAD, Expect: 100-continue, Connection: close,
protocol upgrades) is h11's, not ours.

A connection whose first bytes are not an HTTP/1.1 request is spliced to the app
untouched (the bytes read so far included): a filter never breaks a client.

`probe()` tells whether the app's port speaks HTTP/1.1; the agent runs it when
it is given a filtered intercept and reports the answer to the manager, which
fails such an intercept on a port that does not (the connector shows why).

Runs inside the cluster image: Python 3.11, h11 and the stdlib.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Hashable, Protocol

import h11

from tpnb.common.httpfilter import Filter, check, describe, filter_key, is_filtered  # noqa: F401 - re-exported

log = logging.getLogger("tpnb.agent.http")

CHUNK = 256 * 1024
#: how long the protocol probe waits for the app's answer
PROBE_TIMEOUT = 3.0
#: "http/1.1", or "tcp: <why>" (AgentSession.app_protocol)
HTTP1 = "http/1.1"


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


# ------------------------------------------------------------------ the router

class NotHTTP(Exception):
    """The client's first bytes are not an HTTP/1.1 request (`raw`: all bytes read so far)."""

    def __init__(self, raw: bytes) -> None:
        super().__init__("not HTTP/1.1")
        self.raw = raw


Choose = Callable[[h11.Request], Hashable]
Connect = Callable[[Hashable], Awaitable[Upstream | None]]


class Exchange(Protocol):
    """Sees one request/response as it passes (a wiretap's copy, cluster/wiretap.py).  Its methods
    must return at once and never raise: the client's answer does not wait for them."""

    def request_data(self, data: bytes) -> None: ...
    def response(self, ev: h11.Response | h11.InformationalResponse) -> None: ...
    def response_data(self, data: bytes) -> None: ...
    def done(self, error: str = "") -> None: ...


#: `tap(key, request)`: an Exchange to show this request and its response, or None
Tap = Callable[[Hashable, h11.Request], "Exchange | None"]


async def _next(conn: h11.Connection, recv: Callable[[], Awaitable[bytes]],
                record: bytearray | None = None) -> Any:
    while True:
        ev = conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        data = await recv()
        if record is not None:
            record += data
        conn.receive_data(data)


@dataclass
class _Up:
    stream: Upstream
    conn: h11.Connection


class HttpRouter:
    """Serves one client connection: each request goes where `choose` says.

    `choose(request)` returns a key (the app's or an intercept's); `connect(key)`
    opens that upstream (None: it refused, and the client gets a 502).  One
    upstream connection per key is kept for the client connection's lifetime
    while both ends keep it alive.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 choose: Choose, connect: Connect, first: bytes = b"", tap: Tap | None = None) -> None:
        self.reader, self.writer = reader, writer
        self.choose, self.connect = choose, connect
        self.tap = tap
        self.down = h11.Connection(h11.SERVER)
        self.first = first
        if first:
            self.down.receive_data(first)
        self.ups: dict[Hashable, _Up] = {}
        self.routed: dict[Hashable, int] = {}

    async def _recv_down(self) -> bytes:
        return await self.reader.read(CHUNK)

    async def _write_down(self, ev: Any) -> None:
        data = self.down.send(ev)
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def run(self) -> None:
        """Until the client (or an upstream's framing) ends the connection.  Raises NotHTTP
        when the very first request does not parse (nothing was sent anywhere then)."""
        raw = bytearray(self.first)
        first = True
        try:
            while True:
                try:
                    ev = await _next(self.down, self._recv_down, raw if first else None)
                except h11.RemoteProtocolError:
                    if first:
                        raise NotHTTP(bytes(raw)) from None
                    with contextlib.suppress(Exception):
                        await self._write_down(h11.Response(status_code=400, headers=[
                            ("content-length", "0"), ("connection", "close")]))
                    return
                if isinstance(ev, h11.ConnectionClosed) or ev is h11.PAUSED:
                    return
                if not isinstance(ev, h11.Request):
                    return
                first = False
                raw = bytearray()
                if not await self._cycle(ev):
                    return
        finally:
            for up in self.ups.values():
                up.stream.close()
            self.ups.clear()

    async def _cycle(self, req: h11.Request) -> bool:
        """One request/response; False when the client connection must end."""
        req = decline_h2c_upgrade(req)
        key = self.choose(req)
        up = self.ups.get(key)
        if up is None:
            stream = await self.connect(key)
            if stream is None:
                msg = b"tpnb: the intercepting laptop did not answer\n"
                await self._write_down(h11.Response(status_code=502, headers=[
                    ("content-type", "text/plain"), ("connection", "close"), ("content-length", str(len(msg)))]))
                await self._write_down(h11.Data(data=msg))
                await self._write_down(h11.EndOfMessage())
                return False
            up = self.ups[key] = _Up(stream, h11.Connection(h11.CLIENT))
        self.routed[key] = self.routed.get(key, 0) + 1
        ex = self.tap(key, req) if self.tap is not None else None
        try:
            return await self._exchange(key, up, req, ex)
        except BaseException as exc:
            if ex is not None:
                ex.done(str(exc) or type(exc).__name__)
            raise

    async def _exchange(self, key: Hashable, up: _Up, req: h11.Request, ex: Exchange | None) -> bool:
        head = up.conn.send(req)
        # A request without a body (most GETs) already has its end parsed: one write of head + end to
        # the upstream and the response relayed on this task -- no body task, no gather, per request.
        pending = self.down.next_event()
        if isinstance(pending, h11.EndOfMessage):
            head += up.conn.send(pending) or b""
            pending = None
            bodyless = True
        else:
            bodyless = False
            if pending is h11.NEED_DATA:
                pending = None
        await up.stream.send(head)

        async def body() -> None:
            ev = pending
            while True:
                if ev is None:
                    ev = await _next(self.down, self._recv_down)
                if isinstance(ev, (h11.Data, h11.EndOfMessage)):
                    if ex is not None and isinstance(ev, h11.Data):
                        ex.request_data(ev.data)
                    data = up.conn.send(ev)
                    if data:
                        await up.stream.send(data)
                    if isinstance(ev, h11.EndOfMessage):
                        return
                    ev = None
                else:  # the client vanished mid-body
                    raise ConnectionResetError("the client ended the connection inside a request")

        out = bytearray()

        async def flush() -> None:
            if out:
                self.writer.write(bytes(out))
                out.clear()
                await self.writer.drain()

        async def recv_up() -> bytes:
            await flush()  # what this read's events produced goes out before we wait for more
            return await up.stream.recv()

        async def response() -> bool:
            """True when the protocol switched (101 / CONNECT)."""
            while True:
                ev = await _next(up.conn, recv_up)
                if isinstance(ev, h11.ConnectionClosed):
                    raise ConnectionResetError("the upstream closed before its response ended")
                if ev is h11.PAUSED:
                    await flush()
                    return True
                if ex is not None:
                    if isinstance(ev, (h11.Response, h11.InformationalResponse)):
                        ex.response(ev)
                    elif isinstance(ev, h11.Data):
                        ex.response_data(ev.data)
                out.extend(self.down.send(ev) or b"")
                if isinstance(ev, h11.InformationalResponse):
                    await flush()  # 100-continue must reach the client before it sends its body
                    if ev.status_code == 101:
                        return True
                if isinstance(ev, h11.EndOfMessage):
                    await flush()
                    return False

        if bodyless:
            try:
                switched = await response()
            except BaseException:
                up.stream.close()
                self.ups.pop(key, None)
                raise
        else:
            tb, tr = asyncio.ensure_future(body()), asyncio.ensure_future(response())
            try:
                await asyncio.gather(tb, tr)
            except BaseException:
                tb.cancel()
                tr.cancel()
                await asyncio.gather(tb, tr, return_exceptions=True)
                up.stream.close()
                self.ups.pop(key, None)
                raise
            switched = tr.result()
        if ex is not None:
            ex.done()
        if switched:
            await self._switched(up)
            return False
        if up.conn.our_state is h11.DONE and up.conn.their_state is h11.DONE:
            up.conn.start_next_cycle()
        else:
            up.stream.close()
            self.ups.pop(key, None)
        if self.down.our_state is h11.DONE and self.down.their_state is h11.DONE:
            self.down.start_next_cycle()
            return True
        return False

    async def _switched(self, up: _Up) -> None:
        """After a 101 (e.g. WebSocket) or a CONNECT: raw bytes both ways."""
        down_rest, _ = self.down.trailing_data
        up_rest, _ = up.conn.trailing_data
        if up_rest:
            self.writer.write(up_rest)
        if down_rest:
            await up.stream.send(down_rest)

        async def c2u() -> None:
            while data := await self.reader.read(CHUNK):
                await up.stream.send(data)
            await up.stream.send_eof()

        async def u2c() -> None:
            while data := await up.stream.recv():
                self.writer.write(data)
                await self.writer.drain()
            if self.writer.can_write_eof():
                with contextlib.suppress(OSError):
                    self.writer.write_eof()

        await asyncio.gather(c2u(), u2c())


def decline_h2c_upgrade(req: h11.Request) -> h11.Request:
    """Without `Upgrade: h2c`: a server may ignore an upgrade (RFC 9110 7.8), and one accepted here
    would hand every later stream of the connection to wherever this first request went."""
    if not any(n == b"upgrade" and b"h2c" in v.lower() for n, v in req.headers):
        return req

    def tokens(v: bytes, drop: set[bytes]) -> bytes:
        return b", ".join(t for t in (x.strip() for x in v.split(b",")) if t and t.lower() not in drop)

    rest = [tokens(v, {b"h2c"}) for n, v in req.headers if n == b"upgrade"]
    gone = {b"http2-settings"} | (set() if any(rest) else {b"upgrade"})
    headers = []
    for n, v in req.headers:
        if n == b"http2-settings" or (n == b"upgrade" and not any(rest)):
            continue
        if n in (b"upgrade", b"connection"):
            v = tokens(v, {b"h2c"} if n == b"upgrade" else gone)
            if not v:
                continue
        headers.append((n, v))
    return h11.Request(method=req.method, target=req.target, headers=headers, http_version=req.http_version)


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
