"""Benchmark `tpnb connect` on the dev cluster (issue 3).  Not a test: it prints numbers.

    sudo .venv/bin/python bench/connect.py [--size-mb 64]

One run measures, against the same pod:
  * bulk throughput (down/up, median of 3), 1,000 small request/response
    round trips on one connection, and 200 new connections (p50/p99), through
      - `tpnb connect` (TUN -> gRPC over one port-forward -> traffic-manager),
      - `kubectl port-forward` to the pod,
      - directly from the node namespace (no tunnel at all: the ceiling);
  * `tpnb connect` wall time with the manager installed (daemon running /
    daemon stopped) and with a fresh install after `uninstall --everything`.
All traffic stays inside the dev cluster's namespaces on this machine.
"""
from __future__ import annotations

import argparse
import json
import time

from common import REPO, fresh_namespace, laptop, print_table, sh  # noqa: E402  (bench/common.py)

from tpnb import config as tpnb_config  # noqa: E402

NS = "bench"
LAPTOP = "bench"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=64)
    args = ap.parse_args()
    size = args.size_mb * 1024 * 1024

    dc, lap, kubectl = laptop(LAPTOP)
    image = tpnb_config.get().manager_image

    fresh_namespace(lap, kubectl, NS)
    objs = {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "netbench"},
         "spec": {"selector": {"matchLabels": {"app": "netbench"}}, "template": {
             "metadata": {"labels": {"app": "netbench"}},
             "spec": {"containers": [{"name": "srv", "image": image, "command": ["python3", "/srv/server.py"],
                                      "ports": [{"containerPort": 7070}],
                                      "volumeMounts": [{"name": "src", "mountPath": "/srv"}]}],
                      "volumes": [{"name": "src", "configMap": {"name": "netbench"}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "netbench"},
         "spec": {"selector": {"app": "netbench"}, "ports": [{"port": 7070}]}},
    ]}
    kubectl("-n", NS, "apply", "-f", "-", input=json.dumps(objs))
    kubectl("-n", NS, "rollout", "status", "deploy/netbench", "--timeout=120s")
    pod = kubectl("-n", NS, "get", "pod", "-l", "app=netbench", "-o", "jsonpath={.items[0].metadata.name}")
    pod_ip = kubectl("-n", NS, "get", "pod", pod, "-o", "jsonpath={.status.podIP}")
    client = str(REPO / "bench" / "netbench_client.py")
    results: dict[str, dict[str, float]] = {}

    print(f"bulk {args.size_mb} MiB x3 each way, 1000 small requests, 200 new connections; pod {pod_ip}",
          flush=True)
    results["direct (node namespace)"] = json.loads(
        sh(dc.node_exec_cmd(["python3", client, pod_ip, "7070", str(size)])))
    script = (f"kubectl -n {NS} port-forward pod/{pod} 17070:7070 >/dev/null 2>&1 & pf=$!; "
              "for i in $(seq 50); do (echo > /dev/tcp/127.0.0.1/17070) 2>/dev/null && break; sleep 0.1; done; "
              f"python3 {client} 127.0.0.1 17070 {size}; kill $pf")
    results["kubectl port-forward"] = json.loads(lap(["bash", "-c", script]).strip().splitlines()[-1])
    lap(["tpnb", "connect", "--namespace", NS], timeout=300)
    results["tpnb connect"] = json.loads(lap(["python3", client, f"netbench.{NS}", "7070", str(size)]))

    times: dict[str, float] = {}
    for label, pre in (("installed, daemon running", ["tpnb", "quit"]),
                       ("installed, daemon stopped", ["tpnb", "quit", "--daemon"]),
                       ("fresh install", None)):
        if pre is None:
            lap(["tpnb", "quit", "--daemon"], check=False)
            lap(["tpnb", "uninstall", "--everything"], timeout=300)
        else:
            lap(pre, check=False)
        t0 = time.perf_counter()
        lap(["tpnb", "connect", "--namespace", NS], timeout=300)
        times[label] = time.perf_counter() - t0
    lap(["tpnb", "quit", "--daemon"], check=False)
    kubectl("delete", "ns", NS, "--wait=false", check=False)

    print_table("path", results)
    pf, tp = results["kubectl port-forward"], results["tpnb connect"]
    print(f"\ntpnb/port-forward throughput ratio: down {tp['down_MBps'] / pf['down_MBps']:.2f}x, "
          f"up {tp['up_MBps'] / pf['up_MBps']:.2f}x")
    print("\n| tpnb connect | seconds |\n|---|---|")
    for k, v in times.items():
        print(f"| {k} | {v:.2f} |")


if __name__ == "__main__":
    main()
