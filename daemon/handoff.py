"""The root daemon's end of the hand-off link: offer redirected TCP connections to the connector.

See common/handoff.py for the protocol and the trust rules.  The daemon dials
the socket its connector named in `NetworkRequest.handoff_socket`, checks that
the listener is that connector process (SO_PEERCRED pid, and uid when the
daemon knows its owner), proves itself with the request's secret, and from
then on `offer()`s each accepted connection.  Anything wrong with the link
(not up yet, broken, a peer that fails the checks) makes `offer()` answer
NOT_MINE at once for new connections, so they take the manager tunnels as
before the direct plane existed; connections offered when the link broke are
reset (the connector may have died holding them).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

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
)
from tpnb.proto import pb

log = logging.getLogger("tpnb.daemon.handoff")

#: how long the connector may take to answer an offer (its dial has its own 10 s timeout)
ANSWER_TIMEOUT = 15.0
#: how long connecting + authenticating may take
LINK_TIMEOUT = 5.0
#: a link that failed is tried again after this many seconds (bounded: the network's life)
RETRY_SECONDS = 2.0

#: a verdict of our own: the link broke before the connector answered
LOST = 0


class HandoffClient:
    """The daemon's link to one connector's hand-off socket, kept up while the network is.

    `expect_pid`: the connector process that configured the network; `expect_uid`:
    the daemon's owner (None: not known, e.g. started by hand as root).
    """

    def __init__(self, path: str, secret: bytes, expect_pid: int, expect_uid: int | None) -> None:
        self.path = path
        self.secret = secret
        self.expect_pid = expect_pid
        self.expect_uid = expect_uid
        self.link: Link | None = None
        self.note = "connecting"
        self._pending: dict[int, asyncio.Future[tuple[int, str]]] = {}
        self._next_id = 0
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.counts = {"offered": 0, "taken": 0, "not_mine": 0, "refused": 0, "lost": 0}

    @property
    def ready(self) -> bool:
        return self.link is not None and not self.link.closed

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"handoff link {self.path}")

    def status(self) -> pb.HandoffStatus:
        return pb.HandoffStatus(linked=self.ready, note="" if self.ready else self.note, **self.counts)

    # ------------------------------------------------------------ the link
    async def connect(self) -> Link:
        """Connect and authenticate both ways; raises HandoffProtocolError / OSError."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(LINK_TIMEOUT):
                await asyncio.get_running_loop().sock_connect(sock, self.path)
                pid, uid, _ = peer_cred(sock)
                if pid != self.expect_pid:
                    raise HandoffProtocolError(f"{self.path} is served by process {pid}, "
                                               f"not by the connector {self.expect_pid}")
                if self.expect_uid is not None and uid != self.expect_uid:
                    raise HandoffProtocolError(f"{self.path} is served by uid {uid}, not by uid {self.expect_uid}")
                link = Link(sock)
                await link.send(Hello(VERSION, self.secret))
                got = await link.recv()
                if got is None or not isinstance(got[0], Ready):
                    if got is not None:
                        close_fds(got[1])
                    raise HandoffProtocolError("the connector did not accept the hand-off link")
        except BaseException:
            sock.close()
            raise
        return link

    async def _run(self) -> None:
        """Keep the link up: connect, read answers until it ends, fail what was pending, retry."""
        while not self._closed:
            try:
                self.link = await self.connect()
            except (OSError, HandoffProtocolError, TimeoutError) as exc:
                self.note = f"cannot link to the connector's hand-off socket: {exc}"
                log.info("%s; new connections use the manager tunnels", self.note)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            self.note = ""
            log.info("hand-off link to the connector (pid %d) is up: redirected TCP is offered to its "
                     "direct data plane", self.expect_pid)
            try:
                await self._read_answers(self.link)
            except (OSError, HandoffProtocolError) as exc:
                self.note = f"the hand-off link failed: {exc}"
            else:
                self.note = "the connector closed the hand-off link"
            finally:
                self.link.close()
                self.link = None
                self._fail_pending()
            log.warning("%s; new connections use the manager tunnels", self.note)
            await asyncio.sleep(RETRY_SECONDS)

    async def _read_answers(self, link: Link) -> None:
        while True:
            got = await link.recv()
            if got is None:
                return
            msg, fds = got
            close_fds(fds)  # the connector never sends descriptors
            if not isinstance(msg, Answer):
                raise HandoffProtocolError(f"unexpected {type(msg).__name__} from the connector")
            fut = self._pending.pop(msg.id, None)
            if fut is not None and not fut.done():
                fut.set_result((msg.verdict, msg.reason))

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_result((LOST, "the hand-off link broke before the connector answered"))

    # ------------------------------------------------------------ offers
    async def offer(self, sock: socket.socket, dst: tuple[str, int], src: tuple[str, int]) -> tuple[int, str]:
        """Offer one accepted connection; (verdict, reason).

        TAKEN: the connector relays it (close our copy, nothing else); NOT_MINE: carry it
        through the manager; REFUSED or LOST: reset the client.
        """
        link = self.link
        if link is None or link.closed:
            return NOT_MINE, self.note or "no hand-off link"
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        ident = self._next_id
        fut: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = fut
        self.counts["offered"] += 1
        try:
            await link.send(Offer(ident, dst, src), [sock.fileno()])
        except OSError as exc:
            # nothing reached the connector: the manager can still carry this one
            self._pending.pop(ident, None)
            self.counts["not_mine"] += 1
            return NOT_MINE, f"hand-off failed: {exc}"
        try:
            verdict, reason = await asyncio.wait_for(fut, ANSWER_TIMEOUT)
        except TimeoutError:
            self._pending.pop(ident, None)
            verdict, reason = LOST, f"the connector did not answer within {ANSWER_TIMEOUT:.0f} s"
        finally:
            self._pending.pop(ident, None)
        key = {TAKEN: "taken", NOT_MINE: "not_mine", REFUSED: "refused"}.get(verdict, "lost")
        self.counts[key] += 1
        return verdict, reason

    async def aclose(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.link is not None:
            self.link.close()
            self.link = None
        self._fail_pending()
