"""Unit tests: personal intercepts in the traffic-agent (cluster/httproute.py), loopback only.

A real agent (cluster/agent.py) against the fake manager of test_agent_unit,
with real HTTP servers for the app and two "laptops" (one per intercept), and
real HTTP clients (http.client, keep-alive) sending mixed requests (the servers,
the fake manager and the agent's start and stop: tests/agent_rig.py).
"""
from __future__ import annotations

import asyncio
import http.client
import socket
from typing import Any, Iterator

import pytest

from tpnb.cluster import httproute
from tpnb.proto import pb

from agent_rig import RoutingManager, http_server, intercept_spec, quiet_agent, start_agent
from test_agent_unit import _free_port, _until

pytestmark = pytest.mark.unit


def test_filters_match_headers_and_paths() -> None:
    f = httproute.Filter.from_spec(intercept_spec("a", {"X-Dev": "alice"}, http_path_prefix="/api"))
    assert f.matches(b"/api/v1?q=1", [(b"x-dev", b"alice"), (b"host", b"h")])
    assert not f.matches(b"/api/v1", [(b"x-dev", b"bob")])
    assert not f.matches(b"/web", [(b"x-dev", b"alice")])
    assert httproute.Filter.from_spec(intercept_spec("b", http_path_equal="/x")).matches(b"/x?y", [])
    assert not httproute.Filter.from_spec(intercept_spec("b", http_path_equal="/x")).matches(b"/x/", [])
    rx = httproute.Filter.from_spec(intercept_spec("c", http_path_regex=r"/items/\d+"))
    assert rx.matches(b"/items/42", []) and not rx.matches(b"/items/42/edit", [])
    assert httproute.is_filtered(intercept_spec("d", {"a": "b"})) and not httproute.is_filtered(intercept_spec("e"))
    assert httproute.check(intercept_spec("f", http_path_regex="(")).startswith("invalid --http-path-regex")
    assert "must start with /" in httproute.check(intercept_spec("g", http_path_prefix="api"))
    assert httproute.filter_key(intercept_spec("h", {"X-A": "1"})) == httproute.filter_key(intercept_spec("i", {"x-a": "1"}))


def test_probe_tells_http_from_other_protocols() -> None:
    async def main() -> None:
        srv, port = http_server("app")

        async def banner(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"+OK redis-like banner\r\n")
            await w.drain()
            await r.read(100)
            w.close()

        async def h2(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(bytes.fromhex("000000040000000000") + bytes.fromhex("0000080700000000000000000000000001"))
            await w.drain()
            w.close()

        b = await asyncio.start_server(banner, "127.0.0.1", 0)
        h = await asyncio.start_server(h2, "127.0.0.1", 0)
        try:
            assert await httproute.probe("127.0.0.1", port) == "http/1.1"
            got = await httproute.probe("127.0.0.1", b.sockets[0].getsockname()[1])
            assert got.startswith("tcp: it answered an HTTP/1.1 request with b'+OK redis"), got
            got = await httproute.probe("127.0.0.1", h.sockets[0].getsockname()[1])
            assert got.startswith("tcp:") and "HTTP/2" in got, got
            with pytest.raises(OSError):
                await httproute.probe("127.0.0.1", _free_port())
        finally:
            srv.shutdown()
            b.close()
            h.close()
    asyncio.run(main())


@pytest.fixture()
def servers() -> Iterator[dict[str, int]]:
    made = {t: http_server(t) for t in ("app", "alice", "bob")}
    yield {t: p for t, (_, p) in made.items()}
    for srv, _ in made.values():
        srv.shutdown()


def test_agent_routes_each_request_of_a_keepalive_connection(servers: dict[str, int], monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Any) -> None:
    quiet_agent(monkeypatch)

    async def main() -> None:
        fake = RoutingManager({"ic-a": servers["alice"], "ic-b": servers["bob"]})
        ra = await start_agent(fake, servers["app"], tmp_path)
        ag, settings = ra.agent, ra.settings
        try:
            await fake.instructions.put(pb.AgentInstruction(intercepts=[
                pb.InterceptInfo(id="ic-a", state=pb.InterceptInfo.ACTIVE, spec=intercept_spec("a", {"x-dev": "alice"})),
                pb.InterceptInfo(id="ic-b", state=pb.InterceptInfo.ACTIVE,
                                 spec=intercept_spec("b", {"x-dev": "bob"}, http_path_prefix="/api")),
            ]))
            await _until(lambda: len(ag.filtered_intercepts()) == 2)
            # the agent probed the app and told the manager it speaks HTTP/1.1
            await _until(lambda: "http/1.1" in fake.protocols, 10)
            assert ag.active_intercept() is None  # no global intercept: connections are not taken whole

            def mixed() -> list[tuple[str, str]]:
                conn = http.client.HTTPConnection("127.0.0.1", settings.agent_port, timeout=10)
                out = []
                plan = [({"x-dev": "alice"}, "/x", "alice"), ({}, "/x", "app"), ({"x-dev": "bob"}, "/api/1", "bob"),
                        ({"x-dev": "bob"}, "/web", "app"), ({"X-Dev": "alice"}, "/y", "alice"),
                        ({"x-dev": "carol"}, "/api", "app")]
                for i in range(300):
                    headers, path, want = plan[i % len(plan)]
                    body = b"b" * (i % 7 * 1000) if i % 2 else None
                    conn.request("POST" if body else "GET", path, body=body, headers=headers)
                    resp = conn.getresponse()
                    text = resp.read().decode()
                    out.append((want, text.split(" ", 1)[0]))
                    assert text.endswith(f" {path} {len(body or b'')}"), text
                # HEAD, chunked upload, on the same connection
                conn.request("HEAD", "/h", headers={"x-dev": "alice"})
                r = conn.getresponse()
                r.read()
                out.append(("alice", r.headers["X-Served-By"]))
                conn.request("POST", "/c", body=iter([b"abc", b"defg"]), headers={"x-dev": "bob",
                                                                                 "Transfer-Encoding": "chunked"})
                out.append(("app", conn.getresponse().read().decode().split(" ", 1)[0]))  # /c: no /api prefix
                conn.close()
                return out

            got = await asyncio.to_thread(mixed)
            wrong = [(i, w, g) for i, (w, g) in enumerate(got) if w != g]
            assert not wrong, wrong[:5]
            # one tunnel per intercept for the whole keep-alive connection
            assert sum(1 for o in fake.opens if o.intercept_id == "ic-a") == 1
            assert sum(1 for o in fake.opens if o.intercept_id == "ic-b") == 1

            # not HTTP at all: the app gets the bytes untouched
            r, w = await asyncio.open_connection("127.0.0.1", settings.agent_port)
            w.write(b"\x16\x03\x01 not http\r\n\r\n")
            w.write_eof()
            data = await asyncio.wait_for(r.read(), 10)
            assert b"400" in data.split(b"\r\n", 1)[0], data  # http.server's own refusal: the app answered
            w.close()

            # the laptop's side refuses: that request gets a 502, the app's requests still work
            fake.refuse = True

            def refused() -> tuple[int, int]:
                c = http.client.HTTPConnection("127.0.0.1", settings.agent_port, timeout=10)
                c.request("GET", "/", headers={"x-dev": "alice"})
                st = c.getresponse().status
                c.close()
                c = http.client.HTTPConnection("127.0.0.1", settings.agent_port, timeout=10)
                c.request("GET", "/")
                st2 = c.getresponse().status
                c.close()
                return st, st2
            assert await asyncio.to_thread(refused) == (502, 200)
            fake.refuse = False

            # the intercepts end: everything to the app
            await fake.instructions.put(pb.AgentInstruction())
            await _until(lambda: not ag.filtered_intercepts())

            def plain() -> str:
                c = http.client.HTTPConnection("127.0.0.1", settings.agent_port, timeout=10)
                c.request("GET", "/z", headers={"x-dev": "alice"})
                t = c.getresponse().read().decode()
                c.close()
                return t
            assert (await asyncio.to_thread(plain)).startswith("app GET /z")
        finally:
            await ra.close()
    asyncio.run(asyncio.wait_for(main(), 120))


def test_probe_result_of_a_non_http_app_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    quiet_agent(monkeypatch, remain=None)

    async def main() -> None:
        async def banner(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"SSH-2.0-OpenSSH_9.2\r\n")
            await w.drain()
            await r.read(100)
            w.close()
        app = await asyncio.start_server(banner, "127.0.0.1", 0)
        fake = RoutingManager({})
        ra = await start_agent(fake, app.sockets[0].getsockname()[1], tmp_path)
        settings = ra.settings
        try:
            await fake.instructions.put(pb.AgentInstruction(intercepts=[
                pb.InterceptInfo(id="ic-a", state=pb.InterceptInfo.ACTIVE, spec=intercept_spec("a", {"x-dev": "a"}))]))
            await _until(lambda: bool(fake.protocols), 10)
            assert fake.protocols[-1].startswith("tcp: it answered an HTTP/1.1 request with b'SSH-2.0")
            # and the app's own clients are not disturbed
            s = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", settings.agent_port), 5)
            s.settimeout(5)
            assert (await asyncio.to_thread(s.recv, 100)).startswith(b"SSH-2.0")
            s.close()
        finally:
            await ra.close()
            app.close()
    asyncio.run(asyncio.wait_for(main(), 60))


# ------------------------------------------------------------------ the router's HTTP/1.1 glue (httptools)

async def _h11_app(tag: str) -> tuple[asyncio.AbstractServer, int]:
    """An app that parses with h11 (an independent parser: what the router writes must be valid
    HTTP/1.1 to it) and answers `TAG METHOD TARGET BODYLEN trailers=...`; `Upgrade: echo` switches to
    an echo of raw bytes; `/close` answers without framing (the body ends when the app closes);
    `Expect: 100-continue` gets its 100 from h11."""
    import h11

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req, body, trailers = None, 0, b""
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        if conn.they_are_waiting_for_100_continue:
                            w.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                        data = await r.read(65536)
                        conn.receive_data(data)
                        continue
                    if isinstance(ev, h11.Request):
                        req = ev
                    elif isinstance(ev, h11.Data):
                        body += len(ev.data)
                    elif isinstance(ev, h11.EndOfMessage):
                        trailers = b",".join(n + b"=" + v for n, v in ev.headers)
                        break
                    elif isinstance(ev, (h11.ConnectionClosed,)) or ev is h11.PAUSED:
                        break
                if req is None:
                    return
                if dict(req.headers).get(b"upgrade") == b"echo":
                    w.write(conn.send(h11.InformationalResponse(status_code=101, headers=[
                        ("upgrade", "echo"), ("connection", "upgrade")])))
                    rest, _ = conn.trailing_data
                    if rest:
                        w.write(rest)
                    while data := await r.read(65536):
                        w.write(data)
                    return
                text = b"%s %s %s %d trailers=%s" % (tag.encode(), req.method, req.target, body, trailers)
                if req.target == b"/close":
                    w.write(b"HTTP/1.0 200 OK\r\n\r\n" + text)
                    return
                w.write(conn.send(h11.Response(status_code=200, headers=[("content-length", str(len(text)))])))
                if req.method != b"HEAD":
                    w.write(conn.send(h11.Data(data=text)))
                w.write(conn.send(h11.EndOfMessage()))
                await w.drain()
                if conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (h11.ProtocolError, ConnectionError):
            pass
        finally:
            w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def _router_front(app: int, laptop: int, results: list[Any]) -> tuple[asyncio.AbstractServer, int]:
    """An agent-like listener: requests with `x-dev: alice` go to `laptop` through an async Upstream
    (as an intercept's tunnel does), the rest to `app` as a TcpLeg."""
    async def connect(key: Any) -> Any:
        if key == "alice":
            return await httproute.StreamUpstream.connect("127.0.0.1", laptop)
        return await httproute.TcpLeg.connect("127.0.0.1", app)

    def choose(req: Any) -> str:
        return "alice" if (b"x-dev", b"alice") in req.headers else ""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        router = httproute.HttpRouter(r, w, choose, connect)
        try:
            await router.run()
            results.append(("done", dict(router.routed)))
        except httproute.NotHTTP as exc:
            results.append(("not http", exc.raw))
        except Exception as exc:  # noqa: BLE001
            results.append(("error", repr(exc)))
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def _exchange(port: int, data: bytes, *, until_close: bool = True, then: bytes = b"",
                    wait_for: bytes = b"") -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    got = b""
    if wait_for:
        while wait_for not in got:
            chunk = await asyncio.wait_for(r.read(65536), 10)
            assert chunk, got
            got += chunk
        w.write(then)
    w.write_eof()
    while until_close and (chunk := await asyncio.wait_for(r.read(65536), 10)):
        got += chunk
    w.close()
    return got


def _bodies(raw: bytes, methods: str = "") -> list[bytes]:
    """The bodies of a stream of responses, in order (parsed with h11; `methods`: H for a HEAD)."""
    import h11
    c = h11.Connection(h11.CLIENT)
    out: list[bytes] = []
    c.receive_data(raw)
    c.receive_data(b"")
    cur = b""
    for i in range(100):
        head = methods[i:i + 1] == "H"
        c.send(h11.Request(method="HEAD" if head else "GET", target="/", headers=[("host", "x")]))
        c.send(h11.EndOfMessage())
        while True:
            try:
                ev = c.next_event()
            except h11.RemoteProtocolError:  # the end of the stream
                return out
            if isinstance(ev, h11.Data):
                cur += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                out.append(cur)
                cur = b""
                break
            elif ev is h11.NEED_DATA or isinstance(ev, h11.ConnectionClosed):
                return out
        if c.our_state is not h11.DONE or c.their_state is not h11.DONE:
            return out
        c.start_next_cycle()
    return out


def test_router_pipelined_mixed_chunked_head_and_expect() -> None:
    async def main() -> None:
        app, ap = await _h11_app("app")
        lap, lp = await _h11_app("alice")
        results: list[Any] = []
        front, fp = await _router_front(ap, lp, results)
        try:
            # pipelined in one write, alternating app / laptop, a chunked body with a trailer, a HEAD
            reqs = (b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
                    b"GET /2 HTTP/1.1\r\nHost: x\r\nX-Dev: alice\r\n\r\n"
                    b"POST /3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTrailer: t\r\n\r\n"
                    b"3;ext=1\r\nabc\r\n4\r\ndefg\r\n0\r\nT: 9\r\n\r\n"
                    b"POST /4 HTTP/1.1\r\nHost: x\r\nx-dev: alice\r\nContent-Length: 5\r\n\r\nhello"
                    b"HEAD /5 HTTP/1.1\r\nHost: x\r\n\r\n"
                    b"GET /6 HTTP/1.1\r\nHost: x\r\nx-dev: alice\r\n\r\n")
            got = await _exchange(fp, reqs)
            assert _bodies(got, "....H") == [
                b"app GET /1 0 trailers=", b"alice GET /2 0 trailers=", b"app POST /3 7 trailers=t=9",
                b"alice POST /4 5 trailers=", b"", b"alice GET /6 0 trailers="], got
            assert results[-1] == ("done", {"": 3, "alice": 3})

            # the same, byte by byte: framing does not depend on how the bytes arrive
            r, w = await asyncio.open_connection("127.0.0.1", fp)
            for i in range(len(reqs)):
                w.write(reqs[i:i + 1])
                if i % 50 == 0:
                    await asyncio.sleep(0)
            w.write_eof()
            got2 = await asyncio.wait_for(r.read(), 10)
            w.close()
            assert got2 == got

            # Expect: 100-continue: the app's 100 reaches the client, then the body goes
            got = await _exchange(fp, b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
                                  wait_for=b"100 ", then=b"xyz")
            assert got.startswith(b"HTTP/1.1 100 ") and got.endswith(b"app POST /e 3 trailers="), got
        finally:
            for s in (front, app, lap):
                s.close()
    asyncio.run(asyncio.wait_for(main(), 60))


def test_router_http10_close_delimited_upgrades_and_malformed_heads() -> None:
    async def main() -> None:
        app, ap = await _h11_app("app")
        lap, lp = await _h11_app("alice")
        results: list[Any] = []
        front, fp = await _router_front(ap, lp, results)
        try:
            # HTTP/1.0 without keep-alive: one answer, then the connection closes (the client sends no EOF)
            got = await _exchange(fp, b"GET /a HTTP/1.0\r\n\r\n")
            assert got.endswith(b"app GET /a 0 trailers="), got
            # an answer framed by the app's close: relayed whole, then the client's connection closes
            got = await _exchange(fp, b"GET /close HTTP/1.1\r\nHost: x\r\n\r\nGET /never HTTP/1.1\r\n\r\n")
            assert got == b"HTTP/1.0 200 OK\r\n\r\napp GET /close 0 trailers=", got

            # an upgrade the app accepts: raw bytes both ways after its 101, to the laptop's side too
            for hdr, tag in ((b"", b"app"), (b"x-dev: alice\r\n", b"alice")):
                got = await _exchange(fp, b"GET /ws HTTP/1.1\r\nHost: x\r\n" + hdr +
                                      b"Upgrade: echo\r\nConnection: upgrade\r\n\r\nraw-1 ",
                                      wait_for=b"raw-1 ", then=b"raw-2")
                assert got.startswith(b"HTTP/1.1 101 ") and got.endswith(b"\r\n\r\nraw-1 raw-2"), (tag, got)

            # h2c is declined (the router keeps the connection HTTP/1.1), a body included
            got = await _exchange(fp, b"POST /u HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n"
                                      b"Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
                                      b"Content-Length: 3\r\n\r\nabcGET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _bodies(got) == [b"app POST /u 3 trailers=", b"app GET /next 0 trailers="], got
            # a websocket-style upgrade with a body is served as a plain request (the upgrade declined)
            got = await _exchange(fp, b"POST /b HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\nConnection: upgrade\r\n"
                                      b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n"
                                      b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _bodies(got) == [b"app POST /b 2 trailers=", b"app GET /after 0 trailers="], got

            # not HTTP at all: nothing is sent anywhere, the bytes read so far come back (for the app)
            results.clear()
            await _exchange(fp, b"\x16\x03\x01\x00\x05hello\r\n\r\n")
            assert results == [("not http", b"\x16\x03\x01\x00\x05hello\r\n\r\n")]
            # a first request cut short by the client: the same (the app gets it, as before)
            results.clear()
            await _exchange(fp, b"GET /half HTTP/1.1\r\nHo")
            assert results == [("not http", b"GET /half HTTP/1.1\r\nHo")]
            # a malformed request after good ones: they are answered, then a 400 and the connection ends
            got = await _exchange(fp, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nGET /bad HTTP/1.1\r\nBad Header\r\n\r\n")
            assert b"app GET /ok 0 trailers=" in got and got.endswith(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"), got
        finally:
            for s in (front, app, lap):
                s.close()
    asyncio.run(asyncio.wait_for(main(), 60))
