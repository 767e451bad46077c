"""Wiretaps, the agent's side: a copy of what the app serves, for the laptop that asked.

A wiretap never takes a request away from the app and never makes an answer
wait.  HTTP/1.1 exchanges are seen through cluster/httproute.py's `tap` hook
(the same h11 path as personal intercepts); a connection that is not HTTP/1.1
is copied as byte counts and its first bytes each way.  Each finished exchange
becomes one `WiretapRecord` per matching wiretap, offered to a bounded buffer
per wiretap: when the buffer is full (the manager, or behind it the laptop,
reads too slowly, or not at all) the record is dropped and counted, and the
count travels with the next upload (`WiretapUpload.dropped`).  One background
task uploads the buffers to the manager (`AgentHub.UploadWiretap`).

Requests that a personal or global intercept sends to a laptop are not served
by the app, so they are not copied: a wiretap shows what the app answers.

Runs inside the cluster image: Python 3.11, grpcio, protobuf, h11 and the stdlib.
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

import h11

from tpnb.common.httpfilter import Filter

log = logging.getLogger("tpnb.agent.wiretap")

#: bounds the agent applies whatever a wiretap asks for (memory of the app's pod)
MAX_BODY_LIMIT = 1024 * 1024
MAX_BUFFER_LIMIT = 100_000
#: records per upload message
BATCH = 64
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
        """A connection that is not HTTP/1.1 is copied only for wiretaps without HTTP filters."""
        return any(t.filt is None for t in self.taps.values())

    # ---------------------------------------------------------- records
    def exchange(self, req: h11.Request, peer: tuple[Any, ...]) -> HttpExchange | None:
        """What httproute's `tap` hook calls for a request the app serves."""
        taps = [t for t in self.taps.values()
                if t.filt is None or t.filt.matches(req.target, list(req.headers))]
        if not taps:
            return None
        return HttpExchange(self, taps, req, _peer_text(peer))

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
        finally:
            with contextlib.suppress(Exception):
                call.cancel()

    # ---------------------------------------------------------- TCP
    async def copy_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       ar: asyncio.StreamReader, aw: asyncio.StreamWriter, first: bytes,
                       peer: tuple[Any, ...]) -> tuple[int, int]:
        """Splice client <-> app (first: client bytes already read), then record counts and first bytes.

        Written here rather than with common.forward.splice because the copy needs the first
        bytes of each direction; the pumps are plain read/write loops with drain (backpressure)."""
        taps = [t for t in self.taps.values() if t.filt is None]
        keep = max((t.max_body for t in taps), default=0)
        t0, wall = time.perf_counter(), time.time()
        heads = [bytearray(first[:keep]), bytearray()]
        counts = [len(first), 0]
        if first:
            aw.write(first)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, i: int) -> None:
            try:
                while data := await src.read(CHUNK):
                    counts[i] += len(data)
                    if len(heads[i]) < keep:
                        heads[i] += data[: keep - len(heads[i])]
                    dst.write(data)
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
            client = _peer_text(peer)

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
    """One request/response as httproute passes it to the app (httproute.Exchange)."""

    def __init__(self, owner: Wiretaps, taps: list[_Tap], req: h11.Request, client: str) -> None:
        self.owner, self.taps, self.req, self.client = owner, taps, req, client
        self.keep = max(t.max_body for t in taps)
        self.t0, self.wall = time.perf_counter(), time.time()
        self.req_body, self.resp_body = bytearray(), bytearray()
        self.req_bytes = self.resp_bytes = 0
        self.resp: h11.Response | h11.InformationalResponse | None = None
        self.finished = False

    def request_data(self, data: bytes) -> None:
        self.req_bytes += len(data)
        if len(self.req_body) < self.keep:
            self.req_body += data[: self.keep - len(self.req_body)]

    def response(self, ev: h11.Response | h11.InformationalResponse) -> None:
        if isinstance(ev, h11.Response) or ev.status_code == 101 or self.resp is None:
            self.resp = ev

    def response_data(self, data: bytes) -> None:
        self.resp_bytes += len(data)
        if len(self.resp_body) < self.keep:
            self.resp_body += data[: self.keep - len(self.resp_body)]

    def done(self, error: str = "") -> None:
        if self.finished:
            return
        self.finished = True
        pb = self.owner.pb
        ms = (time.perf_counter() - self.t0) * 1000
        req, resp = self.req, self.resp
        if resp is None and not error:
            error = "no response"

        def make(t: _Tap) -> Any:
            rec = pb.WiretapRecord(
                kind=pb.WiretapRecord.HTTP, client=self.client, start_unix=self.wall, latency_ms=ms,
                method=req.method.decode("ascii", "replace"), target=bytes(req.target),
                http_version=req.http_version.decode("ascii", "replace"),
                request_headers=[pb.Header(name=bytes(k), value=bytes(v)) for k, v in req.headers],
                request_body=bytes(self.req_body[: t.max_body]), request_bytes=self.req_bytes,
                response_body=bytes(self.resp_body[: t.max_body]), response_bytes=self.resp_bytes,
                error=error)
            if resp is not None:
                rec.status = resp.status_code
                rec.reason = bytes(resp.reason)
                rec.response_headers.extend(pb.Header(name=bytes(k), value=bytes(v)) for k, v in resp.headers)
            return rec
        try:
            self.owner.offer(self.taps, make)
        except Exception:  # noqa: BLE001 - a copy never breaks the app's answer
            log.exception("wiretap record failed")
