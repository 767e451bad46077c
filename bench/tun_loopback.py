"""Benchmark (not a test) of the daemon's TUN layer on one machine.

Run as root:  .venv/bin/python bench/tun_loopback.py
It creates a private network namespace, re-runs itself inside it, and deletes
the namespace afterwards; nothing touches the host's own network namespace.

Measures, through `tpnb.daemon.tun.Tun` with in-process echo handlers (no
tunnel, no cluster): bulk TCP up/down MB/s, small request/response latency on
one connection, new-connection latency, and DNS (UDP) query latency through
the DNS IP with `ClusterResolver` and a zero-cost fake cluster lookup.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid

DNS_IP = "169.254.53.53"
MB = 1024 * 1024


async def inside() -> dict[str, float]:
    from dnslib import QTYPE, RR, A, DNSRecord

    from tpnb.daemon import routes
    from tpnb.daemon.dns import ClusterResolver
    from tpnb.daemon.tun import Flow, Tun

    async def on_tcp(flow: Flow) -> None:
        port = flow.dst[1]
        if port == 1:  # sink: count bytes, answer with 8-byte total
            total = 0
            while data := await flow.read():
                total += len(data)
            flow.write(total.to_bytes(8, "big"))
        elif port == 2:  # source: send N bytes
            n = int.from_bytes(await flow.read(8), "big")
            chunk = b"x" * (256 * 1024)
            while n > 0:
                flow.write(chunk[: min(n, len(chunk))])
                n -= len(chunk)
                await flow.drain()
        else:  # echo
            while data := await flow.read():
                flow.write(data)
        flow.write_eof()

    async def on_udp(flow: Flow) -> None:
        while data := await flow.read():
            flow.write(data)

    async def lookup(raw: bytes) -> bytes:
        q = DNSRecord.parse(raw)
        r = q.reply()
        r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("10.99.0.1"), ttl=0))  # ttl 0: no caching
        return r.pack()

    res = ClusterResolver(lookup, namespaces={"default"}, mapped_namespaces=["default"])
    out: dict[str, float] = {}
    async with Tun("tpnbbench0", on_tcp, on_udp, dns_ip=DNS_IP, dns_handler=res.handle):
        await routes.add_routes("tpnbbench0", ["10.99.0.0/16", DNS_IP + "/32"])
        size = 256 * MB
        # upload
        r, w = await asyncio.open_connection("10.99.0.2", 1)
        t0 = time.perf_counter()
        chunk = b"y" * (256 * 1024)
        for _ in range(size // len(chunk)):
            w.write(chunk)
            await w.drain()
        w.write_eof()
        assert int.from_bytes(await r.readexactly(8), "big") == size
        out["up_MBps"] = size / MB / (time.perf_counter() - t0)
        w.close()
        # download
        r, w = await asyncio.open_connection("10.99.0.2", 2)
        t0 = time.perf_counter()
        w.write(size.to_bytes(8, "big"))
        got = 0
        while got < size:
            data = await r.read(256 * 1024)
            if not data:
                break
            got += len(data)
        out["down_MBps"] = got / MB / (time.perf_counter() - t0)
        w.close()
        # small request latency
        r, w = await asyncio.open_connection("10.99.0.2", 3)
        lat = []
        for _ in range(2000):
            t0 = time.perf_counter()
            w.write(b"ping")
            await r.readexactly(4)
            lat.append(time.perf_counter() - t0)
        w.close()
        out["req_p50_us"], out["req_p99_us"] = _pct(lat)
        # new connection (connect + 1 round trip + close)
        lat = []
        for _ in range(300):
            t0 = time.perf_counter()
            r, w = await asyncio.open_connection("10.99.0.2", 3)
            w.write(b"hi")
            await r.readexactly(2)
            w.close()
            lat.append(time.perf_counter() - t0)
        out["conn_p50_us"], out["conn_p99_us"] = _pct(lat)
        # DNS over UDP, fresh socket per query as glibc does
        loop = asyncio.get_running_loop()
        lat = []
        for i in range(1000):
            q = DNSRecord.question(f"svc{i}.default").pack()
            t0 = time.perf_counter()
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            await loop.sock_connect(s, (DNS_IP, 53))
            await loop.sock_sendall(s, q)
            await asyncio.wait_for(loop.sock_recv(s, 4096), 2)
            s.close()
            lat.append(time.perf_counter() - t0)
        out["dns_p50_us"], out["dns_p99_us"] = _pct(lat)
    return out


def _pct(values: list[float]) -> tuple[float, float]:
    values.sort()
    return statistics.median(values) * 1e6, values[int(len(values) * 0.99) - 1] * 1e6


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--inside":
        print(json.dumps(asyncio.run(inside())))
        return
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark creates a private network namespace")
    ns = f"tpnbbench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        runs = []
        for _ in range(3):
            p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--inside"],
                               capture_output=True, text=True, timeout=300)
            if p.returncode != 0:
                sys.exit(p.stderr)
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(f"{'metric':<14}{'median of 3':>14}")
        for key in runs[0]:
            print(f"{key:<14}{statistics.median(r[key] for r in runs):>14.0f}")
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
