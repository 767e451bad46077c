"""The agent link's own cost, without a cluster (issue 15).  Not a test: it prints numbers.

    .venv/bin/python bench/agentlink_loopback.py [--mb 512] [--requests 2000]

The traffic-agent's link listener (cluster/agentlink.py) and the connector's end of a link
(connector/agentlink.py) in one process on 127.0.0.1, joined by a plain TCP connection where the
real path has a port-forward: a client connects to an accepted-and-spliced front socket (as the
agent's traffic port does), its bytes cross the link, the connector dials a local server.  Prints
the bulk rate into a counting sink and the p50/p99 round trip of small requests to an echo server.
Both ends share one core here, so in the cluster (two processes) each pays about half.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time

from tpnb.cluster.agentlink import AgentLinks as AgentSide
from tpnb.connector.agentlink import AgentLinks as ConnectorLinks, _ConnectorSide
from tpnb.proto import pb

IID = "bench0123456789a"


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def main(mb: int, requests: int) -> None:
    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        n = 0
        while d := await r.read(1 << 20):
            n += len(d)
        w.write(str(n).encode())
        await w.drain()
        w.close()

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while d := await r.read(65536):
            w.write(d)
            await w.drain()
        w.close()

    sink_srv = await asyncio.start_server(sink, "127.0.0.1", 0)
    echo_srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    secret = os.urandom(32)
    agent = AgentSide(lambda: [pb.InterceptInfo(id=IID, state=pb.InterceptInfo.ACTIVE, link_secret=secret)])
    port = _free_port()
    await agent.start(port)
    ic = pb.InterceptInfo(id=IID, state=pb.InterceptInfo.ACTIVE,
                          spec=pb.InterceptSpec(target_host="127.0.0.1",
                                                local_port=sink_srv.sockets[0].getsockname()[1]))
    side = _ConnectorSide(ConnectorLinks(None), ic, pb.AgentLink(pod_name="bench", port=port, secret=secret))
    await asyncio.get_running_loop().create_connection(lambda: side, "127.0.0.1", port)
    await asyncio.wait_for(side.ready, 5)

    async def front(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ch = agent.channel_for(IID, w.get_extra_info("peername"))
        assert ch is not None
        await agent.splice(r, w, ch)
    front_srv = await asyncio.start_server(front, "127.0.0.1", 0)
    fport = front_srv.sockets[0].getsockname()[1]

    data = os.urandom(1 << 20)
    r, w = await asyncio.open_connection("127.0.0.1", fport)
    t0 = time.perf_counter()
    for _ in range(mb):
        w.write(data)
        await w.drain()
    w.write_eof()
    got = int(await r.read())
    dt = time.perf_counter() - t0
    assert got == mb << 20, got
    w.close()

    side.target_port = echo_srv.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", fport)
    ts = []
    for _ in range(requests):
        t = time.perf_counter()
        w.write(b"x" * 100)
        await w.drain()
        await r.readexactly(100)
        ts.append(time.perf_counter() - t)
    w.close()
    await asyncio.sleep(0.3)  # the half-close reaches the echo server, which ends its side
    ts.sort()
    print(f"agent link on loopback, one process: bulk {mb / dt:.0f} MB/s ({mb} MiB), "
          f"small request p50 {ts[len(ts) // 2] * 1e6:.0f} µs, p99 {ts[int(len(ts) * 0.99)] * 1e6:.0f} µs")
    for srv in (front_srv, sink_srv, echo_srv):
        srv.close()
    side.close()
    await agent.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    asyncio.run(main(args.mb, args.requests))
