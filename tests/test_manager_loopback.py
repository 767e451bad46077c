"""The traffic-manager's brokering and session rules, run in-process on loopback.

Real gRPC, real TCP sockets on 127.0.0.1: an outbound flow through the
manager's dialer, an intercepted connection joined from an "agent" tunnel to a
"client" that answers the manager's DialRequest, the agent's file service
brokered to the intercept's holder only, and what one session may see and do
of another's.  Agents are verified by a plain stand-in for the TokenReview
check (its real counterpart runs against the dev cluster in
tests/test_shared_cluster.py); the rules around it are the manager's own.
"""
from __future__ import annotations

import asyncio

import grpc
import pytest

from tpnb.common.forward import GrpcFrameChannel
from tpnb.cluster.agent_auth import AgentRefused
from tpnb.cluster.manager import AgentHub, Manager
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


class _Tokens:
    """Accepts token "agent-of-<workload>" for that workload only (what TokenReview + pod checks decide)."""

    async def verify(self, token: str, claimed: pb.AgentInfo) -> pb.AgentInfo:
        if token != f"agent-of-{claimed.name}":
            raise AgentRefused("the API server rejected the token")
        return claimed


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def _manager(ttl: float = 15.0) -> tuple[grpc.aio.Server, Manager, rpc.ManagerStub, grpc.aio.Channel]:
    server = grpc.aio.server()
    mgr = Manager(session_ttl=ttl)
    rpc.add_ManagerServicer_to_server(mgr, server)
    rpc.add_AgentHubServicer_to_server(AgentHub(mgr, _Tokens()), server)  # one server here; two ports in the pod
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    chan = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = rpc.ManagerStub(chan)
    stub.hub = rpc.AgentHubStub(chan)  # type: ignore[attr-defined]
    return server, mgr, stub, chan


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
        hub = stub.hub
        info = pb.AgentInfo(name="hello", namespace="default", pod_name="hello-1", pod_ip="10.42.0.5",
                            environment={"A": "1"})
        # no token, or another workload's: refused
        for md in ((), _bearer("agent-of-other")):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await hub.ArriveAsAgent(info, metadata=md)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        agent = await hub.ArriveAsAgent(info, metadata=_bearer("agent-of-hello"))
        other = await hub.ArriveAsAgent(pb.AgentInfo(name="other", namespace="default", pod_name="other-1",
                                                     pod_ip="10.42.0.6"), metadata=_bearer("agent-of-other"))
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
        instr = hub.WatchAgentInstructions(agent)
        first = await instr.read()
        assert [i.id for i in first.intercepts] == [ic.id]
        assert first.intercepts[0].state == pb.InterceptInfo.ACTIVE
        # agents are told what to serve, never whose session it is or its environment
        assert first.intercepts[0].session_id == "" and not first.intercepts[0].environment
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

        # the agent of another workload cannot feed connections into alice's intercept
        bad = GrpcFrameChannel(hub.Tunnel())
        await bad.send(pb.TunnelFrame(open=pb.TunnelOpen(session_id=other.agent_id,
                                                         kind=pb.TunnelOpen.AGENT_INTERCEPTED, intercept_id=ic.id)))
        assert (await asyncio.wait_for(bad.recv(), 5)).WhichOneof("kind") == "error"
        bad.cancel()
        # nor can a client, on the client API
        bad = GrpcFrameChannel(stub.Tunnel())
        await bad.send(pb.TunnelFrame(open=pb.TunnelOpen(session_id=bob.session_id,
                                                         kind=pb.TunnelOpen.AGENT_INTERCEPTED, intercept_id=ic.id)))
        assert (await asyncio.wait_for(bad.recv(), 5)).WhichOneof("kind") == "error"
        bad.cancel()

        answering = asyncio.ensure_future(answer())
        at = GrpcFrameChannel(hub.Tunnel())
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


async def _visibility_and_files() -> None:
    """What bob's session gets of alice's intercept, and the file service only alice reaches."""
    server, mgr, stub, chan = await _manager()
    files, fport = await _echo_server()   # stands in for the agent's loopback sftp-server
    try:
        hub = stub.hub
        alice = await stub.ArriveAsClient(pb.ClientInfo(name="alice@laptop"))
        bob = await stub.ArriveAsClient(pb.ClientInfo(name="bob@laptop2"))
        agent = await hub.ArriveAsAgent(pb.AgentInfo(name="hello", namespace="default", pod_name="hello-1",
                                                     pod_ip="10.42.0.5", environment={"SECRET": "s3"}),
                                        metadata=_bearer("agent-of-hello"))
        spec = pb.InterceptSpec(name="hello", namespace="default", workload="hello", local_port=9000,
                                target_host="127.0.0.1")
        ic = await stub.CreateIntercept(pb.CreateInterceptRequest(session=alice, spec=spec))
        assert ic.mine and ic.environment["SECRET"] == "s3"

        # bob sees the workload and its holder, nothing of alice's session
        seen = (await asyncio.wait_for(stub.WatchIntercepts(bob).read(), 5)).intercepts
        assert [(i.spec.workload, i.client_name, i.mine) for i in seen] == [("hello", "alice@laptop", False)]
        assert not seen[0].environment and not seen[0].session_id and not seen[0].id and not seen[0].pod_ips
        # alice sees hers in full
        own = (await asyncio.wait_for(stub.WatchIntercepts(alice).read(), 5)).intercepts
        assert own[0].mine and own[0].environment["SECRET"] == "s3" and own[0].id == ic.id
        # no session at all: nothing
        with pytest.raises(grpc.aio.AioRpcError) as none:
            await asyncio.wait_for(stub.WatchIntercepts(pb.SessionInfo(session_id="")).read(), 5)
        assert none.value.code() == grpc.StatusCode.NOT_FOUND

        # bob cannot remove it; the refusal names the holder
        with pytest.raises(grpc.aio.AioRpcError) as held:
            await stub.RemoveIntercept(pb.RemoveInterceptRequest(session_id=bob.session_id, name="hello"))
        assert held.value.code() == grpc.StatusCode.PERMISSION_DENIED and "alice@laptop" in held.value.details()

        # the agent answers file dials by connecting its (loopback) file service
        async def serve_files() -> None:
            async for req in hub.WatchAgentDials(agent):
                assert req.purpose == pb.DialRequest.FILES and req.intercept_id == ic.id
                # bob cannot take the answer side of alice's file dial
                steal = GrpcFrameChannel(stub.Tunnel())
                await steal.send(pb.TunnelFrame(open=pb.TunnelOpen(session_id=bob.session_id,
                                                                   kind=pb.TunnelOpen.DIAL_ANSWER,
                                                                   dial_id=req.dial_id)))
                assert (await asyncio.wait_for(steal.recv(), 5)).WhichOneof("kind") == "error"
                steal.cancel()
                t = GrpcFrameChannel(hub.Tunnel())
                await t.send(pb.TunnelFrame(open=pb.TunnelOpen(session_id=agent.agent_id,
                                                               kind=pb.TunnelOpen.DIAL_ANSWER, dial_id=req.dial_id)))
                r, w = await asyncio.open_connection("127.0.0.1", fport)
                await t.send(pb.TunnelFrame(opened=pb.Empty()))
                f = await t.recv()
                w.write(f.data)
                await t.send(pb.TunnelFrame(data=await r.read(65536)))
                w.close()

        serving = asyncio.ensure_future(serve_files())
        ft = GrpcFrameChannel(stub.Tunnel())
        await ft.send(pb.TunnelFrame(open=pb.TunnelOpen(session_id=alice.session_id, kind=pb.TunnelOpen.AGENT_FILES,
                                                        intercept_id=ic.id, dst_ip=_ip("10.42.0.5"))))
        assert (await asyncio.wait_for(ft.recv(), 5)).WhichOneof("kind") == "opened"
        await ft.send(pb.TunnelFrame(data=b"ls"))
        assert (await asyncio.wait_for(ft.recv(), 5)).data == b"echo:ls"
        ft.cancel()

        # bob asking for alice's files (he may even guess the id): refused before any agent is asked
        for iid in (ic.id, ""):
            bt = GrpcFrameChannel(stub.Tunnel())
            await bt.send(pb.TunnelFrame(open=pb.TunnelOpen(session_id=bob.session_id,
                                                            kind=pb.TunnelOpen.AGENT_FILES, intercept_id=iid)))
            reply = await asyncio.wait_for(bt.recv(), 5)
            assert reply.WhichOneof("kind") == "error" and "session" in reply.error
            bt.cancel()
        serving.cancel()
    finally:
        files.close()
        await chan.close()
        await server.stop(0)


def test_sessions_see_only_their_own_and_files_go_to_the_holder() -> None:
    asyncio.run(_visibility_and_files())


async def _personal() -> None:
    server, mgr, stub, chan = await _manager()
    try:
        alice = await stub.ArriveAsClient(pb.ClientInfo(name="alice@laptop"))
        bob = await stub.ArriveAsClient(pb.ClientInfo(name="bob@laptop2"))
        carol = await stub.ArriveAsClient(pb.ClientInfo(name="carol@laptop3"))
        hub = stub.hub
        agent = await hub.ArriveAsAgent(pb.AgentInfo(name="hello", namespace="default", pod_name="hello-1",
                                                     pod_ip="10.42.0.5"), metadata=_bearer("agent-of-hello"))

        def spec(name: str, header: str = "", **kw: str) -> pb.InterceptSpec:
            hs = [pb.HeaderMatch(name="x-dev", value=header)] if header else []
            return pb.InterceptSpec(name=name, namespace="default", workload="hello", local_port=9000,
                                    http_headers=hs, **kw)

        a = await stub.CreateIntercept(pb.CreateInterceptRequest(session=alice, spec=spec("hello", "alice")))
        b = await stub.CreateIntercept(pb.CreateInterceptRequest(session=bob, spec=spec("hello", "bob")))
        # the same filter, a global intercept, a bad regex: refused, naming the holder
        for sp, want in ((spec("mine", "alice"), "same HTTP filters"), (spec("all"), "personal intercept"),
                         (spec("rx", http_path_regex="("), "invalid --http-path-regex")):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.CreateIntercept(pb.CreateInterceptRequest(session=carol, spec=sp))
            assert want in exc.value.details(), exc.value.details()
            if want != "invalid --http-path-regex":
                assert "alice@laptop" in exc.value.details()
        # the agent is told both; both wait until it has probed the app's protocol
        instr = hub.WatchAgentInstructions(agent)
        got = await asyncio.wait_for(instr.read(), 5)
        assert sorted(i.spec.http_headers[0].value for i in got.intercepts) == ["alice", "bob"]
        await asyncio.sleep(0.1)
        assert mgr.intercepts[a.id].state == pb.InterceptInfo.WAITING
        assert "speaks HTTP" in mgr.intercepts[a.id].message
        assert mgr.intercepts[a.id].app_protocol == ""   # not probed yet
        await hub.AgentRemain(pb.AgentSession(agent_id=agent.agent_id, app_protocol="http/1.1"))
        assert mgr.intercepts[a.id].state == mgr.intercepts[b.id].state == pb.InterceptInfo.ACTIVE
        # the holder sees what the port speaks (its Try line: curl, or grpcurl for h2c)
        mine = await asyncio.wait_for(stub.WatchIntercepts(alice).read(), 5)
        assert [i.app_protocol for i in mine.intercepts if i.mine] == ["http/1.1"]
        # others see a personal intercept as such, but not its filter
        lst = await asyncio.wait_for(stub.WatchIntercepts(carol).read(), 5)
        assert all(not i.spec.http_headers and i.message == "personal (HTTP filters)" for i in lst.intercepts)
        # a non-HTTP port fails every filtered intercept, saying why
        await hub.AgentRemain(pb.AgentSession(agent_id=agent.agent_id, app_protocol="tcp: it answered with b'SSH'"))
        ic = mgr.intercepts[a.id]
        assert ic.state == pb.InterceptInfo.ERROR and "does not speak HTTP" in ic.message and "SSH" in ic.message
        # when both leave, a global intercept is allowed again; then filtered ones conflict with it
        await stub.Depart(alice)
        await stub.Depart(bob)
        await stub.CreateIntercept(pb.CreateInterceptRequest(session=carol, spec=spec("all")))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.CreateIntercept(pb.CreateInterceptRequest(
                session=await stub.ArriveAsClient(pb.ClientInfo(name="dave@l4")), spec=spec("d", "dave")))
        assert "carol@laptop3" in exc.value.details() and "all connections" in exc.value.details()
        instr.cancel()
    finally:
        await chan.close()
        await server.stop(0)


def test_personal_intercepts_share_a_workload_and_conflict_with_a_global_one() -> None:
    asyncio.run(_personal())
