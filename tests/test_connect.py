"""`tpnb connect` end to end: the laptop inside the cluster (issue 3).

Every test runs the real CLI inside a laptop network namespace of the dev
cluster, against real Services and pods.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import time
from typing import Any, Iterator

import pytest

from conftest import LaptopRunner

pytestmark = pytest.mark.cluster

NS = "tpconn"
ECHO = "tpnb.local/echoserver:1.4"


@pytest.fixture(scope="module")
def lap(devcluster: Any) -> Iterator[LaptopRunner]:
    lap = LaptopRunner(devcluster, "conn")
    lap.fresh_namespace(NS, timeout=120)
    lap.kubectl("-n", NS, "create", "deploy", "hello", f"--image={ECHO}")
    lap.kubectl("-n", NS, "expose", "deploy", "hello", "--port", "80", "--target-port", "8080")
    # a non-HTTP TCP service and a UDP service, from the echoserver image's extra binaries
    lap.kubectl("-n", NS, "apply", "-f", "-", input=json.dumps(_udp_tcp_objects()))
    for d in ("hello", "udpecho"):
        lap.kubectl("-n", NS, "rollout", "status", f"deploy/{d}", "--timeout=120s", timeout=150)
    yield lap
    lap.drop_namespace(NS)


def _udp_tcp_objects() -> dict[str, Any]:
    labels = {"app": "udpecho"}
    return {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "udpecho"},
         "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
             "containers": [{"name": "udp", "image": ECHO, "command": ["/udpecho"],
                             "ports": [{"containerPort": 9999, "protocol": "UDP"}]},
                            {"name": "tcp", "image": ECHO, "env": [{"name": "EXTRA_PORTS", "value": "7000"}],
                             "ports": [{"containerPort": 7000}]}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "udpecho"},
         "spec": {"selector": labels, "ports": [{"name": "udp", "port": 9999, "protocol": "UDP"},
                                                {"name": "tcp", "port": 7000, "protocol": "TCP"}]}},
    ]}


def _routes_and_resolv(lap: LaptopRunner) -> tuple[str, str, str]:
    """What connect changes in the laptop: routes, resolv.conf, nftables rules."""
    routes = lap.run(["ip", "route", "show", "table", "all"]).stdout
    # a fresh laptop's IPv6 link-local address appears on its own a moment after link-up: not ours
    routes = "\n".join(sorted(ln for ln in routes.splitlines() if "fe80:" not in ln))
    return routes, lap.run(["cat", "/etc/resolv.conf"]).stdout, lap.run(["nft", "list", "ruleset"]).stdout


def _curl(lap: LaptopRunner, url: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return lap.run(["curl", "-sS", "--max-time", str(timeout), url], check=False, timeout=timeout + 10)


def _assert_echo_byte_exact(lap: LaptopRunner, mib: int) -> None:
    """POST `mib` MiB of random bytes to hello and find them intact in the echo."""
    script = r"""
import os, socket
payload = os.urandom(%d * 1024 * 1024)
s = socket.create_connection(("hello.%s", 80), timeout=20)
s.sendall(b"POST /up HTTP/1.0\r\nHost: hello\r\nContent-Length: %%d\r\n\r\n" %% len(payload) + payload)
buf = b""
while chunk := s.recv(1 << 20):
    buf += chunk
assert payload in buf, len(buf)
print("ok")
""" % (mib, NS)
    r = lap.run(["python3", "-c", script], timeout=120, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_seed_walkthrough_outbound(lap: LaptopRunner) -> None:
    before = _routes_and_resolv(lap)
    ip = lap.kubectl("-n", NS, "get", "svc", "hello", "-o", "jsonpath={.spec.clusterIP}").stdout
    pod_ip = lap.kubectl("-n", NS, "get", "pod", "-l", "app=hello", "-o",
                         "jsonpath={.items[0].status.podIP}").stdout
    assert ip and pod_ip

    # before connecting, the laptop cannot reach the cluster
    t0 = time.monotonic()
    r = _curl(lap, f"http://{ip}/", timeout=5)
    assert r.returncode != 0 and time.monotonic() - t0 < 3

    r = lap.run(["tpnb", "connect", "--namespace", NS], timeout=120)
    assert "Connected to context tpnb-dev (https://10.250.0.1:6443)" in r.stdout
    assert "Connecting to traffic manager..." in r.stdout

    r = _curl(lap, f"hello.{NS}")
    assert r.returncode == 0, r.stderr
    assert "CLIENT VALUES:" in r.stdout and f"host=hello.{NS}" in r.stdout
    for url in (f"hello.{NS}.svc.cluster.local", "hello", f"http://{ip}/", f"http://{pod_ip}:8080/x?y=1"):
        r = _curl(lap, url)
        assert r.returncode == 0 and "CLIENT VALUES:" in r.stdout, (url, r.stderr)
    assert "real path=/x" in r.stdout and "query=y=1" in r.stdout

    st = lap.run(["tpnb", "status"]).stdout
    assert "Connected to context tpnb-dev" in st
    assert "10.43.0.0/16" in st and "10.42.0.0/" in st
    # each cluster address is routed once: the nodes' podCIDRs inside the cluster's pod range are that range
    line = next(ln for ln in st.splitlines() if "Pod subnets" in ln)
    nets = [ipaddress.ip_network(n.strip()) for n in line.split(":", 1)[1].split(",")]
    assert nets and not any(a != b and a.overlaps(b) for a in nets for b in nets), line
    # TCP to the cluster rides the kernel's TCP stack (nftables redirect to the daemon)
    assert "TCP engine       : kernel (nftables redirect)" in st
    assert "table ip tpnb0" in lap.run(["nft", "list", "ruleset"]).stdout

    # a closed port answers at once with a reset, as it would inside the cluster
    t0 = time.monotonic()
    r = _curl(lap, f"http://{pod_ip}:8081/", timeout=10)
    assert r.returncode in (7, 52, 56), (r.returncode, r.stderr)
    assert time.monotonic() - t0 < 5

    lap.run(["tpnb", "quit"])
    r = _curl(lap, f"hello.{NS}", timeout=5)
    assert r.returncode == 6 and "Could not resolve host" in r.stderr
    assert _routes_and_resolv(lap) == before


def test_raw_tcp_and_udp_through_the_tunnel(lap: LaptopRunner) -> None:
    lap.run(["tpnb", "connect", "--namespace", NS], timeout=120)
    script = r"""
import socket, sys
# UDP: the cluster's udpecho answers "echo: <payload>"
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
addr = (socket.gethostbyname("udpecho.%(ns)s"), 9999)
for i in range(3):
    u.sendto(b"ping%%d" %% i, addr)
    data, _ = u.recvfrom(2048)
    assert data == b"echo: ping%%d" %% i, data
# TCP, not HTTP: a raw byte exchange with a half-close
t = socket.create_connection(("udpecho.%(ns)s", 7000), timeout=5)
t.sendall(b"GET /raw HTTP/1.0\r\nHost: x\r\n\r\n")
t.shutdown(socket.SHUT_WR)
buf = b""
while chunk := t.recv(65536):
    buf += chunk
assert b"real path=/raw" in buf, buf[:200]
print("ok")
""" % {"ns": NS}
    r = lap.run(["python3", "-c", script], timeout=60, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_bulk_transfer_is_byte_exact(lap: LaptopRunner) -> None:
    lap.run(["tpnb", "connect", "--namespace", NS], timeout=120)
    _assert_echo_byte_exact(lap, 8)


def test_also_proxy_reaches_a_server_only_the_cluster_reaches(lap: LaptopRunner, devcluster: Any) -> None:
    """A headless Service + Endpoints pointing at an address that lives only in the node namespace."""
    extra_ip = "10.251.7.1"
    # the server lives in the netns of the node the traffic-manager runs on (any node of several)
    lap.run(["tpnb", "connect", "--namespace", NS], timeout=120)
    mgr_node = lap.kubectl("-n", "tpnb", "get", "pods", "-l", "app.kubernetes.io/name=traffic-manager",
                           "-o", "jsonpath={.items[0].spec.nodeName}").stdout.strip()

    def node(argv: list[str]) -> list[str]:
        return devcluster.node_exec_cmd(argv, node=mgr_node or None)
    subprocess.run(node(["ip", "addr", "replace", f"{extra_ip}/32", "dev", "lo"]), check=True)
    server = subprocess.Popen(node(["python3", "-m", "http.server", "8099", "--bind", extra_ip,
                                    "--directory", "/etc/netns"]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        objs = {"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "outside"},
             "spec": {"clusterIP": "None", "ports": [{"port": 8099}]}},
            {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "outside"},
             "subsets": [{"addresses": [{"ip": extra_ip}], "ports": [{"port": 8099}]}]},
        ]}
        lap.kubectl("-n", NS, "apply", "-f", "-", input=json.dumps(objs))
        lap.run(["tpnb", "quit"], check=False)
        # without --also-proxy the name resolves but the address is not routed
        lap.run(["tpnb", "connect", "--namespace", NS], timeout=120)
        r = _curl(lap, f"http://outside.{NS}:8099/", timeout=3)
        assert r.returncode != 0
        lap.run(["tpnb", "quit"])
        lap.run(["tpnb", "connect", "--namespace", NS, "--also-proxy", f"{extra_ip}/32"], timeout=120)
        assert f"{extra_ip}/32" in lap.run(["tpnb", "status"]).stdout
        r = _curl(lap, f"http://outside.{NS}:8099/")
        assert r.returncode == 0 and "Directory listing" in r.stdout, r.stderr
    finally:
        lap.run(["tpnb", "quit"], check=False)
        server.terminate()
        server.wait(10)
        subprocess.run(node(["ip", "addr", "del", f"{extra_ip}/32", "dev", "lo"]), check=False)


def test_kill9_daemon_then_connect_cleans_up(lap: LaptopRunner) -> None:
    lap.run(["tpnb", "quit", "--daemon"], check=False)
    before = _routes_and_resolv(lap)
    lap.run(["tpnb", "connect", "--namespace", NS], timeout=120)
    # the pidfile of this laptop's daemon (one daemon per network namespace)
    pid = lap.sh("cat /run/tpnb/$(stat -L -c %i /proc/self/ns/net)/daemon.pid").stdout.strip()
    assert pid.isdigit()
    lap.run(["kill", "-9", pid])
    time.sleep(0.5)
    # the dead daemon's resolv.conf and redirect rules are still in place
    assert "Generated by tpnb" in lap.run(["cat", "/etc/resolv.conf"]).stdout
    assert "table ip tpnb0" in lap.run(["nft", "list", "ruleset"]).stdout
    r = lap.run(["tpnb", "connect", "--namespace", NS], timeout=120)
    assert "Connected to context" in r.stdout
    assert _curl(lap, f"hello.{NS}").returncode == 0
    lap.run(["tpnb", "quit", "--daemon"])
    assert _routes_and_resolv(lap) == before
    links = lap.run(["ip", "-o", "link"]).stdout
    assert "tpnb0" not in links


def test_tun_tcp_engine_still_carries_everything(lap: LaptopRunner) -> None:
    """daemon.tcp_engine=tun (the path used where nftables is missing): TCP through the TUN engine."""
    lap.run(["tpnb", "quit", "--daemon"], check=False)
    before = _routes_and_resolv(lap)
    try:
        # the daemon started by this connect inherits the setting
        lap.run(["env", "TPNB_DAEMON_TCP_ENGINE=tun", "tpnb", "connect", "--namespace", NS], timeout=120)
        st = lap.run(["tpnb", "status"]).stdout
        assert "TCP engine       : TUN (daemon.tcp_engine is tun)" in st, st
        assert "table ip tpnb0" not in lap.run(["nft", "list", "ruleset"]).stdout
        r = _curl(lap, f"hello.{NS}")
        assert r.returncode == 0 and "CLIENT VALUES:" in r.stdout, r.stderr
        _assert_echo_byte_exact(lap, 2)
    finally:
        lap.run(["tpnb", "quit", "--daemon"], check=False)
    assert _routes_and_resolv(lap) == before


def test_manager_pod_deleted_reconnects_by_itself(lap: LaptopRunner) -> None:
    lap.run(["tpnb", "connect", "--namespace", NS], timeout=120)
    assert _curl(lap, f"hello.{NS}").returncode == 0
    lap.kubectl("-n", "tpnb", "delete", "pod", "-l", "app=traffic-manager", "--wait=false")
    t0 = time.monotonic()
    ok_after = None
    while time.monotonic() - t0 < 30:
        r = _curl(lap, f"hello.{NS}", timeout=2)
        if r.returncode == 0 and "CLIENT VALUES" in r.stdout:
            ok_after = time.monotonic() - t0
            # one success could be the old pod's last gasp: require a new session too
            st = lap.run(["tpnb", "status"]).stdout
            if "Problem" not in st:
                break
        time.sleep(0.5)
    assert ok_after is not None, "requests never worked again after the manager pod was deleted"
    assert ok_after <= 10, f"took {ok_after:.1f}s to work again"
    lap.run(["tpnb", "quit"])


def test_bad_kubeconfig_and_unreachable_api_fail_fast_and_clearly(lap: LaptopRunner, tmp_path: Any) -> None:
    lap.run(["tpnb", "quit", "--daemon"], check=False)
    t0 = time.monotonic()
    r = lap.run(["env", "KUBECONFIG=/nonexistent/kubeconfig", "tpnb", "connect"], check=False, timeout=60)
    assert r.returncode != 0 and time.monotonic() - t0 < 10
    assert "/nonexistent/kubeconfig" in r.stderr and "Traceback" not in r.stderr

    kc = json.loads(lap.kubectl("config", "view", "--raw", "-o", "json").stdout)
    kc["clusters"][0]["cluster"]["server"] = "https://10.250.0.99:6443"   # on the laptop's link, no host
    bad = tmp_path / "unreachable.kubeconfig"
    bad.write_text(json.dumps(kc))
    os.chmod(tmp_path, 0o755)
    t0 = time.monotonic()
    r = lap.run(["env", f"KUBECONFIG={bad}", "tpnb", "connect"], check=False, timeout=60)
    took = time.monotonic() - t0
    assert r.returncode != 0 and took < 10, (took, r.stderr)
    assert "10.250.0.99" in r.stderr and "Traceback" not in r.stderr
    assert "fix:" in r.stderr
    lap.run(["tpnb", "quit", "--daemon"], check=False)


def test_rbac_denial_names_the_missing_permission(lap: LaptopRunner, tmp_path: Any) -> None:
    """A user who may not even list pods gets told exactly what was refused."""
    lap.run(["tpnb", "quit", "--daemon"], check=False)
    f = lap.kubeconfig_as("nobody", NS, tmp_path)
    r = lap.run(["env", f"KUBECONFIG={f}", "tpnb", "connect"], check=False, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert re.search(r"(cannot|may not|forbidden|not allowed).*(get|list|create|watch)", r.stderr, re.I), r.stderr
    assert "system:serviceaccount:tpconn:nobody" in r.stderr
    lap.run(["tpnb", "quit", "--daemon"], check=False)


def test_connect_with_a_command_disconnects_when_it_exits(lap: LaptopRunner) -> None:
    lap.run(["tpnb", "quit", "--daemon"], check=False)
    r = lap.run(["tpnb", "connect", "--namespace", NS, "--", "curl", "-sS", f"hello.{NS}"], timeout=120)
    assert "Connected to context" in r.stdout and "CLIENT VALUES:" in r.stdout
    assert "Disconnecting...done" in r.stdout
    assert "Not connected" in lap.run(["tpnb", "status"]).stdout
    # the command's exit status is the CLI's
    r = lap.run(["tpnb", "connect", "--namespace", NS, "--", "sh", "-c", "exit 7"], check=False, timeout=120)
    assert r.returncode == 7
    lap.run(["tpnb", "quit", "--daemon"], check=False)


def test_log_level_changes_at_runtime(lap: LaptopRunner) -> None:
    lap.run(["tpnb", "connect", "--namespace", NS], timeout=120)
    logs = lap.run(["sh", "-c", "echo $TPNB_LOGS_DIR"]).stdout.strip()
    files = [os.path.join(logs, n) for n in ("daemon.log", "connector.log")]

    def new_lines_during_curl() -> str:
        sizes = [os.path.getsize(f) for f in files]
        assert _curl(lap, f"hello.{NS}").returncode == 0
        time.sleep(0.5)
        out = ""
        for f, size in zip(files, sizes):
            with open(f) as fh:
                fh.seek(size)
                out += fh.read()
        return out

    lap.run(["tpnb", "loglevel", "debug"])
    assert " DEBUG " in new_lines_during_curl()
    lap.run(["tpnb", "loglevel", "info"])
    assert " DEBUG " not in new_lines_during_curl()
    r = lap.run(["tpnb", "loglevel", "loud"], check=False)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    lap.run(["tpnb", "quit"], check=False)
