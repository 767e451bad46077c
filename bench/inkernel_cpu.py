"""CPU time per request of the server process: the in-kernel server, the same in plain processes, uvicorn.

    .venv/bin/python bench/inkernel_cpu.py [plain|fastapi] [--rounds 12] [--seconds 1.5] [--only NAME,...]

Throughput on a shared 2-core machine swings with the other agents' load; the CPU the server process
spent per request (utime+stime from /proc/PID/stat over the round, divided by the requests answered)
swings less, so this compares servers by it, over many short alternating rounds (medians):
  uvicorn        `python -m uvicorn` standalone, in the client's session (what bench/inkernel.py compares with)
  uvicorn-own    the same started in its own session (setsid, as jupyter_client starts kernels): autogroup
  kernel         a real Jupyter kernel running `tpnb.inkernel.serve`
  process        `tpnb.inkernel.serve` in a plain Python process (no kernel)
  process-own    the same in its own session
  log1           process with `inkernel.LOG_SIZE = 1` (no records kept: their retention and GC load)
  bypass         process with the layer replaced by a direct call of the app (what the layer costs)
  scopecopy      process whose records keep a shallow copy of the whole scope, as before session 12 (what
                 keeping only the six fields a record shows saves)
  shared         process whose records share one str object per method and HTTP version instead of
                 keeping uvicorn's fresh ones (two objects fewer per kept record)
  fewer          shared, and no float or int objects of their own per record (timestamps and sequence
                 number replaced by constants: wrong records, only to price those five objects)
  bare           process whose records let go of the request tuple and the response's headers and body
                 once answered (the record object alone is kept: wrong records, only to price them)
  nogc           process with the cyclic garbage collector off (`gc.disable()`)
  nowrap         process whose records are made and finished, but the app gets uvicorn's own `send`
                 (no status, headers or body captured: wrong records, only to price the wrapped `send`)
  passthru       nowrap, with a do-nothing Python method between the app and uvicorn's `send`
  bulk           process whose log is a list cut by 2000 records whenever it reaches 4000 (the old
                 records' objects are freed in bursts instead of one record per request)
Client: bench/inkernel.py's (keep-alive connections of small GETs, 127.0.0.1 only).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import inkernel as B  # noqa: E402 - bench/inkernel.py: the client, the kernel and helpers

BYPASS = ("async def _pass(self, scope, receive, send):\n    await self._ref.asgi(scope, receive, send)\n"
          "inkernel.InKernelServer._asgi = _pass\n")


def _make(req: str, t0: str = "perf_counter()", prelude: str = "") -> str:
    """A replacement of `inkernel._http_rec` whose records keep `req` (an expression of `scope` and of
    what `prelude`, lines of the function's body, sets) and start at `t0`; otherwise the same fields."""
    return ("from time import perf_counter\n_R = inkernel._HttpRec\n"
            "_S = {'GET': 'GET', 'POST': 'POST', '1.1': '1.1', '1.0': '1.0'}\n"
            "def _other_record(srv, version, scope, receive, send):\n"
            f"    r = _R()\n    r.t0 = {t0}\n    r.t1 = 0.0\n    r.srv = srv\n    r.version = version\n"
            f"{prelude}    r.req = {req}\n"
            "    r._receive = receive\n    r._send = send\n    r.sh = r.rb = r.sb = None\n    r.status = 0\n"
            "    return r\n"
            "inkernel._http_rec = _other_record\n")


SCOPECOPY = _make("scope.copy()")
#: the method and HTTP version as one shared str each
SHARED = {"prelude": "    m = scope['method']\n    v = scope['http_version']\n",
          "req": "(_S.get(m, m), scope['path'], scope['query_string'], scope['headers'], scope['client'], _S.get(v, v))"}

def _finish(t1: str, seq: str, trim: str = "") -> str:
    """A replacement of `_HttpRec.finish` with other values for the end time and the sequence number, and
    `trim` run after the append (errors are not counted: the bench's requests have none)."""
    return ("def _fin(self, status, error):\n    if self.t1:\n        return\n"
            f"    self.t1 = t1 = {t1}\n    self.status = status\n    self.error = error\n"
            "    self._send = self._receive = None\n    srv = self.srv\n"
            "    self.intercept = min(srv.names) if srv.names else ''\n    srv.log.append(self)\n"
            f"{trim}    self.seq = {seq}\n    srv._by_status[status] += 1\n    srv._busy += t1 - self.t0\n"
            "    if srv._listeners or inkernel._watchers:\n        srv._notify(self)\n"
            "inkernel._HttpRec.finish = _fin\n")


BULK = (_finish("inkernel.perf_counter()", "next(srv._seq)", "    if len(srv.log) > 4000:\n        del srv.log[:2000]\n")
        + "_init = inkernel.InKernelServer.__init__\n"
          "def _list_log(self, *a, **k):\n    _init(self, *a, **k)\n    self.log = []\n"
          "inkernel.InKernelServer.__init__ = _list_log\n")
NOWRAP = ("async def _direct_send(self, scope, receive, send):\n    ref = self._ref\n"
          "    r = inkernel._http_rec(self, ref.version, scope, receive, send)\n"
          "    await ref.asgi(scope, receive, SENDER)\n    r.finish(200, None)\n"
          "inkernel.InKernelServer._asgi = _direct_send\n")
PASSTHRU = ("def _pass_on(self, msg):\n    return self._send(msg)\ninkernel._HttpRec.pass_on = _pass_on\n"
            + NOWRAP.replace("SENDER", "r.pass_on"))
#: name -> (kind, own session, code run before serving)
TARGETS = {"uvicorn": ("uvicorn", False, ""), "uvicorn-own": ("uvicorn", True, ""), "kernel": ("kernel", True, ""),
           "process": ("process", False, ""), "process-own": ("process", True, ""),
           "log1": ("process", False, "inkernel.LOG_SIZE = 1\n"), "bypass": ("process", False, BYPASS),
           "scopecopy": ("process", False, SCOPECOPY),
           "shared": ("process", False, _make(**SHARED)),
           "fewer": ("process", False, _make(**SHARED, t0="1.0") + _finish("2.0", "next(srv._seq) and 1")),
           "bare": ("process", False, _finish("inkernel.perf_counter()", "next(srv._seq)",
                                              "    self.req = self.sh = self.sb = None\n")),
           "nogc": ("process", False, "import gc\ngc.disable()\n"),
           "bulk": ("process", False, BULK),
           "nowrap": ("process", False, NOWRAP.replace("SENDER", "send")),
           "passthru": ("process", False, PASSTHRU)}
TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TCK


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("app", nargs="?", default="plain", choices=sorted(B.APPS))
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--only", default=",".join(TARGETS), help="comma-separated names (default: all)")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    bad = [n for n in names if n not in TARGETS]
    if bad:
        raise SystemExit(f"unknown server {bad[0]!r}; choose from {', '.join(TARGETS)}")
    var, path = B.APPS[args.app]
    env = {**os.environ, "PYTHONPATH": f"{BENCH}{os.pathsep}{BENCH.parent}"}
    servers: dict[str, tuple[int, int]] = {}
    procs: list[subprocess.Popen] = []
    kernels: list[B.Kernel] = []
    try:
        for name in names:
            kind, own, code = TARGETS[name]
            port = B.free_port()
            if kind == "kernel":
                k = B.Kernel()
                kernels.append(k)
                k.run(f"import sys; sys.path.insert(0, {str(BENCH)!r})\nfrom tpnb import inkernel\nimport inkernel_app\n"
                      f"inkernel.serve(inkernel_app.{var}, {port})")
                pid = k.km.provisioner.pid  # type: ignore[attr-defined]
            else:
                if kind == "process":
                    argv = [sys.executable, "-c", f"from tpnb import inkernel\nimport inkernel_app, time\n{code}"
                            f"inkernel.serve(inkernel_app.{var}, {port})\ntime.sleep(3600)"]
                else:
                    argv = [sys.executable, "-m", "uvicorn", *B.uvicorn_args(var, port)]
                pr = subprocess.Popen(argv, env=env, cwd=BENCH, start_new_session=own)
                procs.append(pr)
                pid = pr.pid
            servers[name] = (port, pid)
        for port, _pid in servers.values():
            B.wait_port(port)
        res: dict[str, list[tuple[float, float, float]]] = {n: [] for n in servers}
        load0 = os.getloadavg()[0]
        for _ in range(args.rounds):
            for name, (port, pid) in servers.items():
                asyncio.run(B._load(port, path, 0.3, args.conns))  # warm-up
                c0 = cpu_seconds(pid)
                rps, lat = asyncio.run(B._load(port, path, args.seconds, args.conns))
                lat.sort()
                res[name].append((rps, (cpu_seconds(pid) - c0) / len(lat) * 1e6, lat[int(len(lat) * 0.99)] * 1e6))
    finally:
        for pr in procs:
            pr.terminate()
            pr.wait(10)
        for k in kernels:
            k.close()
    print(f"\n{args.app}: {args.conns} keep-alive connections, {args.rounds} rounds of {args.seconds} s "
          f"(medians; load average {load0:.1f} -> {os.getloadavg()[0]:.1f})")
    print("| server | req/s | vs first | CPU µs / request | vs first | p99 µs |")
    print("|---|---|---|---|---|---|")
    base = None
    for name, rs in res.items():
        rps, cpu, p99 = (statistics.median(r[i] for r in rs) for i in range(3))
        base = base or (rps, cpu)
        print(f"| {name} | {rps:.0f} | {rps / base[0]:.2f}x | {cpu:.1f} | {cpu / base[1]:.2f}x | {p99:.0f} |")


if __name__ == "__main__":
    main()
