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
