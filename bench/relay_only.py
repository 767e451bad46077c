"""tpnb's port-forward relay alone, to a pod port: for bench/connect.py's hop split (issue 15).

    python3 bench/relay_only.py NAMESPACE POD PORT LOCAL_PORT

Runs in a laptop with the user's kubeconfig: the connector's `PortForward`
(SPDY to the API server, as the connector relays the daemon's gRPC channel)
listening on 127.0.0.1:LOCAL_PORT, forwarding straight to POD:PORT, with no
root daemon and no traffic-manager on the path.  Prints "ready" once
listening; serves until terminated.
"""
from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tpnb.connector.kube import load_target  # noqa: E402
from tpnb.connector.portforward import PortForward  # noqa: E402


async def main(ns: str, pod: str, port: int, local_port: int) -> None:
    pf = PortForward(load_target(), ns, pod, port)
    await pf.probe()
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", local_port))
    sock.listen(64)
    sock.setblocking(False)
    pf._listener = sock
    pf.address = f"127.0.0.1:{local_port}"
    pf._accept_task = asyncio.create_task(pf._accept_loop())
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await pf.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
