"""The dev cluster: pure config/PKI logic (unit) and the real thing (cluster).

The cluster tests act like a user on a laptop: kubectl from the laptop
namespace works (API server only), the cluster's own networks are
unreachable from there, and inside the cluster DNS and services work.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tpnb.errors import ConfigError, PrerequisiteError
from tpnb_devcluster import binaries, manifests, netns
from tpnb_devcluster.config import DevClusterConfig
from tpnb_devcluster.manifests import Addresses, Layout
from tpnb_devcluster.pki import Pki, PkiPlan, cert_sans, load_cert
from tpnb_devcluster.progress import Printer

ECHO_IMAGE = "tpnb.local/echoserver:1.4"


# ====================================================================== unit
@pytest.fixture
def cfg() -> DevClusterConfig:
    return DevClusterConfig()


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "state", tmp_path / "run")


@pytest.mark.unit
def test_addresses_derive_from_config(cfg: DevClusterConfig) -> None:
    a = Addresses.from_config(cfg)
    assert (a.node_ip, a.lan_prefix, a.api_service_ip, a.cni_gateway) == \
        ("10.250.0.1", 24, "10.43.0.1", "10.42.0.1")
    assert manifests.laptop_ip(cfg, 0) == "10.250.0.10"
    assert manifests.laptop_ip(cfg, 3) == "10.250.0.13"
    with pytest.raises(ValueError):
        manifests.laptop_ip(cfg, 250)


@pytest.mark.unit
def test_pki_sans_and_identities(tmp_path: Path) -> None:
    plan = PkiPlan.make("tpnb-node", "10.250.0.1", "10.43.0.1")
    pki = Pki(tmp_path / "pki")
    assert pki.ensure(plan) is True
    dns, ips = cert_sans(pki.crt("apiserver"))
    assert {"10.250.0.1", "127.0.0.1", "10.43.0.1"} <= ips
    assert {"kubernetes", "kubernetes.default", "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local", "localhost"} <= dns
    subj = {n: load_cert(pki.crt(n)).subject.rfc4514_string() for n in
            ("admin", "kubelet", "kube-proxy", "scheduler", "controller-manager")}
    assert "O=system:masters" in subj["admin"]
    assert "CN=system:node:tpnb-node" in subj["kubelet"] and "O=system:nodes" in subj["kubelet"]
    assert "CN=system:kube-proxy" in subj["kube-proxy"]
    assert "CN=system:kube-scheduler" in subj["scheduler"]
    assert "CN=system:kube-controller-manager" in subj["controller-manager"]
    assert "10.250.0.1" in cert_sans(pki.crt("kubelet-serving"))[1]
    # issued by the CA, private keys private
    ca = load_cert(pki.ca)
    for n in ("apiserver", "admin", "kubelet-serving"):
        cert = load_cert(pki.crt(n))
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        assert stat.S_IMODE(pki.key(n).stat().st_mode) == 0o600
    assert pki.sa_key.exists() and pki.sa_pub.exists()


@pytest.mark.unit
def test_pki_is_kept_until_the_plan_changes(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    plan = PkiPlan.make("tpnb-node", "10.250.0.1", "10.43.0.1")
    pki.ensure(plan)
    before = pki.crt("apiserver").read_bytes()
    assert pki.ensure(plan) is False and pki.crt("apiserver").read_bytes() == before
    assert pki.ensure(PkiPlan.make("tpnb-node", "10.251.0.1", "10.43.0.1")) is True
    assert "10.251.0.1" in cert_sans(pki.crt("apiserver"))[1]


@pytest.mark.unit
def test_user_kubeconfig_is_self_contained(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.ensure(PkiPlan.make("tpnb-node", "10.250.0.1", "10.43.0.1"))
    path = tmp_path / "kubeconfig"
    pki.write_kubeconfig(path, "admin", "https://10.250.0.1:6443", mode=0o644, embed=True)
    doc = yaml.safe_load(path.read_text())
    assert doc["current-context"] == "tpnb-dev"
    assert doc["clusters"][0]["cluster"]["server"] == "https://10.250.0.1:6443"
    assert "certificate-authority-data" in doc["clusters"][0]["cluster"]
    assert "client-key-data" in doc["users"][0]["user"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.unit
def test_containerd_config_is_private(layout: Layout) -> None:
    doc = tomllib.loads(manifests.containerd_toml(layout))
    assert doc["root"].startswith(str(layout.state))
    assert doc["state"].startswith(str(layout.run))
    assert doc["grpc"]["address"] == str(layout.containerd_sock)
    cri = doc["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == "tpnb.local/pause:3.10"
    assert cri["containerd"]["snapshotter"] == "overlayfs"
    assert cri["restrict_oom_score_adj"] is True
    runc = cri["containerd"]["runtimes"]["runc"]["options"]
    assert runc["SystemdCgroup"] is False and runc["Root"].startswith(str(layout.run))
    assert cri["cni"]["conf_dir"] == str(layout.cni_conf_dir)


@pytest.mark.unit
def test_kubelet_config(cfg: DevClusterConfig, layout: Layout) -> None:
    doc = yaml.safe_load(manifests.kubelet_yaml(cfg, layout))
    assert doc["cgroupDriver"] == "cgroupfs" and doc["failSwapOn"] is False
    assert doc["clusterDNS"] == ["10.43.0.10"] and doc["clusterDomain"] == "cluster.local"
    assert doc["imageGCHighThresholdPercent"] == 100
    assert doc["authorization"]["mode"] == "Webhook"
    assert doc["authentication"]["webhook"]["enabled"] is True
    assert doc["authentication"]["anonymous"]["enabled"] is False
    assert doc["containerRuntimeEndpoint"] == f"unix://{layout.containerd_sock}"
    assert doc["resolvConf"] == str(layout.resolv_conf)
    assert doc["cgroupRoot"] == manifests.CGROUP_ROOT
    other = DevClusterConfig(node_netns="tpnb-other")
    assert yaml.safe_load(manifests.kubelet_yaml(other, layout))["cgroupRoot"] != manifests.CGROUP_ROOT
    assert all(v.endswith("%") or v.endswith("Mi") for v in doc["evictionHard"].values())


@pytest.mark.unit
def test_kube_proxy_and_cni(cfg: DevClusterConfig, layout: Layout) -> None:
    kp = yaml.safe_load(manifests.kube_proxy_yaml(cfg, layout))
    assert kp["mode"] == "iptables" and kp["iptables"]["masqueradeAll"] is True
    assert kp["clusterCIDR"] == "10.42.0.0/16"
    cni = json.loads(manifests.cni_conflist(cfg, layout))
    bridge = cni["plugins"][0]
    assert bridge["type"] == "bridge" and bridge["hairpinMode"] is True
    assert bridge["ipam"]["ranges"][0][0]["subnet"] == "10.42.0.0/24"
    assert bridge["ipam"]["dataDir"].startswith(str(layout.state))


@pytest.mark.unit
def test_component_command_lines(cfg: DevClusterConfig, layout: Layout) -> None:
    b = Path("/bin-dir")
    api = manifests.component_argv("kube-apiserver", b, cfg, layout)
    assert "--advertise-address=10.250.0.1" in api
    assert "--authorization-mode=Node,RBAC" in api
    assert "--service-cluster-ip-range=10.43.0.0/16" in api
    assert "--secure-port=6443" in api
    etcd = manifests.component_argv("etcd", b, cfg, layout)
    urls = [etcd[i + 1] for i, a in enumerate(etcd) if a.startswith("--listen-")]
    assert all("127.0.0.1" in u or u == "" for u in urls)  # etcd is loopback-only
    kubelet = manifests.component_argv("kubelet", b, cfg, layout)
    assert "--hostname-override=tpnb-node" in kubelet and "--node-ip=10.250.0.1" in kubelet
    for c in manifests.COMPONENTS:
        assert manifests.component_argv(c, b, cfg, layout)


@pytest.mark.unit
def test_coredns_has_no_upstream(cfg: DevClusterConfig) -> None:
    docs = manifests.coredns_manifests(cfg, "tpnb.local/coredns:x")
    kinds = {d["kind"]: d for d in docs}
    corefile = kinds["ConfigMap"]["data"]["Corefile"]
    assert "forward" not in corefile
    for plugin in ("kubernetes cluster.local in-addr.arpa ip6.arpa", "health", "ready", "cache",
                   "loadbalance", "errors"):
        assert plugin in corefile
    assert kinds["Service"]["spec"]["clusterIP"] == "10.43.0.10"
    assert {(p["port"], p["protocol"]) for p in kinds["Service"]["spec"]["ports"]} == \
        {(53, "UDP"), (53, "TCP")}
    resources = {r for rule in kinds["ClusterRole"]["rules"] for r in rule["resources"]}
    assert {"endpoints", "endpointslices", "services", "pods", "namespaces"} <= resources
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "tpnb.local/coredns:x"
    assert container["imagePullPolicy"] in ("Never", "IfNotPresent")


@pytest.mark.unit
def test_node_fence_rules(cfg: DevClusterConfig) -> None:
    rules = [" ".join(r) for r in netns.node_rules(cfg)]
    accepts = [r for r in rules if "TPNB-LAN-IN" in r and r.endswith("ACCEPT")]
    assert any("--dport 6443" in r for r in accepts)
    assert not any("--dport" in r and "6443" not in r for r in accepts)
    assert any("REJECT" in r for r in rules)
    assert "-t mangle -A TPNB-LAN-FWD -i lan0 -j DROP" in rules


@pytest.mark.unit
def test_laptop_names(cfg: DevClusterConfig) -> None:
    netns.check_laptop_name(cfg, "laptop")
    netns.check_laptop_name(cfg, "l2")
    for bad in ("", "Laptop", "node", "has space", "x" * 12, "-a"):
        with pytest.raises(ConfigError):
            netns.check_laptop_name(cfg, bad)


@pytest.mark.unit
def test_binaries_version_stamp() -> None:
    assert re.fullmatch(r"v1\.32\.\d+", binaries.k8s_version())
    flags = binaries.ldflags("v1.32.13")
    assert "k8s.io/component-base/version.gitVersion=v1.32.13" in flags
    assert "gitMinor=32" in flags and flags.startswith("-s -w")


@pytest.mark.unit
def test_progress_lines_in_logs() -> None:
    out = io.StringIO()
    p = Printer(stream=out, tick_every=60)
    p("build", "start", 0.1)
    p("build", "building (1 s)…", 0.1)   # a tick right after: suppressed in logs
    p("build", "done", 0.5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert re.match(r"\[\s*\d+\.\ds\s+10%\] build: start", lines[0])
    assert lines[1].endswith("build: done")


@pytest.mark.unit
def test_config_section_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The `devcluster` section of tpnb's config file and TPNB_DEVCLUSTER_* work as before the split."""
    from tpnb import config as tpnb_config
    from tpnb_devcluster import config

    f = tmp_path / "config.yaml"
    f.write_text("devcluster:\n  api_port: '7443'\nlogs:\n  level: debug\n")
    monkeypatch.setenv("TPNB_CONFIG", str(f))
    monkeypatch.setenv("TPNB_DEVCLUSTER_NODE_NETNS", "tpnb-x")
    cfg = config.load()
    assert (cfg.api_port, cfg.node_netns, cfg.pod_cidr) == (7443, "tpnb-x", DevClusterConfig().pod_cidr)
    assert cfg.sources["devcluster.api_port"] == str(f)
    assert cfg.sources["devcluster.node_netns"] == "TPNB_DEVCLUSTER_NODE_NETNS"
    assert cfg.sources["devcluster.pod_cidr"] == "default"
    assert tpnb_config.load().logs.level == "debug"  # tpnb reads the same file and leaves the section alone
    f.write_text("devcluster:\n  nope: 1\n")
    with pytest.raises(ConfigError, match="unknown key devcluster.nope"):
        config.load()
    monkeypatch.setenv("TPNB_DEVCLUSTER_API_PORT", "many")
    f.write_text("")
    with pytest.raises(ConfigError, match="TPNB_DEVCLUSTER_API_PORT"):
        config.load()


@pytest.mark.unit
def test_cli_errors_are_short(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from tpnb_devcluster import cli, config

    assert cli.main(["kubeconfig"]) == 0
    assert capsys.readouterr().out.strip() == str(Path(config.get().state_dir) / "kubeconfig")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["up"]) == PrerequisiteError.exit_code
    err = capsys.readouterr().err
    assert "needs root" in err and "Traceback" not in err and "fix:" in err
    assert cli.main(["bogus"]) != 0


@pytest.mark.unit
def test_missing_prerequisite_names_the_apt_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from tpnb_devcluster import cluster

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setitem(cluster.PREREQ_COMMANDS, "tpnb-no-such-command", "tpnb-fake-package")
    with pytest.raises(PrerequisiteError) as exc:
        cluster.DevCluster(DevClusterConfig()).check_prerequisites()
    assert "tpnb-no-such-command" in exc.value.what
    assert "apt-get install -y tpnb-fake-package" in exc.value.hint


# ---------------------------------------------------------------- more nodes (unit)
@pytest.mark.unit
def test_node_specs_have_their_own_names_subnets_and_files(cfg: DevClusterConfig, layout: Layout) -> None:
    n1, n2, n3 = (manifests.node_spec(cfg, layout, i) for i in (1, 2, 3))
    assert (n1.name, n1.netns, n1.ip, n1.pod_cidr, n1.layout) == \
        ("tpnb-node", "tpnb-node", "10.250.0.1", "10.42.0.0/24", layout)
    assert (n2.name, n2.netns, n2.ip, n2.link_ip, n2.pod_cidr, n2.cni_gateway) == \
        ("tpnb-node2", "tpnb-node2", "10.249.0.2", "10.249.0.2", "10.42.1.0/24", "10.42.1.1")
    assert n3.pod_cidr == "10.42.2.0/24" and n1.link_ip == "10.249.0.1"
    assert len({n.cgroup_root for n in (n1, n2, n3)}) == 3 and n1.cgroup_root == manifests.CGROUP_ROOT
    assert n2.layout.state == layout.state / "nodes" / "tpnb-node2"
    assert n2.layout.containerd_sock != layout.containerd_sock and n2.layout.run.is_relative_to(layout.run)
    default = manifests.node_spec(cfg, Layout.from_config(cfg), manifests.MAX_NODES)
    assert len(str(default.layout.containerd_sock) + ".ttrpc") < 108   # a unix socket path
    for bad in (0, manifests.MAX_NODES + 1):
        with pytest.raises(ValueError):
            manifests.node_spec(cfg, layout, bad)
    small = DevClusterConfig(pod_cidr="10.42.0.0/23")
    with pytest.raises(ValueError, match="no room"):
        manifests.node_spec(small, layout, 3)


@pytest.mark.unit
def test_added_node_configs_use_its_name_subnet_and_runtime(cfg: DevClusterConfig, layout: Layout) -> None:
    n2 = manifests.node_spec(cfg, layout, 2)
    kl = yaml.safe_load(manifests.kubelet_yaml(cfg, n2.layout, n2))
    assert kl["podCIDR"] == "10.42.1.0/24" and kl["cgroupRoot"] == n2.cgroup_root
    assert kl["containerRuntimeEndpoint"] == f"unix://{n2.layout.containerd_sock}"
    assert kl["tlsCertFile"].startswith(str(n2.layout.state))
    argv = manifests.component_argv("kubelet", Path("/b"), cfg, n2.layout, n2)
    assert "--hostname-override=tpnb-node2" in argv and "--node-ip=10.249.0.2" in argv
    assert f"--root-dir={n2.layout.kubelet_dir}" in argv
    kp = yaml.safe_load(manifests.kube_proxy_yaml(cfg, n2.layout, n2))
    assert kp["hostnameOverride"] == "tpnb-node2" and kp["clusterCIDR"] == "10.42.0.0/16"
    cni = json.loads(manifests.cni_conflist(cfg, n2.layout, n2))["plugins"][0]["ipam"]
    assert cni["ranges"] == [[{"subnet": "10.42.1.0/24", "gateway": "10.42.1.1"}]]
    assert cni["dataDir"].startswith(str(n2.layout.state))
    ctd = tomllib.loads(manifests.containerd_toml(n2.layout))
    assert ctd["root"].startswith(str(n2.layout.state)) and ctd["grpc"]["address"] == str(n2.layout.containerd_sock)
    # node 1 is unchanged by the node-aware writers
    assert manifests.kubelet_yaml(cfg, layout) == manifests.kubelet_yaml(cfg, layout, manifests.node_spec(cfg, layout, 1))


@pytest.mark.unit
def test_node_routes_lead_only_to_pods_and_the_api_server(cfg: DevClusterConfig, layout: Layout) -> None:
    nodes = [manifests.node_spec(cfg, layout, i) for i in (1, 2, 3)]
    routes = netns.node_routes(cfg, nodes)
    assert routes["tpnb-node"] == [["10.42.1.0/24", "via", "10.249.0.2"], ["10.42.2.0/24", "via", "10.249.0.3"]]
    assert routes["tpnb-node2"] == [["10.42.0.0/24", "via", "10.249.0.1"], ["10.42.2.0/24", "via", "10.249.0.3"],
                                    ["10.250.0.1/32", "via", "10.249.0.1"]]
    assert all(r[0] != "default" and not r[0].endswith("/0") for rs in routes.values() for r in rs)


@pytest.mark.unit
def test_node_object_taint_and_count(cfg: DevClusterConfig, layout: Layout) -> None:
    from tpnb_devcluster import nodes

    n2 = manifests.node_spec(cfg, layout, 2)
    obj = manifests.node_object(n2, None)
    assert obj["spec"] == {"podCIDR": "10.42.1.0/24", "podCIDRs": ["10.42.1.0/24"]}
    assert obj["metadata"]["labels"]["kubernetes.io/hostname"] == "tpnb-node2"
    t = manifests.parse_taint("tpnb.dev/wip=true:NoSchedule")
    assert t == {"key": "tpnb.dev/wip", "value": "true", "effect": "NoSchedule"}
    assert manifests.node_object(n2, t)["spec"]["taints"] == [t]
    assert manifests.parse_taint("") is None and manifests.parse_taint("k:NoExecute") == {"key": "k", "effect": "NoExecute"}
    assert DevClusterConfig().node_taint == "" and DevClusterConfig().nodes == 1   # the defaults: no taint
    for bad in ("k=v", "k=v:Sometimes", ":NoSchedule"):
        with pytest.raises(ConfigError, match="node_taint"):
            nodes.dev_taint(bad)
    for bad in (0, 10):
        with pytest.raises(ConfigError, match="invalid node count"):
            nodes.check_count(bad)
    with pytest.raises(ConfigError):
        netns.check_laptop_name(cfg, "node2")   # would be node 2's namespace


@pytest.mark.unit
def test_added_node_pki_is_signed_by_the_cluster_ca(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from tpnb_devcluster.pki import ensure_node_pki

    cluster = Pki(tmp_path / "pki")
    cluster.ensure(PkiPlan.make("tpnb-node", "10.250.0.1", "10.43.0.1"))
    node = ensure_node_pki(cluster, tmp_path / "n2", "tpnb-node2", "10.249.0.2")
    crt = load_cert(node.crt("kubelet"))
    assert crt.subject.rfc4514_string() == "CN=system:node:tpnb-node2,O=system:nodes"
    ca = load_cert(cluster.ca)
    assert crt.issuer == ca.subject
    ca.public_key().verify(crt.signature, crt.tbs_certificate_bytes, ec.ECDSA(crt.signature_hash_algorithm))
    assert "10.249.0.2" in cert_sans(node.crt("kubelet-serving"))[1]
    assert node.crt("kube-proxy").read_bytes() == cluster.crt("kube-proxy").read_bytes()
    before = node.crt("kubelet").read_bytes()
    assert ensure_node_pki(cluster, tmp_path / "n2", "tpnb-node2", "10.249.0.2").crt("kubelet").read_bytes() == before
    cluster.ensure(PkiPlan.make("tpnb-node", "10.250.9.1", "10.43.0.1"))   # a new CA
    again = ensure_node_pki(cluster, tmp_path / "n2", "tpnb-node2", "10.249.0.2")
    assert again.crt("kubelet").read_bytes() != before and again.ca.read_bytes() == cluster.ca.read_bytes()


@pytest.mark.unit
def test_status_lists_every_node() -> None:
    from tpnb_devcluster.cluster import NodeRow, Status

    st = Status(components={"kubelet": 1, "kubelet@tpnb-node2": 2}, node_netns=True, node_ready=True,
                coredns_ready=True, nodes=[NodeRow("tpnb-node", True, "10.42.0.0/24", "10.250.0.1"),
                                           NodeRow("tpnb-node2", True, "10.42.1.0/24", "10.249.0.2",
                                                   ["tpnb.dev/wip=true:NoSchedule"])])
    out = st.render()
    assert out.startswith("dev cluster: running") and re.search(r"^\s+nodes:\s+2$", out, re.M)
    assert re.search(r"^  node tpnb-node2\s+Ready: yes\s+pods 10.42.1.0/24  ip 10.249.0.2  "
                     r"taints tpnb.dev/wip=true:NoSchedule$", out, re.M), out
    assert "kubelet@tpnb-node2       pid 2" in out
    st.components["kubelet@tpnb-node2"] = None   # a dead component of an added node: not running
    assert not st.running and "degraded" in st.render()


@pytest.mark.unit
def test_cli_node_count_errors_are_short(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from tpnb_devcluster import cli

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert cli.main(["up", "--nodes", "0"]) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert "invalid node count 0" in err and "Traceback" not in err and "--nodes 2" in err
    monkeypatch.setenv("TPNB_DEVCLUSTER_NODE_TAINT", "nonsense")
    from tpnb_devcluster import config

    monkeypatch.setattr(config, "_cached", None)
    assert cli.main(["up", "--nodes", "2"]) == ConfigError.exit_code
    assert "devcluster.node_taint" in capsys.readouterr().err
    monkeypatch.setattr(config, "_cached", None)


@pytest.mark.netns
def test_node_link_routes_pods_between_nodes_and_nothing_else(tmp_path: Path) -> None:
    """Two node namespaces of a scratch cluster (no Kubernetes): the node link
    carries pod-subnet and API-server traffic between them; node 2 has no
    default route; a laptop reaches neither node 2 nor its pods, even with a
    route of its own; removing node 2 leaves no namespace, veth or route."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    cfg = DevClusterConfig(state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"),
                           node_netns="tpnb-mnt", lan_cidr="10.250.201.0/24", node_link_cidr="10.249.201.0/24",
                           pod_cidr="10.42.0.0/16", node_pod_cidr="10.42.200.0/24")
    lay = Layout.from_config(cfg)
    n1, n2 = manifests.node_spec(cfg, lay, 1), manifests.node_spec(cfg, lay, 2)
    lap_ns = netns.laptop_netns("mntlap")

    def sh(ns: str, cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(netns.nsenter(ns, ["sh", "-c", cmd]), capture_output=True, text=True, check=check)

    def reach(src: str, dst: str, addr: str) -> bool:
        """A TCP connection from netns src to a listener on addr in netns dst."""
        srv = subprocess.Popen(netns.nsenter(dst, ["python3", "-c", (
            "import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(({addr!r}, 7001)); s.listen(1); print('up', flush=True); s.settimeout(5)\n"
            "c, _ = s.accept(); c.sendall(b'hi')\n")]), stdout=subprocess.PIPE, text=True)
        try:
            assert srv.stdout is not None and srv.stdout.readline().strip() == "up"
            r = sh(src, f"python3 -c \"import socket; print(socket.create_connection(('{addr}', 7001), 2).recv(2))\"",
                   check=False)
            return r.returncode == 0 and "hi" in r.stdout
        finally:
            srv.kill()
            srv.wait(5)

    try:
        netns.setup_node(cfg, lay)
        netns.setup_node_link(cfg, n1)
        netns.setup_extra_node(cfg, lay, n2, n1)
        netns.sync_node_routes(cfg, [n1, n2])
        for n in (n1, n2):   # stand-ins for each node's pod bridge (its gateway address)
            sh(n.netns, f"ip link add cni0 type bridge && ip addr add {n.cni_gateway}/24 dev cni0 && ip link set cni0 up")
        assert reach(n2.netns, n1.netns, n1.cni_gateway) and reach(n1.netns, n2.netns, n2.cni_gateway)
        assert reach(n2.netns, n1.netns, "10.250.201.1")   # the API server's address (its port is 6443)
        routes = sh(n2.netns, "ip route").stdout
        assert "default" not in routes and "10.42.200.0/24 via 10.249.201.1" in routes, routes
        assert {r["name"] for r in netns.extra_node_records(lay)} == {"tpnb-mnt2"}
        lap = netns.ensure_laptop(cfg, lay, "mntlap")
        assert not reach(lap.netns, n2.netns, n2.cni_gateway)
        sh(lap.netns, "ip route add 10.249.201.0/24 via 10.250.201.1 && ip route add 10.42.201.0/24 via 10.250.201.1")
        for addr in (n2.link_ip, n2.cni_gateway):   # the first node never forwards a laptop's packets
            assert not reach(lap.netns, n2.netns, addr), addr
        assert reach(n1.netns, n2.netns, n2.link_ip)   # while the node link itself works
        netns.remove_extra_node(cfg, lay, n2)
        assert not netns.exists(n2.netns) and netns.extra_node_records(lay) == []
        assert sh(n1.netns, f"ip link show {n2.link_veth}", check=False).returncode != 0
        assert sh(n1.netns, f"ip route show {n2.pod_cidr}").stdout.strip() == ""
    finally:
        for ns in (lap_ns, n2.netns, n1.netns):
            netns.delete(lay, ns)


@pytest.mark.netns
def test_up_refuses_a_foreign_node_namespace(tmp_path: Path) -> None:
    """A namespace with the node's name that tpnb did not make is reported
    before anything is built, stopped or changed."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from tpnb_devcluster.cluster import DevCluster
    from tpnb.errors import DevClusterError

    name = "tpnb-pftest"
    cfg = DevClusterConfig(state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"),
                           node_netns=name)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with pytest.raises(DevClusterError) as exc:
            DevCluster(cfg).up()
        assert "was not made by tpnb" in str(exc.value) and f"ip netns del {name}" in str(exc.value)
        assert not (tmp_path / "state" / "bin").exists()  # nothing was built
        assert netns.mounted(name)  # and nothing was deleted
    finally:
        subprocess.run(["ip", "netns", "del", name])


# ====================================================================== cluster
@pytest.fixture(scope="module")
def hello(laptop: Any) -> str:
    """Deployment + Service `hello` (echoserver, port 80 -> 8080); its pod name."""
    if laptop.kubectl("get", "deploy", "hello", check=False).returncode != 0:
        laptop.kubectl("create", "deployment", "hello", f"--image={ECHO_IMAGE}")
    if laptop.kubectl("get", "svc", "hello", check=False).returncode != 0:
        laptop.kubectl("expose", "deployment", "hello", "--port=80", "--target-port=8080")
    laptop.kubectl("rollout", "status", "deploy/hello", "--timeout=120s", timeout=150)
    pods = laptop.kubectl("get", "pods", "-l", "app=hello", "--field-selector=status.phase=Running",
                          "-o", "jsonpath={.items[0].metadata.name}").stdout.strip()
    assert pods, "no Running hello pod"
    return pods


@pytest.fixture(scope="module")
def toolbox(laptop: Any) -> str:
    """A long-running pod of the tpnb image (has python3), for in-cluster checks."""
    from tpnb.imageref import default_image

    name = "devcluster-toolbox"
    laptop.kubectl("delete", "pod", name, "--ignore-not-found", "--wait=true", timeout=90)
    laptop.kubectl("run", name, f"--image={default_image()}", "--image-pull-policy=Never",
                   "--restart=Never", "--command", "--", "sleep", "3600")
    laptop.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=90s", timeout=120)
    yield name
    laptop.kubectl("delete", "pod", name, "--ignore-not-found", "--wait=false", check=False)


@pytest.mark.cluster
def test_laptop_sees_a_ready_node(laptop: Any) -> None:
    out = laptop.kubectl("get", "nodes", "--no-headers").stdout
    assert re.search(r"^tpnb-node\s+Ready\s", out, re.M), out
    ver = json.loads(laptop.kubectl("version", "-o", "json").stdout)
    assert ver["serverVersion"]["gitVersion"] == binaries.k8s_version()


@pytest.mark.cluster
def test_status_and_idempotent_up(devcluster: Any, laptop: Any) -> None:
    st = devcluster.status()
    assert st.running and st.coredns_ready, st.render()
    assert laptop.name in st.laptops
    t = time.monotonic()
    assert devcluster.up() == devcluster.kubeconfig_path
    assert time.monotonic() - t < 10, "up on a running cluster should be a quick check"
    assert stat.S_IMODE(devcluster.kubeconfig_path.stat().st_mode) & 0o004


@pytest.mark.cluster
def test_laptop_network_shape(laptop: Any, hello: str) -> None:
    routes = laptop.run(["ip", "route"]).stdout
    assert "default" not in routes and "10.250.0.0/24 dev eth0" in routes
    assert "nameserver 10.250.0.1" in laptop.run(["cat", "/etc/resolv.conf"]).stdout
    cluster_ip = laptop.kubectl("get", "svc", "hello", "-o", "jsonpath={.spec.clusterIP}").stdout.strip()
    t = time.monotonic()
    res = laptop.run(["curl", "-sS", "-m", "10", f"http://{cluster_ip}/"], check=False, timeout=20)
    took = time.monotonic() - t
    assert res.returncode != 0, res.stdout
    assert took < 2, f"curl to a ClusterIP from a laptop took {took:.1f} s; it must fail at once"
    # the failure is "no route", not a timeout
    probe = ("import socket,sys\ns=socket.socket()\ntry:\n s.connect((sys.argv[1],80))\n"
             "except OSError as e:\n print(e.errno)\n")
    assert laptop.run(["python3", "-c", probe, cluster_ip]).stdout.strip() == str(errno.ENETUNREACH)
    # the node answers only the API server port; the rest is refused at once
    t = time.monotonic()
    res = laptop.run(["curl", "-sS", "-k", "-m", "10", "https://10.250.0.1:10250/"], check=False)
    assert res.returncode != 0 and time.monotonic() - t < 2
    # DNS on the laptop fails at once, too
    t = time.monotonic()
    laptop.run(["getent", "hosts", "hello.default.svc.cluster.local"], check=False, timeout=20)
    assert time.monotonic() - t < 3


@pytest.mark.cluster
def test_logs_exec_and_port_forward(laptop: Any, hello: str, toolbox: str) -> None:
    # -c: an intercept test may have added a traffic-agent container to hello
    assert "listening on :8080" in laptop.kubectl("logs", hello, "-c", "echoserver").stdout
    out = laptop.kubectl("exec", toolbox, "--", "python3", "-c", "print(6 * 7)").stdout
    assert out.strip() == "42"
    script = (
        "kubectl port-forward svc/hello 18080:80 >/tmp/tpnb-pf.$$ 2>&1 & pf=$!; "
        "for i in $(seq 50); do curl -fsS -m 3 http://127.0.0.1:18080/pf-check && break; sleep 0.2; done; "
        "rc=$?; kill $pf; cat /tmp/tpnb-pf.$$ >&2; rm -f /tmp/tpnb-pf.$$; exit $rc"
    )
    res = laptop.sh(script, timeout=60)
    assert "real path=/pf-check" in res.stdout


@pytest.mark.cluster
def test_cluster_dns_and_services_from_a_pod(laptop: Any, hello: str, toolbox: str) -> None:
    code = (
        "import socket, urllib.request\n"
        "for n in ('hello.default', 'hello.default.svc.cluster.local', 'kubernetes.default'):\n"
        "    print(n, socket.gethostbyname(n))\n"
        "print(urllib.request.urlopen('http://hello.default/from-pod', timeout=5).read().decode())\n"
    )
    cluster_ip = laptop.kubectl("get", "svc", "hello", "-o", "jsonpath={.spec.clusterIP}").stdout.strip()
    out = laptop.kubectl("exec", toolbox, "--", "python3", "-c", code, timeout=60).stdout
    assert f"hello.default {cluster_ip}" in out
    assert f"hello.default.svc.cluster.local {cluster_ip}" in out
    assert "kubernetes.default 10.43.0.1" in out
    assert "real path=/from-pod" in out


# ---------------------------------------------------------------- down (runs last)
def _traces(dc: Any, laptop_name: str, pod_netns: list[str]) -> dict[str, Any]:
    """Everything of the dev cluster that is visible on the host."""
    lay = dc.layout
    # every node's netns (an added node's too: tpnb-node2, ...)
    ours = {dc.cfg.node_netns, f"tpnb-{laptop_name}",
            *(f"{dc.cfg.node_netns}{i}" for i in range(2, manifests.MAX_NODES + 1))}
    mounts = Path("/proc/self/mountinfo").read_text()
    prefixes = (str(lay.state) + "/", str(lay.run) + "/")
    procs = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            exe = os.readlink(d / "exe")
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if exe.startswith(str(lay.state)) or str(lay.containerd_sock) in cmdline or \
                str(lay.containerd_config) in cmdline:
            procs.append(f"{d.name} {cmdline}")
    return {
        "netns": sorted(set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
                            .stdout.split()) & ours),
        "links": [ln for ln in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True)
                  .stdout.splitlines() if re.search(r": (lan0|cni0|nodes0|node\d+|lap\d+|veth\w+)[@:]", ln)],
        "mounts": [ln.split()[4] for ln in mounts.splitlines()
                   if ln.split()[4].startswith(prefixes) or
                   any(ln.split()[4] == f"/run/netns/{n}" for n in pod_netns)],
        "procs": procs,
        "iptables": [ln for ln in subprocess.run(["iptables-save"], capture_output=True, text=True)
                     .stdout.splitlines() if "KUBE-" in ln or "TPNB-" in ln],
        "cgroups": [str(p) for root in dc._cgroup_roots() for p in Path("/sys/fs/cgroup").glob("*" + root)],
        "etc_netns": [str(p) for p in Path("/etc/netns").glob(f"tpnb-{laptop_name}")],
    }


@pytest.mark.cluster
@pytest.mark.devcluster_down
def test_down_leaves_nothing_and_up_again(devcluster: Any, laptop: Any, hello: str) -> None:
    nodes = devcluster.nodes()
    pod_netns = [n for node in nodes for n in netns.peer_namespaces(node.netns) if n.startswith("cni-")]
    assert pod_netns, "the pods' network namespaces should be peers of the node"
    before = _traces(devcluster, laptop.name, pod_netns)
    assert before["netns"] and before["procs"] and before["mounts"], before
    devcluster.down()
    after = _traces(devcluster, laptop.name, pod_netns)
    assert after == {k: [] for k in after}, after
    st = devcluster.status()
    assert st.stopped, st.render()
    # the caches are kept, so the next up is quick and needs no build
    assert (devcluster.bin_dir / "kube-apiserver").exists()
    assert devcluster.extra_nodes() == []
    t = time.monotonic()
    devcluster.up(nodes=len(nodes))   # as many nodes as before (scripts/test boots 2)
    took = time.monotonic() - t
    out = laptop.kubectl("get", "nodes", "--no-headers").stdout
    for node in nodes:
        assert re.search(rf"^{node.name}\s+Ready\s", out, re.M), out
    print(f"warm up after down: {took:.1f} s")


@pytest.mark.cluster
def test_image_export_for_other_clusters(devcluster: Any, tmp_path: Path) -> None:
    """`tpnb devcluster image -o FILE`: the project image as a docker-archive kind/k3d/minikube can load."""
    import tarfile

    from tpnb.imageref import default_image

    out = tmp_path / "tpnb-image.tar"
    r = subprocess.run([sys.executable, "-m", "tpnb.cli", "devcluster", "image", "-o", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest[0]["RepoTags"] == [default_image()]
    r = subprocess.run([sys.executable, "-m", "tpnb.cli", "devcluster", "image", "-o", "/nonexistent/x.tar"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 2 and "cannot write /nonexistent/x.tar" in r.stderr and "Traceback" not in r.stderr
