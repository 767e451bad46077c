"""Benchmark the traffic-agent's HTTP filtering (personal intercepts, issue 12).  Not a test: it prints numbers.

    sudo .venv/bin/python bench/filter.py [--requests 2000] [--rounds 3]

A client pod sends small keep-alive GETs to a Service whose app is the
echoserver, and measures per-request latency (one connection, sequential:
p50/p99) and throughput (4 connections in parallel: requests/s):

  * no agent at all (the Service reaches the app directly);
  * a personal intercept (`--http-header x-bench=1`) is active:
      - requests WITHOUT the header (parsed by the agent's router, cluster/httproute.py, then served
        by the app),
      - requests WITH it (served by a small server on the laptop);
  * the agent present but nothing intercepted (bytes spliced to the app);
  * an unfiltered (global) intercept: every request served by the same laptop server.

Every round of every row is paired with a round against a second echoserver
that never gets an agent (Service `plain`, measured just before): the machine is
shared, so the added cost is the median over rounds of (row - its paired
no-agent round), not a difference of figures taken minutes apart.  All pods are
placed on one node (the dev cluster may have two), so that a re-rolled pod does
not move to the other node between rows.  Figures are medians over the rounds;
each round checks that every answer came from where it should (a misrouted
request stops the benchmark).  The goal of
issue 12: non-matching requests cost <= 0.3 ms p50 more than no agent.  All
traffic stays inside the dev cluster's network namespaces on this machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from common import (REPO, apply_and_wait, deployment, fresh_namespace, laptop, laptop_process,  # noqa: E402
                    service, stop_process)  # (bench/common.py)

from tpnb import config as tpnb_config  # noqa: E402

NS = "benchflt"
LAPTOP = "benchflt"
ECHO = "tpnb.local/echoserver:1.4"
LOCAL_PORT = 7171

#: runs in the client pod: latency on one keep-alive connection, then throughput on 4; one JSON line
CLIENT = r'''
import http.client, json, sys, threading, time
host, n, header, want = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
hdrs = {"x-bench": header} if header else {}
bad = []

def run(count, lat=None):
    conn = http.client.HTTPConnection(host, 80, timeout=20)
    for i in range(count):
        t0 = time.perf_counter()
        conn.request("GET", f"/b{i}", headers=hdrs)
        body = conn.getresponse().read()
        if lat is not None:
            lat.append(time.perf_counter() - t0)
        if want.encode() not in body:
            bad.append(body[:60].decode(errors="replace"))
    conn.close()

run(50)  # warm up: connection, agent, laptop path
lat = []
run(n, lat)
lat.sort()
threads = [threading.Thread(target=run, args=(n // 4,)) for _ in range(4)]
t0 = time.perf_counter()
for t in threads:
    t.start()
for t in threads:
    t.join()
rps = 4 * (n // 4) / (time.perf_counter() - t0)
print(json.dumps({"p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
                  "rps": rps, "bad": len(bad), "sample": bad[:2]}))
'''

#: the laptop's server: a fixed small answer per request, keep-alive (what tpnb adds is measured, not a framework)
SERVER = r'''
import asyncio, sys
BODY = b"served by the laptop\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
async def handle(r, w):
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            if not head:
                break
            w.write(RESP)
            await w.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    w.close()
async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    async with srv:
        await srv.serve_forever()
asyncio.run(main())
'''

APP = "CLIENT VALUES:"
LAPTOP_ANSWER = "served by the laptop"


def _load() -> str:
    """The machine's load average (1, 5, 15 min): how busy the shared cores were."""
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    dc, lap, kubectl = laptop(LAPTOP)
    image = tpnb_config.get().manager_image
    fresh_namespace(lap, kubectl, NS)
    node = kubectl("get", "nodes", "-o", "jsonpath={.items[0].metadata.name}").strip()
    items = [deployment("web", ECHO, port=8080), deployment("plain", ECHO, port=8080),
             deployment("client", image, ["sleep", "infinity"]), service("web", 80, 8080), service("plain", 80, 8080)]
    for it in items:
        if it["kind"] == "Deployment":
            it["spec"]["template"]["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
    apply_and_wait(kubectl, NS, items)
    results: dict[str, list[dict]] = {}
    paired: dict[str, list[dict]] = {}  # the no-agent round (Service plain) just before each round

    def one(svc: str, header: str, want: str, label: str) -> dict:
        out = kubectl("-n", NS, "exec", "-i", "deploy/client", "--", "python3", "-", f"{svc}.{NS}",
                      str(args.requests), header, want, input=CLIENT, timeout=600)
        r = json.loads(out.strip().splitlines()[-1])
        if r["bad"]:
            raise SystemExit(f"{label}: {r['bad']} answers not from {want!r}: {r['sample']}")
        return r

    def measure(label: str, header: str, want: str) -> None:
        for _ in range(args.rounds):
            paired.setdefault(label, []).append(one("plain", "", APP, "no agent (plain)"))
            results.setdefault(label, []).append(one("web", header, want, label))
        print(f"  measured: {label}", flush=True)

    print(f"all pods on node {node}; load average {_load()}", flush=True)

    print(f"{args.requests} sequential + {args.requests} parallel (4 connections) GETs per round, "
          f"{args.rounds} rounds", flush=True)
    measure("no agent", "", APP)
    server = laptop_process(dc, LAPTOP, ["python3", "-c", SERVER, str(LOCAL_PORT)])
    intercept = ["tpnb", "intercept", "web", "--port", str(LOCAL_PORT), "--mount=false"]
    try:
        lap(["tpnb", "connect", "--namespace", NS], timeout=300)
        time.sleep(0.5)
        lap([*intercept, "--http-header", "x-bench=1"], timeout=300)
        measure("non-matching, personal intercept active (app via agent)", "", APP)
        measure("matching, personal intercept (laptop)", "1", LAPTOP_ANSWER)
        lap(["tpnb", "leave", "web"])
        measure("agent, nothing intercepted (app via agent)", "", APP)
        lap(intercept, timeout=300)
        measure("unfiltered intercept (laptop)", "", LAPTOP_ANSWER)
        lap(["tpnb", "leave", "web"])
        lap(["tpnb", "uninstall", "--agent", "web"], timeout=300)
        measure("no agent (again, after uninstall)", "", APP)
    finally:
        stop_process(server)
        lap(["tpnb", "quit", "--daemon"], check=False)
        kubectl("delete", "ns", NS, "--wait=false", check=False)

    def med(label: str, key: str, table: dict[str, list[dict]] = results) -> float:
        return statistics.median(r[key] for r in table[label])

    def added(label: str) -> float:
        """Median over rounds of (this round's p50 - the paired no-agent round's p50), in µs."""
        return statistics.median(r["p50_us"] - b["p50_us"] for r, b in zip(results[label], paired[label]))

    print("\n| requests | p50 µs | p99 µs | req/s (4 connections) | paired no-agent p50 µs | added p50 µs |\n"
          "|---|---|---|---|---|---|")
    for label in results:
        print(f"| {label} | {med(label, 'p50_us'):.0f} | {med(label, 'p99_us'):.0f} | {med(label, 'rps'):.0f} "
              f"| {med(label, 'p50_us', paired):.0f} | {added(label):+.0f} |")
    print("\nper round, p50 µs (row / its paired no-agent round):")
    for label in results:
        print(f"  {label}: " + ", ".join(f"{r['p50_us']:.0f}/{b['p50_us']:.0f}"
                                         for r, b in zip(results[label], paired[label])))
    nonmatch = added("non-matching, personal intercept active (app via agent)")
    splice = added("agent, nothing intercepted (app via agent)")
    matched = (med("matching, personal intercept (laptop)", "p50_us")
               - med("unfiltered intercept (laptop)", "p50_us"))
    print(f"\nnon-matching requests add {nonmatch / 1000:.3f} ms p50 over no agent (paired rounds; goal <= 0.3 ms; "
          f"the agent without filter adds {splice / 1000:.3f} ms); matching requests {matched / 1000:+.3f} ms p50 "
          f"against an unfiltered intercept; load average at the end {_load()}")
    print(f"(command: sudo .venv/bin/python bench/filter.py --requests {args.requests} --rounds {args.rounds}; "
          f"repo {REPO})")


if __name__ == "__main__":
    main()
