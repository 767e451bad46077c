"""The new-connection shortcuts of the outbound data path (issue 15), on loopback.

Real gRPC and real TCP sockets on 127.0.0.1: the root daemon's flow handler
(`Network._on_kernel_tcp`, fed by `KernelTcp`'s accept path) against the
traffic-manager's servicer registered as in the pod.  What a user of a
redirected connection sees must not change: the reply to the request the
client sent right after connecting, a half-close, a reset for a refused port,
and working connections after the manager restarts (spare Tunnel calls of the
old one are dropped) or when the manager is too old for early data.
"""
from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
import pytest

from tpnb.cluster import manager as manager_mod
from tpnb.cluster.manager import AgentHub, Manager
from tpnb.common.forward import FastTunnelRegistration, MemoryFrameChannel, SendFirst
from tpnb.daemon.network import ManagerTunnels, Network
from tpnb.daemon.redirect import KernelTcp, SocketFlow
from tpnb.proto import pb, rpc

# async tests and the rig fixture run on asyncio through anyio's pytest plugin (one loop for both)
pytestmark = [pytest.mark.unit, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _Tokens:
    async def verify(self, token: str, claimed: pb.AgentInfo) -> pb.AgentInfo:
        raise manager_mod.AgentRefused("no agents in this test")


async def _serve_manager(port: int = 0) -> tuple[grpc.aio.Server, int]:
    """The client API as `cluster.manager.serve` registers it (wire-level data frames)."""
    server = grpc.aio.server()
    mgr = Manager()
    mgr.fast_frames = True
    rpc.add_ManagerServicer_to_server(mgr, FastTunnelRegistration(server))
    rpc.add_AgentHubServicer_to_server(AgentHub(mgr, _Tokens()), FastTunnelRegistration(server))
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


async def _echo() -> tuple[asyncio.base_events.Server, int]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(b"echo:" + data)
                await w.drain()
        except ConnectionError:  # a client (or a test's manager restart) reset it: done, not a failure
            pass
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


class _Redirected(KernelTcp):
    """KernelTcp's accept path; every connection "redirected" to `dst` (no nftables here)."""

    def __init__(self, on_tcp: Any, dst: tuple[str, int]) -> None:
        super().__init__("test", on_tcp)
        self.dst = dst

    async def _accepted(self, sock: socket.socket, src: tuple[str, int]) -> None:
        flow = SocketFlow(sock, src, self.dst)
        try:
            await self.on_tcp(flow)
        finally:
            flow.close()

    async def listen(self) -> int:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sock.setblocking(False)
        self._listener = sock
        self._accept_task = asyncio.create_task(self._accept_loop())
        return sock.getsockname()[1]


async def _daemon(address: str, dst: tuple[str, int], pool: int) -> tuple[Network, _Redirected, int]:
    net = Network(pb.NetworkRequest(manager_address=address))
    net.link = ManagerTunnels(address, pool=pool)
    sess = await net.link.stub.ArriveAsClient(pb.ClientInfo(name="alice@laptop"), timeout=5)
    net.session_id = sess.session_id
    kt = _Redirected(net._on_tcp, dst)
    return net, kt, await kt.listen()


async def _request(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)  # at once, as an HTTP client does: this is what rides in the `open` frame
    await w.drain()
    return r, w, await asyncio.wait_for(r.read(65536), 5)


async def _until(pred: Any, what: str) -> None:
    for _ in range(200):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Rig:
    """A manager servicer and an echo server on loopback, and (given a pool) the root daemon's flow
    handler with its redirected listener `port`: what each test here starts and stops the same way."""

    server: grpc.aio.Server
    mport: int
    echo: asyncio.base_events.Server
    eport: int
    net: Network | None = None
    kt: _Redirected | None = None
    port: int = 0

    @property
    def link(self) -> ManagerTunnels:
        assert self.net is not None and self.net.link is not None
        return self.net.link


StartRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig() -> AsyncIterator[StartRig]:
    """`await rig(pool=N)` starts a Rig (pool None: no daemon side); all are stopped after the test,
    including a manager the test restarted (`Rig.server` replaced)."""
    rigs: list[Rig] = []

    async def start(pool: int | None = 2) -> Rig:
        server, mport = await _serve_manager()
        echo, eport = await _echo()
        r = Rig(server, mport, echo, eport)
        rigs.append(r)
        if pool is not None:
            r.net, r.kt, r.port = await _daemon(f"127.0.0.1:{mport}", ("127.0.0.1", eport), pool=pool)
        return r

    yield start
    for r in rigs:
        if r.kt is not None:
            await r.kt.aclose()
        if r.net is not None and r.net.link is not None:
            await r.net.link.aclose()
        r.echo.close()
        await r.server.stop(0)


async def test_new_connections_with_early_data_and_spare_calls(rig: StartRig) -> None:
    r = await rig(pool=2)
    link, port = r.link, r.port
    await _until(lambda: link.early_data, "the manager's early-data feature")
    rd, w, got = await _request(port, b"GET / HTTP/1.1\r\n\r\n")
    assert got == b"echo:GET / HTTP/1.1\r\n\r\n"
    w.write(b"more")
    await w.drain()
    assert await asyncio.wait_for(rd.read(65536), 5) == b"echo:more"
    w.write_eof()  # half-close travels as `eof`; the echo server ends, so do we
    assert await asyncio.wait_for(rd.read(65536), 5) == b""
    w.close()

    # the link now keeps started calls; the next connection takes one of them
    await _until(lambda: len(link._spares) == 2, "two spare Tunnel calls")
    spare = link._spares[0]
    rd, w, got = await _request(port, b"second")
    assert got == b"echo:second"
    assert spare not in link._spares
    w.close()

    # a port nothing listens on: the client sees a reset, as from a closed port
    assert r.kt is not None
    r.kt.dst = ("127.0.0.1", 1)
    rd, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"hello?")
    try:
        data: bytes | None = await asyncio.wait_for(rd.read(100), 5)
    except ConnectionResetError:
        data = None
    assert data is None, f"expected a reset, got {data!r}"
    w.close()


async def test_spare_calls_of_a_restarted_manager_are_not_used(rig: StartRig) -> None:
    r = await rig(pool=3)
    link, port = r.link, r.port
    _, w, got = await _request(port, b"one")
    assert got == b"echo:one"
    w.close()
    await _until(lambda: len(link._spares) == 3, "three spare Tunnel calls")
    await r.server.stop(0)  # the manager pod restarts: its spares die with it
    r.server, _ = await _serve_manager(r.mport)
    await _until(lambda: all(c.done() for c in link._spares), "the old spares to end")
    sess = await link.stub.ArriveAsClient(pb.ClientInfo(name="alice@laptop"), timeout=10, wait_for_ready=True)
    assert r.net is not None
    r.net.session_id = sess.session_id  # as after the connector's relink
    _, w, got = await _request(port, b"after restart")
    assert got == b"echo:after restart"
    w.close()


async def test_manager_without_early_data_gets_the_bytes_as_data_frames(
        rig: StartRig, monkeypatch: pytest.MonkeyPatch) -> None:
    """An older manager (same API generation) does not list the feature: nothing may be lost."""
    monkeypatch.setattr(manager_mod, "FEATURES", ())
    r = await rig(pool=0)
    link = r.link
    assert link._features is not None
    await asyncio.wait_for(link._features, 5)
    assert link.early_data is False
    _, w, got = await _request(r.port, b"GET /old")
    assert got == b"echo:GET /old"
    w.close()


async def test_manager_answers_early_data_without_opened(rig: StartRig) -> None:
    """On the wire: the dial's answer to an `open` with early data is the destination's reply."""
    from tpnb.common.forward import GrpcFrameChannel

    r = await rig(pool=None)
    chan = grpc.aio.insecure_channel(f"127.0.0.1:{r.mport}")
    stub = rpc.ManagerStub(chan)
    try:
        assert "early-data" in (await stub.Version(pb.Empty())).features
        sess = await stub.ArriveAsClient(pb.ClientInfo(name="alice@laptop"))
        dst = socket.inet_aton("127.0.0.1")
        t = GrpcFrameChannel(stub.Tunnel())
        await t.send(pb.TunnelFrame(open=pb.TunnelOpen(session_id=sess.session_id, dst_ip=dst, dst_port=r.eport,
                                                       early_data=b"GET /")))
        first = await asyncio.wait_for(t.recv(), 5)
        assert first is not None and first.WhichOneof("kind") == "data" and first.data == b"echo:GET /"
        t.cancel()
        # without early data the dialer still confirms with `opened` (TUN flows, the connector wait for it)
        t = GrpcFrameChannel(stub.Tunnel())
        await t.send(pb.TunnelFrame(open=pb.TunnelOpen(session_id=sess.session_id, dst_ip=dst, dst_port=r.eport)))
        first = await asyncio.wait_for(t.recv(), 5)
        assert first is not None and first.WhichOneof("kind") == "opened"
        t.cancel()
        # early data to a closed port: the error, and nothing else
        t = GrpcFrameChannel(stub.Tunnel())
        await t.send(pb.TunnelFrame(open=pb.TunnelOpen(session_id=sess.session_id, dst_ip=dst, dst_port=1,
                                                       early_data=b"GET /")))
        first = await asyncio.wait_for(t.recv(), 5)
        assert first is not None and first.WhichOneof("kind") == "error" and "refused" in first.error.lower()
        t.cancel()
    finally:
        await chan.close()


async def test_accept_takes_every_pending_connection(rig: StartRig) -> None:
    r = await rig(pool=4)
    results = await asyncio.gather(*(_request(r.port, f"n{i}".encode()) for i in range(40)))
    assert sorted(got for _, _, got in results) == sorted(f"echo:n{i}".encode() for i in range(40))
    for _, w, _ in results:
        w.close()


async def test_send_first_goes_first_without_holding_up_recv() -> None:
    a, b = MemoryFrameChannel.pair(maxsize=1)
    await a.send(pb.TunnelFrame(data=b"fills the queue"))
    first = SendFirst(a, pb.TunnelFrame(opened=pb.Empty()))  # cannot be written yet
    await b.send(pb.TunnelFrame(data=b"from the far end"))
    got = await asyncio.wait_for(first.recv(), 2)  # recv is not behind the pending write
    assert got is not None and got.data == b"from the far end"
    later = asyncio.ensure_future(first.send(pb.TunnelFrame(data=b"after")))
    kinds = []
    for _ in range(3):
        f = await asyncio.wait_for(b.recv(), 2)
        assert f is not None
        kinds.append(f.WhichOneof("kind") + (":" + f.data.decode() if f.WhichOneof("kind") == "data" else ""))
    await later
    assert kinds == ["data:fills the queue", "opened", "data:after"]
