"""The dev cluster's nodes after the first: `up --nodes N` adds them, `remove-node` takes one out.

Why more than one node: real clusters spread pods over machines, so a
traffic-agent runs on another node than the traffic-manager, pod subnets
differ per node, and pod-to-pod and pod-to-Service traffic crosses a routed
link.  A single node hides all of that.

Node i > 1 is network namespace `<node_netns><i>` with its own containerd
(own root, state dir and socket, so every image is imported into it), its
own kubelet (own root dir, pod logs, CNI data, cgroup root, certificates
for system:node:tpnb-node<i>) and its own kube-proxy.  Its only link is eth0
on bridge nodes0 in node 1's netns; each node routes the other nodes' pod
subnets over that link, and the added nodes reach the API server through
node 1.  Nothing of it has a link to the host or a default route, and the
laptops (on lan0, whose traffic node 1 never forwards) cannot reach it.

The pod subnet of node i is fixed (`manifests.node_pod_cidr`): the Node
object is made with that spec.podCIDR before its kubelet starts, so the
CNI config and every route agree with what Kubernetes reports.
"""
from __future__ import annotations

import json
import shutil
import signal
from typing import TYPE_CHECKING, Any

from tpnb.errors import ConfigError, DevClusterError

from . import manifests, netns
from .manifests import MAX_NODES, NODE_COMPONENTS, Node
from .pki import Pki, ensure_node_pki
from .progress import ProgressFn

if TYPE_CHECKING:
    from .cluster import DevCluster

#: annotation on a Node that holds the development taint `up` put on it, so a
#: later `up` without `devcluster.node_taint` knows which taint to take off
TAINT_ANNOTATION = "tpnb.dev/dev-taint"


def check_count(count: int) -> None:
    if not 1 <= count <= MAX_NODES:
        raise ConfigError(f"invalid node count {count}", f"the dev cluster runs 1 to {MAX_NODES} nodes",
                          "e.g. `tpnb devcluster up --nodes 2`")


def dev_taint(text: str) -> dict[str, str] | None:
    try:
        return manifests.parse_taint(text)
    except ValueError as exc:
        raise ConfigError("invalid devcluster.node_taint", str(exc),
                          "e.g. tpnb.dev/wip=true:NoSchedule, or empty for no taint") from None


class NodeOps:
    """Adds, repairs, stops and removes the nodes after the first, with the
    DevCluster's process, containerd and cgroup helpers."""

    def __init__(self, dc: DevCluster) -> None:
        self.dc = dc
        self.cfg = dc.cfg

    # ------------------------------------------------------------ up
    def ensure(self, target: int, built: list[Any], progress: ProgressFn) -> None:
        """At least `target` nodes, every added node running and Ready.

        Never removes a node (its pods would go): asking for fewer than run
        says how to remove one instead.
        """
        dc = self.dc
        check_count(target)
        taint = dev_taint(self.cfg.node_taint)
        have = dc.extra_nodes()
        used = {n.index for n in have}
        new: list[Node] = []
        i = 2
        while 1 + len(have) + len(new) < target:
            while i in used:
                i += 1
            new.append(manifests.node_spec(self.cfg, dc.layout, i))
            used.add(i)
        todo = have + new
        if not todo:
            return
        first = dc.first_node
        progress("nodes", f"{len(have)} added node(s) running, {len(new)} to add "
                 f"(node link {manifests.NODE_LINK_BRIDGE} {self.cfg.node_link_cidr})", 0.9)
        netns.setup_node_link(self.cfg, first)
        for node in todo:
            netns.setup_extra_node(self.cfg, dc.layout, node, first)
        netns.sync_node_routes(self.cfg, [first, *sorted(todo, key=lambda n: n.index)])
        started: list[str] = []
        for k, node in enumerate(todo):
            started += self.start(node, built, progress, taint, frac=0.9 + 0.06 * k / len(todo))
        for node in todo:
            dc._wait(f"node {node.name}", lambda n=node: dc._node_ready(n.name), progress, 0.97, 180, started,
                     lambda n=node: f"kubelet log of {n.name}:\n{_tail(n.layout.log('kubelet'))}")
        dc._restore_kernel_sysctls()  # each kubelet rewrites a few kernel-wide ones at start
        if new:
            progress("nodes", "added " + ", ".join(f"{n.name} (pods {n.pod_cidr})" for n in new), 0.98)

    def note_fewer(self, target: int, progress: ProgressFn) -> None:
        running = self.dc.nodes()
        if target < len(running):
            extra = [n.name for n in running[target:]]
            progress("nodes", f"{len(running)} nodes run and {target} were asked for; `up` never removes a "
                     f"node (its pods would go). Remove one with `tpnb devcluster remove-node {extra[-1]}`", 0.98)

    def write_config(self, node: Node) -> None:
        """Certificates, kubeconfigs and component configs of an added node."""
        lay, cfg = node.layout, self.cfg
        for d in (lay.config_dir, lay.kubeconfig_dir, lay.logs_dir, lay.cni_conf_dir, lay.cni_data_dir,
                  lay.kubelet_dir, lay.pod_logs_dir, lay.containerd_root, lay.containerd_state, lay.pid_dir):
            d.mkdir(parents=True, exist_ok=True)
        pki = ensure_node_pki(Pki(self.dc.layout.pki_dir), lay.pki_dir, node.name, node.ip)
        # the API server's LAN address, which the node reaches through node 1
        server = f"{self.dc.addrs.api_server}:{cfg.api_port}"
        for name in ("kubelet", "kube-proxy"):
            pki.write_kubeconfig(lay.component_kubeconfig(name), name, server)
        _write_if_changed(lay.containerd_config, manifests.containerd_toml(lay))
        _write_if_changed(lay.kubelet_config, manifests.kubelet_yaml(cfg, lay, node))
        _write_if_changed(lay.kube_proxy_config, manifests.kube_proxy_yaml(cfg, lay, node))
        _write_if_changed(lay.resolv_conf, manifests.RESOLV_CONF)
        _write_if_changed(lay.cni_conf_dir / "10-tpnb.conflist", manifests.cni_conflist(cfg, lay, node))

    def start(self, node: Node, built: list[Any], progress: ProgressFn, taint: dict[str, str] | None,
              frac: float) -> list[str]:
        """Start what is not running of `node` (idempotent); returns the components to watch."""
        dc = self.dc
        self.write_config(node)
        dc._setup_cgroups(node.cgroup_root)
        watch = [f"{c}@{node.name}" for c in NODE_COMPONENTS]
        if not dc._pid("containerd", node):
            progress(node.name, f"starting containerd (socket {node.layout.containerd_sock})", frac)
            dc._start("containerd", node)
            dc._wait(f"containerd of {node.name}", lambda: dc._containerd_ready(node.layout), progress, frac, 60,
                     watch[:1])
            if not dc._pid("kubelet", node) and dc._purge_containers(node.layout):
                progress(node.name, "removed containers of an earlier boot; restarting containerd", frac)
                dc._stop("containerd", node=node)
                dc._start("containerd", node)
                dc._wait(f"containerd of {node.name}", lambda: dc._containerd_ready(node.layout), progress,
                         frac, 60, watch[:1])
        dc._import_images(built, progress, (frac, frac), layout=node.layout)
        self.ensure_node_object(node, taint)
        for c in ("kubelet", "kube-proxy"):
            if not dc._pid(c, node):
                progress(node.name, f"starting {c}", frac)
                dc._start(c, node)
        return watch

    def ensure_node_object(self, node: Node, taint: dict[str, str] | None) -> None:
        """The Node with this node's pod subnet, and the development taint as configured."""
        dc = self.dc
        res = dc.kubectl("get", "node", node.name, "-o", "json", check=False)
        if res.returncode == 0:
            obj = json.loads(res.stdout)
            if obj.get("spec", {}).get("podCIDR") == node.pod_cidr:
                self._reconcile_taint(node, obj, taint)
                return
            # spec.podCIDR is immutable: a Node left with another subnet is made again
            dc.kubectl("delete", "node", node.name, "--wait=true", timeout=60)
        obj = manifests.node_object(node, taint)
        if taint:
            obj["metadata"]["annotations"] = {TAINT_ANNOTATION: _taint_text(taint)}
        dc.kubectl("create", "-f", "-", input=json.dumps(obj))

    def _reconcile_taint(self, node: Node, obj: dict, taint: dict[str, str] | None) -> None:
        dc = self.dc
        ann = (obj.get("metadata", {}).get("annotations") or {}).get(TAINT_ANNOTATION)
        want = _taint_text(taint) if taint else None
        if ann == want:
            return
        if ann:  # the earlier development taint goes
            key, _, effect = ann.rpartition(":")
            dc.kubectl("taint", "node", node.name, f"{key.split('=')[0]}:{effect}-", check=False)
        if taint:
            dc.kubectl("taint", "node", node.name, want or "", "--overwrite")
            dc.kubectl("annotate", "node", node.name, f"{TAINT_ANNOTATION}={want}", "--overwrite")
        else:
            dc.kubectl("annotate", "node", node.name, f"{TAINT_ANNOTATION}-", check=False)

    # ------------------------------------------------------------ remove / stop
    def remove(self, name: str, progress: ProgressFn) -> None:
        """Drain node `name`, stop it, delete its Node and every trace of it."""
        dc = self.dc
        node = dc.node(name)
        if node.index == 1:
            raise DevClusterError(f"{name} is the first node: it runs the control plane",
                                  hint="`tpnb devcluster down` stops the whole cluster")
        progress("remove-node", f"draining {name} (its pods move to other nodes)", 0.1)
        if dc._api_ready():
            dc.kubectl("drain", name, "--ignore-daemonsets", "--delete-emptydir-data", "--force",
                       "--grace-period=5", "--timeout=90s", check=False, timeout=120)
        progress("remove-node", f"stopping kube-proxy, kubelet and containerd of {name}", 0.5)
        self.stop(node)
        if dc._api_ready():
            dc.kubectl("delete", "node", name, "--ignore-not-found", "--wait=true", check=False, timeout=60)
        rest = [n for n in dc.nodes() if n.index != node.index]
        for other in rest:  # no node keeps a route to the gone node's pods
            netns.in_ns(other.netns, ["ip", "route", "del", node.pod_cidr], check=False)
        progress("remove-node", f"{name} removed; {len(rest)} node(s) left", 1.0)

    def stop(self, node: Node) -> None:
        """Stop node `node` and remove its processes, pods, mounts, netns, veth and cgroups
        (its image store and certificates stay, as the first node's do)."""
        dc, lay = self.dc, node.layout
        for c in reversed(NODE_COMPONENTS[1:]):
            dc._stop(c, node=node)
        if dc._pid("containerd", node) and dc._containerd_ready(lay):
            dc._purge_containers(lay)
        dc._stop("containerd", node=node)
        pids = dc._sweep_pids(only=[node])
        if pids:
            from .cluster import _signal_and_wait

            _signal_and_wait(pids, 10, sig=signal.SIGKILL)
        dc._reap()
        dc._remove_stale_shim_sockets(lay)
        if netns.owned(dc.layout, node.netns) is not None:
            for name in netns.peer_namespaces(node.netns):
                if name.startswith("cni-"):
                    netns.run(["ip", "netns", "del", name], check=False)
        stuck = dc._unmount_all(lay)
        netns.remove_extra_node(self.cfg, dc.layout, node)
        dc._remove_cgroups([node.cgroup_root])
        dc._clean_var_log_containers(lay)
        cri = lay.containerd_root / "io.containerd.grpc.v1.cri"
        per_boot = [lay.kubelet_dir, lay.pod_logs_dir, lay.cni_data_dir, lay.pid_dir, lay.containerd_state,
                    lay.run / "runc", cri / "sandboxes", cri / "containers"]
        if stuck:  # never delete below a mount point that is still there
            per_boot = [d for d in per_boot if not any(m.startswith(str(d) + "/") for m in stuck)]
        for d in per_boot:
            shutil.rmtree(d, ignore_errors=True)
        if stuck:
            raise DevClusterError(
                f"could not unmount {', '.join(stuck[:5])}" + (" …" if len(stuck) > 5 else ""),
                "a process outside the dev cluster may still use them",
                "find it with `fuser -vm PATH`, stop it, then run the command again")
        shutil.rmtree(lay.run, ignore_errors=True)


def _taint_text(taint: dict[str, str]) -> str:
    kv = taint["key"] + (f"={taint['value']}" if taint.get("value") else "")
    return f"{kv}:{taint['effect']}"


def _write_if_changed(path: Any, text: str) -> None:
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    path.write_text(text)


def _tail(path: Any, n: int = 20) -> str:
    from .cluster import _tail as tail

    return tail(path, n)
