"""Instructions per request of tpnb's record layer, counted by valgrind: the same on a quiet or a busy machine.

    .venv/bin/python bench/inkernel_instr.py [--requests 20000]

bench/inkernel_layer.py times the layer, and on the shared 2-core machine its single runs swing by a third;
this counts the instructions instead (valgrind's callgrind, `Collected` of the whole process), which is
deterministic to ~0.1%, so one change of the layer can be judged by one run.  Three processes run the minimal
ASGI app of bench/inkernel_app.py with do-nothing receive/send (as in inkernel_layer.py): 0 requests, N direct
calls, N calls through `InKernelServer._asgi`; the differences divided by N are the app's and the layer's
instructions per request.  Needs `valgrind` (apt-get install valgrind); takes 2-3 minutes.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def serve_calls(mode: str, n: int) -> None:
    """The measured process: n requests of the minimal app, called directly or through tpnb's layer."""
    sys.path.insert(0, str(BENCH))
    from tpnb import inkernel
    import inkernel_app

    srv = inkernel.InKernelServer(0)
    srv._ref = inkernel._AppRef(app=inkernel_app.plain, kind="asgi", version=1, asgi=inkernel_app.plain)
    headers = [(b"host", b"127.0.0.1:9000"), (b"user-agent", b"bench"), (b"accept", b"*/*")]

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg: dict) -> None:
        pass

    async def main() -> None:
        fn = inkernel_app.plain if mode == "direct" else srv._asgi
        for _ in range(n):
            await fn({"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                      "path": "/", "raw_path": b"/", "query_string": b"", "headers": list(headers),
                      "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 9000), "scheme": "http",
                      "root_path": "", "state": {}}, receive, send)

    asyncio.run(main())


def count(mode: str, n: int) -> int:
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                          __file__, "--serve", mode, "--requests", str(n)], capture_output=True, text=True, check=True)
    m = re.search(r"Collected : (\d+)", out.stderr)
    if m is None:
        raise SystemExit(f"no instruction count from valgrind:\n{out.stderr[-2000:]}")
    return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--serve", choices=("direct", "tpnb"), help=argparse.SUPPRESS)  # the measured process
    args = ap.parse_args()
    if args.serve:
        serve_calls(args.serve, args.requests)
        return
    n = args.requests
    base, direct, tpnb = count("direct", 0), count("direct", n), count("tpnb", n)
    print(f"instructions per request: app called directly {(direct - base) / n:.0f}, through tpnb "
          f"{(tpnb - base) / n:.0f}: the layer adds {(tpnb - direct) / n:.0f}")


if __name__ == "__main__":
    main()
