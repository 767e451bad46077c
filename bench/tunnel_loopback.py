"""The tunnel's Python hops on loopback, without the cluster (issue 15).  Not a test: it prints numbers.

    .venv/bin/python bench/tunnel_loopback.py [--requests 2000] [--conns 300] [--relay]

Why: on the dev cluster the API server, kubelet and runtime add ~0.4 ms per
round trip that `kubectl port-forward` pays too, and the machine is noisy;
here only tpnb's own code is on the path, so a change to it shows.  Four
processes on 127.0.0.1, the same code as in the real ones:

  client (netbench protocol) -> "daemon" (the root daemon's `Network._on_kernel_tcp`
  on an accepted socket, gRPC channel) -> [--relay: a plain byte splice, as the
  connector's relay minus TLS] -> traffic-manager (`cluster.manager.serve`) ->
  echo server

and, in the same run, the client straight to the echo server (the floor).
Prints one table: small-request p50/p99 and new-connection p50/p99 in µs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import multiprocessing.spawn
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path and not os.environ.get("TPNB_BENCH_OTHER_TREE"):
    sys.path.insert(0, str(REPO))


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ------------------------------------------------------------------ tracing
def _trace(name: str) -> None:
    """--trace: timestamp (CLOCK_MONOTONIC, shared by the processes) every tunnel
    read/write and socket read/write of this process into /tmp/tpnb-trace-<name>.jsonl."""
    if not os.environ.get("TPNB_BENCH_TRACE"):
        return
    import atexit
    import signal

    from tpnb.common import forward as fw

    events: list[tuple[int, str]] = []
    now = time.perf_counter_ns

    def wrap(cls, meth: str, label: str) -> None:  # noqa: ANN001
        orig = getattr(cls, meth)

        async def inner(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
            events.append((now(), label + ">"))
            r = await orig(self, *a, **kw)
            events.append((now(), label + "<"))
            return r

        setattr(cls, meth, inner)

    wrap(fw.GrpcFrameChannel, "recv", "grpc.recv")
    wrap(fw.GrpcFrameChannel, "send", "grpc.send")
    wrap(fw.SocketStream, "read", "sock.read")
    wrap(fw.SocketStream, "drain", "sock.drain")
    if name == "manager":
        from tpnb.cluster import manager as m

        wrap(m.Manager, "Tunnel", "Manager.Tunnel")
        wrap(m.Manager, "_outbound", "manager._outbound")
        orig_connect = fw.SocketStream.connect.__func__

        async def connect(cls, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
            events.append((now(), "dial>"))
            r = await orig_connect(cls, *a, **kw)
            events.append((now(), "dial<"))
            return r

        fw.SocketStream.connect = classmethod(connect)
    else:
        from tpnb.daemon import network as n

        wrap(n.Network, "_on_kernel_tcp", "daemon._on_kernel_tcp")

    def dump(*_: object) -> None:
        with open(f"/tmp/tpnb-trace-{name}.jsonl", "w") as f:
            for t, e in events:
                f.write(f"{t} {e}\n")
        os._exit(0)

    atexit.register(dump)
    signal.signal(signal.SIGTERM, dump)


def _grpc_opts() -> None:
    """TPNB_BENCH_GRPC_OPTS="name=int,...": change the tunnel channels' / servers' gRPC options
    (in place, before the daemon and manager read them), to compare settings."""
    spec = os.environ.get("TPNB_BENCH_GRPC_OPTS", "")
    if not spec:
        return
    from tpnb.common import forward as fw

    for item in spec.split(","):
        key, _, val = item.partition("=")
        for opts in (fw.BULK_GRPC_OPTIONS, fw.MANAGER_CHANNEL_OPTIONS):
            opts[:] = [(k, v) for k, v in opts if k != key]
            if val != "-":
                opts.append((key, int(val)))


# ------------------------------------------------------------------ processes
def echo_server(port: int) -> None:
    """The netbench server's "ping" mode: echo 64-byte messages (threads, blocking sockets)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(128)

    def handle(c: socket.socket) -> None:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = c.makefile("rb")
        f.readline()
        while True:
            msg = f.read(64)
            if len(msg) < 64:
                break
            c.sendall(msg)
        c.close()

    while True:
        c, _ = srv.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()


def manager(port: int) -> None:
    _trace("manager")
    _grpc_opts()
    from tpnb.cluster import manager as m

    if os.environ.get("TPNB_BENCH_NO_EARLY_DATA"):
        m.FEATURES = ()  # as a manager from before early data: the daemon sends data frames

    class _NoAgents:
        async def verify(self, token, claimed):  # noqa: ANN001, ANN201
            raise m.AgentRefused("no agents here")

    asyncio.run(m.serve(port, _free_port(), verifier=_NoAgents()))


def relay(listen: str, port: int) -> None:
    """Unix socket -> TCP, one splice per connection (the connector's relay, without TLS)."""
    from tpnb.common.forward import SocketStream, splice

    async def main() -> None:
        async def handle(r, w) -> None:  # noqa: ANN001
            up = await SocketStream.connect("127.0.0.1", port, 5)
            await splice(r, w, up, up)

        srv = await asyncio.start_unix_server(handle, listen, limit=1 << 20)
        await srv.serve_forever()

    asyncio.run(main())


def daemon(listen_port: int, address: str, echo_port: int, ready: mp.Event) -> None:
    """The root daemon's flow handler on sockets accepted here, as if redirected to the echo server."""
    _trace("daemon")
    _grpc_opts()
    from tpnb.daemon.network import ManagerTunnels, Network
    from tpnb.daemon.redirect import KernelTcp, SocketFlow
    from tpnb.proto import pb

    async def main() -> None:
        net = Network(pb.NetworkRequest(manager_address=address))
        net.link = ManagerTunnels(address)
        sess = await net.link.stub.ArriveAsClient(pb.ClientInfo(name="bench@loopback"))
        net.session_id = sess.session_id
        lst = socket.socket()
        lst.bind(("127.0.0.1", listen_port))
        lst.listen(512)
        lst.setblocking(False)

        async def remain() -> None:
            while True:
                await asyncio.sleep(3)
                await net.link.stub.Remain(sess)

        class Loopback(KernelTcp):
            """The daemon's accept path, with the echo server as every connection's destination."""

            async def _accepted(self, sock: socket.socket, src: tuple[str, int]) -> None:
                flow = SocketFlow(sock, src, ("127.0.0.1", echo_port))
                try:
                    await self.on_tcp(flow)
                finally:
                    flow.close()

        kt = Loopback("bench", net._on_tcp)
        kt._listener = lst
        keep = asyncio.ensure_future(remain())
        ready.set()
        try:
            await kt._accept_loop()
        finally:
            keep.cancel()

    asyncio.run(main())


# ------------------------------------------------------------------ client
def measure(port: int, requests: int, conns: int) -> dict[str, float]:
    sys.path.insert(0, str(REPO / "bench"))
    import netbench_client as nc

    small = nc.small_requests("127.0.0.1", port, requests)
    newc = nc.new_connections("127.0.0.1", port, conns)
    return {"small_p50_us": round(nc.pct(small, 50)), "small_p99_us": round(nc.pct(small, 99)),
            "conn_p50_us": round(nc.pct(newc, 50)), "conn_p99_us": round(nc.pct(newc, 99))}


def trace_small(port: int, n: int, procs: list, conns: bool = False) -> None:  # noqa: ANN001
    """Small requests (or new connections) with client timestamps; then each process's events
    inside each, as the median offset from the client's send / connect (µs)."""
    msg = b"m" * 64
    spans = []

    def rtt(s: socket.socket, data: bytes) -> None:
        s.sendall(data)
        got = 0
        while got < 64:
            got += len(s.recv(64 - got))

    if conns:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtt(s, b"ping\n" + msg)
            spans.append((t0, time.perf_counter_ns()))
            s.close()
            time.sleep(0.003)  # let the teardown pass, so the timeline shows the setup only
    else:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"ping\n")
        for _ in range(n):
            t0 = time.perf_counter_ns()
            rtt(s, msg)
            spans.append((t0, time.perf_counter_ns()))
        s.close()
    time.sleep(0.5)
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(5)
    offsets: dict[str, list[float]] = {}
    for name in ("daemon", "manager"):
        evs = [(int(t), e) for t, e in (ln.split() for ln in open(f"/tmp/tpnb-trace-{name}.jsonl"))]
        j = 0
        for t0, t1 in spans[n // 10:]:  # skip the first tenth
            seen: dict[str, int] = {}
            while j < len(evs) and evs[j][0] < t0:
                j += 1
            k = j
            while k < len(evs) and evs[k][0] <= t1:
                key = f"{name} {evs[k][1]}"
                seen[key] = seen.get(key, 0) + 1
                offsets.setdefault(f"{key}#{seen[key]}", []).append((evs[k][0] - t0) / 1000)
                k += 1
    offsets["client recv"] = [(b - a) / 1000 for a, b in spans[n // 10:]]
    rows = sorted(((statistics.median(v), k, len(v)) for k, v in offsets.items() if len(v) > n // 4))
    print("median µs after the client's send | event | requests that had it")
    for med, k, cnt in rows:
        print(f"{med:9.1f}  {k}  ({cnt})")


def wait_port(port: int, timeout: float = 20) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def start_tunnel(ctx, echo_port: int, use_relay: bool, env: dict[str, str], procs: list,  # noqa: ANN001
                 python: str | None = None) -> int:
    """Manager (+ relay) + daemon with `env` set in their environment; returns the daemon's port.

    `python`: another checkout's venv interpreter, whose editable install then
    provides tpnb (e.g. /work/main/.venv/bin/python: the code before a change)."""
    if python:
        env = {**env, "TPNB_BENCH_OTHER_TREE": "1"}
        mp.spawn.set_executable(python)  # type: ignore[attr-defined]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mgr_port, d_port = _free_port(), _free_port()
        procs.append(ctx.Process(target=manager, args=(mgr_port,), daemon=True))
        procs[-1].start()
        wait_port(mgr_port)
        address = f"127.0.0.1:{mgr_port}"
        if use_relay:
            path = f"/tmp/tpnb-bench-relay-{os.getpid()}-{d_port}.sock"
            procs.append(ctx.Process(target=relay, args=(path, mgr_port), daemon=True))
            procs[-1].start()
            while not os.path.exists(path):
                time.sleep(0.05)
            address = f"unix:{path}"
        ready = ctx.Event()
        procs.append(ctx.Process(target=daemon, args=(d_port, address, echo_port, ready), daemon=True))
        procs[-1].start()
        ready.wait(20)
        return d_port
    finally:
        if python:
            mp.spawn.set_executable(sys.executable)  # type: ignore[attr-defined]
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--conns", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--relay", action="store_true", help="put a byte splice between daemon and manager")
    ap.add_argument("--ab", action="append", default=[], metavar="VAR=VALUE",
                    help="also run a second manager+daemon pair with these environment variables "
                         "(TPNB_DAEMON_TUNNEL_POOL=0: no spare calls; TPNB_BENCH_NO_EARLY_DATA=1: a manager "
                         "without early data; TPNB_BENCH_GRPC_OPTS=...), measured in alternation with the first")
    ap.add_argument("--ab-python", metavar="PYTHON",
                    help="also run a manager+daemon pair from another checkout (its venv's python), alternating")
    ap.add_argument("--trace-conns", action="store_true", help="--trace, of new connections")
    ap.add_argument("--trace", action="store_true",
                    help="timestamp every hop of the small requests and print the median timeline")
    args = ap.parse_args()
    args.trace = args.trace or args.trace_conns
    if args.trace:
        os.environ["TPNB_BENCH_TRACE"] = "1"
    ctx = mp.get_context("spawn")
    echo_port = _free_port()
    procs = [ctx.Process(target=echo_server, args=(echo_port,), daemon=True)]
    procs[0].start()
    wait_port(echo_port)
    ports = {"tunnel": start_tunnel(ctx, echo_port, args.relay, {}, procs)}
    if args.ab and not args.trace:
        env = dict(kv.split("=", 1) for kv in args.ab)
        ports["tunnel " + " ".join(args.ab)] = start_tunnel(ctx, echo_port, args.relay, env, procs)
    if args.ab_python and not args.trace:
        ports[f"tunnel of {args.ab_python}"] = start_tunnel(ctx, echo_port, args.relay, {}, procs, args.ab_python)
    try:
        for port in ports.values():
            measure(port, 200, 20)  # warm-up
        if args.trace:
            trace_small(ports["tunnel"], args.conns if args.trace_conns else args.requests, procs, args.trace_conns)
            return
        res: dict[str, list[dict[str, float]]] = {"direct": []} | {k: [] for k in ports}
        for r in range(args.rounds):
            order = list(ports.items()) if r % 2 == 0 else list(reversed(ports.items()))
            res["direct"].append(measure(echo_port, args.requests, args.conns))
            for label, port in order:
                res[label].append(measure(port, args.requests, args.conns))
        out = {k: {c: round(statistics.median(r[c] for r in v)) for c in v[0]} for k, v in res.items()}
        print(json.dumps(out))
        print("| path | small p50 | small p99 | new conn p50 | new conn p99 |\n|---|---|---|---|---|")
        for k, r in out.items():
            print(f"| {k} | {r['small_p50_us']} | {r['small_p99_us']} | {r['conn_p50_us']} | {r['conn_p99_us']} |")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(5)


if __name__ == "__main__":
    main()
