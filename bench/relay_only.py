"""tpnb's port-forward relay alone, to a pod port: for bench/connect.py's hop split (issue 15).

    python3 bench/relay_only.py NAMESPACE POD PORT LOCAL_PORT
    python3 bench/relay_only.py --direct NAMESPACE IP PORT LOCAL_PORT

Runs in a laptop with the user's kubeconfig, listening on 127.0.0.1:LOCAL_PORT,
with no root daemon and no traffic-manager on the path:

* default: the connector's `PortForward` (one SPDY connection per accepted
  connection, as the connector relays the daemon's gRPC channel), straight
  to POD:PORT;
* ``--direct``: the direct data plane (`connector/direct.py`): each accepted
  connection is `DirectPlane.dial(IP, PORT)` (a ClusterIP or a pod IP,
  resolved from the plane's watches) and `DirectConn.relay`, i.e. what the
  connector does with a socket the root daemon hands over, minus the
  handover itself.  On exit it prints the plane's status line to stderr.

Prints "ready" once listening; serves until terminated.
"""
from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tpnb.connector.kube import load_target  # noqa: E402
from tpnb.connector.portforward import PortForward  # noqa: E402


def _listen(local_port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", local_port))
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def _until_sigterm() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()


async def main(ns: str, pod: str, port: int, local_port: int) -> None:
    pf = PortForward(load_target(), ns, pod, port)
    await pf.probe()
    pf._listener = _listen(local_port)
    pf.address = f"127.0.0.1:{local_port}"
    pf._accept_task = asyncio.create_task(pf._accept_loop())
    await _until_sigterm()
    await pf.aclose()


async def main_direct(ns: str, ip: str, port: int, local_port: int) -> None:
    from tpnb.connector.direct import DirectPlane

    plane = DirectPlane(load_target(), [ns])
    await plane.start()
    for _ in range(100):
        if plane.resolve(ip, port) is not None:
            break
        await asyncio.sleep(0.1)
    else:
        raise SystemExit(f"the direct plane cannot resolve {ip}:{port}: {plane.status()}")
    listener = _listen(local_port)
    loop = asyncio.get_running_loop()
    relays: set[asyncio.Task[None]] = set()

    async def serve(conn: socket.socket) -> None:
        dc = await plane.dial(ip, port)
        if dc is None:
            conn.close()
            return
        await dc.relay(conn)

    async def accept() -> None:
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = asyncio.create_task(serve(conn))
            relays.add(task)
            task.add_done_callback(relays.discard)

    acceptor = asyncio.create_task(accept())
    await _until_sigterm()
    acceptor.cancel()
    for t in list(relays):
        t.cancel()
    print(f"direct plane: {plane.status()}", file=sys.stderr, flush=True)
    await plane.aclose()


if __name__ == "__main__":
    if sys.argv[1] == "--direct":
        asyncio.run(main_direct(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
    else:
        asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
