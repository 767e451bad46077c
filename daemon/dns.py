"""DNS for the laptop: cluster names go to the cluster, everything else upstream.

`ClusterResolver.handle()` is raw-bytes-in, raw-bytes-out so one resolver
serves the TUN's DNS IP (UDP and TCP), a plain socket (`DNSServer`), and
tests.  It never raises: a failure is a SERVFAIL the client can act on.

Name rules (``D`` is the cluster domain, normally cluster.local):

* ``*.D``                        -> the cluster, as asked
* ``svc.ns`` / ``svc.ns.svc``    -> ``svc.ns.svc.D`` when ``ns`` is a namespace
  of the cluster; answer records are renamed back to the asked name, because
  a stub resolver drops answers whose owner name is not the one it asked for
* ``hello`` (one label)          -> ``hello.<ns>.svc.D`` for each mapped namespace in
  order; the first answer that is not NXDOMAIN wins; if all are NXDOMAIN
  the fallback resolvers get a say (LAN names like "printer")
* ``<rev>.in-addr.arpa`` / ``ip6.arpa`` inside a cluster subnet -> the cluster
* anything else                  -> the original (fallback) resolvers over UDP

Cluster-looking names the cluster does not know get NXDOMAIN, immediately,
so "Could not resolve host" is fast.  A namespace named like a TLD (say
"dev") shadows that TLD for two-label names; that is the price of ``svc.ns``.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import random
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable

from dnslib import EDNS0, QTYPE, DNSRecord

from .tun import servfail, udp_fit

log = logging.getLogger(__name__)

Lookup = Callable[[bytes], Awaitable[bytes]]

_NOERROR, _FORMERR, _SERVFAIL, _NXDOMAIN, _NOTIMP, _REFUSED = 0, 1, 2, 3, 4, 5
_EDNS_SIZE = 1232  # the DNS flag day 2020 recommendation


class ClusterResolver:
    """Decides per name who answers, and caches positive cluster answers."""

    def __init__(
        self,
        lookup: Lookup,
        cluster_domain: str = "cluster.local",
        namespaces: Callable[[], set[str]] | set[str] | frozenset[str] = frozenset(),
        mapped_namespaces: Iterable[str] = (),
        fallback: Iterable[str] = (),
        search: Iterable[str] = (),
        *,
        subnets: Iterable[str] = (),
        lookup_timeout: float = 4.0,
        fallback_timeout: float = 2.0,
        max_ttl: int = 30,
        cache_size: int = 1024,
    ) -> None:
        self.lookup = lookup
        self.cluster_domain = cluster_domain.strip(".").lower()
        self._namespaces = namespaces
        self.mapped_namespaces = [n.lower() for n in mapped_namespaces]
        self.fallback = list(fallback)
        self.search = [s.strip(".").lower() for s in search]
        self.subnets = [ipaddress.ip_network(s, strict=False) for s in subnets]
        self.lookup_timeout = lookup_timeout
        self.fallback_timeout = fallback_timeout
        self.max_ttl = max_ttl
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, int, int], tuple[float, bytes]] = OrderedDict()
        #: counters for status output and tests
        self.stats = {"cluster": 0, "fallback": 0, "cache_hits": 0, "errors": 0}

    # ------------------------------------------------------------ settings
    def set_mapped_namespaces(self, ns: list[str]) -> None:
        """Namespaces that single-label names resolve in (first match wins)."""
        self.mapped_namespaces = [n.lower() for n in ns]

    def set_subnets(self, cidrs: Iterable[str]) -> None:
        """Cluster subnets whose reverse (PTR) lookups go to the cluster."""
        self.subnets = [ipaddress.ip_network(s, strict=False) for s in cidrs]

    def namespaces(self) -> set[str]:
        ns = self._namespaces() if callable(self._namespaces) else self._namespaces
        return {n.lower() for n in ns}

    def search_domains(self) -> list[str]:
        """Search list to hand to the system resolver: mapped namespaces first."""
        out = [f"{ns}.svc.{self.cluster_domain}" for ns in self.mapped_namespaces]
        out += [s for s in self.search if s not in out]
        return out

    def clear_cache(self) -> None:
        self._cache.clear()

    # ------------------------------------------------------------ name rules
    def cluster_names(self, qname: str) -> list[str] | None:
        """The cluster names to ask, in order, for ``qname``; None: not a cluster name.

        Pure function of the settings (no I/O), so the rules are unit-testable.
        """
        name = qname.strip(".").lower()
        if not name:
            return None
        dom = self.cluster_domain
        if name == dom or name.endswith("." + dom):
            return [name]
        if name.endswith(".in-addr.arpa") or name.endswith(".ip6.arpa"):
            ip = _reverse_ip(name)
            if ip is not None and any(ip in net for net in self.subnets):
                return [name]
            return None
        labels = name.split(".")
        namespaces = self.namespaces()
        if len(labels) >= 3 and labels[-1] == "svc" and labels[-2] in namespaces:
            return [f"{name}.{dom}"]
        if len(labels) >= 2 and labels[-1] in namespaces:
            return [f"{name}.svc.{dom}"]
        # "hello", or "_http._tcp.hello" for SRV
        if all(lbl.startswith("_") for lbl in labels[:-1]) and not labels[-1].startswith("_"):
            if self.mapped_namespaces:
                return [f"{name}.{ns}.svc.{dom}" for ns in self.mapped_namespaces]
        return None

    # ------------------------------------------------------------ resolution
    async def handle(self, query: bytes) -> bytes:
        """Answer one raw DNS query with one raw reply; never raises."""
        try:
            req = DNSRecord.parse(query)
        except Exception:
            return servfail(query, _FORMERR)
        try:
            if req.header.qr or len(req.questions) != 1:
                return servfail(query, _FORMERR)
            if req.header.opcode != 0:
                return servfail(query, _NOTIMP)
            qname = str(req.q.qname).strip(".")
            names = self.cluster_names(qname)
            if names is not None:
                self.stats["cluster"] += 1
                reply = await self._resolve_cluster(req, names)
                # A single label the cluster does not know may be a LAN name
                # ("printer", the machine's own hostname): ask upstream too.
                if "." not in qname and self.fallback and _rcode(reply) == _NXDOMAIN:
                    self.stats["fallback"] += 1
                    return await self._forward(req, query)
                return reply
            self.stats["fallback"] += 1
            return await self._forward(req, query)
        except Exception:
            self.stats["errors"] += 1
            log.exception("DNS query %s failed", _describe(req))
            return servfail(query)

    async def _resolve_cluster(self, req: DNSRecord, names: list[str]) -> bytes:
        qtype, qclass = int(req.q.qtype), int(req.q.qclass)
        last: DNSRecord | None = None
        for name in names:
            reply = await self._ask_cluster(name, qtype, qclass)
            if reply is None:
                return _error_reply(req, _SERVFAIL)
            rcode = reply.header.rcode
            if rcode == _NXDOMAIN:
                last, last_name = reply, name
                continue
            return self._for_client(req, reply, name)
        if last is not None:
            return self._for_client(req, last, last_name)
        return _error_reply(req, _NXDOMAIN)

    async def _ask_cluster(self, name: str, qtype: int, qclass: int) -> DNSRecord | None:
        """Ask the cluster (through the cache); None on failure."""
        key = (name, qtype, qclass)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None:
            expires, wire = hit
            if expires > now:
                self._cache.move_to_end(key)
                self.stats["cache_hits"] += 1
                rec = DNSRecord.parse(wire)
                left = max(1, int(expires - now))
                for rr in rec.rr:
                    rr.ttl = min(rr.ttl, left)
                return rec
            del self._cache[key]
        q = DNSRecord.question(name, QTYPE.get(qtype, qtype))
        q.q.qclass = qclass
        q.header.id = random.randrange(1, 0xFFFF)
        q.add_ar(EDNS0(udp_len=_EDNS_SIZE))
        try:
            raw = await asyncio.wait_for(self.lookup(q.pack()), self.lookup_timeout)
            reply = DNSRecord.parse(raw)
        except asyncio.TimeoutError:
            log.warning("cluster DNS did not answer %s %s within %.0fs", name, QTYPE.get(qtype, qtype), self.lookup_timeout)
            return None
        except Exception as exc:
            log.warning("cluster DNS lookup of %s failed: %s", name, exc)
            return None
        if reply.header.rcode == _NOERROR and reply.rr:
            ttl = min([rr.ttl for rr in reply.rr] + [self.max_ttl])
            if ttl > 0:
                self._cache[key] = (now + ttl, raw)
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return reply

    def _for_client(self, req: DNSRecord, reply: DNSRecord, asked: str) -> bytes:
        """Make a cluster reply answer the client's exact question."""
        out = DNSRecord(header=reply.header, q=req.q)
        out.header.id = req.header.id
        out.header.rd = req.header.rd
        out.header.ra = 1
        out.header.qr = 1
        want = asked.lower()
        for rr in reply.rr:
            if str(rr.rname).rstrip(".").lower() == want:
                rr.rname = req.q.qname
            out.add_answer(rr)
        for rr in reply.auth:
            out.add_auth(rr)
        for rr in reply.ar:
            if rr.rtype != QTYPE.OPT:
                out.add_ar(rr)
        if any(rr.rtype == QTYPE.OPT for rr in req.ar):
            out.add_ar(EDNS0(udp_len=_EDNS_SIZE))
        return out.pack()

    async def _forward(self, req: DNSRecord, query: bytes) -> bytes:
        """Relay to the fallback resolvers: UDP, one overall timeout, then SERVFAIL."""
        if not self.fallback:
            return _error_reply(req, _REFUSED)
        deadline = time.monotonic() + self.fallback_timeout
        per_server = self.fallback_timeout / len(self.fallback)
        for server in self.fallback:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                return await forward_udp(query, server, min(left, per_server))
            except (OSError, asyncio.TimeoutError, ValueError) as exc:
                log.debug("fallback %s for %s: %s", server, _describe(req), exc or type(exc).__name__)
        log.warning("no fallback resolver answered %s", _describe(req))
        return _error_reply(req, _SERVFAIL)


async def forward_udp(query: bytes, server: str, timeout: float) -> bytes:
    """Send ``query`` to ``server`` ("ip", "ip:port" or "[ip6]:port") and return its reply.

    The query goes out with a fresh ID (put back in the reply) and replies
    with a foreign ID are ignored.  A truncated reply is retried over TCP.
    """
    host, port = split_server(server)
    loop = asyncio.get_running_loop()
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    qid = query[:2]
    my_id = struct.pack("!H", random.randrange(1, 0xFFFF))
    out = my_id + query[2:]
    async with asyncio.timeout(timeout):
        sock = socket.socket(fam, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (host, port))
            await loop.sock_sendall(sock, out)
            while True:
                data = await loop.sock_recv(sock, 65535)
                if len(data) >= 12 and data[:2] == my_id:
                    break
        finally:
            sock.close()
        if data[2] & 0x02:  # TC: get the full answer over TCP
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(size)
            finally:
                writer.close()
    return qid + data[2:]


def split_server(server: str) -> tuple[str, int]:
    """ "1.2.3.4" / "1.2.3.4:53" / "::1" / "[::1]:53" -> (host, port)."""
    s = server.strip()
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 53
    if s.count(":") == 1:
        host, port = s.split(":")
        return host, int(port)
    ipaddress.ip_address(s)  # ValueError for garbage
    return s, 53


def _rcode(raw: bytes) -> int:
    return raw[3] & 0x0F if len(raw) >= 4 else _SERVFAIL


def _error_reply(req: DNSRecord, rcode: int) -> bytes:
    r = req.reply(ra=1)
    r.header.rcode = rcode
    r.ar = []
    return r.pack()


def _describe(req: DNSRecord) -> str:
    try:
        return f"{req.q.qname} {QTYPE.get(req.q.qtype, req.q.qtype)}"
    except Exception:
        return "<query>"


def _reverse_ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """10.99.1.2 from "2.1.99.10.in-addr.arpa"; None for partial or bad names."""
    try:
        if name.endswith(".in-addr.arpa"):
            parts = name[: -len(".in-addr.arpa")].split(".")
            if len(parts) != 4:
                return None
            return ipaddress.IPv4Address(".".join(reversed(parts)))
        parts = name[: -len(".ip6.arpa")].split(".")
        if len(parts) != 32 or any(len(p) != 1 for p in parts):
            return None
        hexs = "".join(reversed(parts))
        return ipaddress.IPv6Address(int(hexs, 16))
    except ValueError:
        return None


# ---------------------------------------------------------------- socket server
class DNSServer:
    """A plain UDP + TCP DNS listener in front of a `ClusterResolver`.

    For tests, and for setups that want a socket resolver (e.g. 127.0.0.1:53
    when the TUN's DNS IP cannot be used).  ``port=0`` picks a free port (the
    same for UDP and TCP); read it back from ``.port`` after `start()`.
    """

    def __init__(self, resolver: ClusterResolver, host: str, port: int) -> None:
        self.resolver = resolver
        self.host = host
        self.port = port
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind UDP and TCP on one port.  With port 0 the kernel picks the UDP port, and
        that number may be taken for TCP by another process: then pick again (a few times)."""
        loop = asyncio.get_running_loop()
        wanted = self.port
        for attempt in range(8 if wanted == 0 else 1):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UDPProtocol(self), local_addr=(self.host, wanted)
            )
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError as exc:
                transport.close()
                if wanted == 0 and exc.errno == errno.EADDRINUSE and attempt < 7:
                    continue
                raise
            self._udp = transport  # type: ignore[assignment]
            self.port = port
            break
        log.info("DNS server on %s:%d (udp+tcp)", self.host, self.port)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
            self._tcp = None
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)

    async def __aenter__(self) -> DNSServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn(self, coro: Awaitable[None]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _answer_udp(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = await self.resolver.handle(data)
        if reply and self._udp is not None:
            self._udp.sendto(udp_fit(data, reply), addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lock = asyncio.Lock()

        async def one(q: bytes) -> None:
            reply = await self.resolver.handle(q)
            if reply:
                async with lock:
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()

        pending: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    (size,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 30))
                    q = await asyncio.wait_for(reader.readexactly(size), 10)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    break
                t = asyncio.create_task(one(q))
                pending.add(t)
                t.add_done_callback(pending.discard)
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        finally:
            for t in pending:
                t.cancel()
            writer.close()


class _UDPProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server._spawn(self.server._answer_udp(data, addr))

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable from a client
        log.debug("DNS UDP: %s", exc)


# ---------------------------------------------------------------- client helper
async def query(server: str, name: str, qtype: str = "A", *, tcp: bool = False, timeout: float = 3.0) -> DNSRecord:
    """A tiny `dig`: ask ``server`` for ``name``/``qtype``; used by tests and `tpnb status`."""
    q = DNSRecord.question(name, qtype)
    if tcp:
        host, port = split_server(server)
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                data = q.pack()
                writer.write(struct.pack("!H", len(data)) + data)
                await writer.drain()
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                raw = await reader.readexactly(size)
            finally:
                writer.close()
    else:
        raw = await forward_udp(q.pack(), server, timeout)
    return DNSRecord.parse(raw)


__all__ = ["ClusterResolver", "DNSServer", "forward_udp", "query", "split_server"]
