"""Byte pumps between asyncio streams and gRPC Tunnel frames.

Shared by the traffic-agent (intercepted connections -> manager) and the
traffic-manager (its outbound dials), so they know nothing about either: a
tunnel is anything with `recv()`/`send()` (`FrameChannel`), and the adapters
below wrap both a grpc.aio stream-stream call (client side) and a grpc.aio
servicer context (server side, the handler using `context.read()/write()`).

Semantics (see `TunnelFrame` in tpnb.proto):
  * `data` frames carry at most `CHUNK` bytes (`CLIENT_CHUNK` from the
    daemon's side), so one frame never comes near
    gRPC's 4 MiB message limit and memory stays bounded per connection;
  * `eof` is a TCP half-close: the receiving side calls `write_eof()` and
    keeps reading the other direction (HTTP/1.0 clients, `nc -N`, ... rely
    on it);
  * `error`, or the channel ending without an `eof`, tears the connection
    down (the local socket is aborted so the peer sees a reset, not a clean
    end of a truncated response).
Backpressure is end to end: a pump awaits `writer.drain()` before reading the
next frame and awaits `send()` (gRPC flow control) before reading more bytes.

Runs inside the cluster image: Python 3.11, grpcio, protobuf and stdlib only.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from tpnb.proto import pb

log = logging.getLogger("tpnb.forward")

#: largest payload of one `data` frame, and the read size on sockets
CHUNK = 256 * 1024
#: read size of the daemon for connections it sends into the tunnel.  Measured
#: on the dev cluster: 1 MiB frames cut the CPU of both daemon and manager per
#: byte sent into the cluster; the manager sending 1 MiB frames the other way
#: cost it more, so the cluster side keeps `CHUNK`.
CLIENT_CHUNK = 1024 * 1024

#: gRPC channel/server options for connections that carry tunnels: fewer,
#: larger socket reads and HTTP/2 frames than the defaults (8 KiB reads,
#: 16 KiB frames), which matters when one connection carries bulk flows
BULK_GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.experimental.tcp_read_chunk_size", 1024 * 1024),
    ("grpc.experimental.tcp_min_read_chunk_size", 256 * 1024),
    ("grpc.experimental.tcp_max_read_chunk_size", 4 * 1024 * 1024),
    ("grpc.http2.max_frame_size", 1024 * 1024),
]

#: asyncio stream buffer limit for tunnelled sockets: the default (64 KiB)
#: pauses and resumes the transport (two epoll_ctl calls) every 128 KiB
STREAM_LIMIT = 1024 * 1024

#: how long a finished connection waits for the far end to end the RPC
#: before cancelling it (so our last frames are not discarded by a reset)
LINGER_SECONDS = 10.0


class TunnelError(Exception):
    """The far side of a tunnel reported an error or vanished without `eof`.

    `code` is the gRPC status name when the RPC itself failed ("UNAVAILABLE"
    means the manager could not be reached at all), else None.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@runtime_checkable
class FrameChannel(Protocol):
    """One Tunnel RPC seen from one end: a bidirectional stream of frames.

    `recv()` returns None once the far end has finished the RPC (no more
    frames will come).  Implementations may also provide
    `async done_sending()` (half-close the RPC) and `cancel()` (abort it);
    the helpers below call them when present.
    """

    async def recv(self) -> pb.TunnelFrame | None: ...

    async def send(self, frame: pb.TunnelFrame) -> None: ...


class GrpcFrameChannel:
    """Adapter: a grpc.aio stream-stream call or servicer context as a FrameChannel.

    Both expose `read()` (returning `grpc.aio.EOF` at the end) and `write()`;
    only the client call has `done_writing()` and `cancel()`.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._done_sending = False

    async def recv(self) -> pb.TunnelFrame | None:
        import grpc

        try:
            msg = await self.stream.read()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return None
            raise TunnelError(f"tunnel RPC failed: {exc.code().name}: {exc.details()}",
                              exc.code().name) from None
        except asyncio.InvalidStateError:
            # the RPC already finished (e.g. the servicer returned)
            return None
        if msg is grpc.aio.EOF:
            return None
        return msg

    async def send(self, frame: pb.TunnelFrame | bytes) -> None:
        import grpc

        try:
            await self.stream.write(frame)
        except grpc.aio.AioRpcError as exc:
            raise TunnelError(f"tunnel RPC failed: {exc.code().name}: {exc.details()}",
                              exc.code().name) from None
        except asyncio.InvalidStateError:
            raise TunnelError("tunnel RPC already finished") from None

    async def done_sending(self) -> None:
        if self._done_sending:
            return
        self._done_sending = True
        fn = getattr(self.stream, "done_writing", None)
        if fn is not None:
            with contextlib.suppress(Exception):
                await fn()

    def cancel(self) -> None:
        fn = getattr(self.stream, "cancel", None)
        if fn is not None:
            with contextlib.suppress(Exception):
                fn()


class FastGrpcFrameChannel(GrpcFrameChannel):
    """A GrpcFrameChannel over a call made with `encode_frame`/`decode_frame`:
    data payloads are written pre-encoded and read as views."""

    async def send_data(self, data: bytes) -> None:
        await self.send(encode_data(data))  # pre-encoded: the call's serializer passes bytes through


class SendFirst:
    """A FrameChannel that sends `first` ahead of everything else without holding up `recv`.

    The manager answers a dial with `opened`; awaiting that write before the
    pumps start would put one gRPC write completion (a thread hop through
    grpc's completion queue) on every new connection's path, although the
    client's first bytes are usually waiting already.  Here the write runs
    while the tunnel->socket pump starts; the first `send` waits for it, so
    the frame order is unchanged.
    """

    def __init__(self, chan: FrameChannel, first: pb.TunnelFrame) -> None:
        self.chan = chan
        self._first: asyncio.Future[None] | None = asyncio.ensure_future(chan.send(first))
        if hasattr(chan, "send_data"):
            self.send_data = self._send_data

    async def _sent_first(self) -> None:
        if self._first is not None:
            first, self._first = self._first, None
            await first

    async def recv(self) -> pb.TunnelFrame | None:
        return await self.chan.recv()

    async def send(self, frame: pb.TunnelFrame) -> None:
        await self._sent_first()
        await self.chan.send(frame)

    async def _send_data(self, data: bytes) -> None:
        await self._sent_first()
        await self.chan.send_data(data)  # type: ignore[attr-defined]

    async def done_sending(self) -> None:
        with contextlib.suppress(Exception):
            await self._sent_first()
        fn = getattr(self.chan, "done_sending", None)
        if fn is not None:
            await fn()

    def cancel(self) -> None:
        if self._first is not None:
            first, self._first = self._first, None
            first.cancel()
            first.add_done_callback(lambda f: f.cancelled() or f.exception())
        cancel_channel(self.chan)


class MemoryFrameChannel:
    """In-process FrameChannel end; `pair()` gives two connected ends.

    For tests, and for gluing two pumps in one process.  Bounded queues give
    the same backpressure a real RPC has.
    """

    _END = object()

    def __init__(self, inbox: asyncio.Queue[Any], outbox: asyncio.Queue[Any]) -> None:
        self._inbox = inbox
        self._outbox = outbox
        self._closed = False
        self._peer_closed = False
        self.sent: list[str] = []  # frame kinds, for assertions in tests

    @classmethod
    def pair(cls, maxsize: int = 8) -> tuple[MemoryFrameChannel, MemoryFrameChannel]:
        a: asyncio.Queue[Any] = asyncio.Queue(maxsize)
        b: asyncio.Queue[Any] = asyncio.Queue(maxsize)
        return cls(a, b), cls(b, a)

    async def recv(self) -> pb.TunnelFrame | None:
        if self._peer_closed:
            return None
        item = await self._inbox.get()
        if item is self._END:
            self._peer_closed = True
            return None
        return item

    async def send(self, frame: pb.TunnelFrame) -> None:
        if self._closed:
            raise TunnelError("channel closed")
        self.sent.append(frame.WhichOneof("kind") or "")
        await self._outbox.put(frame)

    async def done_sending(self) -> None:
        self.close()

    def close(self) -> None:
        """End this side of the RPC: the peer's recv() returns None after queued frames."""
        if not self._closed:
            self._closed = True
            try:
                self._outbox.put_nowait(self._END)
            except asyncio.QueueFull:
                # peer is not reading; make room (it gets the end marker, not data)
                with contextlib.suppress(asyncio.QueueEmpty):
                    self._outbox.get_nowait()
                self._outbox.put_nowait(self._END)

    def cancel(self) -> None:
        self.close()


class SocketStream:
    """A connected socket with the StreamReader + StreamWriter surface the pumps use.

    Why not asyncio streams: their transport reads into one buffer, the
    reader copies into another and `read()` copies out again; here `read()`
    is one ``recv`` into the returned bytes, and `drain()` one ``sendall``.
    For a tunnel moving hundreds of MB/s on a busy core that is the
    difference that shows.  Reading and writing may run concurrently (one
    task each), as with streams.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._pending: list[bytes] = []
        self._closed = False
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, host: str, port: int, timeout: float) -> SocketStream:
        """Dial host:port (an IP address); raises OSError / TimeoutError."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    @property
    def transport(self) -> SocketStream:
        return self  # for `transport.abort()`

    async def read(self, n: int = CHUNK) -> bytes:
        if self._closed:
            return b""
        return await self._loop.sock_recv(self.sock, n)

    def write(self, data: bytes) -> None:
        if not self._closed and data:
            self._pending.append(data)

    async def drain(self) -> None:
        while self._pending and not self._closed:
            await self._loop.sock_sendall(self.sock, self._pending.pop(0))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Half-close; call after `drain()` (the pumps do)."""
        if not self._closed:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        try:
            if name == "socket":
                return self.sock
            if name == "peername":
                return self.sock.getpeername()
            if name == "sockname":
                return self.sock.getsockname()
        except OSError:
            pass
        return default

    def abort(self) -> None:
        """Close with a reset, so the peer does not mistake it for a clean end."""
        if not self._closed:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pending.clear()
            self.sock.close()

    async def wait_closed(self) -> None:
        return None


# ------------------------------------------------------------------ frames

def data_frame(data: bytes) -> pb.TunnelFrame:
    return pb.TunnelFrame(data=data)


# Wire-level shortcuts for `data` frames, the bulk of every tunnel.  A data
# frame is field 2 (bytes) of TunnelFrame: tag 0x12, a varint length, the
# bytes.  Building and reading that directly skips protobuf's copies of the
# payload; every other frame goes through protobuf as usual.
_DATA_TAG = 0x12


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_data(data: bytes) -> bytes:
    """The serialized TunnelFrame(data=data)."""
    return b"".join((bytes((_DATA_TAG,)), _varint(len(data)), data))


class DataView:
    """A received data frame whose payload is a view into the message bytes."""

    __slots__ = ("data",)

    def __init__(self, data: memoryview) -> None:
        self.data = data

    @staticmethod
    def WhichOneof(_: str) -> str:  # noqa: N802 - the protobuf method name
        return "data"


def decode_frame(raw: bytes) -> pb.TunnelFrame | DataView:
    """Deserializer for tunnel RPCs: data frames as views, the rest via protobuf."""
    if raw[:1] == b"\x12":
        length, pos, shift = 0, 1, 0
        while pos < len(raw):
            b = raw[pos]
            pos += 1
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if pos + length == len(raw):
            return DataView(memoryview(raw)[pos:])
    return pb.TunnelFrame.FromString(raw)


def encode_frame(frame: pb.TunnelFrame | DataView | bytes) -> bytes:
    """Serializer for tunnel RPCs: pre-encoded bytes pass through, relayed views are re-framed."""
    if isinstance(frame, bytes):
        return frame
    if isinstance(frame, DataView):
        return encode_data(frame.data)  # type: ignore[arg-type]
    return frame.SerializeToString()


class FastTunnelRegistration:
    """Stands in for a grpc.aio server while the generated ``add_..._to_server``
    registers a service: the Tunnel method gets `decode_frame`/`encode_frame`,
    every other method is registered unchanged."""

    def __init__(self, server: Any, method: str = "Tunnel") -> None:
        self.server = server
        self.method = method

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # registered below, from the swapped table

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        import grpc

        handlers = dict(handlers)
        handlers[self.method] = handlers[self.method]._replace(request_deserializer=decode_frame,
                                                               response_serializer=encode_frame)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        self.server.add_registered_method_handlers(service, handlers)


def eof_frame() -> pb.TunnelFrame:
    return pb.TunnelFrame(eof=pb.Empty())


def error_frame(message: str) -> pb.TunnelFrame:
    return pb.TunnelFrame(error=message)


def opened_frame() -> pb.TunnelFrame:
    return pb.TunnelFrame(opened=pb.Empty())


# ------------------------------------------------------------------ pumps

@dataclass
class Counter:
    """Bytes moved by one pump (for logs and tests)."""

    bytes: int = 0


async def pump_stream_to_tunnel(reader: asyncio.StreamReader, chan: FrameChannel,
                                counter: Counter | None = None, chunk: int = CHUNK) -> None:
    """Copy `reader` into `data` frames; at end of stream send `eof` and return.

    A connection reset raises ConnectionError (the caller tells the far side
    with an `error` frame).  A channel with `send_data(bytes)` gets the
    payloads that way (see `FastGrpcFrameChannel`).
    """
    send_data = getattr(chan, "send_data", None)
    while True:
        data = await reader.read(chunk)
        if not data:
            await chan.send(eof_frame())
            return
        if counter is not None:
            counter.bytes += len(data)
        if send_data is not None:
            await send_data(data)
        else:
            await chan.send(data_frame(data))


async def pump_tunnel_to_stream(chan: FrameChannel, writer: asyncio.StreamWriter,
                                counter: Counter | None = None) -> None:
    """Copy `data` frames into `writer`; on `eof` half-close it and return.

    Raises TunnelError when the far side sends `error` or ends the RPC
    without an `eof` (the stream must not look cleanly finished then).
    """
    while True:
        frame = await chan.recv()
        if frame is None:
            raise TunnelError("tunnel ended without end-of-stream")
        kind = frame.WhichOneof("kind")
        if kind == "data":
            if frame.data:
                writer.write(frame.data)
                if counter is not None:
                    counter.bytes += len(frame.data)
                await writer.drain()
        elif kind == "eof":
            await writer.drain()
            if writer.can_write_eof():
                with contextlib.suppress(OSError):
                    writer.write_eof()
            return
        elif kind == "error":
            raise TunnelError(frame.error or "peer error")
        elif kind == "opened":
            continue  # harmless duplicate
        else:
            raise TunnelError(f"unexpected {kind!r} frame inside an open tunnel")


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                counter: Counter | None = None) -> None:
    """One direction of a splice: bytes until EOF, then half-close `writer`."""
    while True:
        data = await reader.read(CHUNK)
        if not data:
            if writer.can_write_eof():
                with contextlib.suppress(OSError):
                    writer.write_eof()
            return
        writer.write(data)
        if counter is not None:
            counter.bytes += len(data)
        await writer.drain()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Drop a connection now (the peer sees a reset, not a clean end)."""
    with contextlib.suppress(Exception):
        writer.transport.abort()


async def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 5)


async def _wait_both(a: asyncio.Task[Any], b: asyncio.Task[Any]) -> None:
    """Wait for two tasks; the first failure cancels the other and is raised.

    On cancellation of the caller both tasks are cancelled and awaited, so no
    pump outlives the connection it served.
    """
    try:
        pending = {a, b}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
    finally:
        for t in (a, b):
            if not t.done():
                t.cancel()
        await asyncio.gather(a, b, return_exceptions=True)


async def splice(r1: asyncio.StreamReader, w1: asyncio.StreamWriter,
                 r2: asyncio.StreamReader, w2: asyncio.StreamWriter) -> tuple[int, int]:
    """Join two TCP streams until both directions reach EOF; then close both.

    Returns (bytes 1->2, bytes 2->1).  A reset on either side, or
    cancellation, aborts both connections.
    """
    c12, c21 = Counter(), Counter()
    t12 = asyncio.ensure_future(_copy(r1, w2, c12))
    t21 = asyncio.ensure_future(_copy(r2, w1, c21))
    ok = False
    try:
        await _wait_both(t12, t21)
        ok = True
    except (ConnectionError, OSError) as exc:
        log.debug("splice ended by %s", exc)
    finally:
        if not ok:
            _abort(w1)
            _abort(w2)
        await asyncio.gather(_close(w1), _close(w2))
    return c12.bytes, c21.bytes


async def finish_channel(chan: FrameChannel, linger: float = LINGER_SECONDS) -> None:
    """Half-close our side of the RPC and wait (bounded) for the far side to end it.

    Cancelling straight away could reset the HTTP/2 stream before the far end
    has read our last frames.
    """
    done_sending = getattr(chan, "done_sending", None)
    if done_sending is not None:
        with contextlib.suppress(Exception):
            await done_sending()
    try:
        async with asyncio.timeout(linger):
            while await chan.recv() is not None:
                pass
    except (TimeoutError, TunnelError):
        pass
    finally:
        cancel_channel(chan)


def cancel_channel(chan: FrameChannel) -> None:
    cancel = getattr(chan, "cancel", None)
    if cancel is not None:
        with contextlib.suppress(Exception):
            cancel()


async def bridge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 chan: FrameChannel, *, linger: float = LINGER_SECONDS, chunk: int = CHUNK) -> tuple[int, int]:
    """Join a TCP stream and an (already opened) tunnel until both directions end.

    Returns (bytes stream->tunnel, bytes tunnel->stream).  A local reset
    sends an `error` frame; a remote `error` (or vanishing RPC) aborts the
    socket.  On cancellation both are torn down.  The socket is always closed
    and the channel finished (half-closed, then cancelled after `linger`).
    """
    up, down = Counter(), Counter()
    t_up = asyncio.ensure_future(pump_stream_to_tunnel(reader, chan, up, chunk))
    t_down = asyncio.ensure_future(pump_tunnel_to_stream(chan, writer, down))
    ok = False
    try:
        await _wait_both(t_up, t_down)
        ok = True
    except TunnelError as exc:
        log.debug("tunnel ended: %s", exc)
        _abort(writer)
        cancel_channel(chan)
    except (ConnectionError, OSError) as exc:
        log.debug("local stream ended: %s", exc)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(chan.send(error_frame(f"connection reset: {exc}")), 2)
        _abort(writer)
        cancel_channel(chan)
    except BaseException:
        _abort(writer)
        cancel_channel(chan)
        raise
    finally:
        await _close(writer)
    if ok:
        await finish_channel(chan, linger)
    return up.bytes, down.bytes


#: the Manager service's Tunnel method (see tpnb.proto); called with the wire-level codec above
TUNNEL_METHOD = "/tpnb.v1.Manager/Tunnel"

#: options of every client channel to the traffic-manager (connector and root daemon alike)
MANAGER_CHANNEL_OPTIONS = [
    *BULK_GRPC_OPTIONS,
    ("grpc.keepalive_time_ms", 10000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # one HTTP/2 connection carries every flow: let it use large windows
    ("grpc.http2.bdp_probe", 1),
]
