"""The traffic-manager: the cluster end of every tpnb session.

It runs in a pod (the project's image, `python3 -m tpnb.cluster manager`) and
is reached by each client's daemon through one port-forward.  It:
  * keeps a session per client (heartbeats, expiry ends the session's intercepts),
  * dials in-cluster destinations for the client's outbound TCP/UDP flows,
  * answers DNS by forwarding raw queries to the cluster's resolver,
  * brokers intercepts: agents report in, clients claim workloads, and each
    connection an agent receives for an intercepted workload is joined to a
    tunnel the owning client opens back on request (DialRequest).
Plain asyncio (the image carries no anyio); Python 3.11 compatible.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc

from tpnb.proto import pb, rpc
from tpnb.version import API_VERSION, __version__

from tpnb.common.aio import both, first, oserror_text
from tpnb.common.forward import BULK_GRPC_OPTIONS, FastTunnelRegistration, FrameChannel, GrpcFrameChannel, SocketStream, bridge

log = logging.getLogger("tpnb.manager")

DIAL_TIMEOUT = 5.0
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
class AgentSession:
    id: str
    info: pb.AgentInfo
    last_seen: float = field(default_factory=time.monotonic)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: intercept ids this agent has been sent: only then is an intercept ACTIVE,
    #: so a client never sees ACTIVE while its first request still reaches the app
    delivered: set[str] = field(default_factory=set)


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


class Manager(rpc.ManagerServicer):
    def __init__(self, session_ttl: float = 15.0) -> None:
        self.session_ttl = session_ttl
        self.clients: dict[str, ClientSession] = {}
        self.agents: dict[str, AgentSession] = {}
        self.intercepts: dict[str, pb.InterceptInfo] = {}
        self.pending_dials: dict[str, asyncio.Future] = {}
        self.watchers: set[asyncio.Event] = set()
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

    def _client(self, session_id: str) -> ClientSession:
        s = self.clients.get(session_id)
        if s is None:
            raise KeyError(session_id)
        return s

    async def _abort_unknown(self, context: grpc.aio.ServicerContext, session_id: str) -> None:
        await context.abort(grpc.StatusCode.NOT_FOUND, f"session {session_id!r} is not known (expired?)")

    def _agent_for(self, name: str, namespace: str) -> list[AgentSession]:
        return [a for a in self.agents.values() if a.info.name == name and a.info.namespace == namespace]

    def _refresh_states(self) -> None:
        for ic in self.intercepts.values():
            agents = self._agent_for(ic.spec.workload, ic.spec.namespace)
            del ic.pod_ips[:]
            if agents and all(ic.id in a.delivered for a in agents):
                ic.state = pb.InterceptInfo.ACTIVE
                ic.message = ""
            else:
                ic.state = pb.InterceptInfo.WAITING
                ic.message = ("waiting for the traffic-agent to take the intercept" if agents
                              else "waiting for the traffic-agent to report in")
            if agents:
                ic.pod_ips.extend(sorted(a.info.pod_ip for a in agents))
                first = agents[0].info
                ic.environment.clear()
                ic.environment.update(first.environment)
                ic.mount_point = first.mount_point
                ic.agent_port = first.agent_port

    async def expire_loop(self) -> None:
        """End sessions (and their intercepts) whose heartbeats stopped."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for sid, s in list(self.clients.items()):
                if now - s.last_seen > self.session_ttl:
                    log.info("session %s (%s) expired", sid, s.info.name)
                    self._end_session(sid)
            for aid, a in list(self.agents.items()):
                if now - a.last_seen > self.session_ttl:
                    log.info("agent %s (%s/%s) expired", aid, a.info.namespace, a.info.pod_name)
                    del self.agents[aid]
                    self._refresh_states()
                    self._notify()

    def _end_session(self, sid: str) -> None:
        s = self.clients.pop(sid, None)
        if s is not None:
            s.dials.put_nowait(None)
        for iid in [i for i, ic in self.intercepts.items() if ic.session_id == sid]:
            del self.intercepts[iid]
            log.info("intercept %s removed with its session", iid)
        self._notify()

    # ---------------------------------------------------------------- sessions
    async def Version(self, request, context):  # noqa: N802
        return pb.VersionInfo(name="traffic-manager", version=self.image_version, api=API_VERSION)

    async def ArriveAsClient(self, request, context):  # noqa: N802
        sid = uuid.uuid4().hex[:16]
        self.clients[sid] = ClientSession(id=sid, info=request)
        log.info("client %s arrived as session %s", request.name, sid)
        return pb.SessionInfo(session_id=sid)

    async def Remain(self, request, context):  # noqa: N802
        s = self.clients.get(request.session_id)
        if s is None:
            await self._abort_unknown(context, request.session_id)
        s.last_seen = time.monotonic()
        return pb.Empty()

    async def Depart(self, request, context):  # noqa: N802
        if request.session_id in self.clients:
            log.info("session %s departed", request.session_id)
            self._end_session(request.session_id)
        return pb.Empty()

    async def GetClusterInfo(self, request, context):  # noqa: N802
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
        if not self.dns_servers:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the manager pod has no nameserver")
        reply = await dns_query(request.query, self.dns_servers[0])
        return pb.DNSResponse(reply=reply)

    # ---------------------------------------------------------------- tunnels
    async def Tunnel(self, request_iterator, context):  # noqa: N802
        chan = GrpcFrameChannel(context)
        first = await chan.recv()
        if first is None or first.WhichOneof("kind") != "open":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first tunnel frame must be `open`")
        op = first.open
        if op.kind == pb.TunnelOpen.AGENT_INTERCEPTED:
            await self._agent_tunnel(op, chan)
        elif op.kind == pb.TunnelOpen.DIAL_ANSWER:
            await self._client_answer(op, chan)
        else:
            await self._outbound(op, chan)

    async def _outbound(self, op: pb.TunnelOpen, chan: FrameChannel) -> None:
        """A client flow: dial the destination from inside the cluster."""
        if op.session_id not in self.clients:
            await chan.send(pb.TunnelFrame(error="session expired; reconnect"))
            return
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
        await chan.send(pb.TunnelFrame(opened=pb.Empty()))
        await bridge(conn, conn, chan)  # type: ignore[arg-type]

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

    async def _agent_tunnel(self, op: pb.TunnelOpen, chan: FrameChannel) -> None:
        """An agent got a connection for an intercepted workload: fetch the client."""
        iid = op.intercept_id
        ic = self.intercepts.get(iid)
        client = self.clients.get(ic.session_id) if ic else None
        if ic is None or client is None:
            await chan.send(pb.TunnelFrame(error="no such intercept (it ended)"))
            return
        dial_id = uuid.uuid4().hex
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.pending_dials[dial_id] = fut
        client.dials.put_nowait(pb.DialRequest(
            dial_id=dial_id, intercept_id=iid, target_host=ic.spec.target_host or "127.0.0.1",
            port=ic.spec.local_port, peer_ip=op.src_ip, peer_port=op.src_port))
        try:
            peer: FrameChannel = await asyncio.wait_for(fut, CLIENT_ANSWER_TIMEOUT)
        except asyncio.TimeoutError:
            await chan.send(pb.TunnelFrame(error="the intercepting client did not answer"))
            return
        finally:
            self.pending_dials.pop(dial_id, None)
        done: asyncio.Future = peer.done  # type: ignore[attr-defined]
        try:
            await both(_relay(chan, peer), _relay(peer, chan))
        finally:
            if not done.done():
                done.set_result(None)

    async def _client_answer(self, op: pb.TunnelOpen, chan: FrameChannel) -> None:
        """A client's tunnel answering a DialRequest: hand it to the waiting agent tunnel."""
        fut = self.pending_dials.get(op.dial_id)
        if fut is None or fut.done():
            await chan.send(pb.TunnelFrame(error="unknown or expired dial id"))
            return
        chan.done = asyncio.get_running_loop().create_future()  # type: ignore[attr-defined]
        fut.set_result(chan)
        await chan.done  # type: ignore[attr-defined]  # the RPC lives until the relay ends

    # ---------------------------------------------------------------- intercepts
    async def CreateIntercept(self, request, context):  # noqa: N802
        sid = request.session.session_id
        client = self.clients.get(sid)
        if client is None:
            await self._abort_unknown(context, sid)
        spec = request.spec
        for ic in self.intercepts.values():
            if ic.spec.workload == spec.workload and ic.spec.namespace == spec.namespace:
                if ic.session_id == sid:
                    ic.spec.CopyFrom(spec)
                    self._refresh_states()
                    self._notify()
                    return ic
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{spec.namespace}/{spec.workload} is already intercepted by {ic.client_name} "
                    f"(intercept {ic.spec.name!r})")
            if ic.spec.name == spec.name and ic.session_id == sid:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"an intercept named {spec.name!r} exists")
        ic = pb.InterceptInfo(spec=spec, id=uuid.uuid4().hex[:12], session_id=sid, client_name=client.info.name)
        self.intercepts[ic.id] = ic
        self._refresh_states()
        self._notify()
        log.info("intercept %s: %s/%s -> %s:%d for %s", ic.id, spec.namespace, spec.workload,
                 spec.target_host, spec.local_port, client.info.name)
        return ic

    async def RemoveIntercept(self, request, context):  # noqa: N802
        for iid, ic in list(self.intercepts.items()):
            if ic.session_id == request.session_id and ic.spec.name == request.name:
                del self.intercepts[iid]
                self._notify()
                log.info("intercept %s removed", iid)
                return pb.Empty()
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no intercept named {request.name!r} in this session")

    def _snapshot(self, session_id: str) -> pb.InterceptList:
        items = [ic for ic in self.intercepts.values() if not session_id or ic.session_id == session_id]
        return pb.InterceptList(intercepts=items)

    async def WatchIntercepts(self, request, context) -> AsyncIterator[pb.InterceptList]:  # noqa: N802
        ev = asyncio.Event()
        self.watchers.add(ev)
        try:
            while True:
                yield self._snapshot(request.session_id)
                await ev.wait()
                ev.clear()
        finally:
            self.watchers.discard(ev)

    async def WatchDials(self, request, context) -> AsyncIterator[pb.DialRequest]:  # noqa: N802
        client = self.clients.get(request.session_id)
        if client is None:
            await self._abort_unknown(context, request.session_id)
        while True:
            req = await client.dials.get()
            if req is None:
                return
            yield req

    # ---------------------------------------------------------------- agents
    async def ArriveAsAgent(self, request, context):  # noqa: N802
        aid = uuid.uuid4().hex[:16]
        # A restarted agent pod replaces its predecessor's record at once.
        for old, a in list(self.agents.items()):
            if a.info.pod_name == request.pod_name and a.info.namespace == request.namespace:
                del self.agents[old]
        self.agents[aid] = AgentSession(id=aid, info=request)
        log.info("agent %s/%s (pod %s) arrived", request.namespace, request.name, request.pod_name)
        self._refresh_states()
        self._notify()
        return pb.AgentSession(agent_id=aid)

    async def AgentRemain(self, request, context):  # noqa: N802
        a = self.agents.get(request.agent_id)
        if a is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "agent session unknown (manager restarted?)")
        a.last_seen = time.monotonic()
        return pb.Empty()

    async def WatchAgentInstructions(self, request, context) -> AsyncIterator[pb.AgentInstruction]:  # noqa: N802
        a = self.agents.get(request.agent_id)
        if a is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "agent session unknown (manager restarted?)")
        while request.agent_id in self.agents:
            a.changed.clear()
            mine = []
            for ic in self.intercepts.values():
                if ic.spec.workload == a.info.name and ic.spec.namespace == a.info.namespace:
                    serve = pb.InterceptInfo()
                    serve.CopyFrom(ic)
                    serve.state = pb.InterceptInfo.ACTIVE  # to the agent: "serve this"
                    mine.append(serve)
            yield pb.AgentInstruction(intercepts=mine)
            sent = {ic.id for ic in mine}
            if sent != a.delivered:
                a.delivered = sent
                self._refresh_states()
                for ev in list(self.watchers):
                    ev.set()
            try:
                await asyncio.wait_for(a.changed.wait(), 30.0)
            except asyncio.TimeoutError:
                pass

    async def SetLogLevel(self, request, context):  # noqa: N802
        level = getattr(logging, request.level.upper(), None)
        if not isinstance(level, int):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown log level {request.level!r}")
        logging.getLogger().setLevel(level)
        return pb.Empty()


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


async def serve(port: int) -> None:
    server = grpc.aio.server(options=[
        *BULK_GRPC_OPTIONS,
        ("grpc.keepalive_time_ms", 20000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ])
    mgr = Manager(session_ttl=float(os.environ.get("TPNB_SESSION_TTL", "15")))
    # data frames of every tunnel skip protobuf's payload copies (forward.decode_frame)
    rpc.add_ManagerServicer_to_server(mgr, FastTunnelRegistration(server))
    server.add_insecure_port(f"0.0.0.0:{port}")
    await server.start()
    log.info("traffic-manager %s listening on :%d (dns %s, domain %s)", mgr.image_version, port,
             mgr.dns_servers, mgr.cluster_domain)
    expire = asyncio.ensure_future(mgr.expire_loop())
    try:
        await server.wait_for_termination()
    finally:
        expire.cancel()
        await server.stop(2)


def main() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(int(os.environ.get("TPNB_MANAGER_GRPC_PORT", "8081"))))
