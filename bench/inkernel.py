"""In-kernel server vs the same app under standalone uvicorn, on the laptop (127.0.0.1 only).

    .venv/bin/python bench/inkernel.py [--seconds 5] [--rounds 3] [--conns 16]

A: a real Jupyter kernel (jupyter_client + ipykernel, idle between cells as a notebook is) runs
   `tpnb.inkernel.serve(app, port)`: uvicorn on the kernel's background loop thread, behind tpnb's
   swap/record layer.
B: `python -m uvicorn bench.inkernel_app:APP` in its own process (same uvicorn, httptools, asyncio loop),
   with the options tpnb gives uvicorn (`uvicorn_args`: no proxy headers, no access log, no lifespan,
   keep-alive timeout and backlog as in `tpnb.inkernel`): uvicorn doing no per-request work beyond HTTP,
   the strictest comparison (tpnb records every request; this server records none).
C: the same app as `uvicorn app:app` runs it, with uvicorn's defaults (`default_args`: access log on,
   written to /dev/null here; proxy headers; lifespan auto), only parser and loop pinned as in A and B:
   what a developer gets from uvicorn standalone, one access-log line per request being its record.
Apps: `plain` (minimal ASGI: the server's own cost) and `fastapi` (a FastAPI JSON route).  The client is
one asyncio process with `--conns` keep-alive connections sending small GETs as fast as answered; rounds
alternate A, B and C.  Prints requests/s and p50/p99 latency (µs), medians over rounds, and the ratios
A/B and A/C.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
APPS = {"plain": ("plain", "/"), "fastapi": ("fastapi_app", "/json")}


def uvicorn_args(var: str, port: int) -> list[str]:
    """The standalone server's command line, after `python -m uvicorn`: the same configuration as tpnb's
    `uvicorn.Config` (tpnb/inkernel.py `_start`).  uvicorn's default `--proxy-headers` wraps every request in
    ProxyHeadersMiddleware (one more coroutine and a scan of the headers): tpnb turns it off, so must this."""
    from tpnb import inkernel

    return [f"inkernel_app:{var}", "--port", str(port), "--log-level", "warning", "--no-access-log",
            "--lifespan", "off", "--no-proxy-headers", "--timeout-keep-alive", str(int(inkernel.KEEPALIVE_TIMEOUT)),
            "--backlog", "1024", "--http", "httptools", "--loop", "asyncio"]


def default_args(var: str, port: int) -> list[str]:
    """Server C's command line after `python -m uvicorn`: uvicorn's defaults, parser and loop as in A and B."""
    return [f"inkernel_app:{var}", "--port", str(port), "--http", "httptools", "--loop", "asyncio"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


class _Conn(asyncio.Protocol):
    def __init__(self, req: bytes, lat: list[float], stop_at: float, done: asyncio.Future) -> None:
        self.req, self.lat, self.stop_at, self.done = req, lat, stop_at, done
        self.buf = b""
        self.need = -1
        self.t0 = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport
        self._send()

    def _send(self) -> None:
        self.buf, self.need = b"", -1
        self.t0 = time.perf_counter()
        self.tr.write(self.req)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            i = head.find(b"content-length:")
            n = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None]) if i >= 0 else 0
            self.need = end + 4 + n
        if len(self.buf) >= self.need:
            now = time.perf_counter()
            self.lat.append(now - self.t0)
            if now >= self.stop_at:
                self.tr.close()
                if not self.done.done():
                    self.done.set_result(None)
                return
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _load(port: int, path: str, seconds: float, conns: int) -> tuple[float, list[float]]:
    loop = asyncio.get_running_loop()
    req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    lat: list[float] = []
    start = time.perf_counter()
    stop_at = start + seconds
    dones = []
    for _ in range(conns):
        fut = loop.create_future()
        await loop.create_connection(lambda f=fut: _Conn(req, lat, stop_at, f), "127.0.0.1", port)
        dones.append(fut)
    await asyncio.gather(*dones)
    return len(lat) / (time.perf_counter() - start), lat


def measure(port: int, path: str, seconds: float, conns: int) -> dict[str, float]:
    asyncio.run(_load(port, path, 0.5, conns))  # warm-up
    rps, lat = asyncio.run(_load(port, path, seconds, conns))
    lat.sort()
    return {"rps": rps, "p50": lat[len(lat) // 2] * 1e6, "p99": lat[int(len(lat) * 0.99)] * 1e6}


class Kernel:
    """A real ipykernel serving the app in-kernel."""

    def __init__(self) -> None:
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(kernel_name="python3", cwd=str(REPO))

    def run(self, code: str) -> None:
        reply = self.kc.execute_interactive(code, timeout=60, output_hook=lambda msg: None)
        if reply["content"]["status"] != "ok":
            raise SystemExit(f"kernel: {reply['content'].get('evalue')}")

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=16)
    args = ap.parse_args()
    kernel = Kernel()
    rows = []
    try:
        for name, (var, path) in APPS.items():
            res: dict[str, list[dict[str, float]]] = {"kernel": [], "uvicorn": [], "defaults": []}
            kport = free_port()
            kernel.run(f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r})\n"
                       f"from tpnb import inkernel\nimport inkernel_app\n"
                       f"inkernel.serve(inkernel_app.{var}, {kport})")
            wait_port(kport)
            ports = {"kernel": kport, "uvicorn": free_port(), "defaults": free_port()}
            env = {**os.environ, "PYTHONPATH": str(REPO / "bench")}
            procs = [subprocess.Popen([sys.executable, "-m", "uvicorn", *uvicorn_args(var, ports["uvicorn"])],
                                      cwd=REPO / "bench", env=env),
                     subprocess.Popen([sys.executable, "-m", "uvicorn", *default_args(var, ports["defaults"])],
                                      cwd=REPO / "bench", env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)]
            try:
                for port in ports.values():
                    wait_port(port)
                for _ in range(args.rounds):
                    for who, port in ports.items():
                        res[who].append(measure(port, path, args.seconds, args.conns))
            finally:
                for pr in procs:
                    pr.terminate()
                    pr.wait(10)
                kernel.run(f"inkernel.stop({kport}, grace=0)")
            med = {who: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99")}
                   for who, rs in res.items()}
            rounds = " ".join(f"{a['rps']:.0f}/{b['rps']:.0f}/{c['rps']:.0f}"
                              for a, b, c in zip(res["kernel"], res["uvicorn"], res["defaults"]))
            rows.append((name, med, rounds))
    finally:
        kernel.close()
    print(f"\n{args.conns} keep-alive connections, {args.seconds:.0f} s per round, {args.rounds} rounds (medians); "
          "A in-kernel, B uvicorn with tpnb's options, C uvicorn with its defaults")
    print("| app | A req/s | B req/s | A/B | C req/s | A/C | p50 / p99 µs A, B, C | rounds (A/B/C req/s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, med, rounds in rows:
        a, b, c = med["kernel"], med["uvicorn"], med["defaults"]
        print(f"| {name} | {a['rps']:.0f} | {b['rps']:.0f} | {a['rps'] / b['rps']:.2f}x | {c['rps']:.0f} | "
              f"{a['rps'] / c['rps']:.2f}x | {a['p50']:.0f} / {a['p99']:.0f}, {b['p50']:.0f} / {b['p99']:.0f}, "
              f"{c['p50']:.0f} / {c['p99']:.0f} | {rounds} |")


if __name__ == "__main__":
    main()
