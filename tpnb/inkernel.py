"""Serve a notebook's WSGI or ASGI app from inside the Jupyter kernel, on uvicorn.

`%%tp intercept hello --port 9000` runs the cell, finds its `app`, and serves
it here on 127.0.0.1:9000; the intercept then routes the cluster's traffic to
that port.  Design decisions, and why:

* **uvicorn does the HTTP** (with httptools' parser; websockets through the
  `websockets` package; `h11` when httptools is missing): keep-alive,
  pipelining, `Expect: 100-continue`, chunked and large bodies streamed to the
  app, streaming responses and SSE, websockets.  It is what FastAPI/Starlette
  apps are developed against, so an app behaves here as it will in
  production.  uvicorn has no HTTP/2 (hypercorn has, but is slower and less
  used; the intercept's agent speaks HTTP/1.1 to us anyway).  **WSGI apps**
  (Flask, Django's WSGIHandler, plain functions) run through `a2wsgi`'s
  WSGIMiddleware (a maintained WSGI-to-ASGI adapter with a thread pool per
  app version, so a blocking view never stalls the loop).
* **One background thread with its own asyncio loop** serves every in-kernel
  port (each port is one `uvicorn.Server` task on it).  The kernel's own loop
  is busy while a cell runs (a cell may sleep, train a model, or block on
  input for minutes), so serving on it would stall the cluster's requests.
  uvicorn installs signal handlers only on the main thread, so it leaves the
  kernel's alone, and we pass `log_config=None` so it does not touch the
  kernel's logging.
* **One server per port; re-running the cell swaps the app.**  uvicorn serves
  one fixed ASGI callable: ours (`InKernelServer._asgi`), which reads the
  current app reference once per request or websocket session and calls it.
  Publishing a new version is one assignment on the loop thread, so an
  in-flight request finishes on the app it started with, the next one sees
  the new app, and no connection is closed: zero failed requests.  The ASGI
  lifespan protocol is run by us per app version (uvicorn's is off): the new
  version starts up before it is swapped in, the old one shuts down once its
  in-flight requests are done.  Apps that raise in lifespan have none (spec).
* ASGI is detected the way servers do it: `inspect.iscoroutinefunction(app)`
  or of `app.__call__` (Starlette, FastAPI, Django's ASGIHandler); anything
  else callable is WSGI.
* **Every request is recorded** (time, method, path, status, duration, bytes,
  app version, client, intercept, request/response headers, the first
  `BODY_KEEP` bytes of both bodies) and every websocket session (status 101,
  its duration and message counts) in a bounded deque (`LOG_SIZE`), just
  before the response's last bytes are handed to uvicorn: a client that got
  its answer finds its request in the log.  Logs outlive the server so a
  notebook can still inspect them after `%tp leave`.  The hot path keeps the
  record raw (a perf_counter reading, the scope's own byte headers,
  references to the body chunks, no copies: bytes are immutable) and
  `public_record` decodes it only when somebody reads it (`requests_log`, the
  panel).  An HTTP request is one object with slots (`_HttpRec`) that is both
  the layer's per-request state and, once answered, the record; its `send`
  is a plain function returning uvicorn's own coroutine, so no coroutine of
  ours sits between the app and uvicorn.  None of its attributes has a
  class-level default (CPython 3.12 does not specialize an attribute access
  that a class attribute of the same name shadows), and the counters are
  per-status tallies summed when read.  The layer costs ~3.5-4.3 µs a request
  in `bench/inkernel_layer.py` (~16,000 instructions; was ~6 µs and ~22,400);
  in a real server, on the minimal app, ~12 µs of CPU against a direct call
  of the app (was ~15; `bench/inkernel_cpu.py`).  Followers get each record
  by push:
  `subscribe` (one server) and `watch` (every server, the panel).
* **The kernel's heap is frozen for the garbage collector** (`gc.freeze`,
  `GC_FREEZE`) while servers run: a kernel holds several times the objects of
  a plain uvicorn process (IPython, jedi, zmq, the notebook's data), and a
  server's allocations start a full (gen-2) pass after every tenth gen-1
  pass, each walking all of them: for FastAPI ~170 ms of gen-2 passes per 3 s
  of load (pauses up to ~75 ms: the p99) against ~12 ms frozen
  (`bench/inkernel_gc.py`).
  Each `serve` (a cell run) unfreezes, collects once and freezes again, so
  what became garbage since (an old app version, a deleted variable) is
  collected then; cyclic garbage among frozen objects waits for the next
  `serve` or the last server's stop (which unfreezes).
* **The loop runs `run_until_complete(<a task that never ends>)`**, not
  `run_forever()`: anyio (FastAPI's/Starlette's thread pool for sync routes)
  ties its worker threads to the loop's root task and finds it as the task
  run_until_complete waits for; under run_forever it took each request's task
  instead, so every sync-route request started (and stopped) a thread.
* **A gRPC servicer** (`serve_grpc`) runs on a `grpc.aio` server in the same
  loop thread; its handlers are looked up per call through one generic
  handler, so re-running the cell swaps the servicer the same way.  Which
  objects are servicers (`grpc_registrations`): an instance of a class derived
  from a generated `FooServicer` (its module's `add_FooServicer_to_server` is
  run against a stand-in server that keeps the handlers), a `(servicer,
  add_fn)` pair, or a list of those.  This reuses the generated code exactly
  as a normal server would, and needs no tpnb-specific decorator in the cell.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import errno
import gc
import inspect
import itertools
import logging
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from collections import defaultdict, deque
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Callable

from .errors import ConfigError

#: seconds an idle keep-alive connection stays open
KEEPALIVE_TIMEOUT = 75.0
#: requests kept per server (older ones drop off)
LOG_SIZE = 2000
#: bytes of each request and response body kept in a record
BODY_KEEP = 16 * 1024
#: seconds `stop()` lets in-flight requests finish before closing their connections
STOP_GRACE = 5.0
#: threads of a WSGI app version's pool (a2wsgi)
WSGI_WORKERS = 16
#: largest websocket message (uvicorn's default is 16 MiB)
WS_MAX_SIZE = 16 * 1024 * 1024
#: keep the kernel's own objects out of the cyclic garbage collector's passes while in-kernel servers run
#: (`gc.freeze`, see the module docstring); False leaves the collector alone
GC_FREEZE = True

Listener = Callable[[dict], None]


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
    """The private event loop shared by all in-kernel servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._main, args=(ready,), name="tpnb-inkernel", daemon=True)
        self.thread.start()
        ready.wait()

    def _main(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        # run_until_complete of one task that lives as long as the loop, not run_forever: anyio (FastAPI's
        # and Starlette's thread pool for sync routes) ties its worker threads to the loop's root task,
        # which it finds as the task run_until_complete waits for.  Under run_forever there is none, so it
        # took each request's own task: a new thread per request of a sync route, stopped when the request
        # ended (half of FastAPI's throughput, bench/inkernel.py).
        self.loop.run_until_complete(self._root())

    async def _root(self) -> None:
        await asyncio.get_running_loop().create_future()  # never done: the thread lives with the process

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


class _StderrHandler(logging.Handler):
    """uvicorn's warnings and errors as one line on the current stderr (the cell's, in a kernel)."""

    #: messages that only say what `stop(grace)` asked for
    QUIET = ("timeout graceful shutdown exceeded",)

    def emit(self, record: logging.LogRecord) -> None:
        if any(q in str(record.msg) for q in self.QUIET):
            return
        try:
            print(f"tpnb in-kernel server: {record.getMessage()}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging must never break serving
            pass


def _quiet_uvicorn() -> None:
    """uvicorn's own loggers: no access log (we keep records), warnings+ as short lines, no propagation."""
    lg = logging.getLogger("uvicorn.error")
    if not any(isinstance(h, _StderrHandler) for h in lg.handlers):
        lg.addHandler(_StderrHandler())
    lg.setLevel(logging.WARNING)
    lg.propagate = False
    acc = logging.getLogger("uvicorn.access")
    acc.propagate = False
    acc.disabled = True


# ------------------------------------------------------------------ app references
@dataclass(eq=False, slots=True)
class _AppRef:
    """One version of the app.  Immutable once published; requests hold on to it.

    Slots: each request reads `asgi`, `version`, `state` and counts `inflight`; a dataclass default
    without slots is a class attribute, which keeps CPython from specializing those accesses.
    """

    app: Any
    kind: str  # "asgi" | "wsgi"
    version: int
    asgi: Any = None  # what is called: the app, or a2wsgi's wrapper of it
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


async def _retire(ref: _AppRef, wait_idle: float = 30.0) -> None:
    """An old app version: once its in-flight requests are done, shut it down (lifespan / thread pool)."""
    deadline = time.monotonic() + wait_idle
    while ref.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if ref.lifespan_in is not None and ref.lifespan_out is not None:
        await ref.lifespan_in.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(ref.lifespan_out.get(), 10)
        except asyncio.TimeoutError:
            pass
        ref.lifespan_in = ref.lifespan_out = None
    pool = getattr(ref.asgi, "executor", None) if ref.kind == "wsgi" else None
    if pool is not None:
        pool.shutdown(wait=False)


def _headers(raw: Any) -> list[tuple[str, str]]:
    return [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in raw or ()]


class _Body:
    """A body of several chunks (or a first one that is long or a mutable buffer) as a record keeps it: its
    size, and its first BODY_KEEP bytes as chunks (bytes are immutable: a chunk that fits is kept by
    reference, not copied), joined when read."""

    __slots__ = ("parts", "n", "kept")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.n = self.kept = 0

    def add(self, data: Any) -> None:
        self.n += len(data)
        if self.kept < BODY_KEEP:
            if type(data) is not bytes or len(data) > BODY_KEEP - self.kept:  # a buffer the app may reuse, or long
                data = bytes(data[:BODY_KEEP - self.kept])
            self.parts.append(data)
            self.kept += len(data)


def _joined(body: Any) -> bytes:
    """A kept body (None, one bytes chunk, or a `_Body`) as bytes."""
    if body is None:
        return b""
    if type(body) is _Body:
        return b"".join(body.parts)
    return body


def _size(body: Any) -> int:
    if body is None:
        return 0
    return body.n if type(body) is _Body else len(body)


#: status // 100 -> the counter it goes to (1xx and other oddities count as 2xx, 6xx+ as 5xx)
_CLASS = ("2xx", "2xx", "2xx", "3xx", "4xx") + ("5xx",) * 6


class _HttpRec:
    """One HTTP request: the layer's state while it is served, then (once answered) its raw log record.

    This is the whole per-request cost of the layer (`bench/inkernel_layer.py`), so the hot path does as
    little as it can and `public_record` does the rest, only for the records somebody reads:
    * one object with slots, no closures, made by `_http_rec`; `send` is a plain function that returns
      uvicorn's own coroutine, so the app awaits uvicorn's send directly (no extra coroutine per message);
    * of the scope only what a record shows is kept, as one tuple `req` (method, path, query string,
      headers, client, HTTP version; the header list is uvicorn's own, not copied): as cheap as a shallow
      copy of the scope, and a record keeps ~0.7 KB alive instead of ~1.4 KB (the copy also held uvicorn's
      per-request `asgi` and `state` dicts).  With `LOG_SIZE` records kept, what each holds is memory
      the server's allocations keep missing in cache: in one run of alternating rounds the tuple took
      ~2 µs of CPU off each request of the minimal app (~42 -> ~40 µs, standalone uvicorn ~34);
    * the usual one-chunk response body is kept as is (bytes are immutable) and its size is its length;
      only a body of several chunks is counted as it goes (`_more`);
    * the duration is two perf_counter readings, subtracted when read.
    Every field is a slot and no slot has a class-level default: CPython 3.12 specializes an attribute
    access only when the class has no attribute of that name (a slot's descriptor excepted), and the
    unspecialized ones were half of the layer's instructions.
    """

    __slots__ = ("t0", "t1", "srv", "version", "req", "sh", "rb", "sb", "status", "error", "seq", "intercept",
                 "_send", "_receive")
    type = "http"

    async def receive(self) -> dict:
        msg = await self._receive()
        if msg["type"] == "http.request":
            data = msg.get("body")
            if data:
                if self.rb is None:
                    self.rb = _Body()
                self.rb.add(data)
        return msg

    def send(self, msg: dict) -> Any:
        send = self._send  # finish() lets go of it
        if msg["type"] == "http.response.body":
            data = msg.get("body")
            if data:
                if self.sb is None and type(data) is bytes and len(data) <= BODY_KEEP:
                    self.sb = data  # the usual one-chunk body
                else:
                    self._more(data)
            if not msg.get("more_body"):
                self.finish(self.status or 500, None)  # before the last bytes leave (module docstring)
        elif msg["type"] == "http.response.start":
            self.status, self.sh = msg["status"], msg.get("headers")
        return send(msg)

    def _more(self, data: Any) -> None:
        """A body chunk past the first (or a first one that is long or a mutable buffer): count it, keep what
        fits in BODY_KEEP."""
        sb = self.sb
        if type(sb) is not _Body:
            self.sb = body = _Body()
            if sb is not None:  # the first chunk, kept whole by `send`
                body.add(sb)
            sb = body
        sb.add(data)

    def finish(self, status: int, error: str | None) -> None:
        """Answered (or failed): the record is complete; log and count it (on the loop thread)."""
        if self.t1:
            return
        self.t1 = t1 = perf_counter()
        self.status = status
        self.error = error
        self._send = self._receive = None  # do not keep uvicorn's connection objects alive in the log
        srv = self.srv
        self.intercept = min(srv.names) if srv.names else ""
        srv.log.append(self)  # a bounded deque: the oldest record drops off
        self.seq = next(srv._seq)  # this server's request number (`by_seq`)
        srv._by_status[status] += 1  # the counters are summed from these when read
        if error:
            srv._errors += 1
        srv._busy += t1 - self.t0
        if srv._listeners or _watchers:
            srv._notify(self)

    def get(self, key: str, default: Any = None) -> Any:  # the field lookups the log's readers make
        return getattr(self, key, default)


def _http_rec(srv: "InKernelServer", version: int, scope: dict, receive: Callable, send: Callable) -> _HttpRec:
    """A new request's record.  A function rather than `__init__`: calling a class whose `__init__` is
    Python goes through C (type call, slot wrapper) where a Python-to-Python call does not."""
    r = _HttpRec()
    r.t0 = perf_counter()
    r.t1 = 0.0  # perf_counter() when answered; 0.0 while in flight
    r.srv = srv
    r.version = version
    r.req = (scope["method"], scope["path"], scope["query_string"], scope["headers"], scope["client"],
             scope["http_version"])
    r._receive = receive
    r._send = send
    r.sh = r.rb = r.sb = None  # response headers; request/response body kept (None, bytes or a _Body)
    r.status = 0
    return r  # error, seq and intercept are set by finish(), before anybody can read the record


def _query(qs: Any) -> str:
    return urllib.parse.unquote(bytes(qs).decode("latin-1")) if qs else ""


def _client(client: Any) -> str:
    client = client or ("", 0)
    return f"{client[0]}:{client[1]}"


def _wall(t0: float) -> str:
    return _dt.datetime.fromtimestamp(_WALL0 + t0).isoformat(timespec="milliseconds")


#: time.time() - perf_counter(): records keep only a perf_counter() reading, the wall time is derived when read
_WALL0 = time.time() - perf_counter()


def public_record(rec: Any) -> dict:
    """A record as users see it (`requests_log`, listeners, the panel).

    Served requests are recorded raw on the hot path (`_HttpRec`; websocket sessions as a dict with "_t"):
    decoding headers, formatting the time and joining bodies happen here, only for the records somebody
    reads.  gRPC records are built in this form already.
    """
    if type(rec) is _HttpRec:
        r = rec
        method, path, qs, req_headers, client, http_version = rec.req
        return {"time": _wall(r.t0), "type": "http", "method": method, "path": path,
                "query": _query(qs), "status": r.status, "duration_ms": round((r.t1 - r.t0) * 1000, 2),
                "bytes": _size(r.sb), "client": _client(client), "port": r.srv.port, "app_version": r.version,
                "error": r.error, "intercept": r.intercept, "http_version": http_version,
                "request_headers": _headers(req_headers), "request_body": _joined(r.rb),
                "request_bytes": _size(r.rb), "response_headers": _headers(r.sh), "response_body": _joined(r.sb),
                "seq": r.seq}
    if "_t" not in rec:
        out = dict(rec)
        out["duration_ms"] = round(out.get("duration_ms") or 0.0, 2)
        return out
    out = {k: v for k, v in rec.items() if k[0] != "_"}
    out["time"] = _dt.datetime.fromtimestamp(rec["_t"]).isoformat(timespec="milliseconds")
    out["duration_ms"] = round(rec["duration_ms"], 2)
    out["query"] = _query(rec["_qs"])
    out["client"] = _client(rec["_client"])
    out["request_headers"] = _headers(rec["_rh"])
    out["request_body"] = _joined(rec["_rb"])
    out["response_headers"] = _headers(rec["_sh"])
    out["response_body"] = _joined(rec["_sb"])
    return out


# ------------------------------------------------------------------ the server
def _init_tallies(srv: Any) -> None:
    """A server's tallies behind `counters` and `total_ms`, shaped to be cheap to update per request (a
    record's `finish`): the sums and the status classes are made when somebody reads them."""
    srv._seq = itertools.count(1)  # request numbers ("seq")
    srv._by_status = defaultdict(int)  # status -> requests answered with it (websockets, gRPC calls included)
    srv._errors = 0
    srv._websockets = 0
    srv._busy = 0.0  # seconds spent answering, summed over requests


def _counters(srv: Any) -> dict[str, int]:
    """Requests (websocket sessions and gRPC calls included) by status class, errors, websocket sessions."""
    c = {"requests": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0, "errors": srv._errors, "websockets": srv._websockets}
    for status, n in list(srv._by_status.items()):
        c["requests"] += n
        c[_CLASS[max(status // 100, 0)] if status < 1100 else "5xx"] += n
    return c


class InKernelServer:
    """One uvicorn server on one 127.0.0.1 port, serving the current app version."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        #: intercept names routed here (informational; several may share a port)
        self.names: set[str] = set()
        #: stop the server when its last intercept is left (true for `%%tp intercept` servers)
        self.stop_on_leave = False
        self.log: deque[dict] = deque(maxlen=LOG_SIZE)
        _init_tallies(self)
        self.started = _dt.datetime.now()
        #: websocket sessions open now
        self.ws_open = 0
        self._ref: _AppRef | None = None
        self._versions = itertools.count(1)
        self._uv: Any = None  # uvicorn.Server
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._listeners: list[Listener] = []
        self._lt = _the_loop()

    # ---------------------------------------------------------------- control (any thread but the loop's)
    counters = property(_counters)
    total_ms = property(lambda self: self._busy * 1000)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    @property
    def app(self) -> Any:
        return self._ref.app if self._ref else None

    @property
    def kind(self) -> str:
        return self._ref.kind if self._ref else ""

    @property
    def app_version(self) -> int:
        return self._ref.version if self._ref else 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        sock = self._bind()
        try:
            self._lt.run(self._start(sock))
        except BaseException:
            sock.close()
            raise

    def set_app(self, app: Any) -> int:
        """Publish a new app version (validates, runs ASGI startup, then swaps); returns its number."""
        kind = app_kind(app)
        return self._lt.run(self._set_app(app, kind), timeout=90)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Close the port now; let in-flight requests finish for up to `grace` seconds."""
        if self._task is None:
            return
        self._lt.run(self._stop(grace), timeout=grace + 15)

    def subscribe(self, fn: Listener) -> Callable[[], None]:
        """Call fn(record) on the loop thread after each request; returns an unsubscribe function."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def records(self) -> list[dict]:
        return [public_record(r) for r in list(self.log)]

    def recent(self, n: int) -> list[dict]:
        """The last `n` records, oldest first (public form)."""
        log = self.log
        k = min(n, len(log))
        return [public_record(log[i]) for i in range(len(log) - k, len(log))] if k else []

    def by_seq(self, seq: int) -> dict | None:
        """The record of this server's request number `seq` (its "seq" field) while the log still has it."""
        log = list(self.log)
        i = len(log) - 1 - (self.counters["requests"] - seq)
        if 0 <= i < len(log) and log[i].get("seq") == seq:
            return public_record(log[i])
        return next((public_record(r) for r in reversed(log) if r.get("seq") == seq), None)

    def summary(self) -> dict:
        n = self.counters["requests"]
        return {"port": self.port, "names": sorted(self.names), "kind": self.kind, "app_version": self.app_version,
                "running": self.running, **self.counters, "ws_open": self.ws_open,
                "avg_ms": round(self.total_ms / n, 2) if n else 0.0}

    # ---------------------------------------------------------------- loop side
    def _bind(self) -> socket.socket:
        # proto IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on sockets that say so, and without it
        # a response written as head + body waits ~40 ms for the client's delayed ACK (Nagle)
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM,
                             socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets
        try:
            sock.bind((self.host, self.port))
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"{self.host}:{self.port} is already in use",
                                  "another program (or another kernel) listens on that port",
                                  "choose another --port, or stop the other server") from None
            raise ConfigError(f"cannot listen on {self.host}:{self.port}", exc.strerror or str(exc)) from None
        sock.setblocking(False)
        return sock

    async def _start(self, sock: socket.socket) -> None:
        import uvicorn

        _quiet_uvicorn()
        config = uvicorn.Config(self._asgi, log_config=None, access_log=False, lifespan="off",
                                proxy_headers=False, interface="asgi3", timeout_keep_alive=int(KEEPALIVE_TIMEOUT),
                                timeout_graceful_shutdown=int(STOP_GRACE), ws_max_size=WS_MAX_SIZE,
                                backlog=1024, log_level="warning")
        self._uv = uvicorn.Server(config)
        self._task = asyncio.get_running_loop().create_task(self._uv.serve(sockets=[sock]))
        deadline = time.monotonic() + 20
        while not self._uv.started and not self._task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if not self._uv.started:
            self._uv.should_exit = True
            exc = self._task.exception() if self._task.done() else None
            raise ConfigError(f"the in-kernel server on {self.host}:{self.port} did not start",
                              str(exc) if exc else "uvicorn did not report that it started")

    async def _set_app(self, app: Any, kind: str) -> int:
        ref = _AppRef(app=app, kind=kind, version=next(self._versions))
        if kind == "asgi":
            ref.asgi = app
            await _lifespan_startup(ref)
        else:
            from a2wsgi import WSGIMiddleware

            ref.asgi = WSGIMiddleware(app, workers=WSGI_WORKERS)
        old, self._ref = self._ref, ref  # the swap: the next request sees `ref`
        if old is not None:
            asyncio.get_running_loop().create_task(_retire(old))
        return ref.version

    async def _stop(self, grace: float) -> None:
        self._stopping = True
        if self._uv is not None:
            self._uv.config.timeout_graceful_shutdown = grace
            self._uv.should_exit = True  # uvicorn closes the port on its next tick (0.1 s)
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace + 5)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - stopping: it is gone either way
                if self._uv is not None:
                    self._uv.force_exit = True
                self._task.cancel()
        if self._ref is not None:
            await _retire(self._ref, wait_idle=0)

    # ---------------------------------------------------------------- the one ASGI app uvicorn serves
    async def _asgi(self, scope: dict, receive: Callable, send: Callable) -> None:
        ref = self._ref  # read once: this request stays on this app version
        if ref is None or scope["type"] != "http":
            if scope["type"] == "websocket":
                await self._websocket(scope, receive, send)
            elif scope["type"] == "http":
                await self._no_app(scope, receive, send)
            return
        r = _http_rec(self, ref.version, scope, receive, send)
        if ref.state:  # this version's lifespan state, a shallow copy per request (spec); uvicorn's is empty
            scope["state"] = ref.state.copy()
        ref.inflight += 1
        try:
            await ref.asgi(scope, r.receive, r.send)
        except Exception as exc:  # noqa: BLE001 - the user's app raised: 500, and show them why
            error = self._report_app_error(scope, exc)
            if not r.status:
                r.finish(500, error)
                body = b"Internal Server Error\n"
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                        (b"content-length", b"%d" % len(body)), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
            elif r.t1:  # answered (e.g. Starlette sent its 500, then re-raised)
                self._mark_error(r, error)
            else:  # cut short: recorded as failed; uvicorn closes the connection
                r.finish(r.status, error)
            return
        finally:
            ref.inflight -= 1
        if not r.t1:
            r.finish(r.status or 500, None if r.status else "the app sent no response")

    async def _no_app(self, scope: dict, receive: Callable, send: Callable) -> None:
        """A request before the first app version is published: 503, recorded."""
        r = _http_rec(self, 0, scope, receive, send)
        body = b"no app is being served on this port yet\n"
        await r.send({"type": "http.response.start", "status": 503,
                      "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]})
        r.sb = body
        r.finish(503, "no app")
        await send({"type": "http.response.body", "body": body})

    async def _websocket(self, scope: dict, receive: Callable, send: Callable) -> None:
        ref = self._ref  # read once: this session stays on this app version
        t0 = perf_counter()
        rec = {"_t": time.time(), "type": "websocket", "method": "GET", "path": scope.get("path", ""),
               "_qs": scope.get("query_string"), "status": 0, "duration_ms": 0.0, "bytes": 0,
               "_client": scope.get("client"), "port": self.port, "app_version": ref.version if ref else 0,
               "error": None, "intercept": min(self.names) if self.names else "",
               "http_version": scope.get("http_version", "1.1"), "_rh": scope.get("headers"),
               "_rb": None, "request_bytes": 0, "_sh": None, "_sb": None}
        if ref is None:
            await send({"type": "websocket.close", "code": 1013})
            self._finish(rec, t0, 503, "no app")
            return
        if ref.state:
            scope["state"] = ref.state.copy()
        ref.inflight += 1
        try:
            await self._ws_session(ref, scope, receive, send, rec, t0)
        finally:
            ref.inflight -= 1

    async def _ws_session(self, ref: _AppRef, scope: dict, receive: Callable, send: Callable, rec: dict,
                          t0: float) -> None:
        st: dict[str, Any] = {"status": None, "in": 0, "out": 0, "in_bytes": 0, "out_bytes": 0, "code": None}
        opened = False

        async def rcv() -> dict:
            msg = await receive()
            if msg["type"] == "websocket.receive":
                st["in"] += 1
                st["in_bytes"] += len(msg.get("bytes") or b"") + len((msg.get("text") or "").encode())
            elif msg["type"] == "websocket.disconnect":
                st["code"] = msg.get("code")
            return msg

        async def snd(msg: dict) -> None:
            nonlocal opened
            t = msg["type"]
            if t == "websocket.accept":
                st["status"] = 101
                rec["_sh"] = msg.get("headers")
                opened = True
                self.ws_open += 1
            elif t == "websocket.send":
                st["out"] += 1
                st["out_bytes"] += len(msg.get("bytes") or b"") + len((msg.get("text") or "").encode())
            elif t == "websocket.close":
                if st["status"] is None:
                    st["status"] = 403  # closed before accept: uvicorn answers 403
                st["code"] = st["code"] or msg.get("code", 1000)
            elif t == "websocket.http.response.start":
                st["status"] = int(msg["status"])
            await send(msg)

        error = None
        try:
            await ref.asgi(scope, rcv, snd)
        except Exception as exc:  # noqa: BLE001 - the user's app raised
            error = self._report_app_error(scope, exc)
        finally:
            if opened:
                self.ws_open -= 1
            rec.update(messages_in=st["in"], messages_out=st["out"], request_bytes=st["in_bytes"],
                       close_code=st["code"])
            self._finish(rec, t0, st["status"] or (500 if error else 403), error, st["out_bytes"])

    # ---------------------------------------------------------------- records
    def _finish(self, rec: dict, t0: float, status: int, error: str | None, nbytes: int = 0) -> None:
        """A websocket session or gRPC call ended: complete its dict record and log it."""
        ms = (perf_counter() - t0) * 1000
        rec["status"], rec["duration_ms"], rec["bytes"], rec["error"] = status, ms, nbytes, error  # rounded when read
        self.log.append(rec)
        rec["seq"] = next(self._seq)
        self._by_status[status] += 1
        if rec["type"] == "websocket":
            self._websockets += 1
        if error:
            self._errors += 1
        self._busy += ms / 1000
        if self._listeners or _watchers:
            self._notify(rec)

    def _mark_error(self, rec: Any, error: str) -> None:
        """A request already recorded as answered turned out to fail afterwards."""
        if type(rec) is _HttpRec:
            if not rec.error:
                rec.error = error
                self._errors += 1
        elif not rec.get("error"):
            rec["error"] = error
            self._errors += 1

    def _notify(self, rec: dict) -> None:
        pub = public_record(rec)
        for fn in list(self._listeners):
            try:
                fn(pub)
            except Exception:  # noqa: BLE001 - a broken listener must not break serving
                pass
        _tell_watchers(self, pub)

    def _report_app_error(self, scope: dict, exc: BaseException) -> str:
        """Show the user's traceback (without our or the adapters' frames) on stderr; return its summary."""
        te = traceback.TracebackException.from_exception(exc)
        skip = (__file__, "/a2wsgi/", "concurrent/futures", "/asyncio/")
        te.stack = traceback.StackSummary.from_list(
            [f for f in te.stack if not any(s in f.filename for s in skip)])
        text = "".join(te.format()).rstrip()
        names = ",".join(sorted(self.names)) or f"port {self.port}"
        verb = {"http": scope.get("method", "GET"), "grpc": "gRPC"}.get(scope["type"], "WEBSOCKET")
        what = f"{verb} {scope.get('path')}"
        print(f"tpnb [{names}]: the app raised while serving {what}:\n{text}", file=sys.stderr, flush=True)
        return "".join(te.format_exception_only()).strip()


# ------------------------------------------------------------------ gRPC servicers
#: gRPC status code -> the HTTP status class shown in records and counters (grpc-gateway's mapping)
_GRPC_HTTP = {"OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
              "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
              "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501,
              "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401}


class _Capture:
    """Stands in for a grpc server while a generated `add_XServicer_to_server(servicer, server)` runs:
    keeps the method handlers it registers instead of serving them."""

    def __init__(self) -> None:
        self.methods: dict[str, Any] = {}  # "/pkg.Service/Method" -> grpc.RpcMethodHandler
        self.generic: list[Any] = []  # GenericRpcHandlers (older stubs, or hand-written ones)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for meth, h in handlers.items():
            self.methods[f"/{service}/{meth}"] = h

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)


def grpc_registrations(app: Any) -> list[tuple[Any, Callable]]:
    """The (servicer, add_fn) pairs a cell's `app` names, or [] when `app` is not a gRPC servicer.

    The convention (README, In-kernel apps): `app` is an instance of a class derived from a generated
    `FooServicer` (its `add_FooServicer_to_server` is looked up in that class's module), or a
    `(servicer, add_fn)` pair, or a list of either for several services on one port.
    """
    items = app if isinstance(app, list) else [app]
    out: list[tuple[Any, Callable]] = []
    for it in items:
        if isinstance(it, tuple) and len(it) == 2 and callable(it[1]) and not callable(it[0]):
            out.append(it)
            continue
        if isinstance(it, type) or callable(it):
            return []  # a class, or a web app: not a servicer instance
        add = None
        for base in type(it).__mro__:
            if base.__name__.endswith("Servicer"):
                mod = sys.modules.get(base.__module__)
                add = getattr(mod, f"add_{base.__name__}_to_server", None) if mod else None
                if add is not None:
                    break
        if add is None:
            return []
        out.append((it, add))
    return out


class _Ctx:
    """The servicer's context, remembering the status it sets (`abort`, `set_code`, `set_details`) for the
    record: grpc.aio's context does not report an aborted call's code afterwards."""

    def __init__(self, ctx: Any) -> None:
        self._tpnb_ctx = ctx
        self.tpnb_code: Any = None
        self.tpnb_details = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tpnb_ctx, name)

    def set_code(self, code: Any) -> None:
        self.tpnb_code = code
        self._tpnb_ctx.set_code(code)

    def set_details(self, details: str) -> None:
        self.tpnb_details = details
        self._tpnb_ctx.set_details(details)

    def abort(self, code: Any, details: str = "", trailing_metadata: Any = ()) -> Any:
        self.tpnb_code, self.tpnb_details = code, details
        return self._tpnb_ctx.abort(code, details, trailing_metadata)


class GrpcServer:
    """One `grpc.aio` server on one 127.0.0.1 port, on the in-kernel loop thread, serving the current servicers.

    The real server has a single generic handler that looks the method up in the current version's
    handlers for each call (grpc asks the generic handlers per call), so a new version serves the next
    call while calls in flight finish on the handler they started with; the HTTP/2 connections stay.
    """

    kind = "grpc"

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.names: set[str] = set()
        self.stop_on_leave = False
        self.log: deque[dict] = deque(maxlen=LOG_SIZE)
        _init_tallies(self)
        self.ws_open = 0
        self.started = _dt.datetime.now()
        self.app: Any = None
        self.app_version = 0
        self._versions = itertools.count(1)
        self._current: _Capture | None = None
        self._server: Any = None
        self._pool: Any = None
        self._stopping = False
        self._listeners: list[Listener] = []
        self._lt = _the_loop()

    running = property(lambda self: self._server is not None and not self._stopping)
    counters = InKernelServer.counters
    total_ms = InKernelServer.total_ms
    url = property(lambda self: f"{self.host}:{self.port}")
    subscribe = InKernelServer.subscribe
    records = InKernelServer.records
    recent = InKernelServer.recent
    by_seq = InKernelServer.by_seq
    summary = InKernelServer.summary
    _notify = InKernelServer._notify

    def start(self) -> None:
        self._lt.run(self._start())

    def set_app(self, app: Any) -> int:
        regs = grpc_registrations(app)
        if not regs:
            raise ConfigError(f"{app!r} is not a gRPC servicer",
                              "a servicer is an instance of a class derived from a generated FooServicer",
                              "assign `app = MyServicer()`, or `app = (servicer, add_FooServicer_to_server)`")
        cap = _Capture()
        for servicer, add in regs:
            add(servicer, cap)
        if not cap.methods and not cap.generic:
            raise ConfigError("the servicer registered no methods", f"{regs[0][1]!r} added nothing")
        version = next(self._versions)
        wrapped = {k: self._wrap(k, h, version) for k, h in cap.methods.items()}
        cap.methods = wrapped
        cap.version = version  # type: ignore[attr-defined]

        async def swap() -> None:  # one assignment on the loop thread
            self._current, self.app, self.app_version = cap, app, version

        self._lt.run(swap())
        return version

    def stop(self, grace: float = STOP_GRACE) -> None:
        if self._server is None or self._stopping:
            return
        self._stopping = True
        self._lt.run(self._server.stop(grace), timeout=grace + 15)
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    # ---------------------------------------------------------------- loop side
    async def _start(self) -> None:
        import concurrent.futures

        import grpc

        outer = self

        class _Dispatch(grpc.GenericRpcHandler):
            def service(self, details: Any) -> Any:
                cap = outer._current
                if cap is None:
                    return None
                h = cap.methods.get(details.method)
                if h is not None:
                    return h
                for g in cap.generic:
                    h = g.service(details)
                    if h is not None:
                        return outer._wrap(details.method, h, cap.version)  # type: ignore[attr-defined]
                return None

        # sync servicer methods (`def SayHello(self, request, context)`) run on this pool, async ones on the loop
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=WSGI_WORKERS, thread_name_prefix="tpnb-grpc")
        server = grpc.aio.server(migration_thread_pool=self._pool, handlers=[_Dispatch()],
                                 options=[("grpc.so_reuseport", 0)])
        try:
            bound = server.add_insecure_port(f"{self.host}:{self.port}")
        except RuntimeError:
            bound = 0
        if bound != self.port:
            await server.stop(0)
            self._pool.shutdown(wait=False)
            raise ConfigError(f"{self.host}:{self.port} is already in use",
                              "another program (or another kernel) listens on that port",
                              "choose another --port, or stop the other server")
        await server.start()
        self._server = server

    def _wrap(self, method: str, h: Any, version: int) -> Any:
        """The same method handler, recording each call (method, gRPC status, duration, version, client)."""
        import grpc

        kind = ("stream" if h.request_streaming else "unary") + "_" + ("stream" if h.response_streaming else "unary")
        fn = getattr(h, kind)
        if fn is None:
            return h
        srv = self

        def begin(context: Any) -> tuple[dict, float]:
            context = getattr(context, "_tpnb_ctx", context)
            rec = {"time": _dt.datetime.now().isoformat(timespec="milliseconds"), "type": "grpc",
                   "method": "POST", "path": method, "query": "", "status": 0, "duration_ms": 0.0, "bytes": 0,
                   "client": context.peer(), "port": srv.port, "app_version": version, "error": None,
                   "intercept": min(srv.names) if srv.names else "",
                   "http_version": "2", "request_headers": [tuple(m) for m in context.invocation_metadata() or ()],
                   "request_body": b"", "request_bytes": 0, "response_headers": [], "response_body": b"",
                   "grpc_status": "OK"}
            return rec, time.perf_counter()

        def end(rec: dict, t0: float, context: "_Ctx", exc: BaseException | None) -> None:
            code = context.tpnb_code
            name = getattr(code, "name", None) or ("UNKNOWN" if exc is not None else "OK")
            if isinstance(exc, asyncio.CancelledError):
                name = "CANCELLED"
            rec["grpc_status"] = name
            error = None
            if name != "OK":
                error = f"{name}: {context.tpnb_details}" if context.tpnb_details else name
                if exc is not None and context.tpnb_code is None and not isinstance(exc, asyncio.CancelledError):
                    error = self_report(exc)
            if threading.current_thread() is srv._lt.thread:
                InKernelServer._finish(srv, rec, t0, _GRPC_HTTP.get(name, 500), error)  # type: ignore[arg-type]
            else:
                srv._lt.loop.call_soon_threadsafe(InKernelServer._finish, srv, rec, t0, _GRPC_HTTP.get(name, 500),
                                                  error)

        def self_report(exc: BaseException) -> str:  # the servicer raised: show its traceback, like a web app's
            return InKernelServer._report_app_error(srv, {"type": "grpc", "path": method}, exc)  # type: ignore[arg-type]

        if inspect.isasyncgenfunction(fn):
            async def call(req: Any, context: Any) -> Any:
                context = _Ctx(context)
                rec, t0 = begin(context)
                exc = None
                try:
                    async for item in fn(req, context):
                        yield item
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    end(rec, t0, context, exc)
        elif inspect.iscoroutinefunction(fn):
            async def call(req: Any, context: Any) -> Any:  # type: ignore[misc]
                context = _Ctx(context)
                rec, t0 = begin(context)
                exc = None
                try:
                    return await fn(req, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    end(rec, t0, context, exc)
        elif h.response_streaming:
            def call(req: Any, context: Any) -> Any:  # type: ignore[misc]
                context = _Ctx(context)
                rec, t0 = begin(context)
                exc = None
                try:
                    yield from fn(req, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    end(rec, t0, context, exc)
        else:
            def call(req: Any, context: Any) -> Any:  # type: ignore[misc]
                context = _Ctx(context)
                rec, t0 = begin(context)
                exc = None
                try:
                    return fn(req, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    end(rec, t0, context, exc)
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(call, request_deserializer=h.request_deserializer, response_serializer=h.response_serializer)


def serve_grpc(app: Any, port: int, name: str | None = None, host: str = "127.0.0.1",
               stop_on_leave: bool = False) -> GrpcServer:
    """Serve the gRPC servicer(s) `app` (see `grpc_registrations`) on host:port; swap them if already served."""
    return _serve_on(GrpcServer, app, port, name, host, stop_on_leave,
                     ConfigError(f"port {port} serves a web app in this kernel",
                                 hint="stop it first (`%tp leave NAME`) or choose another port"))


# ------------------------------------------------------------------ the garbage collector
def _freeze_heap() -> None:
    """Collect once, then freeze what is alive (the kernel, its imports, the notebook's data, the app).

    Called when a server starts or swaps its app, on the caller's thread (the cell's).  Previously frozen
    objects are unfrozen first so that what became garbage since (an old app version, a deleted variable)
    is collected by this pass instead of staying frozen.
    """
    if GC_FREEZE:
        gc.unfreeze()
        gc.collect()
        gc.freeze()


def _thaw_heap() -> None:
    """The last in-kernel server stopped: give the frozen objects back to the collector."""
    if GC_FREEZE and not _servers:
        gc.unfreeze()


# ------------------------------------------------------------------ registry: one server per port
_lock = threading.RLock()
_servers: dict[int, Any] = {}
_logs_by_name: dict[str, Any] = {}  # last server per intercept name (kept after stop)
#: module-level followers of every server (the panel): fn(server, record) after each request, fn(server, None)
#: when a server starts, stops, or its intercept names change
_watchers: list[Callable[[Any, dict | None], None]] = []


def watch(fn: Callable[[Any, dict | None], None]) -> Callable[[], None]:
    """Follow every in-kernel server by push (see `_watchers`); returns the function that stops it.

    fn runs on the server's loop thread (records) or the caller's (start/stop): keep it short."""
    _watchers.append(fn)
    return lambda: _watchers.remove(fn) if fn in _watchers else None


def _tell_watchers(srv: Any, rec: dict | None) -> None:
    for fn in list(_watchers):
        try:
            fn(srv, rec)
        except Exception:  # noqa: BLE001 - a broken follower must not break serving
            pass


def serve(app: Any, port: int, name: str | None = None, host: str = "127.0.0.1",
          stop_on_leave: bool = False) -> InKernelServer:
    """Serve `app` on host:port in this kernel; if a server already runs there, swap its app."""
    app_kind(app)  # validate before touching the port
    return _serve_on(InKernelServer, app, port, name, host, stop_on_leave,
                     ConfigError(f"port {port} serves a gRPC servicer in this kernel",
                                 hint=f"stop it first (`%tp serve --stop --port {port}`) or choose another port"))


def _serve_on(cls: type, app: Any, port: int, name: str | None, host: str, stop_on_leave: bool,
              other_kind: ConfigError) -> Any:
    """Start a `cls` server on the port (or reuse the running one) and publish `app` on it; `other_kind` is
    the error when a server of the other kind (web app / gRPC) holds the port."""
    with _lock:
        srv = _servers.get(port)
        if srv is not None and srv.running and not isinstance(srv, cls):
            raise other_kind
        fresh = srv is None or not srv.running
        if fresh:
            srv = cls(port, host)
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
    _freeze_heap()
    _tell_watchers(srv, None)
    return srv


def get_server(port: int) -> Any:
    with _lock:
        srv = _servers.get(port)
        return srv if srv is not None and srv.running else None


def servers() -> list[Any]:
    with _lock:
        return [s for s in _servers.values() if s.running]


def server_for(name: str) -> Any:
    """The running server an intercept name is attached to, if any."""
    with _lock:
        srv = _logs_by_name.get(name)
        return srv if srv is not None and srv.running else None


def attach(name: str, port: int) -> Any:
    """Record that intercept `name` routes to `port`; returns that port's server if it is in-kernel."""
    with _lock:
        srv = get_server(port)
        if srv is not None:
            srv.names.add(name)
            _logs_by_name[name] = srv
    if srv is not None:
        _tell_watchers(srv, None)
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
    _tell_watchers(srv, None)
    return False


def stop(port: int, grace: float = STOP_GRACE) -> bool:
    with _lock:
        srv = _servers.pop(port, None)
    if srv is None:
        return False
    try:
        srv.stop(grace)
    finally:
        _thaw_heap()
        _tell_watchers(srv, None)
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


# ------------------------------------------------------------------ requests as data, and replay
#: columns of a requests table, in order (other fields follow)
COLUMNS = ("time", "type", "method", "path", "query", "status", "duration_ms", "bytes", "app_version", "client",
           "error", "request_headers", "request_body", "response_headers", "response_body")
#: headers not re-sent by `replay` (connection-level, or recomputed for the new body)
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "te", "trailer",
        "proxy-connection", "expect"}


def requests_table(name: str | int) -> Any:
    """`requests_log(name)` as a pandas DataFrame (one row per request) when pandas is installed, else the
    plain records.  What `%tp requests NAME` and `tpnb.requests_log(NAME)` give."""
    records = requests_log(name)
    try:
        import pandas as pd
    except ImportError:
        return records
    df = pd.DataFrame.from_records(records)
    if df.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    df["time"] = pd.to_datetime(df["time"])
    return df[[c for c in COLUMNS if c in df.columns] + [c for c in df.columns if c not in COLUMNS]]


@dataclass
class Replayed:
    """The response to a replayed request."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    url: str

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        import json

        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Replayed {self.status} {self.reason} from {self.url}: {len(self.body)} bytes>"


def replay(record: Any, to: str = "kernel", timeout: float = 30.0, session: Any = None) -> Replayed:
    """Send a recorded request again (same method, path, query, headers and body) and return the response.

    `record`: a record (dict) of `requests_log`, or a row of its DataFrame.  `to`: "kernel" (the
    in-kernel app on the record's port, i.e. the current version of the cell), "cluster" (the real app
    of the record's intercept in the cluster, bypassing the intercept: `tpnb.api.Session.replay`, which
    only reaches this session's own intercepts), or a base URL such as "http://hello.default".
    """
    rec = as_record(record)
    if to == "cluster":
        if session is None:
            from .magics import lifecycle  # the kernel's one Session (what %tp and the panel use)

            session = lifecycle.session()
        return session.replay(rec, to="cluster", timeout=timeout)
    if to == "kernel":
        return send_recorded(rec, "127.0.0.1", int(rec["port"]), timeout=timeout)
    u = urllib.parse.urlsplit(to)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ConfigError(f"cannot replay to {to!r}",
                          hint='use to="kernel", to="cluster" or a base URL like "http://hello.default"')
    return send_recorded(rec, u.hostname, u.port or (443 if u.scheme == "https" else 80), u.scheme, timeout)


def as_record(record: Any) -> dict:
    """A record dict from a record or a DataFrame row, checked for what a replay needs."""
    rec = dict(record) if not hasattr(record, "to_dict") else record.to_dict()
    if rec.get("type", "http") != "http":
        raise ConfigError("only HTTP requests can be replayed", f"this record is a {rec.get('type')} session")
    body = rec.get("request_body") or b""
    if rec.get("request_bytes", len(body)) > len(body):
        raise ConfigError("the recorded request body was cut short",
                          f"{rec['request_bytes']} bytes were sent; records keep the first {BODY_KEEP}",
                          "replay requests with smaller bodies, or raise tpnb.inkernel.BODY_KEEP before serving")
    return rec


def send_recorded(rec: dict, host: str, port: int, scheme: str = "http", timeout: float = 30.0,
                  shown_as: str | None = None) -> Replayed:
    """Send record `rec`'s request to host:port (its Host header kept) and read the whole response."""
    import http.client

    body = rec.get("request_body") or b""
    target = urllib.parse.quote(rec["path"]) + (f"?{urllib.parse.quote(rec['query'], safe='=&')}"
                                                if rec.get("query") else "")
    url = shown_as or f"{scheme}://{host}:{port}"
    conn_cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(host, port, timeout=timeout)
    try:
        conn.putrequest(rec["method"], target, skip_host=True, skip_accept_encoding=True)
        have_host = False
        for k, v in rec.get("request_headers") or []:
            if k.lower() in _HOP:
                continue
            have_host = have_host or k.lower() == "host"
            conn.putheader(k, v)
        if not have_host:
            conn.putheader("Host", host)
        if body or rec["method"] in ("POST", "PUT", "PATCH"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        r = conn.getresponse()
        return Replayed(status=r.status, reason=r.reason, headers=list(r.getheaders()), body=r.read(),
                        url=f"{url}{target}")
    except OSError as exc:
        raise ConfigError(f"cannot replay to {url}", str(exc),
                          "is the app served (or `%tp connect` done for a cluster URL)?") from None
    finally:
        conn.close()
