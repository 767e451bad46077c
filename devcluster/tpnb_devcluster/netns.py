"""Network namespaces of the dev cluster: the node and its laptops.

Why namespaces: a "machine" that is really a netns gives the real network
picture (a laptop reaches the API server but not pods or services) without
touching the host's interfaces, routes, iptables or resolv.conf.  Every
change here is made inside a namespace we created; nothing is added to the
host namespace (veths are created inside the node netns and one end is moved
straight into the laptop netns).

Ownership: a namespace is ours when a record under the run dir holds its
inode, so a leftover or foreign namespace with the same name is detected
instead of being silently reused or deleted.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tpnb.errors import DevClusterError, PrerequisiteError

from .config import DevClusterConfig
from .manifests import (LAN_BRIDGE, MAX_NODES, NODE_LINK_ALIAS, NODE_LINK_BRIDGE, Addresses, Layout, Node,
                        laptop_ip)

#: the node's address on lan0 (locally administered, so it clashes with no real NIC)
LAN_MAC = "02:74:70:6e:62:01"

NETNS_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")
LAPTOP_PREFIX = "tpnb-"
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,9}[a-z0-9])?$")
#: the alias on lan0 that marks the node netns as ours (visible in `ip link`)
LAN_ALIAS = "tpnb-devcluster-lan"


def run(argv: list[str], *, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a setup command; a failure becomes a DevClusterError naming it."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, input=input)
    except FileNotFoundError:
        raise PrerequisiteError(f"{argv[0]} is not installed", hint=INSTALL_HINT) from None
    if check and res.returncode != 0:
        raise DevClusterError(f"`{' '.join(argv)}` failed", (res.stderr or res.stdout).strip())
    return res


INSTALL_HINT = "run scripts/install-deps (or: apt-get install -y iproute2 iptables util-linux)"


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def exists(name: str) -> bool:
    return netns_path(name).exists()


def mounted(name: str) -> bool:
    """True when /run/netns/<name> is a live namespace (an nsfs mount), not
    a stale file left by a reboot or a crashed `ip netns add`."""
    target = str(netns_path(name))
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            if left.split()[4] == target and right.startswith("nsfs"):
                return True
    except OSError:
        pass
    return False


def inode(name: str) -> int | None:
    try:
        return os.stat(netns_path(name)).st_ino
    except OSError:
        return None


def nsenter(name: str, argv: list[str]) -> list[str]:
    """Prefix to run argv in netns `name`, keeping the host's mount namespace.

    Cluster daemons must share the host mount namespace: kubelet mounts pod
    volumes that containerd's runc must see.  `ip netns exec` would give each
    its own mount namespace, so the node uses nsenter --net instead.
    """
    return ["nsenter", f"--net={netns_path(name)}", "--", *argv]


def in_ns(name: str, argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(nsenter(name, argv), check=check)


# ------------------------------------------------------------------ ownership records
def _owner_file(layout: Layout, name: str) -> Path:
    return layout.run / "netns" / f"{name}.json"


def record(layout: Layout, name: str, **extra: object) -> None:
    path = _owner_file(layout, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": name, "inode": inode(name), **extra}))


def owned(layout: Layout, name: str) -> dict | None:
    """Our record of netns `name` if it exists and is the one we made."""
    try:
        rec = json.loads(_owner_file(layout, name).read_text())
    except (OSError, ValueError):
        return None
    ino = inode(name)
    if ino is None or rec.get("inode") != ino or not mounted(name):
        return None
    return rec


def foreign(layout: Layout, name: str) -> bool:
    """A live namespace of this name exists and we did not make it."""
    return mounted(name) and owned(layout, name) is None


def forget(layout: Layout, name: str) -> None:
    _owner_file(layout, name).unlink(missing_ok=True)


def recorded(layout: Layout) -> list[dict]:
    """Every netns record, whether or not the namespace still exists."""
    out = []
    d = layout.run / "netns"
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return out


def create(layout: Layout, name: str, **extra: object) -> None:
    """Create netns `name`; error if it exists and is not ours."""
    if exists(name) and not mounted(name):
        netns_path(name).unlink(missing_ok=True)  # stale file (e.g. after a reboot)
    if exists(name):
        if owned(layout, name) is None:
            raise DevClusterError(
                f"network namespace {name} already exists and was not made by tpnb devcluster",
                "tpnb will not reuse or delete a namespace it did not create",
                f"delete it (`ip netns del {name}`) if it is a leftover, or choose another name "
                "in the devcluster config",
            )
        return
    run(["ip", "netns", "add", name])
    record(layout, name, **extra)
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def delete(layout: Layout, name: str) -> None:
    if exists(name):
        run(["ip", "netns", "del", name], check=False)
        if netns_path(name).exists():  # still mounted somewhere: lazily detach
            subprocess.run(["umount", "-l", str(netns_path(name))], capture_output=True)
            netns_path(name).unlink(missing_ok=True)
    forget(layout, name)
    etc = ETC_NETNS / name
    if etc.is_dir():
        shutil.rmtree(etc, ignore_errors=True)


def sysctl(name: str, key: str, value: str) -> None:
    """Set a per-netns sysctl (net.*) inside `name`."""
    path = "/proc/sys/" + key.replace(".", "/")
    in_ns(name, ["sh", "-c", f"echo {value} > {path}"])


# ------------------------------------------------------------------ the node
def node_rules(cfg: DevClusterConfig) -> list[list[str]]:
    """iptables rules (in the node netns) that fence the LAN off.

    From lan0 only the API server port is accepted; everything else is
    rejected at once (so a laptop's DNS lookup to the node fails immediately
    instead of timing out), and nothing is ever forwarded from or to the LAN,
    even if a laptop adds a route to pods or services.  The forward block is
    in the mangle table so kube-proxy's filter-table chains (which it
    prepends) cannot get ahead of it.
    """
    br = LAN_BRIDGE
    return [
        ["-t", "filter", "-N", "TPNB-LAN-IN"],
        ["-t", "filter", "-A", "TPNB-LAN-IN", "-p", "tcp", "--dport", str(cfg.api_port), "-j", "ACCEPT"],
        ["-t", "filter", "-A", "TPNB-LAN-IN", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
         "-j", "ACCEPT"],
        ["-t", "filter", "-A", "TPNB-LAN-IN", "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
        ["-t", "filter", "-A", "TPNB-LAN-IN", "-j", "REJECT", "--reject-with", "icmp-port-unreachable"],
        ["-t", "filter", "-I", "INPUT", "1", "-i", br, "-j", "TPNB-LAN-IN"],
        ["-t", "mangle", "-N", "TPNB-LAN-FWD"],
        ["-t", "mangle", "-A", "TPNB-LAN-FWD", "-i", br, "-j", "DROP"],
        ["-t", "mangle", "-A", "TPNB-LAN-FWD", "-o", br, "-j", "DROP"],
        ["-t", "mangle", "-I", "FORWARD", "1", "-j", "TPNB-LAN-FWD"],
    ]


def pin_lan_mac(node_ns: str) -> None:
    """Give lan0 a fixed MAC address.

    A bridge without a MAC of its own borrows its lowest port's, so adding a
    laptop could change the node's MAC under every other laptop's ARP cache:
    their API calls then time out for a while.  A fixed address never moves.
    """
    if LAN_MAC not in in_ns(node_ns, ["ip", "link", "show", LAN_BRIDGE]).stdout:
        in_ns(node_ns, ["ip", "link", "set", LAN_BRIDGE, "address", LAN_MAC])


def setup_node(cfg: DevClusterConfig, layout: Layout) -> None:
    """The node netns with lan0 at the LAN's first address and its fence."""
    name = cfg.node_netns
    fresh = not exists(name)
    create(layout, name, role="node")
    addrs = Addresses.from_config(cfg)
    links = in_ns(name, ["ip", "-o", "link", "show"]).stdout
    lan = [ln for ln in links.splitlines() if f" {LAN_BRIDGE}:" in ln]
    if lan and LAN_ALIAS not in in_ns(name, ["ip", "-d", "link", "show", LAN_BRIDGE]).stdout:
        raise DevClusterError(
            f"{LAN_BRIDGE} in network namespace {name} was not made by tpnb devcluster",
            hint="run `tpnb devcluster down`, or delete the namespace by hand")
    if not lan:
        in_ns(name, ["ip", "link", "add", LAN_BRIDGE, "type", "bridge"])
        in_ns(name, ["ip", "link", "set", LAN_BRIDGE, "alias", LAN_ALIAS])
    pin_lan_mac(name)
    cidr = f"{addrs.node_ip}/{addrs.lan_prefix}"
    if cidr not in in_ns(name, ["ip", "-o", "addr", "show", "dev", LAN_BRIDGE]).stdout:
        in_ns(name, ["ip", "addr", "add", cidr, "dev", LAN_BRIDGE])
    in_ns(name, ["ip", "link", "set", LAN_BRIDGE, "up"])
    # pods reach services through the node: it must route between cni0 ports
    sysctl(name, "net.ipv4.ip_forward", "1")
    # keep bridged frames (laptop <-> laptop on lan0, pod <-> pod on cni0)
    # out of iptables; kube-proxy masquerades service traffic instead
    if os.path.exists("/proc/sys/net/bridge"):
        sysctl(name, "net.bridge.bridge-nf-call-iptables", "0")
    if fresh or in_ns(name, ["iptables", "-t", "filter", "-S", "TPNB-LAN-IN"], check=False).returncode != 0:
        for rule in node_rules(cfg):
            in_ns(name, ["iptables", "-w", *rule])


# ------------------------------------------------------------------ more nodes
#: role of an added node's netns record (the first node's is "node")
ADDED_NODE = "added-node"


def setup_node_link(cfg: DevClusterConfig, first: Node) -> None:
    """Bridge nodes0 in node 1's netns, at node 1's address on the node link.

    The nodes reach each other over it and only over it: it is not lan0 (so
    the laptops' fence stays as it is) and it has no port on the host.
    """
    name = first.netns
    prefix = ipaddress.ip_network(cfg.node_link_cidr).prefixlen
    shown = in_ns(name, ["ip", "-d", "link", "show", NODE_LINK_BRIDGE], check=False)
    if shown.returncode == 0 and NODE_LINK_ALIAS not in shown.stdout:
        raise DevClusterError(f"{NODE_LINK_BRIDGE} in network namespace {name} was not made by tpnb devcluster",
                              hint="run `tpnb devcluster down`, or delete the namespace by hand")
    if shown.returncode != 0:
        in_ns(name, ["ip", "link", "add", NODE_LINK_BRIDGE, "type", "bridge"])
        in_ns(name, ["ip", "link", "set", NODE_LINK_BRIDGE, "alias", NODE_LINK_ALIAS])
    cidr = f"{first.link_ip}/{prefix}"
    if cidr not in in_ns(name, ["ip", "-o", "addr", "show", "dev", NODE_LINK_BRIDGE]).stdout:
        in_ns(name, ["ip", "addr", "add", cidr, "dev", NODE_LINK_BRIDGE])
    in_ns(name, ["ip", "link", "set", NODE_LINK_BRIDGE, "up"])


def setup_extra_node(cfg: DevClusterConfig, layout: Layout, node: Node, first: Node) -> None:
    """Netns of node i > 1: eth0 on node 1's nodes0 bridge, nothing else.

    Like node 1 it forwards between its pods' bridge and its link, keeps
    bridged pod frames out of iptables, and has no default route: its only
    routes (set by `sync_node_routes`) lead to the other nodes' pod subnets
    and to the API server.
    """
    create(layout, node.netns, role=ADDED_NODE, node=node.name, index=node.index)
    prefix = ipaddress.ip_network(cfg.node_link_cidr).prefixlen
    if "eth0" not in run(["ip", "-n", node.netns, "-o", "link", "show"]).stdout:
        run(["ip", "-n", first.netns, "link", "del", node.link_veth], check=False)  # a stale end
        run(["ip", "-n", first.netns, "link", "add", node.link_veth, "type", "veth",
             "peer", "name", "eth0", "netns", node.netns])
        run(["ip", "-n", first.netns, "link", "set", node.link_veth, "master", NODE_LINK_BRIDGE])
        run(["ip", "-n", first.netns, "link", "set", node.link_veth, "up"])
    if f"{node.link_ip}/{prefix}" not in run(["ip", "-n", node.netns, "-o", "addr", "show", "dev", "eth0"]).stdout:
        run(["ip", "-n", node.netns, "addr", "add", f"{node.link_ip}/{prefix}", "dev", "eth0"])
        subprocess.run(["ip", "-n", first.netns, "neigh", "flush", "to", node.link_ip],
                       capture_output=True, check=False)
    run(["ip", "-n", node.netns, "link", "set", "eth0", "up"])
    sysctl(node.netns, "net.ipv4.ip_forward", "1")
    if os.path.exists("/proc/sys/net/bridge"):
        sysctl(node.netns, "net.bridge.bridge-nf-call-iptables", "0")


def node_routes(cfg: DevClusterConfig, nodes: list[Node]) -> dict[str, list[list[str]]]:
    """`ip route replace` arguments per node netns: every other node's pod
    subnet via that node's link address, and (nodes > 1) the API server via node 1."""
    first = nodes[0]
    api = Addresses.from_config(cfg).node_ip
    out: dict[str, list[list[str]]] = {}
    for n in nodes:
        routes = [[m.pod_cidr, "via", m.link_ip] for m in nodes if m.index != n.index]
        if n.index != 1:
            routes.append([f"{api}/32", "via", first.link_ip])
        out[n.netns] = routes
    return out


def sync_node_routes(cfg: DevClusterConfig, nodes: list[Node]) -> None:
    for ns, routes in node_routes(cfg, nodes).items():
        for r in routes:
            in_ns(ns, ["ip", "route", "replace", *r])


def remove_extra_node(cfg: DevClusterConfig, layout: Layout, node: Node) -> None:
    """Delete node i's netns and its link veth; node 1's route to its pods goes with the veth."""
    if exists(cfg.node_netns):
        run(["ip", "-n", cfg.node_netns, "link", "del", node.link_veth], check=False)
        in_ns(cfg.node_netns, ["ip", "route", "del", node.pod_cidr], check=False)
    if owned(layout, node.netns) is not None or not exists(node.netns):
        delete(layout, node.netns)


def extra_node_records(layout: Layout) -> list[dict]:
    """Records of added nodes, lowest index first, whether or not they still run."""
    return sorted((r for r in recorded(layout) if r.get("role") == ADDED_NODE), key=lambda r: r.get("index", 0))


# ------------------------------------------------------------------ laptops
def laptop_netns(name: str) -> str:
    return f"{LAPTOP_PREFIX}{name}"


def check_laptop_name(cfg: DevClusterConfig, name: str) -> None:
    from tpnb.errors import ConfigError

    node_names = {cfg.node_netns, *(f"{cfg.node_netns}{i}" for i in range(2, MAX_NODES + 1))}
    if not _NAME_RE.match(name) or laptop_netns(name) in node_names:
        raise ConfigError(
            f"invalid laptop name {name!r}",
            "a laptop name is 1-11 lowercase letters, digits or dashes, and not a node's",
            "e.g. --name laptop2",
        )


@dataclass(frozen=True)
class Laptop:
    name: str
    netns: str
    index: int
    ip: str
    veth: str


def laptops(layout: Layout) -> list[Laptop]:
    out = []
    for rec in recorded(layout):
        if rec.get("role") == "laptop" and owned(layout, rec["name"]) is not None:
            out.append(Laptop(rec["laptop"], rec["name"], rec["index"], rec["ip"], rec["veth"]))
    return out


def _free_index(layout: Layout) -> int:
    used = {rec.get("index") for rec in recorded(layout) if rec.get("role") == "laptop"
            and exists(rec["name"])}
    i = 0
    while i in used:
        i += 1
    return i


def ensure_laptop(cfg: DevClusterConfig, layout: Layout, name: str) -> Laptop:
    """Create (or repair) laptop `name`: eth0 on the LAN, no default route."""
    check_laptop_name(cfg, name)
    ns = laptop_netns(name)
    if not exists(cfg.node_netns) or owned(layout, cfg.node_netns) is None:
        raise DevClusterError("the dev cluster is not up", hint="run `tpnb devcluster up` first")
    rec = owned(layout, ns)
    if rec is None:
        index = _free_index(layout)
        try:
            ip = laptop_ip(cfg, index)
        except ValueError as exc:
            raise DevClusterError("no address left for another laptop", str(exc),
                                  "remove a laptop with `tpnb devcluster down` or use a bigger lan_cidr")
        create(layout, ns, role="laptop", laptop=name, index=index, ip=ip, veth=f"lap{index}")
        rec = owned(layout, ns)
        assert rec is not None
    lap = Laptop(name, ns, rec["index"], rec["ip"], rec["veth"])
    prefix = ipaddress.ip_network(cfg.lan_cidr).prefixlen
    if "eth0" not in run(["ip", "-n", ns, "-o", "link", "show"]).stdout:
        # a stale node end (from an earlier laptop of this index) would block the name
        run(["ip", "-n", cfg.node_netns, "link", "del", lap.veth], check=False)
        run(["ip", "-n", cfg.node_netns, "link", "add", lap.veth, "type", "veth",
             "peer", "name", "eth0", "netns", ns])
        pin_lan_mac(cfg.node_netns)  # before the new port joins (clusters booted before the pin)
        run(["ip", "-n", cfg.node_netns, "link", "set", lap.veth, "master", LAN_BRIDGE])
        run(["ip", "-n", cfg.node_netns, "link", "set", lap.veth, "up"])
    if f"{lap.ip}/{prefix}" not in run(["ip", "-n", ns, "-o", "addr", "show", "dev", "eth0"]).stdout:
        run(["ip", "-n", ns, "addr", "add", f"{lap.ip}/{prefix}", "dev", "eth0"])
        # An earlier laptop may have had this address with another MAC: the node
        # would keep answering that stale MAC for seconds (API calls time out).
        subprocess.run(["ip", "-n", cfg.node_netns, "neigh", "flush", "to", lap.ip],
                       capture_output=True, check=False)
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    etc = ETC_NETNS / ns
    etc.mkdir(parents=True, exist_ok=True)
    addrs = Addresses.from_config(cfg)
    # `ip netns exec` bind-mounts this over /etc/resolv.conf.  Nothing
    # answers DNS on the node's LAN address (the node rejects it), so a
    # lookup inside a bare laptop fails at once, as on a disconnected laptop.
    # Written once: a connected tpnb daemon rewrites it in place, and a later
    # `laptop` call must not undo that.
    resolv = etc / "resolv.conf"
    if not resolv.exists():
        resolv.write_text(
            f"# tpnb devcluster laptop {name}: no DNS until tpnb connects\nnameserver {addrs.node_ip}\n"
            "options timeout:1 attempts:1\n")
    return lap


def remove_laptop(cfg: DevClusterConfig, layout: Layout, name: str) -> None:
    ns = laptop_netns(name)
    rec = owned(layout, ns)
    if rec is None:
        if exists(ns):
            raise DevClusterError(f"network namespace {ns} was not made by tpnb devcluster",
                                  hint=f"delete it yourself with `ip netns del {ns}`")
        forget(layout, ns)
        return
    if exists(cfg.node_netns):
        run(["ip", "-n", cfg.node_netns, "link", "del", rec["veth"]], check=False)
    delete(layout, ns)


# ------------------------------------------------------------------ peers of the node
def peer_namespaces(node: str) -> list[str]:
    """Named namespaces that the node netns has veth peers in (pods, laptops).

    Pod namespaces are made by containerd under /run/netns/cni-*; the node
    netns knows the ones its veths lead to, which tells ours apart from any
    other container runtime's on the same host.
    """
    if not exists(node):
        return []
    res = run(["ip", "-n", node, "netns", "list-id"], check=False)
    names = []
    for line in res.stdout.splitlines():
        m = re.search(r"iproute2 netns name: (\S+?)\)?$", line)
        if m:
            names.append(m.group(1))
    return names


def netns_inodes(names: list[str]) -> set[int]:
    out = set()
    for n in names:
        ino = inode(n)
        if ino is not None:
            out.add(ino)
    return out
