"""The root daemon's gRPC service on a Unix socket; its one client is the connector.

One root daemon per network namespace ("machine"), holding at most one
network.  It is started through sudo only when system-wide outbound is
wanted; it reads no kubeconfig and runs no credential plugin: all it knows of
the cluster is what the connector's `NetworkUp` says.  The socket belongs to
the user who started it (mode 0600), so only that user's connector reaches it.
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import grpc

from tpnb import config as tpnb_config
from tpnb.common import errors_wire, logs
from tpnb.common.liveness import process_alive
from tpnb.common.serve import serve_unix
from tpnb.errors import TpnbError
from tpnb.proto import pb, rpc
from tpnb.version import API_VERSION, __version__

from . import netstate
from .network import Network

log = logging.getLogger("tpnb.daemon.server")


class RootDaemonService(rpc.RootDaemonServicer):
    def __init__(self, stop: asyncio.Event) -> None:
        self.network: Network | None = None
        self.stop = stop
        self.lock = asyncio.Lock()

    async def _abort(self, context: grpc.aio.ServicerContext, err: TpnbError) -> None:
        code, details = errors_wire.encode(err)
        await context.abort(code, details)

    async def Version(self, request, context):  # noqa: N802
        return pb.VersionList(versions=[pb.VersionInfo(name="root-daemon", version=__version__, api=API_VERSION)])

    def _same_network(self, req: pb.NetworkRequest) -> bool:
        cur = self.network
        return (cur is not None and cur.tun is not None and list(cur.request.subnets) == list(req.subnets)
                and cur.request.connector_pid == req.connector_pid
                and cur.request.cluster_domain == req.cluster_domain)

    async def NetworkUp(self, request, context):  # noqa: N802
        async with self.lock:
            if self._same_network(request):
                assert self.network is not None
                self.network.update(request)
                return self.network.status()
            await self._down()
            net = Network(request, on_connector_gone=lambda: self._down_if(net))
            try:
                await net.start()
            except TpnbError as err:
                await net.close()
                await self._abort(context, err)
                return pb.NetworkStatus()
            except BaseException:
                await net.close()
                raise
            self.network = net
            log.info("network up for connector %d, session %s", request.connector_pid, request.session_id)
            return net.status()

    async def _down_if(self, net: Network) -> None:
        async with self.lock:
            if self.network is net:
                await self._down()

    async def _down(self) -> None:
        net, self.network = self.network, None
        if net is not None:
            await net.close()

    async def GetNetwork(self, request, context):  # noqa: N802
        if self.network is None:
            return pb.NetworkStatus(up=False, version=__version__)
        return self.network.status()

    async def NetworkDown(self, request, context):  # noqa: N802
        async with self.lock:
            await self._down()
        return pb.Empty()

    async def SetLogLevel(self, request, context):  # noqa: N802
        try:
            logs.set_level(request.level)
        except TpnbError as err:
            await self._abort(context, err)
        return pb.Empty()

    async def Quit(self, request, context):  # noqa: N802
        async with self.lock:
            await self._down()
        self.stop.set()
        return pb.Empty()


def _running_daemon(sock: Path) -> int:
    """The pid of a live root daemon recorded next to `sock`, else 0."""
    try:
        pid = int(sock.with_name(sock.stem + ".pid").read_text().strip())
    except (OSError, ValueError):
        return 0
    if pid == os.getpid() or not process_alive(pid) or not sock.exists():
        return 0
    try:  # a pid reused by an unrelated process after a crash is no daemon
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return 0
    return pid if b"tpnb.daemon" in argv else 0


async def serve() -> None:
    sock = tpnb_config.get().socket_path
    sock.parent.mkdir(parents=True, exist_ok=True)
    other = _running_daemon(sock)
    if other:  # e.g. another user's: never take its socket away from it
        log.error("a tpnb root daemon already runs in this network namespace (pid %d); not starting", other)
        raise SystemExit(f"a tpnb root daemon already runs in this network namespace (pid {other}, "
                         f"socket {sock}); one per machine: `tpnb quit --daemon` as its user stops it")
    # A predecessor killed mid-session left its TUN, routes or resolv.conf: undo
    # that before answering anyone, so the first NetworkUp starts clean.
    try:
        await netstate.recover()  # logs what it undid
    except TpnbError as err:
        log.error("cannot clean up after a previous daemon: %s", err)
    owner = os.environ.get("TPNB_OWNER_UID", "")
    stop = asyncio.Event()
    svc = RootDaemonService(stop)
    await serve_unix(sock, lambda server: rpc.add_RootDaemonServicer_to_server(svc, server), stop,
                     svc._down, "root daemon", int(owner) if owner.isdigit() else None)
