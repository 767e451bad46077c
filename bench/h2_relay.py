"""What the agent's HTTP/2 relay (cluster/h2route.py) adds to a gRPC call, on loopback.

grpcio Greeter servers for the app and a "laptop" (tests/greeter_app.py), an H2Router between
them and one grpcio channel; sequential unary calls: p50/p99 latency straight to the app, through
the relay to the app (no matching header), and through the relay to the laptop (matching header),
plus the relay's own CPU time per call (time.thread_time of its event loop thread).  Nothing
leaves 127.0.0.1.

    .venv/bin/python bench/h2_relay.py [--calls N]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import grpc  # noqa: E402
from google.protobuf.wrappers_pb2 import StringValue  # noqa: E402

import greeter_app  # noqa: E402
from tpnb.cluster import h2route, httproute  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args(argv)
    app, _, app_port = greeter_app.serve(0, "app", host="127.0.0.1")
    lap, _, lap_port = greeter_app.serve(0, "laptop", host="127.0.0.1")
    flt = httproute.Filter(headers=((b"x-dev", b"alice"),))

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = await h2route.sniff(r)
        await h2route.H2Router(r, w, lambda req: "lap" if flt.matches(req.target, req.headers) else "app",
                               lambda key: httproute.StreamUpstream.connect(
                                   "127.0.0.1", lap_port if key == "lap" else app_port), first=first).run()
        w.close()

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    srv = asyncio.run_coroutine_threadsafe(asyncio.start_server(handle, "127.0.0.1", 0), loop).result(10)
    relay_port = srv.sockets[0].getsockname()[1]

    async def cpu() -> float:
        return time.thread_time()

    def measure(port: int, md: Any) -> tuple[float, float, float]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = greeter_app.Stub(ch)
            for _ in range(200):
                stub.SayHello(StringValue(value="warm"), metadata=md)
            c0 = asyncio.run_coroutine_threadsafe(cpu(), loop).result()
            xs = []
            for _ in range(args.calls):
                t = time.perf_counter()
                stub.SayHello(StringValue(value="x"), metadata=md)
                xs.append(time.perf_counter() - t)
            c1 = asyncio.run_coroutine_threadsafe(cpu(), loop).result()
        xs.sort()
        return xs[len(xs) // 2] * 1e6, xs[int(len(xs) * 0.99)] * 1e6, (c1 - c0) / args.calls * 1e6

    rows = [("direct to the app", measure(app_port, ())),
            ("relay, no match -> app", measure(relay_port, ())),
            ("relay, match -> laptop", measure(relay_port, (("x-dev", "alice"),)))]
    print(f"{'unary gRPC calls (' + str(args.calls) + ')':<28}{'p50_us':>9}{'p99_us':>9}{'relay_cpu_us':>14}")
    for name, (p50, p99, c) in rows:
        print(f"{name:<28}{p50:>9.0f}{p99:>9.0f}{(c if 'relay' in name else 0):>14.0f}")
    app.stop(0)
    lap.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
