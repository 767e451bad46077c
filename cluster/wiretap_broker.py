"""Wiretaps, the traffic-manager's side: which agents copy for which session, and the records between.

A mixin of `manager.Manager` (kept apart so the manager's module stays about
sessions and intercepts).  A wiretap belongs to the session that made it: only
that session sees it listed (`InterceptList.wiretaps`), watches it or removes
it, by name; another session's calls find nothing.  Agents get the wiretaps of
their own (verified) workload in their instructions and upload copies
(`AgentHub.UploadWiretap`); a copy is kept only for a wiretap of the uploading
agent's workload.  Each wiretap holds at most `buffer` records for its
watcher: beyond that the manager drops and counts (agents never wait for a
laptop), and every record it passes on carries the drops so far (the agents'
and its own).

Runs inside the cluster image: Python 3.11, grpcio and protobuf.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import grpc

from tpnb.proto import pb

log = logging.getLogger("tpnb.manager.wiretap")


@dataclass
class Wiretap:
    """A session's wiretap and the records waiting for its watcher (bounded: overflow is counted)."""

    info: pb.WiretapInfo
    session_id: str
    queue: collections.deque = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: agent id -> records that agent dropped (its cumulative count)
    agent_drops: dict[str, int] = field(default_factory=dict)
    dropped_here: int = 0
    removed: bool = False
    watching: bool = False

    @property
    def dropped(self) -> int:
        return self.dropped_here + sum(self.agent_drops.values())

    def push(self, rec: pb.WiretapRecord) -> None:
        if len(self.queue) >= max(1, self.info.buffer or 1000):
            self.dropped_here += 1
        else:
            self.queue.append(rec)
        self.wake.set()


class WiretapBroker:
    """Manager's wiretap calls; expects the Manager's `_session`, `_agent_for`, `_notify`, `namespaces`."""

    wiretaps: dict[str, Wiretap]
    namespaces: frozenset[str]

    def _refresh_wiretaps(self) -> None:
        for w in self.wiretaps.values():
            agents = self._agent_for(w.info.spec.workload, w.info.spec.namespace)
            del w.info.pod_ips[:]
            w.info.pod_ips.extend(sorted(a.info.pod_ip for a in agents))
            if agents and all(w.info.id in a.delivered for a in agents):
                w.info.state, w.info.message = pb.InterceptInfo.ACTIVE, ""
            else:
                w.info.state = pb.InterceptInfo.WAITING
                w.info.message = ("waiting for the traffic-agent to take the wiretap" if agents
                                  else "waiting for the traffic-agent to report in")

    def _drop_wiretap(self, wid: str) -> None:
        w = self.wiretaps.pop(wid, None)
        if w is not None:
            w.removed = True
            w.wake.set()

    def _own_wiretap(self, session_id: str, name: str) -> Wiretap | None:
        return next((w for w in self.wiretaps.values()
                     if w.session_id == session_id and w.info.spec.name == name), None)

    async def CreateWiretap(self, request, context):  # noqa: N802
        sid = request.session.session_id
        client = await self._session(context, sid)
        want = request.wiretap
        spec = want.spec
        await self._refuse_bad_spec(context, spec)
        if not spec.name or not spec.workload:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a wiretap needs a name and a workload")
        if self._own_wiretap(sid, spec.name) is not None:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"a wiretap named {spec.name!r} exists")
        info = pb.WiretapInfo(spec=spec, id=secrets.token_hex(8), max_body=max(0, want.max_body),
                              buffer=max(1, want.buffer or 1000), client_name=_holder(client.info))
        self.wiretaps[info.id] = Wiretap(info=info, session_id=sid)
        self._refresh_wiretaps()
        self._notify()
        log.info("wiretap %s: %s/%s for %s", info.id, spec.namespace, spec.workload, client.info.name)
        return info

    async def RemoveWiretap(self, request, context):  # noqa: N802
        await self._session(context, request.session_id)
        w = self._own_wiretap(request.session_id, request.name)
        if w is None:  # another session's wiretap is not even said to exist
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no wiretap named {request.name!r} in this session")
        self._drop_wiretap(w.info.id)
        self._notify()
        log.info("wiretap %s removed", w.info.id)
        return pb.Empty()

    async def WatchWiretap(self, request, context) -> AsyncIterator[pb.WiretapRecord]:  # noqa: N802
        """The wiretap's records as they come; a STATS record with the drop count when idle."""
        await self._session(context, request.session_id)
        w = self._own_wiretap(request.session_id, request.name)
        if w is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no wiretap named {request.name!r} in this session")
        if w.watching:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"wiretap {request.name!r} is being watched")
        w.watching = True
        sent_dropped = -1
        try:
            while not w.removed:
                w.wake.clear()
                while w.queue:
                    rec = w.queue.popleft()
                    rec.dropped = sent_dropped = w.dropped
                    w.info.records += 1
                    yield rec
                w.info.dropped = w.dropped
                if w.dropped != sent_dropped:
                    sent_dropped = w.dropped
                    yield pb.WiretapRecord(wiretap_id=w.info.id, kind=pb.WiretapRecord.STATS, dropped=sent_dropped)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(w.wake.wait(), 2.0)
        finally:
            w.watching = False


    def wiretaps_for(self, agent: pb.AgentInfo) -> list[pb.WiretapInfo]:
        """What an agent of `agent`'s workload is told to copy (no session id)."""
        return [pb.WiretapInfo(id=w.info.id, spec=w.info.spec, max_body=w.info.max_body, buffer=w.info.buffer)
                for w in self.wiretaps.values()
                if w.info.spec.workload == agent.name and w.info.spec.namespace == agent.namespace]

    def take_upload(self, agent: Any, up: pb.WiretapUpload) -> None:
        """An agent's copies and drop counts, for wiretaps of its own workload only."""
        def own(wid: str) -> Wiretap | None:
            w = self.wiretaps.get(wid)
            if w is not None and w.info.spec.workload == agent.info.name and w.info.spec.namespace == agent.info.namespace:
                return w
            return None
        for rec in up.records:
            w = own(rec.wiretap_id)
            if w is not None:
                w.push(rec)
        for wid, n in up.dropped.items():
            w = own(wid)
            if w is not None:
                w.agent_drops[agent.id] = n
                w.wake.set()


def _holder(info: pb.ClientInfo) -> str:
    from .manager import holder_name  # the manager imports this module: resolved at call time

    return holder_name(info)
