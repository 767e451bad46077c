"""The direct data plane against `kubectl port-forward` (issue 15).  Not a test: it prints numbers.

    sudo .venv/bin/python bench/direct.py [--latency-rounds 5] [--size-mb 16] [--bulk-rounds 3]

In one laptop, against one netbench pod (bench/netbench_server.py), each
round runs bench/netbench_client.py's latency mode (1,000 small request /
response round trips on one connection, then 200 new connections, each
connect + one request) through
  * `kubectl port-forward` to the pod,
  * tpnb's direct plane (`bench/relay_only.py --direct`: `DirectPlane.dial`
    of the Service's ClusterIP and `DirectConn.relay`, all connections on
    one SPDY session to the pod),
  * tpnb's old per-connection relay (`bench/relay_only.py`: one SPDY
    connection, i.e. a TLS handshake and an upgrade, per connection);
the order rotates round by round so a noisy moment hits every path; figures
are medians of the rounds, ratios medians of the per-round ratios.  Then
bulk down/up alternating the same way, with the CPU each process spent per
GB moved.  All traffic stays inside the dev cluster's namespaces here.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess

from common import (REPO, counting_cpu, fresh_namespace, laptop, netbench_server,  # noqa: E402
                    print_cpu_per_gb)  # (bench/common.py)

NS = "bench-direct"
LAPTOP = "bench"
LATENCY = ("small_p50_us", "small_p99_us", "conn_p50_us", "conn_p99_us")
KUBECTL, DIRECT, RELAY = "kubectl port-forward", "tpnb direct plane", "tpnb relay, SPDY conn per connection"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency-rounds", type=int, default=5)
    ap.add_argument("--size-mb", type=int, default=16)
    ap.add_argument("--bulk-rounds", type=int, default=3, help="0: no bulk transfers")
    args = ap.parse_args()
    size = args.size_mb * 1024 * 1024

    dc, lap, kubectl = laptop(LAPTOP)
    fresh_namespace(lap, kubectl, NS)
    pod = netbench_server(kubectl, NS)
    cluster_ip = kubectl("-n", NS, "get", "svc", "netbench", "-o", "jsonpath={.spec.clusterIP}")
    client = str(REPO / "bench" / "netbench_client.py")
    relay_only = str(REPO / "bench" / "relay_only.py")
    print(f"load average before: {os.getloadavg()[0]:.1f}; pod {pod}, Service {cluster_ip}:7070", flush=True)

    procs: list[subprocess.Popen[str]] = []
    direct_err = ""
    try:
        procs.append(subprocess.Popen(dc.laptop_cmd(LAPTOP, ["kubectl", "-n", NS, "port-forward", f"pod/{pod}",
                                                             "17070:7070"]),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True))
        for argv in (["--direct", NS, cluster_ip, "7070", "17072"], [NS, pod, "7070", "17071"]):
            p = subprocess.Popen(dc.laptop_cmd(LAPTOP, ["python3", relay_only, *argv]),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise SystemExit(f"bench/relay_only.py {argv} did not start: {p.stderr.read() if p.stderr else ''}")
        lap(["bash", "-c", "for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/17070) 2>/dev/null && exit 0; "
                           "sleep 0.1; done; exit 1"])
        paths = {KUBECTL: "17070", DIRECT: "17072", RELAY: "17071"}
        for port in paths.values():  # warm-up: sessions, caches
            lap(["python3", client, "127.0.0.1", port, "1024", "bulk"])
        lat: dict[str, list[dict[str, float]]] = {k: [] for k in paths}
        for r in range(args.latency_rounds):
            labels = list(paths)
            order = labels[r % 3:] + labels[:r % 3]
            for label in order:
                out = lap(["python3", client, "127.0.0.1", paths[label], "0", "latency"])
                lat[label].append(json.loads(out.strip().splitlines()[-1]))
        bulk: dict[str, list[dict[str, float]]] = {k: [] for k in (KUBECTL, DIRECT)}
        cpu: dict[str, dict[str, float]] = {k: {} for k in bulk}
        for r in range(args.bulk_rounds):
            for label in (list(bulk) if r % 2 == 0 else list(reversed(bulk))):
                with counting_cpu(cpu[label]):
                    out = lap(["python3", client, "127.0.0.1", paths[label], str(size), "bulk"])
                bulk[label].append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                _, err = p.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                err = ""
            if "direct plane:" in (err or ""):
                direct_err = [ln for ln in err.splitlines() if ln.startswith("direct plane:")][-1]
        kubectl("delete", "ns", NS, "--wait=false", check=False)

    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(f"\nlatency, {args.latency_rounds} rounds of 1000 small requests + 200 new connections (µs, medians "
          f"of the rounds):\n| path | small p50 | small p99 | new conn p50 | new conn p99 |\n|---|---|---|---|---|")
    for label, rs in lat.items():
        print(f"| {label} | " + " | ".join(str(round(statistics.median(x[k] for x in rs))) for k in LATENCY) + " |")
    print("\nper round (small p50/p99, new connection p50/p99):")
    for label, rs in lat.items():
        print(f"  {label:38s} " + "  ".join("/".join(str(x[k]) for k in LATENCY) for x in rs))
    for label in (DIRECT, RELAY):
        ratios = {k: statistics.median(t[k] / p[k] for t, p in zip(lat[label], lat[KUBECTL])) for k in LATENCY}
        print(f"{label} / kubectl (median of the rounds' ratios): "
              + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if args.bulk_rounds:
        print(f"\nbulk {args.size_mb} MiB each way, {args.bulk_rounds} alternating rounds (MB/s, medians):")
        for label, rs in bulk.items():
            print(f"  {label:22s} down {statistics.median(x['down_MBps'] for x in rs):.0f}  "
                  f"up {statistics.median(x['up_MBps'] for x in rs):.0f}   rounds "
                  + "  ".join(f"{x['down_MBps']:.0f}/{x['up_MBps']:.0f}" for x in rs))
        print_cpu_per_gb(cpu, 2 * size * args.bulk_rounds / 1e9, " ('tpnb bench relay': bench/relay_only.py)")
    if direct_err:
        print(f"\n{direct_err}")


if __name__ == "__main__":
    main()
