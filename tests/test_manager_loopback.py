"""The traffic-manager's brokering, run in-process on loopback.

Real gRPC, real TCP sockets on 127.0.0.1: an outbound flow through the
manager's dialer, and an intercepted connection joined from an "agent"
tunnel to a "client" that answers the manager's DialRequest.
"""
from __future__ import annotations

import asyncio

import grpc
import pytest

from tpnb.common.forward import GrpcFrameChannel
from tpnb.cluster.manager import Manager
from tpnb.proto import pb, rpc

pytestmark = pytest.mark.unit


async def _echo_server() -> tuple[asyncio.base_events.Server, int]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(b"echo:" + data)
            await w.drain()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def _manager(ttl: float = 15.0) -> tuple[grpc.aio.Server, Manager, rpc.ManagerStub, grpc.aio.Channel]:
    server = grpc.aio.server()
    mgr = Manager(session_ttl=ttl)
    rpc.add_ManagerServicer_to_server(mgr, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    chan = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, mgr, rpc.ManagerStub(chan), chan


def _ip(s: str) -> bytes:
    import ipaddress

    return ipaddress.ip_address(s).packed


async def _outbound() -> None:
    server, mgr, stub, chan = await _manager()
    echo, eport = await _echo_server()
    try:
        sess = await stub.ArriveAsClient(pb.ClientInfo(name="alice@laptop"))
        t = GrpcFrameChannel(stub.Tunnel())
        await t.send(pb.TunnelFrame(open=pb.TunnelOpen(session_id=sess.session_id, dst_ip=_ip("127.0.0.1"),
                                                       dst_port=eport)))
        first = await t.recv()
        assert first.WhichOneof("kind") == "opened"
        await t.send(pb.TunnelFrame(data=b"ping"))
        got = await t.recv()
        assert got.data == b"echo:ping"
        await t.send(pb.TunnelFrame(eof=pb.Empty()))
        last = await t.recv()
        assert last.WhichOneof("kind") == "eof"

        # a port nothing listens on: a clear error frame, not a hang
        t2 = GrpcFrameChannel(stub.Tunnel())
        await t2.send(pb.TunnelFrame(open=pb.TunnelOpen(session_id=sess.session_id, dst_ip=_ip("127.0.0.1"),
                                                        dst_port=1)))
        err = await asyncio.wait_for(t2.recv(), 5)
        assert err.WhichOneof("kind") == "error" and "refused" in err.error.lower()
        t2.cancel()

        # an unknown session may not dial
        t3 = GrpcFrameChannel(stub.Tunnel())
        await t3.send(pb.TunnelFrame(open=pb.TunnelOpen(session_id="nope", dst_ip=_ip("127.0.0.1"),
                                                        dst_port=eport)))
        err = await t3.recv()
        assert err.WhichOneof("kind") == "error" and "session" in err.error
        t3.cancel()
    finally:
        echo.close()
        await chan.close()
        await server.stop(0)


def test_outbound_flow_through_manager() -> None:
    asyncio.run(_outbound())


async def _intercept() -> None:
    server, mgr, stub, chan = await _manager()
    local, lport = await _echo_server()   # the "laptop's" app
    try:
        alice = await stub.ArriveAsClient(pb.ClientInfo(name="alice@laptop"))
        bob = await stub.ArriveAsClient(pb.ClientInfo(name="bob@laptop2"))
        agent = await stub.ArriveAsAgent(pb.AgentInfo(name="hello", namespace="default", pod_name="hello-1",
                                                      pod_ip="10.42.0.5", environment={"A": "1"}))
        spec = pb.InterceptSpec(name="hello", namespace="default", workload="hello", local_port=lport,
                                target_host="127.0.0.1")
        ic = await stub.CreateIntercept(pb.CreateInterceptRequest(session=alice, spec=spec))
        # not ACTIVE until the agent has been told: a request now would still reach the app
        assert ic.state == pb.InterceptInfo.WAITING
        assert dict(ic.environment) == {"A": "1"}

        # bob is refused, and told who holds it
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.CreateIntercept(pb.CreateInterceptRequest(session=bob, spec=spec))
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "alice@laptop" in exc.value.details()

        # the agent learns about the intercept, and only then is it ACTIVE for alice
        instr = stub.WatchAgentInstructions(agent)
        first = await instr.read()
        assert [i.id for i in first.intercepts] == [ic.id]
        assert first.intercepts[0].state == pb.InterceptInfo.ACTIVE
        watch = stub.WatchIntercepts(alice)
        while True:
            lst = await asyncio.wait_for(watch.read(), 5)
            if lst.intercepts and lst.intercepts[0].state == pb.InterceptInfo.ACTIVE:
                break
        watch.cancel()

        # alice answers dials like the daemon does
        async def answer() -> None:
            async for req in stub.WatchDials(alice):
                t = GrpcFrameChannel(stub.Tunnel())
                await t.send(pb.TunnelFrame(open=pb.TunnelOpen(session_id=alice.session_id, kind=pb.TunnelOpen.DIAL_ANSWER, dial_id=req.dial_id)))
                r, w = await asyncio.open_connection(req.target_host, req.port)
                await t.send(pb.TunnelFrame(opened=pb.Empty()))
                while True:
                    f = await t.recv()
                    if f is None or f.WhichOneof("kind") != "data":
                        break
                    w.write(f.data)
                    await t.send(pb.TunnelFrame(data=await r.read(65536)))
                w.close()
                return

        answering = asyncio.ensure_future(answer())
        at = GrpcFrameChannel(stub.Tunnel())
        await at.send(pb.TunnelFrame(open=pb.TunnelOpen(session_id=agent.agent_id, kind=pb.TunnelOpen.AGENT_INTERCEPTED, intercept_id=ic.id,
                                                        src_ip=_ip("10.42.0.9"), src_port=4444)))
        opened = await asyncio.wait_for(at.recv(), 5)
        assert opened.WhichOneof("kind") == "opened"
        await at.send(pb.TunnelFrame(data=b"GET /"))
        reply = await asyncio.wait_for(at.recv(), 5)
        assert reply.data == b"echo:GET /"
        at.cancel()
        answering.cancel()
        instr.cancel()

        # alice departs: her intercept ends, bob may now take it
        await stub.Depart(alice)
        ic2 = await stub.CreateIntercept(pb.CreateInterceptRequest(session=bob, spec=spec))
        assert ic2.client_name == "bob@laptop2"
    finally:
        local.close()
        await chan.close()
        await server.stop(0)


def test_intercept_brokering_and_conflicts() -> None:
    asyncio.run(_intercept())


async def _expiry() -> None:
    server, mgr, stub, chan = await _manager(ttl=1.0)
    try:
        alice = await stub.ArriveAsClient(pb.ClientInfo(name="alice@laptop"))
        expire = asyncio.ensure_future(mgr.expire_loop())
        spec = pb.InterceptSpec(name="hello", namespace="default", workload="hello", local_port=9000)
        await stub.CreateIntercept(pb.CreateInterceptRequest(session=alice, spec=spec))
        assert len(mgr.intercepts) == 1
        await asyncio.sleep(2.5)
        assert mgr.intercepts == {}
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Remain(alice)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        expire.cancel()
    finally:
        await chan.close()
        await server.stop(0)


def test_silent_session_expires_with_its_intercepts() -> None:
    asyncio.run(_expiry())
