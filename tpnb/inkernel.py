"""Serve a notebook's WSGI or ASGI app from inside the Jupyter kernel.

`%%tp intercept hello --port 9000` runs the cell, finds its `app`, and serves
it here on 127.0.0.1:9000; the intercept then routes the cluster's traffic to
that port.  Design decisions, and why:

* **One background thread with its own asyncio loop** serves every in-kernel
  port.  The kernel's own loop is busy while a cell runs (a cell may sleep,
  train a model, or block on input for minutes), so serving on it would stall
  the cluster's requests; a thread with a private loop keeps answering.  We
  never call `asyncio.run` or nest loops in the kernel.
* **One server per port.**  Re-running the cell swaps the app: the server
  keeps its listening socket and connections and replaces one reference
  (`self._ref = new`, atomic under the GIL, done on the loop thread).  Each
  request reads the reference once when it starts, so an in-flight request
  finishes on the app it started with and the next one sees the new app.
* **WSGI apps run on a thread pool** (they block); **ASGI apps run on the
  loop** (they are coroutines).  ASGI is detected the way servers do it:
  `inspect.iscoroutinefunction(app)` or of `app.__call__` (Starlette,
  FastAPI, Django's ASGIHandler); anything else callable is WSGI (Flask,
  Django's WSGIHandler, plain functions).  The ASGI lifespan protocol is run
  when the app supports it (and ignored, as the spec says, when it raises).
* **HTTP/1.1 on asyncio streams**, written here (stdlib only): keep-alive,
  pipelining in order, `Expect: 100-continue`, Content-Length and chunked
  request bodies; responses carry Content-Length (ASGI streaming responses
  without one are sent chunked).  Enough for curl, requests and browsers; not
  a production server (no TLS, no HTTP/2, no websockets).
* **Every request is logged** (time, method, path, status, duration_ms, ...)
  in a bounded deque; `requests_log(name)` returns plain dicts so
  `pandas.DataFrame(records)` works.  Logs outlive the server so a notebook can
  still inspect them after `%tp leave`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as _dt
import email.utils
import errno
import inspect
import io
import itertools
import sys
import threading
import time
import traceback
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .errors import ConfigError

#: seconds an idle keep-alive connection stays open
KEEPALIVE_TIMEOUT = 75.0
#: largest request body we read into memory
MAX_BODY = 64 * 1024 * 1024
#: requests kept per server (older ones drop off)
LOG_SIZE = 2000
#: seconds `stop()` lets in-flight requests finish before closing their connections
STOP_GRACE = 5.0
SERVER_NAME = "tpnb-inkernel"

Listener = Callable[[dict], None]

_REASONS = {100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 301: "Moved Permanently",
            302: "Found", 304: "Not Modified", 400: "Bad Request", 404: "Not Found",
            405: "Method Not Allowed", 413: "Content Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable"}


def app_kind(app: object) -> str:
    """'asgi' or 'wsgi' (see the module docstring for the rule)."""
    if not callable(app):
        raise ConfigError(f"{app!r} is not a web application",
                          "a WSGI or ASGI app is a callable (a function, or an object such as Flask(...))",
                          "define `app` as a WSGI function `app(environ, start_response)` "
                          "or an ASGI one `async def app(scope, receive, send)`")
    if inspect.iscoroutinefunction(app):
        return "asgi"
    call = type(app).__call__ if not inspect.isroutine(app) else None  # an app object's method
    if call is not None and inspect.iscoroutinefunction(call):
        return "asgi"
    return "wsgi"


# ------------------------------------------------------------------ the loop thread
class _LoopThread:
    """The private event loop (and WSGI worker pool) shared by all in-kernel servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="tpnb-wsgi")
        ready = threading.Event()
        self.thread = threading.Thread(target=self._main, args=(ready,), name="tpnb-inkernel", daemon=True)
        self.thread.start()
        ready.wait()

    def _main(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        self.loop.run_forever()

    def run(self, coro: Any, timeout: float | None = 30.0) -> Any:
        """Run `coro` on the loop and wait for it (from any other thread)."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("tpnb.inkernel: blocking call from the server's own loop thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


_loop_lock = threading.Lock()
_loop: _LoopThread | None = None


def _the_loop() -> _LoopThread:
    global _loop
    with _loop_lock:
        if _loop is None or not _loop.thread.is_alive():
            _loop = _LoopThread()
        return _loop


# ------------------------------------------------------------------ app references
@dataclass(eq=False)
class _AppRef:
    """One version of the app.  Immutable once published; requests hold on to it."""

    app: Any
    kind: str
    version: int
    state: dict = field(default_factory=dict)  # ASGI lifespan state, copied into each scope
    inflight: int = 0
    lifespan_in: asyncio.Queue | None = None
    lifespan_out: asyncio.Queue | None = None


async def _lifespan_startup(ref: _AppRef) -> None:
    """Run the ASGI lifespan startup if the app speaks it; apps that raise are taken as "no lifespan"."""
    q_in: asyncio.Queue = asyncio.Queue()
    q_out: asyncio.Queue = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": ref.state}

    async def receive() -> dict:
        return await q_in.get()

    async def send(msg: dict) -> None:
        await q_out.put(msg)

    async def runner() -> None:
        try:
            await ref.app(scope, receive, send)
        except BaseException as exc:  # noqa: BLE001 - the spec: an app that raises has no lifespan
            await q_out.put({"type": "tpnb.raised", "exc": exc})
        else:
            await q_out.put({"type": "tpnb.returned"})

    asyncio.get_running_loop().create_task(runner())
    await q_in.put({"type": "lifespan.startup"})
    msg = await asyncio.wait_for(q_out.get(), 60)
    if msg["type"] == "lifespan.startup.complete":
        ref.lifespan_in, ref.lifespan_out = q_in, q_out
    elif msg["type"] == "lifespan.startup.failed":
        raise ConfigError("the ASGI app's startup failed", msg.get("message", "") or "lifespan.startup.failed",
                          "fix the app's startup/lifespan handler and re-run the cell")


async def _lifespan_shutdown(ref: _AppRef, wait_idle: float = 30.0) -> None:
    """Shut an old app version down once its in-flight requests are done."""
    if ref.lifespan_in is None or ref.lifespan_out is None:
        return
    deadline = time.monotonic() + wait_idle
    while ref.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await ref.lifespan_in.put({"type": "lifespan.shutdown"})
    try:
        await asyncio.wait_for(ref.lifespan_out.get(), 10)
    except asyncio.TimeoutError:
        pass
    ref.lifespan_in = ref.lifespan_out = None


# ------------------------------------------------------------------ HTTP plumbing
class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Request:
    method: str
    target: str
    version: str  # "1.0" / "1.1"
    headers: list[tuple[str, str]]  # as received (names in original case)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def split_target(self) -> tuple[str, str]:
        """(raw path, raw query) of the request target."""
        target = self.target
        if target.startswith(("http://", "https://")):  # absolute-form (proxies)
            parts = urllib.parse.urlsplit(target)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        path, _, query = target.partition("?")
        return path, query

    def wants_keepalive(self) -> bool:
        conn = (self.header("connection") or "").lower()
        if self.version == "1.1":
            return "close" not in conn
        return "keep-alive" in conn


def _parse_head(head: bytes) -> _Request:
    lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
    try:
        method, target, proto = lines[0].split(" ")
    except ValueError:
        raise _BadRequest(400, f"bad request line {lines[0][:80]!r}") from None
    if not proto.startswith("HTTP/1."):
        raise _BadRequest(400 if not proto.startswith("HTTP/") else 505, f"unsupported protocol {proto!r}")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t" or ":" not in line:
            raise _BadRequest(400, f"bad header line {line[:80]!r}")
        k, _, v = line.partition(":")
        headers.append((k.strip(), v.strip()))
    return _Request(method=method.upper(), target=target, version=proto[5:], headers=headers)


async def _read_body(req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    te = (req.header("transfer-encoding") or "").lower()
    cl = req.header("content-length")
    chunked = "chunked" in te
    if not chunked and cl is None:
        return b""
    if (req.header("expect") or "").lower() == "100-continue" and req.version == "1.1":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    if chunked:
        parts: list[bytes] = []
        total = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadRequest(400, "bad chunk size") from None
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_BODY:
                raise _BadRequest(413, "request body too large")
            parts.append(await reader.readexactly(size))
            if await reader.readexactly(2) != b"\r\n":
                raise _BadRequest(400, "bad chunk framing")
    try:
        n = int(cl or "0")
    except ValueError:
        raise _BadRequest(400, "bad Content-Length") from None
    if n < 0 or n > MAX_BODY:
        raise _BadRequest(413 if n > 0 else 400, "bad or too large Content-Length")
    return await reader.readexactly(n) if n else b""


def _head_bytes(version: str, status: int, reason: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/{version} {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _no_body_status(status: int) -> bool:
    return status < 200 or status in (204, 304)


def _status_reason(status: int) -> str:
    return _REASONS.get(status, "Unknown")


# ------------------------------------------------------------------ the server
class InKernelServer:
    """One HTTP server on one 127.0.0.1 port, serving the current app version."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        #: intercept names routed here (informational; several may share a port)
        self.names: set[str] = set()
        #: stop the server when its last intercept is left (true for `%%tp intercept` servers)
        self.stop_on_leave = False
        self.log: deque[dict] = deque(maxlen=LOG_SIZE)
        self.counters: dict[str, int] = {"requests": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0, "errors": 0}
        self.total_ms = 0.0
        self.started = _dt.datetime.now()
        self._ref: _AppRef | None = None
        self._versions = itertools.count(1)
        self._server: asyncio.base_events.Server | None = None
        self._conns: dict[asyncio.StreamWriter, bool] = {}  # writer -> busy with a request
        self._stopping = False
        self._listeners: list[Listener] = []
        self._lt = _the_loop()

    # ---------------------------------------------------------------- control (any thread but the loop's)
    @property
    def running(self) -> bool:
        return self._server is not None and not self._stopping

    @property
    def app(self) -> Any:
        return self._ref.app if self._ref else None

    @property
    def kind(self) -> str:
        return self._ref.kind if self._ref else ""

    @property
    def app_version(self) -> int:
        return self._ref.version if self._ref else 0

    def start(self) -> None:
        self._lt.run(self._start())

    def set_app(self, app: Any) -> int:
        """Publish a new app version (validates, runs ASGI startup, then swaps); returns its number."""
        kind = app_kind(app)
        return self._lt.run(self._set_app(app, kind), timeout=90)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Close the port now; let in-flight requests finish for up to `grace` seconds."""
        if self._server is None:
            return
        self._lt.run(self._stop(grace), timeout=grace + 15)

    def subscribe(self, fn: Listener) -> Callable[[], None]:
        """Call fn(record) on the loop thread after each request; returns an unsubscribe function."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def records(self) -> list[dict]:
        return [dict(r) for r in list(self.log)]

    def summary(self) -> dict:
        n = self.counters["requests"]
        return {"port": self.port, "names": sorted(self.names), "kind": self.kind, "app_version": self.app_version,
                "running": self.running, **self.counters,
                "avg_ms": round(self.total_ms / n, 2) if n else 0.0}

    # ---------------------------------------------------------------- loop side
    async def _start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._conn, self.host, self.port, reuse_address=True)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"{self.host}:{self.port} is already in use",
                                  "another program (or another kernel) listens on that port",
                                  "choose another --port, or stop the other server") from None
            raise ConfigError(f"cannot listen on {self.host}:{self.port}", exc.strerror or str(exc)) from None

    async def _set_app(self, app: Any, kind: str) -> int:
        ref = _AppRef(app=app, kind=kind, version=next(self._versions))
        if kind == "asgi":
            await _lifespan_startup(ref)
        old, self._ref = self._ref, ref  # the swap: the next request sees `ref`
        if old is not None and old.kind == "asgi":
            asyncio.get_running_loop().create_task(_lifespan_shutdown(old))
        return ref.version

    async def _stop(self, grace: float) -> None:
        self._stopping = True
        assert self._server is not None
        self._server.close()  # the listening socket closes now
        for w, busy in list(self._conns.items()):
            if not busy:
                w.close()
        deadline = time.monotonic() + grace
        while any(self._conns.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for w in list(self._conns):
            w.close()
        try:
            await asyncio.wait_for(self._server.wait_closed(), 5)
        except asyncio.TimeoutError:
            pass
        if self._ref is not None and self._ref.kind == "asgi":
            await _lifespan_shutdown(self._ref, wait_idle=0)
        self._server = None

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns[writer] = False
        peer = writer.get_extra_info("peername") or ("", 0)
        try:
            while not self._stopping:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), KEEPALIVE_TIMEOUT)
                except asyncio.LimitOverrunError:
                    await self._plain(writer, "1.1", 431, "request headers too large\n")
                    return
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    return
                self._conns[writer] = True
                try:
                    req = _parse_head(head)
                    req.body = await _read_body(req, reader, writer)
                except _BadRequest as bad:
                    await self._plain(writer, "1.1", bad.status, f"{bad}\n")
                    return
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                keep = await self._serve(req, writer, peer)
                self._conns[writer] = False
                if not keep:
                    return
        except Exception:  # noqa: BLE001 - one broken connection must not kill the server
            traceback.print_exc(file=sys.__stderr__)
        finally:
            self._conns.pop(writer, None)
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    async def _plain(self, writer: asyncio.StreamWriter, version: str, status: int, text: str) -> None:
        body = text.encode()
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                   ("Connection", "close")]
        try:
            writer.write(_head_bytes(version, status, _status_reason(status), headers) + body)
            await writer.drain()
        except ConnectionError:
            pass

    async def _serve(self, req: _Request, writer: asyncio.StreamWriter, peer: tuple) -> bool:
        """Answer one request; True to keep the connection open.

        The request is logged just before its last bytes are written, so a client that
        got its answer always finds the request in the log.
        """
        t0 = time.perf_counter()
        when = _dt.datetime.now()
        ref = self._ref  # read once: this request stays on this app version
        keep = req.wants_keepalive() and not self._stopping
        logged = False

        def log(status: int, nbytes: int, error: str | None) -> None:
            nonlocal logged
            if not logged:
                logged = True
                self._record(when, req, status, (time.perf_counter() - t0) * 1000, nbytes, peer, ref, error)

        if ref is None:
            log(503, 0, "no app")
            await self._plain(writer, req.version, 503, "no app is being served on this port yet\n")
            return False
        ref.inflight += 1
        try:
            if ref.kind == "wsgi":
                status, nbytes, keep, error = await self._wsgi(ref, req, writer, peer, keep, log)
            else:
                status, nbytes, keep, error = await self._asgi(ref, req, writer, peer, keep, log)
        finally:
            ref.inflight -= 1
        log(status, nbytes, error)
        return keep

    def _record(self, when: _dt.datetime, req: _Request, status: int, ms: float, nbytes: int,
                peer: tuple, ref: _AppRef | None, error: str | None) -> None:
        path, query = req.split_target()
        rec = {"time": when.isoformat(timespec="milliseconds"), "method": req.method,
               "path": urllib.parse.unquote(path), "query": urllib.parse.unquote(query), "status": status,
               "duration_ms": round(ms, 2), "bytes": nbytes, "client": f"{peer[0]}:{peer[1]}",
               "port": self.port, "app_version": ref.version if ref else 0, "error": error}
        self.log.append(rec)
        self.counters["requests"] += 1
        self.counters[f"{min(max(status // 100, 2), 5)}xx"] += 1
        if error:
            self.counters["errors"] += 1
        self.total_ms += ms
        for fn in list(self._listeners):
            try:
                fn(rec)
            except Exception:  # noqa: BLE001 - a broken listener must not break serving
                pass

    def _report_app_error(self, req: _Request, exc: BaseException) -> str:
        """Show the user's traceback (without our frames) on stderr; return its one-line summary."""
        te = traceback.TracebackException.from_exception(exc)
        te.stack = traceback.StackSummary.from_list(
            [f for f in te.stack if f.filename != __file__ and "concurrent/futures" not in f.filename])
        text = "".join(te.format()).rstrip()
        names = ",".join(sorted(self.names)) or f"port {self.port}"
        print(f"tpnb [{names}]: the app raised while serving {req.method} {req.target}:\n{text}",
              file=sys.stderr, flush=True)
        return "".join(te.format_exception_only()).strip()

    # ---------------------------------------------------------------- WSGI
    def _environ(self, req: _Request, peer: tuple) -> dict:
        path, query = req.split_target()
        env: dict[str, Any] = {
            "REQUEST_METHOD": req.method, "SCRIPT_NAME": "",
            "PATH_INFO": urllib.parse.unquote(path, encoding="latin-1"), "QUERY_STRING": query,
            "SERVER_NAME": self.host, "SERVER_PORT": str(self.port), "SERVER_PROTOCOL": f"HTTP/{req.version}",
            "REMOTE_ADDR": str(peer[0]), "REMOTE_PORT": str(peer[1]), "SERVER_SOFTWARE": SERVER_NAME,
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(req.body),
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
            "wsgi.run_once": False, "CONTENT_LENGTH": str(len(req.body)) if req.body else "",
        }
        for k, v in req.headers:
            key = k.upper().replace("-", "_")
            if key == "CONTENT_TYPE":
                env["CONTENT_TYPE"] = v
            elif key in ("CONTENT_LENGTH", "TRANSFER_ENCODING"):
                continue  # the body is already de-chunked and counted
            else:
                hk = f"HTTP_{key}"
                env[hk] = f"{env[hk]},{v}" if hk in env else v
        return env

    @staticmethod
    def _call_wsgi(app: Any, environ: dict) -> tuple[str, list[tuple[str, str]], bytes]:
        """Runs on a pool thread: call the app and collect its whole response."""
        state: dict[str, Any] = {}
        chunks: list[bytes] = []

        def start_response(status: str, headers: list, exc_info: Any = None) -> Callable[[bytes], None]:
            if exc_info and state.get("status") and chunks:
                raise exc_info[1].with_traceback(exc_info[2])
            state["status"], state["headers"] = status, list(headers)
            return chunks.append

        result: Iterable[bytes] = app(environ, start_response)
        try:
            for data in result:
                if data:
                    chunks.append(bytes(data))
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if "status" not in state:
            raise RuntimeError("the WSGI app returned without calling start_response()")
        return state["status"], state["headers"], b"".join(chunks)

    async def _wsgi(self, ref: _AppRef, req: _Request, writer: asyncio.StreamWriter, peer: tuple,
                    keep: bool, log: Callable[[int, int, str | None], None]) -> tuple[int, int, bool, str | None]:
        loop = asyncio.get_running_loop()
        try:
            status_line, headers, body = await loop.run_in_executor(
                self._lt.pool, self._call_wsgi, ref.app, self._environ(req, peer))
            status = int(status_line.split(" ", 1)[0])
            reason = status_line.split(" ", 1)[1] if " " in status_line else _status_reason(status)
        except Exception as exc:  # noqa: BLE001 - the user's app raised: 500, and show them why
            error = self._report_app_error(req, exc)
            log(500, 0, error)
            await self._plain(writer, req.version, 500, "Internal Server Error\n")
            return 500, 0, False, error
        out = [(k, v) for k, v in headers if k.lower() not in ("content-length", "transfer-encoding", "connection")]
        if not _no_body_status(status):
            out.append(("Content-Length", str(len(body))))
        else:
            body = b""
        out += self._std_headers(req, keep, out)
        payload = b"" if req.method == "HEAD" else body
        log(status, len(payload), None)
        try:
            writer.write(_head_bytes(req.version, status, reason, out) + payload)
            await writer.drain()
        except ConnectionError:
            return status, 0, False, "client disconnected"
        return status, len(payload), keep, None

    @staticmethod
    def _std_headers(req: _Request, keep: bool, have: list[tuple[str, str]]) -> list[tuple[str, str]]:
        names = {k.lower() for k, _ in have}
        extra = []
        if "date" not in names:
            extra.append(("Date", email.utils.formatdate(usegmt=True)))
        if "server" not in names:
            extra.append(("Server", SERVER_NAME))
        if not keep:
            extra.append(("Connection", "close"))
        elif req.version == "1.0":
            extra.append(("Connection", "keep-alive"))
        return extra

    # ---------------------------------------------------------------- ASGI
    def _scope(self, ref: _AppRef, req: _Request, peer: tuple) -> dict:
        path, query = req.split_target()
        return {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": req.version,
            "method": req.method, "scheme": "http", "path": urllib.parse.unquote(path),
            "raw_path": path.encode("latin-1"), "query_string": query.encode("latin-1"), "root_path": "",
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in req.headers],
            "client": (str(peer[0]), int(peer[1])) if peer and len(peer) >= 2 else None,
            "server": (self.host, self.port), "state": dict(ref.state),
        }

    async def _asgi(self, ref: _AppRef, req: _Request, writer: asyncio.StreamWriter, peer: tuple,
                    keep: bool, log: Callable[[int, int, str | None], None]) -> tuple[int, int, bool, str | None]:
        done = asyncio.Event()
        st: dict[str, Any] = {"status": 500, "headers": [], "started": False, "mode": None, "bytes": 0,
                              "body_given": False, "keep": keep}
        is_head = req.method == "HEAD"

        async def receive() -> dict:
            if not st["body_given"]:
                st["body_given"] = True
                return {"type": "http.request", "body": req.body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        def write_head(extra: list[tuple[str, str]]) -> None:
            hdrs = [(k, v) for k, v in st["headers"] if k.lower() not in ("connection",)] + extra
            hdrs += self._std_headers(req, st["keep"], hdrs)
            writer.write(_head_bytes(req.version, st["status"], _status_reason(st["status"]), hdrs))

        async def send(msg: dict) -> None:
            t = msg["type"]
            if t == "http.response.start":
                if st["started"]:
                    raise RuntimeError("http.response.start sent twice")
                st["started"] = True
                st["status"] = int(msg["status"])
                st["headers"] = [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1"))
                                 for k, v in msg.get("headers", [])]
                return
            if t != "http.response.body" or done.is_set():
                return
            if not st["started"]:
                raise RuntimeError("http.response.body before http.response.start")
            data = bytes(msg.get("body", b""))
            more = bool(msg.get("more_body", False))
            if not is_head and data:
                st["bytes"] += len(data)
            if not more:  # log before the last bytes leave (see _serve)
                log(st["status"], st["bytes"], None)
            if st["mode"] is None:
                names = {k.lower() for k, _ in st["headers"]}
                if "content-length" in names or _no_body_status(st["status"]):
                    st["mode"] = "length"
                    write_head([])
                elif not more:
                    st["mode"] = "length"
                    write_head([("Content-Length", str(len(data)))])
                elif req.version == "1.1":
                    st["mode"] = "chunked"
                    write_head([("Transfer-Encoding", "chunked")])
                else:  # HTTP/1.0 streaming: the end of the body is the end of the connection
                    st["mode"], st["keep"] = "close", False
                    write_head([])
            if not is_head and data:
                writer.write(b"%x\r\n%s\r\n" % (len(data), data) if st["mode"] == "chunked" else data)
            if not more:
                if st["mode"] == "chunked" and not is_head:
                    writer.write(b"0\r\n\r\n")
                done.set()
            await writer.drain()

        error = None
        try:
            await ref.app(self._scope(ref, req, peer), receive, send)
        except Exception as exc:  # noqa: BLE001 - the user's app raised
            error = self._report_app_error(req, exc)
            if not st["started"] or st["mode"] is None:
                done.set()
                log(500, 0, error)
                await self._plain(writer, req.version, 500, "Internal Server Error\n")
                return 500, 0, False, error
            st["keep"] = False  # the response is cut short: closing tells the client
        if not done.is_set():
            if not st["started"]:
                done.set()
                log(500, 0, "no response")
                await self._plain(writer, req.version, 500, "the ASGI app sent no response\n")
                return 500, 0, False, "no response"
            try:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except ConnectionError:
                st["keep"] = False
        return st["status"], st["bytes"], st["keep"], error


# ------------------------------------------------------------------ registry: one server per port
_lock = threading.RLock()
_servers: dict[int, InKernelServer] = {}
_logs_by_name: dict[str, InKernelServer] = {}  # last server per intercept name (kept after stop)


def serve(app: Any, port: int, name: str | None = None, host: str = "127.0.0.1",
          stop_on_leave: bool = False) -> InKernelServer:
    """Serve `app` on host:port in this kernel; if a server already runs there, swap its app."""
    app_kind(app)  # validate before touching the port
    with _lock:
        srv = _servers.get(port)
        fresh = srv is None or not srv.running
        if fresh:
            srv = InKernelServer(port, host)
            srv.start()
        assert srv is not None
        try:
            srv.set_app(app)
        except BaseException:
            if fresh:
                srv.stop(grace=0)
            raise
        _servers[port] = srv
        srv.stop_on_leave = srv.stop_on_leave or stop_on_leave
        if name:
            attach(name, port)
        return srv


def get_server(port: int) -> InKernelServer | None:
    with _lock:
        srv = _servers.get(port)
        return srv if srv is not None and srv.running else None


def servers() -> list[InKernelServer]:
    with _lock:
        return [s for s in _servers.values() if s.running]


def server_for(name: str) -> InKernelServer | None:
    """The running server an intercept name is attached to, if any."""
    with _lock:
        srv = _logs_by_name.get(name)
        return srv if srv is not None and srv.running else None


def attach(name: str, port: int) -> InKernelServer | None:
    """Record that intercept `name` routes to `port`; returns that port's server if it is in-kernel."""
    with _lock:
        srv = get_server(port)
        if srv is not None:
            srv.names.add(name)
            _logs_by_name[name] = srv
        return srv


def release(name: str) -> bool:
    """The intercept `name` ended: detach it; stop its server when it was the intercept's own.

    Returns True when a server was stopped.
    """
    with _lock:
        srv = _logs_by_name.get(name)
        if srv is None or not srv.running:
            return False
        srv.names.discard(name)
        if srv.stop_on_leave and not srv.names:
            stop(srv.port)
            return True
        return False


def stop(port: int, grace: float = STOP_GRACE) -> bool:
    with _lock:
        srv = _servers.pop(port, None)
    if srv is None:
        return False
    srv.stop(grace)
    return True


def stop_all(grace: float = 1.0) -> None:
    for port in list(_servers):
        try:
            stop(port, grace)
        except Exception:  # noqa: BLE001 - shutting down: best effort for each
            pass


def requests_log(name: str | int) -> list[dict]:
    """Requests served in-kernel for intercept `name` (or port number), oldest first; plain dicts."""
    with _lock:
        srv = _servers.get(name) if isinstance(name, int) else _logs_by_name.get(name)
    return srv.records() if srv is not None else []
