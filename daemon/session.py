"""One connected session: the daemon's whole state while `connect`ed.

Why one object: everything here lives and dies together.  The TUN, routes and
resolv.conf are only correct while the manager link is up; intercepts only
mean something while the session's heartbeats reach the manager.  `close()`
undoes all of it in reverse order, and `netstate` records each change before
it is made so a killed daemon's leftovers are undone by the next start.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import anyio
import grpc

from tpnb import config as tpnb_config
from tpnb.errors import ClusterError, InterceptError, NotConnected, PrerequisiteError, TpnbError
from tpnb.proto import pb, rpc
from tpnb.version import API_VERSION, __version__

from . import kube, manager_install, netstate, resolvconf, routes
from .redirect import KernelTcp, SocketFlow, nft_available
from .tun import Flow, Tun
from .dns import ClusterResolver
from .portforward import PortForward
from tpnb.cluster.aio import first, oserror_text
from tpnb.cluster.forward import (
    BULK_GRPC_OPTIONS,
    CLIENT_CHUNK,
    STREAM_LIMIT,
    FastGrpcFrameChannel,
    GrpcFrameChannel,
    TunnelError,
    bridge,
    decode_frame,
    encode_frame,
)

log = logging.getLogger("tpnb.daemon.session")
netlog = logging.getLogger("tpnb.daemon.outbound")

ProgressFn = Callable[[str, str, float], None]

#: the Manager service's Tunnel method (see tpnb.proto)
TUNNEL_METHOD = "/tpnb.v1.Manager/Tunnel"

GRPC_OPTIONS = [
    *BULK_GRPC_OPTIONS,
    ("grpc.keepalive_time_ms", 10000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # one HTTP/2 connection carries every flow: let it use large windows
    ("grpc.http2.bdp_probe", 1),
]


class _DialWatch:
    """A tunnel whose first frame down is the manager's dial result: an "error"
    there is reported to `on_refused` (and still passed on, ending the bridge)."""

    def __init__(self, chan: FastGrpcFrameChannel, on_refused: Callable[[str], None]) -> None:
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


def _cidr(net: pb.IPNet) -> str:
    return f"{ipaddress.ip_address(net.ip)}/{net.prefix}"


@dataclass
class ManagerLink:
    """The port-forward and gRPC channel to one manager pod."""

    pod: str
    forward: PortForward
    channel: grpc.aio.Channel
    stub: rpc.ManagerStub
    version: str

    def fast_tunnel(self) -> grpc.aio.StreamStreamCall:
        """A Tunnel call whose data frames skip protobuf (`forward.encode_frame`/`decode_frame`)."""
        return self.channel.stream_stream(TUNNEL_METHOD, request_serializer=encode_frame,
                                          response_deserializer=decode_frame)()

    async def aclose(self) -> None:
        try:
            await self.channel.close()
        finally:
            await self.forward.aclose()


@dataclass
class Session:
    request: pb.ConnectRequest
    cfg: tpnb_config.Config = field(default_factory=tpnb_config.get)

    target: kube.KubeTarget | None = None
    link: ManagerLink | None = None
    session_id: str = ""
    cluster: pb.ClusterInfo | None = None
    pod_subnets: list[str] = field(default_factory=list)
    service_subnets: list[str] = field(default_factory=list)
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
    intercepts: dict[str, pb.InterceptInfo] = field(default_factory=dict)
    #: the manager's latest view of this session's intercepts, by id (it can run
    #: ahead of a CreateIntercept reply: the agent may take it within milliseconds)
    remote: dict[str, pb.InterceptInfo] = field(default_factory=dict)
    #: intercept name -> (pid, start ticks) of the process whose life it is tied to
    owners: dict[str, tuple[int, int]] = field(default_factory=dict)
    last_error: str = ""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _reconnect_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _closing: bool = False

    # ================================================================ connect
    async def start(self, progress: ProgressFn) -> None:
        req = self.request
        progress("kubeconfig", "Reading kubeconfig...", 0.02)
        self.target = await anyio.to_thread.run_sync(
            kube.load_target, req.kubeconfig or None, req.context or None)
        ns = req.namespace or self.target.namespace or "default"
        self.mapped = [ns] + [m for m in req.mapped_namespaces if m and m != ns]
        progress("api", f"Contacting the API server {self.target.server}...", 0.05)
        await kube.check_reachable(self.target, self.cfg.timeouts.api)

        progress("manager", "Connecting to traffic manager...", 0.1)
        if req.install_manager:
            await manager_install.ensure_manager(self.target, self.cfg.manager_image, progress)
        await self._open_link()
        await self._arrive()
        progress("network", "Setting up the network (TUN, routes, DNS)...", 0.85)
        try:  # known before the first lookup, so "svc.ns" names resolve at once
            self.namespaces = await anyio.to_thread.run_sync(_list_namespaces, self.target)
        except Exception as exc:  # noqa: BLE001 - the refresh loop retries
            log.info("cannot list namespaces yet: %s", exc)
        await self._network_up()
        self._tasks = [
            asyncio.ensure_future(self._heartbeat_loop()),
            asyncio.ensure_future(self._dials_loop()),
            asyncio.ensure_future(self._namespaces_loop()),
            asyncio.ensure_future(self._watch_intercepts_loop()),
        ]
        self.changed.set()
        progress("connected", f"Connected to context {self.target.context} ({self.target.server})", 1.0)

    async def _open_link(self) -> None:
        assert self.target is not None
        pod = await manager_install.find_manager_pod(self.target)
        fwd = PortForward(self.target, self.cfg.manager.namespace, pod, self.cfg.manager.grpc_port, unix=True)
        await fwd.start()
        channel = grpc.aio.insecure_channel(fwd.address, options=GRPC_OPTIONS)
        stub = rpc.ManagerStub(channel)
        try:
            ver = await stub.Version(pb.Empty(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            await channel.close()
            await fwd.aclose()
            raise ClusterError(
                "the traffic-manager does not answer",
                f"{exc.code().name}: {exc.details()}",
                f"check `kubectl -n {self.cfg.manager.namespace} logs deploy/traffic-manager`",
            ) from None
        if ver.api != API_VERSION:
            log.warning("manager speaks api %d, we speak %d", ver.api, API_VERSION)
        self.link = ManagerLink(pod=pod, forward=fwd, channel=channel, stub=stub, version=ver.version)
        log.info("linked to traffic-manager %s (pod %s) via %s", ver.version, pod, fwd.address)

    async def _arrive(self) -> None:
        assert self.link is not None and self.target is not None
        stub = self.link.stub
        info = pb.ClientInfo(name=self.request.user or _whoami(), install_id=tpnb_config.netns_id(),
                             version=__version__, kube_context=self.target.context)
        sess = await stub.ArriveAsClient(info, timeout=10)
        self.session_id = sess.session_id
        self.cluster = await stub.GetClusterInfo(sess, timeout=15)
        pods = [_cidr(n) for n in self.cluster.pod_subnets]
        try:
            kpods, ksvcs = await kube.cluster_subnets(self.target)
        except TpnbError as exc:
            log.warning("cannot read cluster subnets with the user's credentials: %s", exc)
            kpods, ksvcs = [], []
        self.pod_subnets = sorted(set(pods) | set(kpods))
        self.service_subnets = sorted(set(ksvcs))
        log.info("session %s: pod subnets %s, service subnets %s", self.session_id,
                 self.pod_subnets, self.service_subnets)
        # intercepts survive a manager restart: claim them again
        for name, ic in list(self.intercepts.items()):
            try:
                new = await stub.CreateIntercept(
                    pb.CreateInterceptRequest(session=pb.SessionInfo(session_id=self.session_id), spec=ic.spec),
                    timeout=10)
                self.intercepts[name] = new
            except grpc.aio.AioRpcError as exc:
                log.error("could not restore intercept %s: %s", name, exc.details())
                del self.intercepts[name]

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
        subnets = list(dict.fromkeys(self.pod_subnets + self.service_subnets + list(self.request.also_proxy)))
        self.resolver = ClusterResolver(
            lookup=self._dns_lookup,
            cluster_domain=(self.cluster.cluster_domain if self.cluster else "") or "cluster.local",
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
        Saves one round trip through the API server per new connection.
        """
        link = self.link
        if link is None:
            self._refuse(flow, "not linked to the traffic-manager")
            return
        chan = FastGrpcFrameChannel(link.fast_tunnel())
        try:
            await chan.send(pb.TunnelFrame(open=self._tunnel_open(flow, pb.TunnelOpen.TCP)))
        except TunnelError as exc:
            self._refuse(flow, str(exc))
            return
        try:
            await bridge(flow.reader, flow.writer,  # type: ignore[arg-type]
                         _DialWatch(chan, lambda why: self._refuse(flow, why)), chunk=CLIENT_CHUNK)
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

    async def _answer_dial(self, req: pb.DialRequest) -> None:
        """The manager asks us to connect an intercepted connection to a local port."""
        open_ = pb.TunnelOpen(session_id=self.session_id, dial_id=req.dial_id, protocol=pb.TunnelOpen.TCP)
        link = self.link
        if link is None:
            return
        chan = GrpcFrameChannel(link.stub.Tunnel())
        try:
            await chan.send(pb.TunnelFrame(open=open_))
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(req.target_host or "127.0.0.1", req.port, limit=STREAM_LIMIT), 5)
            except (OSError, asyncio.TimeoutError) as exc:
                why = "timed out" if isinstance(exc, asyncio.TimeoutError) else oserror_text(exc)
                log.warning("intercept %s: cannot reach %s:%d: %s", req.intercept_id, req.target_host, req.port, why)
                await chan.send(pb.TunnelFrame(error=f"local {req.target_host}:{req.port}: {why}"))
                await chan.done_sending()
                return
            await chan.send(pb.TunnelFrame(opened=pb.Empty()))
            await bridge(reader, writer, chan)  # finishes the channel so the manager reads our last frames
        except TunnelError as exc:
            log.debug("dial %s ended: %s", req.dial_id, exc)
        finally:
            chan.cancel()

    # ================================================================ background loops
    async def _heartbeat_loop(self) -> None:
        period = self.cfg.daemon.heartbeat_seconds
        while not self._closing:
            await asyncio.sleep(period)
            link = self.link
            try:
                if link is None:
                    raise ConnectionError("no link")
                await link.stub.Remain(pb.SessionInfo(session_id=self.session_id), timeout=period)
                if self.last_error:
                    self.last_error = ""
                    self.changed.set()
            except (grpc.aio.AioRpcError, ConnectionError, OSError) as exc:
                why = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                log.warning("lost the traffic-manager (%s); reconnecting", why)
                self.last_error = f"reconnecting to traffic-manager: {why}"
                self.changed.set()
                await self._reconnect()

    async def _reconnect(self) -> None:
        """New manager pod or broken port-forward: relink, keep TUN/DNS as they are."""
        async with self._reconnect_lock:
            delay = 0.3
            while not self._closing:
                old = self.link
                self.link = None
                if old is not None:
                    try:
                        await old.aclose()
                    except Exception:  # noqa: BLE001
                        pass
                try:
                    await self._open_link()
                    await self._arrive()
                    log.info("reconnected: session %s", self.session_id)
                    self.last_error = ""
                    self.changed.set()
                    return
                except (TpnbError, grpc.aio.AioRpcError, OSError) as exc:
                    self.last_error = f"reconnecting to traffic-manager: {exc}"
                    log.info("reconnect attempt failed: %s", str(exc).splitlines()[0])
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 3.0)

    async def _follow(self, what: str, open_stream: Callable[[rpc.ManagerStub], Callable[..., AsyncIterator]],
                      handle: Callable[[object], None]) -> None:
        """Keep one of the manager's server streams open across reconnects, handing on each message."""
        while not self._closing:
            link, sid = self.link, self.session_id
            if link is None:
                await asyncio.sleep(0.3)
                continue
            try:
                async for msg in open_stream(link.stub)(pb.SessionInfo(session_id=sid)):
                    handle(msg)
            except grpc.aio.AioRpcError as exc:
                log.debug("%s ended: %s", what, exc.code().name)
            await asyncio.sleep(0.3)

    def _dials_loop(self) -> Awaitable[None]:
        return self._follow("WatchDials", lambda stub: stub.WatchDials,
                            lambda req: asyncio.ensure_future(self._answer_dial(req)))

    def _watch_intercepts_loop(self) -> Awaitable[None]:
        return self._follow("WatchIntercepts", lambda stub: stub.WatchIntercepts, self._on_intercepts)

    def _on_intercepts(self, lst: pb.InterceptList) -> None:
        self.remote = {ic.id: ic for ic in lst.intercepts}
        for name, mine in list(self.intercepts.items()):
            if mine.id in self.remote:
                self.intercepts[name] = self.remote[mine.id]
        self.changed.set()

    async def _namespaces_loop(self) -> None:
        """Keep the namespace list fresh so `svc.ns` names resolve."""
        while not self._closing:
            try:
                self.namespaces = await anyio.to_thread.run_sync(_list_namespaces, self.target)
            except Exception as exc:  # noqa: BLE001 - resolution degrades, never breaks
                log.debug("cannot list namespaces: %s", exc)
            await asyncio.sleep(20)

    # ================================================================ intercepts
    def map_namespace(self, ns: str) -> None:
        if ns not in self.mapped:
            self.mapped.append(ns)
            if self.resolver is not None:
                self.resolver.set_mapped_namespaces(list(self.mapped))

    def unmap_unused(self) -> None:
        keep = [self.mapped[0]] + [m for m in self.request.mapped_namespaces if m]
        keep += [ic.spec.namespace for ic in self.intercepts.values()]
        self.mapped = list(dict.fromkeys(m for m in self.mapped if m in keep))
        if self.resolver is not None:
            self.resolver.set_mapped_namespaces(list(self.mapped))

    async def create_intercept(self, spec: pb.InterceptSpec) -> pb.InterceptInfo:
        link = self.require_link()
        try:
            ic = await link.stub.CreateIntercept(
                pb.CreateInterceptRequest(session=pb.SessionInfo(session_id=self.session_id), spec=spec),
                timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise InterceptError(f"cannot intercept {spec.namespace}/{spec.workload}", exc.details() or "",
                                 hint=_intercept_hint(exc)) from None
        self.intercepts[spec.name] = self.remote.get(ic.id, ic)
        self.map_namespace(spec.namespace)
        self.changed.set()
        return ic

    def tie_to_owner(self, name: str, pid: int) -> None:
        """End intercept `name` once process `pid` is gone (a killed kernel included)."""
        start = resolvconf.start_ticks(pid)
        if start is None:
            log.warning("intercept %s: owner process %d is already gone", name, pid)
            start = -1
        self.owners[name] = (pid, start)
        self._tasks.append(asyncio.ensure_future(self._owner_loop(name, (pid, start))))

    async def _owner_loop(self, name: str, owner: tuple[int, int]) -> None:
        pid, start = owner
        while self.owners.get(name) == owner and not self._closing:
            if not resolvconf.process_alive(pid, start):
                log.info("intercept %s: its owner process %d is gone; leaving", name, pid)
                try:
                    await self.remove_intercept(name)
                except TpnbError as exc:
                    log.warning("could not end intercept %s: %s", name, exc)
                return
            await asyncio.sleep(1.0)

    async def remove_intercept(self, name: str) -> None:
        if name not in self.intercepts:
            raise InterceptError(f"no intercept named {name!r}",
                                 hint="`tpnb list` shows the intercepts of this session")
        link = self.require_link()
        try:
            await link.stub.RemoveIntercept(pb.RemoveInterceptRequest(session_id=self.session_id, name=name),
                                            timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise InterceptError(f"cannot leave {name}", exc.details() or "") from None
        self.intercepts.pop(name, None)
        self.owners.pop(name, None)
        self.unmap_unused()
        self.changed.set()

    def require_link(self) -> ManagerLink:
        if self.link is None:
            raise NotConnected("the traffic-manager link is down", self.last_error,
                               "wait a few seconds and retry; `tpnb status` shows the state")
        return self.link

    # ================================================================ status / close
    def status(self) -> pb.ConnectionStatus:
        st = pb.ConnectionStatus(
            connected=self.link is not None or bool(self.last_error),
            namespace=self.mapped[0] if self.mapped else "",
            mapped_namespaces=self.mapped,
            pod_subnets=self.pod_subnets,
            service_subnets=self.service_subnets,
            also_proxy=list(self.request.also_proxy),
            dns_ip=self.cfg.daemon.dns_ip,
            tun_name=self.tun.name if self.tun else "",
            tcp_engine=("kernel" if self.kernel_tcp else "tun") if self.tun else "",
            tcp_engine_note=self.tcp_engine_note,
            manager_version=self.link.version if self.link else "",
            manager_namespace=self.cfg.manager.namespace,
            session_id=self.session_id,
            daemon_version=__version__,
            intercepts=list(self.intercepts.values()),
            error=self.last_error,
        )
        if self.target is not None:
            st.context = self.target.context
            st.server = self.target.server
        return st

    async def close(self) -> None:
        """Undo everything, in reverse order; each step runs even if one before failed."""
        self._closing = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.link is not None and self.session_id:
            try:
                await self.link.stub.Depart(pb.SessionInfo(session_id=self.session_id), timeout=3)
            except grpc.aio.AioRpcError as exc:
                log.info("depart: %s", exc.code().name)
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        if self.resolv is not None:
            resolv = self.resolv

            async def _restore() -> None:
                await asyncio.to_thread(resolv.restore)
            steps.append(("resolv.conf", _restore))
        if self.kernel_tcp is not None:
            steps.append(("nft redirect", self.kernel_tcp.aclose))
        if self.tun is not None:
            tun, routed = self.tun, list(self.routed)

            async def _routes() -> None:
                await routes.remove_routes(tun.name, routed)
            steps.append(("routes", _routes))

            async def _tun() -> None:
                await tun.__aexit__(None, None, None)
            steps.append(("tun", _tun))
        if self.link is not None:
            steps.append(("manager link", self.link.aclose))
        for what, step in steps:
            try:
                await step()
            except Exception as exc:  # noqa: BLE001 - keep undoing the rest
                log.error("cleanup of %s failed: %s", what, exc)
        try:
            await netstate.recover()
        except Exception as exc:  # noqa: BLE001
            log.error("netstate recovery failed: %s", exc)
        self.link = None
        self.tun = None
        self.kernel_tcp = None
        self.changed.set()
        log.info("session %s closed", self.session_id)


def _intercept_hint(exc: grpc.aio.AioRpcError) -> str:
    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
        return "ask the holder to `tpnb leave` it, or intercept another workload"
    return ""


def _list_namespaces(target: kube.KubeTarget | None) -> set[str]:
    from kubernetes import client

    if target is None:
        return set()
    items = client.CoreV1Api(target.api).list_namespace(_request_timeout=10).items
    return {n.metadata.name for n in items}


def _whoami() -> str:
    user = os.environ.get("SUDO_USER") or os.environ.get("USER") or "root"
    return f"{user}@{socket.gethostname()}"



