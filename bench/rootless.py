"""Benchmark the rootless outbound paths (issue 14) next to the root daemon's, in one run.

    sudo .venv/bin/python bench/rootless.py [--size-mb 32]

Against one netbench pod (bench/netbench_server.py), from laptop `benchrl`,
bench/netbench_client.py measures bulk down/up (median of 3), 1,000 small
round trips on one connection and 200 new connections (p50/p99), through:
  * the root daemon (`tpnb connect`: kernel TCP redirect -> gRPC -> port-forward),
  * in-process hooks (`tpnb connect --no-root`, then the client process runs
    `tpnb.rootless.enable_in_process`, as a %tp kernel does: its sockets go
    to the connector's per-destination loopback forward),
  * the SOCKS5 proxy (the same client, each connection opened with a SOCKS5
    handshake to the connector's proxy, token included).
The pod's IP is used on every path so no path times name lookups.
All traffic stays inside the dev cluster's namespaces on this machine.
"""
from __future__ import annotations

import argparse
import json

from common import REPO, fresh_namespace, laptop, netbench_server, print_table  # noqa: E402  (bench/common.py)

NS = "benchrl"
LAPTOP = "benchrl"

HOOKED = """
import runpy, sys
from tpnb import rootless
from tpnb.api import Session
s = Session()
assert rootless.enable_in_process(s, s.status(), set_env=False), "not rootless"
sys.argv = ["netbench_client", *sys.argv[1:]]
runpy.run_path(%r, run_name="__main__")
"""

SOCKS = """
import runpy, socket, struct, sys
from urllib.parse import urlsplit
from tpnb.api import Session
u = urlsplit(Session().status().proxy_socks_url)
sys.path.insert(0, %r)
import netbench_client as nc

def conn(host, port):
    s = socket.create_connection((u.hostname, u.port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"\\x05\\x01\\x02")
    assert s.recv(2) == b"\\x05\\x02"
    user, pw = u.username.encode(), u.password.encode()
    s.sendall(bytes([1, len(user)]) + user + bytes([len(pw)]) + pw)
    assert s.recv(2) == b"\\x01\\x00"
    s.sendall(b"\\x05\\x01\\x00\\x01" + socket.inet_aton(host) + struct.pack("!H", port))
    rep = b""
    while len(rep) < 10:
        rep += s.recv(10 - len(rep))
    assert rep[1] == 0, rep
    return s

nc._conn = conn
sys.argv = ["netbench_client", *sys.argv[1:]]
nc.main()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Run as root (the dev cluster and its laptops need it), under the cluster lock.")
    ap.add_argument("--size-mb", type=int, default=32, help="bulk transfer size each way, MiB (default 32)")
    args = ap.parse_args()
    size = args.size_mb * 1024 * 1024
    dc, lap, kubectl = laptop(LAPTOP)
    fresh_namespace(lap, kubectl, NS)
    pod = netbench_server(kubectl, NS, with_service=False)
    pod_ip = kubectl("-n", NS, "get", "pod", pod, "-o", "jsonpath={.status.podIP}")
    client = str(REPO / "bench" / "netbench_client.py")
    target = [pod_ip, "7070", str(size), "all"]
    print(f"bulk {args.size_mb} MiB each way (median of 3), 1000 small requests, 200 new connections; pod {pod_ip}",
          flush=True)
    results: dict[str, dict[str, float]] = {}
    try:
        lap(["tpnb", "connect", "--namespace", NS], timeout=300)
        results["root daemon (system-wide)"] = json.loads(lap(["python3", client, *target]).splitlines()[-1])
        lap(["tpnb", "quit", "--daemon"])
        lap(["tpnb", "connect", "--no-root", "--namespace", NS], timeout=300)
        results["rootless in-process hooks"] = json.loads(
            lap(["python3", "-c", HOOKED % client, *target]).splitlines()[-1])
        results["rootless SOCKS5 proxy"] = json.loads(
            lap(["python3", "-c", SOCKS % str(REPO / "bench"), *target]).splitlines()[-1])
    finally:
        lap(["tpnb", "quit", "--daemon"], check=False)
        kubectl("delete", "ns", NS, "--wait=false", check=False)
    print_table("path", results)


if __name__ == "__main__":
    main()
