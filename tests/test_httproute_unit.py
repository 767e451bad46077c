"""Unit tests: personal intercepts in the traffic-agent (cluster/httproute.py), loopback only.

A real agent (cluster/agent.py) against the fake manager of test_agent_unit,
with real HTTP servers for the app and two "laptops" (one per intercept), and
real HTTP clients (http.client, keep-alive) sending mixed requests.
"""
from __future__ import annotations

import asyncio
import http.client
import http.server
import socket
import threading
from typing import Any, Iterator

import pytest

from tpnb.cluster import agent as agent_mod
from tpnb.cluster import httproute
from tpnb.common.forward import GrpcFrameChannel, bridge, error_frame
from tpnb.proto import pb

from test_agent_unit import FakeManager, _free_port, _start_manager, _until

pytestmark = pytest.mark.unit


class _Tagged(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    tag = "?"

    def _answer(self) -> None:
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        out = f"{self.tag} {self.command} {self.path} {len(body)}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.send_header("X-Served-By", self.tag)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_HEAD = _answer

    def log_message(self, *a: Any) -> None:
        pass


def _http_server(tag: str) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = type(f"H{tag}", (_Tagged,), {"tag": tag})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


class RoutingManager(FakeManager):
    """Each intercept's tunnels reach its own laptop port; records the app protocol reports."""

    def __init__(self, ports: dict[str, int]) -> None:
        super().__init__(0)
        self.ports = ports
        self.protocols: list[str] = []

    async def AgentRemain(self, request: pb.AgentSession, context: Any) -> pb.Empty:
        if request.app_protocol:
            self.protocols.append(request.app_protocol)
        return await super().AgentRemain(request, context)

    async def Tunnel(self, request_iterator: Any, context: Any) -> None:
        chan = GrpcFrameChannel(context)
        first = await chan.recv()
        assert first is not None and first.WhichOneof("kind") == "open"
        self.opens.append(first.open)
        port = self.ports.get(first.open.intercept_id)
        if port is None or self.refuse:
            await chan.send(error_frame("client port not listening"))
            return
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await chan.send(pb.TunnelFrame(opened=pb.Empty()))
        await bridge(r, w, chan, linger=0)


def _spec(name: str, headers: dict[str, str] | None = None, **paths: str) -> pb.InterceptSpec:
    return pb.InterceptSpec(name=name, workload="hello",
                            http_headers=[pb.HeaderMatch(name=k, value=v) for k, v in (headers or {}).items()],
                            **paths)


def test_filters_match_headers_and_paths() -> None:
    f = httproute.Filter.from_spec(_spec("a", {"X-Dev": "alice"}, http_path_prefix="/api"))
    assert f.matches(b"/api/v1?q=1", [(b"x-dev", b"alice"), (b"host", b"h")])
    assert not f.matches(b"/api/v1", [(b"x-dev", b"bob")])
    assert not f.matches(b"/web", [(b"x-dev", b"alice")])
    assert httproute.Filter.from_spec(_spec("b", http_path_equal="/x")).matches(b"/x?y", [])
    assert not httproute.Filter.from_spec(_spec("b", http_path_equal="/x")).matches(b"/x/", [])
    rx = httproute.Filter.from_spec(_spec("c", http_path_regex=r"/items/\d+"))
    assert rx.matches(b"/items/42", []) and not rx.matches(b"/items/42/edit", [])
    assert httproute.is_filtered(_spec("d", {"a": "b"})) and not httproute.is_filtered(_spec("e"))
    assert httproute.check(_spec("f", http_path_regex="(")).startswith("invalid --http-path-regex")
    assert "must start with /" in httproute.check(_spec("g", http_path_prefix="api"))
    assert httproute.filter_key(_spec("h", {"X-A": "1"})) == httproute.filter_key(_spec("i", {"x-a": "1"}))


def test_probe_tells_http_from_other_protocols() -> None:
    async def main() -> None:
        srv, port = _http_server("app")

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
    made = {t: _http_server(t) for t in ("app", "alice", "bob")}
    yield {t: p for t, (_, p) in made.items()}
    for srv, _ in made.values():
        srv.shutdown()


def test_agent_routes_each_request_of_a_keepalive_connection(servers: dict[str, int], monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Any) -> None:
    monkeypatch.setattr(agent_mod, "app_environment", lambda s, proc=None: {})
    monkeypatch.setattr(agent_mod, "REMAIN_INTERVAL", 0.3)
    token = tmp_path / "token"
    token.write_text("t\n")

    async def main() -> None:
        mgr_port = _free_port()
        fake = RoutingManager({"ic-a": servers["alice"], "ic-b": servers["bob"]})
        server = await _start_manager(fake, mgr_port)
        settings = agent_mod.AgentSettings(
            name="hello", namespace="default", pod_name="hello-1", pod_ip="10.42.0.9", app_container="app",
            app_port=servers["app"], agent_port=_free_port(), health_port=0, manager_host="127.0.0.1",
            manager_port=mgr_port, token_file=str(token))
        ag = agent_mod.Agent(settings)
        await ag.start()
        session = asyncio.ensure_future(ag.session_loop())
        try:
            await _until(lambda: ag.agent_id is not None, 20)
            await fake.instructions.put(pb.AgentInstruction(intercepts=[
                pb.InterceptInfo(id="ic-a", state=pb.InterceptInfo.ACTIVE, spec=_spec("a", {"x-dev": "alice"})),
                pb.InterceptInfo(id="ic-b", state=pb.InterceptInfo.ACTIVE,
                                 spec=_spec("b", {"x-dev": "bob"}, http_path_prefix="/api")),
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
            session.cancel()
            await asyncio.gather(session, return_exceptions=True)
            await ag.stop()
            await server.stop(0)
    asyncio.run(asyncio.wait_for(main(), 120))


def test_probe_result_of_a_non_http_app_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setattr(agent_mod, "app_environment", lambda s, proc=None: {})
    token = tmp_path / "token"
    token.write_text("t\n")

    async def main() -> None:
        async def banner(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"SSH-2.0-OpenSSH_9.2\r\n")
            await w.drain()
            await r.read(100)
            w.close()
        app = await asyncio.start_server(banner, "127.0.0.1", 0)
        mgr_port = _free_port()
        fake = RoutingManager({})
        server = await _start_manager(fake, mgr_port)
        settings = agent_mod.AgentSettings(
            name="hello", namespace="default", pod_name="hello-1", pod_ip="10.42.0.9", app_container="app",
            app_port=app.sockets[0].getsockname()[1], agent_port=_free_port(), health_port=0,
            manager_host="127.0.0.1", manager_port=mgr_port, token_file=str(token))
        ag = agent_mod.Agent(settings)
        await ag.start()
        session = asyncio.ensure_future(ag.session_loop())
        try:
            await _until(lambda: ag.agent_id is not None, 20)
            await fake.instructions.put(pb.AgentInstruction(intercepts=[
                pb.InterceptInfo(id="ic-a", state=pb.InterceptInfo.ACTIVE, spec=_spec("a", {"x-dev": "a"}))]))
            await _until(lambda: bool(fake.protocols), 10)
            assert fake.protocols[-1].startswith("tcp: it answered an HTTP/1.1 request with b'SSH-2.0")
            # and the app's own clients are not disturbed
            s = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", settings.agent_port), 5)
            s.settimeout(5)
            assert (await asyncio.to_thread(s.recv, 100)).startswith(b"SSH-2.0")
            s.close()
        finally:
            session.cancel()
            await asyncio.gather(session, return_exceptions=True)
            await ag.stop()
            await server.stop(0)
            app.close()
    asyncio.run(asyncio.wait_for(main(), 60))
