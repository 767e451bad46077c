"""Benchmark `tpnb connect` on the dev cluster (issue 3).  Not a test: it prints numbers.

    sudo .venv/bin/python bench/connect.py [--size-mb 64] [--rounds 7] [--warmup 1]

One run measures, against the same pod:
  * bulk throughput (down/up), 1,000 small request/response round trips on
    one connection, and 200 new connections (p50/p99), through
      - `tpnb connect` (kernel TCP redirect -> gRPC over one SPDY
        port-forward -> traffic-manager),
      - `kubectl port-forward` to the pod,
      - directly from the node namespace (no tunnel at all: the ceiling);
    after an uncounted warm-up round, the two tunnels' bulk transfers
    alternate, round by round (who goes first alternates too), so a noisy
    moment of the machine hits both; each figure is the median of the
    rounds, and the ratio is the median of the per-round ratios; the CPU
    every process spent per GB moved is summed over the rounds; the
    latency runs alternate the same way (`--latency-rounds`);
  * `tpnb connect` wall time with the manager installed (daemon running /
    daemon stopped) and with a fresh install after `uninstall --everything`.
All traffic stays inside the dev cluster's namespaces on this machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

from common import (REPO, counting_cpu, fresh_namespace, laptop, netbench_server,  # noqa: E402
                    print_cpu_per_gb, print_table, sh)  # (bench/common.py)

NS = "bench"
LATENCY = ("small_p50_us", "small_p99_us", "conn_p50_us", "conn_p99_us")
LAPTOP = "bench"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1, help="uncounted rounds first (windows grow, caches fill)")
    ap.add_argument("--latency-rounds", type=int, default=3,
                    help="alternating rounds of 1000 small requests + 200 new connections per tunnel")
    ap.add_argument("--hops", action="store_true",
                    help="also measure latency through tpnb's port-forward relay alone, straight to the pod "
                         "(bench/relay_only.py): splits tpnb's cost into the relay and the daemon + manager")
    ap.add_argument("--skip-connect-times", action="store_true",
                    help="do not time `tpnb connect` (saves the fresh install at the end)")
    args = ap.parse_args()
    size = args.size_mb * 1024 * 1024

    dc, lap, kubectl = laptop(LAPTOP)

    fresh_namespace(lap, kubectl, NS)
    pod = netbench_server(kubectl, NS)
    pod_ip = kubectl("-n", NS, "get", "pod", pod, "-o", "jsonpath={.status.podIP}")
    client = str(REPO / "bench" / "netbench_client.py")
    results: dict[str, dict[str, float]] = {}

    print(f"bulk {args.size_mb} MiB each way, {args.warmup} warm-up + {args.rounds} alternating rounds; "
          f"1000 small requests, "
          f"200 new connections; pod {pod_ip}", flush=True)
    results["direct (node namespace)"] = json.loads(
        sh(dc.node_exec_cmd(["python3", client, pod_ip, "7070", str(size)])))

    # kubectl port-forward stays up in the laptop while tpnb is connected there too
    relay: subprocess.Popen[str] | None = None
    pf = subprocess.Popen(dc.laptop_cmd(LAPTOP, ["kubectl", "-n", NS, "port-forward", f"pod/{pod}", "17070:7070"]),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lap(["bash", "-c", "for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/17070) 2>/dev/null && exit 0; "
                           "sleep 0.1; done; exit 1"])
        lap(["tpnb", "connect", "--namespace", NS], timeout=300)
        paths = {"kubectl port-forward": ["127.0.0.1", "17070"], "tpnb connect": [f"netbench.{NS}", "7070"]}
        lat_paths = dict(paths)
        if args.hops:
            relay = subprocess.Popen(dc.laptop_cmd(LAPTOP, ["python3", str(REPO / "bench" / "relay_only.py"),
                                                            NS, pod, "7070", "17071"]),
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert relay.stdout is not None
            if relay.stdout.readline().strip() != "ready":
                raise SystemExit("bench/relay_only.py did not start")
            lat_paths["tpnb relay only (no daemon, no manager)"] = ["127.0.0.1", "17071"]
        rounds: dict[str, list[dict[str, float]]] = {k: [] for k in paths}
        cpu: dict[str, dict[str, float]] = {k: {} for k in paths}
        for label in list(paths) * args.warmup:
            lap(["python3", client, *paths[label], str(size), "bulk"])
        for r in range(args.rounds):
            order = list(paths) if r % 2 == 0 else list(reversed(paths))
            for label in order:
                with counting_cpu(cpu[label]):
                    out = lap(["python3", client, *paths[label], str(size), "bulk"])
                rounds[label].append(json.loads(out.strip().splitlines()[-1]))
        # latency alternates round by round too: one noisy moment must not decide a ratio
        lat_rounds: dict[str, list[dict[str, float]]] = {k: [] for k in lat_paths}
        for r in range(args.latency_rounds):
            order = list(lat_paths) if r % 2 == 0 else list(reversed(lat_paths))
            for label in order:
                out = lap(["python3", client, *lat_paths[label], str(size), "latency"])
                lat_rounds[label].append(json.loads(out.strip().splitlines()[-1]))
        for label in lat_paths:
            lat = {k: round(statistics.median(x[k] for x in lat_rounds[label])) for k in LATENCY}
            for k in ("down_MBps", "up_MBps"):
                lat[k] = round(statistics.median(x[k] for x in rounds[label]), 1) if label in rounds else "-"
            results[label] = lat
    finally:
        if relay is not None:
            relay.terminate()
            relay.wait(10)
        pf.terminate()
        pf.wait(10)
    ratios = {k: statistics.median(t[k] / p[k] for t, p in zip(rounds["tpnb connect"], rounds["kubectl port-forward"]))
              for k in ("down_MBps", "up_MBps")}

    lat_ratios = {k: statistics.median(t[k] / p[k] for t, p in zip(lat_rounds["tpnb connect"],
                                                                     lat_rounds["kubectl port-forward"]))
                  for k in LATENCY}

    times: dict[str, float] = {}
    for label, pre in () if args.skip_connect_times else (
            ("installed, daemon running", ["tpnb", "quit"]),
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
    print("\nbulk rounds (MB/s down/up):")
    for label, rs in rounds.items():
        print(f"  {label:22s} " + "  ".join(f"{x['down_MBps']:.0f}/{x['up_MBps']:.0f}" for x in rs))
    print("\nlatency rounds (µs, small p50/p99, new connection p50/p99):")
    for label, rs in lat_rounds.items():
        print(f"  {label:22s} " + "  ".join("/".join(str(x[k]) for k in LATENCY) for x in rs))
    print(f"\ntpnb/port-forward throughput ratio (median of the rounds' ratios): "
          f"down {ratios['down_MBps']:.2f}x, up {ratios['up_MBps']:.2f}x")
    print("tpnb/port-forward latency ratio (median of the rounds' ratios): "
          + ", ".join(f"{k} {v:.2f}x" for k, v in lat_ratios.items()))
    # both tunnels are CPU-bound here: what each process spends per GB moved decides the race
    print_cpu_per_gb(cpu, 2 * size * args.rounds / 1e9, " (the client itself not counted)", total=True)
    print("\n| tpnb connect | seconds |\n|---|---|")
    for k, v in times.items():
        print(f"| {k} | {v:.2f} |")


if __name__ == "__main__":
    main()
