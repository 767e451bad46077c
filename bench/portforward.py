"""Throughput of tpnb's port-forward (SPDY and WebSocket) vs `kubectl port-forward`.

Both forward to the same echoserver pod; each round POSTs N MiB and reads the
N MiB echo back (the echoserver buffers the body, so the two directions run
one after the other).  Reported MiB/s count both directions.

Run it where the cluster is reachable, for the dev cluster from a laptop:

    ip netns exec tpnb-laptop .venv/bin/python bench/portforward.py --size 64 --rounds 3

It creates a namespace tpnb-bench-<random> and deletes it at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tpnb.connector.kube import load_target, path_quote, request
from tpnb.connector.portforward import PortForward

ECHO_IMAGE = "tpnb.local/echoserver:1.4"


def kubectl_binary() -> str:
    found = sorted(glob.glob("/var/lib/tpnb/devcluster/bin/*/kubectl"))
    return found[0] if found else (shutil.which("kubectl") or "kubectl")


async def post_echo(port: int, size: int) -> float:
    """One POST of `size` bytes through 127.0.0.1:port; seconds taken."""
    chunk = os.urandom(1 << 20)
    t0 = time.perf_counter()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"POST /bench HTTP/1.1\r\nHost: bench\r\nContent-Length: {size}\r\n"
            f"Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n".encode())
    sent = 0
    while sent < size:
        n = min(len(chunk), size - sent)
        w.write(chunk[:n])
        await w.drain()
        sent += n
    got = 0
    while data := await r.read(1 << 20):
        got += len(data)
    w.close()
    dt = time.perf_counter() - t0
    if got < size:
        raise RuntimeError(f"short echo: {got} < {size} bytes")
    return dt


async def measure(port: int, size: int, rounds: int) -> list[float]:
    await post_echo(port, 1 << 20)  # warm up
    return [2 * size / (1 << 20) / await post_echo(port, size) for _ in range(rounds)]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG", "/var/lib/tpnb/devcluster/kubeconfig"))
    ap.add_argument("--context")
    ap.add_argument("--size", type=int, default=64, help="MiB per round (default 64)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    size = args.size << 20

    t = load_target(args.kubeconfig, args.context)
    ns = f"tpnb-bench-{uuid.uuid4().hex[:6]}"
    await request(t, "POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace",
                                                         "metadata": {"name": ns}})
    try:
        await request(t, "POST", f"/api/v1/namespaces/{ns}/pods", body={
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "echo"},
            "spec": {"containers": [{"name": "echo", "image": ECHO_IMAGE, "imagePullPolicy": "IfNotPresent",
                                     "ports": [{"containerPort": 8080}]}],
                     "terminationGracePeriodSeconds": 1}})
        for _ in range(120):
            pod = await request(t, "GET", f"/api/v1/namespaces/{ns}/pods/echo")
            if any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])):
                break
            await asyncio.sleep(1)
        else:
            raise SystemExit("echo pod did not become ready")

        ours: dict[str, list[float]] = {}
        for protocol in ("spdy", "websocket"):
            pf = PortForward(t, ns, "echo", 8080, protocol)
            port = await pf.start()
            try:
                ours[protocol] = await measure(port, size, args.rounds)
            finally:
                await pf.aclose()

        kubectl = kubectl_binary()
        cmd = [kubectl, "--kubeconfig", args.kubeconfig, "-n", ns, "port-forward", "pod/echo", ":8080"]
        if args.context:
            cmd[1:1] = ["--context", args.context]
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            m = re.search(r"127\.0\.0\.1:(\d+)", line)
            if not m:
                raise SystemExit(f"kubectl port-forward said: {line.strip()}")
            drain = asyncio.create_task(proc.stdout.read())  # keep its "Handling connection" lines flowing
            theirs = await measure(int(m.group(1)), size, args.rounds)
            drain.cancel()
        finally:
            proc.terminate()
            await proc.wait()
        kv = (await asyncio.to_thread(subprocess.run, [kubectl, "version", "--client"], capture_output=True,
                                      text=True, check=False)).stdout.split("\n")[0]

        def fmt(xs: list[float]) -> str:
            return f"best {max(xs):7.1f} MiB/s  median {sorted(xs)[len(xs) // 2]:7.1f} MiB/s  " \
                   f"({', '.join(f'{x:.0f}' for x in xs)})"

        print(f"{args.rounds} rounds of POST {args.size} MiB + echo back, counting both directions")
        for protocol, xs in ours.items():
            print(f"tpnb PortForward ({protocol}):{' ' * (10 - len(protocol))}{fmt(xs)}")
        print(f"kubectl port-forward ({kv.strip()}): {fmt(theirs)}")
    finally:
        await request(t, "DELETE", f"/api/v1/namespaces/{path_quote(ns)}")


if __name__ == "__main__":
    asyncio.run(main())
