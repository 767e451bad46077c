"""The traffic-agent's byte relay to the app (a connection nothing intercepts or filters).

`tpnb.common.forward.splice` joins two asyncio streams with a task per direction:
each read wakes its task, a future and a loop turn per chunk.  Here both
connections are asyncio Protocols whose callbacks write straight into the other
transport, so a request and its answer cross the agent in the callbacks that read
them.  Flow control is the transports' own: a full write buffer on one side stops
reading the other (pause_writing / pause_reading).  Half-closes pass through;
the relay ends when both directions have ended or either connection is lost.

Why by hand: it is the few lines of glue between two asyncio transports; no
library relays an already accepted asyncio stream this way.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any


class _Side(asyncio.Protocol):
    """One of the two connections; `peer` is the other one."""

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.bytes = 0
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            if peer.transport.can_write_eof():
                with contextlib.suppress(OSError):
                    peer.transport.write_eof()
        if peer is not None and peer.eof:
            self.relay.end(None)
        return True  # half-closed: the other direction goes on

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.end(exc)

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.is_reading():
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing() \
                and not peer.transport.is_reading():
            peer.transport.resume_reading()


class _Relay:
    def __init__(self) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.error: BaseException | None = None

    def end(self, exc: BaseException | None) -> None:
        if not self.done.done():
            self.error = exc
            self.done.set_result(None)


def take_buffered(reader: asyncio.StreamReader) -> bytes:
    """What a StreamReader has read but not yet handed out (its `_buffer`, an asyncio internal
    stable since 3.4), when its connection is taken over by a Protocol."""
    buf = getattr(reader, "_buffer", None)
    if not buf:
        return b""
    data = bytes(buf)
    buf.clear()
    return data


async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int,
                first: bytes = b"", timeout: float = 10.0) -> tuple[int, int]:
    """Join an accepted connection (as the streams that accepted it) to host:port until both
    directions end; then close both.  Returns (bytes client->upstream, bytes upstream->client).
    OSError / TimeoutError when host:port cannot be reached (the caller decides what the client sees).
    A reset on either side, or cancellation, aborts both connections."""
    loop = asyncio.get_running_loop()
    r = _Relay()
    up, down = _Side(r), _Side(r)
    down.peer, up.peer = up, down
    t: Any = writer.transport
    down.transport = t  # before connecting: a server that speaks first (SSH) may do so at once
    await asyncio.wait_for(loop.create_connection(lambda: up, host, port), timeout)
    pending = first + take_buffered(reader)
    eof = reader.at_eof()
    t.set_protocol(down)
    if not t.is_reading() and not t.is_closing():
        t.resume_reading()
    ok = False
    try:
        if pending:
            down.data_received(pending)
        if eof:
            down.eof_received()
        if t.is_closing():
            down.connection_lost(None)
        await r.done
        ok = r.error is None
    finally:
        for side in (down, up):
            if side.transport is not None:
                if ok:
                    side.transport.close()
                else:
                    side.transport.abort()
    return down.bytes, up.bytes
