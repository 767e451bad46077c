"""Port-forward to a pod through the API server, over SPDY (spdy.py) or WebSockets.

Why our own and not ``kubectl port-forward`` or client-go's SPDY: the daemon
needs one long-lived, in-process tunnel to the traffic-manager, with clean
errors and no subprocess to babysit.  The API server passes a WebSocket
upgrade on ``pods/<name>/portforward`` straight through to the kubelet (only
the SPDY-tunnelling subprotocol is translated), and the kubelet speaks the
channel protocol:

* one WebSocket carries one TCP stream per requested port; we ask for one
  port, so channel 0 is data (both ways) and channel 1 is errors (server to
  client only);
* every binary message starts with its channel byte;
* the first message the server sends on each channel is the port number as
  2 bytes little endian;
* there is no half-close: the stream ends when the WebSocket closes.  The
  kubelet closes it when the connection inside the pod ends, after writing
  the reason (e.g. "connection refused") on channel 1 if dialing failed.

So `PortForward` opens one WebSocket per accepted local connection; the
daemon's gRPC channel multiplexes everything over one of them.

Throughput: local reads go straight into a reusable buffer that already holds
the channel byte (no per-chunk concatenation), messages are up to 256 KiB,
`websockets` applies backpressure in `send` (drain above `write_limit`) and
through its bounded receive queue, and local writes use ``sock_sendall``
which only returns once the kernel took the bytes.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
from typing import Any, Self

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)

from tpnb import config
from tpnb.errors import ClusterError, PermissionDenied

from .kube import KubeTarget, connect_error, path_quote
from .spdy import REFUSAL_WAIT, SpdyError, SpdyStream, SpdyUnsupported, http_error
from .spdy import open_stream as spdy_open_stream

log = logging.getLogger(__name__)

CHANNEL_DATA = 0
CHANNEL_ERROR = 1
#: kubelet's binary channel protocol; "portforward.k8s.io" is offered as in the
#: brief but only "v4.channel.k8s.io" (or the legacy unnamed one) is ever chosen
SUBPROTOCOLS = ("v4.channel.k8s.io", "portforward.k8s.io")
#: largest data message we send; the kubelet (x/net/websocket) accepts 32 MiB
FRAME_MAX = 256 * 1024
#: largest message we accept (the kubelet sends io.Copy-sized 32 KiB chunks)
RECV_MAX = 4 * 1024 * 1024
#: after the local side's EOF, keep relaying the pod's answer while it flows
#: (the protocol cannot half-close, so the pod never learns about the EOF)
EOF_LINGER = 5.0


# ------------------------------------------------------------------ framing
def encode_frame(channel: int, data: bytes | bytearray | memoryview) -> bytes:
    """A channel message (for tests and fakes; the hot path avoids the copy)."""
    return bytes((channel,)) + bytes(data)


def decode_frame(message: bytes | bytearray | memoryview) -> tuple[int, memoryview]:
    """(channel, payload) of one channel message, without copying the payload."""
    mv = memoryview(message)
    if len(mv) == 0:
        raise ValueError("empty port-forward message (no channel byte)")
    return mv[0], mv[1:]


def encode_port(port: int) -> bytes:
    return struct.pack("<H", port)


def decode_port(data: bytes | memoryview) -> int:
    return struct.unpack("<H", bytes(data[:2]))[0]


def portforward_path(namespace: str, pod: str) -> str:
    return f"/api/v1/namespaces/{path_quote(namespace)}/pods/{path_quote(pod)}/portforward"


class _ChannelReader:
    """Demultiplexes one port-forward WebSocket: strips the port preambles,
    hands data payloads out, collects the error channel's text."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._seen_port = [False, False]
        self.error = ""

    def feed(self, message: bytes | str) -> memoryview | None:
        """Process one message; returns data bytes for the local side, if any."""
        if isinstance(message, str):  # only the base64 variant uses text frames
            raise ClusterError("port-forward: unexpected text message", "the server chose the base64 protocol")
        channel, payload = decode_frame(message)
        if channel > CHANNEL_ERROR:
            raise ClusterError(f"port-forward: message on unknown channel {channel}")
        if not self._seen_port[channel]:
            if len(payload) < 2:
                raise ClusterError("port-forward: truncated port preamble", f"channel {channel}")
            got = decode_port(payload)
            if got != self.port:
                raise ClusterError("port-forward: preamble for the wrong port", f"expected {self.port}, got {got}")
            self._seen_port[channel] = True
            payload = payload[2:]
            if not payload:
                return None
        if channel == CHANNEL_ERROR:
            self.error += bytes(payload).decode("utf-8", "replace")
            return None
        return payload if len(payload) else None

    @property
    def ready(self) -> bool:
        return all(self._seen_port)


# ---------------------------------------------------------------- connecting
def _handshake_error(exc: Exception, t: KubeTarget, namespace: str, pod: str, port: int) -> ClusterError:
    where = f"pod {namespace}/{pod} port {port}"
    if isinstance(exc, InvalidStatus):
        return http_error(exc.response.status_code, exc.response.reason_phrase, exc.response.body or b"",
                          namespace, pod, port)
    if isinstance(exc, (InvalidHandshake, InvalidURI)):
        return ClusterError(f"cannot port-forward to {where}", f"WebSocket handshake failed: {exc}",
                            "the API server or a proxy in front of it does not pass WebSocket upgrades")
    if isinstance(exc, (OSError, TimeoutError, ssl.SSLError)):
        return connect_error(exc, t.server, config.get().timeouts.api)
    return ClusterError(f"cannot port-forward to {where}", f"{type(exc).__name__}: {exc}")


async def _open_ws(t: KubeTarget, namespace: str, pod: str, port: int) -> ClientConnection:
    """Open the WebSocket for one stream; raises `ClusterError`."""
    url = t.url(portforward_path(namespace, pod), {"ports": str(port)}, websocket=True)
    kw: dict[str, Any] = {}
    if t.secure:
        kw["ssl"] = t.ssl_context
        if t.tls_server_name:
            kw["server_hostname"] = t.tls_server_name
    timeout = config.get().timeouts.api
    # may re-run an exec credential plugin when the token expired: not on the loop
    headers = await anyio.to_thread.run_sync(t.auth_headers)
    try:
        return await connect(
            url,
            subprotocols=list(SUBPROTOCOLS),  # type: ignore[arg-type]
            additional_headers=headers,
            compression=None,  # the API server never negotiates it; don't offer
            max_size=RECV_MAX,
            max_queue=16,
            write_limit=1024 * 1024,
            open_timeout=timeout,
            ping_interval=20,
            ping_timeout=60,
            close_timeout=2,
            proxy=t.proxy,
            user_agent_header="tpnb",
            **kw,
        )
    except ClusterError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified for the user
        raise _handshake_error(exc, t, namespace, pod, port) from None


async def _read_preamble(ws: ClientConnection, chan: _ChannelReader, timeout: float) -> list[memoryview]:
    """Wait until both port preambles arrived; returns any early data."""
    early: list[memoryview] = []
    async with asyncio.timeout(timeout):
        while not chan.ready:
            data = chan.feed(await ws.recv())
            if data is not None:
                early.append(data)
    return early


class _Relay:
    """Pumps one local socket <-> one forwarded stream (subclasses: WebSocket, SPDY).

    Neither protocol tells the pod about a local half-close in a way every
    runtime honours, so after the local side's EOF the pod's answer is
    relayed for as long as it keeps flowing (`EOF_LINGER` of silence ends it).
    """

    def __init__(self, sock: socket.socket, label: str) -> None:
        self.sock = sock
        self.label = label
        self.sent = 0
        self.received = 0
        self._activity = asyncio.Event()

    @property
    def error(self) -> str:
        """Text the kubelet / runtime reported for this stream (a failed dial)."""
        raise NotImplementedError

    async def _up(self, loop: asyncio.AbstractEventLoop) -> None:
        raise NotImplementedError

    async def _down(self, loop: asyncio.AbstractEventLoop) -> None:
        raise NotImplementedError

    async def _close_remote(self) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        up = asyncio.create_task(self._up(loop))
        down = asyncio.create_task(self._down(loop))
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if up in done and not up.cancelled() and up.exception() is None and not down.done():
                # local EOF: keep relaying the pod's answer while it keeps coming
                await self._linger(down)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            for task in (up, down):
                if not task.cancelled() and task.exception() is not None:
                    exc = task.exception()
                    if not isinstance(exc, (ConnectionClosed, ConnectionError, OSError, SpdyError)):
                        log.warning("port-forward %s: %s", self.label, exc)
            if self.error:
                log.warning("port-forward %s: %s", self.label, self.error.strip())
            await self._close()

    async def _linger(self, down: asyncio.Task[None]) -> None:
        while not down.done():
            self._activity.clear()
            act = asyncio.create_task(self._activity.wait())
            await asyncio.wait({down, act}, timeout=EOF_LINGER, return_when=asyncio.FIRST_COMPLETED)
            act.cancel()
            if not self._activity.is_set():
                return

    async def _close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        await self._close_remote()


class _WsRelay(_Relay):
    """Over a port-forward WebSocket (channel protocol)."""

    def __init__(self, sock: socket.socket, ws: ClientConnection, port: int, label: str,
                 early: list[memoryview] | None = None, chan: _ChannelReader | None = None) -> None:
        super().__init__(sock, label)
        self.ws = ws
        self.chan = chan or _ChannelReader(port)
        self.early = early or []

    @property
    def error(self) -> str:
        return self.chan.error

    async def _up(self, loop: asyncio.AbstractEventLoop) -> None:
        buf = bytearray(FRAME_MAX + 1)
        buf[0] = CHANNEL_DATA
        view = memoryview(buf)
        into = view[1:]
        while True:
            n = await loop.sock_recv_into(self.sock, into)
            if n == 0:
                return
            # websockets serialises (and masks) the frame before send() returns,
            # so the buffer can be reused right away
            await self.ws.send(view[: n + 1])
            self.sent += n

    async def _down(self, loop: asyncio.AbstractEventLoop) -> None:
        for data in self.early:
            await loop.sock_sendall(self.sock, data)
            self.received += len(data)
        try:
            async for message in self.ws:
                data = self.chan.feed(message)
                if data is None:
                    if self.chan.error:
                        return  # the pod side failed; close the local connection
                    continue
                await loop.sock_sendall(self.sock, data)
                self.received += len(data)
                self._activity.set()
        except ConnectionClosed:
            pass

    async def _close_remote(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 3)


class _SpdyRelay(_Relay):
    """Over an SPDY connection (see `spdy.py`)."""

    def __init__(self, sock: socket.socket, stream: SpdyStream, label: str, early: list[bytes] | None = None) -> None:
        super().__init__(sock, label)
        self.stream = stream
        self.early = early or []

    @property
    def error(self) -> str:
        return self.stream.error

    async def _up(self, loop: asyncio.AbstractEventLoop) -> None:
        self.sent = await self.stream.pump_up(self.sock)

    async def _down(self, loop: asyncio.AbstractEventLoop) -> None:
        for data in self.early:
            await loop.sock_sendall(self.sock, data)
        await self.stream.pump_down(self.sock, self._activity.set)
        await self.stream.await_refusal(REFUSAL_WAIT)

    async def _close_remote(self) -> None:
        await self.stream.aclose()


class PortForward:
    """Listens on 127.0.0.1:<ephemeral> and forwards each accepted TCP
    connection over its own SPDY connection (or WebSocket) to pod:port.

    ``protocol``: "spdy", "websocket", or "auto" (SPDY, falling back to
    WebSocket for good when the server or a proxy refuses the upgrade);
    default: the ``daemon.portforward_protocol`` setting.
    """

    #: how long `start` waits for the kubelet to report a failed dial
    probe_wait = 0.5

    def __init__(self, target: KubeTarget, namespace: str, pod: str, port: int,
                 protocol: str | None = None, unix: bool = False, unix_path: str | None = None) -> None:
        self.target = target
        self.namespace = namespace
        self.pod = pod
        self.port = port
        self.protocol = protocol or config.get().daemon.portforward_protocol
        #: listen on an abstract Unix socket instead of 127.0.0.1 (cheaper per
        #: byte; the daemon's own gRPC channel uses it)
        self.unix = unix
        #: listen on this Unix socket path instead (mode 0600, in a directory only the
        #: user enters): the connector's relay, reached by it and the root daemon alone
        self.unix_path = unix_path
        self.local_port = 0
        #: what to connect to: "127.0.0.1:<port>" or "unix-abstract:<name>" (gRPC target syntax)
        self.address = ""
        self.last_error: str = ""
        self.connections = 0
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._relays: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.pod}:{self.port}"

    async def probe(self) -> None:
        """Open one stream and wait briefly for the kubelet's dial result.

        A refused pod port is only reported on the error channel/stream
        right after the stream opens; a successful dial is silent.  So: wait
        for the stream to be set up, then `probe_wait` for an error or a close.
        This also settles the protocol when it is "auto".
        """
        if self.protocol in ("auto", "spdy"):
            try:
                await self._probe_spdy()
                self.protocol = "spdy"
                return
            except SpdyUnsupported as exc:
                if self.protocol == "spdy":
                    raise ClusterError(f"cannot port-forward to pod {self.label} over SPDY", str(exc),
                                       "set daemon.portforward_protocol to websocket or auto") from None
                log.info("port-forward %s: SPDY refused (%s); using WebSocket", self.label, exc)
                self.protocol = "websocket"
            except PermissionDenied as exc:
                # the API server authorizes the SPDY upgrade as `create` and the WebSocket one as `get`
                # on pods/portforward: a user granted only `get` still forwards over WebSocket
                if self.protocol == "spdy":
                    raise
                try:
                    await self._probe_ws()
                except PermissionDenied:
                    exc.hint = (f"grant get and create on pods/portforward in namespace {self.namespace} "
                                "(SPDY port-forwards need create, WebSocket ones get); " + exc.hint).strip("; ")
                    raise exc from None
                log.info("port-forward %s: SPDY refused by RBAC (%s); using WebSocket", self.label, exc.what)
                self.protocol = "websocket"
                return
        await self._probe_ws()

    async def _probe_spdy(self) -> None:
        stream, _ = await spdy_open_stream(self.target, self.namespace, self.pod, self.port,
                                           portforward_path(self.namespace, self.pod))
        try:
            # a failed dial: the data stream ends, then the reason comes on the error stream
            await stream.read_error(self.probe_wait * (4 if stream.remote_fin else 1))
        finally:
            await stream.aclose()
        self._raise_dial_error(stream.error)

    def _raise_dial_error(self, error: str) -> None:
        if error.strip():
            self.last_error = error.strip()
            raise ClusterError(f"cannot port-forward to pod {self.label}", self.last_error,
                               "is the process in the pod listening on that port? "
                               f"(`kubectl -n {self.namespace} logs {self.pod}`)")

    async def _probe_ws(self) -> None:
        ws = await _open_ws(self.target, self.namespace, self.pod, self.port)
        chan = _ChannelReader(self.port)
        try:
            await _read_preamble(ws, chan, config.get().timeouts.api)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.probe_wait):
                    while not chan.error:
                        chan.feed(await ws.recv())
        except ConnectionClosed:
            if not chan.error:
                raise ClusterError(f"cannot port-forward to pod {self.label}",
                                   "the API server closed the stream before it was set up") from None
        except TimeoutError:
            raise ClusterError(f"cannot port-forward to pod {self.label}",
                               "no answer from the kubelet (port preamble) in time") from None
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)
        self._raise_dial_error(chan.error)

    async def start(self) -> int:
        """Check that pod:port is reachable, then listen; returns the local port."""
        if self._closed:
            raise RuntimeError("PortForward was closed")
        await self.probe()
        if self.unix_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o177)
            try:
                sock.bind(self.unix_path)
            finally:
                os.umask(old_umask)
            self.address = f"unix:{self.unix_path}"
        elif self.unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            name = f"tpnb-pf-{os.getpid()}-{id(self):x}"
            sock.bind("\0" + name)
            self.address = f"unix-abstract:{name}"
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            self.local_port = sock.getsockname()[1]
            self.address = f"127.0.0.1:{self.local_port}"
        sock.listen(64)
        sock.setblocking(False)
        self._listener = sock
        self._accept_task = asyncio.create_task(self._accept_loop(), name=f"portforward-accept {self.label}")
        log.info("port-forward %s -> %s (%s)", self.address, self.label, self.protocol)
        return self.local_port

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if self._closed:
                    return
                log.warning("port-forward %s: accept failed: %s", self.label, exc)
                await asyncio.sleep(0.1)
                continue
            self.connections += 1
            task = asyncio.create_task(self._serve(conn), name=f"portforward {self.label}")
            self._relays.add(task)
            task.add_done_callback(self._relays.discard)

    async def _serve(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            # room for a few MB in flight towards the local reader: fewer stalls of the relay
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        relay: _Relay
        try:
            if self.protocol == "spdy":
                stream, early = await spdy_open_stream(self.target, self.namespace, self.pod, self.port,
                                                       portforward_path(self.namespace, self.pod))
                relay = _SpdyRelay(conn, stream, self.label, early)
            else:
                ws = await _open_ws(self.target, self.namespace, self.pod, self.port)
                relay = _WsRelay(conn, ws, self.port, self.label)
        except (ClusterError, SpdyUnsupported) as exc:
            self.last_error = str(exc)
            log.warning("port-forward %s: %s", self.label, exc)
            conn.close()
            return
        except BaseException:
            conn.close()
            raise
        await relay.run()
        if relay.error:
            self.last_error = relay.error.strip()

    async def aclose(self) -> None:
        """Stop listening and tear down every forwarded connection."""
        self._closed = True
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._accept_task
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self.unix_path:
                with contextlib.suppress(OSError):
                    os.unlink(self.unix_path)
        tasks = list(self._relays)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


_background: set[asyncio.Task[None]] = set()


async def open_stream(target: KubeTarget, namespace: str, pod: str,
                      port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """One forwarded connection without a listener.

    The WebSocket is opened (and the preamble read) before returning, so a
    missing pod or denied RBAC raises `ClusterError` here.  The returned
    reader/writer are ordinary asyncio streams over one end of a socketpair;
    the other end is relayed like an accepted connection.
    """
    ws = await _open_ws(target, namespace, pod, port)
    chan = _ChannelReader(port)
    try:
        early = await _read_preamble(ws, chan, config.get().timeouts.api)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 2)
        if isinstance(exc, (TimeoutError, ConnectionClosed)):
            raise ClusterError(f"cannot port-forward to pod {namespace}/{pod}:{port}",
                               chan.error or "the stream closed before it was set up") from None
        raise
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    relay = _WsRelay(ours, ws, port, f"{namespace}/{pod}:{port}", early=early, chan=chan)
    task = asyncio.create_task(relay.run())
    _background.add(task)
    task.add_done_callback(_background.discard)
    return await asyncio.open_connection(sock=theirs)
