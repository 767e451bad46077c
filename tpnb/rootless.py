"""Outbound to the cluster without root: the proxy variables, and the kernel's own sockets.

Without the root daemon nothing on the machine routes cluster addresses or
answers cluster names.  Two paths replace it, both through the connector:

* **other processes** (`curl`, `grpcio`, anything honouring the usual
  variables): the connector's SOCKS5 + HTTP proxy on loopback
  (connector/proxy.py).  `proxy_env(status)` is what such a process needs;
  `tpnb connect --no-root -- CMD` gives it to CMD, `tpnb connect --no-root`
  prints it for `eval`, `%tp connect` puts it in the kernel's `os.environ`
  so a cell's `!curl` inherits it.
* **Python code in this process** (a kernel), with no configuration:
  `enable_in_process(session, status)` replaces `socket.getaddrinfo` (and
  `gethostbyname[_ex]`) and
  `socket.socket.connect`/`connect_ex` with versions that ask the connector
  for cluster names (`ResolveName`, the cluster's DNS through the manager)
  and turn a connection to a cluster address into one to a loopback port of
  the connector that is tunnelled to it (`ForwardToCluster`, one port per
  destination, kept for the session).  `requests`, `urllib`, `httpx`,
  `http.client`, `asyncio` streams and raw `socket` clients all create
  their connections that way, so they reach Services, pod IPs and raw TCP
  ports; a connected socket's `getpeername()` then names 127.0.0.1.

Not covered by either: clients in C (or Go, Rust...) that resolve and connect
themselves and ignore proxy variables (libpq-based drivers such as psycopg,
mysqlclient), UDP and ICMP.  `tpnb status` says so.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from .proto import pb

if TYPE_CHECKING:
    from .api import Status
    from .client import DaemonClient

#: the variables `proxy_env` sets (upper and lower case: curl reads `http_proxy` only in lower
#: case, some tools only the upper case names)
PROXY_VARS = ("ALL_PROXY", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
COVERS = ("processes given the proxy variables (SOCKS5 with remote DNS, HTTP CONNECT, http:// forwarding): "
          "`tpnb connect --no-root -- CMD`, `eval \"$(tpnb connect --no-root)\"`, a kernel's subprocesses",
          "Python code in a kernel connected with %tp (requests, httpx, urllib, asyncio, socket): its own "
          "name lookups and TCP connections")
NOT_COVERED = ("native clients that resolve and connect themselves and ignore proxy variables "
               "(e.g. libpq/psycopg, mysqlclient), UDP, ICMP")
NAME_TTL = 30.0


def proxy_env(st: "Status") -> dict[str, str]:
    """The proxy variables for a process to reach the cluster through the connector ({} with a
    root daemon: the whole machine reaches it)."""
    if not st.proxy_socks_url:
        return {}
    env = {"ALL_PROXY": st.proxy_socks_url, "HTTP_PROXY": st.proxy_http_url, "HTTPS_PROXY": st.proxy_http_url,
           "NO_PROXY": "localhost,127.0.0.1,::1"}
    env.update({k.lower(): v for k, v in env.items()})
    return env


def export_lines(env: dict[str, str]) -> str:
    """`export K='v'` lines for a POSIX shell's `eval`."""
    import shlex

    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())


# ---------------------------------------------------------------- this process's sockets
_lock = threading.Lock()
_hooks: "_Hooks | None" = None
_saved_env: dict[str, str | None] = {}


def enable_in_process(session: Any, st: "Status", set_env: bool = True) -> bool:
    """Route this process's cluster names and addresses through the connector of `session` (a
    tpnb.api.Session) and, with `set_env`, put the proxy variables in os.environ for its
    subprocesses.  No-op (and undone) with system-wide outbound."""
    global _hooks
    if not getattr(st, "proxy_socks_url", ""):
        disable_in_process()
        return False
    with _lock:
        if _hooks is None:
            _hooks = _Hooks(session.client)
            _hooks.install()
        _hooks.subnets = _networks(st.pod_subnets + st.service_subnets + st.also_proxy)
        _hooks.names.clear()
        _hooks.forwards.clear()
    if set_env:
        for k, v in proxy_env(st).items():
            _saved_env.setdefault(k, os.environ.get(k))
            os.environ[k] = v
    return True


def disable_in_process() -> None:
    """Undo `enable_in_process` (at quit): the original socket functions and environment."""
    global _hooks
    with _lock:
        if _hooks is not None:
            _hooks.uninstall()
            _hooks = None
    for k, v in list(_saved_env.items()):
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _saved_env.clear()


def in_process_active() -> bool:
    return _hooks is not None


def _networks(cidrs: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = []
    for c in cidrs:
        try:
            out.append(ipaddress.ip_network(c, strict=False))
        except ValueError:
            pass
    return out


class _Hooks:
    def __init__(self, client: "DaemonClient") -> None:
        self.client = client
        self.subnets: list[Any] = []
        #: name -> (expiry, cluster IPs, or None: not a cluster name)
        self.names: dict[str, tuple[float, list[str] | None]] = {}
        #: (ip, port) -> the connector's loopback port tunnelled there
        self.forwards: dict[tuple[str, int], int] = {}
        self.orig_getaddrinfo = socket.getaddrinfo
        self.orig_gethostbyname = socket.gethostbyname
        self.orig_gethostbyname_ex = socket.gethostbyname_ex
        self.orig_connect = socket.socket.connect
        self.orig_connect_ex = socket.socket.connect_ex

    def install(self) -> None:
        hooks = self

        def getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0):  # noqa: A002
            ips = hooks.cluster_ips(host)
            if ips is None:
                return hooks.orig_getaddrinfo(host, port, family, type, proto, flags)
            if family not in (0, socket.AF_INET):
                raise socket.gaierror(socket.EAI_NONAME, "cluster names have IPv4 addresses only")
            if not ips:
                raise socket.gaierror(socket.EAI_NONAME, f"{host}: the cluster has no such name")
            num = _port_number(port, type)
            kinds = [type] if type else [socket.SOCK_STREAM, socket.SOCK_DGRAM]
            return [(socket.AF_INET, k, proto or (socket.IPPROTO_TCP if k == socket.SOCK_STREAM else
                                                   socket.IPPROTO_UDP), "", (ip, num)) for ip in ips for k in kinds]

        def connect(sock: socket.socket, address: Any) -> None:
            return hooks.orig_connect(sock, hooks.map_address(sock, address))

        def connect_ex(sock: socket.socket, address: Any) -> int:
            return hooks.orig_connect_ex(sock, hooks.map_address(sock, address))

        def gethostbyname(host: str) -> str:
            ips = hooks.cluster_ips(host)
            if ips is None:
                return hooks.orig_gethostbyname(host)
            if not ips:
                raise socket.gaierror(socket.EAI_NONAME, f"{host}: the cluster has no such name")
            return ips[0]

        def gethostbyname_ex(host: str) -> tuple[str, list[str], list[str]]:
            ips = hooks.cluster_ips(host)
            if ips is None:
                return hooks.orig_gethostbyname_ex(host)
            if not ips:
                raise socket.gaierror(socket.EAI_NONAME, f"{host}: the cluster has no such name")
            return host, [], list(ips)

        socket.gethostbyname = gethostbyname  # type: ignore[assignment]
        socket.gethostbyname_ex = gethostbyname_ex  # type: ignore[assignment]
        socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
        socket.socket.connect = connect  # type: ignore[method-assign]
        socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]

    def uninstall(self) -> None:
        socket.getaddrinfo = self.orig_getaddrinfo  # type: ignore[assignment]
        socket.gethostbyname = self.orig_gethostbyname  # type: ignore[assignment]
        socket.gethostbyname_ex = self.orig_gethostbyname_ex  # type: ignore[assignment]
        socket.socket.connect = self.orig_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = self.orig_connect_ex  # type: ignore[method-assign]

    def cluster_ips(self, host: Any) -> list[str] | None:
        """The cluster's addresses for `host`; None: no cluster name (or the connector is gone)."""
        if isinstance(host, bytes):
            host = host.decode("idna", "replace")
        if not isinstance(host, str) or not host or host == "localhost" or _is_ip(host):
            return None
        key = host.rstrip(".").lower()
        now = time.monotonic()
        hit = self.names.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            reply = self.client.stub().ResolveName(pb.ResolveRequest(name=key), timeout=8)
        except Exception:  # noqa: BLE001 - connector gone: resolve as if tpnb were not here
            return None
        ips = list(reply.ips) if reply.cluster_name else None
        self.names[key] = (now + (NAME_TTL if ips or ips is None else 5.0), ips)
        if reply.subnets:
            self.subnets = _networks(list(reply.subnets))
        return ips

    def map_address(self, sock: socket.socket, address: Any) -> Any:
        if sock.family != socket.AF_INET or not isinstance(address, tuple) or len(address) != 2:
            return address
        host, port = address
        if not _is_ip(host):
            ips = self.cluster_ips(host)
            if not ips:
                return address
            host = ips[0]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return address
        if not any(ip.version == n.version and ip in n for n in self.subnets):
            return address
        key = (str(ip), int(port))
        local = self.forwards.get(key)
        if local is None:
            reply = self.client.stub().ForwardToCluster(pb.ForwardRequest(ip=key[0], port=key[1]), timeout=15)
            local = self.forwards[key] = reply.local_port
        return ("127.0.0.1", local)


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def _port_number(port: Any, type: int) -> int:  # noqa: A002
    if port is None:
        return 0
    if isinstance(port, bytes):
        port = port.decode()
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    return socket.getservbyname(port, "udp" if type == socket.SOCK_DGRAM else "tcp")
