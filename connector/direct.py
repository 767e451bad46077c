"""The direct data plane: outbound TCP straight to the destination pod over port-forward (issue 15).

Why: a small request through the manager tunnels crosses two Python gRPC
endpoints (the root daemon and the traffic-manager), ~1.2 ms on top of what
the port-forward relay alone costs (README, "Where the time goes").  Where
the user may ``create pods/portforward``, the connector instead opens a
port-forward to the pod behind the address, the way ``kubectl
port-forward`` does: one SPDY connection per pod (`spdy.SpdySession`), one
error + data stream pair per forwarded connection, so a new connection costs
two SYN_STREAMs and no TLS handshake.  The manager stays the fallback for
everything this cannot carry (`dial` returns None).

Address -> pod, with no API round trip per dial: list + watch of Services,
EndpointSlices and Pods (cluster-wide when allowed, else per namespace) feed
an `AddressBook`, which is pure logic (tests/test_direct_unit.py feeds it
plain objects):

* a ClusterIP:port -> the Service port with that number -> the ready
  endpoints of the Service's EndpointSlices for that port's name, whose
  ``port`` is the resolved target port (named targetPorts are resolved per
  slice by the endpoint controller) -> round robin;
* a pod IP:port -> that pod, any port (it need not be declared);
* headless Services resolve through DNS to pod IPs, so they are pod IPs here.

RBAC: a SelfSubjectAccessReview for ``create pods/portforward`` per namespace
(cluster-wide first), cached; a 403 from an upgrade marks the namespace
denied again.  Denied namespaces go through the manager.

Semantics differ from the pod network, and users must know (README): the
runtime dials ``localhost:PORT`` inside the pod's network namespace, so the
app sees 127.0.0.1 as its peer, only sockets listening on loopback or the
wildcard answer, and NetworkPolicies do not apply.  ``connector.data_plane:
manager`` keeps pod-network semantics.

Written here rather than taken from a library: no Python library speaks
SPDY/3.1 port-forwarding (client-go's spdystream is Go), and the resolution
needs exactly the connector's view of the cluster.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import logging
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kubernetes.client import ApiException

from tpnb import config
from tpnb.errors import ClusterError, PermissionDenied, TpnbError

from . import kube
from .kube import KubeTarget, path_quote
from .spdy import SessionClosed, SpdySession, SpdyUnsupported, StreamRefused, StreamReset, MuxStream

log = logging.getLogger(__name__)

__all__ = ["AddressBook", "DirectConn", "DirectDialRefused", "DirectPlane", "DirectStatus", "PodTarget"]

#: seconds a session with no streams stays open
IDLE_TIMEOUT = 30.0
#: how long an RBAC answer is trusted (allowed / denied); denied is re-asked sooner
RBAC_TTL_ALLOWED = 600.0
RBAC_TTL_DENIED = 60.0
#: a watch is re-established after this many seconds (the server ends it)
WATCH_SECONDS = 300
#: bounded back-off between failed list/watch attempts
BACKOFF_MAX = 30.0


class DirectDialRefused(ConnectionRefusedError):
    """The pod side refused the connection (the runtime's error text, e.g. "connection refused").

    A ConnectionRefusedError, so callers that handle refused dials handle this one."""


# ======================================================================== address book
class PodTarget(NamedTuple):
    """Where a dial goes: a pod and the port inside it."""

    namespace: str
    pod: str
    port: int
    #: what the address was: "service NS/NAME" or "pod"
    via: str


@dataclass
class _Service:
    ips: list[str]
    #: (name, port, protocol)
    ports: list[tuple[str, int, str]]


@dataclass
class _Slice:
    service: str
    #: (name, port, protocol)
    ports: list[tuple[str, int, str]]
    #: (pod namespace, pod name or "", addresses, ready)
    endpoints: list[tuple[str, str, list[str], bool]]


@dataclass
class _Pod:
    ips: list[str]
    running: bool
    host_network: bool


def _meta(obj: dict[str, Any]) -> tuple[str, str]:
    md = obj.get("metadata") or {}
    return str(md.get("namespace") or ""), str(md.get("name") or "")


def _norm_ip(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


class AddressBook:
    """Cluster addresses -> pods, kept from Service, EndpointSlice and Pod objects (plain dicts)."""

    def __init__(self) -> None:
        self.services: dict[tuple[str, str], _Service] = {}
        self.slices: dict[tuple[str, str], _Slice] = {}
        self.pods: dict[tuple[str, str], _Pod] = {}
        self._svc_by_ip: dict[str, tuple[str, str]] = {}
        self._slices_by_svc: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self._pod_by_ip: dict[str, tuple[str, str]] = {}
        self._rr: dict[tuple[str, str, int], itertools.count[int]] = {}

    # ------------------------------------------------------------ updates
    def apply(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        """One watch event ("ADDED" / "MODIFIED" / "DELETED") for kind "Service" / "EndpointSlice" / "Pod"."""
        if event == "DELETED":
            {"Service": self._del_service, "EndpointSlice": self._del_slice, "Pod": self._del_pod}[kind](_meta(obj))
        else:
            {"Service": self._set_service, "EndpointSlice": self._set_slice, "Pod": self._set_pod}[kind](obj)

    def replace(self, kind: str, items: list[dict[str, Any]], namespace: str | None = None) -> None:
        """The result of a list: every object of `kind` (in `namespace`, or all) is exactly `items`."""
        store: dict[tuple[str, str], Any] = {"Service": self.services, "EndpointSlice": self.slices,
                                             "Pod": self.pods}[kind]
        keep = {_meta(o) for o in items}
        for key in [k for k in store if (namespace is None or k[0] == namespace) and k not in keep]:
            self.apply(kind, "DELETED", {"metadata": {"namespace": key[0], "name": key[1]}})
        for o in items:
            self.apply(kind, "ADDED", o)

    def _set_service(self, obj: dict[str, Any]) -> None:
        key = _meta(obj)
        self._del_service(key)
        spec = obj.get("spec") or {}
        ips = [_norm_ip(i) for i in (spec.get("clusterIPs") or [spec.get("clusterIP")]) if i and i != "None"]
        if spec.get("type") == "ExternalName":
            ips = []
        ports = [(str(p.get("name") or ""), int(p.get("port") or 0), str(p.get("protocol") or "TCP"))
                 for p in spec.get("ports") or []]
        self.services[key] = _Service(ips, ports)
        for ip in ips:
            self._svc_by_ip[ip] = key

    def _del_service(self, key: tuple[str, str]) -> None:
        old = self.services.pop(key, None)
        if old is not None:
            for ip in old.ips:
                if self._svc_by_ip.get(ip) == key:
                    del self._svc_by_ip[ip]

    def _set_slice(self, obj: dict[str, Any]) -> None:
        key = _meta(obj)
        self._del_slice(key)
        labels = (obj.get("metadata") or {}).get("labels") or {}
        svc = str(labels.get("kubernetes.io/service-name") or "")
        if not svc or obj.get("addressType") not in (None, "IPv4", "IPv6"):
            return
        ports = [(str(p.get("name") or ""), int(p.get("port") or 0), str(p.get("protocol") or "TCP"))
                 for p in obj.get("ports") or [] if p.get("port") is not None]
        eps = []
        for ep in obj.get("endpoints") or []:
            cond = ep.get("conditions") or {}
            ready = cond.get("ready") is not False  # unset means ready (discovery.k8s.io/v1)
            ref = ep.get("targetRef") or {}
            pod = str(ref.get("name") or "") if ref.get("kind") == "Pod" else ""
            eps.append((str(ref.get("namespace") or key[0]), pod,
                        [_norm_ip(a) for a in ep.get("addresses") or []], ready))
        self.slices[key] = _Slice(svc, ports, eps)
        self._slices_by_svc.setdefault((key[0], svc), set()).add(key)

    def _del_slice(self, key: tuple[str, str]) -> None:
        old = self.slices.pop(key, None)
        if old is not None:
            keys = self._slices_by_svc.get((key[0], old.service))
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._slices_by_svc[(key[0], old.service)]

    def _set_pod(self, obj: dict[str, Any]) -> None:
        key = _meta(obj)
        self._del_pod(key)
        st = obj.get("status") or {}
        ips = [_norm_ip(p["ip"]) for p in st.get("podIPs") or [] if p.get("ip")]
        if not ips and st.get("podIP"):
            ips = [_norm_ip(st["podIP"])]
        host = bool((obj.get("spec") or {}).get("hostNetwork"))
        deleting = bool((obj.get("metadata") or {}).get("deletionTimestamp"))
        pod = _Pod(ips, st.get("phase") == "Running" and not deleting, host)
        self.pods[key] = pod
        if pod.running and not host:
            for ip in ips:
                self._pod_by_ip[ip] = key

    def _del_pod(self, key: tuple[str, str]) -> None:
        old = self.pods.pop(key, None)
        if old is not None:
            for ip in old.ips:
                if self._pod_by_ip.get(ip) == key:
                    del self._pod_by_ip[ip]

    # ------------------------------------------------------------ lookups
    def namespaces(self) -> set[str]:
        return {k[0] for k in self.services} | {k[0] for k in self.pods}

    def resolve(self, ip: str, port: int) -> PodTarget | None:
        """The pod (and port in it) a TCP connection to ip:port reaches; None if this book cannot say."""
        ip = _norm_ip(ip)
        svc_key = self._svc_by_ip.get(ip)
        if svc_key is not None:
            return self._resolve_service(svc_key, port)
        pod_key = self._pod_by_ip.get(ip)
        if pod_key is not None and 0 < port < 65536:
            return PodTarget(pod_key[0], pod_key[1], port, "pod")
        return None

    def _resolve_service(self, key: tuple[str, str], port: int) -> PodTarget | None:
        svc = self.services[key]
        sp = next((p for p in svc.ports if p[1] == port and p[2] == "TCP"), None)
        if sp is None:
            return None
        cands: list[tuple[str, str, int]] = []
        for sk in sorted(self._slices_by_svc.get(key, ())):
            sl = self.slices[sk]
            slp = next((p for p in sl.ports if p[0] == sp[0] and p[2] == "TCP"), None)
            if slp is None:
                continue
            for ns, pod, addrs, ready in sl.endpoints:
                if not ready:
                    continue
                if not pod:  # a hand-made slice: usable if the address is a pod we know
                    pk = next((self._pod_by_ip[a] for a in addrs if a in self._pod_by_ip), None)
                    if pk is None:
                        continue
                    ns, pod = pk
                cands.append((ns, pod, slp[1]))
        if not cands:
            return None
        cands = sorted(set(cands))
        rr = self._rr.setdefault((key[0], key[1], port), itertools.count())
        ns, pod, tport = cands[next(rr) % len(cands)]
        return PodTarget(ns, pod, tport, f"service {key[0]}/{key[1]}")


# ======================================================================== watches
_KINDS = {
    "Service": ("/api/v1", "services"),
    "EndpointSlice": ("/apis/discovery.k8s.io/v1", "endpointslices"),
    "Pod": ("/api/v1", "pods"),
}


def _list_path(kind: str, namespace: str | None) -> str:
    base, plural = _KINDS[kind]
    return f"{base}/namespaces/{path_quote(namespace)}/{plural}" if namespace else f"{base}/{plural}"


class _Reflector:
    """List, then watch, one kind (cluster-wide or in one namespace) into the address book; forever.

    `first` is set after the first list, or when it failed: `denied` tells a
    403 (then the reflector ends and the plane watches per namespace)."""

    def __init__(self, plane: DirectPlane, kind: str, namespace: str | None) -> None:
        self.plane = plane
        self.kind = kind
        self.namespace = namespace
        self.path = _list_path(kind, namespace)
        self.first = asyncio.Event()
        #: a list succeeded at least once (the book has this kind's objects)
        self.listed = False
        self.denied = False
        self.error = ""
        self.events = 0

    async def run(self) -> None:
        t, book = self.plane.target, self.plane.book
        backoff = 1.0
        while True:
            try:
                got = await kube.request(t, "GET", self.path)
                book.replace(self.kind, list(got.get("items") or []), self.namespace)
                rv = str((got.get("metadata") or {}).get("resourceVersion") or "")
                self.error = ""
                self.listed = True
                self.first.set()
                backoff = 1.0
                while True:  # watch again from the last version until it is too old
                    async for typ, obj in kube.watch_events(t, self.path, rv, WATCH_SECONDS):
                        if typ == "ERROR":
                            raise ApiException(status=int(obj.get("code") or 500), reason="watch",
                                               body=json.dumps(obj))
                        rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                        if typ in ("ADDED", "MODIFIED", "DELETED"):
                            self.events += 1
                            book.apply(self.kind, typ, obj)
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                if exc.status == 410:
                    continue  # too old: list again at once
                if exc.status == 403 and not self.first.is_set():
                    self.denied = True
                    self.error = kube.status_message(exc.body)
                    self.first.set()
                    return
                self.error = f"HTTP {exc.status}: {kube.status_message(exc.body)}"
            except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError, TpnbError) as exc:
                self.error = str(exc) or type(exc).__name__
            log.debug("direct plane: watch %s: %s; again in %.0fs", self.path, self.error, backoff)
            self.first.set()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)


# ======================================================================== the plane
@dataclass
class DirectStatus:
    """What `tpnb status` shows about the direct data plane."""

    active: bool
    reason: str
    namespaces_denied: list[str] = field(default_factory=list)
    #: open SPDY sessions (one per pod in use)
    sessions: int = 0
    #: connections carried directly
    dials: int = 0
    #: dials answered None (the caller used the manager)
    fallbacks: int = 0
    #: refused dials and failed set-ups
    dial_errors: int = 0
    #: SPDY sessions opened since start (a reconnect after a broken one counts again)
    sessions_opened: int = 0


class DirectPlane:
    """Maps cluster addresses to pods and dials them over multiplexed SPDY port-forwards.

    `namespaces`: where to watch when the user may not list cluster-wide
    (the session's namespaces; default: the context's namespace).
    """

    def __init__(self, target: KubeTarget, namespaces: list[str] | tuple[str, ...] = (),
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.target = target
        self.namespaces = list(dict.fromkeys([*namespaces] or [target.namespace]))
        self.idle_timeout = idle_timeout
        self.book = AddressBook()
        self._reflectors: list[_Reflector] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._sessions: dict[tuple[str, str], SpdySession] = {}
        self._opening: dict[tuple[str, str], asyncio.Task[SpdySession]] = {}
        self._rbac: dict[str, tuple[bool, float]] = {}
        self._rbac_probes: dict[str, asyncio.Task[bool]] = {}
        self._cluster_wide = False
        self._started = False
        self._closed = False
        self._unusable = ""  # why the plane cannot work at all (proxy, SPDY refused, no watches)
        self._dials = self._fallbacks = self._dial_errors = self._sessions_opened = 0

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the watches and the RBAC probe; returns when the first lists are in."""
        if self._started:
            return
        self._started = True
        if self.target.proxy:
            self._unusable = "a proxy-url is configured (SPDY port-forwards do not go through proxies)"
            return
        timeout = config.get().timeouts.api * 2 + 1
        wide = [self._reflect(kind, None) for kind in _KINDS]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(r.first.wait() for r in wide), self._probe_cluster_wide())
        per_ns = [self._reflect(r.kind, ns) for r in wide if r.denied for ns in self.namespaces]
        if per_ns:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(r.first.wait() for r in per_ns))
        if not self._cluster_wide:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(self._allowed(ns) for ns in self.namespaces))
        log.info("direct plane: %s", self.status().reason)

    def _reflect(self, kind: str, namespace: str | None) -> _Reflector:
        r = _Reflector(self, kind, namespace)
        self._reflectors.append(r)
        self._tasks.append(asyncio.create_task(r.run(), name=f"direct watch {r.path}"))
        return r

    async def aclose(self) -> None:
        """Cancel the watches, close every SPDY session (their forwarded connections are reset)."""
        self._closed = True
        tasks = [*self._tasks, *self._opening.values(), *self._rbac_probes.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        for s in list(self._sessions.values()):
            s.close("the connector is stopping")
        self._sessions.clear()

    def status(self) -> DirectStatus:
        denied = sorted(ns for ns, (ok, _) in self._rbac.items() if not ok)
        if self._closed:
            active, reason = False, "stopped"
        elif not self._started:
            active, reason = False, "not started"
        elif self._unusable:
            active, reason = False, self._unusable
        elif self._reflectors and not any(r.listed for r in self._reflectors):
            why = "; ".join(sorted({r.error for r in self._reflectors if r.error})) or "no list answered yet"
            active, reason = False, f"cannot watch Services/EndpointSlices/Pods: {why}"
        elif self._cluster_wide:
            active, reason = True, "pods/portforward allowed cluster-wide"
        else:
            allowed = sorted(ns for ns, (ok, _) in self._rbac.items() if ok)
            if allowed:
                active, reason = True, f"pods/portforward allowed in {', '.join(allowed)}"
            else:
                active = False
                reason = (f"pods/portforward denied in {', '.join(denied)}" if denied
                          else "pods/portforward not allowed in any namespace checked")
        return DirectStatus(active=active, reason=reason, namespaces_denied=denied,
                            sessions=sum(1 for s in self._sessions.values() if not s.closed),
                            dials=self._dials, fallbacks=self._fallbacks, dial_errors=self._dial_errors,
                            sessions_opened=self._sessions_opened)

    # ------------------------------------------------------------ RBAC
    async def _ssar(self, namespace: str) -> bool:
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                "spec": {"resourceAttributes": {"namespace": namespace, "verb": "create", "resource": "pods",
                                                "subresource": "portforward"}}}
        got = await kube.request(self.target, "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                                 body=body)
        return bool(((got or {}).get("status") or {}).get("allowed"))

    async def _probe_cluster_wide(self) -> None:
        try:
            self._cluster_wide = await self._ssar("")
        except (ApiException, TpnbError) as exc:
            log.debug("direct plane: cluster-wide access review failed: %s", exc)

    async def _allowed(self, namespace: str) -> bool:
        """Whether the user may port-forward in `namespace` (cached; a stale answer is refreshed behind)."""
        if self._cluster_wide:
            return True
        hit = self._rbac.get(namespace)
        now = time.monotonic()
        if hit is not None:
            ok, at = hit
            if now - at > (RBAC_TTL_ALLOWED if ok else RBAC_TTL_DENIED) and namespace not in self._rbac_probes:
                self._probe(namespace)
            return ok
        task = self._rbac_probes.get(namespace) or self._probe(namespace)
        try:
            return await asyncio.shield(task)
        except (ApiException, TpnbError):
            return False

    def _probe(self, namespace: str) -> asyncio.Task[bool]:
        async def probe() -> bool:
            try:
                ok = await self._ssar(namespace)
            except (ApiException, TpnbError) as exc:
                log.info("direct plane: cannot check pods/portforward in %s: %s", namespace, exc)
                ok = False
            finally:
                self._rbac_probes.pop(namespace, None)
            self._rbac[namespace] = (ok, time.monotonic())
            return ok

        task = asyncio.create_task(probe(), name=f"direct rbac {namespace}")
        self._rbac_probes[namespace] = task
        return task

    def _deny(self, namespace: str) -> None:
        self._rbac[namespace] = (False, time.monotonic())

    # ------------------------------------------------------------ sessions
    async def _session(self, namespace: str, pod: str, timeout: float, port: int = 0) -> SpdySession:
        key = (namespace, pod)
        s = self._sessions.get(key)
        if s is not None and s.usable:
            return s
        task = self._opening.get(key)
        if task is None:
            task = asyncio.create_task(self._open_session(key, timeout, port), name=f"direct session {namespace}/{pod}")
            self._opening[key] = task
        return await asyncio.shield(task)

    async def _open_session(self, key: tuple[str, str], timeout: float, port: int) -> SpdySession:
        from .portforward import portforward_path

        try:
            s = await SpdySession.connect(self.target, key[0], key[1], timeout, portforward_path(*key),
                                          self.idle_timeout, self._session_closed, port)
        finally:
            self._opening.pop(key, None)
        if self._closed:
            s.close("the connector is stopping")
            raise SessionClosed("the connector is stopping")
        old = self._sessions.get(key)
        if old is not None and old is not s:
            old.draining = True
        self._sessions[key] = s
        self._sessions_opened += 1
        log.debug("direct plane: new SPDY session to %s/%s", *key)
        return s

    def _session_closed(self, s: SpdySession) -> None:
        key = tuple(s.label.split("/", 1))
        if self._sessions.get(key) is s:  # type: ignore[call-overload]
            del self._sessions[key]  # type: ignore[arg-type]
        log.debug("direct plane: session %s closed: %s", s.label, s.reason)

    # ------------------------------------------------------------ dialing
    def resolve(self, ip: str, port: int) -> PodTarget | None:
        """Where a dial to ip:port would go (no network)."""
        return self.book.resolve(ip, port)

    async def dial(self, ip: str, port: int, timeout: float = 10.0, *,
                   refusal_wait: float = 0.0) -> DirectConn | None:
        """None: not for the direct plane (unknown address, RBAC denies the namespace, no ready
        endpoint) -- the caller uses the manager. Raises `DirectDialRefused(message)` when the pod
        side refused (the SPDY error stream's text), so callers can reset the client like a refused dial.

        The runtime dials the pod's port only once it accepted both streams,
        and a successful dial is silent: its refusal arrives about 1.3 ms
        after the data stream's reply (measured on the dev cluster), i.e.
        after this returns.  Such a late refusal makes `DirectConn.relay`
        reset the client socket, which the client sees as for a refused
        dial after accept (the redirect path).  A caller that must answer
        before relaying (a SOCKS5 reply) passes `refusal_wait` (seconds):
        dial then waits that long for a refusal, returning early when the
        pod sends data or ends its side.  Costs nothing when 0 (default).
        """
        if self._closed or not self._started or self._unusable:
            self._fallbacks += 1
            return None
        target = self.book.resolve(ip, port)
        if target is None or not await self._allowed(target.namespace):
            self._fallbacks += 1
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for attempt in range(2):
            left = deadline - loop.time()
            if left <= 0:
                break
            session: SpdySession | None = None
            try:
                session = await self._session(target.namespace, target.pod, left, target.port)
                reused = session.opened > 0
                # a dead connection nobody noticed (laptop slept): give a reused session half the time
                st = await session.open_pair(target.port, left / 2 if reused and attempt == 0 else left)
            except StreamRefused as exc:
                self._dial_errors += 1
                raise DirectDialRefused(str(exc)) from None
            except PermissionDenied:
                self._deny(target.namespace)
                log.info("direct plane: pods/portforward denied in %s (upgrade refused)", target.namespace)
                break
            except SpdyUnsupported as exc:
                self._unusable = f"the API server refused the SPDY upgrade ({exc})"
                log.warning("direct plane: %s; using the manager", self._unusable)
                break
            except ClusterError as exc:
                self._dial_errors += 1
                log.info("direct plane: %s: %s", target, exc)
                break
            except (SessionClosed, StreamReset, OSError) as exc:
                log.debug("direct plane: %s: %s; %s", target, exc, "again" if attempt == 0 else "giving up")
                continue
            except TimeoutError:
                if session is not None and not session.closed:
                    # no answer to a new stream: this connection is not to be trusted with new ones
                    session.draining = True
                    if not session.streams:
                        session.close("no answer to a new stream")
                continue
            if refusal_wait > 0:
                try:
                    await st.settled(min(refusal_wait, max(0.0, deadline - loop.time())))
                except StreamRefused as exc:
                    self._dial_errors += 1
                    raise DirectDialRefused(str(exc)) from None
                except StreamReset as exc:
                    log.debug("direct plane: %s: %s", target, exc)
                    continue
            self._dials += 1
            return DirectConn(self, st, target)
        self._fallbacks += 1
        return None


# ======================================================================== one connection
def _abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as the tunnel pumps do on errors."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class DirectConn:
    """One forwarded connection to a pod: an error + data stream pair on the pod's session."""

    def __init__(self, plane: DirectPlane, stream: MuxStream, target: PodTarget) -> None:
        self.plane = plane
        self.stream = stream
        self.target = target

    @property
    def error(self) -> str:
        """The runtime's error text for this connection, if any."""
        return self.stream.error.strip()

    async def relay(self, sock: socket.socket, early: bytes = b"") -> None:
        """Pump bytes between a connected local socket and the pod until both ends are done.
        Half-close both ways (client's EOF -> SPDY FIN; pod's FIN -> sock.shutdown(SHUT_WR)).
        Owns and closes `sock`. Errors after set-up abort the socket (RST) like the tunnel pumps do."""
        st = self.stream
        ok = False
        up: asyncio.Task[None] | None = None
        try:
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if early:
                st.write(early)
            st.attach(sock)
            up = asyncio.create_task(st.pump_up(sock), name=f"direct up {st.label}")
            waiting: set[asyncio.Future[None]] = {up, st.down_done}
            while waiting:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for f in done:
                    if f.exception() is not None:
                        raise f.exception()  # type: ignore[misc]
            ok = True
        except StreamRefused as exc:
            self.plane._dial_errors += 1
            log.info("direct plane: %s refused: %s", self.target, exc)
        except (StreamReset, SessionClosed, OSError) as exc:
            log.debug("direct plane: %s: %s", self.target, exc)
        finally:
            if up is not None and not up.done():
                up.cancel()
                with contextlib.suppress(BaseException):
                    await up
            if ok:
                sock.close()
            else:
                st.reset("relay ended")
                _abort(sock)

    def abort(self) -> None:
        """Give the connection up without relaying (the caller could not use it)."""
        self.stream.reset("not used")
