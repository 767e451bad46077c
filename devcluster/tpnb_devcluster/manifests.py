"""Everything the dev cluster writes as configuration: paths, component
config files, component command lines and the CoreDNS manifests.

Pure functions of `DevClusterConfig` and `Layout`, so unit tests check them
without root, and `cluster.py` stays about processes and waiting.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import DevClusterConfig

NODE_NAME = "tpnb-node"
CLUSTER_DOMAIN = "cluster.local"
LAN_BRIDGE = "lan0"
CNI_BRIDGE = "cni0"
CNI_BIN_DIR = "/usr/lib/cni"
PAUSE_IMAGE = "tpnb.local/pause:3.10"
#: cgroup (under every v1 controller) that holds all of kubelet's pods, so
#: `down` finds and removes exactly what the dev cluster made
CGROUP_ROOT = "/tpnb-devcluster"


def cgroup_root(cfg: DevClusterConfig) -> str:
    """CGROUP_ROOT, made distinct per node netns so two dev clusters (say a
    test's second one, with other dirs and names) never share pods' cgroups."""
    default = DevClusterConfig().node_netns
    return CGROUP_ROOT if cfg.node_netns == default else f"{CGROUP_ROOT}-{cfg.node_netns}"
KUBECONFIG_CONTEXT = "tpnb-dev"


@dataclass(frozen=True)
class Layout:
    """Where every file of the dev cluster lives.

    state_dir survives `down` for the caches (binaries, images, PKI); what a
    running cluster writes (etcd data, kubelet pods, pod logs, CNI leases) is
    under state_dir too but wiped by `down`, so a second `up` starts clean.
    run_dir holds sockets and pidfiles.
    """

    state: Path
    run: Path

    @classmethod
    def from_config(cls, cfg: DevClusterConfig) -> Layout:
        return cls(Path(cfg.state_dir), Path(cfg.run_dir))

    # caches (kept by `down`)
    @property
    def pki_dir(self) -> Path:
        return self.state / "pki"

    @property
    def containerd_root(self) -> Path:
        return self.state / "containerd"

    @property
    def images_record(self) -> Path:
        return self.state / "images-imported.json"

    # written per boot (wiped by `down`)
    @property
    def etcd_dir(self) -> Path:
        return self.state / "etcd"

    @property
    def kubelet_dir(self) -> Path:
        return self.state / "kubelet"

    @property
    def pod_logs_dir(self) -> Path:
        return self.state / "pod-logs"

    @property
    def cni_conf_dir(self) -> Path:
        return self.state / "cni" / "net.d"

    @property
    def cni_data_dir(self) -> Path:
        return self.state / "cni" / "networks"

    @property
    def config_dir(self) -> Path:
        return self.state / "config"

    @property
    def kubeconfig_dir(self) -> Path:
        return self.state / "kubeconfigs"

    @property
    def logs_dir(self) -> Path:
        return self.state / "logs"

    @property
    def user_kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    def component_kubeconfig(self, name: str) -> Path:
        return self.kubeconfig_dir / f"{name}.kubeconfig"

    @property
    def containerd_config(self) -> Path:
        return self.config_dir / "containerd.toml"

    @property
    def kubelet_config(self) -> Path:
        return self.config_dir / "kubelet.yaml"

    @property
    def kube_proxy_config(self) -> Path:
        return self.config_dir / "kube-proxy.yaml"

    @property
    def resolv_conf(self) -> Path:
        return self.config_dir / "resolv.conf"

    @property
    def coredns_manifest(self) -> Path:
        return self.config_dir / "coredns.yaml"

    # run dir
    @property
    def containerd_state(self) -> Path:
        return self.run / "containerd"

    @property
    def containerd_sock(self) -> Path:
        return self.run / "containerd" / "containerd.sock"

    @property
    def pid_dir(self) -> Path:
        return self.run / "pids"

    @property
    def laptops_dir(self) -> Path:
        return self.run / "laptops"

    def pidfile(self, component: str) -> Path:
        return self.pid_dir / f"{component}.pid"

    def log(self, component: str) -> Path:
        return self.logs_dir / f"{component}.log"


# ------------------------------------------------------------------ addresses
@dataclass(frozen=True)
class Addresses:
    node_ip: str
    lan_prefix: int
    api_service_ip: str
    cni_gateway: str

    @classmethod
    def from_config(cls, cfg: DevClusterConfig) -> Addresses:
        lan = ipaddress.ip_network(cfg.lan_cidr)
        svc = ipaddress.ip_network(cfg.service_cidr)
        pods = ipaddress.ip_network(cfg.node_pod_cidr)
        return cls(str(lan.network_address + 1), lan.prefixlen, str(svc.network_address + 1),
                   str(pods.network_address + 1))

    @property
    def api_server(self) -> str:
        return f"https://{self.node_ip}"


#: the most nodes `up --nodes N` boots (each is a kubelet + containerd + kube-proxy)
MAX_NODES = 9
#: bridge in node 1's netns that links the nodes (never the laptops' lan0)
NODE_LINK_BRIDGE = "nodes0"
#: alias that marks nodes0 as ours
NODE_LINK_ALIAS = "tpnb-devcluster-nodes"
#: labels tpnb devcluster puts on every node (tests select nodes by them)
NODE_INDEX_LABEL = "tpnb.dev/node-index"


@dataclass(frozen=True)
class Node:
    """One node of the dev cluster: its names, addresses, pod subnet and files.

    Node 1 (index 1) is the one that also runs the control plane: its
    kubelet's address is the API server's (lan0), its files are the
    cluster's.  Node i > 1 lives in its own netns, is reached over the node
    link only, and keeps its kubelet, containerd (own root, state, socket)
    and CNI data under state/nodes/<name> and run/nodes/<name>.
    """

    index: int
    name: str
    netns: str
    #: kubelet's --node-ip (the Node's InternalIP)
    ip: str
    #: its address on the node link
    link_ip: str
    pod_cidr: str
    layout: Layout
    cgroup_root: str

    @property
    def cni_gateway(self) -> str:
        return str(ipaddress.ip_network(self.pod_cidr).network_address + 1)

    @property
    def link_veth(self) -> str:
        """Node 1's end of this node's link veth (its other end is eth0 in the node)."""
        return f"node{self.index}"


def node_pod_cidr(cfg: DevClusterConfig, index: int) -> str:
    """Pod subnet of node `index`: node 1 has node_pod_cidr, node i the (i-1)th after it."""
    first = ipaddress.ip_network(cfg.node_pod_cidr)
    cluster = ipaddress.ip_network(cfg.pod_cidr)
    net = ipaddress.ip_network((int(first.network_address) + (index - 1) * first.num_addresses,
                                first.prefixlen))
    if not net.subnet_of(cluster):  # type: ignore[arg-type]
        raise ValueError(f"pod_cidr {cluster} has no room for node {index}'s /{first.prefixlen}")
    return str(net)


def node_spec(cfg: DevClusterConfig, layout: Layout, index: int) -> Node:
    """Node number `index` (1-based) of the cluster that `cfg` describes."""
    if not 1 <= index <= MAX_NODES:
        raise ValueError(f"node index {index} is not within 1..{MAX_NODES}")
    link = ipaddress.ip_network(cfg.node_link_cidr)
    link_ip = str(link.network_address + index)
    if index == 1:
        return Node(1, NODE_NAME, cfg.node_netns, Addresses.from_config(cfg).node_ip, link_ip,
                    node_pod_cidr(cfg, 1), layout, cgroup_root(cfg))
    name = f"{NODE_NAME}{index}"
    return Node(index, name, f"{cfg.node_netns}{index}", link_ip, link_ip, node_pod_cidr(cfg, index),
                Layout(layout.state / "nodes" / name, layout.run / "nodes" / name),
                f"{cgroup_root(cfg)}-{name}")


def parse_taint(text: str) -> dict[str, str] | None:
    """"KEY=VALUE:EFFECT" (or "KEY:EFFECT") as a Node taint; None for ""."""
    text = text.strip()
    if not text:
        return None
    kv, sep, effect = text.rpartition(":")
    key, _, value = kv.partition("=")
    if not sep or not key or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise ValueError(f"taint {text!r} is not KEY=VALUE:EFFECT (EFFECT: NoSchedule, "
                         "PreferNoSchedule or NoExecute)")
    taint = {"key": key, "effect": effect}
    if value:
        taint["value"] = value
    return taint


def node_object(node: Node, taint: dict[str, str] | None) -> dict:
    """The Node object made before node i's kubelet starts, so its pod subnet
    (spec.podCIDR, immutable once set) is the one its CNI config and every
    node's routes use: the controller-manager's allocator then only marks it
    as taken.  The kubelet adopts the object when it registers."""
    spec: dict = {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]}
    if taint:
        spec["taints"] = [taint]
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name,
                                                       NODE_INDEX_LABEL: str(node.index)}},
            "spec": spec}


def laptop_ip(cfg: DevClusterConfig, index: int) -> str:
    """Address of laptop number `index`: the (10+index)th of the LAN."""
    lan = ipaddress.ip_network(cfg.lan_cidr)
    addr = lan.network_address + 10 + index
    if addr >= lan.broadcast_address:
        raise ValueError(f"no room for laptop #{index} in {lan}")
    return str(addr)


# ------------------------------------------------------------------ config files
def containerd_toml(layout: Layout) -> str:
    """containerd 1.6 config: own root, state, socket; never the host's."""
    sock = layout.containerd_sock
    return f"""# written by tpnb devcluster; a private containerd, not the host's
version = 2
root = "{layout.containerd_root}"
state = "{layout.containerd_state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{layout.state / 'containerd-opt'}"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{PAUSE_IMAGE}"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    # containers may not get a lower OOM score than containerd has: lowering
    # needs CAP_SYS_RESOURCE, which some VMs and sandboxes do not grant
    restrict_oom_score_adj = true
    disable_apparmor = true
    max_container_log_line_size = 16384
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      discard_unpacked_layers = false
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          # runc's state goes under our run dir, not the host's /run/containerd
          Root = "{layout.run / 'runc'}"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{CNI_BIN_DIR}"
      conf_dir = "{layout.cni_conf_dir}"
      max_conf_num = 1
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = ""
"""


def cni_conflist(cfg: DevClusterConfig, layout: Layout, node: Node | None = None) -> str:
    """Debian's bridge + host-local + portmap + loopback plugins on cni0 (the node's pod subnet)."""
    node = node or node_spec(cfg, layout, 1)
    doc = {
        "cniVersion": "1.0.0",
        "name": "tpnb-devcluster",
        "plugins": [
            {
                "type": "bridge",
                "bridge": CNI_BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(layout.cni_data_dir),
                    "ranges": [[{"subnet": node.pod_cidr, "gateway": node.cni_gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    return json.dumps(doc, indent=2) + "\n"


def kubelet_yaml(cfg: DevClusterConfig, layout: Layout, node: Node | None = None) -> str:
    node = node or node_spec(cfg, layout, 1)
    pki = layout.pki_dir
    doc = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(pki / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
        "address": "0.0.0.0",
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        # cgroup v1 with cgroupfs: this VM has no systemd, and kubelet 1.32
        # still accepts v1 (>= 1.35 refuses it; that is why 1.32 is pinned).
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": node.cgroup_root,
        "failSwapOn": False,
        "failCgroupV1": False,
        "containerRuntimeEndpoint": f"unix://{layout.containerd_sock}",
        "clusterDNS": [cfg.dns_service_ip],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(layout.resolv_conf),
        "podLogsDir": str(layout.pod_logs_dir),
        # images are imported, never pulled: they must never be collected,
        # and a mostly-full disk must not evict the cluster's own pods
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
            "imagefs.inodesFree": "1%",
        },
        "evictionPressureTransitionPeriod": "30s",
        "serializeImagePulls": False,
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "maxPods": 110,
        "podCIDR": node.pod_cidr,
        "protectKernelDefaults": False,
        # kubelet's default (-999) needs CAP_SYS_RESOURCE; keep the inherited score
        "oomScoreAdj": 0,
        "makeIPTablesUtilChains": True,
        "localStorageCapacityIsolation": True,
        "nodeStatusReportFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "runtimeRequestTimeout": "5m",
        "shutdownGracePeriod": "0s",
        "containerLogMaxSize": "10Mi",
        "containerLogMaxFiles": 3,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def kube_proxy_yaml(cfg: DevClusterConfig, layout: Layout, node: Node | None = None) -> str:
    node = node or node_spec(cfg, layout, 1)
    doc = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(layout.component_kubeconfig("kube-proxy"))},
        "mode": "iptables",
        "hostnameOverride": node.name,
        "clusterCIDR": cfg.pod_cidr,
        "bindAddress": "0.0.0.0",
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # Pods share one bridge, and the node netns leaves
        # bridge-nf-call-iptables off (so laptops' LAN bridge is plain L2):
        # masquerading every service connection makes pod -> ClusterIP -> pod
        # on the same bridge answer through the node, where it is un-NATed.
        "iptables": {"masqueradeAll": True, "syncPeriod": "10s", "minSyncPeriod": "1s"},
        # conntrack sysctls: leave them as the kernel has them
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                      "tcpCloseWaitTimeout": "0s"},
        "nodePortAddresses": ["primary"],
        "oomScoreAdj": 0,
    }
    return yaml.safe_dump(doc, sort_keys=False)


RESOLV_CONF = (
    "# tpnb devcluster: the node has no upstream DNS (nothing leaves this machine).\n"
    "# Pods with dnsPolicy ClusterFirst use CoreDNS; this file serves dnsPolicy Default.\n"
    "options ndots:1\n"
)


# ------------------------------------------------------------------ command lines
def component_argv(name: str, bin_dir: Path, cfg: DevClusterConfig, layout: Layout,
                   node: Node | None = None) -> list[str]:
    """The command line of one cluster component (run inside the node netns).

    `node` (default: node 1) is the node a kubelet, containerd or kube-proxy
    belongs to; `layout` is then that node's."""
    node = node or node_spec(cfg, layout, 1)
    addrs = Addresses.from_config(cfg)
    pki = layout.pki_dir
    kc = layout.component_kubeconfig
    b = str(bin_dir / name)
    if name == "etcd":
        return [b, "--name", "tpnb", "--data-dir", str(layout.etcd_dir),
                "--listen-client-urls", "http://127.0.0.1:2379",
                "--advertise-client-urls", "http://127.0.0.1:2379",
                "--listen-peer-urls", "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                "--initial-cluster", "tpnb=http://127.0.0.1:2380",
                "--listen-metrics-urls", "",
                "--quota-backend-bytes", str(2 * 1024**3),
                # a throwaway dev cluster: speed over crash safety
                "--unsafe-no-fsync", "--log-level", "warn"]
    if name == "containerd":
        return ["containerd", "--config", str(layout.containerd_config), "--log-level", "warn"]
    if name == "kube-apiserver":
        return [b,
                f"--advertise-address={addrs.node_ip}",
                "--bind-address=0.0.0.0",
                f"--secure-port={cfg.api_port}",
                "--etcd-servers=http://127.0.0.1:2379",
                f"--service-cluster-ip-range={cfg.service_cidr}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
                f"--kubelet-certificate-authority={pki / 'ca.crt'}",
                "--kubelet-preferred-address-types=InternalIP",
                f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                # webhooks and aggregated APIs are reached at their pods' IPs:
                # the node netns has no route to the service CIDR
                "--enable-aggregator-routing=true",
                # aggregation layer (and no "missing CA bundle" noise in the
                # controller-manager): header authentication from our proxy cert
                f"--requestheader-client-ca-file={pki / 'ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
                "--profiling=false",
                "--v=1"]
    if name == "kube-controller-manager":
        node_mask = str(ipaddress.ip_network(cfg.node_pod_cidr).prefixlen)
        return [b,
                f"--kubeconfig={kc('controller-manager')}",
                f"--authentication-kubeconfig={kc('controller-manager')}",
                f"--authorization-kubeconfig={kc('controller-manager')}",
                "--bind-address=127.0.0.1",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                "--allocate-node-cidrs=true",
                f"--cluster-cidr={cfg.pod_cidr}",
                f"--node-cidr-mask-size={node_mask}",
                f"--service-cluster-ip-range={cfg.service_cidr}",
                "--profiling=false",
                "--v=1"]
    if name == "kube-scheduler":
        return [b,
                f"--kubeconfig={kc('scheduler')}",
                f"--authentication-kubeconfig={kc('scheduler')}",
                f"--authorization-kubeconfig={kc('scheduler')}",
                "--bind-address=127.0.0.1",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1"]
    if name == "kubelet":
        return [b,
                f"--config={layout.kubelet_config}",
                f"--kubeconfig={kc('kubelet')}",
                f"--root-dir={layout.kubelet_dir}",
                f"--hostname-override={node.name}",
                f"--node-ip={node.ip}",
                "--v=1"]
    if name == "kube-proxy":
        return [b, f"--config={layout.kube_proxy_config}", "--v=1"]
    raise KeyError(name)


#: start order; `down` stops in reverse
COMPONENTS = ("etcd", "containerd", "kube-apiserver", "kube-controller-manager",
              "kube-scheduler", "kubelet", "kube-proxy")
#: what each node after the first runs (in this order)
NODE_COMPONENTS = ("containerd", "kubelet", "kube-proxy")


# ------------------------------------------------------------------ CoreDNS
COREFILE = """.:53 {
    errors
    health {
        lameduck 5s
    }
    ready
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }
    # a dev cluster recreates namespaces and Services all the time: keep
    # answers briefly and "no such name" only 2 s, so a new Service resolves at once
    cache 30 {
        denial 9984 2
    }
    loadbalance
}
"""


def coredns_manifests(cfg: DevClusterConfig, image: str) -> list[dict]:
    """CoreDNS as a pod, the way kubeadm installs it, minus any upstream.

    There is no `forward`: nothing outside the machine is reachable, so
    names outside cluster.local fail at once instead of timing out.
    """
    labels = {"k8s-app": "kube-dns"}
    ns = "kube-system"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", "namespace": ns}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                 "verbs": ["list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                 "verbs": ["list", "watch"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "system:coredns"},
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": ns}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": ns},
            "data": {"Corefile": COREFILE},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "coredns", "namespace": ns, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "strategy": {"type": "RollingUpdate",
                             "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "priorityClassName": "system-cluster-critical",
                        "dnsPolicy": "Default",
                        "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"},
                                        {"key": "node-role.kubernetes.io/control-plane",
                                         "effect": "NoSchedule"}],
                        "containers": [{
                            "name": "coredns",
                            "image": image,
                            "imagePullPolicy": "Never",
                            "args": ["-conf", "/etc/coredns/Corefile"],
                            "ports": [
                                {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                            ],
                            "resources": {"requests": {"cpu": "50m", "memory": "40Mi"},
                                          "limits": {"memory": "170Mi"}},
                            "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns",
                                              "readOnly": True}],
                            "livenessProbe": {
                                "httpGet": {"path": "/health", "port": 8080},
                                "initialDelaySeconds": 30, "timeoutSeconds": 5,
                                "failureThreshold": 5,
                            },
                            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181},
                                               "periodSeconds": 2},
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]},
                                "readOnlyRootFilesystem": True,
                            },
                        }],
                        "volumes": [{"name": "config", "configMap": {
                            "name": "coredns", "items": [{"key": "Corefile", "path": "Corefile"}]}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": ns, "labels": labels},
            "spec": {
                "selector": labels,
                "clusterIP": cfg.dns_service_ip,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                ],
            },
        },
    ]


def coredns_yaml(cfg: DevClusterConfig, image: str) -> str:
    return yaml.safe_dump_all(coredns_manifests(cfg, image), sort_keys=False)
