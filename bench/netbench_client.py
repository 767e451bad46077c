"""Measurement client used by bench/connect.py (runs in a laptop or the node namespace).

Talks to bench/netbench_server.py's protocol: a line "down N\\n" makes the
server send N bytes; "up N\\n" then N bytes makes it answer "ok\\n"; "ping\\n"
... is answered per 64-byte message by echoing it.  Prints one JSON line.
Bounded: fixed byte counts and request counts, socket timeouts everywhere.
"""
from __future__ import annotations

import json
import socket
import statistics
import sys
import time


def _conn(host: str, port: int) -> socket.socket:
    s = socket.create_connection((host, port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_exact(s: socket.socket, n: int) -> None:
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = s.recv_into(view[: min(len(buf), n - got)])
        if not k:
            raise ConnectionError(f"closed after {got} of {n} bytes")
        got += k


def bulk_down(host: str, port: int, n: int) -> float:
    s = _conn(host, port)
    t0 = time.perf_counter()
    s.sendall(f"down {n}\n".encode())
    _recv_exact(s, n)
    dt = time.perf_counter() - t0
    s.close()
    return n / dt / 1e6


def bulk_up(host: str, port: int, n: int) -> float:
    s = _conn(host, port)
    chunk = b"x" * (1 << 20)
    t0 = time.perf_counter()
    s.sendall(f"up {n}\n".encode())
    sent = 0
    while sent < n:
        k = min(len(chunk), n - sent)
        s.sendall(chunk[:k])
        sent += k
    _recv_exact(s, 3)
    dt = time.perf_counter() - t0
    s.close()
    return n / dt / 1e6


def small_requests(host: str, port: int, count: int) -> list[float]:
    s = _conn(host, port)
    s.sendall(b"ping\n")
    msg = b"m" * 64
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        s.sendall(msg)
        _recv_exact(s, 64)
        out.append((time.perf_counter() - t0) * 1e6)
    s.close()
    return out


def new_connections(host: str, port: int, count: int) -> list[float]:
    out = []
    msg = b"m" * 64
    for _ in range(count):
        t0 = time.perf_counter()
        s = _conn(host, port)
        s.sendall(b"ping\n" + msg)
        _recv_exact(s, 64)
        s.close()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    """host port [size] [mode]: mode "all" (default), "bulk" (one transfer each way), "latency"."""
    host, port = sys.argv[1], int(sys.argv[2])
    # resolve a name once: a tunnel to 127.0.0.1 has no lookups, so timing them per
    # connection would compare DNS, not the tunnels
    host = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 64 * 1024 * 1024
    mode = sys.argv[4] if len(sys.argv) > 4 else "all"
    if mode == "bulk":
        print(json.dumps({"down_MBps": round(bulk_down(host, port, size), 1),
                          "up_MBps": round(bulk_up(host, port, size), 1)}))
        return
    down = up = 0.0
    if mode == "all":
        down = statistics.median(bulk_down(host, port, size) for _ in range(3))
        up = statistics.median(bulk_up(host, port, size) for _ in range(3))
    small = small_requests(host, port, 1000)
    conns = new_connections(host, port, 200)
    print(json.dumps({"down_MBps": round(down, 1), "up_MBps": round(up, 1),
                      "small_p50_us": round(pct(small, 50)), "small_p99_us": round(pct(small, 99)),
                      "conn_p50_us": round(pct(conns, 50)), "conn_p99_us": round(pct(conns, 99))}))


if __name__ == "__main__":
    main()
