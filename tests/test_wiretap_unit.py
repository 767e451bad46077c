"""Unit tests of wiretaps on loopback: the agent's copy and bounded buffer (cluster/wiretap.py through a
real agent and real HTTP servers and clients), the manager's broker and its rules (real gRPC), and the
faces' pure parts (record dicts, CLI lines, JSON lines, the live list).  The dev-cluster proof is
tests/test_wiretap.py."""
from __future__ import annotations

import asyncio
import http.client
import http.server
import json
import socket
import statistics
import threading
import time
from typing import Any

import grpc
import pytest

from tpnb.cluster import agent as agent_mod
from tpnb.cluster import wiretap as wiretap_mod
from tpnb.proto import pb

from agent_rig import RoutingManager, http_server, intercept_spec, quiet_agent, start_agent
from test_agent_unit import _free_port, _start_manager, _until
from test_manager_loopback import _bearer, _manager

pytestmark = pytest.mark.unit


class TapManager(RoutingManager):
    """RoutingManager plus UploadWiretap: keeps what agents upload (or, `stall`, never reads it)."""

    def __init__(self, ports: dict[str, int], stall: bool = False) -> None:
        super().__init__(ports)
        self.records: list[pb.WiretapRecord] = []
        self.drops: dict[str, int] = {}
        self.stall = stall

    async def UploadWiretap(self, request_iterator: Any, context: Any) -> pb.Empty:
        if self.stall:  # a manager (or, behind it, a laptop) that does not keep up
            await asyncio.sleep(3600)
        async for up in request_iterator:
            self.records.extend(up.records)
            self.drops.update(up.dropped)
        return pb.Empty()


def _tap(wid: str, max_body: int = 4096, buffer: int = 1000, **filters: Any) -> pb.WiretapInfo:
    return pb.WiretapInfo(id=wid, spec=intercept_spec(wid, **filters), max_body=max_body, buffer=buffer)


@pytest.fixture(autouse=True)
def _quick(monkeypatch: pytest.MonkeyPatch) -> None:
    quiet_agent(monkeypatch)


def test_agent_copies_what_the_app_serves_and_not_what_a_laptop_serves(tmp_path: Any) -> None:
    app, app_port = http_server("app")
    alice, alice_port = http_server("alice")

    async def main() -> None:
        fake = TapManager({"ic-a": alice_port})
        ra = await start_agent(fake, app_port, tmp_path)
        ag, port = ra.agent, ra.port
        try:
            await fake.instructions.put(pb.AgentInstruction(
                intercepts=[pb.InterceptInfo(id="ic-a", state=pb.InterceptInfo.ACTIVE,
                                             spec=intercept_spec("a", {"x-dev": "alice"}))],
                wiretaps=[_tap("w-all", max_body=10), _tap("w-api", http_path_prefix="/api")]))
            await _until(lambda: len(ag.wiretaps.taps) == 2)
            await _until(lambda: ag.app_protocol == "http/1.1", 10)

            def traffic() -> list[str]:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                out = []
                for i in range(60):
                    headers = {"x-dev": "alice"} if i % 3 == 0 else {}
                    path = f"/api/{i}" if i % 2 else f"/web/{i}"
                    body = b"q" * 3000 if i % 5 == 1 else None
                    conn.request("POST" if body else "GET", path, body=body, headers=headers)
                    out.append(conn.getresponse().read().decode())
                conn.close()
                return out

            answers = await asyncio.to_thread(traffic)
            # the app's (and alice's) answers are exactly what they would be without a wiretap
            for i, text in enumerate(answers):
                who = "alice" if i % 3 == 0 else "app"
                path = f"/api/{i}" if i % 2 else f"/web/{i}"
                assert text == f"{who} {'POST' if i % 5 == 1 else 'GET'} {path} {3000 if i % 5 == 1 else 0}"
            app_served = [i for i in range(60) if i % 3]
            await _until(lambda: len([r for r in fake.records if r.wiretap_id == "w-all"]) == len(app_served), 10)
            mine = [r for r in fake.records if r.wiretap_id == "w-all"]
            assert [r.target.decode() for r in mine] == [f"/api/{i}" if i % 2 else f"/web/{i}" for i in app_served]
            for r in mine:
                assert r.kind == pb.WiretapRecord.HTTP and r.status == 200 and r.latency_ms > 0
                assert r.pod_name == "hello-1" and r.client.startswith("127.0.0.1:")
                assert len(r.response_body) <= 10 and r.response_bytes == len(f"app {r.method} {r.target.decode()} ") + \
                    len(str(r.request_bytes))
                assert any(h.name == b"x-served-by" and h.value == b"app" for h in r.response_headers)
            post = next(r for r in mine if r.method == "POST")
            assert post.request_bytes == 3000 and post.request_body == b"q" * 10  # max_body: 10
            api = [r for r in fake.records if r.wiretap_id == "w-api"]
            await _until(lambda: len([r for r in fake.records if r.wiretap_id == "w-api"])
                         == len([i for i in app_served if i % 2]), 5)
            assert all(r.target.startswith(b"/api/") for r in api)
            assert not fake.drops

            # a connection that is not HTTP/1.1: to the app untouched, copied as counts and first bytes
            def raw() -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
                    s.shutdown(socket.SHUT_WR)
                    got = b""
                    while chunk := s.recv(65536):
                        got += chunk
                    return got
            answer = await asyncio.to_thread(raw)
            assert b"400 - Bad request" in answer  # the app's own answer (http.server's error page)
            await _until(lambda: any(r.kind == pb.WiretapRecord.TCP for r in fake.records), 10)
            tcp = next(r for r in fake.records if r.kind == pb.WiretapRecord.TCP)
            assert tcp.wiretap_id == "w-all"  # only the wiretap without filters copies non-HTTP connections
            sent = b"\x16\x03\x01 not http at all\r\n\r\n"
            assert tcp.bytes_up == len(sent) and tcp.first_up == sent[:10]  # max_body 10
            assert tcp.bytes_down == len(answer) and tcp.first_down == answer[:10]

            # HTTP/2 with prior knowledge (as gRPC speaks it), with no personal intercept to route it: to the
            # app untouched and decoded stream by stream, not copied as TCP (the streams' records:
            # test_agent_records_grpc_calls_stream_by_stream...).  (The personal intercept here is
            # HTTP/1.1-filtered: end it first.)
            await fake.instructions.put(pb.AgentInstruction(wiretaps=[_tap("w-all", max_body=10)]))
            await _until(lambda: not ag.filtered_intercepts() and len(ag.wiretaps.taps) == 1)

            def h2() -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 9)
                    s.shutdown(socket.SHUT_WR)
                    got = b""
                    while chunk := s.recv(65536):
                        got += chunk
                    return got
            n = len(fake.records)
            await asyncio.to_thread(h2)   # (http.server's answer to it, an error page or nothing, is its own)
            await asyncio.sleep(0.5)
            assert len(fake.records) == n   # no stream in it: nothing to record

            # the wiretaps end: no more copies, the app still serves
            n = len(fake.records)
            await fake.instructions.put(pb.AgentInstruction())
            await _until(lambda: not ag.wiretaps)
            conn_text = await asyncio.to_thread(lambda: _get(port, "/after"))
            assert conn_text == "app GET /after 0"
            await asyncio.sleep(0.3)
            assert len(fake.records) == n
        finally:
            await ra.close()
    try:
        asyncio.run(main())
    finally:
        app.shutdown()
        alice.shutdown()


def _get(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    text = conn.getresponse().read().decode()
    conn.close()
    return text


class _OneWrite(http.server.BaseHTTPRequestHandler):
    """An app that answers each request with one write (no Nagle/delayed-ACK stall to blur timings)."""

    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # the handler flushes after each request

    def do_GET(self) -> None:
        out = b"a" * 2000
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a: Any) -> None:
        pass


N_STALLED = 3000


def test_a_manager_that_does_not_read_costs_drops_not_time(tmp_path: Any) -> None:
    app = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OneWrite)
    app.daemon_threads = True
    threading.Thread(target=app.serve_forever, daemon=True).start()
    app_port = app.server_address[1]

    async def main() -> None:
        fake = TapManager({}, stall=True)
        ra = await start_agent(fake, app_port, tmp_path)
        ag, port = ra.agent, ra.port
        try:
            def timed(n: int, path: str) -> list[float]:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                out = []
                for i in range(n):
                    t0 = time.perf_counter()
                    conn.request("GET", f"{path}/{i}")
                    assert conn.getresponse().read() == b"a" * 2000
                    out.append(time.perf_counter() - t0)
                conn.close()
                return out

            # with no wiretap, through the agent's plain splice
            base = await asyncio.to_thread(timed, 200, "/base")
            await fake.instructions.put(pb.AgentInstruction(wiretaps=[_tap("w", max_body=2000, buffer=20)]))
            await _until(lambda: bool(ag.wiretaps))
            tapped = await asyncio.to_thread(timed, N_STALLED, "/tap")
            t = ag.wiretaps.taps["w"]
            # gRPC's own windows take a few MB first (how many records fit there depends on how fast the
            # uploader ran meanwhile); beyond them the buffer never holds more than its 20 records and
            # the rest are dropped -- and counted: every request is either a record made or a drop
            await _until(lambda: ag.wiretaps.seq + t.dropped == N_STALLED, 5)
            assert len(t.buffer) <= 20 and t.dropped > 0, (len(t.buffer), t.dropped)
            assert not fake.records  # the manager never read one
            p50_base, p50_tap = statistics.median(base), statistics.median(tapped)
            assert p50_tap < p50_base + 0.005, (p50_base, p50_tap)  # < 5 ms added at the median
            assert max(tapped) < 1.0
        finally:
            await ra.close()
    try:
        asyncio.run(main())
    finally:
        app.shutdown()


def test_buffer_keeps_at_most_its_limit_and_counts_the_rest() -> None:
    async def main() -> None:
        taps = wiretap_mod.Wiretaps(pb, "pod-1")
        taps.update([_tap("a", buffer=5), _tap("b", buffer=100)])
        for _ in range(20):
            taps.offer(list(taps.taps.values()), lambda t: pb.WiretapRecord(kind=pb.WiretapRecord.HTTP))
        assert len(taps.taps["a"].buffer) == 5 and taps.taps["a"].dropped == 15
        assert len(taps.taps["b"].buffer) == 20 and taps.taps["b"].dropped == 0
        assert taps.drops() == {"a": 15}
        got = taps.take(64)
        assert len(got) == 25 and len({r.seq for r in got}) == 25 and all(r.pod_name == "pod-1" for r in got)
        # a removed wiretap's records are not kept; limits are capped whatever is asked
        taps.update([_tap("b", buffer=10**9, max_body=10**9)])
        assert set(taps.taps) == {"b"} and taps.taps["b"].limit == wiretap_mod.MAX_BUFFER_LIMIT
        assert taps.taps["b"].max_body == wiretap_mod.MAX_BODY_LIMIT
    asyncio.run(main())


# ------------------------------------------------------------------ the manager

async def _broker() -> None:
    server, mgr, stub, chan = await _manager()
    try:
        alice = await stub.ArriveAsClient(pb.ClientInfo(name="alice@laptop"))
        bob = await stub.ArriveAsClient(pb.ClientInfo(name="bob@laptop2"))
        hub = stub.hub
        agent = await hub.ArriveAsAgent(pb.AgentInfo(name="hello", namespace="default", pod_name="hello-1",
                                                     pod_ip="10.42.0.5"), metadata=_bearer("agent-of-hello"))
        other = await hub.ArriveAsAgent(pb.AgentInfo(name="other", namespace="default", pod_name="other-1",
                                                     pod_ip="10.42.0.6"), metadata=_bearer("agent-of-other"))
        spec = pb.InterceptSpec(name="hello", namespace="default", workload="hello")
        # alice holds a global intercept of hello: a wiretap is no conflict, for her or for bob
        await stub.CreateIntercept(pb.CreateInterceptRequest(session=alice, spec=pb.InterceptSpec(
            name="hello", namespace="default", workload="hello", local_port=9000)))
        w = await stub.CreateWiretap(pb.CreateWiretapRequest(session=bob, wiretap=pb.WiretapInfo(spec=spec, buffer=3)))
        w2 = await stub.CreateWiretap(pb.CreateWiretapRequest(session=alice, wiretap=pb.WiretapInfo(spec=spec)))
        assert w.id and w.id != w2.id and w.buffer == 3
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.CreateWiretap(pb.CreateWiretapRequest(session=bob, wiretap=pb.WiretapInfo(spec=spec)))
        assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
        instr = hub.WatchAgentInstructions(agent)
        got = await asyncio.wait_for(instr.read(), 5)
        assert {x.id for x in got.wiretaps} == {w.id, w2.id} and len(got.intercepts) == 1
        oinstr = hub.WatchAgentInstructions(other)
        assert not (await asyncio.wait_for(oinstr.read(), 5)).wiretaps  # only the workload's own agents
        await asyncio.sleep(0.1)
        lst = await asyncio.wait_for(stub.WatchIntercepts(bob).read(), 5)
        assert [x.id for x in lst.wiretaps] == [w.id] and lst.wiretaps[0].state == pb.InterceptInfo.ACTIVE
        # alice sees her own wiretap only: bob's is not even listed
        lst = await asyncio.wait_for(stub.WatchIntercepts(alice).read(), 5)
        assert [x.id for x in lst.wiretaps] == [w2.id]
        # alice may not watch or remove bob's wiretap (same name as hers in her session: she gets her own)
        for call in (stub.RemoveWiretap, ):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call(pb.WiretapRef(session_id=alice.session_id, name="nope"))
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.WatchWiretap(pb.WiretapRef(session_id="not-a-session", name="hello")).read()
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND

        # uploads: 10 records of bob's wiretap (buffer 3), 2 forged by the agent of another workload
        up = hub.UploadWiretap()
        await up.write(pb.WiretapUpload(agent_id=agent.agent_id, dropped={w.id: 5}, records=[
            pb.WiretapRecord(wiretap_id=w.id, seq=i, method="GET", target=f"/{i}".encode(), status=200)
            for i in range(10)]))
        await up.write(pb.WiretapUpload(agent_id=other.agent_id, records=[
            pb.WiretapRecord(wiretap_id=w.id, seq=99, target=b"/forged")], dropped={w.id: 1000}))
        await up.done_writing()
        await up
        watch = stub.WatchWiretap(pb.WiretapRef(session_id=bob.session_id, name="hello"))
        recs = [await asyncio.wait_for(watch.read(), 5) for _ in range(3)]
        assert [r.target for r in recs] == [b"/0", b"/1", b"/2"]
        assert recs[-1].dropped == 7 + 5  # the manager's 7 and the agent's 5; not the forger's 1000
        # a second watcher of the same wiretap is refused (one relay per wiretap)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.WatchWiretap(pb.WiretapRef(session_id=bob.session_id, name="hello")).read()
        assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
        # removing it ends the watch; the agents are told
        await stub.RemoveWiretap(pb.WiretapRef(session_id=bob.session_id, name="hello"))
        while True:
            r = await asyncio.wait_for(watch.read(), 5)
            if r is grpc.aio.EOF:
                break
            assert r.kind == pb.WiretapRecord.STATS
        nxt = await asyncio.wait_for(instr.read(), 5)
        assert [x.id for x in nxt.wiretaps] == [w2.id]
        # a session that goes takes its wiretaps with it
        await stub.Depart(alice)
        nxt = await asyncio.wait_for(instr.read(), 5)
        assert not nxt.wiretaps and not nxt.intercepts
        assert not mgr.wiretaps
        instr.cancel()
        oinstr.cancel()
    finally:
        await chan.close()
        await server.stop(0)


def test_manager_brokers_wiretaps_to_their_own_session_only() -> None:
    asyncio.run(_broker())


# ------------------------------------------------------------------ faces

def _record(**kw: Any) -> pb.WiretapRecord:
    base = dict(wiretap_id="w", kind=pb.WiretapRecord.HTTP, seq=1, pod_name="hello-1", client="10.0.0.7:5555",
                start_unix=1_700_000_000.25, latency_ms=1.23456, method="POST", target=b"/api/x?q=1",
                http_version="1.1", request_headers=[pb.Header(name=b"host", value=b"hello")],
                request_body=b"\xff\x00", request_bytes=2, status=201, reason=b"Created",
                response_headers=[pb.Header(name=b"content-type", value=b"text/plain")],
                response_body=b"made", response_bytes=4)
    base.update(kw)
    return pb.WiretapRecord(**base)


def test_records_lines_and_json_lines() -> None:
    from tpnb.api import wiretap_record
    from tpnb.cli import wiretap_json, wiretap_line

    r = wiretap_record(_record())
    assert (r["type"], r["method"], r["path"], r["query"], r["status"], r["duration_ms"]) == \
        ("http", "POST", "/api/x", "q=1", 201, 1.235)
    assert r["request_headers"] == [("host", "hello")] and r["response_body"] == b"made"
    line = wiretap_line(r)
    assert "10.0.0.7:5555 POST /api/x?q=1 201 1.2 ms 4 B" in line
    doc = json.loads(wiretap_json(r))
    assert doc["status"] == 201 and doc["response_body"] == "made"
    assert doc["request_body"] == {"base64": "/wA="}  # not UTF-8: base64
    t = wiretap_record(_record(kind=pb.WiretapRecord.TCP, method="", target=b"", bytes_up=3, bytes_down=5,
                               first_up=b"abc", first_down=b"hello"))
    assert t["type"] == "tcp" and "TCP up 3 B down 5 B" in wiretap_line(t) and "b'abc' -> b'hello'" in wiretap_line(t)


def test_grpc_records_show_the_method_status_and_messages() -> None:
    from tpnb.api import wiretap_record
    from tpnb.cli import wiretap_json, wiretap_line

    H = pb.Header
    grpc_req = [H(name=b":path", value=b"/greeter.Greeter/SayHellos"), H(name=b"content-type", value=b"application/grpc")]
    ok = wiretap_record(_record(http_version="2", target=b"/greeter.Greeter/SayHellos", status=200, reason=b"",
                                request_headers=grpc_req, response_bytes=60, request_messages=1, response_messages=5,
                                response_trailers=[H(name=b"grpc-status", value=b"0")]))
    assert (ok["path"], ok["grpc_status"], ok["grpc_code"], ok["grpc_message"]) == \
        ("/greeter.Greeter/SayHellos", 0, "OK", None)
    assert ok["response_trailers"] == [("grpc-status", "0")]
    assert "POST /greeter.Greeter/SayHellos 200 OK 1.2 ms 1->5 msgs 60 B" in wiretap_line(ok)
    # trailers-only (an error before any message): the status is in the headers
    bad = wiretap_record(_record(http_version="2", target=b"/greeter.Greeter/SayHello", status=200, reason=b"",
                                 request_headers=grpc_req, response_bytes=0, request_messages=1,
                                 response_headers=[H(name=b"grpc-status", value=b"3"),
                                                   H(name=b"grpc-message", value=b"no such name")]))
    assert (bad["grpc_status"], bad["grpc_code"]) == (3, "INVALID_ARGUMENT")
    assert "SayHello 200 INVALID_ARGUMENT (no such name) 1.2 ms 1->0 msgs 0 B" in wiretap_line(bad)
    assert json.loads(wiretap_json(bad))["grpc_code"] == "INVALID_ARGUMENT"
    # a plain HTTP request has no gRPC fields and keeps its line
    plain = wiretap_record(_record())
    assert plain["grpc_status"] is None and plain["request_messages"] is None
    assert "POST /api/x?q=1 201 1.2 ms 4 B" in wiretap_line(plain)


class _Stream:
    """A plain stand-in for api.WiretapStream: yields records from a queue until cancelled."""

    def __init__(self) -> None:
        from tpnb.api import Wiretap

        self.name = "hello"
        self.stats = Wiretap.from_pb(pb.WiretapInfo(spec=pb.InterceptSpec(name="hello", workload="hello")))
        self.items: list[dict] = []
        self.cancelled = threading.Event()

    def __iter__(self) -> Any:
        from tpnb.api import wiretap_record

        i = 0
        while not self.cancelled.is_set():
            if i < len(self.items):
                yield self.items[i]
                i += 1
            else:
                time.sleep(0.01)

    def cancel(self) -> None:
        self.cancelled.set()


def test_live_list_fills_while_running_and_gives_a_dataframe() -> None:
    from tpnb.api import wiretap_record
    from tpnb.wiretaplog import WiretapLog

    st = _Stream()
    log = WiretapLog(st)  # type: ignore[arg-type]
    assert log.running and len(log) == 0
    st.items.extend(wiretap_record(_record(seq=i, target=f"/{i}".encode(), dropped=i)) for i in range(5))
    assert log.wait(5, timeout=5) and [r["path"] for r in log] == [f"/{i}" for i in range(5)]
    assert log.dropped == 4
    st.items.append(wiretap_record(_record(seq=9, target=b"/later")))
    assert log.wait(6, timeout=5) and log[-1]["path"] == "/later"  # the same object keeps filling
    pd = pytest.importorskip("pandas")
    df = log.df()
    assert isinstance(df, pd.DataFrame) and list(df["status"]) == [201] * 6
    assert list(df.columns[:7]) == ["time", "type", "method", "path", "query", "status", "duration_ms"]
    log.stop()
    assert not log.running and len(log) == 6 and "6 records" in repr(log)


def test_connector_relay_keeps_at_most_buffer_for_a_slow_face_and_counts_the_rest() -> None:
    """connector/wiretaps.py's relay with a stand-in manager stream (plain objects, no cluster)."""
    from types import SimpleNamespace

    from tpnb.connector import wiretaps as cw

    class Stub:
        def __init__(self) -> None:
            self.removed: list[str] = []

        def WatchWiretap(self, ref: pb.WiretapRef) -> Any:  # noqa: N802
            async def gen() -> Any:
                for i in range(100):
                    yield pb.WiretapRecord(wiretap_id="w", seq=i, target=f"/{i}".encode(), dropped=7)
                yield pb.WiretapRecord(wiretap_id="w", kind=pb.WiretapRecord.STATS, dropped=9)
            return gen()

        async def RemoveWiretap(self, ref: pb.WiretapRef, timeout: float = 0) -> pb.Empty:  # noqa: N802
            self.removed.append(ref.name)
            return pb.Empty()

    async def main() -> None:
        stub = Stub()
        sess = SimpleNamespace(link=SimpleNamespace(stub=stub), session_id="s", changed=asyncio.Event())
        tap = cw.Wiretap(sess, pb.WiretapRequest(wiretap=pb.WiretapInfo(
            spec=pb.InterceptSpec(name="hello", workload="hello"), buffer=10)))
        tap.remote = pb.WiretapInfo(id="w", spec=tap.want.spec)
        cw._running["hello"] = tap
        # the stand-in stream comes all at once, faster than the face reads: 10 kept, 90 dropped here
        events = [ev async for ev in tap.relay()]
        assert tap.dropped_here == 90 and tap.dropped_upstream == 9
        recs = [ev.record for ev in events if ev.WhichOneof("kind") == "record"]
        assert [r.seq for r in recs] == list(range(10)) and {r.dropped for r in recs} == {99}
        last = events[-1]
        assert last.WhichOneof("kind") == "stats" and last.stats.records == 10 and last.stats.dropped == 99
        assert "removed at the traffic-manager" in last.stats.message  # it ended by itself: the face says why
        assert [w.dropped for w in cw.infos(sess)] == [99]  # what `tpnb status` shows
        assert await cw.stop("hello") and stub.removed == ["hello"] and not cw.infos(sess)
        assert not await cw.stop("hello")
    asyncio.run(main())


def test_status_shows_wiretaps_with_their_drops() -> None:
    from tpnb import render
    from tpnb.api import Status

    st = Status.from_pb(pb.ConnectionStatus(connected=True, context="dev", wiretaps=[pb.WiretapInfo(
        spec=pb.InterceptSpec(name="hello", namespace="tpwire", workload="hello"), state=pb.InterceptInfo.ACTIVE,
        records=812, dropped=2188, max_body=4096)]))
    assert "    hello: tpwire/hello (ACTIVE, 812 records, 2188 dropped)" in render.status_text(st)
    assert json.loads(render.as_json(st))["wiretaps"][0]["dropped"] == 2188
    assert render.wiretap_what(st.wiretaps[0]) == "tpwire/hello (every request the app serves, bodies up to 4096 B)"
    from tpnb.api import Workload

    w = Workload(name="hello", namespace="tpwire", kind="Deployment", services=["hello:80->9900"],
                 state="agent_installed", agent_installed=True, intercept=None, wiretaps=st.wiretaps)
    assert render.workloads_text([w]) == ("hello : agent installed, wiretapped by me (812 records, 2188 dropped) "
                                          "(Deployment; hello:80->9900)")


def test_the_whole_chain_in_process(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """face (api.Session, sync gRPC) -> connector service (unix socket) -> manager (loopback gRPC) -> a real
    agent in front of a real app; only the Kubernetes steps (finding and injecting the workload) are
    stood in for.  The dev-cluster version is tests/test_wiretap.py."""
    from types import SimpleNamespace

    from tpnb import config as tpnb_config
    from tpnb.api import Session as Face
    from tpnb.connector import agent_injector, intercepts, manager_install
    from tpnb.connector import server as cserver
    from tpnb.connector import session as csession
    from tpnb.connector import wiretaps as cw
    from tpnb.proto import rpc
    from tpnb.wiretaplog import WiretapLog

    async def nothing(*a: Any, **kw: Any) -> None:
        return None

    async def workload(api: Any, ns: str, name: str) -> Any:
        return SimpleNamespace(kind="Deployment", name=name, obj={})

    async def service(api: Any, wl: Any, svc: Any, port: Any, container: Any = None) -> Any:
        return agent_injector.ServiceTarget(service="hello", port_name="", port=80, target_port=8080,
                                            container="app", container_port=8080)

    monkeypatch.setattr(agent_injector, "find_workload", workload)
    monkeypatch.setattr(agent_injector, "resolve_service", service)
    monkeypatch.setattr(agent_injector, "has_agent", lambda obj: True)
    monkeypatch.setattr(agent_injector, "inject_agent", nothing)
    monkeypatch.setattr(agent_injector, "wait_rollout", nothing)
    monkeypatch.setattr(manager_install, "preflight_intercept", nothing)
    monkeypatch.setattr(intercepts, "_wait_service_on_agent", nothing)
    sock = tmp_path / "connector.sock"
    monkeypatch.setenv("TPNB_CONNECTOR_SOCKET", str(sock))
    monkeypatch.setenv("TPNB_WIRETAP_MAX_BODY", "64")
    monkeypatch.setattr(tpnb_config, "_cached", None)
    app, app_port = http_server("app")
    token = tmp_path / "token"
    token.write_text("agent-of-hello\n")

    async def main() -> None:
        from tpnb.cluster.manager import AgentHub, Manager
        from test_manager_loopback import _Tokens

        server = grpc.aio.server()
        mgr = Manager()
        rpc.add_ManagerServicer_to_server(mgr, server)
        rpc.add_AgentHubServicer_to_server(AgentHub(mgr, _Tokens()), server)
        mgr_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        chan = grpc.aio.insecure_channel(f"127.0.0.1:{mgr_port}")
        stub = rpc.ManagerStub(chan)
        settings = agent_mod.AgentSettings(
            name="hello", namespace="default", pod_name="hello-1", pod_ip="10.42.0.9", app_container="app",
            app_port=app_port, agent_port=_free_port(), health_port=0, manager_host="127.0.0.1",
            manager_port=mgr_port, token_file=str(token))
        ag = agent_mod.Agent(settings)
        await ag.start()
        agent_loop = asyncio.ensure_future(ag.session_loop())
        sess = csession.Session(pb.ConnectRequest(namespace="default"))
        sess.link = SimpleNamespace(stub=stub, version="test", forward=None)  # type: ignore[assignment]
        sess.session_id = (await stub.ArriveAsClient(pb.ClientInfo(name="alice@laptop"))).session_id
        sess.mapped = ["default"]
        sess.target = SimpleNamespace(api=None, context="test", server="https://test")  # type: ignore[assignment]
        watch = asyncio.ensure_future(sess._watch_intercepts_loop())
        svc = cserver.ConnectorService(asyncio.Event())
        svc.session = sess
        cserv = grpc.aio.server()
        rpc.add_ConnectorServicer_to_server(svc, cserv)
        cserv.add_insecure_port(f"unix://{sock}")
        await cserv.start()
        try:
            await _until(lambda: ag.agent_id is not None, 20)

            def face() -> tuple[list[dict], Any, list[str], list[Any]]:
                s = Face(tpnb_config.get())
                log = WiretapLog(s.wiretap("hello", namespace="default"))
                answers = [_get(settings.agent_port, f"/chain-{i}") for i in range(50)]
                assert log.wait(50, timeout=20), len(log)
                listed = s.status().wiretaps
                log.stop()
                return log.records(), listed, answers, log

            records, listed, answers, log = await asyncio.to_thread(face)
            assert answers == [f"app GET /chain-{i} 0" for i in range(50)]
            assert [r["path"] for r in records] == [f"/chain-{i}" for i in range(50)]
            assert all(r["status"] == 200 and r["duration_ms"] > 0 and r["pod"] == "hello-1" for r in records)
            assert [r["response_body"] for r in records] == [a.encode() for a in answers]  # under max_body 64
            assert [(w.name, w.state, w.max_body) for w in listed] == [("hello", "ACTIVE", 64)]
            assert listed[0].records >= 1 and not log.running
            # the face's end removed it everywhere: manager, connector, agent
            await _until(lambda: not mgr.wiretaps and not cw._running and not ag.wiretaps, 10)
            assert await asyncio.to_thread(_get, settings.agent_port, "/after") == "app GET /after 0"
        finally:
            await cserv.stop(0)
            watch.cancel()
            agent_loop.cancel()
            await asyncio.gather(watch, agent_loop, return_exceptions=True)
            await ag.stop()
            await chan.close()
            await server.stop(0)
    try:
        asyncio.run(main())
    finally:
        app.shutdown()


def test_magic_returns_a_live_list_and_stop_and_leave_end_it(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """`%tp wiretap` in IPython with a stand-in api.Session (the real kernel runs in tests/test_wiretap.py)."""
    from IPython.testing.globalipapp import start_ipython

    from tpnb.api import Status, wiretap_record
    from tpnb.errors import ConfigError
    from tpnb.magics import commands, lifecycle

    streams: list[_Stream] = []

    class Fake:
        def status(self) -> Status:
            return Status(connected=True, context="dev")

        def wiretap(self, name: str, progress: Any = None, **kw: Any) -> _Stream:
            assert kw["namespace"] == "tpwire" and kw["http_headers"] == [("x-dev", "me")] and kw["max_body"] == 10
            st = _Stream()
            st.stats.namespace, st.stats.workload, st.stats.max_body = "tpwire", name, 10
            streams.append(st)
            return st

    fake = Fake()
    lifecycle.set_session_factory(lambda: fake)  # type: ignore[arg-type, return-value]
    shell = start_ipython() or __import__("IPython").get_ipython()
    shell.run_line_magic("load_ext", "tpnb")
    try:
        log = shell.run_line_magic("tp", "wiretap hello -n tpwire --http-header x-dev=me --max-body 10")
        assert "Wiretapping tpwire/hello" in capsys.readouterr().out
        assert log.running and len(log) == 0
        streams[0].items.append(wiretap_record(_record()))
        assert log.wait(1, 5) and log[0]["status"] == 201
        with pytest.raises(ConfigError, match="already runs in this kernel"):
            shell.run_line_magic("tp", "wiretap hello -n tpwire --http-header x-dev=me --max-body 10")
        done = shell.run_line_magic("tp", "wiretap hello --stop")
        assert done is None and "Wiretap hello ended: 1 records, 0 dropped" in capsys.readouterr().out
        assert streams[0].cancelled.is_set() and not log.running and len(log) == 1  # the records stay
        with pytest.raises(ConfigError, match="no wiretap named 'hello' runs in this kernel"):
            shell.run_line_magic("tp", "wiretap hello --stop")
        again = shell.run_line_magic("tp", "wiretap hello -n tpwire --http-header x-dev=me --max-body 10")
        shell.run_line_magic("tp", "leave hello")  # `leave` ends this kernel's wiretap too
        assert streams[1].cancelled.is_set() and not again.running and "hello" not in commands._wiretaps
    finally:
        lifecycle.set_session_factory(__import__("tpnb.api", fromlist=["Session"]).Session)


def test_connector_relay_ends_with_the_session() -> None:
    from types import SimpleNamespace

    from tpnb.connector import wiretaps as cw

    async def main() -> None:
        sess = SimpleNamespace(link=None, session_id="s", changed=asyncio.Event(), _closing=False)
        tap = cw.Wiretap(sess, pb.WiretapRequest(wiretap=pb.WiretapInfo(spec=pb.InterceptSpec(name="q"))))
        events: list[Any] = []

        async def consume() -> None:
            async for ev in tap.relay():
                events.append(ev)
        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.6)
        assert not task.done()  # no link for a moment (relinking): it waits
        sess._closing = True  # `tpnb quit`
        await asyncio.wait_for(task, 5)
        assert events[-1].stats.message == "the session ended (tpnb quit)"
    asyncio.run(main())


def test_parsed_options_of_every_face_are_what_the_session_accepts() -> None:
    """`tpnb wiretap`/`%tp wiretap` and `tpnb intercept` pass exactly the keywords Session takes
    (a shared option added for intercepts once broke every wiretap with a TypeError)."""
    import inspect

    from tpnb.api import Session
    from tpnb.cli import build_parser, intercept_kwargs, wiretap_kwargs

    p = build_parser()
    wt = wiretap_kwargs(p.parse_args(["wiretap", "hello", "--http-header", "x-dev=a"]))
    assert set(wt) <= set(inspect.signature(Session.wiretap).parameters), set(wt)
    ic = intercept_kwargs(p.parse_args(["intercept", "hello", "--port", "9000", "--container", "app"]))
    assert ic["container"] == "app" and set(ic) <= set(inspect.signature(Session.intercept).parameters), set(ic)


# ------------------------------------------------------------------ HTTP/2 (h2c, gRPC)

class _H2Wire:
    """A real h2 client and server in memory, their bytes fed to an H2Copy as they pass (in `chunk`-sized
    pieces: 1 cuts every frame and header block apart), as Wiretaps.copy_tcp feeds it."""

    def __init__(self, taps: wiretap_mod.Wiretaps, chunk: int = 0, server_settings: dict[int, int] | None = None) -> None:
        import h2.config
        import h2.connection

        self.c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.c.initiate_connection()
        self.s.initiate_connection()
        if server_settings:
            self.s.update_settings(server_settings)
            window = server_settings.get(SettingCodes.INITIAL_WINDOW_SIZE, 0)
            if window > 65535:
                self.s.increment_flow_control_window(window - 65535)
        self.copy = wiretap_mod.H2Copy(taps, "10.0.0.1:5000")
        self.chunk = chunk
        self.to_server: list[Any] = []   # the server's events (what the app saw)
        self.to_client: list[Any] = []
        self.flush()

    def _feed(self, up: bool, data: bytes) -> None:
        step = self.chunk or len(data)
        for i in range(0, len(data), step):
            self.copy.feed(up, data[i:i + step])

    def flush(self) -> None:
        import h2.events

        for _ in range(100):
            up, down = self.c.data_to_send(), self.s.data_to_send()
            if not up and not down:
                return
            for data, me, peer, seen, is_up in ((up, self.c, self.s, self.to_server, True),
                                                (down, self.s, self.c, self.to_client, False)):
                if not data:
                    continue
                self._feed(is_up, data)
                for ev in peer.receive_data(data):
                    seen.append(ev)
                    if isinstance(ev, h2.events.DataReceived):  # reopen the windows as an app would
                        peer.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        raise AssertionError("the connection did not settle")


from h2.settings import SettingCodes  # noqa: E402


def _grpc_msg(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


GRPC_REQ = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/greeter.Greeter/SayHello"),
            (b":authority", b"greeter:50051"), (b"content-type", b"application/grpc"), (b"te", b"trailers")]


def _h2_taps(*taps: pb.WiretapInfo) -> wiretap_mod.Wiretaps:
    w = wiretap_mod.Wiretaps(pb, "pod-1")
    w.update(list(taps))
    return w


@pytest.mark.parametrize("chunk", [0, 1, 7])
def test_h2_copy_records_each_stream_with_method_status_trailers_and_bounded_bodies(chunk: int) -> None:
    taps = _h2_taps(_tap("w", max_body=8))
    wire = _H2Wire(taps, chunk=chunk)
    c, s = wire.c, wire.s
    # a unary call, answered with headers, one message and trailers
    c.send_headers(1, GRPC_REQ + [(b"x-dev", b"alice")])
    c.send_data(1, _grpc_msg(b"world"), end_stream=True, pad_length=3)   # padded: the padding is no body
    wire.flush()
    s.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    s.send_data(1, _grpc_msg(b"hello world"))
    s.send_headers(1, [(b"grpc-status", b"0"), (b"grpc-message", b"")], end_stream=True)
    # a server-streaming call on the same connection (its headers now come from HPACK's dynamic table)
    c.send_headers(3, [(n, b"/greeter.Greeter/SayHellos" if n == b":path" else v) for n, v in GRPC_REQ])
    c.send_data(3, _grpc_msg(b"x*3"), end_stream=True)
    wire.flush()
    s.send_headers(3, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    s.send_data(3, b"".join(_grpc_msg(f"hello #{i}".encode()) for i in range(3)))
    s.send_headers(3, [(b"grpc-status", b"0")], end_stream=True)
    # an error: trailers-only (one HEADERS frame with END_STREAM), as grpcio answers an abort
    c.send_headers(5, GRPC_REQ)
    c.send_data(5, _grpc_msg(b"fail"), end_stream=True)
    wire.flush()
    s.send_headers(5, [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"3"),
                       (b"grpc-message", b"no such name")], end_stream=True)
    wire.flush()

    recs = taps.take()
    assert [r.target for r in recs] == [b"/greeter.Greeter/SayHello", b"/greeter.Greeter/SayHellos",
                                        b"/greeter.Greeter/SayHello"]
    unary, stream, err = recs
    assert all(r.kind == pb.WiretapRecord.HTTP and r.method == "POST" and r.http_version == "2" and r.status == 200
               and r.client == "10.0.0.1:5000" and not r.error and r.latency_ms >= 0 for r in recs)
    assert (b"x-dev", b"alice") in [(h.name, h.value) for h in unary.request_headers]
    assert unary.request_bytes == 10 and unary.request_body == _grpc_msg(b"world")[:8]      # max_body 8
    assert unary.response_bytes == 16 and unary.response_body == _grpc_msg(b"hello world")[:8]
    assert [(h.name, h.value) for h in unary.response_trailers] == [(b"grpc-status", b"0"), (b"grpc-message", b"")]
    assert (unary.request_messages, unary.response_messages) == (1, 1)
    assert (stream.request_messages, stream.response_messages) == (1, 3)
    assert not err.response_trailers and (b"grpc-status", b"3") in [(h.name, h.value) for h in err.response_headers]
    assert (err.request_messages, err.response_messages) == (1, 0)
    assert not wire.copy.streams and wire.copy.reserved == 0 and not wire.copy.failed


def test_h2_copy_follows_filters_large_frames_continuations_resets_goaway_and_the_end() -> None:
    taps = _h2_taps(_tap("all", max_body=100), _tap("alice", max_body=100, headers={"x-dev": "alice"}))
    wire = _H2Wire(taps, server_settings={SettingCodes.MAX_FRAME_SIZE: 1 << 20,   # DATA frames of up to 1 MiB
                                           SettingCodes.INITIAL_WINDOW_SIZE: 1 << 21})
    c, s = wire.c, wire.s
    wire.flush()
    big = b"m" * 700_000
    # a header block too large for one frame: HEADERS + CONTINUATION; a body in frames of 700 kB
    c.send_headers(1, GRPC_REQ + [(b"x-dev", b"alice"), (b"x-big", b"v" * 40_000)])
    c.send_data(1, _grpc_msg(big), end_stream=True)
    wire.flush()
    assert wire.to_server[-1].__class__.__name__ == "StreamEnded"  # the app got it all
    s.send_headers(1, [(b":status", b"200")])
    s.send_data(1, b"ok", end_stream=True)
    # a stream the client cancels, one the app resets, one the app's GOAWAY leaves unprocessed
    for sid in (3, 5, 7):
        c.send_headers(sid, GRPC_REQ)
    wire.flush()
    c.reset_stream(3, error_code=8)   # CANCEL, as a cancelled gRPC call
    s.reset_stream(5, error_code=2)
    wire.flush()
    wire.copy.feed(False, _goaway_frame(last_stream_id=5))
    # a stream still open when the connection ends
    c.send_headers(9, GRPC_REQ)
    wire.flush()
    wire.copy.close()

    recs = taps.take()
    by = {(r.wiretap_id, r.target, r.error) for r in recs}
    first = [r for r in recs if r.wiretap_id == "alice"]
    assert len(first) == 1 and first[0].request_bytes == 700_005 and first[0].request_body == _grpc_msg(big)[:100]
    assert (b"x-big", b"v" * 40_000) in [(h.name, h.value) for h in first[0].request_headers]
    assert first[0].response_body == b"ok" and first[0].status == 200 and first[0].request_messages == 1
    errors = [r.error for r in recs if r.wiretap_id == "all"]
    assert errors == ["", "the client reset the stream (CANCEL)", "the app reset the stream (INTERNAL_ERROR)",
                      "not processed by the app (GOAWAY); the client may send it again",
                      "the connection ended before the answer was complete"], by
    assert not wire.copy.failed


def _goaway_frame(last_stream_id: int) -> bytes:
    from hyperframe.frame import GoAwayFrame

    f = GoAwayFrame(0)
    f.last_stream_id = last_stream_id
    return f.serialize()


def test_h2_copy_bounds_streams_and_bodies_and_survives_garbage() -> None:
    taps = _h2_taps(_tap("w", max_body=wiretap_mod.MAX_BODY_LIMIT, buffer=10_000))
    wire = _H2Wire(taps, server_settings={SettingCodes.MAX_CONCURRENT_STREAMS: 1000})   # room for them all
    c = wire.c
    n = wiretap_mod.MAX_COPIED_STREAMS + 10
    for i in range(n):
        c.send_headers(1 + 2 * i, GRPC_REQ)
    wire.flush()
    # at most MAX_COPIED_STREAMS at once; the rest are counted as dropped, and bodies share one budget
    assert len(wire.copy.streams) == wiretap_mod.MAX_COPIED_STREAMS and taps.taps["w"].dropped == 10
    assert wire.copy.reserved <= wiretap_mod.BODY_BUDGET
    assert max(ex.keep for ex in wire.copy.streams.values()) == wiretap_mod.MAX_BODY_LIMIT
    assert min(ex.keep for ex in wire.copy.streams.values()) == 0
    # bytes that are not HTTP/2: decoding stops, the open streams are recorded with the reason, no exception
    wire.copy.feed(True, b"\x00\x00\x04\x01\x04\x00\x00\x99\x99" + b"\xff\xff\xff\xff")  # HEADERS, bad HPACK
    assert wire.copy.failed.startswith("the wiretap stopped decoding this HTTP/2 connection")
    recs = taps.take(10_000)
    assert len(recs) == wiretap_mod.MAX_COPIED_STREAMS and all(r.error == wire.copy.failed for r in recs)
    wire.copy.feed(True, b"more")   # ignored from now on
    assert not wire.copy.streams


def _hdr(hs: Any, name: bytes) -> bytes | None:
    return next((h.value for h in hs if h.name == name), None)


def _grpc_status(r: pb.WiretapRecord) -> bytes | None:
    return _hdr(r.response_trailers, b"grpc-status") or _hdr(r.response_headers, b"grpc-status")


def test_agent_records_grpc_calls_stream_by_stream_and_callers_get_their_answers(tmp_path: Any) -> None:
    """A real agent before a real grpcio server (tests/greeter_app.py) and a grpcio client on ONE channel:
    every call -- unary, server-, client-, bidi-streaming, an error, 50 concurrent unary -- is answered by
    the app exactly as without a wiretap, and recorded as one HTTP/2 exchange per call."""
    import greeter_app

    app, _, app_port = greeter_app.serve(0, "app", host="127.0.0.1")

    async def main() -> None:
        fake = TapManager({})
        ra = await start_agent(fake, app_port, tmp_path)
        ag, port = ra.agent, ra.port
        try:
            await fake.instructions.put(pb.AgentInstruction(wiretaps=[
                _tap("w-all", max_body=16), _tap("w-alice", headers={"x-dev": "alice"})]))
            await _until(lambda: len(ag.wiretaps.taps) == 2)
            got = await asyncio.to_thread(greeter_app.check, f"127.0.0.1:{port}", "x-dev", ["alice=app", "=app"], 50)
            assert got["n"] == 50 and got["nbad"] == 0, got
            for name in ("alice", "none"):
                s = got["streams"][name]
                assert s["unary"] == f"hello {name} from app" and s["client"] == "64 messages, 4194304 bytes to app"
                assert s["server"] == [f"hello {name} #{i} from app" for i in range(5)]
                assert s["bidi"] == [f"{name}-{i} from app" for i in range(20)]
                assert s["error"] == "INVALID_ARGUMENT: no such name (from app)"

            await _until(lambda: len([r for r in fake.records if r.wiretap_id == "w-all"]) == 60, 20)
            mine = [r for r in fake.records if r.wiretap_id == "w-all"]
            assert all(r.kind == pb.WiretapRecord.HTTP and r.method == "POST" and r.http_version == "2"
                       and r.status == 200 and not r.error and r.latency_ms > 0 for r in mine)
            by_path: dict[bytes, list[pb.WiretapRecord]] = {}
            for r in mine:
                by_path.setdefault(r.target, []).append(r)
            g = b"/greeter.Greeter/"
            assert {k: len(v) for k, v in by_path.items()} == {g + b"SayHello": 54, g + b"SayHellos": 2,
                                                               g + b"Collect": 2, g + b"Chat": 2}
            statuses = sorted(_grpc_status(r) or b"" for r in by_path[g + b"SayHello"])
            assert statuses == [b"0"] * 52 + [b"3"] * 2   # the two "fail" calls: INVALID_ARGUMENT
            assert all(_grpc_status(r) == b"0" for k in (b"SayHellos", b"Collect", b"Chat") for r in by_path[g + k])
            assert all((r.request_messages, r.response_messages) == (1, 5) for r in by_path[g + b"SayHellos"])
            assert all((r.request_messages, r.response_messages) == (20, 20) for r in by_path[g + b"Chat"])
            for r in by_path[g + b"Collect"]:   # 64 StringValues of 64 KiB: 5-byte prefix, tag, 3-byte length
                assert r.request_messages == 64 and r.request_bytes == 64 * (5 + 1 + 3 + 65536)
                assert r.request_body == (b"\x00" + (65540).to_bytes(4, "big") + b"\x0a\x80\x80\x04" + b"x" * 7)
                assert _hdr(r.response_trailers, b"x-count") == b"64"
            alice = [r for r in fake.records if r.wiretap_id == "w-alice"]
            assert len(alice) == 30 and all(_hdr(r.request_headers, b"x-dev") == b"alice" for r in alice)
            assert not fake.drops
        finally:
            await ra.close()
    try:
        asyncio.run(main())
    finally:
        app.stop(0)


def test_grpc_calls_are_answered_when_the_manager_does_not_read_and_copies_are_dropped(tmp_path: Any) -> None:
    import greeter_app

    app, _, app_port = greeter_app.serve(0, "app", host="127.0.0.1")

    async def main() -> None:
        fake = TapManager({}, stall=True)
        ra = await start_agent(fake, app_port, tmp_path)
        ag, port = ra.agent, ra.port
        try:
            await fake.instructions.put(pb.AgentInstruction(wiretaps=[_tap("w", max_body=4096, buffer=5)]))
            await _until(lambda: bool(ag.wiretaps))
            got = await asyncio.to_thread(greeter_app.check, f"127.0.0.1:{port}", "x-dev", ["=app"], 600)
            assert got["n"] == 600 and got["nbad"] == 0, got
            t = ag.wiretaps.taps["w"]   # what gRPC's windows to the manager took first, then at most 5 kept
            assert len(t.buffer) <= 5 and t.dropped > 0 and len(fake.records) == 0, (len(t.buffer), t.dropped)
        finally:
            await ra.close()
    try:
        asyncio.run(main())
    finally:
        app.stop(0)
