"""The traffic-agent's link port: intercepted connections straight to the connector (issue 15).

Through the manager, every intercepted connection costs a Tunnel RPC to the
manager and one from the manager to the connector: two grpc.aio endpoints,
whose thread hops were most of the 1.45 ms an intercepted small request took.
When the intercepting user may port-forward to the workload's pods, the
connector (connector/agentlink.py) keeps one port-forward to this port per
agent pod, and every connection the agent accepts for that intercept goes
over it as a `common/linkframes.py` channel: the agent writes `open` and the
client's bytes at once, the connector dials the local app.

Who may use it: the port listens on the pod's loopback only (like the file
service), so from the pod network it is not reachable at all; the way in is a
port-forward the API server authorized (or the pod's own containers).  Even
so a caller must prove, before anything is sent to it, that it holds the key
the manager gave this intercept's session for this pod (HMAC over our nonce,
compared in constant time, `linkframes.check_auth`); a failure is closed with
nothing said.  An authenticated link carries only the connections of the
intercept it authenticated for, and is closed when that intercept ends here.

When no link is up (not allowed, broken, an older connector) the agent uses
the manager's tunnel exactly as before: `channel_for` returns None.

The faster way in (issue 15's intercepted bulk): the same port also listens on
the pod IP for the connector's HTTP upgrade through the API server's
`pods/NAME:PORT/proxy/` (`_UpgradeSide`).  The API server splices that
connection straight to the pod: no kubelet, no container runtime, no SPDY, one
TLS leg; measured on the dev cluster it moved 4x the bytes of a port-forward
for half the API server's CPU.  This listener *is* reachable from every pod,
so it relies on the handshake alone, which is the same as on loopback: until
the caller proved it holds the (intercept, pod) key, it has been sent our
nonce and nothing else, and a wrong or missing proof, a request that is not
our upgrade, a head over 8 KB or silence for `AUTH_TIMEOUT` closes it.  The
leg from the API server to the pod is plain TCP inside the cluster network,
like the intercepted app's own traffic on it.

Runs inside the cluster image: Python 3.11 and stdlib only.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any, Callable

from tpnb.common import linkframes as lf

log = logging.getLogger("tpnb.agent.link")

#: seconds a caller has to authenticate
AUTH_TIMEOUT = 5.0
#: connections that have not authenticated yet, at most (more are closed at once)
MAX_UNAUTHENTICATED = 16
#: keep-alive: a ping this often, and a link silent for `DEAD_AFTER` is dropped
PING_INTERVAL = 10.0
DEAD_AFTER = 35.0


class _AgentSide(lf.Link):
    """The agent's end of one link: sends the nonce, checks the AUTH, proves itself back."""

    def __init__(self, server: AgentLinks) -> None:
        super().__init__(on_control=self._control, name="agent link")
        self.server = server
        self.nonce = os.urandom(lf.NONCE)
        self.intercept_id = ""
        self.peer = ""
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        if len(self.server.pending) >= MAX_UNAUTHENTICATED:
            log.warning("link from %s refused: %d connections are authenticating", self.peer, len(self.server.pending))
            self.abort("too many unauthenticated links")
            return
        self.server.pending.add(self)
        self._timer = self.loop.call_later(AUTH_TIMEOUT, self._auth_timeout)
        self._greet()

    def _greet(self) -> None:
        self.write(self._hello())

    def _hello(self) -> bytes:
        return lf.frame(lf.HELLO, 0, lf.hello_payload(self.nonce))

    def _auth_timeout(self) -> None:
        if not self.authenticated:
            log.info("link from %s did not authenticate in %.0fs; closed", self.peer, AUTH_TIMEOUT)
            self.abort("no authentication in time")

    def _control(self, kind: int, payload: bytes) -> None:
        if self.authenticated or kind != lf.AUTH:
            raise lf.LinkError(f"unexpected {lf.KIND_NAMES.get(kind, kind)} frame")
        try:
            iid, secret, cnonce = lf.check_auth(payload, self.nonce, self.server.secret_for)
        except lf.LinkError as exc:
            log.warning("link from %s refused: %s", self.peer, exc)
            self.abort(str(exc))  # nothing is sent back: the caller learns only that it failed
            return
        self.authenticated = True
        self.intercept_id = iid
        self.name = f"agent link for intercept {iid}"
        self.server.pending.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        self.write(lf.frame(lf.WELCOME, 0, lf.agent_proof(secret, self.nonce, cnonce, iid)))
        self.server.add(self)

    def _lose(self, why: str) -> None:
        first = not self.lost
        super()._lose(why)
        if first:
            if self._timer is not None:
                self._timer.cancel()
            self.server.pending.discard(self)
            self.server.remove(self)


class _UpgradeSide(_AgentSide):
    """A link from the pod network: the API server's proxied upgrade request first, then the handshake.

    The request head is read into the link's own buffer; once it is complete and asks for our
    upgrade, `101` and HELLO go out in one write and the link parses frames from right behind the
    head.  The caller's time to authenticate (`AUTH_TIMEOUT`) runs from the TCP accept."""

    def __init__(self, server: AgentLinks) -> None:
        super().__init__(server)
        self._in_head = True

    def _greet(self) -> None:
        pass  # HELLO follows the 101

    def buffer_updated(self, nbytes: int) -> None:
        if not self._in_head:
            super().buffer_updated(nbytes)
            return
        self._end += nbytes
        i = self._buf.find(b"\r\n\r\n", self._start, self._end)
        if i < 0:
            if self._end - self._start > lf.MAX_UPGRADE_HEAD:
                log.warning("link from %s refused: request head over %d bytes", self.peer, lf.MAX_UPGRADE_HEAD)
                self.abort("request head too long")
            return
        head = bytes(self._mv[self._start:i])
        if i - self._start > lf.MAX_UPGRADE_HEAD or not lf.upgrade_request_ok(head):
            log.warning("link from %s refused: not a %s upgrade request", self.peer, lf.UPGRADE_TOKEN)
            self.abort("not a link upgrade request")  # nothing is sent back
            return
        self._in_head = False
        self._start = i + 4
        self.name = "agent link (pods/proxy)"
        self.write(lf.UPGRADE_RESPONSE + self._hello())
        super().buffer_updated(0)  # frames right behind the head (a caller should wait for HELLO)


class AgentLinks:
    """The link listener and the authenticated links, by intercept id."""

    def __init__(self, intercepts: Callable[[], list[Any]]) -> None:
        #: the agent's current instructions (pb.InterceptInfo list with `link_secret`)
        self._intercepts = intercepts
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        #: the pod-IP listener for upgrades through pods/proxy (None: not offered)
        self.upgrade_server: asyncio.AbstractServer | None = None
        self.pending: set[_AgentSide] = set()
        self.links: dict[str, list[_AgentSide]] = {}
        self._ping: asyncio.Task[None] | None = None
        #: connections sent over links (for logs)
        self.opened = 0

    @property
    def upgrade(self) -> bool:
        """Whether links through pods/proxy are offered (the pod-IP listener is up)."""
        return self.upgrade_server is not None

    async def start(self, port: int, pod_ip: str = "") -> None:
        """Listen on the pod's loopback and, for pods/proxy upgrades, on `pod_ip`; a port in use
        means no link (the manager path stays), a pod IP we cannot bind means port-forward only."""
        if not port:
            return
        loop = asyncio.get_running_loop()
        try:
            self.server = await loop.create_server(lambda: _AgentSide(self), "127.0.0.1", port,
                                                   reuse_address=True, backlog=64)
        except OSError as exc:
            log.warning("agent link port 127.0.0.1:%d: %s; intercepts go through the manager only", port, exc)
            return
        self.port = port
        self._ping = asyncio.ensure_future(self._ping_loop())
        log.info("agent link on 127.0.0.1:%d (port-forward from the intercepting session)", port)
        if pod_ip and pod_ip not in ("127.0.0.1", "::1"):
            try:
                self.upgrade_server = await loop.create_server(lambda: _UpgradeSide(self), pod_ip, port,
                                                               reuse_address=True, backlog=64)
            except OSError as exc:
                log.warning("agent link on %s:%d: %s; links only through port-forward", pod_ip, port, exc)
            else:
                log.info("agent link on %s:%d (upgrades through the API server's pods/proxy)", pod_ip, port)

    def secret_for(self, intercept_id: str) -> bytes | None:
        for ic in self._intercepts():
            if ic.id == intercept_id and ic.link_secret:
                return bytes(ic.link_secret)
        return None

    def add(self, link: _AgentSide) -> None:
        self.links.setdefault(link.intercept_id, []).append(link)
        log.info("agent link from %s up for intercept %s (%d link(s))", link.peer, link.intercept_id,
                 len(self.links[link.intercept_id]))

    def remove(self, link: _AgentSide) -> None:
        lst = self.links.get(link.intercept_id)
        if lst and link in lst:
            lst.remove(link)
            log.info("agent link for intercept %s down: %s", link.intercept_id, link.lost)
            if not lst:
                del self.links[link.intercept_id]

    def channel_for(self, intercept_id: str, peer: tuple[Any, ...]) -> lf.LinkChannel | None:
        """A new channel on the newest live link of this intercept; None: use the manager."""
        for link in reversed(self.links.get(intercept_id, [])):
            if not link.lost:
                self.opened += 1
                return link.open_channel(peer)
        return None

    async def splice(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ch: lf.LinkChannel) -> None:
        """Serve an accepted connection over `ch` with callbacks (linkframes.Splice): its transport
        leaves the StreamReader, taking along what the reader had buffered."""
        sp = lf.Splice(ch)
        # the reader's unread bytes and end-of-stream (no public API hands them over without a wait)
        buf = getattr(reader, "_buffer", None)
        buffered = bytes(buf) if buf else b""
        if buf:
            buf.clear()
        eof = bool(getattr(reader, "_eof", False))
        sp.take_over(writer.transport, buffered, eof)  # type: ignore[arg-type]
        try:
            await sp.done
        except asyncio.CancelledError:
            sp.abort()
            ch.reset("the agent stops")
            raise

    def update(self, intercepts: list[Any]) -> None:
        """New instructions: links of intercepts that ended here (or whose key changed) are closed."""
        keys = {ic.id: bytes(ic.link_secret) for ic in intercepts if ic.link_secret}
        for iid, lst in list(self.links.items()):
            if iid not in keys:
                for link in list(lst):
                    link.close("the intercept ended")

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL)
            now = asyncio.get_running_loop().time()
            for lst in list(self.links.values()):
                for link in list(lst):
                    if now - link.last_heard > DEAD_AFTER:
                        link.abort("no answer to pings")
                    else:
                        link.write(lf.frame(lf.PING, 0, b"p"))

    async def stop(self) -> None:
        for srv in (self.server, self.upgrade_server):
            if srv is not None:
                srv.close()
        if self._ping is not None:
            self._ping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ping
        for lst in list(self.links.values()):
            for link in list(lst):
                link.close("the agent stops")
