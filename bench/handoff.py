"""What the daemon -> connector hand-off (daemon/handoff.py) adds to opening a connection.

No cluster: two processes on loopback.  The "daemon" (this process) accepts
TCP connections; the "connector" (a child process) runs the real
`HandoffServer` with a stand-in plane whose relay echoes.  Per round, N new
connections each send one byte and wait for it back:

* ``local echo``: the daemon process echoes itself (the floor: accept +
  one round trip on loopback);
* ``hand-off, taken``: the accepted socket goes to the connector, which
  answers TAKEN and echoes from there (what a direct-plane connection pays
  on top of the port-forward itself);
* ``hand-off, not mine``: offered, answered NOT_MINE, then echoed by the
  daemon (what a manager-bound connection pays when the plane is on).

Prints p50/p99 per variant, rounds alternating.  Usage:
`.venv/bin/python bench/handoff.py [--conns 500] [--rounds 3]`.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tpnb.common.handoff import NOT_MINE, TAKEN  # noqa: E402
from tpnb.connector.handoff import HandoffServer  # noqa: E402
from tpnb.daemon.handoff import HandoffClient  # noqa: E402

TAKE_PORT, LEAVE_PORT = 1, 2


class Echo:
    async def relay(self, sock: socket.socket, early: bytes = b"") -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        try:
            while data := await loop.sock_recv(sock, 4096):
                await loop.sock_sendall(sock, data)
        finally:
            sock.close()


def _connector(directory: str, ready: "multiprocessing.Queue[tuple[str, bytes]]") -> None:
    async def main() -> None:
        async def dial(ip: str, port: int) -> Echo | None:
            return Echo() if port == TAKE_PORT else None

        server = HandoffServer(dial, (ConnectionRefusedError,), Path(directory))
        await server.start()
        ready.put((str(server.path), server.secret))
        await asyncio.Event().wait()

    asyncio.run(main())


async def _echo_here(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        while data := await loop.sock_recv(sock, 4096):
            await loop.sock_sendall(sock, data)
    finally:
        sock.close()


async def bench(conns: int, rounds: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        q: multiprocessing.Queue[tuple[str, bytes]] = ctx.Queue()
        child = ctx.Process(target=_connector, args=(tmp, q), daemon=True)
        child.start()
        path, secret = q.get(timeout=30)
        client = HandoffClient(path, secret, child.pid or 0, os.getuid())
        client.start()
        for _ in range(500):
            if client.ready:
                break
            await asyncio.sleep(0.01)
        assert client.ready, client.note
        variant = {"mode": "local"}
        loop = asyncio.get_running_loop()

        async def accepted(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            raw = w.get_extra_info("socket")
            sock = socket.socket(fileno=os.dup(raw.fileno()))
            w.transport.abort()
            mode = variant["mode"]
            if mode != "local":
                verdict, _ = await client.offer(sock, ("10.43.0.1", TAKE_PORT if mode == "taken" else LEAVE_PORT),
                                                ("127.0.0.1", 1))
                if verdict == TAKEN:
                    sock.close()
                    return
                assert verdict == NOT_MINE
            await _echo_here(sock)

        server = await asyncio.start_server(accepted, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def one() -> float:
            t0 = time.perf_counter()
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", port))
            await loop.sock_sendall(s, b"x")
            assert await loop.sock_recv(s, 1) == b"x"
            dt = time.perf_counter() - t0
            s.close()
            return dt

        results: dict[str, list[float]] = {"local echo": [], "hand-off, taken": [], "hand-off, not mine": []}
        modes = {"local echo": "local", "hand-off, taken": "taken", "hand-off, not mine": "not_mine"}
        for _ in range(rounds):
            for label, mode in modes.items():
                variant["mode"] = mode
                for _ in range(conns):
                    results[label].append(await one())
        server.close()
        await client.aclose()
        child.kill()
        print(f"new connection: connect + 1-byte round trip, {conns} x {rounds} rounds (alternating), µs")
        print("| variant | p50 | p99 |\n|---|---|---|")
        for label, xs in results.items():
            xs.sort()
            print(f"| {label} | {statistics.median(xs) * 1e6:.0f} | {xs[int(len(xs) * 0.99)] * 1e6:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    asyncio.run(bench(a.conns, a.rounds))


if __name__ == "__main__":
    main()
