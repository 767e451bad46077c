"""Benchmark the intercepted pod's volumes on the laptop (issue 5).  Not a test: it prints numbers.

    sudo .venv/bin/python bench/volumes.py [--size-mb 200] [--files 2000] [--runs 3]

Against one intercepted pod (project image, emptyDir at /data) in namespace
`benchvol`, from laptop `benchvol`, it measures:
  * a SIZE MB sequential read of /data/big
      - through the sshfs mount (tpnb/mounts.py; a fresh mount per run, so
        the page cache is cold),
      - through the FUSE-less API (`Session.files(NAME).read_bytes`),
      - via `kubectl exec POD -c app -- cat` (the API server's exec stream),
      - plain HTTP from the pod's app over the same tunnel (the tunnel's ceiling);
  * `ls -R` of FILES small files through the mount (fresh mount: cold dir cache).
Every figure is the median of RUNS.  All traffic stays inside the dev
cluster's network namespaces on this machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import sh  # noqa: E402  (bench/common.py)

from tpnb.imageref import default_image  # noqa: E402
from tpnb_devcluster.cluster import DevCluster  # noqa: E402

NS = "benchvol"
LAPTOP = "benchvol"

#: runs inside the laptop, in one invocation (the mounts live in its mount namespace)
INNER = r'''
import json, os, statistics, subprocess, sys, time
from tpnb.api import Session
from tpnb import mounts

size_mb, files, runs, pod = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = Session()
ic = s.get_intercept("hello")
out = {}

def mb_s(nbytes, secs):
    return nbytes / secs / 1e6

def timed(fn):
    t = time.monotonic(); n = fn(); return n, time.monotonic() - t

def read_file(path):
    n = 0
    with open(path, "rb", buffering=0) as fh:
        while True:
            b = fh.read(1 << 20)
            if not b:
                return n
            n += len(b)

res = []
for _ in range(runs):
    root = s.mount("hello", intercept=ic)
    try:
        n, dt = timed(lambda: read_file(f"{root}/data/big"))
        res.append(mb_s(n, dt))
    finally:
        s.unmount("hello")
out["sshfs mount"] = res

res = []
for _ in range(runs):
    fs = s.files("hello")
    n, dt = timed(lambda: len(fs.read_bytes("/data/big")))
    fs.close()
    res.append(mb_s(n, dt))
out["FUSE-less API (remotefs)"] = res

res = []
for _ in range(runs):
    n, dt = timed(lambda: len(subprocess.run(["kubectl", "-n", "benchvol", "exec", pod, "-c", "app", "--",
                                              "cat", "/data/big"], capture_output=True, check=True).stdout))
    res.append(mb_s(n, dt))
out["kubectl exec cat"] = res

res = []
for _ in range(runs):
    n, dt = timed(lambda: len(subprocess.run(["curl", "-sS", f"http://{ic.pod_ips[0]}:8080/big"],
                                             capture_output=True, check=True).stdout))
    res.append(mb_s(n, dt))
out["HTTP from the app, same tunnel (ceiling)"] = res

res = []
for _ in range(runs):
    root = s.mount("hello", intercept=ic)
    try:
        t = time.monotonic()
        listing = subprocess.run(["ls", "-R", f"{root}/data/many"], capture_output=True, text=True, check=True)
        dt = time.monotonic() - t
        count = sum(1 for ln in listing.stdout.splitlines() if ln.startswith("f"))
        assert count == files, (count, files)
        res.append(dt)
    finally:
        s.unmount("hello")
out["ls_R"] = res
print("RESULT " + json.dumps(out))
'''




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="leave the namespace and session in place")
    args = ap.parse_args()

    dc = DevCluster()
    dc.up()
    dc.ensure_laptop(LAPTOP)
    lap = lambda argv, **kw: sh(dc.laptop_cmd(LAPTOP, argv), **kw)  # noqa: E731
    kubectl = lambda *a, **kw: lap(["kubectl", *a], **kw)  # noqa: E731

    lap(["tpnb", "quit", "--daemon"], check=False)
    kubectl("delete", "ns", NS, "--ignore-not-found", "--wait=true", timeout=180)
    kubectl("create", "ns", NS)
    objs = {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "hello"},
         "spec": {"selector": {"matchLabels": {"app": "hello"}}, "template": {
             "metadata": {"labels": {"app": "hello"}},
             "spec": {"containers": [{"name": "app", "image": default_image(), "imagePullPolicy": "IfNotPresent",
                                      "command": ["python3", "-m", "http.server", "8080"], "workingDir": "/data",
                                      "ports": [{"containerPort": 8080}],
                                      "volumeMounts": [{"name": "scratch", "mountPath": "/data"}]}],
                      "volumes": [{"name": "scratch", "emptyDir": {}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hello"},
         "spec": {"selector": {"app": "hello"}, "ports": [{"port": 80, "targetPort": 8080}]}},
    ]}
    kubectl("-n", NS, "apply", "-f", "-", input=json.dumps(objs))
    kubectl("-n", NS, "rollout", "status", "deploy/hello", "--timeout=120s")
    try:
        inner = f"/tmp/tpnb-bench-volumes-{LAPTOP}.py"
        Path(inner).write_text(INNER)
        script = (
            "python3 -m http.server 9000 >/dev/null 2>&1 & SRV=$!; trap 'kill $SRV' EXIT; "
            f"tpnb intercept hello -n {NS} --port 9000 --mount=false >/dev/null && "
            f"POD=$(python3 -c \"from tpnb.api import Session; import subprocess, json; "
            f"ip=Session().get_intercept('hello').pod_ips[0]; "
            f"ps=json.loads(subprocess.run(['kubectl','-n','{NS}','get','pod','-o','json'],"
            f"capture_output=True).stdout)['items']; "
            f"print([p['metadata']['name'] for p in ps if p['status'].get('podIP')==ip][0])\") && "
            f"kubectl -n {NS} exec $POD -c app -- sh -c 'head -c {args.size_mb}M /dev/urandom > /data/big' && "
            f"kubectl -n {NS} exec $POD -c app -- python3 -c \"import os\n"
            f"os.makedirs('/data/many/sub', exist_ok=True)\n"
            f"for i in range({args.files}): open(f'/data/many/sub/f{{i}}' if i % 2 else f'/data/many/f{{i}}', 'w')"
            f".write(str(i))\" && "
            f"python3 {inner} {args.size_mb} {args.files} {args.runs} $POD")
        out = lap(["sh", "-c", script], timeout=1800)
    finally:
        if not args.keep:
            lap(["tpnb", "quit", "--daemon"], check=False)
            kubectl("delete", "ns", NS, "--ignore-not-found", "--wait=false", check=False)
    res = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    ls_r = res.pop("ls_R")
    print(f"{args.size_mb} MiB sequential read, median of {args.runs} (MB/s = 10^6 bytes/s):")
    for name, vals in res.items():
        print(f"  {name:<42} {statistics.median(vals):7.1f} MB/s   (runs: {', '.join(f'{v:.1f}' for v in vals)})")
    print(f"`ls -R` of {args.files} small files through the mount: {statistics.median(ls_r):.2f} s "
          f"(runs: {', '.join(f'{v:.2f}' for v in ls_r)}; goal < 5 s)")
    print(f"load average during the run: {open('/proc/loadavg').read().split()[:3]} on {_cpus()} CPUs")


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
