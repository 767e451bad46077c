"""The root daemon's one network session: TUN, routes, nftables redirect, DNS, resolv.conf.

Why one object: everything here lives and dies together, and only while its
connector does.  The connector (running as the user) says what to route and
where the tunnels go: the address of its relay to the traffic-manager and the
session id.  The daemon opens its own gRPC channel over that relay, so every
outbound flow is one gRPC stream to the manager with no hop added, and it
never holds a Kubernetes credential.  `close()` undoes all of it in reverse
order, and `netstate` records each change before it is made so a killed
daemon's leftovers are undone by the next start.
"""
from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import os
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import grpc

from tpnb import config as tpnb_config
from tpnb.common.aio import first, undo
from tpnb.common.forward import (
    CLIENT_CHUNK,
    MANAGER_CHANNEL_OPTIONS,
    TUNNEL_METHOD,
    FastGrpcFrameChannel,
    GrpcFrameChannel,
    SendFirst,
    TunnelError,
    bridge,
    decode_frame,
    encode_frame,
)
from tpnb.common.liveness import process_alive
from tpnb.errors import PrerequisiteError, TpnbError
from tpnb.proto import pb, rpc
from tpnb.version import __version__

from . import netstate, resolvconf, routes
from .dns import ClusterResolver
from .handoff import LOST, NOT_MINE, TAKEN, HandoffClient
from .redirect import KernelTcp, SocketFlow, nft_available
from .tun import Flow, Tun

log = logging.getLogger("tpnb.daemon.network")
netlog = logging.getLogger("tpnb.daemon.outbound")

class _DialWatch:
    """A tunnel whose first frame down is the manager's dial result: an "error"
    there is reported to `on_refused` (and still passed on, ending the bridge)."""

    def __init__(self, chan: FastGrpcFrameChannel | SendFirst, on_refused: Callable[[str], None]) -> None:
        self.chan = chan
        self.on_refused = on_refused
        self.first = True

    async def recv(self) -> pb.TunnelFrame | None:
        frame = await self.chan.recv()
        if self.first:
            self.first = False
            if frame is not None and frame.WhichOneof("kind") == "error":
                self.on_refused(frame.error)
        return frame

    async def send(self, frame: pb.TunnelFrame) -> None:
        await self.chan.send(frame)

    async def send_data(self, data: bytes) -> None:
        await self.chan.send_data(data)

    async def done_sending(self) -> None:
        await self.chan.done_sending()

    def cancel(self) -> None:
        self.chan.cancel()


class _FlowTransport:
    def __init__(self, flow: Flow) -> None:
        self.flow = flow

    def abort(self) -> None:
        self.flow.close()


class FlowWriter:
    """A TUN flow with the StreamWriter surface the shared pumps use."""

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self.transport = _FlowTransport(flow)

    def write(self, data: bytes) -> None:
        self.flow.write(data)

    async def drain(self) -> None:
        await self.flow.drain()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.flow.write_eof()

    def close(self) -> None:
        self.flow.close()


class ManagerTunnels:
    """The daemon's own gRPC channel to the manager, over the connector's relay.

    Keeps `pool` Tunnel RPCs started ahead of need (HTTP/2 stream open, the
    manager's handler waiting for the `open` frame): starting an RPC costs
    about a millisecond on each end, which a new connection then skips.  A
    spare is still an ordinary Tunnel call; one the channel lost (manager
    restarted, relink) is dropped when taken.
    """

    def __init__(self, address: str, pool: int | None = None) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=MANAGER_CHANNEL_OPTIONS)
        self.stub = rpc.ManagerStub(self.channel)
        self.pool = tpnb_config.get().daemon.tunnel_pool if pool is None else pool
        self._spares: collections.deque[grpc.aio.StreamStreamCall] = collections.deque()
        self._closed = False
        self._refilling = False
        #: the manager takes the client's first bytes inside the `open` frame (VersionInfo.features)
        self.early_data = False
        self._features: asyncio.Task[None] | None = None
        self._probe_features()

    def _probe_features(self) -> None:
        try:
            self._features = asyncio.get_running_loop().create_task(self._ask_features())
        except RuntimeError:
            self._features = None  # no loop (tests constructing it bare): no optional features

    async def _ask_features(self) -> None:
        try:
            ver = await self.stub.Version(pb.Empty(), timeout=30)
        except grpc.aio.AioRpcError as exc:
            log.debug("manager features not known (%s); asking again with the next flow", exc.code().name)
            self._features = None
            return
        self.early_data = "early-data" in ver.features

    def _new_call(self) -> grpc.aio.StreamStreamCall:
        return self.channel.stream_stream(TUNNEL_METHOD, request_serializer=encode_frame,
                                          response_deserializer=decode_frame)()

    def fast_tunnel(self) -> grpc.aio.StreamStreamCall:
        """A Tunnel call whose data frames skip protobuf (`forward.encode_frame`/`decode_frame`)."""
        call = None
        while self._spares:
            spare = self._spares.popleft()
            if not spare.done():
                call = spare
                break
        if call is None:
            call = self._new_call()
        if self._features is None and not self._closed:
            self._probe_features()
        if not self._refilling:
            # after this flow's first write is on its way: starting calls is not free
            self._refilling = True
            asyncio.get_running_loop().call_soon(self._refill)
        return call

    def _refill(self) -> None:
        """Top the spares up (a spare is started right away: grpc.aio sends its headers)."""
        self._refilling = False
        if self._closed:
            return
        # a channel that cannot connect must not pile up failing calls
        if self.channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            return
        while len(self._spares) < self.pool:
            self._spares.append(self._new_call())

    async def aclose(self) -> None:
        self._closed = True
        if self._features is not None:
            self._features.cancel()
        while self._spares:
            self._spares.popleft().cancel()
        await self.channel.close()


@dataclass
class Network:
    request: pb.NetworkRequest
    cfg: tpnb_config.Config = field(default_factory=tpnb_config.get)
    #: what to do when the connector dies (the server's: take this network down); default: close()
    on_connector_gone: Callable[[], Awaitable[None]] | None = None

    link: ManagerTunnels | None = None
    session_id: str = ""
    routed: list[str] = field(default_factory=list)
    tun: Tun | None = None
    #: the kernel-TCP path for TCP to the cluster (None: TCP goes through the TUN)
    kernel_tcp: KernelTcp | None = None
    #: why the kernel-TCP path is off, when it is
    tcp_engine_note: str = ""
    resolver: ClusterResolver | None = None
    resolv: resolvconf.ResolvConf | resolvconf.ResolvedLink | None = None
    namespaces: set[str] = field(default_factory=set)
    mapped: list[str] = field(default_factory=list)
    #: the link to the connector's direct data plane (None: every flow goes to the manager)
    handoff: HandoffClient | None = None
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _closing: bool = False

    @property
    def subnets(self) -> list[str]:
        return list(self.request.subnets)

    async def start(self) -> None:
        self.update(self.request)
        await self._network_up()
        self._tasks.append(asyncio.ensure_future(self._connector_watch()))

    def update(self, req: pb.NetworkRequest) -> None:
        """Follow the connector: a new relay address or session after a relink, new namespaces."""
        if self.link is None or self.link.address != req.manager_address:
            old = self.link
            self.link = ManagerTunnels(req.manager_address)
            if old is not None:
                self._tasks.append(asyncio.ensure_future(old.aclose()))
        self._follow_handoff(req)
        self.session_id = req.session_id
        self.namespaces = set(req.namespaces)
        self.mapped = list(req.mapped_namespaces)
        if self.resolver is not None:
            self.resolver.set_mapped_namespaces(list(self.mapped))
        self.request = req

    def _follow_handoff(self, req: pb.NetworkRequest) -> None:
        """Link to the connector's hand-off socket when it announces its direct plane (again when
        the socket or secret changed); drop the link when it no longer does."""
        cur = self.handoff
        if cur is not None and (cur.path, cur.secret) == (req.handoff_socket, req.handoff_secret):
            return
        if cur is not None:
            self.handoff = None
            self._tasks.append(asyncio.ensure_future(cur.aclose()))
        if req.handoff_socket and req.handoff_secret and req.connector_pid:
            owner = os.environ.get("TPNB_OWNER_UID", "")
            self.handoff = HandoffClient(req.handoff_socket, req.handoff_secret, req.connector_pid,
                                         int(owner) if owner.isdigit() else None)
            self.handoff.start()

    async def _connector_watch(self) -> None:
        """No connector, no network: a killed connector must not leave the machine's DNS pointing here."""
        pid, start = self.request.connector_pid, self.request.connector_start or None
        if not pid:
            return
        while not self._closing:
            await asyncio.sleep(1.0)
            if not process_alive(pid, start):
                log.warning("connector %d is gone; taking the network down", pid)
                await (self.on_connector_gone or self.close)()
                return

    def status(self) -> pb.NetworkStatus:
        return pb.NetworkStatus(
            up=self.tun is not None, tun_name=self.tun.name if self.tun else "", dns_ip=self.cfg.daemon.dns_ip,
            tcp_engine=("kernel" if self.kernel_tcp else "tun") if self.tun else "",
            tcp_engine_note=self.tcp_engine_note, routed=self.routed, version=__version__,
            handoff=self.handoff.status() if self.handoff is not None else None)

    async def _network_up(self) -> None:
        """TUN, routes and DNS; each change is recorded in netstate before it is made."""
        cfg = self.cfg.daemon
        await netstate.recover()  # also removes stale tpnb* devices and nft tables without a record
        state = netstate.StateFile()
        self.resolv = resolvconf.system_dns(cfg.tun_name)
        fallback: list[str] = []
        search: list[str] = []
        if isinstance(self.resolv, resolvconf.ResolvConf):
            fallback = [s for s in self.resolv.original_nameservers() if s != cfg.dns_ip]
            search = self.resolv.original_search()
        subnets = self.subnets
        self.resolver = ClusterResolver(
            lookup=self._dns_lookup,
            cluster_domain=self.request.cluster_domain or "cluster.local",
            namespaces=lambda: self.namespaces | set(self.mapped),
            mapped_namespaces=list(self.mapped),
            fallback=fallback,
            search=search,
            subnets=subnets,
        )
        state.record_tun(cfg.tun_name)
        self.tun = Tun(cfg.tun_name, self._on_tcp, self._on_udp, dns_ip=cfg.dns_ip,
                       dns_handler=self.resolver.handle)
        await self.tun.__aenter__()
        wanted = subnets + [f"{cfg.dns_ip}/32"]
        state.record_routes(wanted)
        self.routed = await routes.add_routes(self.tun.name, wanted)
        await self._kernel_tcp_up(state, [r for r in self.routed if r != f"{cfg.dns_ip}/32"])
        domains = self.resolver.search_domains()
        if isinstance(self.resolv, resolvconf.ResolvConf):
            state.record_resolv(self.resolv)
        else:
            state.record_resolved(self.tun.name)
            domains = [self.resolver.cluster_domain] + sorted(self.namespaces)
        await asyncio.to_thread(self.resolv.install, cfg.dns_ip, domains)
        log.info("network up: %s routes %s, resolver %s, search %s", self.tun.name, self.routed,
                 cfg.dns_ip, domains)

    async def _kernel_tcp_up(self, state: netstate.StateFile, cidrs: list[str]) -> None:
        """Move TCP to the cluster onto the kernel's TCP stack when allowed and possible.

        `daemon.tcp_engine`: "kernel" requires it, "auto" falls back to the TUN
        (with the reason in the log and `tpnb status`), "tun" never tries.
        """
        engine = self.cfg.daemon.tcp_engine
        if engine == "tun":
            self.tcp_engine_note = "daemon.tcp_engine is tun"
            return
        why = nft_available()
        if why is None:
            kt = KernelTcp(self.cfg.daemon.tun_name, self._on_tcp)
            state.record_nft_table(kt.table)
            try:
                await kt.__aenter__()
                await kt.redirect(cidrs)
            except TpnbError as exc:
                await kt.aclose()
                why = f"{exc.what}: {exc.why}" if exc.why else exc.what
            else:
                self.kernel_tcp = kt
                self.tcp_engine_note = ""
                return
        if engine == "kernel":
            raise PrerequisiteError("daemon.tcp_engine is kernel, but the kernel TCP path is unavailable", why,
                                    "install nftables, or set daemon.tcp_engine to auto")
        self.tcp_engine_note = why
        log.warning("TCP goes through the TUN engine (slower): %s", why)

    # ================================================================ flows
    async def _dns_lookup(self, query: bytes) -> bytes:
        link = self.link
        if link is None:
            raise ConnectionError("not linked to the traffic-manager")
        reply = await link.stub.LookupDNS(pb.DNSRequest(session_id=self.session_id, query=bytes(query)), timeout=4)
        return reply.reply

    async def _open_tunnel(self, open_: pb.TunnelOpen) -> tuple[GrpcFrameChannel | None, str]:
        link = self.link
        if link is None:
            return None, "not linked to the traffic-manager"
        chan = GrpcFrameChannel(link.stub.Tunnel())
        try:
            await chan.send(pb.TunnelFrame(open=open_))
            first = await chan.recv()
        except TunnelError as exc:
            return None, str(exc)
        if first is None:
            return None, "tunnel closed"
        if first.WhichOneof("kind") == "error":
            chan.cancel()
            return None, first.error
        return chan, ""

    def _tunnel_open(self, flow: Flow | SocketFlow, protocol: int) -> pb.TunnelOpen:
        return pb.TunnelOpen(session_id=self.session_id, protocol=protocol,
                             dst_ip=ipaddress.ip_address(flow.dst[0]).packed, dst_port=flow.dst[1],
                             src_ip=ipaddress.ip_address(flow.src[0]).packed, src_port=flow.src[1])

    @staticmethod
    def _refuse(flow: Flow | SocketFlow, why: str) -> None:
        """Log a refused flow and end it: a reset where the kernel holds the connection."""
        netlog.info("%s %s:%d -> %s:%d refused: %s", flow.protocol, *flow.src, *flow.dst, why)
        if isinstance(flow, SocketFlow):
            flow.refuse()  # the client sees a reset, as from a closed port
        else:
            flow.close()

    async def _flow_tunnel(self, flow: Flow, protocol: int) -> GrpcFrameChannel | None:
        """Open the manager-side dial for a TUN flow; None (flow closed) when refused."""
        chan, err = await self._open_tunnel(self._tunnel_open(flow, protocol))
        if chan is None:
            self._refuse(flow, err)
        return chan

    async def _on_tcp(self, flow: Flow | SocketFlow) -> None:
        if self._closing:
            self._refuse(flow, "the network is going down")
            return
        if isinstance(flow, SocketFlow):
            await self._on_kernel_tcp(flow)
            return
        chan = await self._flow_tunnel(flow, pb.TunnelOpen.TCP)
        if chan is None:
            return
        try:
            await bridge(flow, FlowWriter(flow), chan)  # type: ignore[arg-type]
        finally:
            flow.close()

    async def _on_kernel_tcp(self, flow: SocketFlow) -> None:
        """A redirected connection: the client's first bytes follow the open frame at once.

        No round trip waiting for the manager's "opened": its dial result
        arrives as the first frame down the tunnel, and an "error" there ends
        the connection with a reset, as a closed port in the cluster would.
        Saves one round trip through the API server per new connection.  When
        the manager takes "early-data", bytes the client already sent travel
        inside the `open` frame (one gRPC message fewer), and the Tunnel call
        comes from the link's pool of started ones.

        First, when the connector runs the direct data plane, the connection
        itself is offered to it (daemon/handoff.py); only what it leaves
        ("not mine") goes on to the manager.
        """
        handoff = self.handoff
        if handoff is not None and handoff.ready:
            verdict, why = await handoff.offer(flow.sock, flow.dst, flow.src)
            if verdict == TAKEN:
                netlog.debug("tcp %s:%d -> %s:%d handed to the connector's direct plane", *flow.src, *flow.dst)
                return  # our copy of the socket is closed by the caller; the connector's carries on
            if verdict != NOT_MINE:
                self._refuse(flow, why if verdict != LOST else f"hand-off: {why}")
                return
        link = self.link
        if link is None:
            self._refuse(flow, "not linked to the traffic-manager")
            return
        chan = FastGrpcFrameChannel(link.fast_tunnel())
        open_ = self._tunnel_open(flow, pb.TunnelOpen.TCP)
        if link.early_data:
            # the client usually wrote its request before we got to accept: it rides in `open`
            try:
                open_.early_data = flow.sock.recv(CLIENT_CHUNK)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                chan.cancel()
                self._refuse(flow, f"client connection: {exc}")
                return
        # the pumps start while `open` is written (its completion takes a trip through grpc's
        # completion queue); a failed write or RPC ends the bridge with a reset, as a refusal does
        first = SendFirst(chan, pb.TunnelFrame(open=open_))
        try:
            await bridge(flow.reader, flow.writer,  # type: ignore[arg-type]
                         _DialWatch(first, lambda why: self._refuse(flow, why)), chunk=CLIENT_CHUNK)
        finally:
            flow.close()

    async def _on_udp(self, flow: Flow) -> None:
        chan = await self._flow_tunnel(flow, pb.TunnelOpen.UDP)
        if chan is None:
            return

        async def up() -> None:
            while True:
                data = await flow.read(65536)
                if not data:
                    return
                await chan.send(pb.TunnelFrame(data=data))

        async def down() -> None:
            while True:
                frame = await chan.recv()
                if frame is None or frame.WhichOneof("kind") != "data":
                    return
                flow.write(frame.data)

        try:
            await first(up(), down())
        finally:
            chan.cancel()
            flow.close()

    async def close(self) -> None:
        """Undo everything, in reverse order; each step runs even if one before failed."""
        self._closing = True
        me = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not me]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        if self.resolv is not None:
            resolv = self.resolv

            async def _restore() -> None:
                await asyncio.to_thread(resolv.restore)
            steps.append(("resolv.conf", _restore))
        # routes first: from then on a new connection fails at once (no route) instead of
        # reaching a half-dismantled path -- with the redirect gone but the routes still up, a
        # SYN would be answered by the TUN engine just before the TUN goes, and hang the client
        tun = self.tun
        if tun is not None:
            routed = list(self.routed)

            async def _routes() -> None:
                await routes.remove_routes(tun.name, routed)
            steps.append(("routes", _routes))
        if self.kernel_tcp is not None:
            steps.append(("nft redirect", self.kernel_tcp.aclose))
        if tun is not None:
            async def _tun() -> None:
                await tun.__aexit__(None, None, None)
            steps.append(("tun", _tun))
        if self.link is not None:
            steps.append(("manager tunnels", self.link.aclose))
        if self.handoff is not None:
            steps.append(("hand-off link", self.handoff.aclose))
        await undo(steps, log)
        try:
            await netstate.recover()
        except Exception as exc:  # noqa: BLE001
            log.error("netstate recovery failed: %s", exc)
        self.link = None
        self.handoff = None
        self.tun = None
        self.kernel_tcp = None
        log.info("network down (session %s)", self.session_id)


