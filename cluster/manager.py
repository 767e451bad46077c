"""The traffic-manager: the cluster end of every tpnb session.

It runs in a pod (the project's image, `python3 -m tpnb.cluster manager`) and
serves two APIs: the client API (`Manager`) on the pod's loopback only, so the
one way in is a port-forward that the API server authorizes (`pods/portforward`
in the manager's namespace), and the agent API (`AgentHub`) on the pod
network, where each agent proves which workload it serves
(cluster/agent_auth.py).  It:
  * keeps a session per client (heartbeats, expiry ends the session's intercepts),
    and shows each session only its own intercepts in full (others': workload and holder),
  * dials in-cluster destinations for the client's outbound TCP/UDP flows,
  * answers DNS by forwarding raw queries to the cluster's resolver,
  * brokers intercepts: agents report in, clients claim workloads, and each
    connection an agent receives for an intercepted workload is joined to a
    tunnel the owning client opens back on request (DialRequest);
  * brokers the agents' file services (on their pods' loopback) to the session
    holding the intercept, the same way in the other direction;
  * passes wiretap copies from the agents to the session that made the wiretap,
    holding at most `buffer` records per wiretap for a slow reader (the rest are
    dropped and counted: an agent never waits for a laptop).
Plain asyncio (the image carries no anyio); Python 3.11 compatible.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc

from tpnb.proto import pb, rpc
from tpnb.version import API_VERSION, __version__

from tpnb.common.aio import both, first, oserror_text
from tpnb.common.forward import (BULK_GRPC_OPTIONS, FastGrpcFrameChannel, FastTunnelRegistration, FrameChannel,
                                 GrpcFrameChannel, SendFirst, SocketStream, bridge)

from tpnb.common import httpfilter
from tpnb.common.linkframes import derive_secret
from .agent_auth import AgentRefused, AgentVerifier, KubeAgentVerifier, managed_namespaces
from .wiretap_broker import WiretapBroker

log = logging.getLogger("tpnb.manager")

DIAL_TIMEOUT = 5.0
#: what this manager understands beyond its API generation (VersionInfo.features)
FEATURES = ("early-data",)
CLIENT_ANSWER_TIMEOUT = 5.0


def _ip_str(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def _ipnet(cidr: str) -> pb.IPNet:
    net = ipaddress.ip_network(cidr, strict=False)
    return pb.IPNet(ip=net.network_address.packed, prefix=net.prefixlen)


@dataclass
class ClientSession:
    id: str
    info: pb.ClientInfo
    last_seen: float = field(default_factory=time.monotonic)
    dials: asyncio.Queue = field(default_factory=asyncio.Queue)


@dataclass
class PendingDial:
    #: the session or agent id that must answer
    answerer: str
    future: asyncio.Future


@dataclass
class AgentSession:
    id: str
    #: as verified (cluster/agent_auth.py): namespace, pod and pod IP come from the API server
    info: pb.AgentInfo
    last_seen: float = field(default_factory=time.monotonic)
    #: requests to connect to this agent's file service (purpose FILES)
    dials: asyncio.Queue = field(default_factory=asyncio.Queue)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: intercept ids this agent has been sent: only then is an intercept ACTIVE,
    #: so a client never sees ACTIVE while its first request still reaches the app
    delivered: set[str] = field(default_factory=set)
    #: what the app's port speaks, as the agent probed it ("" unknown; httproute.probe)
    app_protocol: str = ""


def holder_name(info: pb.ClientInfo) -> str:
    """How others see who holds an intercept: "user@host", with the Kubernetes user when it differs."""
    if info.kube_user and info.kube_user != info.name.split("@", 1)[0]:
        return f"{info.name} ({info.kube_user})"
    return info.name


def read_resolv_conf(path: str = "/etc/resolv.conf") -> tuple[list[str], list[str]]:
    """Nameservers and search domains of this pod (ClusterFirst → the cluster DNS)."""
    servers: list[str] = []
    search: list[str] = []
    try:
        with open(path) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    servers.append(parts[1])
                elif parts and parts[0] == "search":
                    search = parts[1:]
    except OSError:
        pass
    return servers, search


class _UDPRelay(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1024)

    def datagram_received(self, data: bytes, addr) -> None:  # noqa: ANN001
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            pass  # UDP: drop under overload rather than block the loop

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(None)


class Manager(WiretapBroker, rpc.ManagerServicer):
    """Sessions, intercepts and dials; the client-facing API (pod loopback only).

    Session, intercept, agent and dial ids are random capabilities: whoever
    holds one may act for it, so none is ever sent to anyone but its owner.
    """

    def __init__(self, session_ttl: float = 15.0, namespaces: frozenset[str] = frozenset()) -> None:
        self.session_ttl = session_ttl
        #: namespaces this manager serves (empty: all)
        self.namespaces = namespaces
        self.clients: dict[str, ClientSession] = {}
        self.agents: dict[str, AgentSession] = {}
        self.intercepts: dict[str, pb.InterceptInfo] = {}
        #: intercept id -> random key; each agent pod's link key derives from it (`link_secret`)
        self.link_keys: dict[str, bytes] = {}
        self.pending_dials: dict[str, PendingDial] = {}
        #: Tunnel methods use forward.encode_frame/decode_frame (see `serve`)
        self.fast_frames = False
        self.watchers: set[asyncio.Event] = set()
        self.wiretaps: dict[str, Wiretap] = {}
        self.dns_servers, self.search = read_resolv_conf()
        self.cluster_domain = self._cluster_domain()
        self.namespace = os.environ.get("MANAGER_NAMESPACE", "tpnb")
        self.image_version = os.environ.get("TPNB_IMAGE_VERSION", __version__)

    # ---------------------------------------------------------------- helpers
    def _cluster_domain(self) -> str:
        for s in self.search:
            if s.startswith("svc."):
                return s[4:]
        return "cluster.local"

    def _notify(self) -> None:
        for ev in list(self.watchers):
            ev.set()
        for agent in self.agents.values():
            agent.changed.set()

    async def _session(self, context: grpc.aio.ServicerContext, session_id: str) -> ClientSession:
        """The live session `session_id`, or the call ends with NOT_FOUND."""
        s = self.clients.get(session_id) if session_id else None
        if s is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "session is not known (expired?); reconnect")
        return s  # type: ignore[return-value]

    def _agent_for(self, name: str, namespace: str) -> list[AgentSession]:
        return [a for a in self.agents.values() if a.info.name == name and a.info.namespace == namespace]

    def link_secret(self, ic: pb.InterceptInfo, agent: pb.AgentInfo) -> bytes:
        """The key of the agent link between `ic`'s session and one agent pod (common/linkframes.py):
        sent to that agent in its instructions and to the session in its own view of `ic`, never to
        anyone else."""
        key = self.link_keys.get(ic.id)
        if key is None:
            key = self.link_keys[ic.id] = secrets.token_bytes(32)
        return derive_secret(key, agent.namespace, agent.pod_name)

    def _refresh_states(self) -> None:
        for gone in set(self.link_keys) - set(self.intercepts):
            del self.link_keys[gone]
        for ic in self.intercepts.values():
            agents = self._agent_for(ic.spec.workload, ic.spec.namespace)
            del ic.pod_ips[:]
            del ic.links[:]
            ic.links.extend(pb.AgentLink(pod_name=a.info.pod_name, pod_ip=a.info.pod_ip, port=a.info.link_port,
                                         secret=self.link_secret(ic, a.info), upgrade=a.info.link_upgrade)
                            for a in sorted(agents, key=lambda a: a.info.pod_name) if a.info.link_port)
            not_http = [a for a in agents if a.app_protocol.startswith("tcp")] if httpfilter.is_filtered(ic.spec) else []
            unprobed = [a for a in agents if not a.app_protocol] if httpfilter.is_filtered(ic.spec) else []
            if not_http:
                ic.state = pb.InterceptInfo.ERROR
                why = not_http[0].app_protocol.split(":", 1)[-1].strip()
                ic.message = (f"the port of {ic.spec.workload} that the traffic-agent serves does not speak HTTP "
                              f"({why}); HTTP filters (--http-header, --http-path-*) need HTTP/1.1 or HTTP/2 (h2c)")
            elif agents and all(ic.id in a.delivered for a in agents) and not unprobed:
                ic.state = pb.InterceptInfo.ACTIVE
                ic.message = ""
            elif agents and unprobed and all(ic.id in a.delivered for a in agents):
                ic.state = pb.InterceptInfo.WAITING
                ic.message = "waiting for the traffic-agent to find out whether the app speaks HTTP"
            else:
                ic.state = pb.InterceptInfo.WAITING
                ic.message = ("waiting for the traffic-agent to take the intercept" if agents
                              else "waiting for the traffic-agent to report in")
            ic.app_protocol = next((a.app_protocol for a in agents if a.app_protocol), "")
            if agents:
                ic.pod_ips.extend(sorted(a.info.pod_ip for a in agents))
                first = agents[0].info
                ic.environment.clear()
                ic.environment.update(first.environment)
                ic.mount_point = first.mount_point
                ic.agent_port = first.agent_port

    def view(self, ic: pb.InterceptInfo, session_id: str) -> pb.InterceptInfo:
        """`ic` as session `session_id` may see it: its own in full, another's as workload + holder."""
        if ic.session_id == session_id:
            out = pb.InterceptInfo()
            out.CopyFrom(ic)
            out.mine = True
            return out
        spec = pb.InterceptSpec(name=ic.spec.name, namespace=ic.spec.namespace, workload=ic.spec.workload,
                                workload_kind=ic.spec.workload_kind, service=ic.spec.service,
                                service_port=ic.spec.service_port)
        # another's filters stay private (an auto header is that session's own): only that it is personal
        return pb.InterceptInfo(spec=spec, client_name=ic.client_name, state=ic.state,
                                message="personal (HTTP filters)" if httpfilter.is_filtered(ic.spec) else "")

    async def expire_loop(self) -> None:
        """End sessions (and their intercepts) whose heartbeats stopped."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for sid, s in list(self.clients.items()):
                if now - s.last_seen > self.session_ttl:
                    log.info("session of %s expired", s.info.name)
                    self._end_session(sid)
            for aid, a in list(self.agents.items()):
                if now - a.last_seen > self.session_ttl:
                    log.info("agent %s/%s expired", a.info.namespace, a.info.pod_name)
                    self.drop_agent(aid)

    def drop_agent(self, aid: str) -> None:
        a = self.agents.pop(aid, None)
        if a is not None:
            a.dials.put_nowait(None)
            self._refresh_states()
            self._notify()

    def _end_session(self, sid: str) -> None:
        s = self.clients.pop(sid, None)
        if s is not None:
            s.dials.put_nowait(None)
        for iid in [i for i, ic in self.intercepts.items() if ic.session_id == sid]:
            del self.intercepts[iid]
            log.info("intercept %s removed with its session", iid)
        for wid in [i for i, w in self.wiretaps.items() if w.session_id == sid]:
            self._drop_wiretap(wid)
            log.info("wiretap %s removed with its session", wid)
        self._notify()

    # ---------------------------------------------------------------- sessions
    async def Version(self, request, context):  # noqa: N802
        return pb.VersionInfo(name="traffic-manager", version=self.image_version, api=API_VERSION,
                              features=list(FEATURES))

    async def ArriveAsClient(self, request, context):  # noqa: N802
        sid = secrets.token_hex(16)
        self.clients[sid] = ClientSession(id=sid, info=request)
        log.info("client %s arrived", request.name)
        return pb.SessionInfo(session_id=sid)

    async def Remain(self, request, context):  # noqa: N802
        s = await self._session(context, request.session_id)
        s.last_seen = time.monotonic()
        return pb.Empty()

    async def Depart(self, request, context):  # noqa: N802
        s = self.clients.get(request.session_id)
        if s is not None:
            log.info("%s departed", s.info.name)
            self._end_session(request.session_id)
        return pb.Empty()

    async def GetClusterInfo(self, request, context):  # noqa: N802
        await self._session(context, request.session_id)
        info = pb.ClusterInfo(
            cluster_domain=self.cluster_domain,
            manager_version=self.image_version,
            manager_namespace=self.namespace,
        )
        if self.dns_servers:
            info.dns_ip = ipaddress.ip_address(self.dns_servers[0]).packed
        for cidr in await asyncio.to_thread(pod_subnets):
            info.pod_subnets.append(_ipnet(cidr))
        return info

    # ---------------------------------------------------------------- DNS
    async def LookupDNS(self, request, context):  # noqa: N802
        await self._session(context, request.session_id)
        if not self.dns_servers:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the manager pod has no nameserver")
        reply = await dns_query(request.query, self.dns_servers[0])
        return pb.DNSResponse(reply=reply)

    # ---------------------------------------------------------------- tunnels
    async def Tunnel(self, request_iterator, context):  # noqa: N802
        chan, op = await _opened(context, self.fast_frames)
        if op.session_id not in self.clients:
            await chan.send(pb.TunnelFrame(error="session expired; reconnect"))
            return
        if op.kind == pb.TunnelOpen.DIAL_ANSWER:
            await self.answer_dial(op, chan)
        elif op.kind == pb.TunnelOpen.AGENT_FILES:
            await self._files(op, chan)
        elif op.kind == pb.TunnelOpen.OUTBOUND:
            await self._outbound(op, chan)
        else:
            await chan.send(pb.TunnelFrame(error=f"tunnel kind {pb.TunnelOpen.Kind.Name(op.kind)} "
                                                 "is for agents (the agent port)"))

    async def _outbound(self, op: pb.TunnelOpen, chan: FrameChannel) -> None:
        """A client flow: dial the destination from inside the cluster."""
        host, port = _ip_str(op.dst_ip), op.dst_port
        if op.protocol == pb.TunnelOpen.UDP:
            await self._outbound_udp(host, port, chan)
            return
        try:
            conn = await SocketStream.connect(host, port, DIAL_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            msg = "timed out" if isinstance(exc, TimeoutError) else oserror_text(exc)
            log.debug("dial %s:%d failed: %s", host, port, msg)
            await chan.send(pb.TunnelFrame(error=f"dial {host}:{port}: {msg}"))
            return
        if op.early_data:
            conn.write(op.early_data)
            try:
                await conn.drain()
            except OSError as exc:
                conn.abort()
                await chan.send(pb.TunnelFrame(error=f"send to {host}:{port}: {oserror_text(exc)}"))
                return
            # its sender reads the first frame down as the dial result (data, or an error): no
            # `opened`, so the destination's answer need not wait behind one more write
            await bridge(conn, conn, chan)  # type: ignore[arg-type]
            return
        # `opened` goes out while the pumps start (forward.SendFirst): no write completion to wait for
        await bridge(conn, conn, SendFirst(chan, pb.TunnelFrame(opened=pb.Empty())))  # type: ignore[arg-type]

    async def _outbound_udp(self, host: str, port: int, chan: FrameChannel) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, proto = await loop.create_datagram_endpoint(_UDPRelay, remote_addr=(host, port))
        except OSError as exc:
            await chan.send(pb.TunnelFrame(error=f"udp {host}:{port}: {exc.strerror or exc}"))
            return
        await chan.send(pb.TunnelFrame(opened=pb.Empty()))

        async def up() -> None:
            while True:
                frame = await chan.recv()
                if frame is None or frame.WhichOneof("kind") in ("eof", "error"):
                    return
                if frame.WhichOneof("kind") == "data":
                    transport.sendto(frame.data)

        async def down() -> None:
            while True:
                try:
                    data = await asyncio.wait_for(proto.queue.get(), 60.0)  # idle UDP flows end
                except asyncio.TimeoutError:
                    return
                if data is None:
                    return
                await chan.send(pb.TunnelFrame(data=data))

        try:
            await first(up(), down())
        finally:
            transport.close()

    async def broker(self, chan: FrameChannel, dials: asyncio.Queue, request: pb.DialRequest,
                     answerer: str, who: str) -> None:
        """Ask a peer (through its `dials` stream) to open a tunnel back, then join it to `chan`.

        Only the tunnel whose opener is `answerer` (its session or agent id)
        and names the fresh dial id is accepted as the answer.
        """
        request.dial_id = secrets.token_hex(16)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.pending_dials[request.dial_id] = PendingDial(answerer=answerer, future=fut)
        dials.put_nowait(request)
        try:
            peer: FrameChannel = await asyncio.wait_for(fut, CLIENT_ANSWER_TIMEOUT)
        except asyncio.TimeoutError:
            await chan.send(pb.TunnelFrame(error=f"the {who} did not answer"))
            return
        finally:
            self.pending_dials.pop(request.dial_id, None)
        done: asyncio.Future = peer.done  # type: ignore[attr-defined]
        try:
            await both(_relay(chan, peer), _relay(peer, chan))
        finally:
            if not done.done():
                done.set_result(None)

    async def answer_dial(self, op: pb.TunnelOpen, chan: FrameChannel) -> None:
        """A tunnel answering a DialRequest: hand it to the waiting side (only from the one asked)."""
        pending = self.pending_dials.get(op.dial_id)
        if pending is None or pending.future.done() or pending.answerer != op.session_id:
            await chan.send(pb.TunnelFrame(error="unknown or expired dial id"))
            return
        chan.done = asyncio.get_running_loop().create_future()  # type: ignore[attr-defined]
        pending.future.set_result(chan)
        await chan.done  # type: ignore[attr-defined]  # the RPC lives until the relay ends

    async def _files(self, op: pb.TunnelOpen, chan: FrameChannel) -> None:
        """A client reaches the file service of an agent serving one of its own intercepts."""
        ic = self.intercepts.get(op.intercept_id)
        if ic is None or ic.session_id != op.session_id:
            await chan.send(pb.TunnelFrame(error="no such intercept in this session"))
            return
        agents = self._agent_for(ic.spec.workload, ic.spec.namespace)
        want = _ip_str(op.dst_ip) if op.dst_ip else ""
        agent = next((a for a in agents if a.info.pod_ip == want), agents[0] if agents and not want else None)
        if agent is None:
            await chan.send(pb.TunnelFrame(error="no traffic-agent of that intercept at that address"))
            return
        await self.broker(chan, agent.dials, pb.DialRequest(purpose=pb.DialRequest.FILES, intercept_id=ic.id),
                          agent.id, "traffic-agent")

    async def agent_tunnel(self, agent: AgentSession, op: pb.TunnelOpen, chan: FrameChannel) -> None:
        """An agent got a connection for an intercepted workload: fetch the client."""
        ic = self.intercepts.get(op.intercept_id)
        client = self.clients.get(ic.session_id) if ic else None
        if (ic is None or client is None or ic.spec.workload != agent.info.name
                or ic.spec.namespace != agent.info.namespace):
            await chan.send(pb.TunnelFrame(error="no such intercept (it ended)"))
            return
        await self.broker(chan, client.dials, pb.DialRequest(
            purpose=pb.DialRequest.INTERCEPTED, intercept_id=ic.id,
            target_host=ic.spec.target_host or "127.0.0.1", port=ic.spec.local_port,
            peer_ip=op.src_ip, peer_port=op.src_port), client.id, "intercepting client")

    # ---------------------------------------------------------------- intercepts
    async def _refuse_bad_spec(self, context, spec) -> None:  # noqa: ANN001
        """Abort an intercept's or wiretap's creation outside this manager's namespaces or with a bad filter."""
        if self.namespaces and spec.namespace not in self.namespaces:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"this traffic-manager serves namespaces {', '.join(sorted(self.namespaces))} "
                                f"only, not {spec.namespace}")
        bad = httpfilter.check(spec)
        if bad:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad)

    async def CreateIntercept(self, request, context):  # noqa: N802
        sid = request.session.session_id
        client = await self._session(context, sid)
        spec = request.spec
        await self._refuse_bad_spec(context, spec)
        for ic in self.intercepts.values():
            if ic.spec.workload == spec.workload and ic.spec.namespace == spec.namespace:
                if ic.session_id == sid:
                    ic.spec.CopyFrom(spec)
                    self._refresh_states()
                    self._notify()
                    return self.view(ic, sid)
                why = _conflict(ic, spec)
                if why:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                        f"{spec.namespace}/{spec.workload} is already intercepted by "
                                        f"{ic.client_name} (intercept {ic.spec.name!r}, {why})")
            if ic.spec.name == spec.name and ic.session_id == sid:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"an intercept named {spec.name!r} exists")
        ic = pb.InterceptInfo(spec=spec, id=secrets.token_hex(8), session_id=sid, client_name=holder_name(client.info))
        self.intercepts[ic.id] = ic
        self._refresh_states()
        self._notify()
        log.info("intercept %s: %s/%s -> %s:%d for %s", ic.id, spec.namespace, spec.workload,
                 spec.target_host, spec.local_port, client.info.name)
        return self.view(ic, sid)

    async def RemoveIntercept(self, request, context):  # noqa: N802
        await self._session(context, request.session_id)
        for iid, ic in list(self.intercepts.items()):
            if ic.session_id == request.session_id and ic.spec.name == request.name:
                del self.intercepts[iid]
                self._notify()
                log.info("intercept %s removed", iid)
                return pb.Empty()
        other = next((ic for ic in self.intercepts.values() if ic.spec.name == request.name), None)
        if other is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"intercept {request.name!r} is held by {other.client_name}, not this session")
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no intercept named {request.name!r} in this session")

    def _snapshot(self, session_id: str) -> pb.InterceptList:
        self._refresh_wiretaps()
        return pb.InterceptList(intercepts=[self.view(ic, session_id) for ic in self.intercepts.values()],
                                wiretaps=[w.info for w in self.wiretaps.values() if w.session_id == session_id])

    async def WatchIntercepts(self, request, context) -> AsyncIterator[pb.InterceptList]:  # noqa: N802
        await self._session(context, request.session_id)
        ev = asyncio.Event()
        self.watchers.add(ev)
        try:
            while request.session_id in self.clients:
                yield self._snapshot(request.session_id)
                await ev.wait()
                ev.clear()
        finally:
            self.watchers.discard(ev)

    async def WatchDials(self, request, context) -> AsyncIterator[pb.DialRequest]:  # noqa: N802
        client = await self._session(context, request.session_id)
        async for req in _until_none(client.dials):
            yield req

    async def SetLogLevel(self, request, context):  # noqa: N802
        level = getattr(logging, request.level.upper(), None)
        if not isinstance(level, int):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown log level {request.level!r}")
        logging.getLogger().setLevel(level)
        return pb.Empty()


def _conflict(held: pb.InterceptInfo, spec: pb.InterceptSpec) -> str:
    """Why `spec` (another session's) cannot share the workload with `held`; '' if it can.

    Personal (filtered) intercepts share a workload as long as their filters
    differ; a global one takes every connection, so it shares with nothing.
    """
    if not httpfilter.is_filtered(held.spec):
        return "all connections"
    if not httpfilter.is_filtered(spec):
        return ("a personal intercept with HTTP filters; an intercept of all connections would take its "
                "requests: add --http-header or --http-path-* to intercept only yours")
    if httpfilter.filter_key(held.spec) == httpfilter.filter_key(spec):
        return "with the same HTTP filters: pick another header value or path"
    return ""


class AgentHub(rpc.AgentHubServicer):
    """The agent-facing API (pod network): only verified agents, each for its own workload."""

    def __init__(self, manager: Manager, verifier: AgentVerifier) -> None:
        self.m = manager
        self.verifier = verifier

    async def _agent(self, context: grpc.aio.ServicerContext, agent_id: str) -> AgentSession:
        a = self.m.agents.get(agent_id) if agent_id else None
        if a is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "agent session unknown (manager restarted?)")
        return a  # type: ignore[return-value]

    async def Version(self, request, context):  # noqa: N802
        return pb.VersionInfo(name="traffic-manager", version=self.m.image_version, api=API_VERSION)

    async def ArriveAsAgent(self, request, context):  # noqa: N802
        meta = dict(context.invocation_metadata() or ())
        auth = str(meta.get("authorization", ""))
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        try:
            info = await self.verifier.verify(token, request)
        except AgentRefused as exc:
            peer = context.peer()
            log.warning("refused an agent for %s/%s from %s: %s", request.namespace, request.name, peer, exc)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"not accepted as a traffic-agent: {exc}")
        aid = secrets.token_hex(16)
        # A restarted agent pod replaces its predecessor's record at once.
        for old, a in list(self.m.agents.items()):
            if a.info.pod_name == info.pod_name and a.info.namespace == info.namespace:
                self.m.agents.pop(old).dials.put_nowait(None)
        self.m.agents[aid] = AgentSession(id=aid, info=info)
        log.info("agent %s/%s (pod %s) arrived", info.namespace, info.name, info.pod_name)
        self.m._refresh_states()
        self.m._notify()
        return pb.AgentSession(agent_id=aid)

    async def AgentRemain(self, request, context):  # noqa: N802
        a = await self._agent(context, request.agent_id)
        a.last_seen = time.monotonic()
        if request.app_protocol and request.app_protocol != a.app_protocol:
            a.app_protocol = request.app_protocol
            log.info("agent %s/%s: the app speaks %s", a.info.namespace, a.info.pod_name, a.app_protocol)
            self.m._refresh_states()
            for ev in list(self.m.watchers):
                ev.set()
        return pb.Empty()

    async def WatchAgentInstructions(self, request, context) -> AsyncIterator[pb.AgentInstruction]:  # noqa: N802
        a = await self._agent(context, request.agent_id)
        while request.agent_id in self.m.agents:
            a.changed.clear()
            mine = []
            for ic in self.m.intercepts.values():
                if ic.spec.workload == a.info.name and ic.spec.namespace == a.info.namespace:
                    # to the agent: "serve this" -- no session id, no environment
                    mine.append(pb.InterceptInfo(id=ic.id, spec=ic.spec, state=pb.InterceptInfo.ACTIVE,
                                                 link_secret=self.m.link_secret(ic, a.info)))
            taps = self.m.wiretaps_for(a.info)
            yield pb.AgentInstruction(intercepts=mine, wiretaps=taps)
            sent = {ic.id for ic in mine} | {w.id for w in taps}
            if sent != a.delivered:
                a.delivered = sent
                self.m._refresh_states()
                for ev in list(self.m.watchers):
                    ev.set()
            try:
                await asyncio.wait_for(a.changed.wait(), 30.0)
            except asyncio.TimeoutError:
                pass

    async def WatchAgentDials(self, request, context) -> AsyncIterator[pb.DialRequest]:  # noqa: N802
        a = await self._agent(context, request.agent_id)
        async for req in _until_none(a.dials):
            yield req

    async def UploadWiretap(self, request_iterator, context):  # noqa: N802
        """An agent's copies (cluster/wiretap_broker.py keeps only its own workload's)."""
        async for up in request_iterator:
            a = self.m.agents.get(up.agent_id) if up.agent_id else None
            if a is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, "agent session unknown (manager restarted?)")
            self.m.take_upload(a, up)
        return pb.Empty()

    async def Tunnel(self, request_iterator, context):  # noqa: N802
        chan, op = await _opened(context, self.m.fast_frames)
        agent = self.m.agents.get(op.session_id) if op.session_id else None
        if agent is None:
            await chan.send(pb.TunnelFrame(error="agent session unknown; arrive again"))
            return
        if op.kind == pb.TunnelOpen.AGENT_INTERCEPTED:
            await self.m.agent_tunnel(agent, op, chan)
        elif op.kind == pb.TunnelOpen.DIAL_ANSWER:
            await self.m.answer_dial(op, chan)
        else:
            await chan.send(pb.TunnelFrame(error=f"tunnel kind {pb.TunnelOpen.Kind.Name(op.kind)} "
                                                 "is not for agents"))


async def _opened(context: grpc.aio.ServicerContext, fast: bool = False) -> tuple[GrpcFrameChannel, pb.TunnelOpen]:
    """A Tunnel RPC's channel and its `open` frame (anything else first ends the call).

    `fast`: the method was registered with `FastTunnelRegistration`, so data
    payloads may be written pre-encoded (no protobuf message per chunk)."""
    chan = FastGrpcFrameChannel(context) if fast else GrpcFrameChannel(context)
    first = await chan.recv()
    if first is None or first.WhichOneof("kind") != "open":
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first tunnel frame must be `open`")
    return chan, first.open  # type: ignore[union-attr]


async def _until_none(queue: asyncio.Queue) -> AsyncIterator:
    """The items of `queue` until a None (its owner ended)."""
    while (item := await queue.get()) is not None:
        yield item


async def _relay(src: FrameChannel, dst: FrameChannel) -> None:
    """Copy frames one way until the source ends; an error frame ends both."""
    while True:
        frame = await src.recv()
        if frame is None:
            try:
                await dst.send(pb.TunnelFrame(eof=pb.Empty()))
            except Exception:  # noqa: BLE001 - peer already gone
                pass
            return
        await dst.send(frame)
        if frame.WhichOneof("kind") == "error":
            raise ConnectionAbortedError(frame.error)




class _DNSClient(asyncio.DatagramProtocol):
    def __init__(self, fut: asyncio.Future) -> None:
        self.fut = fut

    def datagram_received(self, data: bytes, addr) -> None:  # noqa: ANN001
        if not self.fut.done():
            self.fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)


async def dns_query(query: bytes, server: str, timeout: float = 2.0) -> bytes:
    """Send one raw query to the cluster resolver (UDP, then TCP if truncated)."""
    loop = asyncio.get_running_loop()
    for _attempt in range(2):
        fut = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(lambda: _DNSClient(fut), remote_addr=(server, 53))
        try:
            transport.sendto(query)
            reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            continue
        finally:
            transport.close()
        if len(reply) > 2 and reply[2] & 0x02:  # TC bit: retry over TCP
            reader, writer = await asyncio.wait_for(asyncio.open_connection(server, 53), timeout)
            try:
                writer.write(len(query).to_bytes(2, "big") + query)
                await writer.drain()
                n = int.from_bytes(await reader.readexactly(2), "big")
                reply = await reader.readexactly(n)
            finally:
                writer.close()
        return reply
    raise TimeoutError(f"DNS server {server} did not answer")


def pod_subnets() -> list[str]:
    """Pod CIDRs from the nodes (read with the manager's ServiceAccount)."""
    try:
        from kubernetes import client, config

        config.load_incluster_config()
        nodes = client.CoreV1Api().list_node(_request_timeout=5).items
    except Exception as exc:  # noqa: BLE001 - reported, the daemon has other sources
        log.warning("cannot list nodes for pod subnets: %s", exc)
        return []
    cidrs: set[str] = set()
    for n in nodes:
        for c in (n.spec.pod_cidrs or ([n.spec.pod_cidr] if n.spec.pod_cidr else [])):
            cidrs.add(c)
    return sorted(cidrs)


SERVER_OPTIONS = [
    *BULK_GRPC_OPTIONS,
    ("grpc.keepalive_time_ms", 20000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


async def serve(client_port: int, agent_port: int, verifier: AgentVerifier | None = None,
                client_host: str = "127.0.0.1") -> None:
    """The client API on the pod's loopback (a port-forward is the only way in, and the API
    server authorizes it), the agent API on the pod network for the agents' tunnels."""
    ttl = os.environ.get("TPNB_MANAGER_SESSION_TTL") or os.environ.get("TPNB_SESSION_TTL") or "15"
    mgr = Manager(session_ttl=float(ttl), namespaces=managed_namespaces())
    hub = AgentHub(mgr, verifier or KubeAgentVerifier())
    clients = grpc.aio.server(options=SERVER_OPTIONS)
    agents = grpc.aio.server(options=SERVER_OPTIONS)
    # data frames of every tunnel skip protobuf's payload copies (forward.decode_frame)
    mgr.fast_frames = True
    rpc.add_ManagerServicer_to_server(mgr, FastTunnelRegistration(clients))
    rpc.add_AgentHubServicer_to_server(hub, FastTunnelRegistration(agents))
    clients.add_insecure_port(f"{client_host}:{client_port}")
    agents.add_insecure_port(f"0.0.0.0:{agent_port}")
    await clients.start()
    await agents.start()
    scope = ", ".join(sorted(mgr.namespaces)) or "all namespaces"
    log.info("traffic-manager %s: clients on %s:%d, agents on :%d (%s; dns %s, domain %s)", mgr.image_version,
             client_host, client_port, agent_port, scope, mgr.dns_servers, mgr.cluster_domain)
    expire = asyncio.ensure_future(mgr.expire_loop())
    try:
        await clients.wait_for_termination()
    finally:
        expire.cancel()
        await asyncio.gather(clients.stop(2), agents.stop(2))


def main() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(int(os.environ.get("TPNB_MANAGER_GRPC_PORT", "8081")),
                      int(os.environ.get("TPNB_MANAGER_AGENT_PORT", "8082"))))
