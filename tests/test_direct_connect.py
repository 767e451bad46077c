"""`tpnb connect` on the direct data plane (issue 15), end to end in a laptop network namespace.

With the root daemon, a connection a laptop process opens to a Service or a
pod is redirected to the daemon, handed over (its socket, SCM_RIGHTS) to the
connector, and port-forwarded from there straight to the pod, with neither
gRPC nor the traffic-manager on the path.  What a user sees, and what these
tests look at:

* the echoserver reports who connected: through a port-forward the runtime
  dials the app from inside the pod, so the app sees ``127.0.0.1``; through
  the manager it sees the manager pod's address.  That tells the two planes
  apart from the outside, request by request;
* `tpnb status` names the plane and why, with its counters (`-o json` too);
* `connector.data_plane: manager` (here TPNB_CONNECTOR_DATA_PLANE) keeps
  every flow on the manager, and a namespace whose RBAC denies
  pods/portforward is served by the manager while the allowed one is direct;
* kill -9 of the connector while a connection is open: new connections are
  refused cleanly (never hang), the daemon takes the network down, and the
  next `tpnb connect` works (direct again).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import LaptopRunner

pytestmark = pytest.mark.cluster

NS = "tpdirect"
NS_B = "tpdirect-b"
ECHO = "tpnb.local/echoserver:1.4"
MANAGER_NS = "tpnb"
SERVICE_CIDR = "10.43.0.0/16"  # the dev cluster's


def _app(ns: str) -> dict[str, Any]:
    labels = {"app": "hello"}
    return {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "hello", "namespace": ns},
         "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
             "containers": [{"name": "echo", "image": ECHO, "ports": [{"containerPort": 8080}]}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hello", "namespace": ns},
         "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}},
    ]}


@pytest.fixture(scope="module")
def lap(devcluster: Any) -> Iterator[LaptopRunner]:
    lap = LaptopRunner(devcluster, "direct")
    lap.fresh_namespace(NS, timeout=120)
    lap.kubectl("delete", "ns", NS_B, "--ignore-not-found", "--wait=true", timeout=120)
    lap.kubectl("create", "ns", NS_B)
    for ns in (NS, NS_B):
        lap.kubectl("apply", "-f", "-", input=json.dumps(_app(ns)))
    for ns in (NS, NS_B):
        lap.kubectl("-n", ns, "rollout", "status", "deploy/hello", "--timeout=120s", timeout=150)
    yield lap
    lap.kubectl("-n", MANAGER_NS, "delete", "role,rolebinding", "-l", "tpnb-test=direct-connect",
                check=False)
    lap.drop_namespace(NS_B)
    lap.drop_namespace(NS)


def _curl(lap: LaptopRunner, url: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return lap.run(["curl", "-sS", "--max-time", str(timeout), url], check=False, timeout=timeout + 10)


def _peer(lap: LaptopRunner, url: str) -> str:
    """The client address the echoserver saw for one request to `url` (fails the test if none)."""
    r = _curl(lap, url)
    assert r.returncode == 0 and "CLIENT VALUES:" in r.stdout, (url, r.returncode, r.stderr)
    m = re.search(r"client_address=(\S+)", r.stdout)
    assert m, r.stdout
    return m.group(1)


def _via_manager(peer: str) -> bool:
    """The app saw a peer of the cluster's network (the traffic-manager pod, or its node where
    kube-proxy masquerades a ClusterIP dial across nodes), not the port-forward's loopback.
    (The manager pod's own address is not compared: on the shared dev cluster another session's
    `connect` may roll the manager to its own image at any time.)"""
    return peer.startswith(("10.42.", "10.249.")) and not peer.startswith("127.")


def _plane(lap: LaptopRunner) -> dict[str, Any]:
    st = json.loads(lap.run(["tpnb", "status", "-o", "json"]).stdout)
    return st["data_plane"]


def _connector_pid(lap: LaptopRunner) -> int:
    netns = lap.cmd(["true"])[3]
    ino = os.stat(f"/run/netns/{netns}").st_ino
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            if os.stat(d / "ns" / "net").st_ino == ino and b"tpnb.connector" in argv:
                pids.append(int(d.name))
        except OSError:
            continue
    assert len(pids) == 1, pids
    return pids[0]


def _wait(cond: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _ips(lap: LaptopRunner, ns: str) -> tuple[str, str]:
    svc = lap.kubectl("-n", ns, "get", "svc", "hello", "-o", "jsonpath={.spec.clusterIP}").stdout
    pod = lap.kubectl("-n", ns, "get", "pod", "-l", "app=hello", "-o",
                      "jsonpath={.items[0].status.podIP}").stdout
    assert svc and pod
    return svc, pod


def test_connect_goes_direct_to_pods(lap: LaptopRunner) -> None:
    lap.run(["tpnb", "quit", "--daemon"], check=False)
    svc_ip, pod_ip = _ips(lap, NS)
    lap.run(["tpnb", "connect", "--namespace", NS], timeout=120)
    try:
        st = lap.run(["tpnb", "status"]).stdout
        assert "Data plane       : direct port-forward" in st, st
        assert "Hand-off         : the root daemon hands redirected TCP to the connector" in st, st
        before = _plane(lap)

        # by name, by ClusterIP and by pod IP: each request reached the app from inside its pod
        assert _peer(lap, f"hello.{NS}") == "127.0.0.1"
        assert _peer(lap, f"http://{svc_ip}/") == "127.0.0.1"
        assert _peer(lap, f"http://{pod_ip}:8080/x") == "127.0.0.1"

        after = _plane(lap)
        assert after["plane"] == "direct" and after["mode"] == "auto"
        assert after["handoff_linked"] is True
        assert after["dials"] - before["dials"] == 3, after
        assert after["handoff_taken"] - before["handoff_taken"] == 3, after
        assert after["handoff_not_mine"] == before["handoff_not_mine"], after
        assert after["sessions"] >= 1

        # a closed port of the pod: the client sees a refusal at once, as from the pod network
        t0 = time.monotonic()
        r = _curl(lap, f"http://{pod_ip}:8081/", timeout=10)
        assert r.returncode in (7, 52, 56), (r.returncode, r.stderr)
        assert time.monotonic() - t0 < 5

        # bulk, both ways, byte-exact through the relay
        script = r"""
import os, socket
payload = os.urandom(4 * 1024 * 1024)
s = socket.create_connection(("hello.%s", 80), timeout=20)
s.sendall(b"POST /up HTTP/1.0\r\nHost: hello\r\nContent-Length: %%d\r\n\r\n" %% len(payload) + payload)
buf = b""
while chunk := s.recv(1 << 20):
    buf += chunk
assert payload in buf, len(buf)
print("ok")
""" % NS
        r = lap.run(["python3", "-c", script], timeout=120, check=False)
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    finally:
        lap.run(["tpnb", "quit", "--daemon"], check=False)


def test_manager_data_plane_by_config(lap: LaptopRunner) -> None:
    lap.run(["tpnb", "quit", "--daemon"], check=False)
    _, pod_ip = _ips(lap, NS)
    lap.run(["env", "TPNB_CONNECTOR_DATA_PLANE=manager", "tpnb", "connect", "--namespace", NS], timeout=120)
    try:
        st = lap.run(["tpnb", "status"]).stdout
        assert "Data plane       : manager tunnels (connector.data_plane is manager)" in st, st
        # pod-network semantics: the app sees the manager pod, not loopback
        assert _via_manager(_peer(lap, f"hello.{NS}"))
        assert _via_manager(_peer(lap, f"http://{pod_ip}:8080/"))
        d = _plane(lap)
        assert d["plane"] == "manager" and d["mode"] == "manager" and d["dials"] == 0
        assert d["handoff_linked"] is False and d["handoff_taken"] == 0
    finally:
        lap.run(["tpnb", "quit", "--daemon"], check=False)
    # the setting is checked: a typo is a clear error, not a traceback
    r = lap.run(["env", "TPNB_CONNECTOR_DATA_PLANE=fast", "tpnb", "connect", "--namespace", NS],
                check=False, timeout=120)
    assert r.returncode != 0 and "connector.data_plane" in r.stderr and "Traceback" not in r.stderr, r.stderr


def _developer(lap: LaptopRunner, tmp_path: Path) -> Path:
    """A user who may port-forward in NS but not in NS_B (both readable), plus what connect needs."""
    sa = "dev"
    subject = [{"kind": "ServiceAccount", "name": sa, "namespace": NS}]
    read = [
        {"apiGroups": ["apps"], "resources": ["deployments", "replicasets", "statefulsets"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["services", "pods", "events"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
    ]
    forward = {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create"]}
    manager = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}, forward,
               {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]}]
    objs: list[dict[str, Any]] = []
    for ns, rules in ((MANAGER_NS, manager), (NS, [*read, forward]), (NS_B, read)):
        name = "tpnb-test-direct-dev"
        meta = {"name": name, "namespace": ns, "labels": {"tpnb-test": "direct-connect"}}
        objs.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
                     "rules": rules})
        objs.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
                     "subjects": subject,
                     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}})
    lap.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))
    return lap.kubeconfig_as(sa, NS, tmp_path)


def test_namespace_denied_portforward_goes_through_the_manager(lap: LaptopRunner, tmp_path: Path) -> None:
    lap.run(["tpnb", "quit", "--daemon"], check=False)
    kc = _developer(lap, tmp_path)
    try:
        # (this user may not read the kubernetes Service, so the service subnet is named for it)
        lap.run(["env", f"KUBECONFIG={kc}", "tpnb", "connect", "--namespace", NS, "--mapped-namespaces", NS_B,
                 "--also-proxy", SERVICE_CIDR], timeout=120)
        st = lap.run(["tpnb", "status"]).stdout
        assert "Data plane       : direct port-forward" in st, st
        assert f"via manager: pods/portforward denied in {NS_B}" in st, st
        before = _plane(lap)
        assert before["namespaces_denied"] == [NS_B]
        assert _peer(lap, f"hello.{NS}") == "127.0.0.1"          # allowed: direct
        assert _via_manager(_peer(lap, f"hello.{NS_B}"))          # denied: the manager, still answered
        _, pod_b = _ips(lap, NS_B)
        assert _via_manager(_peer(lap, f"http://{pod_b}:8080/"))
        after = _plane(lap)
        assert after["handoff_taken"] - before["handoff_taken"] == 1, after
        assert after["handoff_not_mine"] - before["handoff_not_mine"] == 2, after
        lap.run(["tpnb", "quit", "--daemon"], check=False)

        # only the denied namespace in the session: no direct plane at all, and status says why
        lap.run(["env", f"KUBECONFIG={kc}", "tpnb", "connect", "--namespace", NS_B, "--also-proxy", SERVICE_CIDR],
                timeout=120)
        st = lap.run(["tpnb", "status"]).stdout
        assert f"Data plane       : manager tunnels (pods/portforward denied in {NS_B})" in st, st
        assert _via_manager(_peer(lap, f"hello.{NS_B}"))
        lap.run(["tpnb", "quit", "--daemon"], check=False)

        # connector.data_plane=direct where it cannot be had: connect fails and says what to do
        r = lap.run(["env", f"KUBECONFIG={kc}", "TPNB_CONNECTOR_DATA_PLANE=direct", "tpnb", "connect",
                     "--namespace", NS_B], check=False, timeout=120)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert "connector.data_plane is direct" in r.stderr and f"denied in {NS_B}" in r.stderr, r.stderr
    finally:
        lap.run(["tpnb", "quit", "--daemon"], check=False)


def test_kill9_connector_mid_use_then_connect_again(lap: LaptopRunner) -> None:
    lap.run(["tpnb", "quit", "--daemon"], check=False)
    lap.run(["tpnb", "connect", "--namespace", NS], timeout=120)
    try:
        assert _peer(lap, f"hello.{NS}") == "127.0.0.1"
        resolv_connected = lap.run(["cat", "/etc/resolv.conf"]).stdout
        # a connection held open through the direct plane while the connector dies
        holder = subprocess.Popen(lap.cmd(["python3", "-c", f"""
import socket, sys, time
s = socket.create_connection(("hello.{NS}", 80), timeout=10)
s.sendall(b"GET /first HTTP/1.1\\r\\nHost: hello\\r\\n\\r\\n")
assert b"CLIENT VALUES" in s.recv(65536)
print("held", flush=True)
time.sleep(3)
try:
    s.sendall(b"GET /second HTTP/1.1\\r\\nHost: hello\\r\\n\\r\\n")
    print("after:", repr(s.recv(65536)[:20]), flush=True)
except OSError as exc:
    print("after:", type(exc).__name__, flush=True)
"""]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        svc_ip = _ips(lap, NS)[0]
        os.kill(_connector_pid(lap), 9)
        # new connections over the next ~2 s, while the daemon notices and takes the network down:
        # each answered or refused, never hanging
        for _ in range(15):
            time.sleep(0.05)
            t0 = time.monotonic()
            r = _curl(lap, f"http://{svc_ip}/", timeout=8)
            assert time.monotonic() - t0 < 8, "a new connection hung after the connector died"
            # answered, or refused at once: no route, a reset at connect, send or receive, or an empty reply
            assert r.returncode in (0, 6, 7, 52, 55, 56), (r.returncode, r.stderr)
        out, _ = holder.communicate(timeout=30)
        # the held connection ended with the connector (a reset or EOF), it did not hang
        assert out.startswith("after:"), out
        # the daemon noticed and took the network down: nothing left pointing at the dead connector
        _wait(lambda: lap.run(["cat", "/etc/resolv.conf"]).stdout != resolv_connected, 15,
              "the root daemon to restore resolv.conf after its connector died")
        r = lap.run(["tpnb", "connect", "--namespace", NS], timeout=120)
        assert "Connected to context" in r.stdout
        assert _peer(lap, f"hello.{NS}") == "127.0.0.1"
        assert _plane(lap)["handoff_linked"] is True
    finally:
        lap.run(["tpnb", "quit", "--daemon"], check=False)


def test_rootless_faces_dial_direct_first(lap: LaptopRunner) -> None:
    """Without the root daemon: the SOCKS5/HTTP proxy and the in-process socket hooks go direct too."""
    lap.run(["tpnb", "quit", "--daemon"], check=False)
    lap.run(["tpnb", "connect", "--no-root", "--namespace", NS], timeout=120)
    try:
        doc = json.loads(lap.run(["tpnb", "status", "-o", "json"]).stdout)
        assert doc["outbound_mode"] == "rootless" and doc["data_plane"]["plane"] == "direct", doc
        before = doc["data_plane"]["dials"]
        socks, http = doc["proxy_socks_url"], doc["proxy_http_url"]
        for argv in (["curl", "-sS", "--max-time", "10", "-x", socks, f"http://hello.{NS}/socks"],
                     ["curl", "-sS", "--max-time", "10", "-x", http, f"http://hello.{NS}/http"],
                     ["curl", "-sS", "--max-time", "10", "-p", "-x", http, f"http://hello.{NS}/connect"]):
            r = lap.run(argv, check=False, timeout=30)
            assert r.returncode == 0 and "client_address=127.0.0.1" in r.stdout, (argv, r.stdout, r.stderr)
        # Python code in a process with the hooks on (what `%tp connect` does in a kernel): no proxy variables
        script = f"""
import urllib.request
from tpnb import api, rootless
s = api.Session()
assert rootless.enable_in_process(s, s.status(), set_env=False)
body = urllib.request.build_opener(urllib.request.ProxyHandler({{}})).open("http://hello.{NS}/hooks", timeout=10).read()
print(body.decode())
"""
        r = lap.run(["python3", "-c", script], check=False, timeout=60)
        assert r.returncode == 0 and "client_address=127.0.0.1" in r.stdout, (r.stdout, r.stderr[-2000:])
        assert json.loads(lap.run(["tpnb", "status", "-o", "json"]).stdout)["data_plane"]["dials"] - before == 4
        # a closed port through SOCKS: refused in the SOCKS reply (curl 97/7) when the runtime's error came
        # first, else a reset right after it (55/56: the runtime reports the refusal after the streams)
        _, pod_ip = _ips(lap, NS)
        t0 = time.monotonic()
        r = lap.run(["curl", "-sS", "--max-time", "10", "-x", socks, f"http://{pod_ip}:8081/"], check=False)
        assert r.returncode in (7, 52, 55, 56, 97), (r.returncode, r.stderr)
        assert time.monotonic() - t0 < 5
    finally:
        lap.run(["tpnb", "quit", "--daemon"], check=False)
