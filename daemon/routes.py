"""Addresses and routes on the TUN device, through rtnetlink (pyroute2).

Uses `AsyncIPRoute`: the synchronous `IPRoute` raises "This event loop is
already running" inside the daemon's loop.  Every function opens its own
netlink socket, so callers need no setup and a crash leaves nothing open.

Only routes in the main table are touched.  A cluster CIDR that collides with
a route the machine already has (a LAN, a VPN, docker0) is *skipped* with a
warning: routing it into the cluster would cut the machine off from that
network, which is worse than not reaching part of the cluster.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tpnb.errors import DaemonError, PrerequisiteError

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAIN_TABLE = 254
_RTN_UNICAST = 1
_EEXIST, _ESRCH, _ENODEV, _EPERM, _EADDRNOTAVAIL = 17, 3, 19, 1, 99
#: Link-local ranges hold the TUN's own address and the DNS IP; a /16 link
#: route there (common on laptops) must not veto our /32s.
_LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))


@dataclass(frozen=True)
class Route:
    """One main-table unicast route as the kernel reports it."""

    dst: IPNetwork
    ifname: str
    oif: int


@asynccontextmanager
async def _ipr() -> AsyncIterator[AsyncIPRoute]:
    ipr = AsyncIPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _net(cidr: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(cidr, strict=False)
    except ValueError as exc:
        from tpnb.errors import ConfigError

        raise ConfigError(f"invalid subnet {cidr!r}", str(exc), "use CIDR notation like 10.96.0.0/12") from None


async def _index(ipr: AsyncIPRoute, ifname: str) -> int:
    idx = await ipr.link_lookup(ifname=ifname)
    if not idx:
        raise DaemonError(
            f"network device {ifname!r} does not exist",
            "the TUN device is gone (closed, or removed by someone else)",
            "reconnect (`tpnb connect`) to recreate it",
        )
    return int(idx[0])


def _nl_error(action: str, exc: NetlinkError) -> Exception:
    if exc.code == _EPERM:
        return PrerequisiteError(f"cannot {action}", "permission denied (needs CAP_NET_ADMIN)",
                                 "run the daemon as root")
    return DaemonError(f"cannot {action}", f"netlink error {exc.code}: {exc.args[-1] if exc.args else exc}",
                       "see the daemon log; `ip route` shows the current routes")


async def _links(ipr: AsyncIPRoute) -> dict[int, tuple[str, str]]:
    """index -> (name, kind); kind is "" for devices without IFLA_LINKINFO."""
    out: dict[int, tuple[str, str]] = {}
    async for link in await ipr.get_links():
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else ""
        out[int(link["index"])] = (str(link.get_attr("IFLA_IFNAME")), str(kind or ""))
    return out


async def list_routes(family: int = socket.AF_UNSPEC) -> list[Route]:
    """Main-table unicast routes (both families unless told)."""
    async with _ipr() as ipr:
        links = await _links(ipr)
        return await _routes(ipr, links, family)


async def _routes(ipr: AsyncIPRoute, links: dict[int, tuple[str, str]], family: int = socket.AF_UNSPEC) -> list[Route]:
    out: list[Route] = []
    families = [socket.AF_INET, socket.AF_INET6] if family == socket.AF_UNSPEC else [family]
    for fam in families:
        async for r in await ipr.get_routes(family=fam):
            table = r.get_attr("RTA_TABLE") or r["table"]
            if table != _MAIN_TABLE or r["type"] != _RTN_UNICAST:
                continue
            dst = r.get_attr("RTA_DST") or ("0.0.0.0" if fam == socket.AF_INET else "::")
            oif = r.get_attr("RTA_OIF")
            if oif is None:  # multipath: take the first hop's device
                mp = r.get_attr("RTA_MULTIPATH") or []
                oif = mp[0]["oif"] if mp else 0
            name = links.get(int(oif or 0), ("", ""))[0]
            out.append(Route(ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False), name, int(oif or 0)))
    return out


def conflicts(cidr: IPNetwork, routes: Iterable[Route], ifname: str, prefix: str = "tpnb") -> list[Route]:
    """Existing routes that make routing ``cidr`` into the TUN unsafe.

    Ignored: default routes, routes through tpnb devices (ours, or a stale one
    about to be replaced), and link-local routes that merely *contain* cidr.
    Anything else overlapping - inside, equal, or containing - is a conflict.
    """
    out = []
    for r in routes:
        if r.dst.version != cidr.version or r.dst.prefixlen == 0:
            continue
        if r.ifname == ifname or r.ifname.startswith(prefix):
            continue
        if not r.dst.overlaps(cidr):
            continue
        if cidr.subnet_of(r.dst) and r.dst != cidr and any(r.dst.subnet_of(ll) for ll in _LINK_LOCAL if ll.version == r.dst.version):
            continue
        out.append(r)
    return out


async def add_address(ifname: str, cidr: str) -> None:
    """Assign ``cidr`` (e.g. "10.99.255.1/32") to ``ifname``; already there is fine.

    Never assign the DNS IP this way: packets to a local address do not enter
    the TUN.
    """
    iface = ipaddress.ip_interface(cidr)
    async with _ipr() as ipr:
        idx = await _index(ipr, ifname)
        try:
            await ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except NetlinkError as exc:
            if exc.code != _EEXIST:
                raise _nl_error(f"add address {cidr} to {ifname}", exc) from None


async def add_routes(ifname: str, cidrs: list[str], *, prefix: str = "tpnb") -> list[str]:
    """Route each CIDR to ``ifname``; returns the ones now routed there.

    A CIDR overlapping an existing non-tpnb route is skipped (warning logged,
    naming both), as is one the kernel refuses (IPv6 disabled, say); only a
    permission error raises.  A route that already points at ``ifname`` counts as added;
    one pointing at another tpnb device (a stale daemon's) is replaced.
    """
    added: list[str] = []
    async with _ipr() as ipr:
        idx = await _index(ipr, ifname)
        links = await _links(ipr)
        existing = await _routes(ipr, links)
        for cidr in cidrs:
            net = _net(cidr)
            bad = conflicts(net, existing, ifname, prefix)
            if bad:
                names = ", ".join(f"{r.dst} dev {r.ifname or r.oif}" for r in bad)
                log.warning("not routing %s to %s: it overlaps existing route(s) %s; "
                            "those addresses stay on the local network", net, ifname, names)
                continue
            fam = socket.AF_INET if net.version == 4 else socket.AF_INET6
            try:
                await ipr.route("replace", dst=str(net), oif=idx, family=fam, table=_MAIN_TABLE)
            except NetlinkError as exc:
                if exc.code == _EPERM:
                    raise _nl_error(f"route {net} to {ifname}", exc) from None
                # e.g. IPv6 disabled on this machine: the other subnets still work
                log.warning("not routing %s to %s: netlink error %d (%s)", net, ifname, exc.code, exc)
                continue
            added.append(str(net))
            existing.append(Route(net, ifname, idx))
    if added:
        log.info("routed %s to %s", ", ".join(added), ifname)
    return added


async def remove_routes(ifname: str, cidrs: list[str]) -> None:
    """Delete the routes of ``cidrs`` through ``ifname``; missing ones are fine."""
    async with _ipr() as ipr:
        idx = await ipr.link_lookup(ifname=ifname)
        if not idx:
            return  # device gone: the kernel dropped its routes with it
        for cidr in cidrs:
            net = _net(cidr)
            fam = socket.AF_INET if net.version == 4 else socket.AF_INET6
            try:
                await ipr.route("del", dst=str(net), oif=idx[0], family=fam, table=_MAIN_TABLE)
            except NetlinkError as exc:
                if exc.code not in (_ESRCH, _ENODEV, _EADDRNOTAVAIL):
                    raise _nl_error(f"remove route {net} from {ifname}", exc) from None


async def tun_links(prefix: str = "tpnb") -> list[str]:
    """Names of TUN devices whose name starts with ``prefix``."""
    async with _ipr() as ipr:
        return sorted(name for name, kind in (await _links(ipr)).values()
                      if kind == "tun" and name.startswith(prefix))


async def link_exists(ifname: str) -> bool:
    async with _ipr() as ipr:
        return bool(await ipr.link_lookup(ifname=ifname))


async def delete_link(ifname: str, *, only_tun: bool = True) -> bool:
    """Delete ``ifname`` (with its routes); True if it existed and is gone."""
    async with _ipr() as ipr:
        links = await _links(ipr)
        for idx, (name, kind) in links.items():
            if name != ifname:
                continue
            if only_tun and kind != "tun":
                log.warning("not deleting %s: it is a %r device, not a TUN", ifname, kind or "plain")
                return False
            try:
                await ipr.link("del", index=idx)
            except NetlinkError as exc:
                if exc.code == _ENODEV:
                    return False
                raise _nl_error(f"delete device {ifname}", exc) from None
            return True
    return False


async def cleanup_stale(prefix: str = "tpnb", *, keep: Iterable[str] = ()) -> list[str]:
    """Delete leftover TUN devices named ``prefix*`` (their routes go with them).

    Only devices of kind "tun" are touched, so veths or bridges that happen to
    share the prefix survive.  A TUN normally vanishes with the process that
    opened it; one that remains is persistent or held by a stuck process.
    ``keep`` names devices to spare (the caller's own).
    """
    spared = set(keep)
    removed = []
    for name in await tun_links(prefix):
        if name in spared:
            continue
        if await delete_link(name):
            log.warning("removed leftover TUN device %s", name)
            removed.append(name)
    return removed


__all__ = [
    "Route", "add_address", "add_routes", "remove_routes", "cleanup_stale",
    "list_routes", "tun_links", "link_exists", "delete_link", "conflicts",
]
