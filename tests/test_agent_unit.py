"""Unit tests: byte pumps, the traffic-agent against a fake manager, and the
injector's patch planning on plain dicts.  Loopback only, no cluster."""
from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import os
import socket
from typing import Any

import pytest

from tpnb import config
from tpnb.cluster import agent as agent_mod
from tpnb.common.forward import (
    CHUNK,
    GrpcFrameChannel,
    MemoryFrameChannel,
    bridge,
    error_frame,
    pump_stream_to_tunnel,
    splice,
)
from tpnb.connector import agent_injector as inj
from tpnb.errors import InterceptError
from tpnb.proto import pb, rpc

pytestmark = pytest.mark.unit

TIMEOUT = 30


def run(coro: Any) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, TIMEOUT)
    return asyncio.run(bounded())


# ====================================================================== helpers

async def _server(handler: Any) -> tuple[asyncio.AbstractServer, int]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Full-duplex echo; half-closes back at EOF."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    finally:
        writer.close()


async def _count_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads to EOF first, answers after: needs a working half-close."""
    data = await reader.read()
    writer.write(f"got {len(data)} bytes sha {hashlib.sha256(data).hexdigest()}".encode())
    await writer.drain()
    writer.close()


async def _send_all_read_all(port: int, payload: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        for i in range(0, len(payload), 100_000):
            w.write(payload[i:i + 100_000])
            await w.drain()
        w.write_eof()

    sender = asyncio.ensure_future(send())
    got = await r.read()
    await sender
    w.close()
    return got


async def _tunnel_pair(upstream_port: int) -> tuple[asyncio.AbstractServer, int, list[asyncio.Task[Any]]]:
    """Listener whose connections cross two bridges over a memory channel to upstream."""
    tasks: list[asyncio.Task[Any]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        a, b = MemoryFrameChannel.pair()
        ur, uw = await asyncio.open_connection("127.0.0.1", upstream_port)
        far = asyncio.ensure_future(bridge(ur, uw, b, linger=2))
        near = asyncio.ensure_future(bridge(reader, writer, a, linger=2))
        tasks.extend([far, near])
        await asyncio.gather(far, near, return_exceptions=True)

    srv, port = await _server(handler)
    return srv, port, tasks


# ====================================================================== pumps

def test_bridge_large_transfer_checksum() -> None:
    async def main() -> None:
        up, up_port = await _server(_echo)
        srv, port, _ = await _tunnel_pair(up_port)
        payload = os.urandom(5 * 1024 * 1024 + 123)
        got = await _send_all_read_all(port, payload)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
        srv.close()
        up.close()
    run(main())


def test_bridge_half_close() -> None:
    async def main() -> None:
        up, up_port = await _server(_count_then_answer)
        srv, port, _ = await _tunnel_pair(up_port)
        payload = os.urandom(300_000)
        got = await _send_all_read_all(port, payload)
        assert got.decode() == f"got {len(payload)} bytes sha {hashlib.sha256(payload).hexdigest()}"
        srv.close()
        up.close()
    run(main())


def test_frames_are_bounded_and_end_with_eof() -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"x" * (3 * CHUNK + 5))
        reader.feed_eof()
        a, b = MemoryFrameChannel.pair(maxsize=100)
        await pump_stream_to_tunnel(reader, a)
        frames = []
        while not b._inbox.empty():
            frames.append(await b.recv())
        kinds = [f.WhichOneof("kind") for f in frames]
        assert kinds[-1] == "eof" and set(kinds[:-1]) == {"data"}
        assert all(len(f.data) <= CHUNK for f in frames[:-1])
        assert sum(len(f.data) for f in frames[:-1]) == 3 * CHUNK + 5
    run(main())


def test_bridge_cancellation_closes_both_sides() -> None:
    async def main() -> None:
        upstream_closed = asyncio.Event()

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                await reader.read()  # until the bridge goes away
            upstream_closed.set()
            writer.close()

        up, up_port = await _server(hold)
        srv, port, tasks = await _tunnel_pair(up_port)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"hello")
        await w.drain()
        while len(tasks) < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        for t in tasks:
            t.cancel()
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(r.read(), 5) == b""
        await asyncio.wait_for(upstream_closed.wait(), 5)
        w.close()
        srv.close()
        up.close()
    run(main())


def test_bridge_remote_error_resets_socket() -> None:
    async def main() -> None:
        a, b = MemoryFrameChannel.pair()
        done = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await bridge(reader, writer, a, linger=1)
            done.set()

        srv, port = await _server(handler)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"ping")
        await w.drain()
        first = await b.recv()
        assert first is not None and first.data == b"ping"
        await b.send(error_frame("dial failed"))
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            # an abort shows as a reset (or, rarely, an EOF before the expected bytes)
            await asyncio.wait_for(r.readexactly(1), 5)
        await asyncio.wait_for(done.wait(), 5)
        srv.close()
    run(main())


def test_bridge_peer_vanishing_without_eof_resets_socket() -> None:
    async def main() -> None:
        a, b = MemoryFrameChannel.pair()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await bridge(reader, writer, a, linger=1)

        srv, port = await _server(handler)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await b.send(pb.TunnelFrame(data=b"partial"))
        assert await r.readexactly(7) == b"partial"
        b.close()  # RPC ends, no eof: the response was truncated
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(r.readexactly(1), 5)
        srv.close()
    run(main())


def test_splice_large_and_half_close_and_cancel() -> None:
    async def main() -> None:
        for upstream in (_echo, _count_then_answer):
            up, up_port = await _server(upstream)

            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                ur, uw = await asyncio.open_connection("127.0.0.1", up_port)
                await splice(reader, writer, ur, uw)

            srv, port = await _server(handler)
            payload = os.urandom(4 * 1024 * 1024)
            got = await _send_all_read_all(port, payload)
            if upstream is _echo:
                assert got == payload
            else:
                assert got.decode().startswith(f"got {len(payload)} bytes")
            srv.close()
            up.close()

        # cancellation
        closed = asyncio.Event()

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                await reader.read()
            closed.set()

        up, up_port = await _server(hold)
        tasks: list[asyncio.Task[Any]] = []

        async def handler2(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            ur, uw = await asyncio.open_connection("127.0.0.1", up_port)
            t = asyncio.ensure_future(splice(reader, writer, ur, uw))
            tasks.append(t)
            with contextlib.suppress(asyncio.CancelledError):
                await t

        srv, port = await _server(handler2)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        while not tasks:
            await asyncio.sleep(0.01)
        tasks[0].cancel()
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(r.read(), 5) == b""
        await asyncio.wait_for(closed.wait(), 5)
        srv.close()
        up.close()
    run(main())


# ====================================================================== the agent

#: an SFTP v3 INIT request, as a client's first bytes
SFTP_INIT = bytes.fromhex("000000050100000003")


class FakeManager(rpc.AgentHubServicer):
    """Just enough of the traffic-manager's agent API for the agent: sessions, instructions, tunnels."""

    def __init__(self, laptop_port: int) -> None:
        self.laptop_port = laptop_port
        self.arrivals: list[pb.AgentInfo] = []
        self.tokens: list[str] = []
        self.dials: asyncio.Queue[pb.DialRequest] = asyncio.Queue()
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()
        self.sessions: set[str] = set()
        self.instructions: asyncio.Queue[pb.AgentInstruction] = asyncio.Queue()
        self.opens: list[pb.TunnelOpen] = []
        self.refuse = False

    async def ArriveAsAgent(self, request: pb.AgentInfo, context: Any) -> pb.AgentSession:
        self.tokens.append(dict(context.invocation_metadata()).get("authorization", ""))
        self.arrivals.append(request)
        sid = f"agent-{len(self.arrivals)}"
        self.sessions.add(sid)
        return pb.AgentSession(agent_id=sid)

    async def AgentRemain(self, request: pb.AgentSession, context: Any) -> pb.Empty:
        import grpc
        if request.agent_id not in self.sessions:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such agent")
        return pb.Empty()

    async def WatchAgentInstructions(self, request: pb.AgentSession, context: Any) -> Any:
        yield pb.AgentInstruction()
        while True:
            yield await self.instructions.get()

    async def WatchAgentDials(self, request: pb.AgentSession, context: Any) -> Any:
        while True:
            yield await self.dials.get()

    async def Tunnel(self, request_iterator: Any, context: Any) -> None:
        chan = GrpcFrameChannel(context)
        first = await chan.recv()
        assert first is not None and first.WhichOneof("kind") == "open"
        self.opens.append(first.open)
        if first.open.kind == pb.TunnelOpen.DIAL_ANSWER:  # the agent joined its file service
            opened = await chan.recv()
            assert opened is not None and opened.WhichOneof("kind") == "opened"
            await chan.send(pb.TunnelFrame(data=SFTP_INIT))  # passes the agent's SFTP jail unchanged
            reply = await chan.recv()
            await self.answers.put(reply.data if reply is not None else b"")
            return
        if self.refuse:
            await chan.send(error_frame("client port not listening"))
            return
        r, w = await asyncio.open_connection("127.0.0.1", self.laptop_port)
        await chan.send(pb.TunnelFrame(opened=pb.Empty()))
        await bridge(r, w, chan, linger=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _ask(port: int, text: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(text)
    w.write_eof()
    data = await asyncio.wait_for(r.read(), 10)
    w.close()
    return data


def _tag(tag: bytes) -> Any:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(tag + data)
        await writer.drain()
        writer.close()
    return handler


async def _start_manager(fake: FakeManager, port: int) -> Any:
    import grpc
    server = grpc.aio.server()
    rpc.add_AgentHubServicer_to_server(fake, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def _until(pred: Any, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


def test_agent_forwards_routes_intercepts_and_survives_manager_restarts(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Any) -> None:
    monkeypatch.setattr(agent_mod, "app_environment", lambda s, proc=None: {"GREETING": "hi"})
    monkeypatch.setattr(agent_mod, "REMAIN_INTERVAL", 0.3)
    token = tmp_path / "token"
    token.write_text("projected-token\n")

    async def main() -> None:
        app, app_port = await _server(_tag(b"app:"))
        laptop, laptop_port = await _server(_tag(b"laptop:"))
        async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"files:" + await reader.read(100))
            await writer.drain()
            writer.close()
        files, files_port = await _server(answer_once)   # the loopback file service
        mgr_port = _free_port()
        settings = agent_mod.AgentSettings(
            name="hello", namespace="default", pod_name="hello-1", pod_ip="10.42.0.9",
            app_container="echoserver", app_port=app_port, agent_port=_free_port(), health_port=_free_port(),
            sftp_port=files_port, manager_host="127.0.0.1", manager_port=mgr_port, mounts=["/data"],
            token_file=str(token))
        ag = agent_mod.Agent(settings)
        await ag.start()
        session = asyncio.ensure_future(ag.session_loop())
        try:
            # no manager at all: the workload keeps working
            assert await _ask(settings.agent_port, b"one") == b"app:one"

            fake = FakeManager(laptop_port)
            server = await _start_manager(fake, mgr_port)
            await _until(lambda: ag.agent_id is not None, 20)
            info = fake.arrivals[-1]
            assert (info.name, info.pod_ip, info.app_container) == ("hello", "10.42.0.9", "echoserver")
            assert dict(info.environment) == {"GREETING": "hi"} and info.mount_point == "/tpnb/volumes"
            assert fake.tokens[-1] == "Bearer projected-token"   # the agent proves who it is
            # the manager asks for the file service: the agent joins its loopback listener to a tunnel
            await fake.dials.put(pb.DialRequest(purpose=pb.DialRequest.FILES, dial_id="d1"))
            assert await asyncio.wait_for(fake.answers.get(), 10) == b"files:" + SFTP_INIT
            assert fake.opens[-1].kind == pb.TunnelOpen.DIAL_ANSWER and fake.opens[-1].dial_id == "d1"
            assert await _ask(settings.agent_port, b"two") == b"app:two"

            ic = pb.InterceptInfo(id="ic1", state=pb.InterceptInfo.ACTIVE,
                                  spec=pb.InterceptSpec(name="hello"))
            await fake.instructions.put(pb.AgentInstruction(intercepts=[ic]))
            await _until(lambda: ag.active_intercept() is not None)
            big = os.urandom(2_000_000)
            assert await _ask(settings.agent_port, big) == b"laptop:" + big
            op = fake.opens[-1]
            assert op.kind == pb.TunnelOpen.AGENT_INTERCEPTED and op.intercept_id == "ic1" and op.session_id == ag.agent_id
            assert op.src_ip == socket.inet_aton("127.0.0.1") and op.src_port > 0

            fake.refuse = True  # the laptop side fails: the client sees the connection fail
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                r, w = await asyncio.open_connection("127.0.0.1", settings.agent_port)
                w.write(b"x")
                w.write_eof()
                data = await asyncio.wait_for(r.read(), 10)
                if not data:
                    raise ConnectionResetError("closed")
            fake.refuse = False

            await fake.instructions.put(pb.AgentInstruction())  # intercept gone
            await _until(lambda: ag.active_intercept() is None)
            assert await _ask(settings.agent_port, b"three") == b"app:three"

            # manager restarts (forgets all sessions): agent forwards to the app meanwhile, re-arrives
            await fake.instructions.put(pb.AgentInstruction(intercepts=[ic]))
            await _until(lambda: ag.active_intercept() is not None)
            await server.stop(0)
            await _until(lambda: ag.agent_id is None, 20)
            assert await _ask(settings.agent_port, b"four") == b"app:four"
            fake2 = FakeManager(laptop_port)
            server = await _start_manager(fake2, mgr_port)
            await _until(lambda: ag.agent_id is not None and bool(fake2.arrivals), 30)

            # session expiry (NOT_FOUND on AgentRemain) -> prompt re-arrival
            n = len(fake2.arrivals)
            fake2.sessions.clear()
            await _until(lambda: len(fake2.arrivals) > n, 10)

            # the health port (readiness probe) accepts and closes: it serves nothing
            r, w = await asyncio.open_connection("127.0.0.1", settings.health_port)
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
            await server.stop(0)
        finally:
            session.cancel()
            await asyncio.gather(session, return_exceptions=True)
            await ag.stop()
            app.close()
            laptop.close()
            files.close()
    asyncio.run(asyncio.wait_for(main(), 90))


def test_agent_settings_and_environ_parsing(tmp_path: Any) -> None:
    s = agent_mod.AgentSettings.from_env({
        "APP_PORT": "8080", "AGENT_PORT": "9900", "AGENT_NAME": "hello", "AGENT_NAMESPACE": "ns",
        "AGENT_POD_NAME": "p", "AGENT_POD_IP": "10.0.0.1", "TPNB_CONTAINER": "app",
        "MANAGER_HOST": "traffic-manager.tpnb", "MANAGER_PORT": "8081", "TPNB_MOUNTS": '["/a","/b"]'})
    assert (s.app_port, s.agent_port, s.mounts, s.manager_host) == (8080, 9900, ["/a", "/b"], "traffic-manager.tpnb")
    assert agent_mod.parse_environ(b"A=1\0B=x=y\0\0C=\0") == {"A": "1", "B": "x=y", "C": ""}
    env = agent_mod.fallback_environment({
        "TPNB_APP_ENV_FOO": "bar", "HELLO_SERVICE_HOST": "10.43.0.5", "AGENT_PORT": "9900",
        "KUBERNETES_PORT": "tcp://10.43.0.1:443", "HOSTNAME": "p", "PATH": "/x"})
    assert env == {"FOO": "bar", "HELLO_SERVICE_HOST": "10.43.0.5",
                   "KUBERNETES_PORT": "tcp://10.43.0.1:443", "HOSTNAME": "p"}
    # /proc/net/tcp parsing
    net = tmp_path / "net"
    net.mkdir()
    (net / "tcp").write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1\n"
        "   1: 0100007F:1F90 0100007F:C000 01 00000000:00000000 00:00000000 00000000     0        0 4343 1\n")
    assert agent_mod.listening_inodes(8080, tmp_path) == {"4242"}


# ====================================================================== injection planning

def _deployment(container: dict[str, Any] | None = None, share: bool | None = None) -> dict[str, Any]:
    c = container or {
        "name": "echoserver", "image": "tpnb.local/echoserver:1.4", "imagePullPolicy": "IfNotPresent",
        "resources": {}, "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
    }
    spec: dict[str, Any] = {"containers": [c], "restartPolicy": "Always", "dnsPolicy": "ClusterFirst"}
    if share is not None:
        spec["shareProcessNamespace"] = share
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "hello", "namespace": "default", "resourceVersion": "100", "generation": 1,
                     "labels": {"app": "hello"},
                     "annotations": {"deployment.kubernetes.io/revision": "1"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "hello"}},
                 "template": {"metadata": {"labels": {"app": "hello"}}, "spec": spec}},
        "status": {"observedGeneration": 1},
    }


def _service(name: str = "hello", ports: list[dict[str, Any]] | None = None,
             selector: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "resourceVersion": "7"},
        "spec": {"selector": {"app": "hello"} if selector is None else selector,
                 "ports": ports if ports is not None else [{"port": 80, "protocol": "TCP", "targetPort": 8080}],
                 "type": "ClusterIP", "clusterIP": "10.43.0.20"},
    }


def _apply_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """Minimal RFC 6902 (add/remove/replace on objects) to check json_patch."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        if not parts:
            doc = op["value"]
            continue
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        key = parts[-1]
        if op["op"] == "remove":
            del parent[key]
        else:
            parent[key] = op["value"]
    return doc


def _wl(obj: dict[str, Any]) -> inj.Workload:
    return inj.Workload("Deployment", obj["metadata"]["name"], obj["metadata"]["namespace"], obj)


def _env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env") or []}


def test_numeric_target_port_inject_and_restore() -> None:
    cfg = config.Config()
    dep = _deployment(container={
        "name": "echoserver", "image": "tpnb.local/echoserver:1.4",
        "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "$(A)-x-$$(A)"},
                {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}}],
        "envFrom": [{"configMapRef": {"name": "cm"}}, {"prefix": "S_", "secretRef": {"name": "sec"}}],
        "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True},
                         {"name": "cfg", "mountPath": "/etc/app", "subPath": "app"}],
    })
    svc = _service()
    wl = _wl(dep)
    t = inj.resolve_target(wl, [svc, _service("other", selector={"app": "other"})], None, None)
    assert (t.service, t.port, t.target_port, t.container, t.container_port) == ("hello", 80, 8080, "echoserver", 8080)

    new = inj.inject_workload(dep, wl, t, "tpnb.local/tpnb:x", cfg)
    assert dep == _deployment(container=dep["spec"]["template"]["spec"]["containers"][0])  # input untouched
    pod = new["spec"]["template"]["spec"]
    assert pod["shareProcessNamespace"] is True
    agent = pod["containers"][-1]
    assert agent["name"] == "traffic-agent" and agent["args"] == ["agent"] and agent["image"] == "tpnb.local/tpnb:x"
    assert agent["ports"][0] == {"name": "tpnb-agent", "containerPort": 9900, "protocol": "TCP"}
    env = _env(agent)
    assert env["TPNB_CONTAINER"] == "echoserver" and env["AGENT_NAME"] == "hello"
    assert env["APP_PORT"] == "8080" and env["AGENT_PORT"] == "9900"
    assert env["MANAGER_HOST"] == "traffic-manager.tpnb" and env["MANAGER_PORT"] == "8082"  # the agents' API
    assert env["AGENT_POD_IP"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}
    assert env["AGENT_NAMESPACE"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert json.loads(env["TPNB_MOUNTS"]) == ["/data", "/etc/app"]
    assert env["TPNB_APP_ENV_B"] == "$(TPNB_APP_ENV_A)-x-$$(A)"
    assert env["TPNB_APP_ENV_MEM"]["resourceFieldRef"]["containerName"] == "echoserver"
    assert agent["envFrom"] == [{"configMapRef": {"name": "cm"}, "prefix": "TPNB_APP_ENV_"},
                                {"prefix": "TPNB_APP_ENV_S_", "secretRef": {"name": "sec"}}]
    assert agent["volumeMounts"] == [
        {"name": "tpnb-agent-volumes", "mountPath": "/tpnb/volumes"},
        {"name": "data", "mountPath": "/tpnb/volumes/data", "readOnly": True},
        {"name": "cfg", "mountPath": "/tpnb/volumes/etc/app", "subPath": "app"},
        {"name": "tpnb-agent-token", "mountPath": "/var/run/secrets/tpnb", "readOnly": True}]
    # the agent's credentials for the manager: an audience-bound projected token, in the agent only
    assert pod["volumes"] == [{"name": "tpnb-agent-token", "projected": {"sources": [{"serviceAccountToken": {
        "audience": "tpnb-traffic-manager", "expirationSeconds": 3600, "path": "token"}}]}},
        {"name": "tpnb-agent-volumes", "emptyDir": {}}]
    assert env["TPNB_AGENT_TOKEN_FILE"] == "/var/run/secrets/tpnb/token"
    assert not any(m["name"] == "tpnb-agent-token" for m in pod["containers"][0].get("volumeMounts") or [])
    # probed on the health port (serves nothing), never on the traffic port that may be intercepted
    assert agent["readinessProbe"]["tcpSocket"]["port"] == 9901 and env["AGENT_HEALTH_PORT"] == "9901"
    assert [p["containerPort"] for p in agent["ports"]] == [9900]  # no control port
    ann = json.loads(new["metadata"]["annotations"][inj.ANN_INJECTED])
    assert ann["containerPort"] == 8080 and ann["service"] == "hello" and ann["shareProcessNamespace"] is None

    new_svc = inj.inject_service(svc, t, cfg)
    assert new_svc["spec"]["ports"][0]["targetPort"] == 9900
    assert json.loads(new_svc["metadata"]["annotations"][inj.ANN_SVC_ORIG]) == {"80": 8080}

    # exact restore, and the JSON patches reproduce the planned objects
    assert inj.restore_workload(new) == dep
    assert inj.restore_service(new_svc) == svc
    assert _apply_patch(dep, inj.json_patch(dep, new)) == new
    assert _apply_patch(new, inj.json_patch(new, dep)) == dep
    assert _apply_patch(new_svc, inj.json_patch(new_svc, svc)) == svc
    assert not inj.json_patch(svc, svc)

    # idempotent: re-planning from the injected object gives the same object
    t2 = inj.resolve_target(_wl(new), [new_svc], None, "80")
    assert t2 == t
    again = inj.inject_workload(inj.restore_workload(new), _wl(new), t2, "tpnb.local/tpnb:x", cfg)
    assert again == new
    assert inj.inject_service(inj.restore_service(new_svc), t2, cfg) == new_svc
    # another image is a change
    other = inj.inject_workload(dep, wl, t, "tpnb.local/tpnb:y", cfg)
    assert json.loads(other["metadata"]["annotations"][inj.ANN_INJECTED])["hash"] != ann["hash"]


def test_named_target_port_renames_and_restores() -> None:
    cfg = config.Config()
    app = {
        "name": "web", "image": "nginx",
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http", "scheme": "HTTP"}},
        "livenessProbe": {"tcpSocket": {"port": "http"}},
        "lifecycle": {"preStop": {"httpGet": {"path": "/quit", "port": "http"}}},
    }
    dep = _deployment(container=app, share=False)
    svc = _service(ports=[{"name": "web", "port": 80, "protocol": "TCP", "targetPort": "http"},
                          {"name": "metrics", "port": 9090, "protocol": "TCP", "targetPort": "metrics"}])
    wl = _wl(dep)
    with pytest.raises(InterceptError) as ei:
        inj.resolve_target(wl, [svc], None, None)
    assert "several" in ei.value.what and "hello:web/80->http" in ei.value.why
    t = inj.resolve_target(wl, [svc], "hello", "web")
    assert (t.port_name, t.target_port, t.container, t.container_port) == ("web", "http", "web", 8080)
    assert inj.resolve_target(wl, [svc], None, "80") == t
    assert inj.resolve_target(wl, [svc], None, "http") == t

    new = inj.inject_workload(dep, wl, t, "img", cfg)
    pod = new["spec"]["template"]["spec"]
    web = pod["containers"][0]
    assert [p["name"] for p in web["ports"]] == ["tpnb-orig-http", "metrics"]
    assert web["readinessProbe"]["httpGet"]["port"] == "tpnb-orig-http"
    assert web["livenessProbe"]["tcpSocket"]["port"] == "tpnb-orig-http"
    assert web["lifecycle"]["preStop"]["httpGet"]["port"] == "tpnb-orig-http"
    agent = pod["containers"][1]
    assert agent["ports"][0] == {"name": "http", "containerPort": 9900, "protocol": "TCP"}
    assert pod["shareProcessNamespace"] is True
    ann = json.loads(new["metadata"]["annotations"][inj.ANN_INJECTED])
    assert ann["renamedPorts"] == {"http": "tpnb-orig-http"} and ann["shareProcessNamespace"] is False
    assert inj.inject_service(svc, t, cfg) == svc  # Service untouched
    assert inj.restore_workload(new) == dep
    # re-resolution on the injected object still finds the app's port
    assert inj.resolve_target(_wl(new), [svc], "hello", "web") == t
    assert len(inj.orig_port_name("averylongname")) <= 15


def test_agent_token_volume_beside_the_apps_volumes_and_restored() -> None:
    cfg = config.Config()
    dep = _deployment(container={"name": "app", "image": "x",
                                 "volumeMounts": [{"name": "cfg", "mountPath": "/etc/app"}]})
    dep["spec"]["template"]["spec"]["volumes"] = [{"name": "cfg", "configMap": {"name": "c"}}]
    t = inj.resolve_target(_wl(dep), [_service()], None, None)
    new = inj.inject_workload(dep, _wl(dep), t, "img", cfg)
    assert [v["name"] for v in new["spec"]["template"]["spec"]["volumes"]] == ["cfg", "tpnb-agent-token",
                                                                                   "tpnb-agent-volumes"]
    assert inj.restore_workload(new) == dep
    assert _apply_patch(new, inj.json_patch(new, dep)) == dep
    # a volume of the reserved name is refused, not overwritten
    dep["spec"]["template"]["spec"]["volumes"].append({"name": "tpnb-agent-token", "emptyDir": {}})
    with pytest.raises(InterceptError) as ei:
        inj.inject_workload(dep, _wl(dep), t, "img", cfg)
    assert "tpnb-agent-token" in ei.value.what


def test_resolve_errors_are_clear() -> None:
    dep = _deployment()
    wl = _wl(dep)
    with pytest.raises(InterceptError) as ei:
        inj.resolve_target(wl, [_service(selector={"app": "nope"})], None, None)
    assert ei.value.what == "workload hello has no Service" and ei.value.hint
    with pytest.raises(InterceptError) as ei:
        inj.resolve_target(wl, [_service()], None, "8443")
    assert "no port 8443" in ei.value.what and "hello:80->8080" in ei.value.why
    with pytest.raises(InterceptError) as ei:
        inj.resolve_target(wl, [_service()], "missing", None)
    assert "not exposed by Service missing" in ei.value.what
    with pytest.raises(InterceptError) as ei:
        inj.resolve_target(wl, [_service(ports=[{"port": 53, "protocol": "UDP", "targetPort": 53}])], None, None)
    assert "no usable TCP" in ei.value.what
    # a port the agent would need is taken
    c = copy.deepcopy(dep["spec"]["template"]["spec"]["containers"][0])
    c["ports"] = [{"containerPort": 9900, "protocol": "TCP"}]
    dep2 = _deployment(container=c)
    t = inj.resolve_target(_wl(dep2), [_service()], None, None)
    with pytest.raises(InterceptError) as ei:
        inj.inject_workload(dep2, _wl(dep2), t, "img", config.Config())
    assert "9900" in ei.value.what


def test_security_context_follows_app() -> None:
    cfg = config.Config()
    c = {"name": "app", "image": "x", "securityContext": {"runAsUser": 1000, "runAsGroup": 2000}}
    dep = _deployment(container=c)
    t = inj.resolve_target(_wl(dep), [_service()], None, None)
    agent = inj.inject_workload(dep, _wl(dep), t, "img", cfg)["spec"]["template"]["spec"]["containers"][-1]
    restricted = {"allowPrivilegeEscalation": False, "seccompProfile": {"type": "RuntimeDefault"},
                  "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    assert agent["securityContext"] == {"runAsUser": 1000, "runAsGroup": 2000, **restricted}

    def agent_sc(pod_sc: dict[str, Any] | None, app_sc: dict[str, Any] | None = None) -> dict[str, Any]:
        c = {"name": "app", "image": "x", **({"securityContext": app_sc} if app_sc else {})}
        dep = _deployment(container=c)
        if pod_sc is not None:
            dep["spec"]["template"]["spec"]["securityContext"] = pod_sc
        t = inj.resolve_target(_wl(dep), [_service()], None, None)
        return dict(inj.inject_workload(dep, _wl(dep), t, "img", cfg)["spec"]["template"]["spec"]
                    ["containers"][-1]["securityContext"])

    # the pod's uid (a restricted namespace's usual shape): the agent takes it
    assert agent_sc({"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001}) == {
        "runAsUser": 10001, **restricted}
    # the container's uid wins over the pod's
    assert agent_sc({"runAsUser": 10001, "runAsGroup": 3}, {"runAsUser": 20002})["runAsUser"] == 20002
    # non-root demanded, uid left to the image: a fixed non-root uid
    assert agent_sc({"runAsNonRoot": True}) == {"runAsUser": inj.NONROOT_UID, "runAsGroup": inj.NONROOT_UID,
                                                **restricted}
    assert agent_sc(None, {"runAsNonRoot": True})["runAsUser"] == inj.NONROOT_UID
    # an app that may run as root: a root agent with the runtime's capabilities, as before, but hardened
    assert agent_sc(None) == {"allowPrivilegeEscalation": False, "seccompProfile": {"type": "RuntimeDefault"}}
    assert agent_sc({"runAsUser": 0}) == {"allowPrivilegeEscalation": False,
                                          "seccompProfile": {"type": "RuntimeDefault"}, "runAsUser": 0}


def _pod(name: str, tspec: dict[str, Any], ready: bool, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": copy.deepcopy(tspec),
            "status": {"phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}], **status}}


def test_rollout_state() -> None:
    cfg = config.Config()
    dep = _deployment()
    t = inj.resolve_target(_wl(dep), [_service()], None, None)
    new = inj.inject_workload(dep, _wl(dep), t, "img", cfg)
    new["metadata"]["generation"] = 2
    new["status"] = {"observedGeneration": 2}
    old_spec = dep["spec"]["template"]["spec"]
    new_spec = new["spec"]["template"]["spec"]
    st = inj.rollout_state("Deployment", new, [_pod("a", old_spec, True)])
    assert not st.done and "old pod" in st.message
    st = inj.rollout_state("Deployment", new, [_pod("a", old_spec, True), _pod("b", new_spec, False)])
    assert not st.done and st.failure is None
    st = inj.rollout_state("Deployment", new, [_pod("b", new_spec, True)])
    assert st.done
    st = inj.rollout_state("Deployment", new, [_pod("b", new_spec, False, containerStatuses=[
        {"name": "traffic-agent", "ready": False, "restartCount": 0,
         "state": {"waiting": {"reason": "ErrImageNeverPull", "message": "image not present"}}}])])
    assert st.failure and "ErrImageNeverPull" in st.failure and st.failed_container == "traffic-agent"
    st = inj.rollout_state("Deployment", new, [_pod("b", new_spec, False, containerStatuses=[
        {"name": "traffic-agent", "ready": False, "restartCount": 4,
         "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}},
         "state": {"waiting": {"reason": "CrashLoopBackOff"}}}])])
    assert st.crash and "keeps crashing" in (st.failure or "")
    rs = copy.deepcopy(new)
    st = inj.rollout_state("ReplicaSet", rs, [_pod("a", old_spec, True)])
    assert st.stale == ["a"]
    paused = copy.deepcopy(new)
    paused["spec"]["paused"] = True
    assert "paused" in (inj.rollout_state("Deployment", paused, []).failure or "")


@pytest.mark.unit
def test_an_api_error_keeps_the_status_document_whether_the_client_returns_or_raises_it() -> None:
    """kubernetes client 37 returns non-2xx responses (bytes body); other versions raise ApiException with
    a str body.  Both become the same _ApiError, whose 403 wording names the user the API server saw."""
    doc = {"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
           "message": 'deployments.apps "hello" is forbidden: User "system:serviceaccount:a:dev" cannot patch '
                      'resource "deployments" in API group "apps" in the namespace "a"'}
    returned = inj._status_error(403, json.dumps(doc).encode(), "Forbidden")
    raised = inj._status_error(403, json.dumps(doc), "Forbidden")
    for e in (returned, raised):
        assert (e.status, e.reason, e.message) == (403, "Forbidden", doc["message"])
        denied = inj._denied(e, "patch", "deployments", "a")
        assert "system:serviceaccount:a:dev" in str(denied) and "patch" in str(denied)
    # a body that is no Status document: its start is the message; none at all: the HTTP reason
    assert inj._status_error(502, b"<html>bad gateway</html>", "Bad Gateway").message == "<html>bad gateway</html>"
    assert inj._status_error(503, None, "Service Unavailable").message == "Service Unavailable"
