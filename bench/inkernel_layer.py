"""Per-request CPU cost of tpnb's swap/record layer alone, without sockets or uvicorn.

    .venv/bin/python bench/inkernel_layer.py

The minimal ASGI app of bench/inkernel_app.py is called 50,000 times directly and 50,000 times through
`InKernelServer._asgi` (version lookup, record, wrapped receive/send) with do-nothing receive/send, three
alternating rounds; the best round of each is compared.  This isolates what bench/inkernel.py cannot on a
noisy machine: how much of a request's time is tpnb's own.
"""
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tpnb import inkernel  # noqa: E402
import inkernel_app  # noqa: E402

srv = inkernel.InKernelServer(0)
ref = inkernel._AppRef(app=inkernel_app.plain, kind="asgi", version=1, asgi=inkernel_app.plain)
srv._ref = ref
HEADERS = [(b"host", b"127.0.0.1:9000"), (b"user-agent", b"bench"), (b"accept", b"*/*")]

def scope():
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "path": "/",
            "raw_path": b"/", "query_string": b"", "headers": HEADERS, "client": ("127.0.0.1", 5555),
            "server": ("127.0.0.1", 9000), "scheme": "http", "root_path": "", "state": {}}

async def receive():
    return {"type": "http.request", "body": b"", "more_body": False}

async def send(msg):
    pass

async def main(n=50000):
    out = {}
    for rnd in range(3):
        for name, fn in (("direct", inkernel_app.plain), ("tpnb", srv._asgi)):
            t0 = time.perf_counter()
            for _ in range(n):
                await fn(scope(), receive, send)
            out.setdefault(name, []).append((time.perf_counter() - t0) / n * 1e6)
    d, t = min(out["direct"]), min(out["tpnb"])
    print(f"direct {d:.2f} µs, through tpnb {t:.2f} µs: the layer adds {t - d:.2f} µs per request")

asyncio.run(main())
