"""The connector's side of the root daemon: a gRPC client on the daemon's Unix socket.

The root daemon does networking only.  The connector tells it what to route
and where its tunnels go (the connector's relay to the traffic-manager, the
session id); it never sends Kubernetes credentials, so the daemon never runs
an exec credential plugin or reads a token.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from tpnb.common import errors_wire
from tpnb.errors import DaemonError
from tpnb.proto import pb, rpc

log = logging.getLogger("tpnb.connector.rootd")


class RootDaemonLink:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.channel = grpc.aio.insecure_channel(f"unix://{socket_path}")
        self.stub = rpc.RootDaemonStub(self.channel)

    #: how long `network_up` waits for the daemon's socket to accept (a daemon just started by
    #: `tpnb connect` may still be cleaning up after a killed predecessor)
    READY_TIMEOUT = 15.0

    async def network_up(self, req: pb.NetworkRequest) -> pb.NetworkStatus:
        try:
            await asyncio.wait_for(self.channel.channel_ready(), self.READY_TIMEOUT)
        except asyncio.TimeoutError:
            raise DaemonError("the tpnb root daemon does not answer",
                              f"nothing accepted on {self.socket_path} within {self.READY_TIMEOUT:.0f} s",
                              "see ~/.cache/tpnb/logs/daemon.log; `tpnb connect` restarts it") from None
        try:
            return await self.stub.NetworkUp(req, timeout=60)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise DaemonError("the tpnb root daemon does not answer", exc.details() or "",
                                  "see ~/.cache/tpnb/logs/daemon.log; `tpnb connect` restarts it") from None
            raise errors_wire.decode(exc.code(), exc.details()) from None

    async def network(self) -> pb.NetworkStatus | None:
        """The daemon's network state; None when it does not answer."""
        try:
            return await self.stub.GetNetwork(pb.Empty(), timeout=3)
        except grpc.aio.AioRpcError:
            return None

    async def alive(self) -> bool:
        return await self.network() is not None

    async def network_down(self) -> None:
        try:
            await self.stub.NetworkDown(pb.Empty(), timeout=30)
        except grpc.aio.AioRpcError as exc:
            log.info("root daemon network down: %s", exc.code().name)

    async def set_log_level(self, req: pb.LogLevelRequest) -> None:
        try:
            await self.stub.SetLogLevel(req, timeout=5)
        except grpc.aio.AioRpcError as exc:
            log.info("root daemon log level not changed: %s", exc.details())

    async def quit(self) -> None:
        try:
            await self.stub.Quit(pb.Empty(), timeout=30)
        except grpc.aio.AioRpcError as exc:
            log.info("root daemon quit: %s", exc.code().name)

    async def aclose(self) -> None:
        await self.channel.close()
