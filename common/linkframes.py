"""The agent link's wire format: many intercepted connections over one byte stream (issue 15).

An intercept's data path used to be agent -> gRPC -> traffic-manager -> gRPC ->
connector: two Python gRPC endpoints, each costing three thread hops per
message in grpc.aio.  Where the user may port-forward to the workload's pods,
the connector instead keeps one port-forward to each agent pod's *link port*
(cluster/agentlink.py, connector/agentlink.py) and this module multiplexes
every intercepted connection of that pod over it.  Nothing here knows sockets
or Kubernetes: a `Link` is given an asyncio transport and calls back on frames,
so the framing, the credit windows and the handshake are tested on plain
objects (tests/test_linkframes_unit.py).

Why our own framing and not HTTP/2 (h2) or SSH channels: the job is five frame
kinds with the semantics `common/forward.py` already has for gRPC tunnels
(data / eof = half-close / error = reset); h2's state machine and header
compression cost more per small request than the whole frame here, and we want
the agent to push `open` without waiting for anything.

Frame: 9-byte header ``kind:u8 conn:u32 length:u32`` then `length` bytes.

  HELLO   agent -> connector, conn 0: MAGIC + a fresh 32-byte nonce
  AUTH    connector -> agent, conn 0: client nonce (32) + proof (32) + intercept id
  WELCOME agent -> connector, conn 0: the agent's proof (32): both sides hold the key
  OPEN    agent -> connector: a new intercepted connection (payload: peer port u16 + peer ip);
          data frames may follow at once (no round trip)
  DATA    payload bytes, at most `MAX_DATA`, never more than the peer's credit
  EOF     half-close of the sender's direction
  RESET   tear the connection down (payload: why); the receiver aborts its socket
  CREDIT  conn's receiver consumed `u32` more bytes: the sender may send that much more
  PING/PONG conn 0, keep-alive (a link that stops answering is dropped)

Flow control: each connection may have at most `WINDOW` bytes in flight per
direction (sent, not yet consumed by the receiver's socket); the receiver
returns credit as its consumer takes data.  So one bulk flow cannot blow the
other side's memory, and a slow local reader stalls only its own connection:
the link reader never waits on a connection's socket.

Authentication (the link port is on the pod's loopback, reached only through a
port-forward the API server authorized, but the app container shares that
loopback and another user may hold `pods/portforward` too): the manager gives
each (intercept, agent pod) pair a key, to the agent in its instructions and to
the intercept's own session in its intercept list.  The agent sends a nonce;
the connector answers with HMAC(key, nonces + intercept id); the agent checks
it in constant time and proves itself back.  A failed AUTH gets nothing and
the connection is closed; an authenticated link receives only connections of
the intercept it authenticated for.

The same link also runs over an HTTP/1.1 upgrade through the API server's
`pods/NAME:PORT/proxy/` (the agent listens on its pod IP too, see
cluster/agentlink.py): the connector sends `GET UPGRADE_PATH` with
`Upgrade: UPGRADE_TOKEN`, the agent answers `101` and HELLO in one write, and
the frames above follow unchanged.  `upgrade_request_ok` is the agent's check
of that request head.

Runs inside the cluster image: Python 3.11 and stdlib only.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import logging
import os
import socket
import struct
from typing import Any, Callable

log = logging.getLogger("tpnb.linkframes")

HELLO, AUTH, WELCOME, OPEN, DATA, EOF, RESET, CREDIT, PING, PONG = range(1, 11)
KIND_NAMES = {HELLO: "hello", AUTH: "auth", WELCOME: "welcome", OPEN: "open", DATA: "data", EOF: "eof",
              RESET: "reset", CREDIT: "credit", PING: "ping", PONG: "pong"}
HDR = struct.Struct("!BII")
MAGIC = b"TPNBLNK1"
NONCE = 32
MAC = 32
#: largest data payload of one frame
MAX_DATA = 256 * 1024
#: bytes in flight per connection and direction
WINDOW = 4 * 1024 * 1024
#: credit is returned once this much was consumed (or the consumer ran dry), so small requests cost no frame
CREDIT_STEP = 256 * 1024
#: the largest frame anybody may send before it is authenticated (HELLO/AUTH are small)
MAX_HANDSHAKE = 1024
#: the largest control payload (OPEN, RESET, CREDIT, PING) after it
MAX_CONTROL = 4096


#: the HTTP upgrade token and path of a link through the API server's pods/proxy
UPGRADE_TOKEN = "tpnb-link"
UPGRADE_PATH = "/tpnb-link"
#: the largest request head the agent reads before it gives up on a caller
MAX_UPGRADE_HEAD = 8192
UPGRADE_RESPONSE = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                    b"Upgrade: " + UPGRADE_TOKEN.encode() + b"\r\n\r\n")


def upgrade_request_ok(head: bytes) -> bool:
    """Whether `head` (the request line and headers, up to the blank line) asks for a link upgrade:
    `GET UPGRADE_PATH` and an `Upgrade` header naming `UPGRADE_TOKEN`.  Anything else is refused
    before a byte of the link protocol is sent."""
    line, *headers = head.decode("latin-1").split("\r\n")
    parts = line.split(" ")
    if len(parts) != 3 or parts[0] != "GET" or not parts[2].startswith("HTTP/1."):
        return False
    if parts[1].split("?", 1)[0] != UPGRADE_PATH:
        return False
    for h in headers:
        name, sep, value = h.partition(":")
        if sep and name.strip().lower() == "upgrade":
            if UPGRADE_TOKEN in (t.strip().lower() for t in value.split(",")):
                return True
    return False


class LinkError(Exception):
    """The peer broke the protocol (or failed to authenticate); the link is closed."""


# ------------------------------------------------------------------ keys and proofs

def derive_secret(intercept_key: bytes, namespace: str, pod: str) -> bytes:
    """The key of one (intercept, agent pod) pair, from the intercept's random key (manager side)."""
    return hmac.new(intercept_key, b"tpnb agent link\0" + f"{namespace}/{pod}".encode(), hashlib.sha256).digest()


def client_proof(secret: bytes, agent_nonce: bytes, client_nonce: bytes, intercept_id: str) -> bytes:
    return hmac.new(secret, b"tpnb-link-client\0" + agent_nonce + client_nonce + intercept_id.encode(),
                    hashlib.sha256).digest()


def agent_proof(secret: bytes, agent_nonce: bytes, client_nonce: bytes, intercept_id: str) -> bytes:
    return hmac.new(secret, b"tpnb-link-agent\0" + agent_nonce + client_nonce + intercept_id.encode(),
                    hashlib.sha256).digest()


def hello_payload(nonce: bytes) -> bytes:
    return MAGIC + nonce


def parse_hello(payload: bytes) -> bytes:
    if len(payload) != len(MAGIC) + NONCE or not payload.startswith(MAGIC):
        raise LinkError("not a tpnb agent link (bad hello)")
    return payload[len(MAGIC):]


def auth_payload(secret: bytes, agent_nonce: bytes, intercept_id: str, client_nonce: bytes | None = None) -> bytes:
    cn = client_nonce or os.urandom(NONCE)
    return cn + client_proof(secret, agent_nonce, cn, intercept_id) + intercept_id.encode()


def check_auth(payload: bytes, agent_nonce: bytes,
               secret_for: Callable[[str], bytes | None]) -> tuple[str, bytes, bytes]:
    """(intercept id, secret, client nonce) of a valid AUTH; raises LinkError otherwise.

    `secret_for(intercept_id)` is the agent's key for that intercept (None: not ours).  An unknown id
    is checked against a random key, so success and failure take the same steps.
    """
    if len(payload) <= NONCE + MAC or len(payload) > MAX_HANDSHAKE:
        raise LinkError("malformed auth")
    cn, mac, raw_id = payload[:NONCE], payload[NONCE:NONCE + MAC], payload[NONCE + MAC:]
    try:
        iid = raw_id.decode("ascii")
    except UnicodeDecodeError:
        raise LinkError("malformed auth") from None
    secret = secret_for(iid)
    known = secret is not None
    key = secret if secret is not None else os.urandom(32)
    if not hmac.compare_digest(client_proof(key, agent_nonce, cn, iid), mac) or not known:
        raise LinkError("authentication failed")
    return iid, key, cn


def frame(kind: int, conn: int, payload: bytes = b"") -> bytes:
    return HDR.pack(kind, conn, len(payload)) + payload


def open_payload(peer: tuple[Any, ...]) -> bytes:
    ip = str(peer[0]) if peer else ""
    port = int(peer[1]) if len(peer) > 1 else 0
    return struct.pack("!H", port & 0xFFFF) + ip.encode()


def parse_open(payload: bytes) -> tuple[str, int]:
    if len(payload) < 2:
        return "", 0
    return payload[2:].decode("ascii", "replace"), struct.unpack("!H", payload[:2])[0]


# ------------------------------------------------------------------ frames as forward.py sees them

class LinkFrame:
    """What `LinkChannel.recv` returns: quacks like a pb.TunnelFrame for forward.py's pumps and
    cluster/httproute.TunnelUpstream (`WhichOneof("kind")`, `.data`, `.error`)."""

    __slots__ = ("kind", "data", "error")

    def __init__(self, kind: str, data: bytes = b"", error: str = "") -> None:
        self.kind, self.data, self.error = kind, data, error

    def WhichOneof(self, _: str) -> str:  # noqa: N802 - the protobuf method name
        return self.kind

    def __repr__(self) -> str:
        return f"LinkFrame({self.kind}, {len(self.data)} bytes{', ' + self.error if self.error else ''})"


_EOF_ITEM = LinkFrame("eof")


class LinkChannel:
    """One multiplexed connection as a forward.FrameChannel: `bridge()` runs over it unchanged.

    `send` takes pb.TunnelFrame-like objects (data / eof / error kinds), `send_data` raw bytes (the
    pumps prefer it); both wait for credit.  `recv` returns LinkFrame objects, None after the end.
    """

    def __init__(self, link: Link, conn_id: int) -> None:
        self.link = link
        self.id = conn_id
        self._inbox: collections.deque[LinkFrame] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._credit = WINDOW
        self._credit_waiter: asyncio.Future[None] | None = None
        self._consumed = 0  # bytes handed to our consumer, not yet credited back
        self._buffered = 0  # bytes received and not yet handed over
        self.sent_eof = False
        self.got_end = False   # eof or reset received
        self._ended = False    # recv returned the end; next recv returns None
        self.closed = False
        self.reset_reason = ""
        self.bytes_in = 0
        self.bytes_out = 0
        #: when set, frames go straight to this socket's transport (no task per message, see `Splice`)
        self.splice: Splice | None = None

    # -------------------------------------------------- from the link reader
    def _deliver(self, item: LinkFrame) -> None:
        if self.closed:
            return
        if self.splice is not None:
            self.splice.from_link(item)
            return
        if item.kind == "data":
            self._buffered += len(item.data)
            self.bytes_in += len(item.data)
            if self._buffered > WINDOW:
                self.link.protocol_error(f"connection {self.id}: peer sent beyond its window")
                return
        else:
            self.got_end = True
            if item.kind == "error":
                self.reset_reason = item.error
                self._inbox.clear()  # a reset drops what was not delivered yet
                self._buffered = 0
                self._wake_credit()  # a sender waiting for credit learns of the end
        self._inbox.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _add_credit(self, n: int) -> None:
        self._credit += n
        self._wake_credit()
        if self.splice is not None:
            self.splice.credit_arrived()

    def _wake_credit(self) -> None:
        w = self._credit_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _link_lost(self, why: str) -> None:
        if not self.got_end:
            self._deliver(LinkFrame("error", error=why))
        self._wake_credit()

    def try_send(self, data: bytes) -> int:
        """Send what the credit allows now (no waiting); returns the bytes sent."""
        if self.closed or self.link.lost or self.sent_eof:
            return 0
        n = min(len(data), self._credit)
        pos = 0
        while pos < n:
            m = min(n - pos, MAX_DATA)
            chunk = data if m == len(data) else data[pos:pos + m]
            self.link.write(HDR.pack(DATA, self.id, m), chunk)
            pos += m
        self._credit -= n
        self.bytes_out += n
        return n

    def credit_back(self, n: int, force: bool = False) -> None:
        """A splice wrote `n` more bytes to its socket."""
        self._consumed += n
        self._give_credit(force)

    # -------------------------------------------------- FrameChannel
    async def recv(self) -> LinkFrame | None:
        while not self._inbox:
            if self._ended or self.closed:
                return None
            self._give_credit(force=True)  # our consumer ran dry: let the sender go on
            self._waiter = self.link.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._inbox.popleft()
        if item.kind == "data":
            n = len(item.data)
            self._buffered -= n
            self._consumed += n
            self._give_credit()
        else:
            self._ended = True
            if item.kind == "eof":
                self._maybe_done()
        return item

    def _give_credit(self, force: bool = False) -> None:
        if self._consumed and (force or self._consumed >= CREDIT_STEP) and not self.got_end and not self.closed:
            self.link.write(frame(CREDIT, self.id, struct.pack("!I", self._consumed)))
            self._consumed = 0

    async def send_data(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            while self._credit <= 0:
                if self.closed or self.got_end and self.reset_reason or self.link.lost:
                    raise _tunnel_error(self.reset_reason or self.link.lost or "connection closed")
                self._credit_waiter = self.link.loop.create_future()
                try:
                    await self._credit_waiter
                finally:
                    self._credit_waiter = None
            if self.closed or self.link.lost or self.reset_reason:
                raise _tunnel_error(self.reset_reason or self.link.lost or "connection closed")
            n = min(len(view), self._credit, MAX_DATA)
            chunk = data if n == len(data) and isinstance(data, bytes) else bytes(view[:n])
            self.link.write(HDR.pack(DATA, self.id, n), chunk)
            self._credit -= n
            self.bytes_out += n
            view = view[n:]
            await self.link.drain()

    async def send(self, fr: Any) -> None:
        kind = fr.WhichOneof("kind")
        if kind == "data":
            await self.send_data(bytes(fr.data))
        elif kind == "eof":
            self.send_eof()
        elif kind == "error":
            self.reset(fr.error or "peer error")
        # `open`/`opened` have no meaning on a link (the agent's OPEN is `Link.open_channel`)

    def send_eof(self) -> None:
        if not self.sent_eof and not self.closed and not self.link.lost:
            self.sent_eof = True
            self.link.write(frame(EOF, self.id))
            self._maybe_done()

    def _maybe_done(self) -> None:
        if self.sent_eof and self._ended:
            self.closed = True
            self.link.forget(self.id)

    async def done_sending(self) -> None:
        self.send_eof()

    def reset(self, why: str = "") -> None:
        """Tear down: the peer aborts its socket (unless both sides already ended cleanly)."""
        if self.closed:
            return
        self.closed = True
        if not (self.sent_eof and self.got_end) and not self.link.lost:
            self.link.write(frame(RESET, self.id, why.encode()[:MAX_CONTROL]))
        self.link.forget(self.id)
        self._wake_credit()
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def cancel(self) -> None:
        """forward.cancel_channel: the end of the connection's life (a clean one after both eofs)."""
        self.reset("cancelled")


def _tunnel_error(why: str) -> Exception:
    from tpnb.common.forward import TunnelError  # forward imports the proto; keep this module stdlib-only

    return TunnelError(why)


# ------------------------------------------------------------------ the link

class Link(asyncio.BufferedProtocol):
    """One authenticated byte stream carrying many LinkChannels (either end).

    The handshake is driven by the owner through `on_control` (conn-0 frames);
    after it, `authenticated` is set and OPEN frames reach `on_open`.
    """

    def __init__(self, *, on_open: Callable[[LinkChannel, str, int], None] | None = None,
                 on_control: Callable[[int, bytes], None] | None = None, name: str = "link") -> None:
        self.loop = asyncio.get_running_loop()
        self.name = name
        self.on_open = on_open
        self.on_control = on_control
        self.transport: asyncio.Transport | None = None
        #: the transport's own way to write a frame's parts as one (connector/spdy.py's stream transport)
        self._write_parts: Callable[[tuple[bytes, ...]], None] | None = None
        self.authenticated = False
        self.conns: dict[int, LinkChannel] = {}
        self.next_id = 1
        #: why the link ended ("" while it lives)
        self.lost = ""
        self.closed: asyncio.Future[str] = self.loop.create_future()
        self._buf = bytearray(2 * MAX_DATA + HDR.size)
        self._mv = memoryview(self._buf)
        self._start = self._end = 0
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        #: splices that stopped reading their socket while our transport is over its high-water mark
        self._blocked: set[Splice] = set()
        self.opened_total = 0
        self.last_heard = self.loop.time()

    # -------------------------------------------------- transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._write_parts = getattr(transport, "write_parts", None)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < 64 * 1024:
            self._compact()
        return self._mv[self._end:]

    def _compact(self) -> None:
        """Move the partial frame to the front (the buffer holds two of the largest frames)."""
        n = self._end - self._start
        if self._start:
            self._mv[:n] = self._mv[self._start:self._end]
            self._start, self._end = 0, n

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        self.last_heard = self.loop.time()
        try:
            self._parse()
        except LinkError as exc:
            self.protocol_error(str(exc))

    def eof_received(self) -> bool:
        self._lose("the peer closed the link")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(f"link lost: {exc}" if exc else "link closed")
        w = self._drain
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        w = self._drain
        if w is not None and not w.done():
            w.set_result(None)
        blocked, self._blocked = self._blocked, set()
        for sp in blocked:
            sp.link_resumed()

    # -------------------------------------------------- reading
    def _parse(self) -> None:
        mv = self._mv
        while self._end - self._start >= HDR.size and not self.lost:
            kind, conn, length = HDR.unpack_from(mv, self._start)
            limit = MAX_DATA if kind == DATA and self.authenticated else (
                MAX_CONTROL if self.authenticated else MAX_HANDSHAKE)
            if length > limit:
                raise LinkError(f"{KIND_NAMES.get(kind, kind)} frame of {length} bytes is too large")
            if self._end - self._start - HDR.size < length:
                if len(self._buf) - self._start < HDR.size + length:
                    self._compact()  # make room for the whole frame
                return
            p0 = self._start + HDR.size
            payload = bytes(mv[p0:p0 + length])
            self._start = p0 + length
            self._frame(kind, conn, payload)

    def _frame(self, kind: int, conn: int, payload: bytes) -> None:
        if conn == 0 or not self.authenticated:
            if kind == PING and self.authenticated:
                self.write(frame(PONG, 0, payload))
            elif kind == PONG and self.authenticated:
                pass
            elif self.on_control is not None:
                self.on_control(kind, payload)
            else:
                raise LinkError(f"unexpected {KIND_NAMES.get(kind, kind)} frame")
            return
        ch = self.conns.get(conn)
        if kind == OPEN:
            if ch is not None or self.on_open is None:
                raise LinkError(f"unexpected open of connection {conn}")
            ch = LinkChannel(self, conn)
            self.conns[conn] = ch
            self.opened_total += 1
            ip, port = parse_open(payload)
            self.on_open(ch, ip, port)
            return
        if ch is None:
            if kind == RESET or kind == CREDIT or kind == DATA or kind == EOF:
                # the connection ended here while these were on the way; a data frame for it is dropped
                # (the peer gets a RESET so it stops sending, unless it sent one itself)
                if kind in (DATA, EOF):
                    self.write(frame(RESET, conn, b"no such connection"))
                return
            raise LinkError(f"unknown frame kind {kind}")
        if kind == DATA:
            if payload:
                ch._deliver(LinkFrame("data", payload))
        elif kind == EOF:
            ch._deliver(_EOF_ITEM)
        elif kind == RESET:
            ch._deliver(LinkFrame("error", error=payload.decode("utf-8", "replace") or "reset by peer"))
            ch.closed = True  # nothing more goes out for it
            self.forget(conn)
            ch._wake_credit()
        elif kind == CREDIT:
            if len(payload) != 4:
                raise LinkError("malformed credit")
            ch._add_credit(struct.unpack("!I", payload)[0])
        else:
            raise LinkError(f"unexpected {KIND_NAMES.get(kind, kind)} frame on connection {conn}")

    # -------------------------------------------------- writing
    def write(self, *parts: bytes) -> None:
        """Frames go out at once: a small request's frame must not wait for a loop turn (measured: the
        batching by call_soon cost more in latency than it saved in syscalls)."""
        if self.lost or self.transport is None:
            return
        if self._write_parts is not None:
            self._write_parts(parts)
        elif len(parts) == 1:
            self.transport.write(parts[0])
        else:
            # header and payload joined (a copy): as two writes, the 9-byte header went out as a
            # message of its own through every hop behind us (containerd, kubelet and API server
            # each read, frame and write it on its own).  Not writelines: in 3.12.1 it never calls
            # pause_writing, so the link's backpressure would be lost
            self.transport.write(b"".join(parts))

    async def drain(self) -> None:
        """Wait while the transport's buffer is over its high-water mark (every sender shares one wait)."""
        while self._paused and not self.lost:
            if self._drain is None or self._drain.done():
                self._drain = self.loop.create_future()
            await asyncio.shield(self._drain)

    # -------------------------------------------------- connections
    def open_channel(self, peer: tuple[Any, ...]) -> LinkChannel:
        """Agent side: announce a new connection; data may follow at once."""
        cid = self.next_id
        self.next_id = (self.next_id % 0xFFFFFFFE) + 1  # ids wrap (0 is the link's own)
        ch = LinkChannel(self, cid)
        self.conns[cid] = ch
        self.opened_total += 1
        self.write(frame(OPEN, cid, open_payload(peer)))
        return ch

    def forget(self, conn_id: int) -> None:
        self.conns.pop(conn_id, None)

    # -------------------------------------------------- ending
    def protocol_error(self, why: str) -> None:
        log.info("%s: %s; closing it", self.name, why)
        self.abort(why)

    def abort(self, why: str) -> None:
        self._lose(why)
        if self.transport is not None:
            self.transport.abort()

    def close(self, why: str = "closed") -> None:
        self._lose(why)
        if self.transport is not None:
            self.transport.close()

    def _lose(self, why: str) -> None:
        if self.lost:
            return
        self.lost = why or "closed"
        for ch in list(self.conns.values()):
            ch._link_lost(self.lost)
        self.conns.clear()
        if not self.closed.done():
            self.closed.set_result(self.lost)


# ------------------------------------------------------------------ a socket joined to a channel by callbacks

class Splice(asyncio.Protocol):
    """Joins a LinkChannel and a TCP connection with callbacks only.

    Why not forward.bridge (which works on a LinkChannel too): it runs two tasks per connection and
    every message wakes one of them; on this 2-core VM a task wake-up costs tens of µs, paid on both
    ends of a link for each request and response.  Here bytes read from the socket become a DATA frame
    in the same callback, and a DATA frame is written to the socket as it is parsed.  Backpressure
    stays bounded: the socket is not read while the channel lacks credit or the link's transport is
    over its high-water mark, and credit is not returned while the socket's transport is.
    """

    def __init__(self, ch: LinkChannel) -> None:
        self.ch = ch
        self.loop = ch.link.loop
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = self.loop.create_future()
        self._pending = b""            # socket bytes waiting for credit
        self._local_eof = False        # the socket's peer half-closed
        self._reading_paused = False
        self._write_paused = False
        self._held = 0                 # written to the socket's transport while it was over high-water
        self._got_eof = False
        self.error = ""

    # -------------------------------------------------- setup
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ch = self.ch
        ch.splice = self
        queued = list(ch._inbox)  # frames that arrived before we were attached
        ch._inbox.clear()
        ch._buffered = 0
        for item in queued:
            self.from_link(item)

    def take_over(self, transport: asyncio.Transport, buffered: bytes, eof: bool) -> None:
        """Attach to a connection another protocol accepted (the agent's StreamReader's); `buffered`:
        what it had read and not handed on, `eof`: whether the client already half-closed."""
        transport.set_protocol(self)
        self.connection_made(transport)
        if buffered:
            self.data_received(buffered)
        if eof:
            self.eof_received()
        with contextlib.suppress(Exception):
            if not self._reading_paused:
                transport.resume_reading()

    # -------------------------------------------------- socket -> link
    def data_received(self, data: bytes) -> None:
        if self._pending:
            self._pending += data
            self._pause_reading()
            return
        n = self.ch.try_send(data)
        if n < len(data):
            self._pending = data[n:]
            self._pause_reading()
        elif self.ch.link._paused:
            self._pause_reading()
            self.ch.link._blocked.add(self)

    def eof_received(self) -> bool:
        self._local_eof = True
        if not self._pending:
            self.ch.send_eof()
            self._check_done()
        return True  # keep the other direction open (a half-close)

    def credit_arrived(self) -> None:
        if self._pending:
            n = self.ch.try_send(self._pending)
            self._pending = self._pending[n:]
        if not self._pending:
            if self._local_eof:
                self.ch.send_eof()
                self._check_done()
            elif not self.ch.link._paused:
                self._resume_reading()
            else:
                self.ch.link._blocked.add(self)

    def link_resumed(self) -> None:
        if not self._pending and not self._local_eof:
            self._resume_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            with contextlib.suppress(Exception):
                self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = False
            with contextlib.suppress(Exception):
                self.transport.resume_reading()

    # -------------------------------------------------- link -> socket
    def from_link(self, item: LinkFrame) -> None:
        t = self.transport
        if t is None:
            return
        if item.kind == "data":
            n = len(item.data)
            self.ch.bytes_in += n
            t.write(item.data)
            if self._write_paused:
                self._held += n
                if self._held > WINDOW:
                    self.ch.link.protocol_error(f"connection {self.ch.id}: peer sent beyond its window")
            else:
                self.ch.credit_back(n)
        elif item.kind == "eof":
            self._got_eof = True
            self.ch.got_end = True
            self.ch._ended = True
            if t.can_write_eof():
                with contextlib.suppress(Exception):
                    t.write_eof()
            self._check_done()
        else:  # error: reset the socket so its peer does not mistake this for a clean end
            self.error = item.error or "reset by peer"
            self.ch.got_end = True
            self.ch.closed = True
            self.ch.link.forget(self.ch.id)
            self.abort()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._held:
            held, self._held = self._held, 0
            self.ch.credit_back(held, force=True)

    # -------------------------------------------------- ending
    def _check_done(self) -> None:
        if self._got_eof and self.ch.sent_eof and not self._pending:
            self.ch.closed = True
            self.ch.link.forget(self.ch.id)
            if self.transport is not None:
                self.transport.close()  # after its buffer is written

    def abort(self) -> None:
        t = self.transport
        if t is None:
            return
        sock = t.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        t.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ch.closed:
            # the socket went away before both directions ended cleanly: the other side must not
            # take a truncated stream for a complete one
            self.error = self.error or (f"connection lost: {exc}" if exc else "connection closed early")
            self.ch.reset(self.error)
        self.ch.link._blocked.discard(self)
        if not self.done.done():
            self.done.set_result(None)
