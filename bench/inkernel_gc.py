"""What the garbage collector costs a server in a kernel: gen-2 passes under load, frozen heap or not.

    .venv/bin/python bench/inkernel_gc.py [plain|fastapi] [--seconds 3] [--rounds 3]

Three servers of the same app (bench/inkernel_app.py), rounds alternating, bench/inkernel.py's client:
  kernel         a real Jupyter kernel, `tpnb.inkernel.serve` as shipped (GC_FREEZE: the heap frozen)
  kernel-nofreeze  the same with `inkernel.GC_FREEZE = False` (what the kernel cost before)
  uvicorn        `python -m uvicorn` standalone
Each process counts its collector's passes with `gc.callbacks` (time per pass, by generation) and writes
the totals to a file twice a second; the bench prints, per server, the gen-2 passes per round, their
total and longest pause in ms (passes during the round only), the collector's time per request in µs, tracked objects at start
(`len(gc.get_objects())`, before the app's imports), requests/s and p99 latency (medians over rounds).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import inkernel as B  # noqa: E402 - bench/inkernel.py: the client, the kernel and helpers

#: run first in each server process: count collector passes, dump the totals to DIR/gc-PID.json
PROBE = """
import gc as _gc, json as _json, os as _os, threading as _th, time as _time
_gs = {{"n": [0, 0, 0], "t": [0.0, 0.0, 0.0], "gen2": [], "objs": len(_gc.get_objects())}}
_st = [0.0]
def _cb(phase, info):
    if phase == "start":
        _st[0] = _time.perf_counter()
    else:
        d = _time.perf_counter() - _st[0]; g = info["generation"]
        _gs["n"][g] += 1; _gs["t"][g] += d
        if g == 2:
            _gs["gen2"] = _gs["gen2"][-200:] + [(_st[0], d)]  # when (perf_counter: CLOCK_MONOTONIC) and how long
_gc.callbacks.append(_cb)
def _dump():
    while True:
        with open({path!r} + f"/gc-{{_os.getpid()}}.json.tmp", "w") as f:
            _json.dump(_gs, f)
        _os.replace({path!r} + f"/gc-{{_os.getpid()}}.json.tmp", {path!r} + f"/gc-{{_os.getpid()}}.json")
        _time.sleep(0.5)
_th.Thread(target=_dump, daemon=True, name="gc-probe").start()
"""


def read(tmp: str, pid: int) -> dict:
    time.sleep(0.6)  # one more dump
    with open(f"{tmp}/gc-{pid}.json") as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("app", nargs="?", default="fastapi", choices=sorted(B.APPS))
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=16)
    args = ap.parse_args()
    var, path = B.APPS[args.app]
    tmp = tempfile.mkdtemp(prefix="tpnb-gc-")
    probe = PROBE.format(path=tmp)
    kernels: list[B.Kernel] = []
    targets: dict[str, tuple[int, int]] = {}
    uv = None
    try:
        for name, extra in (("kernel", ""), ("kernel-nofreeze", "inkernel.GC_FREEZE = False\n")):
            k = B.Kernel()
            kernels.append(k)
            port = B.free_port()
            k.run(f"{probe}\nimport sys; sys.path.insert(0, {str(BENCH)!r})\nfrom tpnb import inkernel\n{extra}"
                  f"import inkernel_app\ninkernel.serve(inkernel_app.{var}, {port})")
            targets[name] = (port, k.km.provisioner.pid)  # type: ignore[attr-defined]
        port = B.free_port()
        argv = ["uvicorn", *B.uvicorn_args(var, port)]
        uv = subprocess.Popen([sys.executable, "-c", f"{probe}\nimport sys; sys.argv = {argv!r}\n"
                               "from uvicorn.main import main; main()"],
                              cwd=BENCH, env={**os.environ, "PYTHONPATH": str(BENCH)})
        targets["uvicorn"] = (port, uv.pid)
        for port, _pid in targets.values():
            B.wait_port(port)
        rows: dict[str, list[dict]] = {k: [] for k in targets}
        load0 = os.getloadavg()[0]
        for _ in range(args.rounds):
            for name, (port, pid) in targets.items():
                asyncio.run(B._load(port, path, 0.5, args.conns))  # warm-up
                g0 = read(tmp, pid)
                t0 = time.perf_counter()
                rps, lat = asyncio.run(B._load(port, path, args.seconds, args.conns))
                t1 = time.perf_counter()
                g1 = read(tmp, pid)
                pauses = [d for t, d in g1["gen2"] if t0 <= t <= t1]
                lat.sort()
                gc_s = sum(b - a for a, b in zip(g0["t"], g1["t"]))
                rows[name].append({"n2": g1["n"][2] - g0["n"][2], "t2": (g1["t"][2] - g0["t"][2]) * 1e3,
                                   "max2": max(pauses, default=0.0) * 1e3, "gc_us": gc_s / len(lat) * 1e6, "rps": rps,
                                   "p99": lat[int(len(lat) * 0.99)] * 1e6, "objs": g1["objs"]})
    finally:
        if uv is not None:
            uv.terminate()
            uv.wait(10)
        for k in kernels:
            k.close()
    print(f"\n{args.app}: {args.conns} keep-alive connections, {args.seconds:.0f} s per round, {args.rounds} rounds "
          f"(medians; load average {load0:.1f} -> {os.getloadavg()[0]:.1f})")
    print("| server | tracked objects at start | gen-2 passes / round | gen-2 ms / round | longest gen-2 pause ms "
          "| collector µs / request | req/s | p99 µs |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rs in rows.items():
        m = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"| {name} | {m['objs']:.0f} | {m['n2']:.0f} | {m['t2']:.0f} | {max(r['max2'] for r in rs):.0f} "
              f"| {m['gc_us']:.1f} | {m['rps']:.0f} | {m['p99']:.0f} |")


if __name__ == "__main__":
    main()
