"""The in-kernel HTTP server: WSGI and ASGI apps, HTTP/1.1 details, hot swap under load, log, shutdown.

Everything talks to 127.0.0.1 only.
"""
from __future__ import annotations

import asyncio
import http.client
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from fastapi import FastAPI, Request, WebSocket  # module level: this file uses `from __future__ import annotations`
from fastapi.responses import StreamingResponse

from tpnb import inkernel
from tpnb.errors import ConfigError

pytestmark = pytest.mark.unit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def port():
    p = free_port()
    yield p
    inkernel.stop(p, grace=0)


def recv_until(c: socket.socket, needle: bytes, timeout: float = 5.0) -> bytes:
    """Read from a raw connection until `needle` arrived (or the peer closed / timeout)."""
    c.settimeout(timeout)
    data = b""
    while needle not in data:
        chunk = c.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def wsgi_app(tag: str, delay: float = 0.0):
    def app(environ, start_response):
        body = environ["wsgi.input"].read()
        if delay:
            time.sleep(delay)
        out = f"{tag} {environ['REQUEST_METHOD']} {environ['PATH_INFO']} q={environ['QUERY_STRING']} " \
              f"len={len(body)}".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Tag", tag)])
        return [out]
    return app


def asgi_app(tag: str):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            raise RuntimeError("no lifespan here")
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"x-tag", tag.encode())]})
        await send({"type": "http.response.body",
                    "body": f"{tag} {scope['method']} {scope['path']} len={len(body)}".encode()})
    return app


class LifespanApp:
    """A class-based ASGI app (like Starlette) with a lifespan, to check detection and startup."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    self.events.append("startup")
                    scope["state"]["greeting"] = "hi"
                    await send({"type": "lifespan.startup.complete"})
                else:
                    self.events.append("shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["state"]["greeting"].encode()})


def test_app_kind_detection() -> None:
    assert inkernel.app_kind(wsgi_app("a")) == "wsgi"
    assert inkernel.app_kind(asgi_app("a")) == "asgi"
    assert inkernel.app_kind(LifespanApp()) == "asgi"

    class Wsgi:
        def __call__(self, environ, start_response):
            return []

    assert inkernel.app_kind(Wsgi()) == "wsgi"
    with pytest.raises(ConfigError, match="is not a web application"):
        inkernel.app_kind("nope")


def test_wsgi_get_post_chunked_and_keepalive(port) -> None:
    inkernel.serve(wsgi_app("w"), port)
    base = f"http://127.0.0.1:{port}"
    with requests.Session() as s:  # one keep-alive connection for all of these
        r = s.get(f"{base}/a%20b?x=1&y=2")
        assert r.status_code == 200 and r.text == "w GET /a b q=x=1&y=2 len=0"
        assert r.headers["X-Tag"] == "w"  # (no Content-Length from the app: uvicorn sends it chunked)
        assert s.post(f"{base}/p", data=b"x" * 100_000).text == "w POST /p q= len=100000"
        assert s.post(f"{base}/c", data=iter([b"abc", b"de"])).text == "w POST /c q= len=5"  # chunked
        assert s.head(f"{base}/h").content == b""
    # urllib (HTTP/1.1, Connection: close)
    assert urllib.request.urlopen(f"{base}/u").read() == b"w GET /u q= len=0"


def test_raw_http10_pipelining_and_expect_continue(port) -> None:
    inkernel.serve(wsgi_app("r"), port)
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 2 and b"r GET /one" in data and b"r GET /two" in data
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        assert c.recv(100).startswith(b"HTTP/1.1 100 Continue")
        c.sendall(b"abc")
        assert b"len=3" in recv_until(c, b"len=3")
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"GET /old HTTP/1.0\r\n\r\n")
        data = recv_until(c, b"never")  # HTTP/1.0 without keep-alive: the server closes after the response
        assert data.startswith(b"HTTP/1.1 200 OK") and b"r GET /old" in data
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"garbage\r\n\r\n")
        assert recv_until(c, b"never").startswith(b"HTTP/1.1 400")


def test_asgi_get_post_and_streaming(port) -> None:
    inkernel.serve(asgi_app("a"), port)
    base = f"http://127.0.0.1:{port}"
    assert requests.get(f"{base}/x").text == "a GET /x len=0"
    assert requests.post(f"{base}/y", data=iter([b"12", b"345"])).text == "a POST /y len=5"

    async def streamer(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    inkernel.serve(streamer, port)
    r = requests.get(f"{base}/s")
    assert r.text == "one two three" and r.headers.get("Transfer-Encoding") == "chunked"


def test_asgi_lifespan_runs_and_state_reaches_requests(port) -> None:
    app = LifespanApp()
    inkernel.serve(app, port)
    assert app.events == ["startup"]
    assert requests.get(f"http://127.0.0.1:{port}/").text == "hi"
    inkernel.serve(wsgi_app("after"), port)  # swapping the ASGI app out shuts it down
    deadline = time.monotonic() + 5
    while app.events != ["startup", "shutdown"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.events == ["startup", "shutdown"]


def test_app_errors_are_500_and_logged(port, capsys) -> None:
    def broken(environ, start_response):
        raise ValueError("boom")

    inkernel.serve(broken, port, name="broken-test")
    r = requests.get(f"http://127.0.0.1:{port}/b")
    assert r.status_code == 500
    rec = inkernel.requests_log("broken-test")[-1]
    assert rec["status"] == 500 and "ValueError: boom" in rec["error"]
    assert "ValueError: boom" in capsys.readouterr().err
    async def abroken(scope, receive, send):
        raise KeyError("x")
    inkernel.serve(abroken, port)
    assert requests.get(f"http://127.0.0.1:{port}/b").status_code == 500
    assert requests.get(f"http://127.0.0.1:{port}/b").status_code == 500  # the server survives


def test_swap_under_concurrent_load_drops_nothing(port) -> None:
    """200 requests from 4 threads; the app is swapped midway (WSGI -> WSGI -> ASGI); every one succeeds."""
    inkernel.serve(wsgi_app("v1", delay=0.002), port, name="swaptest")
    total, done = 200, []
    lock = threading.Lock()
    swapped = threading.Event()

    def worker(n: int) -> list[tuple[int, str]]:
        got = []
        with requests.Session() as s:
            for i in range(n):
                r = s.post(f"http://127.0.0.1:{port}/w?i={i}", data=b"payload", timeout=10)
                got.append((r.status_code, r.headers.get("X-Tag") or r.headers.get("x-tag", "")))
                with lock:
                    done.append(1)
                    count = len(done)
                if count == total // 3 and not swapped.is_set():
                    swapped.set()
                    inkernel.serve(wsgi_app("v2", delay=0.002), port)
                if count == 2 * total // 3:
                    inkernel.serve(asgi_app("v3"), port)
        return got

    with ThreadPoolExecutor(4) as pool:
        results = [r for f in [pool.submit(worker, total // 4) for _ in range(4)] for r in f.result()]
    assert len(results) == total
    assert all(code == 200 for code, _ in results), [r for r in results if r[0] != 200]
    tags = [t for _, t in results]
    assert {"v1", "v2", "v3"} <= set(tags)
    log = inkernel.requests_log("swaptest")
    assert len(log) == total and all(r["status"] == 200 for r in log)
    assert {r["app_version"] for r in log} == {1, 2, 3}
    assert set(log[0]) >= {"time", "method", "path", "status", "duration_ms"}
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(log)
    assert list(df["method"].unique()) == ["POST"]


def test_inflight_request_finishes_on_its_app_across_swap(port) -> None:
    inkernel.serve(wsgi_app("slow", delay=0.8), port)
    out: dict[str, str] = {}
    t = threading.Thread(target=lambda: out.update(slow=requests.get(f"http://127.0.0.1:{port}/").text))
    t.start()
    time.sleep(0.2)
    inkernel.serve(wsgi_app("fast"), port)
    assert requests.get(f"http://127.0.0.1:{port}/").text.startswith("fast ")
    t.join(5)
    assert out["slow"].startswith("slow ")


def test_one_server_per_port_and_busy_port_is_clear(port) -> None:
    a = inkernel.serve(wsgi_app("a"), port)
    b = inkernel.serve(wsgi_app("b"), port)
    assert a is b and a.app_version == 2
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        busy = other.getsockname()[1]
        with pytest.raises(ConfigError, match="already in use"):
            inkernel.serve(wsgi_app("c"), busy)


def test_stop_closes_port_and_idle_keepalive_connections(port) -> None:
    inkernel.serve(wsgi_app("s"), port)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().read().startswith(b"s GET")
    t0 = time.monotonic()
    assert inkernel.stop(port)
    assert time.monotonic() - t0 < 3
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    with pytest.raises((http.client.HTTPException, OSError)):
        conn.request("GET", "/")
        conn.getresponse()
    assert inkernel.get_server(port) is None


def test_stop_lets_inflight_request_finish(port) -> None:
    inkernel.serve(wsgi_app("slow", delay=0.5), port)
    out: dict[str, int] = {}
    t = threading.Thread(target=lambda: out.update(code=requests.get(f"http://127.0.0.1:{port}/").status_code))
    t.start()
    time.sleep(0.15)
    inkernel.stop(port)
    t.join(5)
    assert out["code"] == 200


def test_server_runs_while_the_calling_loop_is_busy(port) -> None:
    """The kernel's loop may be blocked by a running cell: serving must not depend on it."""
    inkernel.serve(asgi_app("free"), port)

    async def busy_cell() -> str:
        # a cell blocking the (kernel's) loop while something else calls the server
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: requests.get(f"http://127.0.0.1:{port}/").text)

    assert asyncio.run(busy_cell()).startswith("free GET")


# ------------------------------------------------------------------ real frameworks (FastAPI, Flask) on uvicorn
def fastapi_app(tag: str):
    app = FastAPI()

    @app.get("/json")
    def j(x: int = 0) -> dict:
        return {"tag": tag, "x": x}

    @app.post("/echo")
    async def echo(body: dict) -> dict:
        return {"tag": tag, "got": body}

    @app.get("/stream")
    def stream() -> StreamingResponse:
        def gen():
            for i in range(3):
                yield f"data: {tag}-{i}\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/size")
    async def size(request: Request) -> dict:
        n = 0
        async for chunk in request.stream():
            n += len(chunk)
        return {"n": n}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            try:
                msg = await websocket.receive_text()
            except Exception:  # noqa: BLE001 - the client went away
                return
            await websocket.send_text(f"{tag}:{msg}")

    return app


def test_fastapi_json_sse_large_body_and_websocket(port) -> None:
    from websockets.sync.client import connect as ws_connect

    inkernel.serve(fastapi_app("f1"), port, name="fastapi-test")
    base = f"http://127.0.0.1:{port}"
    assert requests.get(f"{base}/json?x=4").json() == {"tag": "f1", "x": 4}
    assert requests.post(f"{base}/echo", json={"a": [1, 2]}).json() == {"tag": "f1", "got": {"a": [1, 2]}}
    with requests.get(f"{base}/stream", stream=True) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert [ln for ln in r.iter_lines() if ln] == [b"data: f1-0", b"data: f1-1", b"data: f1-2"]
    big = b"x" * (20 * 1024 * 1024)
    assert requests.post(f"{base}/size", data=big).json() == {"n": len(big)}
    with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
        for i in range(5):
            ws.send(f"m{i}")
            assert ws.recv(timeout=5) == f"f1:m{i}"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(r["type"] == "websocket" for r in inkernel.requests_log("fastapi-test")):
        time.sleep(0.05)
    log = inkernel.requests_log("fastapi-test")
    wsrec = [r for r in log if r["type"] == "websocket"]
    assert len(wsrec) == 1 and wsrec[0]["status"] == 101 and wsrec[0]["path"] == "/ws"
    assert wsrec[0]["messages_in"] == 5 and wsrec[0]["messages_out"] == 5
    post = next(r for r in log if r["path"] == "/echo")
    assert post["request_body"] == b'{"a":[1,2]}' or post["request_body"].replace(b" ", b"") == b'{"a":[1,2]}'
    assert ("content-type", "application/json") in post["request_headers"]
    assert b'"got"' in post["response_body"] and post["status"] == 200
    size = next(r for r in log if r["path"] == "/size")
    assert size["request_bytes"] == len(big) and len(size["request_body"]) == inkernel.BODY_KEEP


def test_flask_app_and_its_errors(port, capsys) -> None:
    from flask import Flask, request

    app = Flask("t")

    @app.route("/hi", methods=["GET", "POST"])
    def hi():
        return {"method": request.method, "len": len(request.get_data())}

    @app.route("/boom")
    def boom():
        raise RuntimeError("flask boom")

    inkernel.serve(app, port, name="flask-test")
    base = f"http://127.0.0.1:{port}"
    assert requests.get(f"{base}/hi").json() == {"method": "GET", "len": 0}
    assert requests.post(f"{base}/hi", data=b"z" * 300_000).json() == {"method": "POST", "len": 300_000}
    assert requests.get(f"{base}/boom").status_code == 500  # Flask's own 500 page
    assert requests.get(f"{base}/hi").status_code == 200


def test_websocket_session_stays_on_its_version_across_swap(port) -> None:
    """A websocket opened on v1 keeps talking to v1 after the cell is re-run; new ones get v2."""
    from websockets.sync.client import connect as ws_connect

    inkernel.serve(fastapi_app("v1"), port)
    with ws_connect(f"ws://127.0.0.1:{port}/ws") as old:
        old.send("a")
        assert old.recv(timeout=5) == "v1:a"
        inkernel.serve(fastapi_app("v2"), port)
        with ws_connect(f"ws://127.0.0.1:{port}/ws") as new:
            new.send("b")
            assert new.recv(timeout=5) == "v2:b"
        old.send("c")
        assert old.recv(timeout=5) == "v1:c"
    assert requests.get(f"http://127.0.0.1:{port}/json").json()["tag"] == "v2"


def test_fastapi_swap_under_load_with_streaming_and_websockets(port) -> None:
    """Clients loop over JSON, streaming and websocket calls while the app is swapped 6 times: none fails."""
    from websockets.sync.client import connect as ws_connect

    inkernel.serve(fastapi_app("v0"), port, name="fa-swap")
    stop = threading.Event()
    failures: list[str] = []
    counts = {"json": 0, "stream": 0, "ws": 0}

    def http_loop(kind: str) -> None:
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    if kind == "json":
                        r = s.get(f"http://127.0.0.1:{port}/json?x=1", timeout=10)
                        ok = r.status_code == 200 and r.json()["x"] == 1
                    else:
                        r = s.get(f"http://127.0.0.1:{port}/stream", timeout=10)
                        ok = r.status_code == 200 and r.text.count("data:") == 3
                    if not ok:
                        failures.append(f"{kind}: {r.status_code} {r.text[:80]}")
                    counts[kind] += 1
                except Exception as exc:  # noqa: BLE001 - a failed request is what this test looks for
                    failures.append(f"{kind}: {exc!r}")

    def ws_loop() -> None:
        while not stop.is_set():
            try:
                with ws_connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10) as ws:
                    ws.send("p")
                    if not ws.recv(timeout=10).endswith(":p"):
                        failures.append("ws: wrong echo")
                counts["ws"] += 1
            except Exception as exc:  # noqa: BLE001
                failures.append(f"ws: {exc!r}")

    threads = [threading.Thread(target=http_loop, args=("json",)), threading.Thread(target=http_loop, args=("stream",)),
               threading.Thread(target=ws_loop)]
    for t in threads:
        t.start()
    try:
        for v in range(1, 7):
            time.sleep(0.3)
            inkernel.serve(fastapi_app(f"v{v}"), port)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert not failures, failures[:5]
    assert all(n > 3 for n in counts.values()), counts
    assert {r["app_version"] for r in inkernel.requests_log("fa-swap")} >= {1, 7}


def test_connections_have_nodelay(port) -> None:
    """Responses go out as several writes (head, body parts): without TCP_NODELAY each small
    response would wait for the client's delayed ACK (~40 ms on Linux)."""
    srv = inkernel.serve(asgi_app("n"), port)
    with requests.Session() as s:
        assert s.get(f"http://127.0.0.1:{port}/").ok
        conns = list(srv._uv.server_state.connections)
        assert conns
        for c in conns:
            sock = c.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


# ------------------------------------------------------------------ the hot path (session 5)
def test_sync_fastapi_routes_reuse_worker_threads(port) -> None:
    """anyio's worker threads live as long as the loop, not one request (they did under run_forever)."""
    app = FastAPI()
    seen: set[threading.Thread] = set()  # the objects (OS thread ids are reused once a thread ends)

    @app.get("/t")
    def t() -> dict:
        seen.add(threading.current_thread())
        return {"ok": True}

    inkernel.serve(app, port)
    with requests.Session() as s:
        for _ in range(40):
            assert s.get(f"http://127.0.0.1:{port}/t").json() == {"ok": True}
    assert len(seen) <= 2, f"{len(seen)} worker threads for 40 sequential requests"


def test_records_are_raw_until_read_and_pushed_to_watchers(port) -> None:
    got: list[tuple[int, dict | None]] = []
    stop = inkernel.watch(lambda srv, rec: got.append((srv.port, rec)))
    try:
        srv = inkernel.serve(asgi_app("raw"), port, name="raw-test")
        body = b"x" * (inkernel.BODY_KEEP + 100)
        r = requests.post(f"http://127.0.0.1:{port}/p?a=%20b", data=body, headers={"X-Hello": "w\u00f6rld".encode()})
        assert r.status_code == 200
        assert _until(lambda: any(rec for _p, rec in got))
        raw = srv.log[-1]
        method, path, _qs, headers, _client, _version = raw.req
        assert (method, path) == ("POST", "/p")
        assert isinstance(raw.t0, float) and isinstance(headers, list)  # not decoded on the hot path
        pub = [rec for _p, rec in got if rec][-1]
        assert pub["query"] == "a= b" and ("x-hello", "w\u00f6rld".encode().decode("latin-1")) in pub["request_headers"]
        assert pub["request_body"] == body[:inkernel.BODY_KEEP] and pub["request_bytes"] == len(body)
        assert pub["intercept"] == "raw-test" and pub["seq"] == srv.counters["requests"]
        assert srv.by_seq(pub["seq"])["path"] == "/p" and srv.by_seq(10**6) is None
        assert isinstance(pub["time"], str) and pub["duration_ms"] == round(pub["duration_ms"], 2)
        assert (port, None) in got  # server start / name changes are pushed too
    finally:
        stop()


def _until(pred, timeout: float = 5.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not pred():
        time.sleep(0.02)
    return pred()
