"""The two-node dev cluster (issue 12): what spreads over nodes works across them.

`up --nodes 2` gives a second kubelet + containerd + kube-proxy in its own
node namespace with its own pod subnet.  Here the traffic-manager (a Helm
install pinned by nodeSelector) runs on the first node and the intercepted
workload on the second, a laptop reaches pods on both nodes by name and by
IP, pods reach each other and Services across the nodes, and an intercept of
the workload on node 2 is served by the laptop.  The last test removes node
2 and adds it again with the CLI, as a user grows a one-node cluster.

Pods for node 2 tolerate `tpnb.dev/wip` so the tests also run while that node
is tainted for development (devcluster.node_taint); the default has no taint.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from conftest import REPO, LaptopRunner, _progress_to_terminal
from tpnb_devcluster import manifests, netns

pytestmark = pytest.mark.cluster

NS, MNS = "tpmn", "tpmn-system"
CHART = REPO / "charts" / "traffic-manager"
ECHO = "tpnb.local/echoserver:1.4"
TOLERATE_WIP = [{"key": "tpnb.dev/wip", "operator": "Exists", "effect": "NoSchedule"}]


def _image() -> str:
    from tpnb import config

    return config.get().manager_image


def _on(node: str) -> dict[str, Any]:
    """Pod spec fields that put a pod on `node`."""
    return {"nodeSelector": {"kubernetes.io/hostname": node}, "tolerations": TOLERATE_WIP}


def _echo(name: str, node: str) -> list[dict[str, Any]]:
    labels = {"app": name}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": NS},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels},
                               "spec": {**_on(node), "containers": [
                                   {"name": "echoserver", "image": ECHO, "imagePullPolicy": "Never",
                                    "ports": [{"containerPort": 8080}]}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
         "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}},
    ]


def _toolbox(name: str, node: str) -> dict[str, Any]:
    """A pod of the tpnb image (it has python3) on `node`."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
            "spec": {**_on(node), "terminationGracePeriodSeconds": 1, "containers": [
                {"name": "tb", "image": _image(), "imagePullPolicy": "Never",
                 "command": ["sleep", "3600"]}]}}


class Cluster:
    """The two nodes, and the laptop runners of this module."""

    def __init__(self, dc: Any, admin: LaptopRunner, dev: LaptopRunner, node_a: str, node_b: str) -> None:
        self.dc, self.admin, self.dev, self.a, self.b = dc, admin, dev, node_a, node_b

    def tpnb(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.dev.run(["env", f"TPNB_MANAGER_NAMESPACE={MNS}", "tpnb", *args], timeout=timeout, check=check)

    def pod(self, selector: str) -> dict[str, Any]:
        items = json.loads(self.admin.kubectl("-n", NS, "get", "pods", "-l", selector,
                                              "--field-selector=status.phase=Running", "-o", "json").stdout)["items"]
        items = [i for i in items if not i["metadata"].get("deletionTimestamp")]
        assert items, f"no running pod for {selector}"
        return items[0]

    def py(self, pod: str, code: str, timeout: float = 60) -> str:
        r = self.admin.kubectl("-n", NS, "exec", pod, "--", "python3", "-c", code, timeout=timeout, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout


def _get(url: str) -> str:
    return ("import urllib.request\n"
            f"print(urllib.request.urlopen({url!r}, timeout=10).read().decode())\n")


@pytest.fixture(scope="module")
def mn(devcluster: Any, laptop: LaptopRunner) -> Iterator[Cluster]:
    devcluster.up(_progress_to_terminal(), nodes=2)   # adds the second node when it is missing
    names = [n.name for n in devcluster.nodes()]
    assert len(names) >= 2, names
    node_a, node_b = names[0], names[1]
    from tpnb_devcluster import helm

    helm.ensure()   # built on first use (not by `up`); then on every laptop's PATH
    admin = laptop
    dev = LaptopRunner(devcluster, "mnlap")
    dev.run(["tpnb", "quit", "--daemon"], check=False)
    admin.run(["helm", "uninstall", "traffic-manager", "-n", MNS, "--wait"], check=False, timeout=180)
    for ns in (NS, MNS):
        admin.kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=true", timeout=180)
    admin.kubectl("create", "ns", NS)
    objs = [*_echo("far", node_b), *_echo("near", node_a), _toolbox("tb-a", node_a), _toolbox("tb-b", node_b)]
    admin.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))
    # the traffic-manager on the first node, serving this namespace only (other tests' managers stay as they are)
    repo, _, tag = _image().rpartition(":")
    values = Path(f"/tmp/tpnb-multinode-values-{os.getpid()}.yaml")
    values.write_text(yaml.safe_dump({"image": {"repository": repo, "tag": tag}, "managedNamespaces": [NS],
                                      "nodeSelector": {"kubernetes.io/hostname": node_a}}))
    try:
        r = admin.run(["helm", "install", "traffic-manager", str(CHART), "-n", MNS, "--create-namespace",
                       "-f", str(values), "--wait", "--timeout", "180s"], timeout=240)
        assert "STATUS: deployed" in r.stdout, r.stdout
        for d in ("far", "near"):
            admin.kubectl("-n", NS, "rollout", "status", f"deploy/{d}", "--timeout=180s", timeout=200)
        admin.kubectl("-n", NS, "wait", "--for=condition=Ready", "pod/tb-a", "pod/tb-b", "--timeout=180s",
                      timeout=200)
        yield Cluster(devcluster, admin, dev, node_a, node_b)
    finally:
        values.unlink(missing_ok=True)
        dev.run(["tpnb", "quit", "--daemon"], check=False)
        admin.run(["helm", "uninstall", "traffic-manager", "-n", MNS, "--wait", "--timeout", "120s"],
                  check=False, timeout=180)
        for ns in (NS, MNS):
            admin.kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=false", check=False)


def _status_nodes(text: str) -> dict[str, str]:
    """node name -> Ready column of `tpnb devcluster status`."""
    return dict(re.findall(r"^\s+node (\S+)\s+Ready: (\S+)", text, re.M))


def _devcluster_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tpnb.cli", "devcluster", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_both_nodes_ready_with_their_own_pod_subnets(mn: Cluster) -> None:
    st = _devcluster_cli("status", timeout=60)
    assert st.returncode == 0, st.stdout + st.stderr
    nodes = _status_nodes(st.stdout)
    assert nodes.get(mn.a) == "yes" and nodes.get(mn.b) == "yes", st.stdout
    items = json.loads(mn.admin.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    cidrs = {i["metadata"]["name"]: ipaddress.ip_network(i["spec"]["podCIDR"]) for i in items}
    assert cidrs[mn.a] != cidrs[mn.b] and not cidrs[mn.a].overlaps(cidrs[mn.b])
    assert all(c.subnet_of(ipaddress.ip_network(mn.dc.cfg.pod_cidr)) for c in cidrs.values())
    for sel, node in (("app=far", mn.b), ("app=near", mn.a)):
        pod = mn.pod(sel)
        assert pod["spec"]["nodeName"] == node
        assert ipaddress.ip_address(pod["status"]["podIP"]) in cidrs[node], (sel, pod["status"]["podIP"])
    # the manager runs on the other node than the workload it will intercept
    mgr = json.loads(mn.admin.kubectl("-n", MNS, "get", "pods", "-l", "app.kubernetes.io/name=traffic-manager",
                                      "-o", "json").stdout)["items"]
    assert {p["spec"]["nodeName"] for p in mgr} == {mn.a}


def test_pods_reach_pods_services_and_dns_across_nodes(mn: Cluster) -> None:
    far_ip, near_ip = mn.pod("app=far")["status"]["podIP"], mn.pod("app=near")["status"]["podIP"]
    # node A -> node B: pod IP and Service name (CoreDNS), and back
    assert "real path=/a-to-b-ip" in mn.py("tb-a", _get(f"http://{far_ip}:8080/a-to-b-ip"))
    assert "real path=/a-to-b-svc" in mn.py("tb-a", _get(f"http://far.{NS}/a-to-b-svc"))
    assert "real path=/b-to-a-ip" in mn.py("tb-b", _get(f"http://{near_ip}:8080/b-to-a-ip"))
    assert "real path=/b-to-a-svc" in mn.py("tb-b", _get(f"http://near.{NS}.svc.cluster.local/b-to-a-svc"))
    # CoreDNS runs on one node and answers pods of both; pods of node B reach the API server
    dns = mn.admin.kubectl("-n", "kube-system", "get", "pods", "-l", "k8s-app=kube-dns", "-o",
                           "jsonpath={.items[*].spec.nodeName}").stdout.split()
    assert dns and set(dns) <= {mn.a, mn.b}
    code = ("import socket, ssl\n"
            "print(socket.gethostbyname('kubernetes.default'))\n"
            "s = socket.create_connection(('kubernetes.default', 443), timeout=5)\n"
            "print('api', s.getpeername()[1])\n")
    for tb in ("tb-a", "tb-b"):
        out = mn.py(tb, code)
        assert "10.43.0.1" in out and "api 443" in out, (tb, out)
    # a pod of node B is seen with its own address by a pod of node A (no NAT between nodes)
    tb_b_ip = mn.admin.kubectl("-n", NS, "get", "pod", "tb-b", "-o", "jsonpath={.status.podIP}").stdout.strip()
    server = ("import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
              "s.bind(('0.0.0.0', 7777)); s.listen(1); s.settimeout(30)\nc, a = s.accept(); c.sendall(a[0].encode())\n")
    proc = subprocess.Popen(mn.admin.cmd(["kubectl", "-n", NS, "exec", "tb-a", "--", "python3", "-c", server]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        tb_a_ip = mn.admin.kubectl("-n", NS, "get", "pod", "tb-a", "-o", "jsonpath={.status.podIP}").stdout.strip()
        client = ("import socket, time\nfor i in range(50):\n"
                  "    try:\n"
                  f"        s = socket.create_connection(({tb_a_ip!r}, 7777), timeout=3); break\n"
                  "    except OSError:\n        time.sleep(0.2)\n"
                  "print(s.recv(100).decode())\n")
        assert mn.py("tb-b", client).strip() == tb_b_ip
    finally:
        proc.kill()
        proc.wait(10)


def test_connect_reaches_pods_on_both_nodes(mn: Cluster) -> None:
    mn.tpnb("quit", "--daemon", check=False)
    far_ip = mn.pod("app=far")["status"]["podIP"]
    t = time.monotonic()   # not connected: a laptop has no path to either node's pods
    r = mn.dev.run(["curl", "-sS", "--max-time", "5", f"http://{far_ip}:8080/"], check=False, timeout=20)
    assert r.returncode != 0 and time.monotonic() - t < 2, r.stdout
    mn.tpnb("connect", "--namespace", NS, timeout=180)
    try:
        for name in ("far", "near"):
            pod = mn.pod(f"app={name}")
            for url in (f"http://{name}/by-name", f"http://{name}.{NS}/by-fqdn",
                        f"http://{pod['status']['podIP']}:8080/by-ip"):
                r = mn.dev.run(["curl", "-sS", "--max-time", "10", url], check=False, timeout=30)
                assert r.returncode == 0 and "real path=/by-" in r.stdout, (pod["spec"]["nodeName"], url, r.stderr)
    finally:
        mn.tpnb("quit", "--daemon", check=False)


def test_intercept_of_a_workload_on_node_2_is_served_by_the_laptop(mn: Cluster, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "who.txt").write_text("the laptop, for a pod on node 2\n")
    os.chmod(tmp_path, 0o755)
    server = subprocess.Popen(mn.dev.cmd(["python3", "-m", "http.server", "9500", "--bind", "127.0.0.1",
                                          "--directory", str(www)]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        mn.tpnb("connect", "--namespace", NS, timeout=180)
        r = mn.tpnb("intercept", "far", "--namespace", NS, "--port", "9500", "--mount=false", timeout=240)
        assert "State         : ACTIVE" in r.stdout, r.stdout + r.stderr
        far = mn.pod("app=far")
        assert far["spec"]["nodeName"] == mn.b and "traffic-agent" in {c["name"] for c in far["spec"]["containers"]}
        # from a pod on the other node (and from the laptop): the laptop answers
        assert mn.py("tb-a", _get(f"http://far.{NS}/who.txt")).strip() == "the laptop, for a pod on node 2"
        assert mn.py("tb-b", _get(f"http://far.{NS}/who.txt")).strip() == "the laptop, for a pod on node 2"
        mn.tpnb("leave", "far")
        deadline = time.monotonic() + 30
        while "real path=/after" not in mn.py("tb-a", _get(f"http://far.{NS}/after")):
            assert time.monotonic() < deadline, "the app did not answer again after leave"
            time.sleep(1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        mn.tpnb("leave", "far", check=False)
        mn.tpnb("quit", "--daemon", check=False)


def _taints(mn: Cluster, node: str) -> set[str]:
    spec = json.loads(mn.admin.kubectl("get", "node", node, "-o", "json").stdout)["spec"]
    return {f"{t['key']}:{t['effect']}" for t in spec.get("taints", []) if not t["key"].startswith("node.kubernetes.io/")}


def test_node_taint_setting_is_applied_and_taken_off_by_up(mn: Cluster) -> None:
    """devcluster.node_taint (development only) is put on added nodes by `up`, and a later `up`
    with another (or no) setting takes it off again: the default leaves no taint."""
    own = os.environ.get("TPNB_DEVCLUSTER_NODE_TAINT", "")
    before = _taints(mn, mn.b)
    try:
        env = {**os.environ, "TPNB_DEVCLUSTER_NODE_TAINT": "tpnb.dev/test=1:PreferNoSchedule"}
        r = subprocess.run([sys.executable, "-m", "tpnb.cli", "devcluster", "up", "--nodes", "2"],
                           capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert _taints(mn, mn.b) == {"tpnb.dev/test:PreferNoSchedule"}
        assert _taints(mn, mn.a) == set()   # the first node is never tainted
    finally:
        env = {**os.environ, "TPNB_DEVCLUSTER_NODE_TAINT": own}
        subprocess.run([sys.executable, "-m", "tpnb.cli", "devcluster", "up", "--nodes", "2"],
                       capture_output=True, text=True, timeout=600, env=env)
    want = manifests.parse_taint(own)
    assert _taints(mn, mn.b) == before == ({f"{want['key']}:{want['effect']}"} if want else set())


def _node_traces(dc: Any, node: Any, pod_netns: list[str]) -> dict[str, Any]:
    """What of added node `node` is visible on the host."""
    lay = node.layout
    prefixes = (str(lay.state) + "/", str(lay.run) + "/")
    procs = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(lay.state) + "/" in cmdline or str(lay.run) + "/" in cmdline:
            procs.append(f"{d.name} {cmdline}")
    first = dc.cfg.node_netns
    return {
        "netns": sorted(set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
                        & {node.netns, *pod_netns}),
        "veth": subprocess.run(["ip", "-n", first, "-o", "link", "show", node.link_veth],
                               capture_output=True, text=True).stdout.strip(),
        "route": subprocess.run(["ip", "-n", first, "route", "show", node.pod_cidr],
                                capture_output=True, text=True).stdout.strip(),
        "mounts": [ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                   if ln.split()[4].startswith(prefixes)],
        "procs": procs,
        "cgroups": [str(p) for p in Path("/sys/fs/cgroup").glob("*" + node.cgroup_root)],
    }


def test_up_adds_a_node_to_a_running_one_node_cluster(mn: Cluster) -> None:
    """remove-node takes node 2 out without a trace; `up --nodes 2` adds it back; status shows both Ready."""
    node = mn.dc.node(mn.b)
    pod_netns = [n for n in netns.peer_namespaces(node.netns) if n.startswith("cni-")]
    assert pod_netns, "node 2's pods should have network namespaces"
    first = _devcluster_cli("remove-node", mn.a, timeout=60)
    assert first.returncode != 0 and "runs the control plane" in first.stderr and "Traceback" not in first.stderr
    r = _devcluster_cli("remove-node", mn.b, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _node_traces(mn.dc, node, pod_netns) == {"netns": [], "veth": "", "route": "", "mounts": [],
                                                    "procs": [], "cgroups": []}
    st = _devcluster_cli("status", timeout=60)
    assert _status_nodes(st.stdout) == {mn.a: "yes"}, st.stdout
    assert mn.admin.kubectl("get", "node", mn.b, check=False).returncode != 0
    # node 2's pods are gone; far (pinned to node 2) waits, near (node 1) never noticed
    assert mn.admin.kubectl("-n", NS, "get", "pod", "tb-b", check=False).returncode != 0
    assert mn.pod("app=near")["spec"]["nodeName"] == mn.a

    r = _devcluster_cli("up", "--nodes", "2")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert f"added {mn.b}" in r.stderr, r.stderr[-3000:]
    st = _devcluster_cli("status", timeout=60)
    assert st.returncode == 0 and _status_nodes(st.stdout) == {mn.a: "yes", mn.b: "yes"}, st.stdout
    assert re.search(r"^\s+nodes:\s+2$", st.stdout, re.M), st.stdout
    mn.admin.kubectl("-n", NS, "rollout", "status", "deploy/far", "--timeout=180s", timeout=200)
    assert mn.pod("app=far")["spec"]["nodeName"] == mn.b   # back on the new node 2
    # asking for fewer nodes never removes one, and says how
    r = _devcluster_cli("up", "--nodes", "1", timeout=300)
    assert r.returncode == 0 and f"tpnb devcluster remove-node {mn.b}" in r.stderr, r.stderr[-2000:]
    assert len(_status_nodes(_devcluster_cli("status", timeout=60).stdout)) == 2
