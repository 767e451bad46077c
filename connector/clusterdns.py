"""Cluster names to addresses for the rootless paths (the SOCKS/HTTP proxy, in-kernel sockets).

Without the root daemon nobody answers DNS for the machine, so the connector
resolves names itself: it asks the cluster's resolver through the manager
(`Manager.LookupDNS`, raw DNS messages) with the same name rules as the root
daemon's resolver (daemon/dns.py, which the connector may not import):

* ``*.<cluster domain>``            -> as asked
* ``svc.ns`` / ``svc.ns.svc``       -> ``svc.ns.svc.<domain>`` when ``ns`` is a namespace
* ``hello`` (one label)             -> ``hello.<ns>.svc.<domain>`` for each mapped namespace, first answer wins

Anything else is no cluster name (`cluster_names` returns None): the caller
then resolves it the ordinary way.  Answers are cached for their TTL (at
most 30 s), NXDOMAIN for 5 s.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from typing import Awaitable, Callable, Iterable

from dnslib import QTYPE, DNSRecord

log = logging.getLogger("tpnb.connector.clusterdns")

Lookup = Callable[[bytes], Awaitable[bytes]]

_NXDOMAIN = 3
MAX_TTL = 30.0
NEGATIVE_TTL = 5.0


def cluster_names(name: str, domain: str, namespaces: set[str], mapped: Iterable[str]) -> list[str] | None:
    """The fully qualified cluster names to try for `name`, in order; None: not a cluster name."""
    name = name.strip().rstrip(".").lower()
    domain = domain.strip(".").lower() or "cluster.local"
    if not name or _is_ip(name):
        return None
    if name == domain or name.endswith("." + domain):
        return [name]
    labels = name.split(".")
    if len(labels) >= 3 and labels[-1] == "svc" and labels[-2] in namespaces:
        return [f"{name}.{domain}"]
    if len(labels) >= 2 and labels[-1] in namespaces:
        return [f"{name}.svc.{domain}"]
    if len(labels) == 1 and name != "localhost":
        return [f"{name}.{ns}.svc.{domain}" for ns in mapped] or None
    return None


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


class ClusterNames:
    """`resolve(name)`: the cluster's IPv4 addresses for `name`, [] when the cluster has none,
    None when `name` is no cluster name at all; LookupError when the cluster's DNS does not answer."""

    def __init__(self, lookup: Lookup, domain: Callable[[], str], namespaces: Callable[[], set[str]],
                 mapped: Callable[[], list[str]], timeout: float = 4.0) -> None:
        self.lookup, self.domain, self.namespaces, self.mapped = lookup, domain, namespaces, mapped
        self.timeout = timeout
        self._cache: dict[str, tuple[float, list[str]]] = {}

    def is_cluster_name(self, name: str) -> bool:
        return cluster_names(name, self.domain(), self.namespaces(), self.mapped()) is not None

    async def resolve(self, name: str) -> list[str] | None:
        names = cluster_names(name, self.domain(), self.namespaces(), self.mapped())
        if names is None:
            return None
        failed: Exception | None = None
        for fq in names:
            try:
                ips = await self._ask(fq)
            except Exception as exc:  # noqa: BLE001 - try the next name; report if none answers
                failed = exc
                continue
            if ips:
                return ips
        if failed is not None:
            raise LookupError(f"cluster DNS lookup of {name} failed: {failed}")
        return []

    async def _ask(self, fq: str) -> list[str]:
        now = time.monotonic()
        hit = self._cache.get(fq)
        if hit is not None and hit[0] > now:
            return hit[1]
        q = DNSRecord.question(fq, "A")
        q.header.id = random.randrange(1, 0xFFFF)
        try:
            raw = await asyncio.wait_for(self.lookup(bytes(q.pack())), self.timeout)
            reply = DNSRecord.parse(raw)
        except Exception as exc:
            log.warning("cluster DNS lookup of %s failed: %s", fq, exc or type(exc).__name__)
            raise
        ips = [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]
        ttl = min([float(rr.ttl) for rr in reply.rr] + [MAX_TTL]) if ips else NEGATIVE_TTL
        if ips or reply.header.rcode == _NXDOMAIN:
            self._cache[fq] = (now + ttl, ips)
        if len(self._cache) > 4096:
            self._cache.clear()
        return ips
