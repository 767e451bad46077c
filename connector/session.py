"""One connected session: the connector's whole state while `connect`ed.

The connector runs as the invoking user with the user's kubeconfig (and its
exec credential plugins).  It owns the manager link (one port-forward through
the API server, gRPC multiplexed over it), the session's heartbeats, the
intercepts and their dials back to local ports, and the namespace list.
System-wide outbound (TUN, routes, DNS) is the root daemon's: when one runs,
the session hands it the address of its relay to the manager, the session id
and the subnets, and keeps it up to date (`_push_network`).  Without a root
daemon everything but system-wide outbound works.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import anyio
import grpc

from tpnb import config as tpnb_config
from tpnb.errors import ClusterError, InterceptError, NotConnected, TpnbError
from tpnb.proto import pb, rpc
from tpnb.version import API_VERSION, __version__

from tpnb.common.aio import oserror_text, undo
from tpnb.common.forward import (MANAGER_CHANNEL_OPTIONS, STREAM_LIMIT, GrpcFrameChannel, TunnelError, bridge,
                                 data_frame)
from tpnb.common.liveness import process_alive, start_ticks

from . import kube, manager_install
from .agentlink import AgentLinks
from .clusterdns import ClusterNames
from .direct import DirectDialRefused, DirectPlane
from .handoff import HandoffServer
from .portforward import PortForward
from .proxy import OutboundProxy, Pipe, Refused, Route, direct_pipe
from .rootd import RootDaemonLink

log = logging.getLogger("tpnb.connector.session")

ProgressFn = Callable[[str, str, float], None]


def _cidr(net: pb.IPNet) -> str:
    return f"{ipaddress.ip_address(net.ip)}/{net.prefix}"


def collapsed(cidrs: list[str]) -> list[str]:
    """The fewest subnets that cover `cidrs` (the manager's cluster-wide pod range and the nodes' podCIDRs
    inside it become the one range): one route each, and `status` lists each address once."""
    nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    out: list[str] = []
    for version in (4, 6):
        out += [str(n) for n in ipaddress.collapse_addresses(n for n in nets if n.version == version)]
    return out


@dataclass
class ManagerLink:
    """The port-forward and gRPC channel to one manager pod."""

    pod: str
    forward: PortForward
    channel: grpc.aio.Channel
    stub: rpc.ManagerStub
    version: str

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
    #: the root daemon, when system-wide outbound is wanted and one runs
    rootd: RootDaemonLink | None = None
    #: why there is no system-wide outbound, when there is none
    outbound_note: str = ""
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
    _relays: int = 0
    _forwards: dict[tuple[str, int, str], asyncio.Server] = field(default_factory=dict)
    #: other sessions' intercepts as the manager shows them (workload, holder, state)
    others: list[pb.InterceptInfo] = field(default_factory=list)
    #: who the API server says we are (shown to others as the holder of our intercepts)
    kube_user: str = ""
    #: the image the manager runs (an admin's Helm release may run another tag than
    #: ours): injected agents run the same one unless agent.image says otherwise
    manager_image: str = ""
    #: rootless outbound: the SOCKS5 + HTTP proxy on loopback (only while there is no root daemon)
    proxy: OutboundProxy | None = None
    names: ClusterNames | None = None
    #: the manager's latest view of this session's wiretaps, by id (connector/wiretaps.py)
    wiretap_infos: dict[str, pb.WiretapInfo] = field(default_factory=dict)
    #: the direct data plane (port-forwards straight to pods; None: every flow via the manager)
    plane: DirectPlane | None = None
    #: why the direct plane is off, when it is
    plane_note: str = ""
    #: where the root daemon hands us its redirected TCP connections (with the direct plane)
    handoff: HandoffServer | None = None
    #: direct port-forwards to the agent pods of our intercepts (connector/agentlink.py)
    agentlinks: AgentLinks | None = None

    # ================================================================ connect
    async def start(self, progress: ProgressFn) -> None:
        req = self.request
        self.agentlinks = AgentLinks(self)
        if req.in_cluster and not req.kubeconfig:  # in a pod: its ServiceAccount (incluster.py)
            progress("kubeconfig", "Using this pod's ServiceAccount...", 0.02)
            self.target = await anyio.to_thread.run_sync(kube.load_in_cluster_target)
        else:
            progress("kubeconfig", "Reading kubeconfig...", 0.02)
            self.target = await anyio.to_thread.run_sync(
                kube.load_target, req.kubeconfig or None, req.context or None)
        ns = req.namespace or self.target.namespace or "default"
        self.mapped = [ns] + [m for m in req.mapped_namespaces if m and m != ns]
        progress("api", f"Contacting the API server {self.target.server}...", 0.05)
        await kube.check_reachable(self.target, self.cfg.timeouts.api)

        progress("manager", "Connecting to traffic manager...", 0.1)
        if req.install_manager:
            handle = await manager_install.ensure_manager(self.target, self.cfg.manager_image, progress)
            self.manager_image = handle.image
        await self._open_link()
        await self._arrive()
        try:  # known before the first lookup, so "svc.ns" names resolve at once (in a pod: cluster DNS does)
            if not req.in_cluster:
                self.namespaces = await anyio.to_thread.run_sync(_list_namespaces, self.target)
        except Exception as exc:  # noqa: BLE001 - the refresh loop retries
            log.info("cannot list namespaces yet: %s", exc)
        await self._start_plane(progress)
        await self.attach_root_daemon(req.daemon_socket, req.outbound_note, progress)
        self._tasks = [
            asyncio.ensure_future(self._heartbeat_loop()),
            asyncio.ensure_future(self._dials_loop()),
            asyncio.ensure_future(self._namespaces_loop()),
            asyncio.ensure_future(self._watch_intercepts_loop()),
            asyncio.ensure_future(self._root_daemon_loop()),
        ]
        self.changed.set()
        progress("connected", f"Connected to context {self.target.context} ({self.target.server})", 1.0)

    async def _open_link(self) -> None:
        assert self.target is not None
        pod = await manager_install.find_manager_pod(self.target)
        # the relay listens next to the connector's own socket: only this user (and root) can reach it
        self._relays += 1
        relay = self.cfg.connector_socket.parent / f"manager-{os.getpid()}-{self._relays}.sock"
        fwd = PortForward(self.target, self.cfg.manager.namespace, pod, self.cfg.manager.grpc_port,
                          unix_path=str(relay))
        await fwd.start()
        channel = grpc.aio.insecure_channel(fwd.address, options=MANAGER_CHANNEL_OPTIONS)
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
            await channel.close()
            await fwd.aclose()
            raise await manager_install.incompatible_error(self.target, ver.api, ver.version, self.cfg.manager_image)
        self.link = ManagerLink(pod=pod, forward=fwd, channel=channel, stub=stub, version=ver.version)
        log.info("linked to traffic-manager %s (pod %s) via %s", ver.version, pod, fwd.address)

    async def _arrive(self) -> None:
        assert self.link is not None and self.target is not None
        stub = self.link.stub
        if not self.kube_user:
            self.kube_user = await kube.whoami(self.target)
        info = pb.ClientInfo(name=self.request.user or _whoami(), install_id=tpnb_config.netns_id(),
                             version=__version__, kube_context=self.target.context, kube_user=self.kube_user)
        sess = await stub.ArriveAsClient(info, timeout=10)
        self.session_id = sess.session_id
        self.cluster = await stub.GetClusterInfo(sess, timeout=15)
        pods = [_cidr(n) for n in self.cluster.pod_subnets]
        kpods, ksvcs = [], []
        if not self.request.in_cluster:  # in a pod nothing is routed: the probes would only cost time
            try:
                kpods, ksvcs = await kube.cluster_subnets(self.target, self.mapped)
            except TpnbError as exc:
                log.warning("cannot read cluster subnets with the user's credentials: %s", exc)
        self.pod_subnets = collapsed(pods + kpods)
        self.service_subnets = collapsed(ksvcs)
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

    # ================================================================ the direct data plane
    async def _start_plane(self, progress: ProgressFn) -> None:
        """Start the direct data plane unless `connector.data_plane` or RBAC says the manager.

        "auto" keeps it only when pods/portforward is allowed somewhere (else every
        connection would pay a hand-off round trip for nothing); "direct" fails the
        connect instead, with the reason.
        """
        mode = self.cfg.connector.data_plane
        if mode == "manager":
            self.plane_note = "connector.data_plane is manager"
            return
        if self.request.in_cluster:
            self.plane_note = "in-cluster mode: the pod's own network carries outbound"
            return
        assert self.target is not None
        progress("plane", "Starting the direct data plane (watching Services, EndpointSlices, Pods)...", 0.8)
        plane = DirectPlane(self.target, self.mapped)
        try:
            await plane.start()
        except (TpnbError, OSError) as exc:
            await plane.aclose()
            self._plane_off(mode, f"the direct plane did not start: {exc}")
            return
        st = plane.status()
        if not st.active:
            await plane.aclose()
            self._plane_off(mode, st.reason)
            return
        handoff = HandoffServer(plane.dial, (DirectDialRefused,), self.cfg.connector_socket.parent)
        try:
            await handoff.start()
        except OSError as exc:  # rootless faces still use the plane; the daemon's flows the manager
            log.warning("hand-off socket not started: %s", exc)
            handoff = None
        self.plane, self.handoff, self.plane_note = plane, handoff, ""
        log.info("data plane: direct port-forwards (%s)", st.reason)

    def _plane_off(self, mode: str, why: str) -> None:
        if mode == "direct":
            raise ClusterError("connector.data_plane is direct, but the direct data plane cannot be used", why,
                               "grant `create pods/portforward` in the session's namespaces, "
                               "or set connector.data_plane to auto (or manager)")
        self.plane_note = why
        log.info("data plane: manager tunnels (%s)", why)

    def data_plane_status(self) -> pb.DataPlaneStatus:
        mode = self.cfg.connector.data_plane
        if self.plane is None:
            return pb.DataPlaneStatus(plane="manager", reason=self.plane_note, mode=mode)
        st = self.plane.status()
        return pb.DataPlaneStatus(
            plane="direct" if st.active else "manager", reason=st.reason, mode=mode,
            namespaces_denied=st.namespaces_denied, sessions=st.sessions, dials=st.dials,
            fallbacks=st.fallbacks, dial_errors=st.dial_errors)

    # ================================================================ the root daemon
    async def attach_root_daemon(self, socket_path: str, note: str, progress: ProgressFn | None = None) -> None:
        """Hand system-wide outbound to the root daemon at `socket_path` (none: say why in `note`).

        Called at connect and again by a later `connect` (the daemon may have
        been restarted meanwhile); a failure of a daemon that runs fails the
        connect, as a network that cannot come up did before the split.
        """
        if not socket_path:
            if self.rootd is not None:  # rootless asked for while a root daemon serves: take its network down
                try:
                    await self.rootd.network_down()
                except TpnbError as exc:
                    log.warning("root daemon network not taken down: %s", exc)
                await self.rootd.aclose()
                self.rootd = None
            self.outbound_note = note or "no root daemon"
            if not self.request.in_cluster:  # in a pod, every process reaches the cluster as it is
                await self.start_proxy()
            self.changed.set()
            return
        if progress:
            progress("network", "Setting up the network (TUN, routes, DNS)...", 0.85)
        # always a fresh channel: a restarted daemon must not meet the old one's reconnect back-off
        if self.rootd is not None:
            await self.rootd.aclose()
        self.rootd = RootDaemonLink(socket_path)
        await self.rootd.network_up(self.network_request())
        self.outbound_note = ""
        if self.proxy is not None:  # system-wide outbound covers every process now
            await self.proxy.aclose()
            self.proxy = None
        self.changed.set()

    def network_request(self) -> pb.NetworkRequest:
        subnets = list(dict.fromkeys(self.pod_subnets + self.service_subnets + list(self.request.also_proxy)))
        pid = os.getpid()
        return pb.NetworkRequest(
            manager_address=self.link.forward.address if self.link else "",
            session_id=self.session_id, subnets=subnets,
            cluster_domain=(self.cluster.cluster_domain if self.cluster else "") or "cluster.local",
            mapped_namespaces=list(self.mapped), namespaces=sorted(self.namespaces),
            connector_pid=pid, connector_start=start_ticks(pid) or 0,
            handoff_socket=str(self.handoff.path) if self.handoff else "",
            handoff_secret=self.handoff.secret if self.handoff else b"")

    async def _push_network(self) -> None:
        """Tell the root daemon what changed (relinked manager, namespaces); it updates in place."""
        if self.rootd is None or self.link is None:
            return
        try:
            await self.rootd.network_up(self.network_request())
        except TpnbError as exc:
            log.warning("root daemon not updated: %s", exc)

    async def _root_daemon_loop(self) -> None:
        """Notice a root daemon that died (kill -9): status says so; the next `connect` restarts it."""
        while not self._closing:
            await asyncio.sleep(2.0)
            rootd = self.rootd
            if rootd is not None and not await rootd.alive():
                await rootd.aclose()
                if self.rootd is not rootd:  # a `connect` attached a new daemon meanwhile: that one stays
                    continue
                log.warning("the root daemon is gone; system-wide outbound is down until `tpnb connect`")
                self.rootd = None
                self.outbound_note = "the root daemon stopped; run `tpnb connect` to restart it"
                self.changed.set()

    async def _answer_dial(self, req: pb.DialRequest) -> None:
        """The manager asks us to connect an intercepted connection to a local port."""
        open_ = pb.TunnelOpen(session_id=self.session_id, kind=pb.TunnelOpen.DIAL_ANSWER, dial_id=req.dial_id,
                              protocol=pb.TunnelOpen.TCP)
        link = self.link
        if link is None:
            return
        if self.agentlinks is not None:
            self.agentlinks.count_manager(req.intercept_id)
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

    # ================================================================ rootless outbound
    def cluster_names(self) -> ClusterNames:
        if self.names is None:
            self.names = ClusterNames(
                self._lookup_dns,
                lambda: (self.cluster.cluster_domain if self.cluster else "") or "cluster.local",
                lambda: set(self.namespaces), lambda: list(self.mapped))
        return self.names

    async def _lookup_dns(self, query: bytes) -> bytes:
        link = self.require_link()
        reply = await link.stub.LookupDNS(pb.DNSRequest(session_id=self.session_id, query=query), timeout=5)
        return reply.reply

    def tunnelled_subnets(self) -> list[str]:
        return list(dict.fromkeys(self.pod_subnets + self.service_subnets + list(self.request.also_proxy)))

    def in_cluster(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        for cidr in self.tunnelled_subnets():
            net = ipaddress.ip_network(cidr, strict=False)
            if addr.version == net.version and addr in net:
                return True
        return False

    async def resolve_name(self, name: str) -> pb.ResolveReply:
        try:
            ips = await self.cluster_names().resolve(name)
        except LookupError as exc:
            raise ClusterError(f"cannot resolve {name}", str(exc), "`tpnb status` shows the connection") from None
        return pb.ResolveReply(cluster_name=ips is not None, ips=ips or [], subnets=self.tunnelled_subnets())

    async def start_proxy(self) -> None:
        """The rootless outbound path for other processes (connector/proxy.py); idempotent."""
        if self.proxy is not None:
            return
        proxy = OutboundProxy(Route(tunnel=self._outbound_pipe, resolve=self.cluster_names().resolve,
                                    in_cluster=self.in_cluster), token=os.urandom(16).hex())
        await proxy.start()
        self.proxy = proxy

    async def _outbound_pipe(self, ip: str, port: int) -> Pipe:
        """A path to ip:port: the direct plane's port-forward when it has one, else an OUTBOUND
        tunnel, opened (the manager has dialled) before it is returned."""
        if self.plane is not None:
            try:
                conn = await self.plane.dial(ip, port)
            except DirectDialRefused as exc:
                raise Refused(f"{ip}:{port}: {exc}", 5) from None
            if conn is not None:
                return direct_pipe(conn)
        link = self.link
        if link is None:
            raise Refused("the traffic-manager link is down", 1)
        open_ = pb.TunnelOpen(session_id=self.session_id, kind=pb.TunnelOpen.OUTBOUND, protocol=pb.TunnelOpen.TCP,
                              dst_ip=ipaddress.ip_address(ip).packed, dst_port=port)
        chan = GrpcFrameChannel(link.stub.Tunnel())
        try:
            await chan.send(pb.TunnelFrame(open=open_))
            first = await asyncio.wait_for(chan.recv(), 15)
        except (TunnelError, asyncio.TimeoutError) as exc:
            chan.cancel()
            raise Refused(f"{ip}:{port}: {exc or 'timed out'}", 4) from None
        if first is None or first.WhichOneof("kind") == "error":
            chan.cancel()
            why = first.error if first is not None else "the tunnel closed"
            raise Refused(f"{ip}:{port}: {why}", 5 if "refused" in why.lower() else 4)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
            try:
                if head:
                    await chan.send(data_frame(head))
                await bridge(reader, writer, chan)
            except TunnelError as exc:
                log.debug("proxied connection to %s:%d ended: %s", ip, port, exc)
            finally:
                chan.cancel()

        return pipe

    # ================================================================ loopback forwards
    async def local_forward(self, ip: str, port: int, intercept_id: str = "") -> int:
        """A 127.0.0.1 port whose connections are tunnelled to ip:port in the cluster, or (with
        `intercept_id`) to the file service of the agent at `ip` serving that intercept of ours.
        Kept until close."""
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise InterceptError(f"cannot forward to {ip!r}", "it is not an IP address") from None
        if intercept_id and not any(ic.id == intercept_id for ic in self.intercepts.values()):
            raise InterceptError("cannot reach those files", "that intercept is not one of this session's",
                                 "`tpnb list` shows your intercepts")
        key = (ip, int(port), intercept_id)
        if key not in self._forwards:
            server = await asyncio.start_server(lambda r, w: self._forward_conn(key, r, w), "127.0.0.1", 0,
                                                limit=STREAM_LIMIT)
            self._forwards[key] = server
            log.info("127.0.0.1:%d forwards to %s:%d in the cluster%s", server.sockets[0].getsockname()[1], ip, port,
                 " (the intercept's files)" if intercept_id else "")
        return self._forwards[key].sockets[0].getsockname()[1]

    async def _forward_conn(self, dst: tuple[str, int, str], reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        if not dst[2] and self.plane is not None:  # the in-kernel sockets' loopback ports: direct first
            try:
                conn = await self.plane.dial(dst[0], dst[1])
            except DirectDialRefused as exc:
                log.info("forward to %s:%d refused: %s", dst[0], dst[1], exc)
                _reset(writer)
                return
            if conn is not None:
                await direct_pipe(conn)(reader, writer, b"")
                return
        link = self.link
        if link is None:
            writer.close()
            return
        kind = pb.TunnelOpen.AGENT_FILES if dst[2] else pb.TunnelOpen.OUTBOUND
        open_ = pb.TunnelOpen(session_id=self.session_id, kind=kind, protocol=pb.TunnelOpen.TCP,
                              dst_ip=ipaddress.ip_address(dst[0]).packed, dst_port=dst[1], intercept_id=dst[2])
        chan = GrpcFrameChannel(link.stub.Tunnel())
        try:
            await chan.send(pb.TunnelFrame(open=open_))
            first = await chan.recv()
            if first is None or first.WhichOneof("kind") == "error":
                log.info("forward to %s:%d refused: %s", dst[0], dst[1], first.error if first is not None else "closed")
                writer.close()
                return
            await bridge(reader, writer, chan)
        except TunnelError as exc:
            log.debug("forward to %s:%d ended: %s", dst[0], dst[1], exc)
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
                    await self._push_network()  # the daemon's tunnels follow the new link and session
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
        # only our own intercepts carry ids (others' are workload + holder only)
        self.remote = {ic.id: ic for ic in lst.intercepts if ic.mine}
        self.others = [ic for ic in lst.intercepts if not ic.mine]
        self.wiretap_infos = {w.id: w for w in lst.wiretaps}
        for name, mine in list(self.intercepts.items()):
            if mine.id in self.remote:
                self.intercepts[name] = self.remote[mine.id]
        self._update_links()
        self.changed.set()

    def _update_links(self) -> None:
        if self.agentlinks is not None:
            self.agentlinks.update(list(self.intercepts.values()))

    async def _namespaces_loop(self) -> None:
        """Keep the namespace list fresh so `svc.ns` names resolve (in a pod cluster DNS does: no polling)."""
        while not self._closing and not self.request.in_cluster:
            await asyncio.sleep(20)
            try:
                namespaces = await anyio.to_thread.run_sync(_list_namespaces, self.target)
            except Exception as exc:  # noqa: BLE001 - resolution degrades, never breaks
                log.debug("cannot list namespaces: %s", exc)
                continue
            if namespaces != self.namespaces:
                self.namespaces = namespaces
                await self._push_network()

    # ================================================================ intercepts
    async def map_namespace(self, ns: str) -> None:
        """Short names resolve in `ns` too (the namespace of an intercept)."""
        if ns not in self.mapped:
            self.mapped.append(ns)
            await self._push_network()

    async def unmap_unused(self) -> None:
        keep = [self.mapped[0]] + [m for m in self.request.mapped_namespaces if m]
        keep += [ic.spec.namespace for ic in self.intercepts.values()]
        mapped = list(dict.fromkeys(m for m in self.mapped if m in keep))
        if mapped != self.mapped:
            self.mapped = mapped
            await self._push_network()

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
        self._update_links()
        await self.map_namespace(spec.namespace)
        self.changed.set()
        return ic

    def tie_to_owner(self, name: str, pid: int) -> None:
        """End intercept `name` once process `pid` is gone (a killed kernel included)."""
        start = start_ticks(pid)
        if start is None:
            log.warning("intercept %s: owner process %d is already gone", name, pid)
            start = -1
        self.owners[name] = (pid, start)
        self._tasks.append(asyncio.ensure_future(self._owner_loop(name, (pid, start))))

    async def _owner_loop(self, name: str, owner: tuple[int, int]) -> None:
        pid, start = owner
        while self.owners.get(name) == owner and not self._closing:
            if not process_alive(pid, start):
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
        self._update_links()
        self.owners.pop(name, None)
        await self.unmap_unused()
        self.changed.set()

    def require_link(self) -> ManagerLink:
        if self.link is None:
            raise NotConnected("the traffic-manager link is down", self.last_error,
                               "wait a few seconds and retry; `tpnb status` shows the state")
        return self.link

    # ================================================================ status / close
    async def status(self) -> pb.ConnectionStatus:
        st = pb.ConnectionStatus(
            connected=self.link is not None or bool(self.last_error),
            namespace=self.mapped[0] if self.mapped else "",
            mapped_namespaces=self.mapped,
            pod_subnets=self.pod_subnets,
            service_subnets=self.service_subnets,
            also_proxy=list(self.request.also_proxy),
            manager_version=self.link.version if self.link else "",
            manager_namespace=self.cfg.manager.namespace,
            session_id=self.session_id,
            daemon_version=__version__,
            intercepts=[self._with_path(ic) for ic in self.intercepts.values()],
            error=self.last_error,
            outbound_note=self.outbound_note,
            cluster_domain=(self.cluster.cluster_domain if self.cluster else "") or "cluster.local",
            data_plane=self.data_plane_status(),
        )
        if self.request.in_cluster:
            from .incluster import credentials_text, pod_ip

            st.in_cluster, st.in_cluster_note = True, self.request.in_cluster_note
            st.credentials, st.pod_ip = credentials_text(self.target, self.kube_user), pod_ip()
        if self.proxy is not None:
            urls = self.proxy.urls()
            st.proxy_socks_url, st.proxy_http_url = urls["socks"], urls["http"]
        if self.rootd is not None:
            net = await self.rootd.network()
            if net is None:
                st.outbound_note = "the root daemon does not answer; run `tpnb connect` to restart it"
            else:
                st.outbound = net.up
                st.root_daemon_version = net.version
                st.dns_ip, st.tun_name = net.dns_ip, net.tun_name
                st.tcp_engine, st.tcp_engine_note = net.tcp_engine, net.tcp_engine_note
                st.data_plane.handoff.CopyFrom(net.handoff)
                if not net.up:
                    st.outbound_note = "the root daemon has no network up; run `tpnb connect`"
        if self.target is not None:
            st.context = self.target.context
            st.server = self.target.server
        return st

    def _with_path(self, ic: pb.InterceptInfo) -> pb.InterceptInfo:
        """`ic` for status, with which path carried its connections (agent links or the manager)."""
        if self.agentlinks is None:
            return ic
        out = pb.InterceptInfo()
        out.CopyFrom(ic)
        out.data_path = self.agentlinks.data_path(ic.id)
        del out.links[:]  # the keys stay in the connector
        return out

    async def close(self) -> None:
        """Undo everything, in reverse order; each step runs even if one before failed."""
        self._closing = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.agentlinks is not None:
            await self.agentlinks.aclose()
        if self.link is not None and self.session_id:
            try:
                await self.link.stub.Depart(pb.SessionInfo(session_id=self.session_id), timeout=3)
            except grpc.aio.AioRpcError as exc:
                log.info("depart: %s", exc.code().name)
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        if self.rootd is not None:
            rootd = self.rootd
            steps.append(("root daemon network", rootd.network_down))
            steps.append(("root daemon link", rootd.aclose))
        if self.proxy is not None:
            steps.append(("proxy", self.proxy.aclose))
        if self.handoff is not None:
            steps.append(("hand-off socket", self.handoff.aclose))
        if self.plane is not None:
            steps.append(("direct data plane", self.plane.aclose))
        for server in self._forwards.values():
            server.close()
        self._forwards.clear()
        if self.link is not None:
            steps.append(("manager link", self.link.aclose))
        await undo(steps, log)
        self.link = None
        self.rootd = None
        self.plane = self.handoff = None
        self.changed.set()
        log.info("session %s closed", self.session_id)


def _reset(writer: asyncio.StreamWriter) -> None:
    """End a local client's connection with a reset, as a refused dial in the cluster would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


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



