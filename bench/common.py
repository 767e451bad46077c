"""Shared plumbing of the benchmark scripts: run commands, set up a laptop, print tables."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

COLUMNS = ["down_MBps", "up_MBps", "small_p50_us", "small_p99_us", "conn_p50_us", "conn_p99_us"]


def sh(argv: list[str], timeout: float = 900, check: bool = True, input: str | None = None) -> str:
    """Run a command; on failure stop the benchmark with its output (a benchmark has no retries)."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise SystemExit(f"{argv} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def laptop(name: str) -> tuple[Any, Callable[..., str], Callable[..., str]]:
    """The running dev cluster, plus `lap(argv)` and `kubectl(*args)` run inside laptop `name`."""
    from tpnb_devcluster.cluster import DevCluster

    dc = DevCluster()
    dc.up()
    dc.ensure_laptop(name)

    def lap(argv: list[str], **kw: Any) -> str:
        return sh(dc.laptop_cmd(name, argv), **kw)

    def kubectl(*args: str, **kw: Any) -> str:
        return lap(["kubectl", *args], **kw)

    return dc, lap, kubectl


def print_table(first_col: str, results: dict[str, dict[str, Any]]) -> None:
    print(f"\n| {first_col} | {' | '.join(COLUMNS)} |")
    print("|---|" + "---|" * len(COLUMNS))
    for path, r in results.items():
        print(f"| {path} | " + " | ".join(str(r[c]) for c in COLUMNS) + " |")


def fresh_namespace(lap: Callable[..., str], kubectl: Callable[..., str], ns: str) -> None:
    """No session in the laptop, and namespace `ns` new, holding the netbench programs as a ConfigMap."""
    lap(["tpnb", "quit", "--daemon"], check=False)
    kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=true", timeout=180)
    kubectl("create", "ns", ns)
    kubectl("-n", ns, "create", "configmap", "netbench",
            f"--from-file=server.py={REPO / 'bench' / 'netbench_server.py'}",
            f"--from-file=client.py={REPO / 'bench' / 'netbench_client.py'}")


# ------------------------------------------------------------------ workloads and laptop processes
#: the netbench programs' ConfigMap (made by fresh_namespace), as a volume and its mount
NETBENCH_VOLUME = {"name": "src", "configMap": {"name": "netbench"}}
NETBENCH_MOUNT = {"name": "src", "mountPath": "/srv"}


def deployment(name: str, image: str, command: list[str] | None = None, port: int | None = None,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """A one-container Deployment labelled app=NAME, with the netbench programs under /srv."""
    c: dict[str, Any] = {"name": name, "image": image, "volumeMounts": [NETBENCH_MOUNT]}
    if command:
        c["command"] = command
    if port:
        c["ports"] = [{"containerPort": port}]
    if env:
        c["env"] = [{"name": k, "value": v} for k, v in env.items()]
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": {"app": name}}, "template": {
                "metadata": {"labels": {"app": name}}, "spec": {"containers": [c], "volumes": [NETBENCH_VOLUME]}}}}


def service(name: str, port: int, target_port: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"port": port, "targetPort": target_port}]}}


def apply_and_wait(kubectl: Callable[..., str], ns: str, items: list[dict[str, Any]]) -> None:
    """Apply the objects and wait until every Deployment among them has rolled out."""
    kubectl("-n", ns, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    for it in items:
        if it["kind"] == "Deployment":
            kubectl("-n", ns, "rollout", "status", f"deploy/{it['metadata']['name']}", "--timeout=180s", timeout=240)


#: the port bench/netbench_server.py listens on in its pod (and its Service's port)
NETBENCH_PORT = 7070


def netbench_server(kubectl: Callable[..., str], ns: str, with_service: bool = True) -> str:
    """Deployment `netbench` (bench/netbench_server.py from fresh_namespace's ConfigMap, run by the
    python3 of the manager's image: no image to build) on NETBENCH_PORT, and Service `netbench` in
    front of it unless `with_service` is false; rolled out.  Returns the pod's name: the benches that
    measure against the pod all set it up the same way."""
    from tpnb import config as tpnb_config

    items = [deployment("netbench", tpnb_config.get().manager_image, ["python3", "/srv/server.py"], NETBENCH_PORT)]
    if with_service:
        items.append(service("netbench", NETBENCH_PORT, NETBENCH_PORT))
    apply_and_wait(kubectl, ns, items)
    return kubectl("-n", ns, "get", "pod", "-l", "app=netbench", "-o", "jsonpath={.items[0].metadata.name}")


def laptop_process(dc: Any, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start argv in laptop `name` as its own process group (stop it with stop_process)."""
    return subprocess.Popen(dc.laptop_cmd(name, argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """End a process started by laptop_process, and its group, by its pid."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


# ------------------------------------------------------------------ CPU accounting
_HZ = os.sysconf("SC_CLK_TCK")
#: processes worth naming in a CPU table; anything else is summed as "other"
_NAMED = ("kube-apiserver", "kubelet", "containerd", "kubectl", "etcd", "kube-proxy", "coredns")


def _label(pid: str, comm: str) -> str:
    if comm.startswith("python"):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return "other"
        if "tpnb.daemon" in cmd:
            return "tpnb daemon"
        if "tpnb.connector" in cmd:
            return "tpnb connector"
        if "tpnb.cluster" in cmd and "manager" in cmd:
            return "traffic-manager"
        if "tpnb.cluster" in cmd and "agent" in cmd:
            return "traffic-agent"
        if "client.py" in cmd:
            return "netbench client"
        if "server.py" in cmd:
            return "netbench server"
        if "relay_only.py" in cmd:
            return "tpnb bench relay"
        return "other"
    return comm if comm in _NAMED else "other"


def proc_cpu() -> dict[str, tuple[str, float]]:
    """CPU seconds (user + system) so far of every process on the machine, by pid."""
    out: dict[str, tuple[str, float]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[pid] = (_label(pid, comm), (int(fields[11]) + int(fields[12])) / _HZ)
    return out


def cpu_delta(before: dict[str, tuple[str, float]], after: dict[str, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two `proc_cpu` snapshots, by process label (short-lived
    processes that came and went in between are not seen)."""
    total: dict[str, float] = {}
    for pid, (label, sec) in after.items():
        spent = sec - before[pid][1] if pid in before else sec
        if spent > 0:
            total[label] = total.get(label, 0.0) + spent
    return total


@contextlib.contextmanager
def counting_cpu(into: dict[str, float]) -> Iterator[None]:
    """Add the CPU seconds every process spent during the block to `into`, by process label."""
    before = proc_cpu()
    yield
    for label, sec in cpu_delta(before, proc_cpu()).items():
        into[label] = into.get(label, 0.0) + sec


def print_cpu_per_gb(cpu: dict[str, dict[str, float]], gb: float, note: str = "",
                     hide: tuple[str, ...] = (), total: bool = False) -> None:
    """The table of CPU core-seconds per GB moved, a column per path (`cpu`: path -> label ->
    seconds), processes by their largest figure, "other" last; `hide`: labels not shown."""
    names = sorted({p for c in cpu.values() for p in c if p != "other" and p not in hide},
                   key=lambda p: -max(c.get(p, 0.0) for c in cpu.values()))
    print(f"\nCPU core-seconds per GB moved during the bulk rounds{note}:")
    print("| process | " + " | ".join(cpu) + " |\n|---|" + "---|" * len(cpu))
    for p in names + ["other"]:
        print(f"| {p} | " + " | ".join(f"{c.get(p, 0.0) / gb:.2f}" for c in cpu.values()) + " |")
    if total:
        print("| total | " + " | ".join(f"{sum(c.values()) / gb:.2f}" for c in cpu.values()) + " |")
