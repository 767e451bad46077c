"""The README's first command: the seed's walkthrough, run as a newcomer runs it.

`scripts/demo` = install-deps + `tpnb devcluster up` + this script in a laptop;
the first two run before every test session already, so the test runs the
laptop part and checks the transcript the way a reader of the seed would.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent


def test_seed_walkthrough_transcript(devcluster: Any) -> None:
    devcluster.ensure_laptop("demo")
    r = subprocess.run(devcluster.laptop_cmd("demo", ["bash", str(REPO / "scripts" / "walkthrough.sh")]),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    out = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout)
    assert r.returncode == 0, out[-4000:]
    steps = out.split("\n$ ")
    step = {s.splitlines()[0]: "\n".join(s.splitlines()[1:]) for s in steps[1:]}

    before = next(v for k, v in step.items() if k.startswith("curl -sS --max-time 5 hello.default    #"))
    assert "Could not resolve host: hello.default" in before
    assert "Connected to context tpnb-dev" in step["tpnb connect"]
    assert "CLIENT VALUES:" in step["curl -sS hello.default"].split("$ ")[0]
    icpt = next(v for k, v in step.items() if k.startswith("tpnb intercept hello --port 9000"))
    assert "Using deployment hello" in icpt and "State         : ACTIVE" in icpt
    assert "Directory listing for /" in step["curl -sS hello"] and "file1.txt" in step["curl -sS hello"]
    after_leave = out.split("<ctrl>-C ends the intercepted server")[1]
    assert "CLIENT VALUES:" in after_leave.split("$ curl -sS --max-time 5 hello ")[0]
    pods = next(v for k, v in step.items() if k.startswith("kubectl get svc,deploy,pod"))
    assert re.search(r"pod/hello-\S+\s+2/2\s+Running", pods)
    mgr = next(v for k, v in step.items() if k.startswith("kubectl -n tpnb get"))
    assert "deployment.apps/traffic-manager" in mgr
    assert "Disconnecting...done" in step["tpnb quit --daemon"]
    last = steps[-1]
    assert last.startswith("curl -sS --max-time 5 hello.default") and "Could not resolve host" in last
