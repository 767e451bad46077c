"""Run inside a dev-cluster laptop: `%tp wiretap hello` in a real kernel while a pod sends requests.

Phase 1: 200 requests from the pod; the kernel's live list must hold all 200 (printed as RESULT1 JSON
with what the pod received, for the test to compare).  Phase 2: a pod sends 300 more while the
kernel is killed (-9) mid-stream; printed as RESULT2: what the pod got, and how long until the
wiretap was gone from `tpnb status`.  Used by tests/test_wiretap.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from jupyter_client.manager import KernelManager

#: run in the loader pod: N requests (DELAY s apart) to http://HOST/TAG-i; one JSON document
LOAD = r'''
import http.client, json, sys, time
host, n, delay, tag = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
out = []
conn = None
for i in range(n):
    t0 = time.perf_counter()
    try:
        if conn is None:
            conn = http.client.HTTPConnection(host, 80, timeout=20)
        conn.request("GET", f"/{tag}-{i}", headers={"x-wire": tag})
        r = conn.getresponse()
        body = r.read().decode("utf-8", "replace")
        out.append([f"/{tag}-{i}", r.status, body, (time.perf_counter() - t0) * 1000, ""])
    except Exception as exc:
        out.append([f"/{tag}-{i}", 0, "", (time.perf_counter() - t0) * 1000, repr(exc)])
        conn = None
    time.sleep(delay)
print(json.dumps(out))
'''


def load(ns: str, n: int, delay: float, tag: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["kubectl", "-n", ns, "exec", "loader", "--", "python3", "-c", LOAD,
                             f"hello.{ns}", str(n), str(delay), tag], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


class Kernel:
    def __init__(self) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 240) -> str:
        out: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            c = msg["content"]
            if msg["msg_type"] == "stream" and c.get("name") == "stdout":
                out.append(c["text"])
            elif msg["msg_type"] in ("execute_result", "display_data"):
                out.append(c["data"].get("text/plain", ""))
            elif msg["msg_type"] == "error":
                out.append("\n".join(c.get("traceback", [])) or c.get("evalue", ""))

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        if reply["content"]["status"] != "ok":
            raise SystemExit(f"cell failed: {code!r}: {''.join(out)[-2000:]}")
        return "".join(out)


def wiretaps() -> list[dict[str, Any]]:
    r = subprocess.run(["tpnb", "status", "-o", "json"], capture_output=True, text=True, timeout=30)
    return json.loads(r.stdout).get("wiretaps", []) if r.stdout.strip() else []


def main() -> int:
    ns = sys.argv[1]
    k = Kernel()
    k.run("%load_ext tpnb")
    k.run(f"%tp connect -n {ns}")
    started = k.run(f"log = %tp wiretap hello -n {ns}")
    if "Wiretapping" not in started:
        print(f"no wiretap: {started}", file=sys.stderr)
        return 1
    p = load(ns, 200, 0.0, "one")
    pod_out, pod_err = p.communicate(timeout=300)
    if p.returncode:
        print(f"the loader failed: {pod_err}", file=sys.stderr)
        return 1
    k.run("_ok = log.wait(200, timeout=60)\nfrom tpnb.api import Session as _S")
    got = k.run("import json\nprint('JSON' + json.dumps({'ok': _ok, 'running': log.running, 'dropped': log.dropped, "
                "'records': [[r['path'], r['status'], r['duration_ms'], r['response_body'].decode('utf-8', 'replace'), "
                "r['type'], r['method']] for r in log], 'df': list(log.df().shape), "
                "'df_cols': list(log.df().columns)[:7], 'status_wiretaps': [w.name for w in _S().status().wiretaps]}))")
    kernel_side = json.loads(got.split("JSON", 1)[1])
    print("RESULT1 " + json.dumps({"pod": json.loads(pod_out), "kernel": kernel_side}), flush=True)

    # phase 2: the kernel dies mid-stream; the app must keep answering, the wiretap must go
    p = load(ns, 300, 0.01, "two")
    time.sleep(1.5)
    os.kill(k.km.provisioner.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
    t0 = time.monotonic()
    gone = None
    while time.monotonic() - t0 < 20:
        if not wiretaps():
            gone = time.monotonic() - t0
            break
        time.sleep(0.25)
    pod_out, pod_err = p.communicate(timeout=300)
    print("RESULT2 " + json.dumps({"pod": json.loads(pod_out) if pod_out.strip() else [], "gone": gone,
                                   "loader_rc": p.returncode, "loader_err": pod_err[-500:]}), flush=True)
    k.kc.stop_channels()
    k.km.cleanup_resources()
    return 0


if __name__ == "__main__":
    sys.exit(main())
