"""The connector's agent links: intercepted connections without the traffic-manager (issue 15).

For each ACTIVE intercept of this session and each agent pod serving it, the
manager's intercept list carries that pod's link port and the key of the
(intercept, pod) pair (`InterceptInfo.links`).  We keep one port-forward
(connector/spdy.py `open_stream`, authorized by the API server as
`pods/portforward` on the workload's namespace) to each of those ports while
the intercept lives, authenticate as common/linkframes.py describes, and the
agent then pushes every connection it accepts for the intercept over it: an
`open` frame, the client's bytes behind it, no round trip.  We dial the local
app and join the socket to the link channel by callbacks (linkframes.Splice:
no task wake-up per message; measured on the dev cluster, forward.py's
task-based `bridge` over the same link cost ~0.35 ms more per small request).

Why a long-lived port-forward and not one per connection: a new port-forward is
a TLS connection and an upgrade through the API server (several ms); one link
makes a new intercepted connection cost two frames.  Why one per pod: each pod's
agent accepts its own clients, and a port-forward reaches exactly one pod.

A link that breaks is re-opened (back-off up to 5 s); one that is not allowed
(RBAC) is retried once a minute.  Meanwhile the agent sends its connections
through the manager as before (session.py `_answer_dial`), so the choice never
loses a connection; `data_path()` says which path carried how many, for
`tpnb status` and the log.

Which way to the pod: where the agent offers it (`AgentLink.upgrade`) and the
user may `get pods/proxy`, an HTTP upgrade through the API server's pods/proxy
(connector/podproxy.py: the API server splices it to the pod IP, skipping the
kubelet and the container runtime; 4x the bulk throughput on the dev cluster);
else the port-forward.  A pods/proxy attempt that fails before the link is up
(RBAC, an older agent, a NetworkPolicy between the API server and the pod)
falls back to the port-forward in the same attempt and is not tried again for
that pod for `PROXY_RETRY` seconds, so the fallback costs one round trip.
`agent.link: port-forward` skips pods/proxy.

The link protocol runs on the SPDY stream itself (`SpdyStream.attach`): frames are
parsed where TLS decrypted them, with no socketpair and pump tasks in between
(those cost two syscalls, two copies and, upward, a task wake-up per chunk).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from tpnb import config as tpnb_config
from tpnb.common import linkframes as lf
from tpnb.common.aio import oserror_text
from tpnb.errors import PermissionDenied, TpnbError
from tpnb.proto import pb

log = logging.getLogger("tpnb.connector.agentlink")

#: seconds for the port-forward and the handshake of one link
HANDSHAKE_TIMEOUT = 10.0
#: how long to wait for a link before re-trying after a failure (doubling up to the max)
MIN_BACKOFF, MAX_BACKOFF = 0.1, 5.0  # the first retry soon: an agent may take its instructions a moment later
#: how long a link that RBAC refused waits before it tries again
DENIED_BACKOFF = 60.0
#: a link silent this long (the agent pings every 10 s) is dropped
DEAD_AFTER = 35.0
#: local dial timeout for an intercepted connection
LOCAL_DIAL_TIMEOUT = 5.0
#: after pods/proxy failed for a pod, how long its link uses the port-forward before trying again
PROXY_RETRY = 60.0
#: the ways a link reaches its agent (shown by `tpnb status`)
VIA_PROXY, VIA_PORTFORWARD = "pods/proxy", "port-forward"


@dataclass
class InterceptStats:
    """What carried one intercept's connections (shown by `tpnb status`)."""

    via_link: int = 0
    via_manager: int = 0
    failed_local: int = 0
    notes: dict[str, str] = field(default_factory=dict)  # pod -> why its link is down


class _ConnectorSide(lf.Link):
    """Our end of one link: answers the agent's nonce, checks its proof, then serves its `open`s."""

    def __init__(self, owner: AgentLinks, ic: pb.InterceptInfo, link: pb.AgentLink) -> None:
        super().__init__(on_open=self._on_open, on_control=self._control, name=f"agent link {link.pod_name}")
        self.owner = owner
        self.ic_id = ic.id
        self.target_host = ic.spec.target_host or "127.0.0.1"
        self.target_port = ic.spec.local_port
        self.secret = bytes(link.secret)
        self.agent_nonce = b""
        self.client_nonce = os.urandom(lf.NONCE)
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.tasks: set[asyncio.Task[None]] = set()

    def _control(self, kind: int, payload: bytes) -> None:
        if kind == lf.HELLO and not self.agent_nonce:
            self.agent_nonce = lf.parse_hello(payload)
            self.write(lf.frame(lf.AUTH, 0, lf.auth_payload(self.secret, self.agent_nonce, self.ic_id,
                                                            self.client_nonce)))
        elif kind == lf.WELCOME and self.agent_nonce and not self.authenticated:
            want = lf.agent_proof(self.secret, self.agent_nonce, self.client_nonce, self.ic_id)
            if not hmac.compare_digest(want, payload):
                raise lf.LinkError("the agent did not prove it holds the key")
            self.authenticated = True
            if not self.ready.done():
                self.ready.set_result(None)
        else:
            raise lf.LinkError(f"unexpected {lf.KIND_NAMES.get(kind, kind)} frame during the handshake")

    def _on_open(self, ch: lf.LinkChannel, ip: str, port: int) -> None:
        task = asyncio.ensure_future(self._serve(ch, ip, port))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, ch: lf.LinkChannel, ip: str, port: int) -> None:
        stats = self.owner.stats_for(self.ic_id)
        stats.via_link += 1
        sp = lf.Splice(ch)  # frames queue in `ch` until the dial completes, then go out in order
        try:
            async with asyncio.timeout(LOCAL_DIAL_TIMEOUT):
                await self.loop.create_connection(lambda: sp, self.target_host, self.target_port)
        except (OSError, TimeoutError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else oserror_text(exc)
            stats.failed_local += 1
            log.warning("intercept %s: cannot reach %s:%d: %s", self.ic_id, self.target_host, self.target_port, why)
            ch.reset(f"local {self.target_host}:{self.target_port}: {why}")
            return
        try:
            await sp.done
        except asyncio.CancelledError:
            sp.abort()
            ch.reset("the link ends")
            raise
        if sp.error:
            log.debug("intercepted connection from %s:%d ended: %s", ip, port, sp.error)

    def _lose(self, why: str) -> None:
        super()._lose(why)
        if not self.ready.done():
            self.ready.set_exception(lf.LinkError(why))
            self.ready.exception()  # retrieved: a link that failed early is reported by its runner


class AgentLinks:
    """All links of one session; `update` follows the session's intercept list."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.runners: dict[tuple[str, str], tuple[bytes, asyncio.Task[None]]] = {}
        self.live: dict[tuple[str, str], _ConnectorSide] = {}
        self.stats: dict[str, InterceptStats] = {}
        #: links RBAC refused (no point in waiting for them)
        self.denied: set[tuple[str, str]] = set()
        #: which way each live link took (VIA_PROXY / VIA_PORTFORWARD)
        self.via: dict[tuple[str, str], str] = {}
        #: pods/proxy failed for these links: (when to try it again, why)
        self.no_proxy: dict[tuple[str, str], tuple[float, str]] = {}
        self._changed = asyncio.Event()

    def stats_for(self, ic_id: str) -> InterceptStats:
        return self.stats.setdefault(ic_id, InterceptStats())

    def enabled(self) -> bool:
        return tpnb_config.get().agent.link != "never"

    def update(self, intercepts: list[pb.InterceptInfo]) -> None:
        """Start links for the pods of our ACTIVE intercepts, stop those no longer wanted."""
        want: dict[tuple[str, str], tuple[pb.InterceptInfo, pb.AgentLink]] = {}
        if self.enabled():
            for ic in intercepts:
                if ic.state != pb.InterceptInfo.ACTIVE or not ic.id:
                    continue
                for link in ic.links:
                    if link.port and link.secret:
                        want[(ic.id, link.pod_name)] = (ic, link)
        for key, (secret, task) in list(self.runners.items()):
            if key not in want or bytes(want[key][1].secret) != secret:
                task.cancel()
                del self.runners[key]
                self.denied.discard(key)
                self.no_proxy.pop(key, None)
        for key, (ic, link) in want.items():
            if key not in self.runners:
                task = asyncio.ensure_future(self._run(key, ic, link))
                self.runners[key] = (bytes(link.secret), task)
        for ic_id in list(self.stats):
            if not any(k[0] == ic_id for k in want) and ic_id not in {ic.id for ic in intercepts}:
                del self.stats[ic_id]

    async def wait_up(self, ic_id: str, timeout: float) -> bool:
        """Until every wanted link of `ic_id` is up (True), or `timeout` (False): the first requests
        after `tpnb intercept` returns then take the link."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            keys = [k for k in self.runners if k[0] == ic_id]
            if keys and all(k in self.live for k in keys):
                return True
            if keys and all(k in self.denied for k in keys):
                return False
            left = deadline - loop.time()
            if left <= 0 or not keys:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):
                    await self._changed.wait()

    def data_path(self, ic_id: str) -> str:
        """One line for `tpnb status`: which path carries this intercept's connections."""
        keys = [k for k in self.runners if k[0] == ic_id]
        up = sum(1 for k in keys if k in self.live)
        st = self.stats.get(ic_id, InterceptStats())
        counts = f"connections: {st.via_link} via agent links, {st.via_manager} via the traffic-manager"
        if not self.enabled():
            return f"traffic-manager (agent.link: never); {counts}"
        if not keys:
            return f"traffic-manager (no agent link offered); {counts}"
        notes = "; ".join(f"{pod}: {why}" for pod, why in sorted(st.notes.items()) if (ic_id, pod) not in self.live)
        ways = sorted({self.via[k] for k in keys if k in self.live and k in self.via})
        fallback = sorted({f"{k[1]}: pods/proxy {why}" for k in keys
                           if self.via.get(k) == VIA_PORTFORWARD and (why := self.no_proxy.get(k, (0, ""))[1])})
        if fallback:
            notes = "; ".join(filter(None, [notes, *fallback]))
        head = (f"agent link ({up}/{len(keys)} pods, {' + '.join(ways)})" if up
                else "traffic-manager (agent links down)")
        return f"{head}; {counts}" + (f"; {notes}" if notes else "")

    def count_manager(self, ic_id: str) -> None:
        self.stats_for(ic_id).via_manager += 1

    async def _run(self, key: tuple[str, str], ic: pb.InterceptInfo, link: pb.AgentLink) -> None:
        """Keep one link up while it is wanted."""
        backoff = MIN_BACKOFF
        stats = self.stats_for(ic.id)
        while True:
            try:
                await self._once(key, ic, link)
                backoff = MIN_BACKOFF  # it was up: come back quickly
                why = "the link ended"
            except asyncio.CancelledError:
                raise
            except PermissionDenied as exc:
                why = f"not allowed ({exc.what}); using the traffic-manager"
                backoff = DENIED_BACKOFF
                self.denied.add(key)
                self._changed.set()
            except (TpnbError, lf.LinkError, OSError, TimeoutError) as exc:
                why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            except Exception as exc:  # noqa: BLE001 - e.g. SpdyUnsupported: the manager path stays
                why = f"{type(exc).__name__}: {exc}"
                backoff = DENIED_BACKOFF
            stats.notes[link.pod_name] = why
            log.info("agent link to %s for intercept %s: %s; retrying in %.1fs", link.pod_name, ic.id, why, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max(backoff, MAX_BACKOFF))

    def _proxy_wanted(self, key: tuple[str, str], link: pb.AgentLink) -> bool:
        if not link.upgrade or tpnb_config.get().agent.link == "port-forward":
            return False
        until = self.no_proxy.get(key)
        return until is None or asyncio.get_running_loop().time() >= until[0]

    async def _once(self, key: tuple[str, str], ic: pb.InterceptInfo, link: pb.AgentLink) -> None:
        """One link's life: pods/proxy first where offered, the port-forward when that fails."""
        if self._proxy_wanted(key, link):
            from .podproxy import ProxyUnavailable

            try:
                await self._once_via(key, ic, link, VIA_PROXY)
                return
            except asyncio.CancelledError:
                raise
            except (PermissionDenied, ProxyUnavailable, TpnbError, lf.LinkError, OSError, TimeoutError) as exc:
                if key in self.via:  # it was up: just come back (pods/proxy again)
                    raise
                why = (f"not allowed ({exc.what})" if isinstance(exc, PermissionDenied)
                       else str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self.no_proxy[key] = (asyncio.get_running_loop().time() + PROXY_RETRY, why)
                log.info("agent link to %s for intercept %s: pods/proxy: %s; using a port-forward",
                         link.pod_name, ic.id, why)
        await self._once_via(key, ic, link, VIA_PORTFORWARD)

    async def _once_via(self, key: tuple[str, str], ic: pb.InterceptInfo, link: pb.AgentLink, via: str) -> None:
        target = self.session.target
        if target is None:
            raise OSError("not connected")
        ns = ic.spec.namespace
        self.via.pop(key, None)
        stream: Any
        if via == VIA_PROXY:
            from .podproxy import open_link

            stream, early = await open_link(target, ns, link.pod_name, link.port), []
        else:
            from .portforward import portforward_path
            from .spdy import open_stream

            stream, early = await open_stream(target, ns, link.pod_name, link.port,
                                              portforward_path(ns, link.pod_name))
        side = _ConnectorSide(self, ic, link)
        loop = asyncio.get_running_loop()
        ended = stream.attach(side, early)  # the link protocol runs on the connection itself (no socketpair)
        try:
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    await asyncio.wait([side.ready, ended], return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError:
                raise lf.LinkError("no handshake in time") from None
            if not side.ready.done() or side.ready.exception() is not None:
                raise lf.LinkError(stream.error.strip() or side.lost or "the link closed during the handshake")
            self.live[key] = side
            self.via[key] = via
            if via == VIA_PROXY:
                self.no_proxy.pop(key, None)
            self.denied.discard(key)
            self.stats_for(ic.id).notes.pop(link.pod_name, None)
            self._changed.set()
            log.info("agent link to %s/%s up for intercept %s (%s)", ns, link.pod_name, ic.id, via)
            while not side.lost and not ended.done():
                await asyncio.wait([side.closed, ended], timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
                if loop.time() - side.last_heard > DEAD_AFTER:
                    side.abort("the agent stopped answering")
            log.info("agent link to %s/%s down: %s", ns, link.pod_name, side.lost or stream.error or "stream ended")
        finally:
            if self.live.get(key) is side:
                del self.live[key]
                if via == VIA_PORTFORWARD:
                    self.via.pop(key, None)  # the next attempt may try pods/proxy again
            self._changed.set()
            side.abort(side.lost or "link closed")
            for t in list(side.tasks):
                t.cancel()
            await asyncio.gather(*side.tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def aclose(self) -> None:
        tasks = [t for _, t in self.runners.values()]
        self.runners.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
