"""Unit tests: personal intercepts over HTTP/2 (cluster/h2route.py), loopback only.

Real grpcio servers stand for the app and two laptops, real grpcio clients call through
the relay: first H2Router alone (its choose/connect given by the test), then the whole
traffic-agent against the fake manager of test_agent_unit (probe -> "h2c", the sniff
hook, tunnels per intercept).
"""
from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from google.protobuf.wrappers_pb2 import StringValue

from tpnb.cluster import h2route, httproute
from tpnb.proto import pb

sys.path.insert(0, str(Path(__file__).resolve().parent))
import greeter_app  # noqa: E402
from agent_rig import RoutingManager, http_server, intercept_spec, quiet_agent, start_agent  # noqa: E402
from test_agent_unit import _free_port, _until  # noqa: E402

pytestmark = pytest.mark.unit


def test_stream_headers_are_what_filters_see() -> None:
    headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/greeter.Greeter/SayHello"),
               (b":authority", b"greeter:50051"), (b"content-type", b"application/grpc"), (b"x-dev", b"alice")]
    req = h2route.H2Request.from_headers(headers)
    assert (req.method, req.target) == (b"POST", b"/greeter.Greeter/SayHello")
    assert httproute.Filter.from_spec(intercept_spec("a", {"X-Dev": "alice"})).matches(req.target, req.headers)
    assert not httproute.Filter.from_spec(intercept_spec("a", {"x-dev": "bob"})).matches(req.target, req.headers)
    svc = httproute.Filter.from_spec(intercept_spec("s", http_path_prefix="/greeter.Greeter/"))
    assert svc.matches(req.target, req.headers)
    assert not httproute.Filter.from_spec(intercept_spec("m", http_path_equal="/greeter.Greeter/Chat")).matches(
        req.target, req.headers)


def test_sniff_tells_the_http2_preface_from_anything_else() -> None:
    async def feed(*chunks: bytes) -> bytes:
        r = asyncio.StreamReader()
        for c in chunks:
            r.feed_data(c)
        r.feed_eof()
        return await h2route.sniff(r)

    async def main() -> None:
        assert await feed(h2route.PREFACE + b"\x00\x00\x00\x04") == h2route.PREFACE
        assert await feed(b"PRI * HT", b"TP/2.0\r\n\r\nSM\r\n\r\n") == h2route.PREFACE  # in pieces
        # else the bytes read so far (at most the preface's length), which h11 goes on from
        assert await feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b"GET / HTTP/1.1\r\nHost: x\r"
        assert await feed(b"PRI * HTTP/1.1\r\n") == b"PRI * HTTP/1.1\r\n"
        assert await feed(b"PR") == b"PR"                   # the client ended early
    asyncio.run(main())


def test_goaway_frames_are_taken_out_of_the_byte_stream_in_order() -> None:
    from hyperframe.frame import GoAwayFrame, PingFrame, SettingsFrame
    ping, settings = PingFrame(0).serialize(), SettingsFrame(0).serialize()
    ga = GoAwayFrame(0)
    ga.last_stream_id, ga.error_code = 7, 0
    wire = settings + ga.serialize() + ping
    g = h2route._GoAways()
    parts = g.feed(wire[:5]) + g.feed(wire[5:20]) + g.feed(wire[20:])   # split anywhere
    assert [p if isinstance(p, bytes) else ("goaway", p.last_stream_id) for p in parts] == [
        settings, ("goaway", 7), ping]
    assert g.feed(ping[:4]) == [] and g.feed(ping[4:]) == [ping]   # a frame is passed on whole


def test_an_h2c_upgrade_is_declined_so_each_request_stays_routed() -> None:
    import h11
    req = h11.Request(method="GET", target="/", headers=[
        ("Host", "hello"), ("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"),
        ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"), ("x-dev", "alice")])
    out = httproute.decline_h2c_upgrade(req)
    assert out.headers == [(b"host", b"hello"), (b"x-dev", b"alice")]
    both = h11.Request(method="GET", target="/", headers=[
        ("Host", "h"), ("Connection", "keep-alive, Upgrade, HTTP2-Settings"), ("Upgrade", "websocket, h2c"),
        ("HTTP2-Settings", "x")])
    assert httproute.decline_h2c_upgrade(both).headers == [
        (b"host", b"h"), (b"connection", b"keep-alive, Upgrade"), (b"upgrade", b"websocket")]
    ws = h11.Request(method="GET", target="/", headers=[("Host", "h"), ("Connection", "Upgrade"),
                                                         ("Upgrade", "websocket")])
    assert httproute.decline_h2c_upgrade(ws) is ws   # other upgrades are not ours to decline


def test_probe_tells_h2c_from_http1_and_other_protocols() -> None:
    async def main() -> None:
        server, _, port = greeter_app.serve(0, "app", host="127.0.0.1")
        web, web_port = http_server("web")

        async def banner(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"SSH-2.0-OpenSSH_9.2\r\n")
            await w.drain()
            w.close()
        b = await asyncio.start_server(banner, "127.0.0.1", 0)
        try:
            assert await h2route.probe("127.0.0.1", port) == h2route.H2C
            h1 = await httproute.probe("127.0.0.1", port)  # what the HTTP/1.1 probe alone says of gRPC
            assert h1.startswith("tcp:") and "HTTP/2" in h1, h1
            assert (await h2route.probe("127.0.0.1", web_port)).startswith("tcp:")
            got = await h2route.probe("127.0.0.1", b.sockets[0].getsockname()[1])
            assert got.startswith("tcp:") and "SSH-2.0" in got, got
            with pytest.raises(OSError):
                await h2route.probe("127.0.0.1", _free_port())
        finally:
            server.stop(0)
            web.shutdown()
            b.close()
    asyncio.run(main())


@pytest.fixture()
def greeters() -> Iterator[dict[str, Any]]:
    made = {t: greeter_app.serve(0, t, host="127.0.0.1") for t in ("app", "alice", "bob")}
    yield {t: (port, servicer) for t, (_, servicer, port) in made.items()}
    for server, _, _ in made.values():
        server.stop(0)


class _Relay:
    """H2Router on a loopback port: x-dev=alice -> alice, x-dev=bob -> bob, else the app."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports
        self.connects: list[str] = []
        self.routers: list[h2route.H2Router] = []
        self.refuse: set[str] = set()
        self.filters = [(httproute.Filter.from_spec(intercept_spec(t, {"x-dev": t})), t) for t in ("alice", "bob")]

    def choose(self, req: Any) -> str:
        return next((t for f, t in self.filters if f.matches(req.target, req.headers)), "app")

    async def connect(self, key: Any) -> Any:
        self.connects.append(key)
        if key in self.refuse:
            return None
        return await httproute.StreamUpstream.connect("127.0.0.1", self.ports[key])

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = await h2route.sniff(r)
        assert first == h2route.PREFACE
        router = h2route.H2Router(r, w, self.choose, self.connect, first=first)
        self.routers.append(router)
        try:
            await router.run()
        finally:
            w.close()


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread, srv: Any) -> None:
    async def stop() -> None:
        srv.close()
        for t in asyncio.all_tasks():
            if t is not asyncio.current_task():
                t.cancel()
    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    time.sleep(0.1)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def _in_thread_loop() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    return loop, t


def test_router_routes_each_stream_of_one_connection(greeters: dict[str, Any]) -> None:
    relay = _Relay({t: p for t, (p, _) in greeters.items()})
    loop, thread = _in_thread_loop()
    srv = asyncio.run_coroutine_threadsafe(asyncio.start_server(relay.handle, "127.0.0.1", 0), loop).result(10)
    port = srv.sockets[0].getsockname()[1]
    try:
        got = greeter_app.check(f"127.0.0.1:{port}", "x-dev", ["alice=alice", "bob=bob", "=app", "carol=app"],
                                calls=300)
        assert got["n"] == 300 and got["nbad"] == 0, got
        for name, tag in (("alice", "alice"), ("bob", "bob"), ("none", "app"), ("carol", "app")):
            s = got["streams"][name]
            assert s["unary"] == f"hello {name} from {tag}"
            assert s["server"] == [f"hello {name} #{i} from {tag}" for i in range(5)]
            assert s["client"] == f"64 messages, 4194304 bytes to {tag}"   # 4 MiB > every window: flow control
            assert s["bidi"] == [f"{name}-{i} from {tag}" for i in range(20)]
            assert s["error"] == f"INVALID_ARGUMENT: no such name (from {tag})"   # grpc-status in trailers
        # one client connection, one upstream connection per destination, streams multiplexed on each
        assert len(relay.routers) == 1
        assert sorted(relay.connects) == ["alice", "app", "bob"]
        assert relay.routers[0].routed == {"alice": 80, "bob": 80, "app": 160}  # 75 of the 300 + 5 per header

        # a big answer streamed back (server -> client flow control), and trailing metadata
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = greeter_app.Stub(ch)
            answers = list(stub.SayHellos(StringValue(value="bob*3000"), metadata=(("x-dev", "bob"),), timeout=30))
            assert len(answers) == 3000 and answers[-1].value == "hello bob #2999 from bob"
            _, call = stub.Collect.with_call(iter([StringValue(value="y")] * 3), metadata=(("x-dev", "alice"),),
                                             timeout=10)
            assert ("x-count", "3") in call.trailing_metadata()

            # the client cancels a bidi call: the laptop's servicer sees it (RST_STREAM relayed)
            before = greeters["alice"][1].cancelled
            q: list[Any] = []
            ev = threading.Event()

            def requests() -> Iterator[StringValue]:
                yield StringValue(value="one")
                ev.wait(10)
                while True:   # never ends by itself
                    time.sleep(0.05)
                    if q:
                        return
                    yield StringValue(value="more")
            call = stub.Chat(requests(), metadata=(("x-dev", "alice"),), timeout=30)
            assert next(call).value == "one from alice"
            call.cancel()
            ev.set()
            deadline = time.monotonic() + 10
            while greeters["alice"][1].cancelled == before and time.monotonic() < deadline:
                time.sleep(0.05)
            q.append(1)
            assert greeters["alice"][1].cancelled == before + 1

            # a laptop that refuses: its calls fail UNAVAILABLE, the app's still work on the same channel
            relay.refuse.add("carol")
            relay.filters.append((httproute.Filter.from_spec(intercept_spec("c", {"x-dev": "carol"})), "carol"))
            with pytest.raises(grpc.RpcError) as err:
                stub.SayHello(StringValue(value="x"), metadata=(("x-dev", "carol"),), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "did not answer" in err.value.details()
            assert stub.SayHello(StringValue(value="y"), timeout=10).value == "hello y from app"
        # streams ended: the router forgot them all (no state kept per finished call)
        deadline = time.monotonic() + 5
        while any(r.down.streams for r in relay.routers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(r.down.streams for r in relay.routers)
    finally:
        _stop_loop(loop, thread, srv)


def test_a_laptop_that_goes_away_resets_its_streams_only(greeters: dict[str, Any]) -> None:
    relay = _Relay({t: p for t, (p, _) in greeters.items()})
    loop, thread = _in_thread_loop()
    srv = asyncio.run_coroutine_threadsafe(asyncio.start_server(relay.handle, "127.0.0.1", 0), loop).result(10)
    port = srv.sockets[0].getsockname()[1]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = greeter_app.Stub(ch)
            assert stub.SayHello(StringValue(value="a"), metadata=(("x-dev", "bob"),), timeout=10).value == \
                "hello a from bob"
            stream = stub.SayHellos(StringValue(value="long*100000"), metadata=(("x-dev", "bob"),), timeout=30)
            assert next(stream).value.endswith("from bob")
            # bob's laptop vanishes mid-stream: every upstream connection to it is cut
            for r in relay.routers:
                for up in list(r.ups.values()):
                    if up.key == "bob":
                        loop.call_soon_threadsafe(up.stream.close)
            with pytest.raises(grpc.RpcError) as err:
                for _ in stream:
                    pass
            assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE,
                                        grpc.StatusCode.INTERNAL), err.value
            # the same channel goes on: the app's calls, and bob's on a new upstream connection
            assert stub.SayHello(StringValue(value="b"), timeout=10).value == "hello b from app"
            assert stub.SayHello(StringValue(value="c"), metadata=(("x-dev", "bob"),), timeout=10).value == \
                "hello c from bob"
        assert relay.connects.count("bob") == 2 and len(relay.routers) == 1
    finally:
        _stop_loop(loop, thread, srv)


def test_an_upstream_goaway_moves_new_calls_to_a_new_connection() -> None:
    """The app closes connections by age (GOAWAY, as grpc servers do with max_connection_age): calls
    keep working on the client's one connection, the relay opens a new upstream connection each time."""
    app, _, app_port = greeter_app.serve(0, "app", host="127.0.0.1", options=[
        ("grpc.max_connection_age_ms", 300), ("grpc.max_connection_age_grace_ms", 5000)])
    relay = _Relay({"app": app_port, "alice": app_port, "bob": app_port})
    loop, thread = _in_thread_loop()
    srv = asyncio.run_coroutine_threadsafe(asyncio.start_server(relay.handle, "127.0.0.1", 0), loop).result(10)
    port = srv.sockets[0].getsockname()[1]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = greeter_app.Stub(ch)
            until, n = time.monotonic() + 2.0, 0
            while time.monotonic() < until:
                assert stub.SayHello(StringValue(value=str(n)), timeout=10).value == f"hello {n} from app"
                n += 1
        assert n > 20 and len(relay.routers) == 1
        assert relay.connects.count("app") >= 3, relay.connects   # one per ~300 ms of age
    finally:
        _stop_loop(loop, thread, srv)
        app.stop(0)


def test_a_stream_the_app_refuses_unprocessed_is_sent_again(greeters: dict[str, Any]) -> None:
    """The app's first connection takes the request's HEADERS, then says GOAWAY with last stream 0
    (nothing processed) and closes: the relay sends the call again on a new connection, the client
    never sees the refusal."""
    from hyperframe.frame import GoAwayFrame, SettingsFrame
    app_port, accepted = greeters["app"][0], []

    async def app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(1)
        if len(accepted) == 1:
            buf = await r.readexactly(len(h2route.PREFACE))
            while True:   # frames until a HEADERS one (type 1): the call reached "the app"
                head = await r.readexactly(9)
                await r.readexactly(int.from_bytes(head[:3], "big"))
                if head[3] == 1:
                    break
            ga = GoAwayFrame(0)
            ga.last_stream_id, ga.error_code = 0, 0
            w.write(SettingsFrame(0).serialize() + ga.serialize())
            await w.drain()
            w.close()
            del buf
            return
        ar, aw = await asyncio.open_connection("127.0.0.1", app_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()
        await asyncio.gather(pipe(r, aw), pipe(ar, w), return_exceptions=True)

    loop, thread = _in_thread_loop()
    fake = asyncio.run_coroutine_threadsafe(asyncio.start_server(app, "127.0.0.1", 0), loop).result(10)
    relay = _Relay({"app": fake.sockets[0].getsockname()[1], "alice": greeters["alice"][0],
                    "bob": greeters["bob"][0]})
    srv = asyncio.run_coroutine_threadsafe(asyncio.start_server(relay.handle, "127.0.0.1", 0), loop).result(10)
    port = srv.sockets[0].getsockname()[1]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = greeter_app.Stub(ch)
            assert stub.SayHello(StringValue(value="x"), timeout=10).value == "hello x from app"
            assert stub.SayHello(StringValue(value="y"), timeout=10).value == "hello y from app"
        assert relay.routers[0].replayed == 1 and len(accepted) == 2 and relay.connects.count("app") == 2
    finally:
        loop.call_soon_threadsafe(fake.close)
        _stop_loop(loop, thread, srv)


def test_goaway_to_the_client_lets_its_calls_finish_and_moves_new_ones(greeters: dict[str, Any]) -> None:
    """What the agent does when it stops: GOAWAY to each HTTP/2 client.  A call in flight finishes on
    the old connection; the next call on the same channel goes on a new one."""
    relay = _Relay({t: p for t, (p, _) in greeters.items()})
    loop, thread = _in_thread_loop()
    srv = asyncio.run_coroutine_threadsafe(asyncio.start_server(relay.handle, "127.0.0.1", 0), loop).result(10)
    port = srv.sockets[0].getsockname()[1]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = greeter_app.Stub(ch)
            gate = threading.Event()

            def requests() -> Iterator[StringValue]:
                yield StringValue(value="before")
                gate.wait(10)
                yield StringValue(value="after")
            call = stub.Chat(requests(), metadata=(("x-dev", "alice"),), timeout=30)
            assert next(call).value == "before from alice"
            assert len(relay.routers) == 1
            loop.call_soon_threadsafe(relay.routers[0].goaway)
            time.sleep(0.3)
            gate.set()
            assert [m.value for m in call] == ["after from alice"]   # the call in flight finished
            assert stub.SayHello(StringValue(value="n"), timeout=10).value == "hello n from app"
            assert len(relay.routers) == 2   # ... and the new call came on a new connection
    finally:
        _stop_loop(loop, thread, srv)


def test_agent_routes_grpc_calls_by_metadata(greeters: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Any) -> None:
    quiet_agent(monkeypatch)

    async def main() -> None:
        fake = RoutingManager({"ic-a": greeters["alice"][0], "ic-b": greeters["bob"][0]})
        ra = await start_agent(fake, greeters["app"][0], tmp_path, name="greeter")
        ag, settings = ra.agent, ra.settings
        try:
            await fake.instructions.put(pb.AgentInstruction(intercepts=[
                pb.InterceptInfo(id="ic-a", state=pb.InterceptInfo.ACTIVE, spec=intercept_spec("a", {"x-dev": "alice"})),
                pb.InterceptInfo(id="ic-b", state=pb.InterceptInfo.ACTIVE, spec=intercept_spec("b", {"x-dev": "bob"})),
            ]))
            # the agent probed the gRPC app and told the manager it speaks h2c
            await _until(lambda: "h2c" in fake.protocols, 15)
            await _until(lambda: len(ag.filtered_intercepts()) == 2)
            got = await asyncio.to_thread(greeter_app.check, f"127.0.0.1:{settings.agent_port}", "x-dev",
                                          ["alice=alice", "bob=bob", "=app"], 300)
            assert got["n"] == 300 and got["nbad"] == 0, got
            assert got["streams"]["bob"]["bidi"][-1] == "bob-19 from bob"
            assert got["streams"]["none"]["client"] == "64 messages, 4194304 bytes to app"
            # one channel: one tunnel per intercept for all its calls
            assert [o.intercept_id for o in fake.opens].count("ic-a") == 1
            assert [o.intercept_id for o in fake.opens].count("ic-b") == 1

            # the intercepts end: the calls go to the app (a new connection is spliced whole)
            await fake.instructions.put(pb.AgentInstruction())
            await _until(lambda: not ag.filtered_intercepts())

            def plain() -> str:
                with grpc.insecure_channel(f"127.0.0.1:{settings.agent_port}") as ch:
                    return greeter_app.Stub(ch).SayHello(StringValue(value="z"), metadata=(("x-dev", "alice"),),
                                                         timeout=10).value
            assert await asyncio.to_thread(plain) == "hello z from app"
        finally:
            await ra.close()
    asyncio.run(asyncio.wait_for(main(), 120))


class _MemWriter:
    """The client's side of the relay's socket, in memory."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, data: bytes) -> None:
        self.buf += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


class _SlowApp:
    """An in-memory upstream: an h2 server that takes DATA but acknowledges only when told to."""

    def __init__(self) -> None:
        import h2.config
        import h2.connection
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.conn.initiate_connection()
        self.out: asyncio.Queue[bytes] = asyncio.Queue()
        self.got: dict[int, int] = {}
        self.unacked: list[tuple[int, int]] = []

    async def send(self, data: bytes) -> None:
        import h2.events
        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2.events.DataReceived):
                self.got[ev.stream_id] = self.got.get(ev.stream_id, 0) + len(ev.data)
                self.unacked.append((ev.stream_id, ev.flow_controlled_length))
        self.push()

    def push(self) -> None:
        if data := self.conn.data_to_send():
            self.out.put_nowait(data)

    def ack_all(self) -> None:
        for sid, n in self.unacked:
            self.conn.acknowledge_received_data(n, sid)
        self.unacked.clear()
        self.push()

    async def recv(self) -> bytes:
        return await self.out.get()

    async def send_eof(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_flow_control_holds_a_fast_client_to_a_slow_app_in_memory() -> None:
    """5 MiB uploaded on one stream to an app that does not read: the client is stopped by its window
    once the relay holds what its own windows allow (nothing unbounded), and all of it arrives once
    the app reads."""
    import h2.config
    import h2.connection

    total = 5 << 20

    async def main() -> None:
        app = _SlowApp()
        reader, writer = asyncio.StreamReader(), _MemWriter()
        router = h2route.H2Router(reader, writer, lambda req: "app", lambda key: asyncio.sleep(0, app))  # type: ignore[arg-type]
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        client.send_headers(1, [(":method", "POST"), (":path", "/up"), (":scheme", "http"),
                                (":authority", "app")])
        task = asyncio.ensure_future(router.run())
        sent = 0

        async def pump(rounds: int) -> None:
            nonlocal sent
            for _ in range(rounds):
                while sent < total and (n := min(client.local_flow_control_window(1), 16384, total - sent)) > 0:
                    client.send_data(1, b"x" * n, end_stream=sent + n == total)
                    sent += n
                reader.feed_data(client.data_to_send())
                for _ in range(5):
                    await asyncio.sleep(0)
                if writer.buf:
                    client.receive_data(bytes(writer.buf))
                    writer.buf.clear()

        await pump(200)
        held = sent - app.got.get(1, 0)
        assert sent < total, "the client was never stopped"
        assert app.got.get(1, 0) <= 65535           # the app's own window, which it never reopened
        assert held <= h2route.STREAM_WINDOW + 65535, held   # what the relay holds: its window's worth
        for _ in range(400):
            app.ack_all()
            await pump(1)
            if app.got.get(1, 0) == total:
                break
        assert app.got.get(1, 0) == total and sent == total
        reader.feed_eof()
        await asyncio.wait_for(task, 5)
    asyncio.run(main())
