"""The direct data plane against the real dev cluster (API server, kubelet, containerd).

Runs inside the laptop network namespace (`rerun_in_laptop`: from the host
the test re-runs itself there), with the dev cluster's admin kubeconfig or a
ServiceAccount's.  A pod of the project image serves a few tiny TCP
protocols (`SERVER`); `DirectPlane` dials it by its Service's ClusterIP
(named targetPort) and by its pod IP, and the tests check what a client
socket sees: the bytes, the EOFs, a reset for a refused port, the number of
SPDY sessions behind 200 connections, and the manager fallback (None) where
RBAC denies ``pods/portforward``.

containerd (1.6 here) does not half-close the pod's socket: after either
side's EOF it gives the other direction one second, then closes both, as for
``kubectl port-forward``.  The half-close checks are written to that.
"""
from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from conftest import rerun_in_laptop
from test_kube_side import _namespace, _service_account

from tpnb import config
from tpnb.connector import kube
from tpnb.connector.direct import DirectConn, DirectDialRefused, DirectPlane
from tpnb.connector.kube import KubeTarget, load_target

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]

KUBECONFIG = Path("/var/lib/tpnb/devcluster/kubeconfig")

SERVER = r'''
import socket, threading
state = {"after_fin": b"", "eofs": 0}
def echo(c):
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    state["eofs"] += 1
    c.close()
def first(c):
    c.sendall(b"hello")
    c.shutdown(socket.SHUT_WR)
    buf = b""
    while True:
        d = c.recv(65536)
        if not d:
            break
        buf += d
    state["after_fin"] = buf
    c.close()
def report(c):
    c.sendall(repr(state).encode())
    c.close()
def peer(c):
    c.sendall(c.getpeername()[0].encode())
    c.close()
def serve(port, fn):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(256)
    while True:
        c, _ = s.accept()
        threading.Thread(target=fn, args=(c,), daemon=True).start()
for port, fn in ((7071, first), (7072, report), (7073, peer)):
    threading.Thread(target=serve, args=(port, fn), daemon=True).start()
serve(7070, echo)
'''


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def admin(request: pytest.FixtureRequest) -> KubeTarget | None:
    if rerun_in_laptop(request, KUBECONFIG, timeout=900):
        return load_target(str(KUBECONFIG), None)
    return None


async def _apply_app(t: KubeTarget, ns: str) -> None:
    await kube.request(t, "POST", "/api/v1/namespaces",
                       body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    await kube.request(t, "POST", f"/api/v1/namespaces/{ns}/configmaps", body={
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "srv"}, "data": {"server.py": SERVER}})
    await kube.request(t, "POST", f"/api/v1/namespaces/{ns}/pods", body={
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app", "labels": {"app": "direct"}},
        "spec": {"terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "srv", "image": config.get().manager_image, "imagePullPolicy": "Never",
                                 "command": ["python3", "-u", "/srv/server.py"],
                                 "ports": [{"name": "echo-port", "containerPort": 7070}],
                                 "readinessProbe": {"tcpSocket": {"port": 7073}, "periodSeconds": 1},
                                 "volumeMounts": [{"name": "src", "mountPath": "/srv"}]}],
                 "volumes": [{"name": "src", "configMap": {"name": "srv"}}]}})
    await kube.request(t, "POST", f"/api/v1/namespaces/{ns}/services", body={
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
        "spec": {"selector": {"app": "direct"},
                 "ports": [{"name": "main", "port": 80, "targetPort": "echo-port"},
                           {"name": "first", "port": 81, "targetPort": 7071}]}})


async def _wait_ready(t: KubeTarget, ns: str) -> tuple[str, str]:
    """(pod IP, ClusterIP) once the pod is Ready and in the Service's EndpointSlice."""
    for _ in range(180):
        p = await kube.request(t, "GET", f"/api/v1/namespaces/{ns}/pods/app")
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        slices = await kube.request(t, "GET", f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices")
        eps = [e for s in slices["items"] for e in s.get("endpoints") or []
               if (e.get("conditions") or {}).get("ready")]
        if ready and eps:
            svc = await kube.request(t, "GET", f"/api/v1/namespaces/{ns}/services/echo")
            return p["status"]["podIP"], svc["spec"]["clusterIP"]
        await asyncio.sleep(1)
    raise AssertionError(f"pod {ns}/app not ready: {p['status']}")


@pytest.fixture
async def app(admin: KubeTarget | None) -> AsyncIterator[tuple[KubeTarget, str, str, str] | None]:
    """(admin target, namespace, pod IP, ClusterIP) of the server pod in a fresh namespace."""
    if admin is None:
        yield None
        return
    ns = f"tpnb-direct-{uuid.uuid4().hex[:6]}"
    try:
        await _apply_app(admin, ns)
        pod_ip, cluster_ip = await _wait_ready(admin, ns)
        yield admin, ns, pod_ip, cluster_ip
    finally:
        await kube.request(admin, "DELETE", f"/api/v1/namespaces/{ns}", accept_status=(404,))


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(the relay's end, the client's end) of a loopback TCP connection, as the daemon hands over."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        mine, _ = srv.accept()
    client.setblocking(False)
    return mine, client


async def read_all(sock: socket.socket, timeout: float = 15) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    async with asyncio.timeout(timeout):
        while chunk := await loop.sock_recv(sock, 65536):
            out += chunk
    return bytes(out)


async def read_exactly(sock: socket.socket, n: int, timeout: float = 15) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    async with asyncio.timeout(timeout):
        while len(out) < n:
            chunk = await loop.sock_recv(sock, n - len(out))
            assert chunk, f"EOF after {bytes(out)!r}"
            out += chunk
    return bytes(out)


async def connect(plane: DirectPlane, ip: str, port: int) -> tuple[asyncio.Task[None], socket.socket]:
    conn = await plane.dial(ip, port)
    assert isinstance(conn, DirectConn), f"{ip}:{port} not dialled directly: {plane.status()}"
    mine, client = tcp_pair()
    return asyncio.create_task(conn.relay(mine)), client


async def roundtrip(plane: DirectPlane, ip: str, port: int, data: bytes) -> bytes:
    """Send `data`, half-close, read until EOF (the pod side must end the connection)."""
    relay, client = await connect(plane, ip, port)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(client, data)
        client.shutdown(socket.SHUT_WR)
        got = await read_all(client)
        await asyncio.wait_for(relay, 15)
        return got
    finally:
        client.close()


async def exchange(plane: DirectPlane, ip: str, port: int, data: bytes) -> tuple[bytes, asyncio.Task[None]]:
    """Send `data`, read as many bytes back, close: a request/response that does not wait for containerd's
    one-second close.  Returns the answer and the relay task (it ends when the pod side does)."""
    relay, client = await connect(plane, ip, port)
    try:
        await asyncio.get_running_loop().sock_sendall(client, data)
        return await read_exactly(client, len(data)), relay
    finally:
        client.close()


async def _wait_resolves(plane: DirectPlane, ip: str, port: int) -> None:
    for _ in range(100):
        if plane.resolve(ip, port) is not None:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{ip}:{port} never resolved")


async def test_direct_service_and_pod_dials_half_close_and_one_session_for_many(
        app: tuple[KubeTarget, str, str, str] | None) -> None:
    if app is None:
        return
    t, ns, pod_ip, cluster_ip = app
    plane = DirectPlane(t, [ns])
    await plane.start()
    try:
        st = plane.status()
        assert st.active and st.reason == "pods/portforward allowed cluster-wide", st
        await _wait_resolves(plane, cluster_ip, 80)
        target = plane.resolve(cluster_ip, 80)
        # the Service's named targetPort "echo-port" is the pod's 7070
        assert target is not None and (target.namespace, target.pod, target.port) == (ns, "app", 7070)
        # ClusterIP: bytes echoed; the client's EOF ends the pod side, then the client reads EOF
        payload = bytes(range(256)) * 400
        assert await roundtrip(plane, cluster_ip, 80, payload) == payload
        # pod IP, a port no container declares
        assert await roundtrip(plane, pod_ip, 7073, b"") == b"127.0.0.1"  # the runtime dials localhost
        # the pod speaks first and ends its side: the client reads EOF with its own side still open
        # (shutdown, not close), so it can still send
        relay, client = await connect(plane, cluster_ip, 81)
        try:
            assert await read_all(client) == b"hello"
            await asyncio.get_running_loop().sock_sendall(client, b"late")  # no EPIPE: half-open
            client.shutdown(socket.SHUT_WR)
            await asyncio.wait_for(relay, 15)
        finally:
            client.close()
        # and the pod reads what the client sends after its FIN (within containerd's one second)
        relay, client = await connect(plane, cluster_ip, 81)
        try:
            assert await read_exactly(client, 5) == b"hello"
            await asyncio.get_running_loop().sock_sendall(client, b"after the pod's FIN")
            client.shutdown(socket.SHUT_WR)
            assert await read_all(client) == b""
            await asyncio.wait_for(relay, 15)
        finally:
            client.close()
        report = ""
        for _ in range(20):
            report = (await roundtrip(plane, pod_ip, 7072, b"")).decode()
            if "after the pod" in report:
                break
            await asyncio.sleep(0.1)
        assert "'after_fin': b\"after the pod's FIN\"" in report and "'eofs': 1" in report, report

        # 200 new connections one after the other: all answer, all on one SPDY connection
        relays = []
        before = plane.status().dials
        for i in range(200):
            msg = f"conn {i}".encode()
            got, relay = await exchange(plane, pod_ip if i % 2 else cluster_ip, 7070 if i % 2 else 80, msg)
            assert got == msg
            relays.append(relay)
        st = plane.status()
        assert st.sessions == 1 and st.sessions_opened == 1, st
        assert st.dials == before + 200 and st.dial_errors == 0 and st.fallbacks == 0, st
        # several at once share it too
        got = await asyncio.gather(*(exchange(plane, pod_ip, 7070, b"x%d" % i) for i in range(20)))
        assert [g[0] for g in got] == [b"x%d" % i for i in range(20)] and plane.status().sessions_opened == 1
        # every forwarded connection ends (containerd closes the pod side a second after the client's EOF)
        await asyncio.wait_for(asyncio.gather(*relays, *(g[1] for g in got)), 30)
        session = next(iter(plane._sessions.values()))
        for _ in range(50):  # the error streams' FINs follow the data streams' (at most REFUSAL_WAIT later)
            if not session.streams:
                break
            await asyncio.sleep(0.1)
        assert not session.streams and session.opened == plane.status().dials

        # an address with no pod behind it: the manager's
        assert await plane.dial("10.244.250.250", 80) is None
        assert await plane.dial(cluster_ip, 9999) is None  # not a port of the Service
    finally:
        await plane.aclose()
    assert plane.status().sessions == 0


async def test_direct_refused_port_and_a_broken_session(app: tuple[KubeTarget, str, str, str] | None) -> None:
    if app is None:
        return
    t, ns, pod_ip, _ = app
    plane = DirectPlane(t, [ns], idle_timeout=3.0)
    await plane.start()
    try:
        await _wait_resolves(plane, pod_ip, 7070)
        assert await roundtrip(plane, pod_ip, 7070, b"warm") == b"warm"
        # nothing listens on 9 in the pod: either dial raises with the runtime's reason, or (the usual
        # order, the runtime dials after accepting the streams) the relay resets the client
        reason = ""
        try:
            conn = await plane.dial(pod_ip, 9)
        except DirectDialRefused as exc:
            reason = str(exc)
        else:
            assert conn is not None
            mine, client = tcp_pair()
            relay = asyncio.create_task(conn.relay(mine))
            with pytest.raises(ConnectionResetError):
                await read_all(client)
            await asyncio.wait_for(relay, 5)
            client.close()
            reason = conn.error
        assert "connection refused" in reason and "9" in reason, reason
        assert plane.status().dial_errors == 1
        # a caller that must answer before relaying (SOCKS5) waits for the runtime's verdict
        with pytest.raises(DirectDialRefused, match="connection refused"):
            await plane.dial(pod_ip, 9, refusal_wait=2.0)
        assert plane.status().dial_errors == 2
        # and a listening port passes that wait (silence, then a connection that works)
        conn = await plane.dial(pod_ip, 7070, refusal_wait=0.2)
        assert conn is not None
        conn.abort()
        # the session survived the refusal
        assert await roundtrip(plane, pod_ip, 7070, b"still") == b"still"
        assert plane.status().sessions_opened == 1

        # kill the SPDY connection under an open forwarded connection
        relay, client = await connect(plane, pod_ip, 7070)
        session = next(iter(plane._sessions.values()))
        raw = session.conn.get_extra_info("socket")
        raw.shutdown(socket.SHUT_RDWR)
        with pytest.raises(ConnectionResetError):
            await read_all(client)
        await asyncio.wait_for(relay, 5)
        client.close()
        for _ in range(100):
            if plane.status().sessions == 0:
                break
            await asyncio.sleep(0.1)
        assert plane.status().sessions == 0
        # the next dial opens a new one
        assert await roundtrip(plane, pod_ip, 7070, b"again") == b"again"
        st = plane.status()
        assert st.sessions == 1 and st.sessions_opened == 2, st
        # idle close: no streams for idle_timeout -> the session goes
        for _ in range(100):
            if plane.status().sessions == 0:
                break
            await asyncio.sleep(0.1)
        assert plane.status().sessions == 0
        assert await roundtrip(plane, pod_ip, 7070, b"after idle") == b"after idle"
        assert plane.status().sessions_opened == 3
    finally:
        await plane.aclose()


def _role(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name},
            "rules": rules}


async def test_direct_rbac_denied_namespace_falls_back(app: tuple[KubeTarget, str, str, str] | None,
                                                       tmp_path: Path) -> None:
    """A user who may watch two namespaces but port-forward only in one: the other goes to the manager."""
    if app is None:
        return
    admin, ns, pod_ip, cluster_ip = app
    other = f"{ns}-b"
    try:
        await _apply_app(admin, other)
        other_pod_ip, other_cluster_ip = await _wait_ready(admin, other)
        read = [{"apiGroups": [""], "resources": ["pods", "services"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                 "verbs": ["get", "list", "watch"]}]
        forward = {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create"]}
        for where, rules in ((ns, [*read, forward]), (other, read)):
            await kube.request(admin, "POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{where}/roles",
                               body=_role("direct-dev", rules))
            await kube.request(admin, "POST",
                               f"/apis/rbac.authorization.k8s.io/v1/namespaces/{where}/rolebindings", body={
                                   "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                                   "metadata": {"name": "direct-dev"},
                                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                               "name": "direct-dev"},
                                   "subjects": [{"kind": "ServiceAccount", "name": "dev", "namespace": ns}]})
        dev = (await _service_account(admin, ns, "dev", tmp_path))[0]
        plane = DirectPlane(dev, [ns, other])
        await plane.start()
        try:
            st = plane.status()
            # no cluster-wide list for this user: it watches per namespace, and knows where it may forward
            assert st.active and st.namespaces_denied == [other], st
            assert st.reason == f"pods/portforward allowed in {ns}", st
            await _wait_resolves(plane, other_cluster_ip, 80)
            # the denied namespace: None, by ClusterIP and by pod IP, and no session was tried
            assert await plane.dial(other_cluster_ip, 80) is None
            assert await plane.dial(other_pod_ip, 7070) is None
            assert plane.status().sessions_opened == 0 and plane.status().fallbacks == 2
            # the allowed one works for the same user
            await _wait_resolves(plane, cluster_ip, 80)
            assert await roundtrip(plane, cluster_ip, 80, b"allowed") == b"allowed"
            # the legitimate path for the other namespace: an admin grants portforward there; an upgrade
            # refused with 403 (here: the grant withdrawn in the allowed one) marks it denied at once
            await kube.request(admin, "PATCH", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles/direct-dev",
                               body=[{"op": "replace", "path": "/rules", "value": read}],
                               content_type="application/json-patch+json")
            for _ in range(50):
                for s in list(plane._sessions.values()):
                    s.close("test: force a new upgrade")
                conn = await plane.dial(pod_ip, 7070)
                if conn is None:
                    break
                conn.abort()
                await asyncio.sleep(0.2)  # the RBAC cache of the API server catches up
            assert conn is None and ns in plane.status().namespaces_denied, plane.status()
        finally:
            await plane.aclose()
    finally:
        await kube.request(admin, "DELETE", f"/api/v1/namespaces/{other}", accept_status=(404,))


# ====================================================================== the watches behind the address book
def _svc(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"ports": [{"port": 80}], "selector": {"app": name}}}


@pytest.fixture
async def fresh_ns(admin: KubeTarget | None) -> AsyncIterator[str | None]:
    """An empty namespace of the admin's (deleted afterwards)."""
    if admin is None:
        yield None
        return
    async with _namespace(admin, "tpnb-watch") as ns:
        yield ns


async def _first_event(t: KubeTarget, path: str, rv: str) -> tuple[str, dict[str, Any]]:
    async for ev in kube.watch_events(t, path, rv, 10):
        return ev
    raise AssertionError(f"the watch of {path} from {rv} ended without an event")


async def test_watch_events_follows_the_api_server_and_reports_expiry_and_refusal(
        admin: KubeTarget | None, fresh_ns: str | None, tmp_path: Path) -> None:
    """`kube.watch_events` against the real API server.

    From a list's version it sees a Service's ADDED, MODIFIED and DELETED, in order, the MODIFIED one
    whole although its 200 KB annotation takes many reads of the stream.  A version the
    API server's watch cache no longer holds (leases are renewed every few seconds, so version 1 drops
    out of theirs within minutes of the cluster's start) comes back as it really does: an ERROR event
    carrying a 410 Status inside a 200 stream, which the reflector turns into a relist.  A user without
    the right to watch gets the API server's 403 as an ApiException."""
    if admin is None or fresh_ns is None:
        return
    from kubernetes.client import ApiException

    ns, path = fresh_ns, f"/api/v1/namespaces/{fresh_ns}/services"
    rv = (await kube.request(admin, "GET", path))["metadata"]["resourceVersion"]
    seen: list[tuple[str, str, int]] = []
    big = "".join(uuid.uuid4().hex for _ in range(6250))  # 200 KB that no compression shortens
    annotations: list[str] = []

    async def follow() -> None:
        async for typ, obj in kube.watch_events(admin, path, rv, 60):
            if typ != "BOOKMARK":
                seen.append((typ, obj["metadata"]["name"], int(obj["metadata"]["resourceVersion"])))
            if typ == "MODIFIED":
                annotations.append((obj["metadata"].get("annotations") or {}).get("big", ""))
            if typ == "DELETED":
                return

    task = asyncio.create_task(follow())
    await kube.request(admin, "POST", path, body=_svc("w"))
    await kube.request(admin, "PATCH", f"{path}/w", body={"metadata": {"labels": {"step": "two"}, "annotations": {"big": big}}},
                       content_type="application/merge-patch+json")
    await kube.request(admin, "DELETE", f"{path}/w")
    await asyncio.wait_for(task, 30)
    assert [(typ, name) for typ, name, _ in seen] == [("ADDED", "w"), ("MODIFIED", "w"), ("DELETED", "w")]
    assert [v for _, _, v in seen] == sorted({v for _, _, v in seen})  # versions only grow
    assert annotations == [big]

    leases = "/apis/coordination.k8s.io/v1/leases"
    for _ in range(40):  # a cluster that has just started may still hold version 1: wait it out (<= 200 s)
        typ, obj = await _first_event(admin, leases, "1")
        if typ == "ERROR":
            break
        await asyncio.sleep(5)
    assert (typ, obj.get("code"), obj.get("reason")) == ("ERROR", 410, "Expired"), (typ, obj)
    assert "too old resource version" in obj.get("message", "")
    # the legitimate path right after: from a current version the same watch delivers
    now = (await kube.request(admin, "GET", leases))["metadata"]["resourceVersion"]
    typ, _ = await _first_event(admin, leases, now)
    assert typ in ("ADDED", "MODIFIED", "BOOKMARK")

    nobody = (await _service_account(admin, ns, "nobody", tmp_path))[0]
    with pytest.raises(ApiException) as ei:
        await _first_event(nobody, path, rv)
    assert ei.value.status == 403 and "cannot watch resource" in ei.value.body, ei.value.body


async def test_reflector_rewatches_from_its_last_version_and_a_denied_list_ends_it(
        admin: KubeTarget | None, fresh_ns: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The address book's reflector against the real API server: it lists once, follows the watch, and
    when the server ends a watch (here after 2 s, `WATCH_SECONDS`) it watches again from the last
    version it saw: nothing is missed and nothing is listed again.  A user who may not list Services
    cluster-wide is told so by the API server's 403, and the reflector ends (the plane then watches
    per namespace, `test_direct_rbac_denied_namespace_falls_back`)."""
    if admin is None or fresh_ns is None:
        return
    from tpnb.connector import direct

    ns, path = fresh_ns, f"/api/v1/namespaces/{fresh_ns}/services"
    lists: list[str] = []
    real_request = kube.request

    async def counting(t: KubeTarget, method: str, p: str, **kw: Any) -> Any:  # the real call, counted
        if method == "GET" and p == path:
            lists.append(p)
        return await real_request(t, method, p, **kw)

    watches: list[int] = []
    real_watch = kube.watch_events

    async def counting_watch(t: KubeTarget, p: str, rv: str, *a: Any, **kw: Any) -> AsyncIterator[Any]:
        watches.append(int(rv))
        async for ev in real_watch(t, p, rv, *a, **kw):
            yield ev

    monkeypatch.setattr(direct.kube, "request", counting)
    monkeypatch.setattr(direct.kube, "watch_events", counting_watch)
    monkeypatch.setattr(direct, "WATCH_SECONDS", 2)
    await kube.request(admin, "POST", path, body=_svc("before"))
    plane = DirectPlane(admin, [ns])
    r = direct._Reflector(plane, "Service", ns)
    task = asyncio.create_task(r.run())

    async def book_is(names: list[str]) -> None:
        for _ in range(100):
            if sorted(n for s, n in plane.book.services if s == ns) == names:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"the book has {sorted(plane.book.services)}, not {names}: {r.error}")

    try:
        await asyncio.wait_for(r.first.wait(), 30)
        await book_is(["before"])
        await kube.request(admin, "POST", path, body=_svc("during"))
        await book_is(["before", "during"])
        await asyncio.sleep(5)  # the server has ended at least two 2-second watches
        await kube.request(admin, "POST", path, body=_svc("after"))
        await kube.request(admin, "DELETE", f"{path}/before")
        await book_is(["after", "during"])
        assert lists == [path] and r.listed and not r.error, (lists, r.error)
        # watched again and again, each time from where the last one got to (BOOKMARKs move it too)
        assert len(watches) >= 3 and watches == sorted(watches) and watches[-1] > watches[0], watches
        assert r.events >= 3  # ADDED during, ADDED after, DELETED before ("before" itself was listed)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    nobody = (await _service_account(admin, ns, "nobody", tmp_path))[0]
    denied = direct._Reflector(DirectPlane(nobody, [ns]), "Service", None)
    await asyncio.wait_for(denied.run(), 30)  # a 403 on the first list ends it
    assert denied.denied and denied.first.is_set() and "cannot list resource" in denied.error, denied.error
