"""The TUN device: every TCP connection / UDP pair sent into it becomes a `Flow`.

The engine is mitmproxy-rs (a userspace TCP/IP stack behind a TUN device);
see /work/shared/notes/tun-engine.md for what was measured.  Everything
engine-specific stays in this file so a faster path (e.g. REDIRECT +
SO_ORIGINAL_DST) can replace it behind the same `Tun`/`Flow` interface.

Engine quirks handled here, all observed in a private network namespace:

* Closing the interface and then letting the interpreter exit at once
  segfaulted about 4 runs in 10; a short sleep after `wait_closed()` made
  50/50 runs clean.  `Tun.__aexit__` does that sleep, and closes in `finally`
  so an exception cannot escape with the device open.
* `close()` (or `write_eof()`) on a TCP stream in its first few milliseconds
  sometimes loses the FIN: 13 of 50 clients hung until their timeout.  A
  close delayed to >= 5 ms of stream age lost none in 200.  `Flow` defers such
  early FIN-producing calls until the stream is `_MIN_AGE_FOR_FIN` old.
* The TCP handshake completes before any handler runs, so a "connection
  refused" can only be expressed by closing the accepted flow.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from tpnb.errors import PrerequisiteError

log = logging.getLogger(__name__)

#: Seconds a TCP stream must have existed before a FIN is reliably sent.
_MIN_AGE_FOR_FIN = 0.05
#: Seconds to let the engine's threads settle after the interface closed.
_CLOSE_GRACE = 0.1
#: Linux IFNAMSIZ - 1.
_MAX_IFNAME = 15

DNSHandler = Callable[[bytes], Awaitable[bytes]]


@dataclass(eq=False)
class Flow:
    """One TCP connection or one UDP (src, dst) pair entering the TUN.

    ``src`` is the local client (address on the TUN side), ``dst`` the
    cluster address it tried to reach.  The flow is closed when its handler
    returns or raises, so a handler owns the flow for exactly its lifetime.
    For UDP a later datagram of the same pair starts the handler again with
    a new Flow (see `Tun._dispatch`).
    """

    protocol: Literal["tcp", "udp"]
    src: tuple[str, int]
    dst: tuple[str, int]
    _stream: Any = field(default=None, repr=False)
    _born: float = field(default_factory=time.monotonic, repr=False)
    _closed: bool = field(default=False, repr=False)
    _eof_sent: bool = field(default=False, repr=False)
    _later: list[Callable[[], None]] | None = field(default=None, repr=False)
    #: a datagram read before this Flow existed (UDP handler restart)
    _first: bytes | None = field(default=None, repr=False)
    #: False for UDP: `Tun` keeps the stream open after the handler (see `Tun._dispatch`)
    _owns_stream: bool = field(default=True, repr=False)

    async def read(self, n: int = 256 * 1024) -> bytes:
        """Up to ``n`` bytes; ``b""`` at EOF.  For UDP: exactly one datagram.

        A connection reset raises ``OSError`` (so a tunnel can tell a reset
        from an orderly EOF).  Reading after `close()` returns ``b""``.
        """
        if self._closed:
            return b""
        if self._first is not None:
            data, self._first = self._first, None
            return data
        return bytes(await self._stream.read(n))

    def write(self, data: bytes) -> None:
        """Queue ``data`` (one datagram for UDP).  Ignored after `close()`."""
        if self._closed or not data:
            return
        self._stream.write(data)

    async def drain(self) -> None:
        """Wait until the write buffer is below the engine's high-water mark."""
        if not self._closed:
            await self._stream.drain()

    def write_eof(self) -> None:
        """Half-close (TCP FIN); a no-op for UDP."""
        if self._closed or self._eof_sent or self.protocol != "tcp":
            return
        self._eof_sent = True
        self._deferred(self._stream.write_eof)

    def close(self) -> None:
        """Close the flow; idempotent.  Never raises."""
        if self._closed:
            return
        self._closed = True
        if self._owns_stream:
            self._deferred(self._stream.close)

    # ------------------------------------------------------------ internals
    def _deferred(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` now, or (in call order) once the stream is old enough not to lose a FIN."""
        if self._later is not None:
            self._later.append(fn)
            return
        wait = _MIN_AGE_FOR_FIN - (time.monotonic() - self._born) if self.protocol == "tcp" else 0
        if wait > 0:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop: just do it
                pass
            else:
                self._later = [fn]
                loop.call_later(wait, self._run_later)
                return
        _quiet(fn)

    def _run_later(self) -> None:
        fns, self._later = self._later or [], None
        for fn in fns:
            _quiet(fn)


def _quiet(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as exc:  # the peer may be gone already
        log.debug("flow close/eof: %s", exc)


FlowHandler = Callable[[Flow], Awaitable[None]]


class Tun:
    """A TUN device whose flows are handed to ``on_tcp`` / ``on_udp``.

    Use as ``async with Tun("tpnb0", on_tcp, on_udp) as tun:``.  The device
    exists only inside the block (the kernel removes it, and every route
    through it, when the engine closes its file descriptor - also when the
    process is killed).  Routes and addresses are added by the caller
    (`daemon.routes`); the device has no routes of its own.

    Flows to ``dns_ip`` port 53 (UDP, or TCP with 2-byte length framing) go to
    ``dns_handler`` instead, when both are given.  The caller must still route
    ``dns_ip/32`` to the device (and must *not* assign ``dns_ip`` to it as an
    address: a local address never reaches the TUN).
    """

    def __init__(
        self,
        name: str,
        on_tcp: FlowHandler,
        on_udp: FlowHandler,
        *,
        dns_ip: str | None = None,
        dns_handler: DNSHandler | None = None,
    ) -> None:
        if not name or len(name) > _MAX_IFNAME or "/" in name or " " in name:
            from tpnb.errors import ConfigError

            raise ConfigError(
                f"invalid TUN device name {name!r}",
                f"Linux interface names are 1-{_MAX_IFNAME} characters without '/' or spaces",
                "set daemon.tun_name to something like tpnb0",
            )
        self.name = name
        self.on_tcp = on_tcp
        self.on_udp = on_udp
        self.dns_ip = str(ipaddress.ip_address(dns_ip)) if dns_ip else None
        self.dns_handler = dns_handler
        self._iface: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    # ------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Tun:
        try:
            import mitmproxy_rs
        except ImportError as exc:  # pragma: no cover - dependency of the package
            raise PrerequisiteError(
                "the TUN engine (mitmproxy-rs) is not installed",
                str(exc),
                "pip install 'mitmproxy-rs>=0.12' (needs Python >= 3.12)",
            ) from None
        try:
            self._iface = await mitmproxy_rs.tun.create_tun_interface(
                self._on_tcp_stream, self._on_udp_stream, tun_name=self.name
            )
        except Exception as exc:
            raise _tun_error(self.name, exc) from None
        actual = self._iface.tun_name()
        if actual != self.name:  # never seen, but routes would go to the wrong place
            await self._close_iface()
            raise PrerequisiteError(
                f"TUN device came up as {actual!r}, not {self.name!r}",
                "the engine did not honour the requested name",
                "report this; set daemon.tun_name to a short unused name",
            )
        log.info("TUN %s up", self.name)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel running flow handlers, then close the device (idempotent)."""
        if self._iface is None:
            return
        self._closing = True
        try:
            tasks = [t for t in self._tasks if not t.done()]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=2.0)
        finally:
            await self._close_iface()
        log.info("TUN %s closed", self.name)

    async def _close_iface(self) -> None:
        iface, self._iface = self._iface, None
        if iface is None:
            return
        try:
            iface.close()
            await asyncio.wait_for(iface.wait_closed(), 5.0)
        except Exception as exc:
            log.warning("closing TUN %s: %s", self.name, exc)
        finally:
            # Let the engine's runtime settle; exiting right after close segfaulted.
            await asyncio.sleep(_CLOSE_GRACE)

    @property
    def active_flows(self) -> int:
        """Flow handlers currently running (for status output and tests)."""
        return sum(1 for t in self._tasks if not t.done())

    # ------------------------------------------------------------ dispatch
    async def _on_tcp_stream(self, stream: Any) -> None:
        await self._dispatch("tcp", stream)

    async def _on_udp_stream(self, stream: Any) -> None:
        await self._dispatch("udp", stream)

    async def _dispatch(self, proto: Literal["tcp", "udp"], stream: Any) -> None:
        """Run a flow's handler; log its failure; always close.

        The engine runs this coroutine as one asyncio task per stream; we
        track the task so `aclose()` can cancel stragglers.

        UDP streams outlive their handler: once the engine has a (src, dst)
        pair, closing it black-holes every later datagram of that pair until
        the client has been silent for ~60 s (measured: a client sending
        every 3 s got no reply for 100 s).  So when a UDP handler returns
        (say its tunnel failed), the stream stays open here and the next
        datagram starts the handler again on a fresh `Flow`.
        """
        try:
            src = _addr(stream.get_extra_info("peername"))
            dst = _addr(stream.get_extra_info("sockname"))
        except Exception as exc:  # KeyError for unknown keys in TUN mode
            log.warning("flow without addresses dropped: %s", exc)
            _quiet(stream.close)
            return
        if self._closing:
            _quiet(stream.close)
            return
        if self.dns_handler is not None and dst[1] == 53 and dst[0] == self.dns_ip:
            handler: FlowHandler = self._serve_dns_udp if proto == "udp" else self._serve_dns_tcp
        else:
            handler = self.on_tcp if proto == "tcp" else self.on_udp
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        first: bytes | None = None
        try:
            while True:
                flow = Flow(proto, src, dst, stream, _first=first, _owns_stream=proto == "tcp")
                try:
                    await handler(flow)
                except asyncio.CancelledError:
                    return
                except Exception:
                    log.exception("%s flow %s:%d -> %s:%d: handler failed", proto, *src, *dst)
                finally:
                    flow.close()
                if proto == "tcp" or self._closing:
                    return
                try:
                    first = bytes(await stream.read(65535))
                except Exception:
                    return
                if not first:
                    return
                log.debug("udp %s:%d -> %s:%d: new datagram after the handler ended; restarting it",
                          *src, *dst)
        finally:
            if proto == "udp":
                _quiet(stream.close)
            if task is not None:
                self._tasks.discard(task)

    async def _serve_dns_udp(self, flow: Flow) -> None:
        """Answer each datagram in its own task: A and AAAA arrive together."""
        assert self.dns_handler is not None
        pending: set[asyncio.Task[None]] = set()

        async def answer(q: bytes) -> None:
            reply = await _safe_dns(self.dns_handler, q)  # type: ignore[arg-type]
            if reply:
                flow.write(udp_fit(q, reply))

        try:
            while True:
                q = await flow.read(65535)
                if not q:
                    break
                t = asyncio.create_task(answer(q))
                pending.add(t)
                t.add_done_callback(pending.discard)
        finally:
            for t in pending:
                t.cancel()

    async def _serve_dns_tcp(self, flow: Flow) -> None:
        """RFC 7766 framing: 2-byte length prefix; pipelined queries allowed."""
        assert self.dns_handler is not None
        buf = b""
        pending: set[asyncio.Task[None]] = set()

        async def answer(q: bytes) -> None:
            reply = await _safe_dns(self.dns_handler, q)  # type: ignore[arg-type]
            if reply:
                flow.write(struct.pack("!H", len(reply)) + reply)
                await flow.drain()

        try:
            while True:
                data = await flow.read(65535)
                if not data:
                    break
                buf += data
                while len(buf) >= 2:
                    (size,) = struct.unpack("!H", buf[:2])
                    if len(buf) < 2 + size:
                        break
                    q, buf = buf[2 : 2 + size], buf[2 + size :]
                    t = asyncio.create_task(answer(q))
                    pending.add(t)
                    t.add_done_callback(pending.discard)
            if pending:
                await asyncio.wait(pending, timeout=5.0)
            flow.write_eof()
        finally:
            for t in pending:
                t.cancel()


async def _safe_dns(handler: DNSHandler, query: bytes) -> bytes:
    try:
        return await handler(query)
    except Exception:
        log.exception("DNS handler failed")
        return servfail(query)


def servfail(query: bytes, rcode: int = 2) -> bytes:
    """A header-only error reply for ``query`` (SERVFAIL unless told otherwise).

    Built by hand so it works even for queries dnslib cannot parse.
    """
    if len(query) < 12:
        return b""
    qid, flags = struct.unpack("!HH", query[:4])
    opcode_rd = flags & 0x7900  # opcode + RD
    flags = 0x8000 | opcode_rd | 0x0080 | (rcode & 0xF)  # QR, RA
    # Echo the question section when it is intact (one question, simple parse).
    qd = b""
    if struct.unpack("!H", query[4:6])[0] == 1:
        i = 12
        while i < len(query) and query[i] != 0:
            i += 1 + query[i]
        if i + 5 <= len(query):
            qd = query[12 : i + 5]
    return struct.pack("!HHHHHH", qid, flags, 1 if qd else 0, 0, 0, 0) + qd


def udp_fit(query: bytes, reply: bytes) -> bytes:
    """Truncate a reply that exceeds what the UDP client can take (sets TC).

    The limit is 512 bytes, or the EDNS0 payload size the client advertised;
    a truncated reply makes the client retry over TCP.
    """
    limit = 512
    try:
        from dnslib import DNSRecord

        q = DNSRecord.parse(query)
        for rr in q.ar:
            if rr.rtype == 41:  # OPT: its class carries the UDP payload size
                limit = max(512, min(int(rr.rclass), 65535))
    except Exception:
        pass
    if len(reply) <= limit:
        return reply
    hdr = bytearray(reply[:12])
    hdr[2] |= 0x02  # TC
    # keep the question, drop all records
    try:
        qdcount = struct.unpack("!H", reply[4:6])[0]
        i = 12
        for _ in range(qdcount):
            while reply[i] != 0:
                if reply[i] & 0xC0 == 0xC0:
                    i += 1
                    break
                i += 1 + reply[i]
            i += 5
        hdr[6:12] = b"\0" * 6
        return bytes(hdr) + reply[12:i]
    except IndexError:
        hdr[4:12] = b"\0" * 8
        return bytes(hdr)


def _addr(value: Any) -> tuple[str, int]:
    host, port = value[0], value[1]
    return str(host), int(port)


def _tun_error(name: str, exc: Exception) -> PrerequisiteError:
    msg = str(exc)
    if "busy" in msg.lower():
        return PrerequisiteError(
            f"cannot create TUN device {name!r}",
            f"the name is in use ({msg}) - another daemon, or a leftover device",
            "stop the other tpnb daemon (`tpnb quit`), or run `tpnb uninstall` to remove leftovers",
        )
    if "permission" in msg.lower() or "not permitted" in msg.lower():
        return PrerequisiteError(
            f"cannot create TUN device {name!r}",
            f"no permission ({msg}); creating network devices needs CAP_NET_ADMIN",
            "run the daemon as root (tpnb starts it through sudo)",
        )
    return PrerequisiteError(
        f"cannot create TUN device {name!r}",
        msg or type(exc).__name__,
        "check that /dev/net/tun exists (modprobe tun) and the daemon runs as root",
    )


__all__ = ["Flow", "FlowHandler", "DNSHandler", "Tun", "servfail", "udp_fit"]

