"""Wiretaps, the agent's side: a copy of what the app serves, for the laptop that asked.

A wiretap never takes a request away from the app and never makes an answer
wait.  HTTP/1.1 exchanges are seen through cluster/httproute.py's `tap` hook
(the same h11 path as personal intercepts).  An HTTP/2 connection with prior
knowledge (h2c, as gRPC speaks it; recognised by h2route's `sniff`) is passed to
the app byte for byte while a copy of its bytes is decoded (`H2Copy`, with h2's
own hyperframe and hpack): each stream becomes one exchange (`:path` -- for gRPC
the method --, headers, status, trailers with grpc-status, messages).  Any other
connection is copied as byte counts and its first bytes each way.  Each finished exchange
becomes one `WiretapRecord` per matching wiretap, offered to a bounded buffer
per wiretap: when the buffer is full (the manager, or behind it the laptop,
reads too slowly, or not at all) the record is dropped and counted, and the
count travels with the next upload (`WiretapUpload.dropped`).  One background
task uploads the buffers to the manager (`AgentHub.UploadWiretap`).

Requests that a personal or global intercept sends to a laptop are not served
by the app, so they are not copied: a wiretap shows what the app answers.

Runs inside the cluster image: Python 3.11, grpcio, protobuf, h11, h2 (hpack, hyperframe) and the stdlib.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import h2.errors
import h11
import hpack
from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, PushPromiseFrame,
                              RstStreamFrame, SettingsFrame)

from tpnb.common.httpfilter import Filter

from . import h2route

log = logging.getLogger("tpnb.agent.wiretap")

#: bounds the agent applies whatever a wiretap asks for (memory of the app's pod)
MAX_BODY_LIMIT = 1024 * 1024
MAX_BUFFER_LIMIT = 100_000
#: records per upload message
BATCH = 64
#: after a quiet spell, how long the uploader lets records gather before it sends (a record's
#: serialisation and gRPC write is per message: batching keeps that work off the app's answers)
GATHER = 0.02
CHUNK = 256 * 1024


@dataclass
class _Tap:
    id: str
    filt: Filter | None          # None: every request (and non-HTTP connections)
    max_body: int
    buffer: collections.deque = field(default_factory=collections.deque)
    limit: int = 1000
    dropped: int = 0


def _bounded(v: int, default: int, top: int) -> int:
    return max(0, min(int(v), top)) if v > 0 else default


class Wiretaps:
    """The wiretaps this agent serves (from the manager's instructions), their buffers and uploader."""

    def __init__(self, pb: Any, pod_name: str) -> None:
        self.pb = pb
        self.pod_name = pod_name
        self.taps: dict[str, _Tap] = {}
        self.seq = 0
        self.wake = asyncio.Event()

    # ---------------------------------------------------------- instructions
    def update(self, infos: list[Any]) -> None:
        """The manager's current wiretaps for our workload (a removed one's buffer goes with it)."""
        new: dict[str, _Tap] = {}
        for w in infos:
            old = self.taps.get(w.id)
            try:
                filt = Filter.from_spec(w.spec) if _is_filtered(w.spec) else None
            except re.error:
                continue  # the manager checks filters; never let a bad one break the app
            max_body = _bounded(w.max_body, 4096, MAX_BODY_LIMIT)
            limit = _bounded(w.buffer, 1000, MAX_BUFFER_LIMIT) or 1
            if old is not None:
                old.filt, old.max_body, old.limit = filt, max_body, limit
                new[w.id] = old
            else:
                new[w.id] = _Tap(w.id, filt, max_body, limit=limit)
        self.taps = new

    def clear(self) -> None:
        self.taps = {}

    def __bool__(self) -> bool:
        return bool(self.taps)

    def wants_tcp(self) -> bool:
        """Whether a connection that is not HTTP/1.1 goes through `copy_tcp`: whenever there are
        wiretaps, since an HTTP/2 one is decoded stream by stream, each stream copied for the
        wiretaps whose filters it matches; another one is recorded (counts and first bytes) only for
        wiretaps without filters, and for the others just passed on."""
        return bool(self.taps)

    # ---------------------------------------------------------- records
    def matching(self, target: bytes, headers: list[tuple[bytes, bytes]]) -> list[_Tap]:
        """The wiretaps that copy a request with this target (path) and these headers."""
        return [t for t in self.taps.values() if t.filt is None or t.filt.matches(target, headers)]

    def count_drop(self, taps: list[_Tap]) -> None:
        """A request these wiretaps would copy and cannot (a bound reached): counted as dropped."""
        for t in taps:
            t.dropped += 1
        self.wake.set()

    def exchange(self, req: h11.Request, peer: tuple[Any, ...]) -> HttpExchange | None:
        """What httproute's `tap` hook calls for a request the app serves."""
        taps = self.matching(req.target, list(req.headers))
        if not taps:
            return None
        return HttpExchange(self, taps, req.method, req.target, req.http_version, list(req.headers),
                            _peer_text(peer))

    def offer(self, taps: list[_Tap], make: Callable[[_Tap], Any]) -> None:
        """Queue one record per wiretap; a full buffer drops it (counted).  Never blocks."""
        for t in taps:
            if self.taps.get(t.id) is not t:
                continue  # removed meanwhile
            if len(t.buffer) >= t.limit:
                t.dropped += 1
                continue
            self.seq += 1
            rec = make(t)
            rec.wiretap_id, rec.seq, rec.pod_name = t.id, self.seq, self.pod_name
            t.buffer.append(rec)
        self.wake.set()

    def take(self, most: int = BATCH) -> list[Any]:
        out: list[Any] = []
        for t in list(self.taps.values()):
            while t.buffer and len(out) < most:
                out.append(t.buffer.popleft())
        return out

    def drops(self) -> dict[str, int]:
        return {t.id: t.dropped for t in self.taps.values() if t.dropped}

    # ---------------------------------------------------------- upload
    async def upload_loop(self, stub: Any, agent_id: str) -> None:
        """Send buffered records (and drop counts) to the manager for this agent session.

        Never returns and never raises but CancelledError: a failed call is retried (records
        keep their places in the bounded buffers meanwhile, and overflow is counted)."""
        while True:
            while not self.taps:
                self.wake.clear()
                await self.wake.wait()
            try:
                await self._upload(stub, agent_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the manager went away or restarted: retry
                log.info("wiretap upload ended (%s); retrying", getattr(exc, "details", lambda: exc)())
            await asyncio.sleep(1.0)

    async def _upload(self, stub: Any, agent_id: str) -> None:
        pb = self.pb
        call = stub.UploadWiretap()
        sent_drops: dict[str, int] = {}
        try:
            while True:
                self.wake.clear()
                recs = self.take()
                drops = self.drops()
                if recs or drops != sent_drops:
                    await call.write(pb.WiretapUpload(agent_id=agent_id, records=recs, dropped=drops))
                    sent_drops = drops
                    continue
                try:
                    await asyncio.wait_for(self.wake.wait(), 5.0)
                except asyncio.TimeoutError:
                    await call.write(pb.WiretapUpload(agent_id=agent_id))  # finds a dead call
                    continue
                await asyncio.sleep(GATHER)   # let the next records join this one: one message for many
        finally:
            with contextlib.suppress(Exception):
                call.cancel()

    # ---------------------------------------------------------- TCP
    async def copy_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       ar: asyncio.StreamReader, aw: asyncio.StreamWriter, first: bytes,
                       peer: tuple[Any, ...]) -> tuple[int, int]:
        """Splice client <-> app (first: client bytes already read), then record counts and first bytes;
        an HTTP/2 connection (`first` is its preface) is recorded stream by stream instead (`H2Copy`).

        Written here rather than with common.forward.splice because the copy needs the bytes of
        each direction; the pumps are plain read/write loops with drain (backpressure)."""
        client = _peer_text(peer)
        h2copy = H2Copy(self, client) if first.startswith(h2route.PREFACE) else None
        taps = [t for t in self.taps.values() if t.filt is None] if h2copy is None else []
        keep = max((t.max_body for t in taps), default=0)
        t0, wall = time.perf_counter(), time.time()
        heads = [bytearray(first[:keep]), bytearray()]
        counts = [len(first), 0]
        if first:
            aw.write(first)
        if h2copy is not None:
            h2copy.feed(True, first)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, i: int) -> None:
            try:
                while data := await src.read(CHUNK):
                    counts[i] += len(data)
                    if len(heads[i]) < keep:
                        heads[i] += data[: keep - len(heads[i])]
                    dst.write(data)   # passed on first: the copy is decoded after, before the next read
                    if h2copy is not None:   # (no await between: the answer to it is decoded after it)
                        h2copy.feed(i == 0, data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()
            except (OSError, RuntimeError):
                with contextlib.suppress(Exception):
                    dst.transport.abort()

        try:
            await asyncio.gather(pump(reader, aw, 0), pump(ar, writer, 1))
        finally:
            for w in (writer, aw):
                with contextlib.suppress(Exception):
                    w.close()
            ms = (time.perf_counter() - t0) * 1000
            if h2copy is not None:
                h2copy.close()

            def make(t: _Tap) -> Any:
                return self.pb.WiretapRecord(
                    kind=self.pb.WiretapRecord.TCP, client=client, start_unix=wall, latency_ms=ms,
                    bytes_up=counts[0], bytes_down=counts[1], first_up=bytes(heads[0][: t.max_body]),
                    first_down=bytes(heads[1][: t.max_body]))
            if taps:
                self.offer(taps, make)
        return counts[0], counts[1]


def _is_filtered(spec: Any) -> bool:
    return bool(list(spec.http_headers) or spec.http_path_prefix or spec.http_path_equal or spec.http_path_regex)


def _peer_text(peer: tuple[Any, ...]) -> str:
    if not peer:
        return ""
    return f"{peer[0]}:{peer[1]}" if len(peer) > 1 else str(peer[0])


class HttpExchange:
    """One request/response as it passes to and from the app: what httproute's `tap` hook gets for an
    HTTP/1.1 request (httproute.Exchange), and what `H2Copy` makes of one HTTP/2 stream."""

    def __init__(self, owner: Wiretaps, taps: list[_Tap], method: bytes, target: bytes, version: bytes,
                 headers: list[tuple[bytes, bytes]], client: str, keep: int | None = None) -> None:
        self.owner, self.taps, self.client = owner, taps, client
        self.method, self.target, self.version, self.headers = method, target, version, headers
        self.keep = max(t.max_body for t in taps) if keep is None else keep
        self.t0, self.wall = time.perf_counter(), time.time()
        self.req_body, self.resp_body = bytearray(), bytearray()
        self.req_bytes = self.resp_bytes = 0
        self.status: int | None = None   # of the final response (or of an informational one until then)
        self.final = False
        self.reason = b""
        self.resp_headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.messages: list[_GrpcMessages] | None = None   # gRPC calls: [request, response] counters
        self.finished = False

    def request_data(self, data: bytes) -> None:
        self.req_bytes += len(data)
        if len(self.req_body) < self.keep:
            self.req_body += data[: self.keep - len(self.req_body)]
        if self.messages is not None:
            self.messages[0].feed(data)

    def response(self, ev: h11.Response | h11.InformationalResponse) -> None:
        """An h11 response head (final, or informational: kept only until the final one)."""
        self.head(ev.status_code, bytes(ev.reason), list(ev.headers),
                  final=isinstance(ev, h11.Response) or ev.status_code == 101)

    def head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], final: bool = True) -> None:
        if final or not self.final:
            self.status, self.reason, self.resp_headers, self.final = status, reason, headers, final

    def response_data(self, data: bytes) -> None:
        self.resp_bytes += len(data)
        if len(self.resp_body) < self.keep:
            self.resp_body += data[: self.keep - len(self.resp_body)]
        if self.messages is not None:
            self.messages[1].feed(data)

    def done(self, error: str = "") -> None:
        if self.finished:
            return
        self.finished = True
        pb = self.owner.pb
        ms = (time.perf_counter() - self.t0) * 1000
        if self.status is None and not error:
            error = "no response"

        def make(t: _Tap) -> Any:
            rec = pb.WiretapRecord(
                kind=pb.WiretapRecord.HTTP, client=self.client, start_unix=self.wall, latency_ms=ms,
                method=self.method.decode("ascii", "replace"), target=bytes(self.target),
                http_version=self.version.decode("ascii", "replace"),
                request_headers=[pb.Header(name=bytes(k), value=bytes(v)) for k, v in self.headers],
                request_body=bytes(self.req_body[: t.max_body]), request_bytes=self.req_bytes,
                response_body=bytes(self.resp_body[: t.max_body]), response_bytes=self.resp_bytes,
                error=error)
            if self.status is not None:
                rec.status = self.status
                rec.reason = self.reason
                rec.response_headers.extend(pb.Header(name=bytes(k), value=bytes(v)) for k, v in self.resp_headers)
            rec.response_trailers.extend(pb.Header(name=bytes(k), value=bytes(v)) for k, v in self.trailers)
            if self.messages is not None:
                rec.request_messages, rec.response_messages = self.messages[0].count, self.messages[1].count
            return rec
        try:
            self.owner.offer(self.taps, make)
        except Exception:  # noqa: BLE001 - a copy never breaks the app's answer
            log.exception("wiretap record failed")


class _GrpcMessages:
    """Counts the messages of a gRPC body as it passes: each is a 5-byte prefix (compressed flag,
    32-bit length) and its bytes (the gRPC-over-HTTP/2 framing; grpcio does not expose a parser of it)."""

    def __init__(self) -> None:
        self.count = 0
        self._head = bytearray()
        self._skip = 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
                continue
            need = 5 - len(self._head)
            self._head += view[:need]
            view = view[need:]
            if len(self._head) == 5:
                self.count += 1
                self._skip = int.from_bytes(self._head[1:5], "big")
                self._head.clear()


# ------------------------------------------------------------------ HTTP/2 (h2c, gRPC)

#: a frame other than DATA larger than this stops the decoding of its connection (DATA is never buffered)
MAX_FRAME = 1 << 20
#: a header block (HEADERS + CONTINUATION) larger than this likewise
MAX_HEADER_BLOCK = 256 * 1024
#: the HPACK dynamic table a peer may ask for (SETTINGS_HEADER_TABLE_SIZE) that we follow
MAX_HPACK_TABLE = 64 * 1024
#: streams of one connection being copied at once; beyond, new streams are dropped (counted)
MAX_COPIED_STREAMS = 256
#: body bytes one connection's open streams may hold (a stream started beyond keeps smaller bodies)
BODY_BUDGET = 16 << 20


class _Frames:
    """One direction of an HTTP/2 connection cut into frames (hyperframe parses them).

    DATA payloads are passed on as they arrive, never buffered whole (a DATA frame may be as large as
    the receiver allowed, up to 16 MiB); other frames are small and are parsed once complete."""

    def __init__(self, skip: int = 0) -> None:
        self.buf = bytearray()
        self.skip = skip            # unframed bytes first (the client's connection preface)
        self.decoder = hpack.Decoder()
        self.block: bytearray | None = None   # a header block waiting for its CONTINUATIONs
        self.block_sid = 0
        self.block_end = False      # its HEADERS frame had END_STREAM
        self.block_push = False     # it is a PUSH_PROMISE's (decoded for HPACK's state, then ignored)
        self._data: tuple[int, bool] | None = None   # the DATA frame in progress: stream, END_STREAM
        self._left = self._pad = 0

    def feed(self, data: bytes) -> list[Any]:
        """Frames (hyperframe objects, DATA excepted) and ("data", sid, bytes) / ("end", sid) items."""
        buf = self.buf
        if self.skip:
            n = min(self.skip, len(data))
            self.skip -= n
            data = data[n:]
        buf += data
        out: list[Any] = []
        pos = 0
        while True:
            if self._data is not None:   # inside a DATA frame: its bytes as they come, then its padding
                sid, end = self._data
                n = min(self._left, len(buf) - pos)
                if n:
                    out.append(("data", sid, bytes(buf[pos:pos + n])))
                    pos += n
                    self._left -= n
                n = min(self._pad, len(buf) - pos) if not self._left else 0
                pos += n
                self._pad -= n
                if self._left or self._pad:
                    break
                self._data = None
                if end:
                    out.append(("end", sid))
                continue
            if len(buf) - pos < 9:
                break
            frame, length = Frame.parse_frame_header(memoryview(bytes(buf[pos:pos + 9])))
            if isinstance(frame, DataFrame):
                head = 9
                pad = 0
                if "PADDED" in frame.flags:
                    if len(buf) - pos < 10:
                        break
                    pad, head = buf[pos + 9], 10
                if length < head - 9 + pad:
                    raise ValueError("a DATA frame's padding is longer than the frame")
                self._data = (frame.stream_id, "END_STREAM" in frame.flags)
                self._left, self._pad = length - (head - 9) - pad, pad
                pos += head
                continue
            if length > MAX_FRAME:
                raise ValueError(f"a {type(frame).__name__} of {length} bytes")
            if len(buf) - pos < 9 + length:
                break
            frame.parse_body(memoryview(bytes(buf[pos + 9:pos + 9 + length])))
            out.append(frame)
            pos += 9 + length
        del buf[:pos]
        return out


class H2Copy:
    """A copy of one HTTP/2 connection with prior knowledge (h2c, as gRPC speaks it), decoded into one
    `HttpExchange` per stream: `:method`, `:path` (for gRPC the method), headers, `:status`, trailers
    (grpc-status), latency, bounded bodies, gRPC message counts.

    It only reads copies of the bytes that `Wiretaps.copy_tcp` passes between client and app (feed()
    is called before each chunk is written on, and never raises): the connection itself is not
    touched, and nothing here can hold it up but the decoding's CPU.  Why not h2's H2Connection, as
    cluster/h2route.py uses: that is an endpoint's state machine (its own settings, windows and
    streams), which a bystander would have to fake for both ends; an observer needs the frames and
    the two HPACK contexts only, which are h2's own building blocks (hyperframe, hpack).  What is
    written here is the bookkeeping of streams to records.  A connection this cannot decode (a
    malformed frame, an oversized header block) is no longer decoded: its open streams are recorded
    with the reason, and the app's traffic goes on.
    """

    def __init__(self, owner: Wiretaps, client: str) -> None:
        self.owner, self.client = owner, client
        self.dirs = (_Frames(skip=len(h2route.PREFACE)), _Frames())   # client -> app, app -> client
        self.streams: dict[int, HttpExchange] = {}
        self.highest = 0      # the client's highest stream id so far (a HEADERS above it opens a stream)
        self.reserved = 0     # body bytes the open exchanges may keep (BODY_BUDGET)
        self.failed = ""
        self.decoded = 0      # streams seen

    def feed(self, up: bool, data: bytes) -> None:
        """Bytes as they pass, client -> app (`up`) or back."""
        if self.failed or not data:
            return
        try:
            for item in self.dirs[0 if up else 1].feed(data):
                self._item(up, item)
        except Exception as exc:  # noqa: BLE001 - a copy never breaks the app's traffic
            self._fail(f"the wiretap stopped decoding this HTTP/2 connection ({type(exc).__name__}: {exc})")

    def close(self) -> None:
        """The connection ended: streams still open are recorded as unfinished."""
        for sid in list(self.streams):
            self._done(sid, "the connection ended before the answer was complete")

    # ---------------------------------------------------------- frames
    def _item(self, up: bool, item: Any) -> None:
        d = self.dirs[0 if up else 1]
        if isinstance(item, tuple):
            ex = self.streams.get(item[1])
            if ex is None:
                return
            if item[0] == "data":
                (ex.request_data if up else ex.response_data)(item[2])
            elif not up:   # the app ended its answer
                self._done(item[1])
            return
        if isinstance(item, (HeadersFrame, PushPromiseFrame)):
            if d.block is not None:
                raise ValueError("a header block interrupted by another frame")
            d.block, d.block_sid = bytearray(item.data), item.stream_id
            d.block_end = "END_STREAM" in item.flags
            d.block_push = isinstance(item, PushPromiseFrame)
            if "END_HEADERS" in item.flags:
                self._headers(up, d)
        elif isinstance(item, ContinuationFrame):
            if d.block is None or item.stream_id != d.block_sid:
                raise ValueError("a CONTINUATION frame out of place")
            d.block += item.data
            if len(d.block) > MAX_HEADER_BLOCK:
                raise ValueError(f"a header block of more than {MAX_HEADER_BLOCK} bytes")
            if "END_HEADERS" in item.flags:
                self._headers(up, d)
        elif d.block is not None:
            raise ValueError("a header block interrupted by another frame")
        elif isinstance(item, RstStreamFrame):
            code = _error_name(item.error_code)
            self._done(item.stream_id, f"{'the client' if up else 'the app'} reset the stream ({code})")
        elif isinstance(item, SettingsFrame):
            size = item.settings.get(SettingsFrame.HEADER_TABLE_SIZE)
            if size is not None:   # the table the other side's encoder may now use for our peer
                self.dirs[1 if up else 0].decoder.max_allowed_table_size = min(size, MAX_HPACK_TABLE)
        elif isinstance(item, GoAwayFrame) and not up:
            for sid in [s for s in self.streams if s > item.last_stream_id]:
                self._done(sid, "not processed by the app (GOAWAY); the client may send it again")

    def _headers(self, up: bool, d: _Frames) -> None:
        block, sid, end, push = bytes(d.block or b""), d.block_sid, d.block_end, d.block_push
        d.block = None
        headers = [(bytes(n), bytes(v)) for n, v in d.decoder.decode(block, raw=True)]  # always: HPACK's state
        if push:
            return
        if up:
            if sid > self.highest and sid % 2:
                self.highest = sid
                self._open(sid, headers, end)
            return   # (else the request's trailers: not recorded)
        ex = self.streams.get(sid)
        if ex is None:
            return
        if ex.final:
            ex.trailers = headers
        else:
            status = next((v for n, v in headers if n == b":status"), b"")
            code = int(status) if status.isdigit() else 0
            ex.head(code, b"", headers, final=not 100 <= code < 200)
        if end:
            self._done(sid)

    # ---------------------------------------------------------- streams to records
    def _open(self, sid: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        self.decoded += 1
        req = h2route.H2Request.from_headers(headers)
        taps = self.owner.matching(req.target, headers)
        if not taps:
            return
        if len(self.streams) >= MAX_COPIED_STREAMS:
            self.owner.count_drop(taps)
            return
        want = max(t.max_body for t in taps)
        keep = max(0, min(want, (BODY_BUDGET - self.reserved) // 2))
        self.reserved += keep * 2
        ex = HttpExchange(self.owner, taps, req.method, req.target, b"2", headers, self.client, keep=keep)
        if h2route.is_grpc(headers):
            ex.messages = [_GrpcMessages(), _GrpcMessages()]
        self.streams[sid] = ex

    def _done(self, sid: int, error: str = "") -> None:
        ex = self.streams.pop(sid, None)
        if ex is not None:
            self.reserved -= ex.keep * 2
            ex.done(error)

    def _fail(self, why: str) -> None:
        log.info("%s: %s", self.client, why)
        self.failed = why
        for sid in list(self.streams):
            self._done(sid, why)


def _error_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return f"error {code}"
