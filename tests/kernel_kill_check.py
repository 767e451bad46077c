"""Run inside a dev-cluster laptop: a real kernel intercepts, is killed with -9, and the intercept must end.

Prints `RESULT <seconds until the intercept was gone>` or exits non-zero with the reason.
Used by tests/test_notebooks.py::test_killed_kernel_leaves_nothing_hijacked.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from jupyter_client.manager import KernelManager

CELL = '''%%tp intercept hello --port 9400
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"from a kernel about to die\\n"]
'''


def status() -> str:
    return subprocess.run(["tpnb", "status"], capture_output=True, text=True, timeout=30).stdout


def main() -> int:
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    for code in ("%load_ext tpnb", "%tp connect", CELL):
        reply = kc.execute_interactive(code, timeout=240)
        if reply["content"]["status"] != "ok":
            print(f"cell failed: {code!r}: {reply['content']}", file=sys.stderr)
            return 1
    if "hello: " not in status():
        print(f"no intercept after the cell:\n{status()}", file=sys.stderr)
        return 1
    body = subprocess.run(["curl", "-sS", "--max-time", "10", "http://hello.default"], capture_output=True,
                          text=True).stdout
    if "from a kernel about to die" not in body:
        print(f"the kernel did not answer: {body[:300]}", file=sys.stderr)
        return 1
    pid = km.provisioner.process.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    while "hello: " in status():
        if time.monotonic() - t0 > 15:
            print("the intercept outlived its killed kernel by 15 s", file=sys.stderr)
            return 1
        time.sleep(0.25)
    gone = time.monotonic() - t0
    kc.stop_channels()
    km.cleanup_resources()
    print(f"RESULT {gone:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
