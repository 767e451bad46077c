"""The SPDY port-forward client's framing and relay logic (daemon/spdy.py).

Pure logic: bytes are fed into the client's receive buffer the way the SSL
transport would, and the local side is a socketpair.  The protocol against a
real kubelet and containerd is covered by tests/test_kube_side.py (cluster
tests, both protocols) and every `tpnb connect` test.
"""
from __future__ import annotations

import asyncio
import os
import socket
import struct
import zlib

import pytest

from tpnb.connector import spdy

# async tests run on asyncio through anyio's pytest plugin
pytestmark = [pytest.mark.unit, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeTransport:
    """Records what the client writes and whether it paused reading."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.paused = False
        self.pauses = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str) -> None:
        return None

    def close(self) -> None:
        self.closed = True


def feed(conn: spdy._Conn, data: bytes, pieces: int = 1) -> None:
    """Deliver `data` in `pieces` reads, through get_buffer/buffer_updated."""
    step = max(1, len(data) // pieces)
    pos = 0
    while pos < len(data):
        chunk = data[pos:pos + step]
        buf = conn.get_buffer(len(chunk))
        assert len(buf) >= len(chunk)
        buf[: len(chunk)] = chunk
        conn.buffer_updated(len(chunk))
        pos += len(chunk)


def data_frame(sid: int, payload: bytes, fin: bool = False) -> bytes:
    return spdy.data_header(sid, spdy.FLAG_FIN if fin else 0, len(payload)) + payload


def syn_reply(sid: int) -> bytes:
    return spdy.control_frame(spdy.SYN_REPLY, 0, struct.pack("!I", sid) + zlib.compress(b""))


def parse_frames(raw: bytes) -> list[tuple[bool, int, int, bytes]]:
    out, pos = [], 0
    while pos + 8 <= len(raw):
        word, flags, lhi, llo = struct.unpack_from("!IBBH", raw, pos)
        length = (lhi << 16) | llo
        payload = raw[pos + 8: pos + 8 + length]
        pos += 8 + length
        if word & 0x80000000:
            out.append((True, word & 0xFFFF, flags, payload))
        else:
            out.append((False, word & 0x7FFFFFFF, flags, payload))
    return out


def new_stream() -> tuple[spdy.SpdyStream, spdy._Conn, FakeTransport]:
    conn = spdy._Conn()
    tr = FakeTransport()
    conn.connection_made(tr)  # type: ignore[arg-type]
    return spdy.SpdyStream(conn, 7070), conn, tr


def test_header_block_and_frames() -> None:
    block = spdy.header_block({"streamType": "data", "port": "7070"})
    n, = struct.unpack_from("!I", block)
    assert n == 2 and b"streamtype" in block  # names go out in lower case
    f = spdy.control_frame(spdy.PING, 0, b"\x00\x00\x00\x07")
    assert f[:2] == b"\x80\x03" and f[2:4] == b"\x00\x06" and f[5:8] == b"\x00\x00\x04"
    assert spdy.data_header(3, 1, 70000) == b"\x00\x00\x00\x03\x01\x01\x11\x70"


async def test_open_sends_both_streams_and_waits_for_the_reply() -> None:
    st, conn, tr = new_stream()
    task = asyncio.create_task(st.open(5))
    await asyncio.sleep(0)
    frames = parse_frames(bytes(tr.out))
    assert [(c, k) for c, k, _, _ in frames] == [(True, spdy.SYN_STREAM), (True, spdy.SYN_STREAM)]
    # stream ids 1 (error, half-closed at once) and 3 (data); headers inflate without a dictionary
    z = zlib.decompressobj()
    ids = []
    for _, _, flags, payload in frames:
        sid, = struct.unpack_from("!I", payload)
        ids.append((sid, flags))
        headers = z.decompress(payload[10:])
        assert b"port" in headers and b"7070" in headers and b"requestid" in headers
    assert ids == [(1, spdy.FLAG_FIN), (3, 0)]
    early = b"hello before the reply"
    feed(conn, syn_reply(1) + syn_reply(3) + data_frame(3, early))
    assert await asyncio.wait_for(task, 2) == []
    # the data frame after the reply stays buffered for the relay
    a, b = socket.socketpair()
    a.setblocking(False)
    feed(conn, data_frame(3, b"", fin=True))
    await asyncio.wait_for(st.pump_down(a), 2)
    assert b.recv(100) == early and b.recv(100) == b""  # then the FIN half-closed the socket


async def test_pump_down_reassembles_split_and_oversized_frames() -> None:
    st, conn, tr = new_stream()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    payloads = [os.urandom(n) for n in (1, 32 * 1024, 100, 3 * 1024 * 1024, 5000)]
    wire = b"".join(data_frame(3, p) for p in payloads) + spdy.control_frame(spdy.PING, 0, b"\0\0\0\x02") \
        + data_frame(3, b"", fin=True)
    got = bytearray()
    done = asyncio.create_task(st.pump_down(a))
    for i in range(0, len(wire), 7001):  # reads cut frames (and headers) anywhere
        feed(conn, wire[i:i + 7001])
        await asyncio.sleep(0)
        while True:
            try:
                chunk = b.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            got += chunk
        while tr.paused and not done.done():  # the local socket was full: drain it so the relay resumes
            await asyncio.sleep(0.01)
            try:
                got += b.recv(1 << 20)
            except BlockingIOError:
                pass
    await asyncio.wait_for(done, 5)
    b.setblocking(True)
    b.settimeout(2)
    while chunk := b.recv(1 << 20):
        got += chunk
    assert bytes(got) == b"".join(payloads)
    # the PING was answered with the same id
    assert (True, spdy.PING, 0, b"\0\0\0\x02") in parse_frames(bytes(tr.out))
    assert tr.pauses >= 1  # 3 MiB did not fit the socket at once: reading paused meanwhile


async def test_error_stream_text_ends_the_relay() -> None:
    st, conn, _ = new_stream()
    a, b = socket.socketpair()
    a.setblocking(False)
    done = asyncio.create_task(st.pump_down(a))
    feed(conn, data_frame(1, b"error forwarding port 7070: connect: connection refused"))
    await asyncio.wait_for(done, 2)
    assert "connection refused" in st.error


async def test_connection_lost_mid_frame_is_an_error() -> None:
    st, conn, _ = new_stream()
    a, _b = socket.socketpair()
    a.setblocking(False)
    done = asyncio.create_task(st.pump_down(a))
    feed(conn, data_frame(3, b"x" * 100)[:50])
    conn.connection_lost(None)
    with pytest.raises(spdy.SpdyError):
        await asyncio.wait_for(done, 2)


async def test_pump_up_frames_local_bytes_and_ends_with_fin() -> None:
    st, _, tr = new_stream()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    payload = os.urandom(600 * 1024)

    async def send() -> None:
        await asyncio.get_running_loop().sock_sendall(b, payload)
        b.shutdown(socket.SHUT_WR)

    sender = asyncio.create_task(send())
    sent = await asyncio.wait_for(st.pump_up(a), 5)
    await sender
    assert sent == len(payload)
    frames = parse_frames(bytes(tr.out))
    assert all(not c and k == 3 for c, k, _, _ in frames)
    assert b"".join(p for _, _, _, p in frames) == payload
    assert frames[-1][2] == spdy.FLAG_FIN and frames[-1][3] == b""
    assert max(len(p) for _, _, _, p in frames) <= spdy.FRAME_MAX


class Recorder(asyncio.BufferedProtocol):
    """An in-process protocol on a stream (what the agent link is): keeps what it gets, small buffers."""

    def __init__(self, keep_open: bool = False) -> None:
        self.buf = bytearray(1000)  # smaller than the frames: a payload must be handed over in pieces
        self.got = bytearray()
        self.events: list[str] = []
        self.transport: asyncio.Transport | None = None
        self.keep_open = keep_open

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.events.append("made")

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        self.got += self.buf[:nbytes]

    def eof_received(self) -> bool:
        self.events.append("eof")
        return self.keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(f"lost {type(exc).__name__}" if exc else "lost")

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")


async def test_attach_runs_a_protocol_on_the_stream_in_order() -> None:
    st, conn, tr = new_stream()
    proto = Recorder()
    payloads = [os.urandom(n) for n in (5, 2500, 70 * 1024, 1)]
    done = st.attach(proto, [b"early:"])
    wire = b"".join(data_frame(3, p) for p in payloads) + spdy.control_frame(spdy.PING, 0, b"\0\0\0\x04") \
        + data_frame(3, b"", fin=True)
    for i in range(0, len(wire), 4099):  # reads cut frames anywhere
        feed(conn, wire[i:i + 4099])
    await asyncio.wait_for(done, 2)
    assert bytes(proto.got) == b"early:" + b"".join(payloads)
    assert proto.events == ["made", "eof", "lost"]  # the stream's FIN, then the end
    assert (True, spdy.PING, 0, b"\0\0\0\x04") in parse_frames(bytes(tr.out))
    assert tr.closed  # the stream's own connection is closed at the end


async def test_attach_writes_frames_and_passes_write_pauses() -> None:
    st, conn, tr = new_stream()
    proto = Recorder(keep_open=True)
    done = st.attach(proto)
    assert proto.transport is not None
    big = os.urandom(100 * 1024)
    proto.transport.write(b"small")
    proto.transport.write_parts((b"HEADER123", big))  # type: ignore[attr-defined]
    frames = parse_frames(bytes(tr.out))
    assert [(c, k, p) for c, k, _, p in frames] == [(False, 3, b"small"), (False, 3, b"HEADER123" + big)]
    conn.pause_writing()
    conn.resume_writing()
    assert proto.events[-2:] == ["pause", "resume"]
    # the pod side ends its direction: the protocol keeps sending until it closes
    feed(conn, data_frame(3, b"", fin=True))
    await asyncio.sleep(0)
    assert not done.done() and "eof" in proto.events
    proto.transport.write(b"last words")
    proto.transport.close()
    await asyncio.wait_for(done, 2)
    frames = parse_frames(bytes(tr.out))
    assert frames[-2][3] == b"last words" and frames[-1][2] == spdy.FLAG_FIN
    assert proto.events[-1] == "lost" and tr.closed


async def test_attach_connection_lost_mid_frame_is_an_error_for_the_protocol() -> None:
    st, conn, _ = new_stream()
    proto = Recorder()
    done = st.attach(proto)
    feed(conn, data_frame(3, b"x" * 100)[:50])
    conn.connection_lost(None)
    await asyncio.wait_for(done, 2)
    assert proto.events[-1] == "lost SpdyError"
