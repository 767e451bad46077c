"""Where bench/inkernel.py's gap comes from: tpnb's server in a plain process, with and without its layer.

    .venv/bin/python bench/inkernel_process.py [plain|fastapi]

Three servers of the same app, each in its own plain Python process (no Jupyter kernel), measured with
bench/inkernel.py's client in 4 alternating rounds of 2.5 s:
  tpnb         `tpnb.inkernel.serve(app, port)` (uvicorn on tpnb's loop thread, behind the swap/record layer)
  tpnb-bypass  the same, with `InKernelServer._asgi` replaced by a direct call of the app (no layer)
  uvicorn      `python -m uvicorn` standalone
So tpnb vs tpnb-bypass is the layer's cost, tpnb-bypass vs uvicorn the rest of tpnb's setup, and
bench/inkernel.py (in a kernel) vs this file's tpnb row what the kernel process adds.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import inkernel as B  # noqa: E402 - bench/inkernel.py: the client and helpers

APPS = {"plain": ("plain", "/"), "fastapi": ("fastapi_app", "/json")}
BYPASS = ("async def _pass(self, scope, receive, send):\n    await self._ref.asgi(scope, receive, send)\n"
          "inkernel.InKernelServer._asgi = _pass\n")


def main() -> None:
    app, path = APPS[sys.argv[1] if len(sys.argv) > 1 else "plain"]
    env = {**os.environ, "PYTHONPATH": f"{BENCH}{os.pathsep}{BENCH.parent}"}
    ports: dict[str, int] = {}
    procs = []
    for name, patch in (("tpnb", ""), ("tpnb-bypass", BYPASS)):
        p = ports[name] = B.free_port()
        code = f"from tpnb import inkernel\nimport inkernel_app, time\n{patch}inkernel.serve(inkernel_app.{app}, {p})\ntime.sleep(3600)"
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=BENCH))
    ports["uvicorn"] = B.free_port()
    procs.append(subprocess.Popen([sys.executable, "-m", "uvicorn", *B.uvicorn_args(app, ports["uvicorn"])], env=env,
                                  cwd=BENCH))
    try:
        for p in ports.values():
            B.wait_port(p)
        res: dict[str, list[float]] = {k: [] for k in ports}
        for _ in range(4):
            for name, p in ports.items():
                res[name].append(B.measure(p, path, 2.5, 16)["rps"])
        for k, v in res.items():
            print(f"{k:12} {statistics.median(v):8.0f} req/s  rounds {[round(x) for x in v]}")
    finally:
        for pr in procs:
            pr.terminate()
            pr.wait(10)


if __name__ == "__main__":
    main()
