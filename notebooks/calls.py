"""Calls an intercepted web app the way its clients do: a JSON route, a streaming (SSE) route and a
websocket echo.  Standard library only, so the very same file runs on the laptop and inside a pod
(`kubectl exec -i POD -- python3 - URL < calls.py`).

    python3 calls.py URL                  one round; prints what came back
    python3 calls.py URL --loop SECONDS   keep calling (keep-alive connections) for SECONDS; prints
                                          one JSON line {"answered": N, "failed": N, "versions": [...]}
    --no-ws                               skip the websocket route (a WSGI app has none)
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import struct
import sys
import time
import urllib.parse


def get_json(conn: http.client.HTTPConnection, name: str) -> dict:
    conn.request("GET", f"/json?name={urllib.parse.quote(name)}")
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        raise RuntimeError(f"/json: HTTP {r.status} {body[:100]!r}")
    return json.loads(body)


def get_stream(conn: http.client.HTTPConnection) -> list[str]:
    conn.request("GET", "/stream")
    r = conn.getresponse()
    body = r.read().decode()
    if r.status != 200:
        raise RuntimeError(f"/stream: HTTP {r.status} {body[:100]!r}")
    return [line[6:] for line in body.splitlines() if line.startswith("data: ")]


def _read_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("websocket closed early")
        data += chunk
    return data


def _frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def ws_echo(host: str, port: int, texts: list[str]) -> list[str]:
    """A minimal RFC 6455 client: handshake, masked text frames, the server's replies, close."""
    with socket.create_connection((host, port), timeout=10) as s:
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall(f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(1)
            if not chunk:
                raise ConnectionError("no websocket handshake")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"websocket refused: {head.splitlines()[0]!r}")
        out = []
        for text in texts:
            s.sendall(_frame(0x1, text.encode()))
            b0, b1 = _read_exact(s, 2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", _read_exact(s, 2))[0]
            elif n == 127:
                n = struct.unpack("!Q", _read_exact(s, 8))[0]
            out.append(_read_exact(s, n).decode())
        s.sendall(_frame(0x8, struct.pack("!H", 1000)))
        return out


def one_round(url: str, ws: bool) -> None:
    u = urllib.parse.urlsplit(url)
    host, port = u.hostname or "localhost", u.port or 80
    conn = http.client.HTTPConnection(host, port, timeout=10)
    print("json:  ", get_json(conn, "caller"))
    print("stream:", get_stream(conn))
    if ws:
        print("ws:    ", ws_echo(host, port, ["one", "two"]))


def loop(url: str, seconds: float, ws: bool) -> None:
    u = urllib.parse.urlsplit(url)
    host, port = u.hostname or "localhost", u.port or 80
    stats = {"answered": 0, "failed": 0, "errors": [], "versions": set()}
    conn = http.client.HTTPConnection(host, port, timeout=10)
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        i += 1
        try:
            if i % 3 == 1:
                v = get_json(conn, f"n{i}")["version"]
            elif i % 3 == 2 or not ws:
                events = get_stream(conn)
                if len(events) != 3:
                    raise RuntimeError(f"stream: {events}")
                v = events[0].split()[0]
            else:
                echoed = ws_echo(host, port, [f"m{i}"])
                v = echoed[0].split()[0]
                if not echoed[0].endswith(f"m{i}"):
                    raise RuntimeError(f"ws: {echoed}")
            stats["versions"].add(v)
            stats["answered"] += 1
        except Exception as exc:  # noqa: BLE001 - every failure counts, and is named
            stats["failed"] += 1
            stats["errors"].append(repr(exc)[:200])
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=10)
        time.sleep(0.01)
    print(json.dumps({"answered": stats["answered"], "failed": stats["failed"],
                      "versions": sorted(stats["versions"]), "errors": stats["errors"][:5]}), flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--no-ws"]
    with_ws = "--no-ws" not in sys.argv
    if "--loop" in args:
        k = args.index("--loop")
        seconds = float(args[k + 1])
        del args[k:k + 2]
        loop(args[0], seconds, with_ws)
    else:
        one_round(args[0], with_ws)
