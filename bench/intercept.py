"""Benchmark `tpnb intercept` on the dev cluster (issue 4).  Not a test: it prints numbers.

    sudo .venv/bin/python bench/intercept.py [--size-mb 32]

One run measures:
  * time to create an intercept the first time (agent injection + rollout)
    and again with the agent already present (leave, then intercept);
  * from a client pod inside the cluster: bulk throughput (median of `--rounds` rounds, with
    the CPU every process spent per GB moved in them), 1,000 small
    request/response round trips and 200 new connections to a Service,
      - served by the app in the cluster (no agent), and
      - intercepted, served by the same server program on the laptop: first over the
        agent links as by default (issue 15: an upgrade through the API server's pods/proxy
        to each agent pod), then over agent links on port-forwards (`agent.link: port-forward`,
        the way where pods/proxy is not allowed), then through the traffic-manager
        (`agent.link: never`, the path before issue 15 and the last fallback), in the same run.
A line after each intercepted measurement shows the data path `tpnb status` reported.
All traffic stays inside the dev cluster's network namespaces on this machine.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time

from common import (REPO, apply_and_wait, counting_cpu, deployment, fresh_namespace, laptop,  # noqa: E402
                    laptop_process, print_cpu_per_gb, print_table, service, stop_process)  # (bench/common.py)

from tpnb import config as tpnb_config  # noqa: E402

NS = "benchic"
LAPTOP = "benchic"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="bulk rounds (one transfer each way) per row")
    args = ap.parse_args()
    size = args.size_mb * 1024 * 1024

    dc, lap, kubectl = laptop(LAPTOP)
    image = tpnb_config.get().manager_image

    fresh_namespace(lap, kubectl, NS)
    apply_and_wait(kubectl, NS, [
        deployment("netapp", image, ["python3", "/srv/server.py"], 7070),
        deployment("netclient", image, ["sleep", "infinity"]),
        service("netapp", 7070, 7070),
    ])

    cpu: dict[str, dict[str, float]] = {}

    def client(mode: str) -> dict:
        out = kubectl("-n", NS, "exec", "deploy/netclient", "--", "python3", "/srv/client.py",
                      f"netapp.{NS}", "7070", str(size), mode, timeout=600)
        return json.loads(out.strip().splitlines()[-1])

    def measure(key: str) -> dict:
        """Bulk rounds (CPU of every process counted over them), then the latency rounds."""
        rounds: list[dict] = []
        cpu[key] = {}
        for _ in range(args.rounds):
            with counting_cpu(cpu[key]):
                rounds.append(client("bulk"))
        res = client("latency")
        for k in ("down_MBps", "up_MBps"):
            res[k] = statistics.median(r[k] for r in rounds)
        res["bulk_rounds"] = " ".join(f"{r['down_MBps']:.0f}/{r['up_MBps']:.0f}" for r in rounds)
        return res

    print(f"bulk {args.size_mb} MiB each way x{args.rounds} rounds (medians), 1000 small requests, "
          "200 new connections", flush=True)
    results = {"app in the cluster (no agent)": measure("app in the cluster (no agent)")}

    def data_path() -> str:
        m = re.search(r"^      data path: (.*)$", lap(["tpnb", "status"]), re.M)
        return m.group(1) if m else "(not shown)"

    server = laptop_process(dc, LAPTOP, ["python3", str(REPO / "bench" / "netbench_server.py")])
    paths = {}
    try:
        lap(["tpnb", "connect", "--namespace", NS], timeout=300)
        t0 = time.perf_counter()
        lap(["tpnb", "intercept", "netapp", "--port", "7070", "--mount=false"], timeout=300)
        first = time.perf_counter() - t0
        key = "intercepted, agent link via pods/proxy (default)"
        results[key] = measure(key)
        paths[key] = data_path()
        print(f"data path: {paths[key]}", flush=True)
        again = []
        for _ in range(3):
            lap(["tpnb", "leave", "netapp"])
            t0 = time.perf_counter()
            lap(["tpnb", "intercept", "netapp", "--port", "7070", "--mount=false"], timeout=300)
            again.append(time.perf_counter() - t0)
        lap(["tpnb", "leave", "netapp"])
        # the same with other settings: a connector started with agent.link: port-forward, then never
        for setting, key in (("port-forward", "intercepted, agent link via port-forward (agent.link: port-forward)"),
                             ("never", "intercepted, through the traffic-manager (agent.link: never)")):
            lap(["tpnb", "quit", "--daemon"], check=False)
            lap(["env", f"TPNB_AGENT_LINK={setting}", "tpnb", "connect", "--namespace", NS], timeout=300)
            lap(["tpnb", "intercept", "netapp", "--port", "7070", "--mount=false"], timeout=300)
            results[key] = measure(key)
            paths[key] = data_path()
            print(f"data path: {paths[key]}", flush=True)
            lap(["tpnb", "leave", "netapp"])
    finally:
        stop_process(server)
        lap(["tpnb", "quit", "--daemon"], check=False)
        kubectl("delete", "ns", NS, "--wait=false", check=False)

    print_table("served by", results)
    print("\nbulk rounds (MB/s down/up):")
    for key, r in results.items():
        print(f"  {key}: {r['bulk_rounds']}")
    # the client in its pod is not counted
    print_cpu_per_gb(cpu, 2 * size * args.rounds / 1e9, hide=("netbench client",))
    for key, path in paths.items():
        print(f"\n{key}: data path {path}")
    print("\n| tpnb intercept | seconds |\n|---|---|")
    print(f"| first time (agent injection + rollout) | {first:.2f} |")
    print(f"| again, agent present (median of 3) | {sorted(again)[1]:.2f} |")


if __name__ == "__main__":
    main()
