"""The connector's end of the hand-off link: take the root daemon's redirected TCP connections.

See common/handoff.py for the protocol and the trust rules.  The connector
listens on a SOCK_SEQPACKET socket in its own runtime directory and tells the
daemon the path and a fresh random secret in its `NetworkRequest`.  Each
offered connection is dialled through the direct data plane
(`DirectPlane.dial`); the answer goes back at once and the relay runs here,
owned by this object and cancelled when it closes.

A socket file left by a connector killed with -9 is named after its pid and
removed by the next connector that finds that pid gone.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Awaitable, Callable, Protocol

from tpnb.common.handoff import (
    NOT_MINE,
    REFUSED,
    TAKEN,
    VERSION,
    Answer,
    HandoffProtocolError,
    Hello,
    Link,
    Offer,
    Ready,
    close_fds,
    peer_cred,
    secret_ok,
)
from tpnb.common.liveness import process_alive

log = logging.getLogger("tpnb.connector.handoff")

#: how long a peer has to send its HELLO
HELLO_TIMEOUT = 5.0


class Relay(Protocol):
    """What `DirectPlane.dial` returns (connector/direct.py `DirectConn`)."""

    async def relay(self, sock: socket.socket, early: bytes = b"") -> None: ...


#: (ip, port) -> a relay, None (not for the direct plane), or raises `refused` exceptions
Dial = Callable[[str, int], Awaitable[Relay | None]]


class HandoffServer:
    """Listens for the root daemon and relays the connections it hands over.

    `dial`: the direct plane's dial; `refused`: the exception types meaning "the pod side
    refused" (answered REFUSED: the daemon resets the client); `directory`: where the
    socket goes (the connector's own 0700 runtime directory).
    """

    def __init__(self, dial: Dial, refused: tuple[type[BaseException], ...], directory: Path) -> None:
        self.dial = dial
        self.refused = refused
        self.path = directory / f"handoff-{os.getpid()}.sock"
        self.secret = os.urandom(32)
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._links: set[Link] = set()
        self.counts = {"offered": 0, "taken": 0, "not_mine": 0, "refused": 0, "rejected_peers": 0}

    @property
    def linked(self) -> bool:
        return bool(self._links)

    async def start(self) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _remove_stale(directory)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            old = os.umask(0o177)  # born 0600: no window in which another user could connect
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            sock.listen(8)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self._spawn(self._accept_loop(sock), "handoff accept")
        log.info("hand-off socket %s is listening for the root daemon", self.path)

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        for link in list(self._links):
            link.close()
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=3.0)

    # ------------------------------------------------------------ links
    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:
                log.warning("hand-off socket: accept failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            self._spawn(self._serve_link(conn), "handoff link")

    def admit(self, sock: socket.socket) -> str:
        """Why this peer may not hand us connections ("" when it may): uid 0 (the root
        daemon) or our own uid (a daemon the user runs unprivileged, tests)."""
        pid, uid, _ = peer_cred(sock)
        if uid not in (0, os.getuid()):
            return f"process {pid} of uid {uid} is neither root nor this user"
        return ""

    async def _serve_link(self, sock: socket.socket) -> None:
        link = Link(sock)
        try:
            why = self.admit(sock)
            if not why:
                try:
                    async with asyncio.timeout(HELLO_TIMEOUT):
                        got = await link.recv()
                except TimeoutError:
                    got, why = None, "no hello"
                if got is not None:
                    close_fds(got[1])
                    msg = got[0]
                    if not isinstance(msg, Hello) or not secret_ok(self.secret, msg.secret):
                        why = "the first message did not carry this session's secret"
                    elif msg.version != VERSION:
                        why = f"hand-off version {msg.version}, this connector speaks {VERSION}"
                elif not why:
                    why = "closed before its hello"
            if why:
                self.counts["rejected_peers"] += 1
                log.warning("hand-off link refused: %s", why)
                return
            await link.send(Ready())
            self._links.add(link)
            log.info("the root daemon linked for hand-off")
            while True:
                got = await link.recv()
                if got is None:
                    log.info("the root daemon closed the hand-off link")
                    return
                msg, fds = got
                if not isinstance(msg, Offer) or len(fds) != 1:
                    close_fds(fds)
                    raise HandoffProtocolError(f"unexpected {type(msg).__name__} with {len(fds)} descriptors")
                self.counts["offered"] += 1
                self._spawn(self._take(link, msg, fds[0]), f"handoff {msg.dst[0]}:{msg.dst[1]}")
        except (OSError, HandoffProtocolError) as exc:
            log.warning("hand-off link ended: %s", exc)
        finally:
            self._links.discard(link)
            link.close()

    async def _take(self, link: Link, offer: Offer, fd: int) -> None:
        """Dial the offered connection's destination directly; answer; relay when taken."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            close_fds([fd])
            await self._answer(link, offer, NOT_MINE, f"bad descriptor: {exc}")
            return
        ip, port = offer.dst
        try:
            conn = await self.dial(ip, port)
        except self.refused as exc:
            sock.close()  # before answering: the daemon's close is then the last, and resets
            await self._answer(link, offer, REFUSED, str(exc) or "refused")
            return
        except Exception as exc:  # noqa: BLE001 - the manager may still reach it
            log.warning("direct dial %s:%d failed: %s", ip, port, exc)
            conn = None
        except BaseException:
            sock.close()
            raise
        if conn is None:
            sock.close()
            await self._answer(link, offer, NOT_MINE, "")
            return
        if not await self._answer(link, offer, TAKEN, ""):
            # the daemon may be gone: it can no longer tell the client anything, so we carry on
            log.debug("hand-off answer for %s:%d not delivered; relaying anyway", ip, port)
        await conn.relay(sock, offer.early)

    async def _answer(self, link: Link, offer: Offer, verdict: int, reason: str) -> bool:
        key = {TAKEN: "taken", NOT_MINE: "not_mine", REFUSED: "refused"}[verdict]
        self.counts[key] += 1
        try:
            await link.send(Answer(offer.id, verdict, reason))
            return True
        except OSError:
            return False


def _remove_stale(directory: Path) -> None:
    """Remove hand-off sockets of connectors that are gone (killed with -9)."""
    for p in directory.glob("handoff-*.sock"):
        pid = p.stem.removeprefix("handoff-")
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            with contextlib.suppress(OSError):
                p.unlink()
