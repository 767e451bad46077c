"""Wiretaps, the connector's side: set one up, relay its copies to the face, remove it.

A wiretap lives exactly as long as the face's `Connector.Wiretap` call: the
call streams progress, then `started`, then a `record` per exchange the app
served (and `stats` every few seconds); when it ends -- Ctrl-C in the CLI,
`%tp wiretap --stop`, a kernel that died (its socket closes), or `tpnb leave
NAME` from anywhere -- the wiretap is removed at the manager and the agents
stop copying.  Set-up is an intercept's (inject the agent with the user's
credentials, wait for the Service to route to it), so a wiretap shares the
agent with intercepts of any session.

The relay holds at most `buffer` records for a face that reads slowly; beyond
that it drops and counts, like the manager and the agents before it, so no hop
ever waits for the laptop.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import AsyncIterator, Callable

import anyio
import grpc

from tpnb import config as tpnb_config
from tpnb.common import httpfilter
from tpnb.errors import InterceptError
from tpnb.proto import pb

from . import intercepts
from .session import Session

log = logging.getLogger("tpnb.connector.wiretaps")

ProgressFn = Callable[[str, str, float], None]

#: seconds between `stats` events to the face
STATS_EVERY = 2.0

#: this connector's running wiretaps, by name (one session per connector)
_running: dict[str, "Wiretap"] = {}


def infos(session: Session | None) -> list[pb.WiretapInfo]:
    """The session's wiretaps for `tpnb status`, with records and drops so far."""
    return [t.info() for t in _running.values() if t.session is session]


def find(name: str) -> "Wiretap | None":
    return _running.get(name)


class Wiretap:
    def __init__(self, session: Session, req: pb.WiretapRequest) -> None:
        self.session = session
        self.want = pb.WiretapInfo()
        self.want.CopyFrom(req.wiretap)
        self.remote = pb.WiretapInfo()
        self.records = 0
        self.dropped_upstream = 0   # agents' and manager's, as the manager last said
        self.dropped_here = 0
        self.buffer: collections.deque[pb.WiretapRecord] = collections.deque()
        self.wake = asyncio.Event()
        self.removed = False
        #: why the wiretap ended by itself (shown by the faces), "" while it runs or when the face ended it
        self.end_reason = ""

    @property
    def name(self) -> str:
        return self.want.spec.name

    def info(self) -> pb.WiretapInfo:
        out = pb.WiretapInfo()
        out.CopyFrom(self.remote if self.remote.id else self.want)
        out.records, out.dropped = self.records, self.dropped_upstream + self.dropped_here
        if self.end_reason:
            out.message = self.end_reason
        return out

    # ---------------------------------------------------------- set-up
    async def start(self, progress: ProgressFn) -> pb.WiretapInfo:
        s = self.session
        cfg = tpnb_config.get()
        spec = self.want.spec
        if not spec.workload:
            spec.workload = spec.name
        if not spec.name:
            spec.name = spec.workload
        if not spec.workload:
            raise InterceptError("a wiretap needs a workload name", hint="tpnb wiretap hello")
        spec.namespace = spec.namespace or (s.mapped[0] if s.mapped else "default")
        intercepts.resolve_filters(spec, s.session_id)
        if spec.name in _running:
            raise InterceptError(f"wiretap {spec.name!r} already runs in this session",
                                 hint=f"stop it first (`tpnb leave {spec.name}` or `%tp wiretap --stop {spec.name}`)")
        _running[spec.name] = self
        await intercepts.agent_on_workload(s, spec, progress)
        link = s.require_link()
        try:
            self.remote = await link.stub.CreateWiretap(pb.CreateWiretapRequest(
                session=pb.SessionInfo(session_id=s.session_id), wiretap=self.want), timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise InterceptError(f"cannot wiretap {spec.namespace}/{spec.workload}", exc.details() or "") from None
        if self.removed:  # the face went away while we set up: leave nothing behind at the manager
            self.removed = False
            await self.remove()
            raise InterceptError(f"the wiretap of {spec.workload} was stopped while it started")
        await s.map_namespace(spec.namespace)
        progress("agent", "Waiting for the traffic-agent to take the wiretap...", 0.9)
        deadline = anyio.current_time() + cfg.timeouts.intercept
        while True:
            seen = next((w for w in getattr(s, "wiretap_infos", {}).values() if w.id == self.remote.id), None)
            if seen is not None:
                self.remote = seen
                if seen.state == pb.InterceptInfo.ACTIVE:
                    break
            if anyio.current_time() > deadline:
                raise InterceptError(f"the traffic-agent of {spec.workload} did not take the wiretap",
                                     self.remote.message, f"check `kubectl -n {spec.namespace} logs "
                                     f"deploy/{spec.workload} -c traffic-agent`")
            s.changed.clear()
            with anyio.move_on_after(0.5):
                await s.changed.wait()
        what = httpfilter.describe(spec) if httpfilter.is_filtered(spec) else "every request the app serves"
        log.info("wiretap %s on %s/%s: %s", spec.name, spec.namespace, spec.workload, what)
        s.changed.set()
        return self.info()

    # ---------------------------------------------------------- relay
    async def _read(self) -> None:
        """Manager -> bounded buffer, as fast as the manager sends (a slow face costs drops, not waits)."""
        limit = max(1, self.want.buffer or 1000)
        failures = 0
        while not self.removed:
            if getattr(self.session, "_closing", False):
                self.end_reason = "the session ended (tpnb quit)"
                return
            link = self.session.link
            if link is None:  # relinking (a new manager pod): the session's own loops reconnect
                failures += 1
                if failures > 120:
                    self.end_reason = "lost the traffic-manager"
                    return
                await asyncio.sleep(0.5)
                continue
            try:
                async for rec in link.stub.WatchWiretap(pb.WiretapRef(session_id=self.session.session_id,
                                                                      name=self.name)):
                    failures = 0
                    self.dropped_upstream = max(self.dropped_upstream, rec.dropped)
                    if rec.kind != pb.WiretapRecord.STATS:
                        if len(self.buffer) >= limit:
                            self.dropped_here += 1
                        else:
                            self.buffer.append(rec)
                    self.wake.set()
                if getattr(self.session, "_closing", False):
                    self.end_reason = "the session ended (tpnb quit)"
                elif not self.removed and not self.end_reason:
                    self.end_reason = "removed at the traffic-manager (its session ended?)"
                return  # the manager ended it: removed (leave) or its session went
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                    log.info("wiretap %s ended at the manager: %s", self.name, exc.details())
                    self.end_reason = f"the traffic-manager no longer has it ({exc.details()})"
                    return
                failures += 1
                if failures > 60:
                    self.end_reason = f"lost the traffic-manager ({exc.code().name})"
                    return
                log.debug("wiretap %s watch: %s; again", self.name, exc.code().name)
                await asyncio.sleep(0.5)

    async def relay(self) -> AsyncIterator[pb.WiretapEvent]:
        reader = asyncio.ensure_future(self._read())
        try:
            last_stats = anyio.current_time()
            while True:
                self.wake.clear()
                while self.buffer:
                    rec = self.buffer.popleft()
                    self.records += 1
                    rec.dropped = self.dropped_upstream + self.dropped_here
                    yield pb.WiretapEvent(record=rec)
                if reader.done() and not self.buffer:
                    break
                now = anyio.current_time()
                if now - last_stats >= STATS_EVERY:
                    last_stats = now
                    yield pb.WiretapEvent(stats=self.info())
                wait = asyncio.ensure_future(self.wake.wait())
                await asyncio.wait({wait, reader}, timeout=STATS_EVERY, return_when=asyncio.FIRST_COMPLETED)
                wait.cancel()
            yield pb.WiretapEvent(stats=self.info())
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    # ---------------------------------------------------------- removal
    async def remove(self) -> None:
        """At the manager (agents stop copying) and here.  Safe to call twice."""
        if _running.get(self.name) is self:
            del _running[self.name]
        if self.removed:
            return
        self.removed = True
        self.wake.set()
        link = self.session.link
        if link is not None and self.remote.id:
            try:
                await link.stub.RemoveWiretap(pb.WiretapRef(session_id=self.session.session_id, name=self.name),
                                              timeout=10)
                log.info("wiretap %s removed (%d records, %d dropped)", self.name, self.records,
                         self.dropped_upstream + self.dropped_here)
            except grpc.aio.AioRpcError as exc:
                log.info("wiretap %s: remove: %s", self.name, exc.details())
        self.session.changed.set()


async def stop(name: str) -> bool:
    """`tpnb leave NAME` for a wiretap: remove it; the face's call then ends with its final stats."""
    t = _running.get(name)
    if t is None:
        return False
    t.end_reason = "ended by `tpnb leave`"
    await t.remove()
    return True
