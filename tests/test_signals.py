"""`kill -TERM` of `tpnb intercept ... -- python3 -m http.server 9000` (issue 13), end to end.

Real CLI in a laptop namespace of the dev cluster: the server and the intercept must both be gone
within 2 s, and the cluster's own app answers again.
"""
from __future__ import annotations

import signal
import subprocess
import time
from typing import Any, Iterator

import pytest

from conftest import LaptopRunner

pytestmark = pytest.mark.cluster

NS = "tpsig"
ECHO = "tpnb.local/echoserver:1.4"


@pytest.fixture(scope="module")
def lap(devcluster: Any) -> Iterator[LaptopRunner]:
    a = LaptopRunner(devcluster, "sig")
    a.fresh_namespace(NS)
    a.kubectl("-n", NS, "create", "deploy", "hello", f"--image={ECHO}")
    a.kubectl("-n", NS, "expose", "deploy", "hello", "--port", "80", "--target-port", "8080")
    a.kubectl("-n", NS, "rollout", "status", "deploy/hello", "--timeout=120s", timeout=150)
    yield a
    a.drop_namespace(NS)


def _from_cluster(lap: LaptopRunner) -> str:
    code = f"import urllib.request;print(urllib.request.urlopen('http://hello.{NS}/', timeout=10).read().decode())"
    r = lap.kubectl("-n", NS, "exec", "deploy/hello", "-c", "traffic-agent", "--", "python3", "-c", code,
                    check=False, timeout=60)
    return r.stdout + r.stderr


def _listens(lap: LaptopRunner, port: int) -> bool:
    return lap.run(["bash", "-c", f"(echo > /dev/tcp/127.0.0.1/{port}) 2>/dev/null"], check=False).returncode == 0


@pytest.mark.timeout(600)
def test_kill_term_ends_the_server_and_the_intercept_within_2s(lap: LaptopRunner) -> None:
    lap.run(["tpnb", "connect", "--namespace", NS], timeout=120)
    proc = subprocess.Popen(lap.cmd(["tpnb", "intercept", "hello", "--port", "9000", "--mount=false",
                                     "--", "python3", "-m", "http.server", "9000"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (_listens(lap, 9000) and "(ACTIVE)" in lap.run(["tpnb", "status"], check=False).stdout):
            assert time.monotonic() < deadline and proc.poll() is None, "intercept never became ACTIVE"
            time.sleep(0.3)
        assert "Directory listing for /" in _from_cluster(lap)  # the cluster reaches the laptop's server
        cli = lap.run(["pgrep", "-f", "-n", "^[^ ]*python[^ ]* .*tpnb intercept hello --port 9000"]).stdout.strip()
        t0 = time.monotonic()
        lap.run(["kill", "-TERM", cli])
        ended = None
        while time.monotonic() - t0 < 10:
            server_up = _listens(lap, 9000)
            intercepted = "hello: " in lap.run(["tpnb", "status"], check=False).stdout
            if not server_up and not intercepted:
                ended = time.monotonic() - t0
                break
            time.sleep(0.05)
        assert ended is not None and ended < 2.0, f"server or intercept still there after {ended or 10:.1f} s"
        rc = proc.wait(10)
        out = proc.stdout.read() if proc.stdout else ""
        assert rc == 128 + signal.SIGTERM, out
        assert "Traceback" not in out, out
        assert lap.run(["pgrep", "-f", "http.server 9000"], check=False).stdout.strip() == ""
        assert "CLIENT VALUES:" in _from_cluster(lap)  # the cluster's app answers again
    finally:
        proc.kill()
        lap.run(["tpnb", "quit"], check=False)
