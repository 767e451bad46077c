"""An agent link through the API server's `pods/NAME:PORT/proxy/`: one TLS leg, no kubelet (issue 15).

A port-forward crosses the API server, the kubelet and the container runtime, each of which
re-frames every chunk (SPDY or WebSocket) on the way; on the dev cluster's 2 cores those three
spent ~7 core-s per GB and held intercepted bulk near 130 MB/s.  An HTTP/1.1 upgrade through the
pods/proxy subresource is spliced by the API server straight to the pod IP once the pod answers
101: measured 530-620 MB/s down for 1.2 core-s per GB in the API server and nothing in the
kubelet or runtime.  The agent (cluster/agentlink.py `_UpgradeSide`) listens on its pod IP for
exactly that request, and the link protocol (common/linkframes.py) runs unchanged on top.

RBAC: `get pods/proxy` in the workload's namespace (a GET upgrade).  The API server checks the
caller and drops its credentials before proxying, so the agent sees the request line, the upgrade
headers and `X-Forwarded-For`, never a token.  Whoever can reach the pod IP can knock too, which
is why the link handshake (HMAC with the intercept's per-pod key) is all the agent trusts.

After the 101 the TLS transport is handed from the upgrade's `_Conn` to the link protocol itself
(`transport.set_protocol`), so decrypted bytes land in the link's buffer with no copy in between;
what followed the response head in the same read (the agent's HELLO) is fed to it first.
"""
from __future__ import annotations

import asyncio
from typing import Iterable

from tpnb import config
from tpnb.common import linkframes as lf
from tpnb.errors import ClusterError

from .kube import KubeTarget, credentials_rejected, rbac_error, status_message
from .spdy import _Conn, feed_protocol, http_upgrade


class ProxyUnavailable(Exception):
    """This way to the agent does not work here (an older agent, a network policy, a proxy-url):
    use the port-forward instead.  Not the user's to fix, so not a TpnbError."""


def proxy_path(namespace: str, pod: str, port: int) -> str:
    return f"/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy{lf.UPGRADE_PATH}"


class UpgradedLink:
    """The upgraded connection, to run a link protocol on (`attach`) and close (`aclose`)."""

    #: no separate error channel (the port-forward's has the pod's dial error)
    error = ""

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self._transport = conn.transport

    def attach(self, link: lf.Link, early: Iterable[bytes] = ()) -> asyncio.Future[str]:
        """Give the TLS transport to `link`; the future is the link's end."""
        conn = self._conn
        tr = self._transport
        if tr is None or tr.is_closing():
            link._lose("the API server closed the connection after the upgrade")
            return link.closed
        leftover = bytes(conn.mv[conn.start:conn.end])
        conn.start = conn.end = 0
        tr.set_protocol(link)
        link.connection_made(tr)
        for data in (leftover, *early):
            feed_protocol(link, memoryview(data), lambda: bool(link.lost))
        if conn.eof and not link.lost:
            link.connection_lost(None)  # it ended before we took it over
        return link.closed

    async def aclose(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def open_link(t: KubeTarget, namespace: str, pod: str, port: int) -> UpgradedLink:
    """Upgrade to the agent's link port on `pod` through pods/proxy.

    Raises `PermissionDenied` when RBAC refuses (`get pods/proxy`), `ProxyUnavailable` when the
    way exists but does not lead to a link here (answer the port-forward instead), `ClusterError`
    for what the user must fix (credentials, the API server gone)."""
    if t.proxy:
        raise ProxyUnavailable("a proxy-url is configured")
    where = f"cannot reach the traffic-agent of pod {namespace}/{pod} through the API server's pods/proxy"
    timeout = config.get().timeouts.api
    conn, status, reason, body = await http_upgrade(
        t, "GET", proxy_path(namespace, pod, port), [f"Upgrade: {lf.UPGRADE_TOKEN}"], timeout, where)
    if status == 101:
        return UpgradedLink(conn)
    msg = status_message(body) or reason
    if status == 403:
        from kubernetes.client import ApiException

        raise rbac_error(ApiException(status=403, reason="Forbidden", body=body.decode("utf-8", "replace")),
                         "get", "pods/proxy", namespace)
    if status == 401:
        raise credentials_rejected(where, msg)
    # 503 (the API server cannot dial the pod: an older agent, a NetworkPolicy), 400 (our request
    # refused), 404 (pod gone: the port-forward will say so in its own words) and the rest
    raise ProxyUnavailable(f"HTTP {status} {msg}".strip())
