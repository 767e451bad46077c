"""The dev cluster: a real single-node Kubernetes inside network namespaces.

`DevCluster.up` builds (or reuses) upstream binaries and images, makes the
PKI and config files, creates the node netns and boots etcd, containerd,
the control plane, kubelet and kube-proxy in it, then CoreDNS as a pod.
`down` stops all of it and removes every trace from the host (processes,
mounts, namespaces, cgroups) but keeps the caches, so the next `up` is fast.

Processes are plain detached children (`nsenter --net`), with a pidfile and
a log per component: no supervisor is needed for a dev cluster, and `down`
finds them by pidfile, by network namespace and by cgroup.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tpnb import config as tpnb_config
from tpnb.daemon.resolvconf import process_alive, start_ticks
from tpnb.errors import DevClusterError, PrerequisiteError

from . import binaries, helm, manifests, netns
from . import config as devcluster_config
from .config import DevClusterConfig
from .manifests import COMPONENTS, NODE_NAME, Addresses, Layout, Node
from .pki import Pki, PkiPlan
from .nodes import NodeOps, check_count, dev_taint
from .progress import ProgressFn, silent

#: command -> Debian package that provides it
PREREQ_COMMANDS: dict[str, str] = {
    "ip": "iproute2",
    "iptables": "iptables",
    "nsenter": "util-linux",
    "mount": "mount",
    "containerd": "containerd",
    "containerd-shim-runc-v2": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "conntrack": "conntrack",
}
CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
#: kernel-wide sysctls kubelet rewrites at start; put back once it has
#: started, so the host kernel keeps its own settings
HOST_KERNEL_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic",
                       "kernel/panic_on_oops", "kernel/keys/root_maxkeys",
                       "kernel/keys/root_maxbytes")
VAR_LOG_CONTAINERS = Path("/var/log/containers")
DEFAULT_LAPTOP = "laptop"
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _images_module() -> Any:
    """The image builder, written separately; imported late so the rest of
    the dev cluster (down, status, unit tests) works without it."""
    try:
        from . import images  # type: ignore[attr-defined]
    except ImportError as exc:
        raise DevClusterError(
            "the dev cluster's image builder (tpnb_devcluster.images) is not available",
            str(exc), "update tpnb; the images module builds pause, CoreDNS and the tpnb image",
        ) from None
    return images


# ------------------------------------------------------------------ processes
def _alive(pid: int, start: int | str | None = None) -> bool:
    """The recorded process still runs (pidfiles of older versions hold the start time as text)."""
    return process_alive(pid, int(start) if start not in (None, "") else None)


def _ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 1:
        out.add(pid)
        st = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
        try:
            pid = int(st[st.rfind(")") + 2:].split()[1])
        except (ValueError, IndexError):
            break
    return out


def _tail(path: Path, n: int = 20) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in lines[-n:])


def _mountpoints() -> list[tuple[str, str]]:
    """(mount point, fs type) from /proc/self/mountinfo, unescaped."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mp = left.split()[4].encode().decode("unicode_escape")
        out.append((mp, right.split()[0] if right else ""))
    return out


@dataclass
class NodeRow:
    """One node as `status` shows it."""

    name: str
    ready: bool | None
    pod_cidr: str = ""
    address: str = ""
    taints: list[str] = field(default_factory=list)
    unschedulable: bool = False


@dataclass
class Status:
    """What `tpnb devcluster status` shows."""

    components: dict[str, int | None] = field(default_factory=dict)
    node_netns: bool = False
    #: every node Ready (None: unknown)
    node_ready: bool | None = None
    nodes: list[NodeRow] = field(default_factory=list)
    coredns_ready: bool | None = None
    laptops: list[str] = field(default_factory=list)
    kubeconfig: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return bool(self.components) and all(self.components.values()) and bool(self.node_ready)

    @property
    def stopped(self) -> bool:
        return not self.node_netns and not any(self.components.values())

    def render(self) -> str:
        lines = []
        state = "running" if self.running and self.coredns_ready else \
            "stopped" if self.stopped else "degraded"
        lines.append(f"dev cluster: {state}")
        for name, pid in self.components.items():
            lines.append(f"  {name:<24} {'pid ' + str(pid) if pid else 'not running'}")
        fmt = {True: "yes", False: "no", None: "unknown"}
        lines.append(f"  nodes:                     {len(self.nodes) or 'unknown'}")
        for n in self.nodes:
            extra = "".join([f"  pods {n.pod_cidr}" if n.pod_cidr else "", f"  ip {n.address}" if n.address else "",
                             "  cordoned" if n.unschedulable else "",
                             f"  taints {','.join(n.taints)}" if n.taints else ""])
            lines.append(f"  node {n.name:<15} Ready: {fmt[n.ready]:<7}{extra}")
        lines.append(f"  CoreDNS ready:             {fmt[self.coredns_ready]}")
        lines.append(f"  laptops:                   {', '.join(self.laptops) or '(none)'}")
        lines.append(f"  kubeconfig:                {self.kubeconfig}")
        for p in self.problems:
            lines.append(f"  ! {p}")
        return "\n".join(lines)


class DevCluster:
    """The Python API of the dev cluster (used by the CLI and by tests)."""

    def __init__(self, cfg: DevClusterConfig | None = None) -> None:
        self.cfg = cfg or devcluster_config.get()
        self.layout = Layout.from_config(self.cfg)
        self.addrs = Addresses.from_config(self.cfg)
        self._children: list[subprocess.Popen[bytes]] = []

    # ------------------------------------------------------------ paths
    @property
    def kubeconfig_path(self) -> Path:
        return self.layout.user_kubeconfig

    @property
    def bin_dir(self) -> Path:
        return binaries.bin_dir(self.layout.state)

    @property
    def cgroup_root(self) -> str:
        return manifests.cgroup_root(self.cfg)

    @property
    def admin_kubeconfig(self) -> Path:
        """Admin kubeconfig for use inside the node netns (127.0.0.1)."""
        return self.layout.component_kubeconfig("admin")

    # ------------------------------------------------------------ commands
    def node_exec_cmd(self, argv: list[str], node: str | None = None) -> list[str]:
        """argv that runs `argv` inside a node's network namespace (default: the
        first node's, where the control plane runs; else the Node named `node`)."""
        return netns.nsenter(self.node(node).netns if node else self.cfg.node_netns, argv)

    # ------------------------------------------------------------ nodes
    @property
    def first_node(self) -> Node:
        return manifests.node_spec(self.cfg, self.layout, 1)

    def extra_nodes(self) -> list[Node]:
        """The nodes `up` added after the first (recorded, whether or not they run)."""
        return [manifests.node_spec(self.cfg, self.layout, int(r["index"]))
                for r in netns.extra_node_records(self.layout)]

    def nodes(self) -> list[Node]:
        return [self.first_node, *self.extra_nodes()]

    def node(self, name: str) -> Node:
        for n in self.nodes():
            if n.name == name:
                return n
        raise DevClusterError(f"no node {name!r} in the dev cluster",
                              hint="`tpnb devcluster status` lists the nodes")

    def laptop_cmd(self, name: str, argv: list[str]) -> list[str]:
        """argv that runs `argv` in laptop `name` (created if missing).

        The laptop sees the API server at the kubeconfig's address, has
        kubectl, helm (once built: `tpnb devcluster helm-path`) and tpnb on PATH, and logs to its own directory so two
        laptops' daemons never share log files.
        """
        self.ensure_laptop(name)
        venv_bin = str(Path(sys.executable).parent)
        path = ":".join([str(self.bin_dir), str(helm.helm_dir(self.layout.state)), venv_bin,
                         os.environ.get("PATH", SAFE_PATH)])
        logs = tpnb_config._home() / ".cache" / "tpnb" / "logs" / name
        return ["ip", "netns", "exec", netns.laptop_netns(name), "env",
                f"KUBECONFIG={self.kubeconfig_path}", f"PATH={path}", f"TPNB_LOGS_DIR={logs}",
                f"TPNB_LAPTOP={name}", *argv]

    def ensure_laptop(self, name: str = DEFAULT_LAPTOP) -> netns.Laptop:
        self._require_root()
        return netns.ensure_laptop(self.cfg, self.layout, name)

    def remove_laptop(self, name: str) -> None:
        self._require_root()
        netns.remove_laptop(self.cfg, self.layout, name)

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 30,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        """kubectl as cluster admin, from inside the node netns."""
        argv = self.node_exec_cmd([str(self.bin_dir / "kubectl"), f"--kubeconfig={self.admin_kubeconfig}",
                                   "--request-timeout=10s", *args])
        try:
            res = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            res = subprocess.CompletedProcess(argv, 124, "", f"kubectl {' '.join(args)} timed out")
        if check and res.returncode != 0:
            raise DevClusterError(f"kubectl {' '.join(args)} failed", res.stderr.strip())
        return res

    # ------------------------------------------------------------ checks
    def _require_root(self) -> None:
        if os.geteuid() != 0:
            raise PrerequisiteError(
                "the dev cluster needs root",
                "it creates network namespaces, cgroups and mounts",
                "run it with sudo (e.g. `sudo tpnb devcluster up`)",
            )

    def check_prerequisites(self) -> None:
        """Every missing command or plugin, with the one apt-get line to fix them all."""
        self._require_root()
        missing: dict[str, str] = {}
        env_path = os.environ.get("PATH", "") + ":" + SAFE_PATH
        for cmd, pkg in PREREQ_COMMANDS.items():
            if not shutil.which(cmd, path=env_path):
                missing[cmd] = pkg
        for plugin in CNI_PLUGINS:
            if not os.access(Path(manifests.CNI_BIN_DIR) / plugin, os.X_OK):
                missing[f"CNI plugin {plugin}"] = "containernetworking-plugins"
        if missing:
            pkgs = sorted(set(missing.values()))
            raise PrerequisiteError(
                "missing prerequisites: " + ", ".join(missing),
                "the dev cluster runs containerd, runc and the CNI plugins from Debian's packages",
                f"apt-get install -y {' '.join(pkgs)}   (or run scripts/install-deps)",
            )
        cg = Path("/sys/fs/cgroup")
        if not (cg / "memory").is_dir() and not (cg / "cgroup.controllers").exists():
            raise PrerequisiteError("no cgroup hierarchy found under /sys/fs/cgroup",
                                    hint="mount cgroups (v1 or v2) before `up`")
        if "overlay" not in Path("/proc/filesystems").read_text():
            subprocess.run(["modprobe", "-q", "overlay"], capture_output=True)
            if "overlay" not in Path("/proc/filesystems").read_text():
                raise PrerequisiteError(
                    "the kernel has no overlay filesystem",
                    "containerd unpacks images with its overlayfs snapshotter",
                    "load it with `modprobe overlay` (apt-get install -y kmod), or use a kernel with it")
        if not Path("/proc/sys/net/ipv4/ip_forward").exists():
            raise PrerequisiteError("this kernel has no IPv4 networking sysctls",
                                    hint="run on a Linux kernel with network namespaces")

    # ------------------------------------------------------------ pids
    def _pid(self, component: str, node: Node | None = None) -> int | None:
        lay = node.layout if node else self.layout
        try:
            rec = json.loads(lay.pidfile(component).read_text())
        except (OSError, ValueError):
            return None
        pid = int(rec.get("pid", 0))
        return pid if pid and _alive(pid, rec.get("start")) else None

    def _env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin_dir}:{SAFE_PATH}", "HOME": "/root", "LANG": "C.UTF-8"}

    def _start(self, component: str, node: Node | None = None) -> int:
        lay = node.layout if node else self.layout
        argv = manifests.component_argv(component, self.bin_dir, self.cfg, lay, node)
        log_path = lay.log(component)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"\n=== tpnb devcluster: starting {component} at {time.ctime()}\n".encode())
            log.flush()
            proc = subprocess.Popen(netns.nsenter(node.netns if node else self.cfg.node_netns, argv),
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=self._env(), start_new_session=True,
                                    close_fds=True)
        self._children.append(proc)
        lay.pid_dir.mkdir(parents=True, exist_ok=True)
        lay.pidfile(component).write_text(json.dumps(
            {"pid": proc.pid, "start": start_ticks(proc.pid), "argv": argv}))
        return proc.pid

    def _stop(self, component: str, timeout: float = 10.0, node: Node | None = None) -> None:
        pid = self._pid(component, node)
        if pid:
            _signal_and_wait([pid], timeout)
        (node.layout if node else self.layout).pidfile(component).unlink(missing_ok=True)

    def _reap(self) -> None:
        for p in self._children:
            p.poll()

    def _assert_running(self, components: list[str]) -> None:
        """Fail fast, with the log, when a component we started has died
        ("kubelet@tpnb-node2": a component of an added node)."""
        self._reap()
        for c in components:
            comp, _, where = c.partition("@")
            node = self.node(where) if where else None
            if self._pid(comp, node) is None:
                log = (node.layout if node else self.layout).log(comp)
                raise DevClusterError(
                    f"{c} exited during startup",
                    f"last lines of {log}:\n{_tail(log)}",
                    "fix the cause, then run `tpnb devcluster up` again",
                )

    def _wait(self, what: str, check: Any, progress: ProgressFn, frac: float, timeout: float,
              started: list[str], diagnose: Any = None) -> None:
        start = time.monotonic()
        while True:
            if check():
                progress(what, f"done in {time.monotonic() - start:.1f} s", frac)
                return
            self._assert_running(started)
            elapsed = time.monotonic() - start
            if elapsed > timeout:
                detail = diagnose() if diagnose else ""
                raise DevClusterError(f"timed out after {int(elapsed)} s waiting for {what}", detail,
                                      f"look at the logs in {self.layout.logs_dir}")
            progress(what, f"waiting ({int(elapsed)} s)…", frac)
            time.sleep(1.0)

    # ------------------------------------------------------------ state queries
    def _api_ready(self) -> bool:
        return self.kubectl("get", "--raw", "/readyz", check=False, timeout=15).stdout.strip() == "ok"

    def _node_ready(self, name: str = NODE_NAME) -> bool:
        res = self.kubectl("get", "node", name, "-o",
                           'jsonpath={.status.conditions[?(@.type=="Ready")].status}', check=False)
        return res.returncode == 0 and res.stdout.strip() == "True"

    def _coredns_ready(self) -> bool:
        res = self.kubectl("-n", "kube-system", "get", "deployment", "coredns", "-o",
                           "jsonpath={.status.readyReplicas}", check=False)
        return res.returncode == 0 and res.stdout.strip() not in ("", "0")

    def _default_sa(self) -> bool:
        return self.kubectl("-n", "default", "get", "serviceaccount", "default", check=False).returncode == 0

    def _node_netns_ours(self) -> bool:
        return netns.owned(self.layout, self.cfg.node_netns) is not None

    def status(self) -> Status:
        st = Status(kubeconfig=str(self.kubeconfig_path))
        for c in COMPONENTS:
            st.components[c] = self._pid(c)
        extra = self.extra_nodes()
        for node in extra:
            for c in manifests.NODE_COMPONENTS:
                st.components[f"{c}@{node.name}"] = self._pid(c, node)
        st.node_netns = netns.exists(self.cfg.node_netns)
        if st.node_netns and not self._node_netns_ours():
            st.problems.append(f"network namespace {self.cfg.node_netns} exists but was not made by tpnb")
        st.laptops = [lap.name for lap in netns.laptops(self.layout)]
        if os.geteuid() != 0:
            st.problems.append("not root: cannot ask the API server (run with sudo for details)")
        elif st.components.get("kube-apiserver") and self.bin_dir.joinpath("kubectl").exists():
            if self._api_ready():
                st.nodes = self._node_rows([n.name for n in [self.first_node, *extra]])
                st.node_ready = bool(st.nodes) and all(n.ready for n in st.nodes)
                st.coredns_ready = self._coredns_ready()
            else:
                st.problems.append("the API server does not answer /readyz")
        return st

    def _node_rows(self, ours: list[str]) -> list[NodeRow]:
        """Every Node the API server knows, and ours that it does not (not Ready)."""
        res = self.kubectl("get", "nodes", "-o", "json", check=False)
        rows: dict[str, NodeRow] = {}
        try:
            items = json.loads(res.stdout).get("items", []) if res.returncode == 0 else []
        except ValueError:
            items = []
        for it in items:
            conds = {c.get("type"): c.get("status") for c in it.get("status", {}).get("conditions", [])}
            addrs = [a.get("address", "") for a in it.get("status", {}).get("addresses", [])
                     if a.get("type") == "InternalIP"]
            spec = it.get("spec", {})
            name = it["metadata"]["name"]
            rows[name] = NodeRow(
                name, conds.get("Ready") == "True", spec.get("podCIDR", ""), addrs[0] if addrs else "",
                [f"{t['key']}" + (f"={t['value']}" if t.get("value") else "") + f":{t['effect']}"
                 for t in spec.get("taints", []) if not t["key"].startswith("node.kubernetes.io/")],
                bool(spec.get("unschedulable")))
        for name in ours:
            rows.setdefault(name, NodeRow(name, False))
        return sorted(rows.values(), key=lambda r: (r.name not in ours, ours.index(r.name) if r.name in ours
                                                    else 0, r.name))

    def is_running(self) -> bool:
        """Every component alive, node Ready and CoreDNS ready."""
        if not self._node_netns_ours() or not all(self._pid(c) for c in COMPONENTS):
            return False
        return self._api_ready() and self._node_ready() and self._coredns_ready()

    # ------------------------------------------------------------ up
    def up(self, progress: ProgressFn = silent, nodes: int | None = None) -> Path:
        """Boot the cluster (or confirm it runs) with at least `nodes` nodes
        (default: devcluster.nodes); returns the kubeconfig path.

        On a running cluster, missing nodes are added and the others left as
        they are; `up` never removes a node (see `remove_node`).
        """
        self._require_root()
        target = self.cfg.nodes if nodes is None else nodes
        explicit = nodes is not None or self.cfg.sources.get("devcluster.nodes", "default") != "default"
        check_count(target)
        dev_taint(self.cfg.node_taint)
        with self._lock(progress):
            path = self._up(progress, target)
            if explicit:
                NodeOps(self).note_fewer(target, progress)
            return path

    def remove_node(self, name: str, progress: ProgressFn = silent) -> None:
        """Drain and remove added node `name` (never the first) and every trace of it."""
        self._require_root()
        with self._lock(progress):
            NodeOps(self).remove(name, progress)

    @contextlib.contextmanager
    def _lock(self, progress: ProgressFn) -> Iterator[None]:
        """One up/down at a time (a CLI and several test sessions may race)."""
        self.layout.run.mkdir(parents=True, exist_ok=True)
        with open(self.layout.run / "lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                progress("lock", "another `tpnb devcluster up/down` is running; waiting for it…", 0.0)
                fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _control_plane_alive(self) -> bool:
        return self._node_netns_ours() and all(self._pid(c) for c in COMPONENTS) and self._api_ready()

    def _up(self, progress: ProgressFn, target: int = 1) -> Path:
        t0 = time.monotonic()
        if self._control_plane_alive():
            # Running: no reboot (that would wipe everyone's pods).  Bring the
            # images up to date (the project image follows the source), make
            # sure CoreDNS is there, and wait for readiness.
            self._restore_kernel_sysctls()
            built = self._build_images(progress)
            self._import_images(built, progress, (0.6, 0.8))
            self._refresh_coredns(built, progress)
            if not (self._node_ready() and self._coredns_ready() and self._default_sa()):
                self._finish_boot(built, progress, list(COMPONENTS))
            NodeOps(self).ensure(target, built, progress)
            self._default_laptop(progress)
            progress("up", f"already running; kubeconfig: {self.kubeconfig_path}", 1.0)
            return self.kubeconfig_path
        self.check_prerequisites()
        self._preflight()
        progress("prerequisites", "commands, CNI plugins and cgroups present", 0.02)

        if self._leftovers():
            progress("cleanup", "stopping what an earlier, unfinished up left behind", 0.03)
            self._teardown(progress, purge=False)

        binaries.ensure(self.layout.state, progress, frac=(0.05, 0.35))
        # helm is not built here: nothing in `up` or `connect` needs it (the connector installs the manager
        # itself); `tpnb devcluster helm-path` and the Helm tests build it on first use (2-3 min cold)
        built = self._build_images(progress)

        progress("config", "certificates, kubeconfigs and component configs", 0.56)
        self._write_config()

        progress("network", f"node netns {self.cfg.node_netns}, {manifests.LAN_BRIDGE} at "
                 f"{self.addrs.node_ip}/{self.addrs.lan_prefix}", 0.58)
        netns.setup_node(self.cfg, self.layout)
        self._setup_cgroups()

        progress("etcd", "starting", 0.6)
        self._start("etcd")
        progress("containerd", f"starting (socket {self.layout.containerd_sock})", 0.61)
        self._start("containerd")
        self._wait("containerd", self._containerd_ready, progress, 0.63, 60, ["etcd", "containerd"])
        if self._purge_containers():
            progress("containerd", "removed containers of an earlier boot; restarting", 0.63)
            self._stop("containerd")
            self._start("containerd")
            self._wait("containerd", self._containerd_ready, progress, 0.63, 60, ["etcd", "containerd"])
        self._import_images(built, progress, (0.64, 0.7))

        self._check_port_free(self.cfg.api_port)
        progress("kube-apiserver", f"starting on {self.addrs.node_ip}:{self.cfg.api_port}", 0.71)
        self._start("kube-apiserver")
        started = ["etcd", "containerd", "kube-apiserver"]
        self._wait("kube-apiserver", self._api_ready, progress, 0.76, 120, started,
                   lambda: f"kube-apiserver log:\n{_tail(self.layout.log('kube-apiserver'))}\n"
                           f"etcd log:\n{_tail(self.layout.log('etcd'))}")

        self._save_kernel_sysctls()
        for c in ("kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy"):
            progress(c, "starting", 0.78)
            self._start(c)
            started.append(c)

        self._finish_boot(built, progress, started)
        NodeOps(self).ensure(target, built, progress)
        self._default_laptop(progress)
        progress("up", f"dev cluster ready in {time.monotonic() - t0:.0f} s; "
                 f"kubeconfig: {self.kubeconfig_path}", 1.0)
        return self.kubeconfig_path

    def _finish_boot(self, built: list[Any], progress: ProgressFn, started: list[str]) -> None:
        """CoreDNS applied; node Ready, default ServiceAccount, CoreDNS Ready."""
        progress("coredns", "applying Deployment coredns and Service kube-dns "
                 f"({self.cfg.dns_service_ip})", 0.8)
        self._apply_coredns(built)
        self._wait("node", self._node_ready, progress, 0.88, 180, started,
                   lambda: f"kubelet log:\n{_tail(self.layout.log('kubelet'))}")
        self._restore_kernel_sysctls()
        self._wait("service accounts", self._default_sa, progress, 0.9, 120, started,
                   lambda: f"kube-controller-manager log:\n"
                           f"{_tail(self.layout.log('kube-controller-manager'))}")
        self._wait("coredns", self._coredns_ready, progress, 0.98, 240, started, self._diagnose_coredns)

    def _default_laptop(self, progress: ProgressFn) -> None:
        """A laptop to work from, so `ip netns exec tpnb-laptop ...` works
        right away (unless that name belongs to someone else, e.g. another
        dev cluster on this machine)."""
        ns = netns.laptop_netns(DEFAULT_LAPTOP)
        if netns.foreign(self.layout, ns):
            progress("laptop", f"{ns} is not ours; use `tpnb devcluster laptop --name NAME`", 0.99)
            return
        lap = self.ensure_laptop(DEFAULT_LAPTOP)
        progress("laptop", f"{lap.netns} at {lap.ip} (tpnb devcluster laptop -- CMD)", 0.99)

    def _preflight(self) -> None:
        """Refuse, before building or stopping anything, to take over
        namespaces that someone else made."""
        node = self.cfg.node_netns
        if netns.foreign(self.layout, node):
            raise DevClusterError(
                f"network namespace {node} already exists and was not made by tpnb devcluster",
                "tpnb will not reuse or delete a namespace it did not create",
                f"delete it (`ip netns del {node}`) if it is a leftover, or set devcluster.node_netns "
                "to another name",
            )

    def _leftovers(self) -> bool:
        lay = self.layout
        if any(self.layout.pid_dir.glob("*.pid")) if lay.pid_dir.is_dir() else False:
            return True
        if netns.exists(self.cfg.node_netns) or netns.laptops(lay) or netns.recorded(lay):
            return True
        prefixes = (str(lay.state) + "/", str(lay.run) + "/")
        if any(mp.startswith(prefixes) for mp, _ in _mountpoints()):
            return True
        if self._cgroup_dirs() or lay.etcd_dir.exists() or lay.kubelet_dir.exists():
            return True
        return bool(self._sweep_pids(dry_run=True))

    def _build_images(self, progress: ProgressFn) -> list[Any]:
        images = _images_module()

        def scaled(step: str, message: str, fraction: float) -> None:
            progress(step, message, 0.35 + 0.2 * max(0.0, min(1.0, fraction)))

        progress("images", "building (cached by content hash)", 0.35)
        built = list(images.build_all(scaled))
        progress("images", f"{len(built)} images ready", 0.55)
        return built

    def _write_config(self) -> None:
        lay, cfg = self.layout, self.cfg
        for d in (lay.config_dir, lay.kubeconfig_dir, lay.logs_dir, lay.cni_conf_dir,
                  lay.cni_data_dir, lay.etcd_dir, lay.kubelet_dir, lay.pod_logs_dir,
                  lay.containerd_root, lay.containerd_state, lay.pid_dir):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(lay.etcd_dir, 0o700)
        for d in (lay.state, lay.state.parent):
            os.chmod(d, 0o755)  # the user kubeconfig must be reachable by all users
        pki = Pki(lay.pki_dir)
        pki.ensure(PkiPlan.make(NODE_NAME, self.addrs.node_ip, self.addrs.api_service_ip,
                                manifests.CLUSTER_DOMAIN))
        local = f"https://127.0.0.1:{cfg.api_port}"
        for name in ("admin", "controller-manager", "scheduler", "kube-proxy", "kubelet"):
            pki.write_kubeconfig(lay.component_kubeconfig(name), name, local)
        pki.write_kubeconfig(lay.user_kubeconfig, "admin", f"{self.addrs.api_server}:{cfg.api_port}",
                             mode=0o644, embed=True, context=manifests.KUBECONFIG_CONTEXT)
        lay.containerd_config.write_text(manifests.containerd_toml(lay))
        lay.kubelet_config.write_text(manifests.kubelet_yaml(cfg, lay))
        lay.kube_proxy_config.write_text(manifests.kube_proxy_yaml(cfg, lay))
        lay.resolv_conf.write_text(manifests.RESOLV_CONF)
        (lay.cni_conf_dir / "10-tpnb.conflist").write_text(manifests.cni_conflist(cfg, lay))
        if not VAR_LOG_CONTAINERS.exists():
            # kubelet creates it; remember so `down` removes it again
            (lay.run / "created-var-log-containers").parent.mkdir(parents=True, exist_ok=True)
            (lay.run / "created-var-log-containers").write_text("1")

    # ------------------------------------------------------------ cgroups
    def _cgroup_hierarchies(self) -> list[Path]:
        return sorted({Path(mp) for mp, fs in _mountpoints()
                       if fs in ("cgroup", "cgroup2") and mp.startswith("/sys/fs/cgroup")})

    def _cgroup_roots(self) -> list[str]:
        """The first node's cgroup root and those any added node would have."""
        return [self.cgroup_root, *(manifests.node_spec(self.cfg, self.layout, i).cgroup_root
                                    for i in range(2, manifests.MAX_NODES + 1))]

    def _cgroup_dirs(self, roots: list[str] | None = None) -> list[Path]:
        out = []
        for root in roots or self._cgroup_roots():
            rel = root.strip("/")
            out += [h / rel for h in self._cgroup_hierarchies() if (h / rel).is_dir()]
        return out

    def _setup_cgroups(self, root: str | None = None) -> None:
        """kubelet's cgroupRoot must exist in every hierarchy before it starts."""
        rel = (root or self.cgroup_root).strip("/")
        for h in self._cgroup_hierarchies():
            d = h / rel
            d.mkdir(exist_ok=True)
            for f in ("cpuset.cpus", "cpuset.mems"):
                if (h / f).exists() and (d / f).exists() and not (d / f).read_text().strip():
                    (d / f).write_text((h / f).read_text().strip())

    def _remove_cgroups(self, roots: list[str] | None = None) -> None:
        for top in self._cgroup_dirs(roots):
            for _ in range(3):
                pids = []
                for procs in top.rglob("cgroup.procs"):
                    try:
                        pids += [int(x) for x in procs.read_text().split()]
                    except (OSError, ValueError):
                        pass
                if pids:
                    _signal_and_wait(pids, 5, sig=signal.SIGKILL)
                for dirpath, _dirs, _files in sorted(os.walk(top, topdown=False),
                                                     key=lambda t: -t[0].count("/")):
                    try:
                        os.rmdir(dirpath)
                    except OSError:
                        pass
                if not top.exists():
                    break
                time.sleep(0.5)

    # ------------------------------------------------------------ kernel sysctls
    def _sysctl_file(self) -> Path:
        return self.layout.run / "host-kernel-sysctls.json"

    def _save_kernel_sysctls(self) -> None:
        if self._sysctl_file().exists():
            return
        vals = {}
        for k in HOST_KERNEL_SYSCTLS:
            try:
                vals[k] = Path("/proc/sys", k).read_text().strip()
            except OSError:
                pass
        self._sysctl_file().write_text(json.dumps(vals))

    def _restore_kernel_sysctls(self) -> None:
        try:
            vals = json.loads(self._sysctl_file().read_text())
        except (OSError, ValueError):
            return
        for k, v in vals.items():
            p = Path("/proc/sys", k)
            try:
                if p.read_text().strip() != v:
                    p.write_text(v)
            except OSError:
                pass

    # ------------------------------------------------------------ containerd
    def _ctr(self, *args: str, check: bool = False, timeout: float = 120,
             layout: Layout | None = None) -> subprocess.CompletedProcess[str]:
        """ctr against the first node's containerd (or the one of the node whose layout is given)."""
        argv = ["ctr", "-a", str((layout or self.layout).containerd_sock), "-n", "k8s.io", *args]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            res = subprocess.CompletedProcess(argv, 124, "", "timed out")
        if check and res.returncode != 0:
            raise DevClusterError(f"`{' '.join(argv)}` failed", res.stderr.strip())
        return res

    def _containerd_ready(self, layout: Layout | None = None) -> bool:
        lay = layout or self.layout
        return lay.containerd_sock.exists() and self._ctr("version", timeout=10, layout=lay).returncode == 0

    def _purge_containers(self, layout: Layout | None = None) -> bool:
        """Kill and delete every container of the k8s.io namespace; True if any."""
        tasks = self._ctr("tasks", "ls", "-q", timeout=30, layout=layout).stdout.split()
        for t in tasks:
            self._ctr("tasks", "rm", "-f", t, timeout=30, layout=layout)
        ids = self._ctr("containers", "ls", "-q", timeout=30, layout=layout).stdout.split()
        if ids:
            self._ctr("containers", "rm", *ids, timeout=60, layout=layout)
        return bool(tasks or ids)

    def _import_images(self, built: list[Any], progress: ProgressFn, frac: tuple[float, float],
                       layout: Layout | None = None) -> None:
        """`ctr images import` each tar into a node's containerd (default: the
        first's), skipping those already imported unchanged."""
        lay = layout or self.layout

        def ctr(*args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
            return self._ctr(*args, check=check, timeout=timeout, layout=lay)

        rec_path = lay.images_record
        try:
            record: dict[str, Any] = json.loads(rec_path.read_text())
        except (OSError, ValueError):
            record = {}
        present = set(ctr("images", "ls", "-q", check=True).stdout.split())
        n = max(1, len(built))
        for i, img in enumerate(built):
            f = frac[0] + (frac[1] - frac[0]) * (i + 1) / n
            tar = Path(img.tar)
            digest = _file_digest(tar)
            if img.name in present and record.get(img.name) == digest:
                continue
            progress("images", f"importing {img.name}", f)
            res = ctr("images", "import", str(tar), timeout=600)
            if res.returncode != 0:
                raise DevClusterError(f"importing image {img.name} from {tar} failed",
                                      res.stderr.strip(), "remove the tar to have it rebuilt")
            present = set(ctr("images", "ls", "-q", check=True).stdout.split())
            if img.name not in present:
                got = _imported_name(res.stdout)
                if got:
                    ctr("images", "tag", "--force", got, img.name, check=True)
                else:
                    raise DevClusterError(f"importing {tar} did not create image {img.name}",
                                          res.stdout.strip())
            record[img.name] = digest
        rec_path.parent.mkdir(parents=True, exist_ok=True)
        rec_path.write_text(json.dumps(record, indent=1))

    def _apply_coredns(self, built: list[Any]) -> None:
        image = getattr(_images_module(), "COREDNS_IMAGE")
        text = manifests.coredns_yaml(self.cfg, image)
        self.layout.coredns_manifest.write_text(text)
        for _ in range(10):  # RBAC bootstrap may still be settling
            res = self.kubectl("apply", "-f", "-", input=text, check=False)
            if res.returncode == 0:
                return
            time.sleep(2)
        raise DevClusterError("applying the CoreDNS manifests failed", res.stderr.strip())

    def _refresh_coredns(self, built: list[Any], progress: ProgressFn) -> None:
        """A running cluster gets a changed CoreDNS config too (and CoreDNS restarts to read it)."""
        image = getattr(_images_module(), "COREDNS_IMAGE")
        path = self.layout.coredns_manifest
        if path.exists() and path.read_text() == manifests.coredns_yaml(self.cfg, image):
            return
        progress("coredns", "configuration changed: applying it and restarting CoreDNS", 0.82)
        self._apply_coredns(built)
        self.kubectl("-n", "kube-system", "rollout", "restart", "deploy/coredns", check=False)
        self.kubectl("-n", "kube-system", "rollout", "status", "deploy/coredns", "--timeout=120s",
                     check=False, timeout=150)

    def _diagnose_coredns(self) -> str:
        pods = self.kubectl("-n", "kube-system", "get", "pods", "-o", "wide", check=False).stdout
        events = self.kubectl("-n", "kube-system", "get", "events", "--sort-by=.lastTimestamp",
                              check=False).stdout
        return f"pods:\n{pods}\nevents:\n{events[-3000:]}\nkubelet log:\n{_tail(self.layout.log('kubelet'), 10)}"

    def _check_port_free(self, port: int) -> None:
        res = netns.in_ns(self.cfg.node_netns, ["ss", "-Hltnp", f"sport = :{port}"], check=False)
        if res.stdout.strip():
            raise DevClusterError(
                f"port {port} is already in use in network namespace {self.cfg.node_netns}",
                res.stdout.strip(),
                "stop that process (or run `tpnb devcluster down`), or set devcluster.api_port",
            )

    # ------------------------------------------------------------ down
    def down(self, purge: bool = False, progress: ProgressFn = silent) -> None:
        """Stop everything and remove all traces; keep caches unless `purge`."""
        self._require_root()
        with self._lock(progress):
            self._teardown(progress, purge=purge)
        progress("down", "dev cluster stopped" + (" and its state removed" if purge else
                 f"; caches kept in {self.layout.state}"), 1.0)

    def _teardown(self, progress: ProgressFn, purge: bool) -> None:
        lay = self.layout
        for node in self.extra_nodes():
            progress("down", f"stopping node {node.name} and removing its namespace", 0.05)
            NodeOps(self).stop(node)
        progress("down", "stopping kube-proxy, kubelet, scheduler, controller-manager", 0.1)
        for c in ("kube-proxy", "kubelet", "kube-scheduler", "kube-controller-manager"):
            self._stop(c)
        if self._pid("containerd") and self._containerd_ready():
            progress("down", "killing and deleting pod containers", 0.3)
            self._purge_containers()
        progress("down", "stopping containerd, kube-apiserver, etcd", 0.4)
        for c in ("containerd", "kube-apiserver", "etcd"):
            self._stop(c)
        self._restore_kernel_sysctls()

        progress("down", "sweeping leftover processes (by netns and cgroup)", 0.5)
        pids = self._sweep_pids()
        if pids:
            _signal_and_wait(pids, 10, sig=signal.SIGKILL)
        self._reap()
        self._remove_stale_shim_sockets()

        progress("down", "removing pod and laptop network namespaces", 0.6)
        node = self.cfg.node_netns
        node_ours = self._node_netns_ours()
        if node_ours:
            for name in netns.peer_namespaces(node):
                if name.startswith("cni-"):
                    netns.run(["ip", "netns", "del", name], check=False)
        for lap in netns.laptops(lay):
            netns.delete(lay, lap.netns)
        for rec in netns.recorded(lay):  # records of namespaces already gone
            if netns.owned(lay, rec["name"]) is None:
                netns.forget(lay, rec["name"])
                if rec.get("role") == "laptop" and not netns.exists(rec["name"]):
                    shutil.rmtree(netns.ETC_NETNS / rec["name"], ignore_errors=True)

        progress("down", "unmounting container and volume mounts", 0.7)
        stuck = self._unmount_all()
        if node_ours:
            netns.delete(lay, node)
        progress("down", "removing cgroups", 0.8)
        self._remove_cgroups()
        self._clean_var_log_containers()

        progress("down", "removing per-boot state", 0.9)
        cri = lay.containerd_root / "io.containerd.grpc.v1.cri"
        per_boot = [lay.etcd_dir, lay.kubelet_dir, lay.pod_logs_dir, lay.cni_data_dir, lay.pid_dir,
                    lay.containerd_state, lay.run / "runc", cri / "sandboxes", cri / "containers"]
        if stuck:  # never delete below a mount point that is still there
            per_boot = [d for d in per_boot if not any(m.startswith(str(d) + "/") for m in stuck)]
        for d in per_boot:
            shutil.rmtree(d, ignore_errors=True)
        self._sysctl_file().unlink(missing_ok=True)
        if stuck:
            raise DevClusterError(
                "could not unmount " + ", ".join(stuck[:5]) + (" …" if len(stuck) > 5 else ""),
                "a process outside the dev cluster may still use them",
                "find it with `fuser -vm PATH`, stop it, then run `tpnb devcluster down` again")
        if purge:
            shutil.rmtree(lay.state, ignore_errors=True)
            shutil.rmtree(lay.run, ignore_errors=True)

    def _sweep_pids(self, dry_run: bool = False, only: list[Node] | None = None) -> list[int]:
        """Processes that are ours: in our namespaces, our cgroups, or our binaries.

        `only`: just those of these added nodes (their netns, their pods'
        netns, their cgroup roots), for removing one node of a running cluster.
        """
        names: list[str] = []
        if only is None:
            if self._node_netns_ours():
                names.append(self.cfg.node_netns)
                names += [n for n in netns.peer_namespaces(self.cfg.node_netns) if n.startswith("cni-")]
            names += [lap.netns for lap in netns.laptops(self.layout)]
        for node in self.extra_nodes() if only is None else only:
            if netns.owned(self.layout, node.netns) is not None:
                names.append(node.netns)
                names += [n for n in netns.peer_namespaces(node.netns) if n.startswith("cni-")]
        inodes = netns.netns_inodes(names)
        roots = self._cgroup_roots() if only is None else [n.cgroup_root for n in only]
        skip = _ancestors()
        bin_root = str(self.layout.state / "bin") + "/" if only is None else None
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid in skip:
                continue
            try:
                if inodes and os.stat(f"/proc/{pid}/ns/net").st_ino in inodes:
                    out.append(pid)
                    continue
                cg = Path(f"/proc/{pid}/cgroup").read_text()
                paths = [line.split(":", 2)[-1] for line in cg.splitlines()]
                if any(p == root or p.startswith(root + "/") for p in paths for root in roots):
                    out.append(pid)
                    continue
                if bin_root and os.readlink(f"/proc/{pid}/exe").startswith(bin_root):
                    out.append(pid)
            except OSError:
                continue
        return out

    def _remove_stale_shim_sockets(self, layout: Layout | None = None) -> None:
        """containerd 1.6 puts shim sockets in /run/containerd/s/<sha256(addr/ns/id)>;
        a killed shim leaves its socket behind, so remove ours (of one node's containerd)."""
        lay = layout or self.layout
        task_dir = lay.containerd_state / "io.containerd.runtime.v2.task"
        sdir = Path("/run/containerd/s")
        if not task_dir.is_dir() or not sdir.is_dir():
            return
        addr = str(lay.containerd_sock)
        for ns_dir in task_dir.iterdir():
            for cdir in ns_dir.iterdir() if ns_dir.is_dir() else []:
                h = hashlib.sha256(os.path.join(addr, ns_dir.name, cdir.name).encode()).hexdigest()
                (sdir / h).unlink(missing_ok=True)

    def _unmount_all(self, layout: Layout | None = None) -> list[str]:
        """Unmount everything under the state and run dirs (of the cluster, or
        of one added node's layout), deepest first; returns what could not be unmounted."""
        lay = layout or self.layout
        prefixes = (str(lay.state) + "/", str(lay.run) + "/")
        for _ in range(5):
            mps = [mp for mp, _ in _mountpoints() if mp.startswith(prefixes)]
            if not mps:
                return []
            for mp in sorted(set(mps), key=lambda m: -m.count("/")):
                if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
                    subprocess.run(["umount", "-l", mp], capture_output=True)
        return sorted({mp for mp, _ in _mountpoints() if mp.startswith(prefixes)})

    def _clean_var_log_containers(self, layout: Layout | None = None) -> None:
        """Remove kubelet's /var/log/containers links into our pod logs (every
        node's pod-logs dir is under the state dir, or under one node's)."""
        target = str((layout or self.layout).state) + "/"
        if VAR_LOG_CONTAINERS.is_dir():
            for link in VAR_LOG_CONTAINERS.iterdir():
                try:
                    if link.is_symlink() and os.readlink(link).startswith(target):
                        link.unlink()
                except OSError:
                    pass
        marker = self.layout.run / "created-var-log-containers"
        if layout is None and marker.exists():
            try:
                VAR_LOG_CONTAINERS.rmdir()
            except OSError:
                pass
            marker.unlink(missing_ok=True)


def _signal_and_wait(pids: list[int], timeout: float, sig: int = signal.SIGTERM) -> None:
    """Send `sig`, wait up to `timeout`, then SIGKILL whatever is left."""
    starts = {p: start_ticks(p) for p in pids}
    pids = [p for p in pids if starts[p] is not None]  # gone already (and the pid may be reused)
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p, starts[p]) for p in pids):
            return
        time.sleep(0.1)
    for p in pids:
        if _alive(p, starts[p]):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    end = time.monotonic() + 5
    while time.monotonic() < end and any(_alive(p, starts[p]) for p in pids):
        time.sleep(0.1)


_digests: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    """sha256 of an image tar, remembered per (path, mtime, size): every node's
    import check asks for the same tars, and hashing them again costs seconds."""
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key in _digests:
        return _digests[key]
    _digests[key] = _file_digest_uncached(path, st)
    return _digests[key]


def _file_digest_uncached(path: Path, st: os.stat_result) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}:{st.st_size}"


def _imported_name(out: str) -> str:
    """The image name `ctr images import` reports ("unpacking NAME (sha256:...)")."""
    for line in out.splitlines():
        if line.startswith("unpacking "):
            return line.split()[1]
    return ""
