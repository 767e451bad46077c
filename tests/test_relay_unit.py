"""Unit tests: the traffic-agent's Protocol relay to the app (cluster/relay.py), loopback only."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tpnb.cluster import relay

pytestmark = pytest.mark.unit


def test_relay_passes_bytes_both_ways_half_closes_and_a_server_that_speaks_first() -> None:
    async def main() -> None:
        async def app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"SSH-2.0-banner\r\n")  # the app speaks first, at once
            data = await r.read()            # everything until the client's half-close
            w.write(b"got %d" % len(data))
            w.close()

        srv = await asyncio.start_server(app, "127.0.0.1", 0)
        ap = srv.sockets[0].getsockname()[1]
        counts: list[tuple[int, int]] = []

        async def front(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            counts.append(await relay.relay(r, w, "127.0.0.1", ap, first=b"<first>"))

        loop = asyncio.get_running_loop()
        connect = loop.create_connection

        async def slow_connect(*a: Any, **kw: Any) -> Any:
            got = await connect(*a, **kw)
            await asyncio.sleep(0.02)  # the banner arrives before the relay goes on (as it may on 3.11)
            return got
        loop.create_connection = slow_connect  # type: ignore[method-assign]

        fs = await asyncio.start_server(front, "127.0.0.1", 0)
        fp = fs.sockets[0].getsockname()[1]
        try:
            for i in range(20):  # the banner must never be lost, however the callbacks interleave
                r, w = await asyncio.open_connection("127.0.0.1", fp)
                assert await asyncio.wait_for(r.readuntil(b"\r\n"), 5) == b"SSH-2.0-banner\r\n"
                body = b"x" * (i * 50_000)
                w.write(body)
                w.write_eof()
                assert await asyncio.wait_for(r.read(), 10) == b"got %d" % (len(body) + 7)
                w.close()
            await asyncio.sleep(0.1)
            assert counts[-1] == (19 * 50_000 + 7, len(b"SSH-2.0-banner\r\n") + len(b"got %d" % (19 * 50_000 + 7)))
            # nothing listens: the caller hears it (the agent resets the client)
            fs2 = await asyncio.start_server(lambda r, w: relay.relay(r, w, "127.0.0.1", 1), "127.0.0.1", 0)
            r, w = await asyncio.open_connection("127.0.0.1", fs2.sockets[0].getsockname()[1])
            fs2.close()
            w.close()
        finally:
            srv.close()
            fs.close()
    asyncio.run(asyncio.wait_for(main(), 60))
