"""The hand-off link between the root daemon and the connector (issue 15): framing and trust.

Why a hand-off: the root daemon accepts the machine's nftables-redirected
TCP connections, but the direct data plane (connector/direct.py, port-forwards
straight to the pod) lives in the connector, which holds the user's
Kubernetes credentials the daemon must never see.  So the daemon passes each
accepted socket itself (its file descriptor, SCM_RIGHTS) and the original
destination to the connector, which answers:

* ``TAKEN``: it relays the connection to the pod; the daemon closes its copy;
* ``NOT_MINE``: no direct path (unknown address, RBAC denies the namespace,
  no ready endpoint); the daemon carries the flow through the manager tunnels
  as before;
* ``REFUSED``: the pod side refused; the daemon resets the client.

The connector closes its copy of the descriptor before it answers anything
but ``TAKEN``, so after ``REFUSED`` the daemon's close is the last one and
its SO_LINGER-0 close reaches the client as a reset.

The link is one ``SOCK_SEQPACKET`` Unix connection: every message is one
record with its descriptor attached to it, so no length framing is needed
and a descriptor can never be matched to the wrong message.  The connector
listens (in its own 0700 runtime directory, socket mode 0600); the daemon
connects, told the path and a random secret in the `NetworkRequest` over its
own 0600 gRPC socket.  Trust, both ways:

* the daemon accepts the listener only if ``SO_PEERCRED`` names the
  connector process that configured the network (its pid, and the daemon's
  owner uid when known): no other process, even one of the same user that
  rebinds the path, is handed the machine's connections;
* the connector accepts a peer only if ``SO_PEERCRED`` says uid 0 or its
  own uid *and* the first message carries the secret: no other local process
  can make the connector dial pods with the user's credentials.

Hand-written: the payload is four tiny fixed messages, and asyncio has no
``recvmsg``/SCM_RIGHTS helper (its streams drop ancillary data), so the
module waits for readiness with ``add_reader``/``add_writer`` and calls
`socket.send_fds`/`socket.recv_fds` itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Union

#: wire version, in HELLO; a mismatch ends the link (the daemon then uses the manager)
VERSION = 1
#: the largest record either side sends (an OFFER with early bytes stays far below)
MAX_RECORD = 64 * 1024

HELLO, READY, OFFER, ANSWER = 1, 2, 3, 4
TAKEN, NOT_MINE, REFUSED = 1, 2, 3
VERDICTS = {TAKEN: "taken", NOT_MINE: "not mine", REFUSED: "refused"}

_HELLO = struct.Struct("!BB")          # type, version; then the secret
_OFFER = struct.Struct("!BIHHBB")      # type, id, dst port, src port, len(dst ip), len(src ip); ips; early bytes
_ANSWER = struct.Struct("!BIB")        # type, id, verdict; then a reason (UTF-8)


class HandoffProtocolError(Exception):
    """A record that does not parse, or a peer that fails the trust checks."""


@dataclass(frozen=True)
class Hello:
    version: int
    secret: bytes


@dataclass(frozen=True)
class Ready:
    pass


@dataclass(frozen=True)
class Offer:
    id: int
    dst: tuple[str, int]
    src: tuple[str, int]
    early: bytes = b""


@dataclass(frozen=True)
class Answer:
    id: int
    verdict: int
    reason: str = ""


Message = Union[Hello, Ready, Offer, Answer]


def encode(msg: Message) -> bytes:
    if isinstance(msg, Hello):
        return _HELLO.pack(HELLO, msg.version) + msg.secret
    if isinstance(msg, Ready):
        return bytes([READY])
    if isinstance(msg, Offer):
        dst = ipaddress.ip_address(msg.dst[0]).packed
        src = ipaddress.ip_address(msg.src[0]).packed
        return _OFFER.pack(OFFER, msg.id, msg.dst[1], msg.src[1], len(dst), len(src)) + dst + src + msg.early
    if isinstance(msg, Answer):
        return _ANSWER.pack(ANSWER, msg.id, msg.verdict) + msg.reason.encode()[:4096]
    raise TypeError(f"not a hand-off message: {msg!r}")


def _ip(raw: bytes) -> str:
    if len(raw) not in (4, 16):
        raise HandoffProtocolError(f"an address of {len(raw)} bytes")
    return str(ipaddress.ip_address(raw))


def decode(rec: bytes) -> Message:
    """One record -> a message; HandoffProtocolError when it does not parse."""
    if not rec:
        raise HandoffProtocolError("an empty record")
    kind = rec[0]
    try:
        if kind == HELLO:
            _, version = _HELLO.unpack_from(rec)
            return Hello(version, rec[_HELLO.size:])
        if kind == READY and len(rec) == 1:
            return Ready()
        if kind == OFFER:
            _, ident, dport, sport, dlen, slen = _OFFER.unpack_from(rec)
            at = _OFFER.size
            if len(rec) < at + dlen + slen:
                raise HandoffProtocolError("a truncated offer")
            dst = _ip(rec[at:at + dlen])
            src = _ip(rec[at + dlen:at + dlen + slen])
            return Offer(ident, (dst, dport), (src, sport), rec[at + dlen + slen:])
        if kind == ANSWER:
            _, ident, verdict = _ANSWER.unpack_from(rec)
            if verdict not in VERDICTS:
                raise HandoffProtocolError(f"an unknown verdict {verdict}")
            return Answer(ident, verdict, rec[_ANSWER.size:].decode("utf-8", "replace"))
    except struct.error:
        raise HandoffProtocolError(f"a short record of type {kind}") from None
    raise HandoffProtocolError(f"an unknown record type {kind}")


def secret_ok(expected: bytes, got: bytes) -> bool:
    """Constant-time comparison; an empty expected secret never matches."""
    return bool(expected) and hmac.compare_digest(expected, got)


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class Link:
    """One SOCK_SEQPACKET connection: whole records, each with the descriptors sent along.

    `recv()` and `send()` may run concurrently (one reader task, any number of
    senders); both wait for readiness on the event loop, never block it.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self.closed = False
        self._send_lock = asyncio.Lock()  # one writer callback per fd: waiting senders queue here

    async def _ready(self, writing: bool) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        fd = self.sock.fileno()
        add, remove = ((self._loop.add_writer, self._loop.remove_writer) if writing
                       else (self._loop.add_reader, self._loop.remove_reader))
        add(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            remove(fd)

    async def send(self, msg: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send one record (OSError when the peer is gone)."""
        data = encode(msg)
        if self.closed:
            raise ConnectionResetError("the hand-off link is closed")
        try:  # the usual case: room in the socket buffer, no lock, no wait
            self._send_now(data, fds)
            return
        except (BlockingIOError, InterruptedError):
            pass
        async with self._send_lock:
            while True:
                await self._ready(writing=True)
                try:
                    self._send_now(data, fds)
                    return
                except (BlockingIOError, InterruptedError):
                    continue

    def _send_now(self, data: bytes, fds: list[int] | tuple[int, ...]) -> None:
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.send(data)

    async def recv(self) -> tuple[Message, list[int]] | None:
        """The next record and the descriptors that came with it; None at the end of the link.

        A descriptor arriving with a record that does not parse is closed before the error."""
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, MAX_RECORD, 1)
                break
            except (BlockingIOError, InterruptedError):
                await self._ready(writing=False)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            close_fds(fds)
            raise HandoffProtocolError("a record too large, or too many descriptors with it")
        if not data and not fds:
            return None
        try:
            return decode(data), fds
        except HandoffProtocolError:
            close_fds(fds)
            raise

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.close()


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
