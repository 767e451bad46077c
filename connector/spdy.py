"""Port-forward to a pod over SPDY/3.1, the protocol the kubelet and the CRI
streaming server speak natively.

Why, when `portforward.py` already speaks WebSocket: the API server passes an
SPDY upgrade straight through, and on the far end (the CRI runtime's
streaming server, e.g. containerd) SPDY data frames cost far less than the
WebSocket channel protocol, whose server side unmasks every client byte in
a byte loop and reassembles each message by repeated growth.  Measured on
the dev cluster (2 cores, bulk both ways): containerd spent about twice the
CPU per megabyte on WebSocket than on SPDY, and every hop shares those two
cores.  The daemon's single port-forward carries every connected flow, so
this is its hot path.

Only what port-forwarding needs is implemented, as a client, in two shapes:
`open_stream` / `SpdyStream` (one upgraded connection per forwarded
connection: the connector's single long-lived tunnel to the manager) and
`SpdySession` / `MuxStream` (one upgraded connection per pod, an error + data
stream pair per forwarded connection tied by the ``requestID`` header, as
kubectl does: the direct data plane, connector/direct.py, where new
connections must be cheap).  Common to both:

* frames: 8-byte headers; control frames are ``0x8003 type flags length``,
  data frames ``stream-id flags length``;
* SYN_STREAM header blocks are zlib-compressed in one stream per connection
  and direction, flushed per block.  The server's blocks are never needed,
  so they are skipped, not inflated; ours are compressed without SPDY's preset
  dictionary, which a zlib reader accepts (the stream header says no dict);
* the Go implementation in the kubelet and the runtimes (spdystream) has no
  flow control (WINDOW_UPDATE is ignored), but it drops data for a stream it
  has not replied to yet, so data waits for our data stream's SYN_REPLY;
* the error stream carries the text of a failed dial; the data stream's FIN
  is the end of the pod-side connection.  We half-close by sending FIN.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import urlsplit

from tpnb import config
from tpnb.errors import ClusterError

from .kube import KubeTarget, connect_error, credentials_rejected, rbac_error, status_message

log = logging.getLogger(__name__)

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN = 0x01
PROTOCOL = "portforward.k8s.io"
#: largest data frame we send (spdystream reads each into its own buffer)
FRAME_MAX = 256 * 1024
_HDR = struct.Struct("!IBBH")  # first word, flags, length high byte, length low 16 bits
ERROR_STREAM, DATA_STREAM = 1, 3


def _u24(n: int) -> bytes:
    return bytes(((n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF))


def control_frame(ftype: int, flags: int, payload: bytes) -> bytes:
    return struct.pack("!HHB", 0x8000 | VERSION, ftype, flags) + _u24(len(payload)) + payload


def data_header(stream_id: int, flags: int, length: int) -> bytes:
    return struct.pack("!IB", stream_id & 0x7FFFFFFF, flags) + _u24(length)


def header_block(headers: dict[str, str]) -> bytes:
    out = [struct.pack("!I", len(headers))]
    for k, v in headers.items():
        kb, vb = k.lower().encode(), v.encode()
        out += [struct.pack("!I", len(kb)), kb, struct.pack("!I", len(vb)), vb]
    return b"".join(out)


class SpdyUnsupported(Exception):
    """The server (or a proxy in front of it) does not take an SPDY upgrade."""


def http_error(status: int, reason: str, body: bytes, namespace: str, pod: str, port: int) -> ClusterError:
    """What a refused port-forward upgrade (either protocol) means for the user."""
    where = f"pod {namespace}/{pod} port {port}"
    msg = status_message(body) or reason
    if status == 403:
        from kubernetes.client import ApiException

        # the SPDY upgrade (a POST) is authorized as "create" on pods/portforward, the WebSocket one (a GET)
        # as "get" (1.32); rbac_error takes the verb from the server's own words where it can
        return rbac_error(ApiException(status=403, reason="Forbidden", body=body.decode("utf-8", "replace")),
                          "create", "pods/portforward", namespace)
    if status == 401:
        return credentials_rejected(f"cannot port-forward to {where}", msg)
    if status == 404:
        return ClusterError(f"cannot port-forward to {where}: not found", msg,
                            "the pod is gone (restarted?); look it up again")
    return ClusterError(f"cannot port-forward to {where} (HTTP {status})", msg,
                        f"check the pod's state: `kubectl -n {namespace} describe pod {pod}`")


class _Conn(asyncio.BufferedProtocol):
    """The TLS connection to the API server, decrypted straight into one buffer.

    asyncio's SSL transport hands a `BufferedProtocol` its plaintext with
    ``SSLObject.read(n, buffer)``: no per-record bytes objects, no stream
    buffer to copy through.  During setup the coroutines below read from the
    buffer; for the relay, `sink` is called after every read and consumes
    frames in place (see `SpdyStream.pump_down`).
    """

    #: buffer size; a frame larger than what is free gets a larger buffer
    SIZE = 2 * 1024 * 1024
    #: least free room offered to the transport per read
    ROOM = 256 * 1024

    def __init__(self) -> None:
        self.buf = bytearray(self.SIZE)
        self.mv = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.transport: asyncio.Transport | None = None
        self.eof = False
        #: bytes a partly received frame needs from `start` (0: no special need)
        self.need = 0
        self.sink: Callable[[], None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        #: an in-process protocol run over the data stream (`SpdyStream.attach`): told of write pauses
        self.writer: asyncio.BaseProtocol | None = None

    # ---------------------------------------------------------- protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.start == self.end:
            self.start = self.end = 0
        room = max(self.ROOM, self.need - (self.end - self.start))
        if len(self.buf) - self.end < room:
            self._compact(self.end - self.start + room)
        return self.mv[self.end:]

    def buffer_updated(self, nbytes: int) -> None:
        self.end += nbytes
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._can_write.set()
        self._wake()

    def pause_writing(self) -> None:
        self._can_write.clear()
        if self.writer is not None:
            self.writer.pause_writing()

    def resume_writing(self) -> None:
        self._can_write.set()
        if self.writer is not None:
            self.writer.resume_writing()

    # ---------------------------------------------------------- helpers
    def _compact(self, need: int) -> None:
        """Move the unread bytes to the front; a new, larger buffer when `need` does not fit."""
        rest = bytes(self.mv[self.start:self.end])
        if need > len(self.buf):
            self.buf = bytearray(max(need, 2 * len(self.buf)))
            self.mv = memoryview(self.buf)
        self.buf[: len(rest)] = rest
        self.start, self.end = 0, len(rest)
        self.need = 0

    def _wake(self) -> None:
        if self.sink is not None:
            self.sink()
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    async def _more(self) -> None:
        if self.eof:
            raise asyncio.IncompleteReadError(bytes(self.mv[self.start:self.end]), None)
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    def frames(self) -> Iterator[tuple[int, int, memoryview]]:
        """The complete SPDY frames in the buffer, each consumed as it is yielded: (first word,
        flags, payload in place, valid until the next read).  A partial frame stays, and the next
        read makes room for all of it."""
        mv = self.mv
        while self.end - self.start >= 8:
            pos = self.start
            word, flags, lhi, llo = _HDR.unpack_from(mv, pos)
            length = (lhi << 16) | llo
            if self.end - pos - 8 < length:
                self.need = length + 8
                return
            self.start = pos + 8 + length
            yield word, flags, mv[pos + 8: self.start]

    @property
    def available(self) -> int:
        return self.end - self.start

    async def readexactly(self, n: int) -> bytes:
        while self.available < n:
            self.need = n
            await self._more()
        data = bytes(self.mv[self.start:self.start + n])
        self.start += n
        return data

    async def readuntil(self, sep: bytes, limit: int = 64 * 1024) -> bytes:
        while (i := self.buf.find(sep, self.start, self.end)) < 0:
            if self.available > limit:
                raise asyncio.LimitOverrunError("response head too long", self.available)
            await self._more()
        data = bytes(self.mv[self.start:i + len(sep)])
        self.start = i + len(sep)
        return data

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the connection to the API server closed")
        await self._can_write.wait()

    def get_extra_info(self, name: str) -> object:
        return self.transport.get_extra_info(name) if self.transport is not None else None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def http_upgrade(t: KubeTarget, method: str, path: str, upgrade: list[str], timeout: float,
                       what: str) -> tuple[_Conn, int, str, bytes]:
    """TLS to the API server and an HTTP/1.1 upgrade request for `path`.

    Returns the connection (its buffer holds whatever followed the response head) and the status,
    reason and (for a refusal) body; a non-101 answer has closed the connection.  `what` names
    the attempt in errors ("cannot port-forward to pod ns/p port 80").  Shared by the SPDY
    port-forward and the agent link through pods/proxy (connector/podproxy.py)."""
    u = urlsplit(t.server)
    host = u.hostname or ""
    port = u.port or (443 if t.secure else 80)
    kw: dict[str, object] = {}
    if t.secure:
        kw["ssl"] = t.ssl_context
        kw["server_hostname"] = t.tls_server_name or host
    import anyio

    headers = await anyio.to_thread.run_sync(t.auth_headers)
    conn = _Conn()
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().create_connection(lambda: conn, host, port, **kw)  # type: ignore[arg-type]
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        raise connect_error(exc, t.server, timeout) from None
    sock = conn.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lines = [f"{method} {u.path.rstrip('/')}{path} HTTP/1.1", f"Host: {u.netloc}", "Connection: Upgrade",
             *upgrade, "User-Agent: tpnb", "Content-Length: 0"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    conn.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    body = b""
    try:
        async with asyncio.timeout(timeout):
            head = await conn.readuntil(b"\r\n\r\n")
            status_line, *hdr_lines = head.decode("latin-1").split("\r\n")
            parts = status_line.split(" ", 2)
            status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            reason = parts[2] if len(parts) > 2 else ""
            if status == 101:
                return conn, status, reason, b""
            hdrs = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in hdr_lines if h)}
            n = int(hdrs.get("content-length", "0") or 0)
            if 0 < n <= 1 << 20:
                body = await conn.readexactly(n)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        conn.close()
        raise ClusterError(what, f"the upgrade through the API server failed: {exc!r}",
                           "check that the API server is reachable") from None
    conn.close()
    return conn, status, reason, body


async def _upgrade(t: KubeTarget, path: str, namespace: str, pod: str, port_: int, timeout: float) -> _Conn:
    """The HTTP/1.1 SPDY upgrade; raises ClusterError / SpdyUnsupported."""
    if t.proxy:
        raise SpdyUnsupported("a proxy-url is configured (only the WebSocket path tunnels through proxies)")
    conn, status, reason, body = await http_upgrade(
        t, "POST", path, ["Upgrade: SPDY/3.1", f"X-Stream-Protocol-Version: {PROTOCOL}"], timeout,
        f"cannot port-forward to pod {namespace}/{pod} port {port_}")
    if status == 101:
        return conn
    if status in (400, 405, 426, 501, 505) or status == 0:  # e.g. a WebSocket-only proxy
        raise SpdyUnsupported(f"HTTP {status} {reason}".strip())
    raise http_error(status, reason, body, namespace, pod, port_)


def feed_protocol(protocol: asyncio.BufferedProtocol, view: memoryview, stopped: Callable[[], bool]) -> None:
    """Copy `view` into `protocol`'s buffers as a transport would, until done or `stopped()`."""
    while view and not stopped():
        buf = protocol.get_buffer(len(view))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        view = view[n:]
        protocol.buffer_updated(n)


class SpdyError(Exception):
    """The SPDY connection broke the protocol or ended mid-frame."""


class SpdyStream:
    """One forwarded TCP connection: an error stream and a data stream on their own SPDY connection."""

    def __init__(self, conn: _Conn, port: int) -> None:
        self.conn = conn
        self.port = port
        self._zc = zlib.compressobj()
        self.error = ""
        self.remote_fin = False
        #: the server finished the error stream (after the error text, if any)
        self.error_done = False
        self._sent_fin = False
        #: data-stream bytes the relay took from the server
        self.received = 0

    # ------------------------------------------------------------ frames
    def _syn_stream(self, stream_id: int, kind: str, fin: bool) -> bytes:
        block = header_block({"streamtype": kind, "port": str(self.port), "requestid": "0"})
        packed = self._zc.compress(block) + self._zc.flush(zlib.Z_SYNC_FLUSH)
        payload = struct.pack("!IIBB", stream_id, 0, 0, 0) + packed
        return control_frame(SYN_STREAM, FLAG_FIN if fin else 0, payload)

    async def _read_frame(self) -> tuple[bool, int, int, bytes] | None:
        """(is_control, type or stream id, flags, payload); None at a clean EOF."""
        try:
            head = await self.conn.readexactly(8)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            raise SpdyError("connection ended inside a frame header") from None
        word, flags, lhi, llo = _HDR.unpack(head)
        length = (lhi << 16) | llo
        try:
            payload = await self.conn.readexactly(length) if length else b""
        except asyncio.IncompleteReadError:
            raise SpdyError("connection ended inside a frame") from None
        if word & 0x80000000:
            return True, word & 0xFFFF, flags, payload
        return False, word & 0x7FFFFFFF, flags, payload

    def _control(self, ftype: int, flags: int, payload: bytes) -> bool:
        """Handle a control frame; False when the data stream is over."""
        if ftype == PING:
            self.conn.write(control_frame(PING, 0, payload[:4]))
        elif ftype == RST_STREAM:
            sid = struct.unpack("!I", payload[:4])[0] & 0x7FFFFFFF if len(payload) >= 4 else 0
            if sid == DATA_STREAM:
                self.error = self.error or "the server reset the stream"
                return False
        elif ftype == GOAWAY:
            self.error = self.error or "the server ended the connection (GOAWAY)"
            return False
        elif ftype == SYN_REPLY and flags & FLAG_FIN and len(payload) >= 4:
            if struct.unpack("!I", payload[:4])[0] & 0x7FFFFFFF == DATA_STREAM:
                self.remote_fin = True
                return False
        return True  # SETTINGS, WINDOW_UPDATE, HEADERS, SYN_REPLY: nothing to do

    # ------------------------------------------------------------ setup
    async def open(self, timeout: float) -> list[bytes]:
        """Create both streams; wait for the data stream's SYN_REPLY; returns early data.

        A failed dial shows up as text on the error stream (and the data
        stream ending); it is left in `error`.
        """
        self.conn.write(self._syn_stream(ERROR_STREAM, "error", fin=True))
        self.conn.write(self._syn_stream(DATA_STREAM, "data", fin=False))
        await self.conn.drain()
        early: list[bytes] = []
        async with asyncio.timeout(timeout):
            while True:
                fr = await self._read_frame()
                if fr is None:
                    self.error = self.error or "the server closed the connection"
                    return early
                control, kind, flags, payload = fr
                if control:
                    if kind == SYN_REPLY and len(payload) >= 4 and \
                            struct.unpack("!I", payload[:4])[0] & 0x7FFFFFFF == DATA_STREAM:
                        if flags & FLAG_FIN:
                            self.remote_fin = True
                        return early
                    if not self._control(kind, flags, payload):
                        return early
                elif kind == ERROR_STREAM:
                    self.error += payload.decode("utf-8", "replace")
                elif kind == DATA_STREAM:
                    early.append(payload)

    async def next_event(self) -> bool:
        """Read and handle one frame outside the relay (probing); False when the stream ended."""
        fr = await self._read_frame()
        if fr is None:
            return False
        control, kind, flags, payload = fr
        if control:
            return self._control(kind, flags, payload)
        if kind == ERROR_STREAM:
            self.error += payload.decode("utf-8", "replace")
            if flags & FLAG_FIN:
                self.error_done = True
                return False
        elif kind == DATA_STREAM and flags & FLAG_FIN:
            self.remote_fin = True
        return True

    # ------------------------------------------------------------ relay
    def _take_frames(self) -> tuple[list[memoryview], bool]:
        """Consume every complete frame in the receive buffer: (the data stream's payloads, in
        place, valid until the next read; whether the stream is over).  Control frames are
        handled, error-stream text kept in `error` (it ends the stream)."""
        out: list[memoryview] = []
        for word, flags, payload in self.conn.frames():
            if word & 0x80000000:
                if not self._control(word & 0xFFFF, flags, bytes(payload)):
                    return out, True
                continue
            sid = word & 0x7FFFFFFF
            if sid == DATA_STREAM:
                if payload:
                    out.append(payload)
                if flags & FLAG_FIN:
                    self.remote_fin = True
                    return out, True
            elif sid == ERROR_STREAM and payload:
                self.error += bytes(payload).decode("utf-8", "replace")
                return out, True
        return out, False

    async def pump_down(self, sock: socket.socket, on_data: Callable[[], None] | None = None) -> None:
        """Server -> local socket until the data stream ends; half-closes the socket.

        Runs as callbacks of the connection: after each read every complete
        frame is consumed in place, and the data of all of them goes to the
        socket in one ``sendmsg``.  When the socket is full, reading from the
        API server pauses until it drains (that is the backpressure).
        """
        loop = asyncio.get_running_loop()
        conn = self.conn
        done: asyncio.Future[None] = loop.create_future()
        pending = b""
        ending = False  # the stream is over; finish once `pending` is out

        def end_stream() -> None:
            if self.remote_fin:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
            finish()

        def finish(exc: BaseException | None = None) -> None:
            conn.sink = None
            with contextlib.suppress(Exception):
                loop.remove_writer(sock)
            if not done.done():
                if exc is None:
                    done.set_result(None)
                else:
                    done.set_exception(exc)

        def flush() -> None:
            nonlocal pending
            try:
                n = sock.send(pending)
            except BlockingIOError:
                return
            except OSError as exc:
                finish(exc)
                return
            pending = pending[n:]
            if not pending:
                loop.remove_writer(sock)
                if ending:
                    end_stream()
                    return
                if conn.transport is not None:
                    conn.transport.resume_reading()
                feed()

        def feed() -> None:
            nonlocal pending, ending
            if pending or done.done():
                return
            out, ended = self._take_frames()
            if out:
                total = sum(len(v) for v in out)
                self.received += total
                try:
                    sent = sock.sendmsg(out)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    finish(exc)
                    return
                if on_data is not None:
                    on_data()
                if sent < total:
                    pending = b"".join(out)[sent:]
                    ending = ended
                    if conn.transport is not None:
                        conn.transport.pause_reading()
                    loop.add_writer(sock, flush)
                    return
            if ended:
                end_stream()
            elif conn.eof:
                finish(SpdyError("connection ended inside a frame") if conn.available else None)

        conn.sink = feed
        feed()
        try:
            await done
        finally:
            finish()

    async def read_error(self, wait: float) -> None:
        """Read frames for up to `wait` s until the error stream is finished (its text in `error`)."""
        with contextlib.suppress(TimeoutError, SpdyError, OSError):
            async with asyncio.timeout(wait):
                while not self.error_done and await self.next_event():
                    pass

    async def await_refusal(self, wait: float) -> None:
        """After the data stream ended with nothing on it: read on for the error stream.

        A failed dial ends the data stream, and the runtime may write why only after that (containerd
        1.6 sends the data stream's FIN first), so a relay that stopped at the FIN would lose the reason."""
        if self.remote_fin and not (self.received or self.error or self.error_done):
            await self.read_error(wait)

    async def pump_up(self, sock: socket.socket) -> int:
        """Local socket -> data frames until local EOF, then FIN; returns bytes sent."""
        loop = asyncio.get_running_loop()
        buf = bytearray(FRAME_MAX + 8)
        view = memoryview(buf)
        into = view[8:]
        sent = 0
        while True:
            n = await loop.sock_recv_into(sock, into)
            if n == 0:
                self.send_fin()
                await self.conn.drain()
                return sent
            view[:8] = data_header(DATA_STREAM, 0, n)
            # the SSL transport may keep a reference until it is encrypted: hand it a copy
            self.conn.write(bytes(view[: n + 8]))
            sent += n
            await self.conn.drain()

    def attach(self, protocol: asyncio.BufferedProtocol, early: Iterable[bytes] = ()) -> asyncio.Future[None]:
        """Run `protocol` over the data stream in this process, as if it were a socket's.

        Why: the agent link (connector/agentlink.py) used to sit on one end of a socketpair with
        `pump_down`/`pump_up` on the other; every chunk then cost two more syscalls, two copies and,
        upward, a task wake-up.  Here frames are parsed where the TLS layer decrypted them and the
        payloads copied into the protocol's buffer; what it writes becomes a data frame at once.
        `early`: data that came with the stream's reply.  The future is done when the stream or the
        connection ended (the protocol has had `eof_received` / `connection_lost`)."""
        loop = asyncio.get_running_loop()
        conn = self.conn
        done: asyncio.Future[None] = loop.create_future()
        tr = _StreamTransport(self)

        def deliver(view: memoryview) -> None:
            feed_protocol(protocol, view, lambda: tr.closing)

        def finish(exc: BaseException | None = None) -> None:
            conn.sink = None
            conn.writer = None
            if not done.done():
                tr.closing = True
                conn.close()
                protocol.connection_lost(exc)
                done.set_result(None)

        def feed() -> None:
            if done.done():
                return
            out, ended = self._take_frames()
            for v in out:
                deliver(v)
            if tr.closing:
                finish()
            elif ended:
                if self.remote_fin and protocol.eof_received():
                    return  # the protocol keeps its sending side: the stream lives on until it closes
                finish()
            elif conn.eof:
                finish(SpdyError("connection ended inside a frame") if conn.available else None)

        tr.on_close = finish
        protocol.connection_made(tr)
        for data in early:
            deliver(memoryview(data))
        conn.writer = protocol
        conn.sink = feed
        feed()
        return done

    def send_fin(self) -> None:
        if not self._sent_fin:
            self._sent_fin = True
            self.conn.write(data_header(DATA_STREAM, FLAG_FIN, 0))

    async def aclose(self) -> None:
        self.conn.sink = None
        self.conn.close()


class _StreamTransport(asyncio.Transport):
    """A SpdyStream's data stream as the transport of an in-process protocol (`SpdyStream.attach`)."""

    def __init__(self, stream: SpdyStream) -> None:
        super().__init__()
        self.stream = stream
        self.closing = False
        self.on_close: Callable[[], None] = lambda: None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.write_parts((data,))

    def write_parts(self, parts: tuple[bytes | bytearray | memoryview, ...]) -> None:
        """One data frame for `parts` (a frame header and its payload, say), in one write: a
        separate small write would be a TLS record of its own, which the API server, the kubelet
        and the runtime each read and pass on as a message of its own."""
        if self.closing:
            return
        total = sum(len(p) for p in parts)
        if total:
            self.stream.conn.write(b"".join((data_header(DATA_STREAM, 0, total), *parts)))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if not self.closing:
            self.stream.send_fin()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.stream.send_fin()
            self.closing = True
            asyncio.get_running_loop().call_soon(self.on_close)

    def abort(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.on_close)

    def pause_reading(self) -> None:
        if self.stream.conn.transport is not None:
            self.stream.conn.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.stream.conn.transport is not None:
            self.stream.conn.transport.resume_reading()

    def is_reading(self) -> bool:
        return True

    def get_extra_info(self, name: str, default: object = None) -> object:
        if name == "peername":
            return self.stream.conn.get_extra_info("peername") or default
        return default  # no "socket": there is none of ours


async def open_stream(t: KubeTarget, namespace: str, pod: str, port: int, path: str) -> tuple[SpdyStream, list[bytes]]:
    """Upgrade, create the streams, wait until the data stream is accepted.

    Raises `SpdyUnsupported` when the server will not speak SPDY (callers
    fall back to WebSocket), `ClusterError` for anything the user must fix.
    A failed dial in the pod is *not* raised: it is in `stream.error`.
    """
    where = f"pod {namespace}/{pod} port {port}"
    timeout = config.get().timeouts.api
    st = SpdyStream(await _upgrade(t, path, namespace, pod, port, timeout), port)
    try:
        early = await st.open(timeout)
    except (TimeoutError, SpdyError, OSError) as exc:
        await st.aclose()
        raise ClusterError(f"cannot port-forward to {where}",
                           f"the kubelet did not set up the stream: {exc!r}",
                           "check the node's kubelet and container runtime") from None
    return st, early


# ===================================================================== session
# Many forwarded connections on one upgraded connection, the way kubectl
# port-forward does it: each forwarded connection is a pair of streams (error,
# data) tied together by the `requestID` header.  A new connection then costs
# two SYN_STREAMs and the data stream's SYN_REPLY instead of a TCP + TLS
# handshake and an HTTP upgrade through the API server.
RST_PROTOCOL_ERROR, RST_CANCEL = 1, 5
#: highest stream id a client may use; a session that runs out is drained and replaced
MAX_STREAM_ID = 0x7FFFFFFF
#: undelivered pod -> local bytes (all streams of a session) above which reading pauses, and resumes below
PENDING_HIGH = 4 * 1024 * 1024
PENDING_LOW = 1024 * 1024
#: how long a data stream that ended without any data waits for the error stream's text
REFUSAL_WAIT = 1.0
#: sendmsg takes at most IOV_MAX (1024) buffers
_IOV_MAX = 512
#: first upload buffer of a stream (grows to FRAME_MAX once a read fills it)
UP_FIRST = 16 * 1024
#: a stream nobody attached a socket to within this many seconds after it was set up is reset
#: (a caller that dropped its connection must not keep the session from idling out)
ATTACH_TIMEOUT = 30.0


class SessionClosed(Exception):
    """The session's connection broke, was closed or is draining: no (more) streams on it."""


class StreamRefused(Exception):
    """The pod side refused or failed the forwarded connection; the text is the runtime's reason."""


class StreamReset(Exception):
    """A forwarded connection ended abnormally (RST_STREAM, or its session's connection broke)."""


class MuxStream:
    """One forwarded TCP connection on a `SpdySession`: an error stream and a data stream.

    Pod -> local bytes are written to the attached socket straight from the
    session's receive buffer (one ``sendmsg`` per stream and read); what the
    socket does not take, and anything that arrives before `attach`, is kept
    until it drains.  `down_done` resolves once the pod's FIN reached the
    socket (``shutdown(SHUT_WR)``), or fails with `StreamRefused` /
    `StreamReset`.  Local -> pod bytes go through `pump_up`.
    """

    def __init__(self, session: SpdySession, request_id: int, error_id: int, data_id: int, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.session = session
        self.request_id = request_id
        self.error_id = error_id
        self.data_id = data_id
        self.port = port
        self.error = ""
        self.error_done = False
        self.remote_fin = False
        self.sent_fin = False
        self.finished = False
        self.received = 0
        self.sent = 0
        self.replied: asyncio.Future[None] = loop.create_future()
        self.down_done: asyncio.Future[None] = loop.create_future()
        self.sock: socket.socket | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._writer = False
        self._fin_waiting = False  # the data stream ended with no data: waiting for the error text
        self._refusal_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        #: set whenever something arrives for this stream (see `settled`)
        self._activity: asyncio.Event | None = None
        self._attach_timer: asyncio.TimerHandle | None = loop.call_later(ATTACH_TIMEOUT, self._never_attached)
        # the caller may never await these (e.g. a dial that timed out): no "never retrieved" noise
        self.down_done.add_done_callback(_consume)
        self.replied.add_done_callback(_consume)

    @property
    def label(self) -> str:
        return f"{self.session.label}:{self.port}#{self.request_id}"

    # ------------------------------------------------------ from the session
    def _data(self, views: list[memoryview]) -> None:
        """Data frames of one read (views into the session's buffer: used or copied before returning)."""
        if self.down_done.done():
            return  # reset / failed: drop
        n = sum(len(v) for v in views)
        self.received += n
        self._poke()
        if self.sock is None or self._pending:
            self._keep(views, 0)
            return
        sent = 0
        try:
            for i in range(0, len(views), _IOV_MAX):
                part = views[i:i + _IOV_MAX]
                k = self.sock.sendmsg(part)
                sent += k
                if k < sum(len(v) for v in part):
                    break
        except BlockingIOError:
            pass
        except OSError as exc:
            self._fail(StreamReset(f"local socket: {exc.strerror or exc}"))
            self.session._send_rst(self.data_id, RST_CANCEL)
            return
        if sent < n:
            self._keep(views, sent)

    def _keep(self, views: list[memoryview], skip: int) -> None:
        for v in views:
            if skip >= len(v):
                skip -= len(v)
                continue
            chunk = bytes(v[skip:])
            skip = 0
            self._pending.append(chunk)
            self._pending_bytes += len(chunk)
            self.session._pending_changed(len(chunk))
        if self.sock is not None and self._pending and not self._writer:
            self._writer = True
            asyncio.get_running_loop().add_writer(self.sock, self._flush)

    def _flush(self) -> None:
        sock = self.sock
        if sock is None:
            return
        while self._pending:
            try:
                k = sock.sendmsg(self._pending[:_IOV_MAX])
            except BlockingIOError:
                return
            except OSError as exc:
                self._drop_pending()
                self._fail(StreamReset(f"local socket: {exc.strerror or exc}"))
                self.session._send_rst(self.data_id, RST_CANCEL)
                return
            freed = 0
            while k and self._pending:
                head = self._pending[0]
                if k >= len(head):
                    k -= len(head)
                    freed += len(head)
                    self._pending.pop(0)
                else:
                    self._pending[0] = head[k:]
                    freed += k
                    k = 0
            self._pending_bytes -= freed
            self.session._pending_changed(-freed)
        self._stop_writer()
        if self.remote_fin and not self._fin_waiting:
            self._deliver_fin()

    def _stop_writer(self) -> None:
        if self._writer and self.sock is not None:
            self._writer = False
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_writer(self.sock)

    def _drop_pending(self) -> None:
        if self._pending_bytes:
            self.session._pending_changed(-self._pending_bytes)
        self._pending.clear()
        self._pending_bytes = 0
        self._stop_writer()

    def _fin(self) -> None:
        """The data stream's FIN: the pod side is done sending."""
        if self.remote_fin:
            return
        self.remote_fin = True
        if self.received == 0 and not self.error_done and not self.error:
            # a failed dial ends the data stream too; its reason may still be on its way
            self._fin_waiting = True
            self._refusal_timer = asyncio.get_running_loop().call_later(REFUSAL_WAIT, self._refusal_settled)
            return
        self._after_fin()

    def _refusal_settled(self) -> None:
        self._refusal_timer = None
        if self._fin_waiting:
            self._fin_waiting = False
            self._after_fin()

    def _after_fin(self) -> None:
        self._poke()
        if self.error.strip() and self.received == 0:
            self._fail(StreamRefused(self.error.strip()))
            return
        if self.sock is not None and not self._pending:
            self._deliver_fin()
        self.session._maybe_finished(self)

    def _deliver_fin(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
        if not self.down_done.done():
            self.down_done.set_result(None)
        self.session._maybe_finished(self)

    def _error_text(self, text: str, fin: bool) -> None:
        self.error += text
        if fin:
            self.error_done = True
        if self._fin_waiting and (self.error or self.error_done):
            self._fin_waiting = False
            if self._refusal_timer is not None:
                self._refusal_timer.cancel()
                self._refusal_timer = None
            self._after_fin()
        elif text.strip() and not self.remote_fin and self.received == 0:
            # the reason came first: the data stream's FIN follows
            self._fail(StreamRefused(self.error.strip()))
        elif text.strip() and not self.down_done.done():
            self._fail(StreamReset(f"the pod side reported: {self.error.strip()}"))
        self.session._maybe_finished(self)

    def _never_attached(self) -> None:
        self._attach_timer = None
        if self.sock is None and not self.finished:
            log.debug("direct stream %s: no socket attached within %.0fs; reset", self.label, ATTACH_TIMEOUT)
            self.reset("never used")

    def _poke(self) -> None:
        if self._activity is not None:
            self._activity.set()

    def _fail(self, exc: Exception) -> None:
        """The stream is over abnormally (reset, refused, broken session)."""
        self._poke()
        if not self.replied.done():
            self.replied.set_exception(exc)
        if not self.down_done.done():
            self.down_done.set_exception(exc)
        self._drop_pending()
        self.finished = True
        self.session._forget(self)

    # ------------------------------------------------------ for the relay
    async def settled(self, timeout: float) -> None:
        """Wait up to `timeout` for a sign of how the runtime's dial went.

        A successful dial is silent; a refused one shows as the error text
        about a millisecond after the data stream's reply (containerd, dev
        cluster).  Returns early once the pod sent data or ended its side;
        raises `StreamRefused` / `StreamReset` when it failed.  Returning
        after `timeout` means "no refusal so far".
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            if self.down_done.done():
                exc = self.down_done.exception()
                if exc is not None:
                    raise exc
                return
            if self.received or (self.remote_fin and not self._fin_waiting):
                return
            left = end - loop.time()
            if left <= 0:
                return
            self._activity = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._activity.wait(), left)
            self._activity = None

    def attach(self, sock: socket.socket) -> None:
        """Start delivering pod bytes to `sock` (non-blocking): what came early first."""
        self.sock = sock
        if self._attach_timer is not None:
            self._attach_timer.cancel()
            self._attach_timer = None
        if self._pending:
            self._writer = True
            asyncio.get_running_loop().add_writer(sock, self._flush)
            self._flush()
        elif self.remote_fin and not self._fin_waiting and not self.down_done.done():
            self._deliver_fin()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send bytes to the pod as data frames (at most FRAME_MAX each)."""
        mv = memoryview(data)
        for i in range(0, len(mv), FRAME_MAX):
            part = mv[i:i + FRAME_MAX]
            self.session.write(data_header(self.data_id, 0, len(part)) + bytes(part))
            self.sent += len(part)

    async def pump_up(self, sock: socket.socket) -> None:
        """Local socket -> data frames until the local EOF, then FIN.

        Reads run as a reader callback of the loop, like the down side: a
        small request costs no task wake-up.  While the API server connection
        takes no more (its transport paused writing), the socket is not read:
        that is the backpressure.
        """
        loop = asyncio.get_running_loop()
        session = self.session
        conn = session.conn
        done: asyncio.Future[None] = loop.create_future()
        # small at first (most connections are requests); a read that fills it makes it FRAME_MAX
        view = memoryview(bytearray(UP_FIRST + 8))
        reading = False
        waiter: asyncio.Task[None] | None = None

        def start_reading() -> None:
            nonlocal reading
            if not reading and not done.done():
                loop.add_reader(sock, on_readable)
                reading = True

        def stop_reading() -> None:
            nonlocal reading
            if reading:
                reading = False
                with contextlib.suppress(Exception):
                    loop.remove_reader(sock)

        def finish(exc: BaseException | None = None) -> None:
            stop_reading()
            if not done.done():
                if exc is None:
                    done.set_result(None)
                else:
                    done.set_exception(exc)

        async def resume() -> None:
            await conn._can_write.wait()
            start_reading()

        def on_readable() -> None:
            nonlocal view, waiter
            if done.done():
                return
            if self.finished and self.down_done.done() and self.down_done.exception() is not None:
                finish(StreamReset("the stream was reset"))
                return
            try:
                n = sock.recv_into(view[8:])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                finish(exc)
                return
            try:
                if n == 0:
                    self.send_fin()
                    finish()
                    return
                if n == len(view) - 8 and n < FRAME_MAX:
                    grown = memoryview(bytearray(FRAME_MAX + 8))
                    grown[8:8 + n] = view[8:8 + n]
                    view = grown
                view[:8] = data_header(self.data_id, 0, n)
                # the SSL transport may keep a reference until it is encrypted: hand it a copy
                session.write(bytes(view[: n + 8]))
            except SessionClosed as exc:
                finish(exc)
                return
            self.sent += n
            if not conn._can_write.is_set():
                stop_reading()
                waiter = loop.create_task(resume())

        start_reading()
        try:
            await done
        finally:
            stop_reading()
            if waiter is not None:
                waiter.cancel()
        await session.drain()

    def send_fin(self) -> None:
        if not self.sent_fin and not self.finished:
            self.sent_fin = True
            self.session.write(data_header(self.data_id, FLAG_FIN, 0))
            self.session._maybe_finished(self)

    def reset(self, why: str = "closed locally") -> None:
        """Abort: RST_STREAM to the pod side, drop what is pending."""
        if self.finished:
            return
        self.session._send_rst(self.data_id, RST_CANCEL)
        self._fail(StreamReset(why))


def _consume(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


class SpdySession:
    """One upgraded SPDY connection to a pod's ``portforward`` subresource, many streams on it.

    The connection's reader (`_Conn.sink`, called after every read) parses
    every complete frame in place and dispatches it by stream id.  Header
    blocks are compressed with one zlib stream per connection, as SPDY
    requires.  The Go side (spdystream) has no flow control, so a stream
    whose local socket stalls keeps its bytes pending; when all pending bytes
    of the session pass `PENDING_HIGH`, reading pauses for every stream until
    they drain below `PENDING_LOW` (bounded memory; a stalled reader briefly
    holds up its neighbours, as it would on kubectl's single connection).

    A broken connection fails every open stream; `on_close` tells the owner,
    who then opens a new session for the next dial.  With no streams for
    `idle_timeout` seconds the session closes itself.
    """

    def __init__(self, conn: _Conn, label: str, idle_timeout: float = 30.0,
                 on_close: Callable[[SpdySession], None] | None = None) -> None:
        self.conn = conn
        self.label = label
        self.idle_timeout = idle_timeout
        self.on_close = on_close
        self.streams: dict[int, MuxStream] = {}
        self.closed = False
        self.draining = False
        self.reason = ""
        self.next_id = 1
        self.next_request = 0
        self.opened = 0
        self._zc = zlib.compressobj()
        self._pending = 0
        self._paused = False
        self._idle: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        sock = conn.get_extra_info("socket")
        if sock is not None:
            # a connection that died silently (laptop asleep, network changed) under a long-lived
            # forwarded connection is noticed within about a minute, not after hours
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        conn.sink = self._feed
        self._arm_idle()
        if conn.available or conn.eof:
            self._feed()

    # ------------------------------------------------------------ open
    @classmethod
    async def connect(cls, t: KubeTarget, namespace: str, pod: str, timeout: float, path: str,
                      idle_timeout: float = 30.0, on_close: Callable[[SpdySession], None] | None = None,
                      port: int = 0) -> SpdySession:
        """Upgrade a new connection; raises ClusterError / SpdyUnsupported like `open_stream`
        (`port`: the first stream's, for messages only)."""
        conn = await _upgrade(t, path, namespace, pod, port, timeout)
        return cls(conn, f"{namespace}/{pod}", idle_timeout, on_close)

    @property
    def usable(self) -> bool:
        return not self.closed and not self.draining

    async def open_pair(self, port: int, timeout: float) -> MuxStream:
        """A new forwarded connection to `port`: both SYN_STREAMs, then wait for the data stream's reply.

        Raises SessionClosed (open a new session), StreamRefused / StreamReset
        (the pod side refused before the reply), TimeoutError.
        """
        if not self.usable:
            raise SessionClosed(self.reason or "the session is draining")
        if self.next_id + 4 > MAX_STREAM_ID:
            self.draining = True
            raise SessionClosed("stream ids used up")
        rid = self.next_request
        self.next_request += 1
        eid = self.next_id
        did = eid + 2
        self.next_id += 4
        st = MuxStream(self, rid, eid, did, port)
        self.streams[eid] = st
        self.streams[did] = st
        self.opened += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self.conn.write(self._syn_stream(eid, "error", port, rid, fin=True)
                        + self._syn_stream(did, "data", port, rid, fin=False))
        try:
            async with asyncio.timeout(timeout):
                await self.conn.drain()
                await asyncio.shield(st.replied)
        except BaseException:
            if not st.finished:
                st.reset("dial abandoned")
            raise
        return st

    def _syn_stream(self, stream_id: int, kind: str, port: int, request_id: int, fin: bool) -> bytes:
        block = header_block({"streamtype": kind, "port": str(port), "requestid": str(request_id)})
        packed = self._zc.compress(block) + self._zc.flush(zlib.Z_SYNC_FLUSH)
        payload = struct.pack("!IIBB", stream_id, 0, 0, 0) + packed
        return control_frame(SYN_STREAM, FLAG_FIN if fin else 0, payload)

    # ------------------------------------------------------------ writing
    def write(self, data: bytes) -> None:
        if self.closed:
            raise SessionClosed(self.reason)
        self.conn.write(data)

    async def drain(self) -> None:
        try:
            await self.conn.drain()
        except ConnectionResetError as exc:
            raise SessionClosed(str(exc)) from None
        if self.closed:
            raise SessionClosed(self.reason)

    def _send_rst(self, stream_id: int, status: int) -> None:
        if not self.closed:
            self.conn.write(control_frame(RST_STREAM, 0, struct.pack("!II", stream_id, status)))

    # ------------------------------------------------------------ reading
    def _feed(self) -> None:
        conn = self.conn
        batches: dict[MuxStream, list[memoryview]] = {}
        fins: list[MuxStream] = []
        bad = ""
        for word, flags, payload in conn.frames():
            length = len(payload)
            if word & 0x80000000:
                if (word >> 16) & 0x7FFF != VERSION:
                    bad = f"SPDY version {(word >> 16) & 0x7FFF} frame"
                    break
                # control frames are rare and small: deliver data read before them first
                self._deliver(batches, fins)
                self._control(word & 0xFFFF, flags, bytes(payload))
                continue
            sid = word & 0x7FFFFFFF
            st = self.streams.get(sid)
            if st is None:
                continue  # a late frame of a finished stream
            if sid == st.data_id:
                if length:
                    batches.setdefault(st, []).append(payload)
                if flags & FLAG_FIN:
                    fins.append(st)
            else:
                if length or flags & FLAG_FIN:
                    self._deliver(batches, fins)
                    st._error_text(bytes(payload).decode("utf-8", "replace"), bool(flags & FLAG_FIN))
        self._deliver(batches, fins)
        if bad:
            self.close(f"protocol error: {bad}")
        elif conn.eof:
            self.close("the API server closed the connection" if not conn.available
                       else "the connection ended inside a frame")

    def _deliver(self, batches: dict[MuxStream, list[memoryview]], fins: list[MuxStream]) -> None:
        for st, views in batches.items():
            st._data(views)
        batches.clear()
        for st in fins:
            st._fin()
        fins.clear()

    def _control(self, ftype: int, flags: int, payload: bytes) -> None:
        sid = struct.unpack_from("!I", payload)[0] & 0x7FFFFFFF if len(payload) >= 4 else 0
        if ftype == SYN_REPLY:
            st = self.streams.get(sid)
            if st is not None and sid == st.data_id:
                if not st.replied.done():
                    st.replied.set_result(None)
                if flags & FLAG_FIN:
                    st._fin()
        elif ftype == RST_STREAM:
            st = self.streams.get(sid)
            if st is not None:
                code = struct.unpack_from("!I", payload, 4)[0] if len(payload) >= 8 else 0
                st._fail(StreamReset(f"the pod side reset the stream (status {code})"))
        elif ftype == PING:
            if not self.closed:
                self.conn.write(control_frame(PING, 0, payload[:4]))
        elif ftype == GOAWAY:
            self.draining = True
            self.reason = "the server ended the session (GOAWAY)"
            if not self.streams:
                self.close(self.reason)
        elif ftype == SYN_STREAM:
            # the server never opens streams in port-forwarding; refuse it
            self._send_rst(sid, RST_PROTOCOL_ERROR)
        # SETTINGS, WINDOW_UPDATE, HEADERS: nothing to do (no flow control on the Go side)

    def _pending_changed(self, delta: int) -> None:
        self._pending += delta
        tr = self.conn.transport
        if tr is None or self.closed:
            return
        if not self._paused and self._pending > PENDING_HIGH:
            self._paused = True
            tr.pause_reading()
        elif self._paused and self._pending < PENDING_LOW:
            self._paused = False
            tr.resume_reading()

    # ------------------------------------------------------------ lifecycle
    def _maybe_finished(self, st: MuxStream) -> None:
        """Forget a stream once both directions ended and its error stream is done.

        The error stream's FIN normally comes right after the data stream's;
        it is not waited for longer than `REFUSAL_WAIT`."""
        if st.finished or not (st.sent_fin and st.down_done.done()):
            return
        if st.error_done:
            self._forget(st)
        elif st._linger_timer is None:
            st._linger_timer = self._loop.call_later(REFUSAL_WAIT, self._finish_now, st)

    def _finish_now(self, st: MuxStream) -> None:
        if not st.finished:
            st.finished = True
            self._forget(st)

    def _forget(self, st: MuxStream) -> None:
        if st._attach_timer is not None:
            st._attach_timer.cancel()
            st._attach_timer = None
        if st._linger_timer is not None:
            st._linger_timer.cancel()
            st._linger_timer = None
        if st._refusal_timer is not None:
            st._refusal_timer.cancel()
            st._refusal_timer = None
        st.finished = True
        self.streams.pop(st.error_id, None)
        self.streams.pop(st.data_id, None)
        if not self.streams:
            if self.draining:
                self.close(self.reason or "drained")
            else:
                self._arm_idle()

    def _arm_idle(self) -> None:
        if self._idle is None and not self.closed and self.idle_timeout > 0:
            self._idle = self._loop.call_later(self.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        self._idle = None
        if not self.streams:
            self.close("idle")

    def close(self, reason: str = "closed") -> None:
        """Close the connection; every open stream fails with `StreamReset`."""
        if self.closed:
            return
        self.closed = True
        self.reason = self.reason if self.draining and self.reason else reason
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        for st in list(dict.fromkeys(self.streams.values())):
            st._fail(StreamReset(f"the port-forward session ended: {reason}"))
        self.streams.clear()
        self.conn.sink = None
        self.conn.close()
        if self.on_close is not None:
            cb, self.on_close = self.on_close, None
            cb(self)
