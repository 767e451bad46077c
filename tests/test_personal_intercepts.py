"""Personal intercepts (issue 12) end to end: two laptops intercept one workload by HTTP header.

Laptops `dev-a` and `dev-b` each run `tpnb intercept hello --http-header x-dev=...
-- their own server`; requests with dev-a's header reach dev-a's laptop, dev-b's
reach dev-b's, all others the app (the echoserver) -- from the laptops with curl
and from a pod with 1,000 requests over keep-alive connections that mix them.
A global intercept is refused naming the holder; `--http-header=auto` prints a
ready curl line that works; a filter on a port that does not speak HTTP fails.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import LaptopRunner, stop_process_group

pytestmark = pytest.mark.cluster

NS = "tppers"
ECHO = "tpnb.local/echoserver:1.4"

SERVER = r'''
import http.server, sys
port, tag = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = f"served by {tag} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''

#: run in the cluster: 1,000 requests over 10 keep-alive connections, headers mixed in each
MIXED = r'''
import http.client, json, sys
host = sys.argv[1]
plan = [("a", "served by dev-a"), ("b", "served by dev-b"), ("", "CLIENT VALUES:"), ("c", "CLIENT VALUES:")]
bad, conns, n = [], 10, 0
for c in range(conns):
    conn = http.client.HTTPConnection(host, 80, timeout=20)
    for i in range(100):
        who, want = plan[(c + i) % len(plan)]
        conn.request("GET", f"/r{c}-{i}", headers={"x-dev": who} if who else {})
        text = conn.getresponse().read().decode()
        n += 1
        if want not in text:
            bad.append((who, text[:80]))
    conn.close()
print(json.dumps({"n": n, "bad": bad[:5], "nbad": len(bad)}))
'''

BANNER = ("import socket\n"
          "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('0.0.0.0', 5000)); s.listen(16)\n"
          "while True:\n"
          "    c, _ = s.accept(); c.sendall(b'SSH-2.0-OpenSSH_9.2\\r\\n'); c.close()\n")


@pytest.fixture(scope="module")
def team(devcluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from tpnb.imageref import default_image

    a, b, c = (LaptopRunner(devcluster, n) for n in ("dev-a", "dev-b", "dev-c"))
    for lap in (a, b, c):
        lap.run(["tpnb", "quit", "--daemon"], check=False)
    a.kubectl("delete", "ns", NS, "--ignore-not-found", "--wait=true", timeout=180)
    a.kubectl("create", "ns", NS)
    a.kubectl("-n", NS, "create", "deploy", "hello", f"--image={ECHO}")
    a.kubectl("-n", NS, "expose", "deploy", "hello", "--port", "80", "--target-port", "8080")
    a.kubectl("-n", NS, "create", "deploy", "tcpapp", f"--image={default_image()}", "--",
              "python3", "-c", BANNER)
    a.kubectl("-n", NS, "expose", "deploy", "tcpapp", "--port", "5000", "--target-port", "5000")
    for d in ("hello", "tcpapp"):
        a.kubectl("-n", NS, "rollout", "status", f"deploy/{d}", "--timeout=120s", timeout=150)
    d = tmp_path_factory.mktemp("pers")
    os.chmod(d, 0o755)
    (d / "srv.py").write_text(SERVER)
    (d / "mixed.py").write_text(MIXED)
    procs: list[subprocess.Popen[bytes]] = []
    yield {"a": a, "b": b, "c": c, "dir": d, "procs": procs}
    for p in procs:
        stop_process_group(p)
    for lap in (a, b, c):
        lap.run(["tpnb", "quit", "--daemon"], check=False)
    a.kubectl("delete", "ns", NS, "--ignore-not-found", "--wait=false", check=False)


def _start(team: dict[str, Any], lap: LaptopRunner, tag: str, *flags: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = team["dir"] / f"{lap.name}-{len(team['procs'])}.log"
    with open(log, "w") as out:
        p = subprocess.Popen(lap.cmd(["tpnb", "intercept", "hello", "-n", NS, "--port", "9100", "--mount=false",
                                      *flags, "--", "python3", str(team["dir"] / "srv.py"), "9100", tag]),
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    team["procs"].append(p)
    return p, log


def _wait_serving(lap: LaptopRunner, log: Path, proc: subprocess.Popen[bytes], timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        assert proc.poll() is None, f"intercept in {lap.name} ended:\n{text}"
        if "State         : ACTIVE" in text:
            r = lap.run(["bash", "-c", "for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/9100) 2>/dev/null "
                                       "&& exit 0; sleep 0.1; done; exit 1"], check=False, timeout=30)
            assert r.returncode == 0
            return text
        time.sleep(0.5)
    raise AssertionError(f"no ACTIVE intercept in {lap.name}:\n{log.read_text()}")


def _curl(lap: LaptopRunner, *args: str) -> str:
    return lap.run(["curl", "-sS", "--max-time", "15", *args], check=False).stdout


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(60)


def test_two_laptops_intercept_one_workload_by_header(team: dict[str, Any]) -> None:
    a, b, c = team["a"], team["b"], team["c"]
    pa, la = _start(team, a, "dev-a", "--http-header", "x-dev=a")
    text = _wait_serving(a, la, pa)
    assert "Intercepting  : HTTP requests with header x-dev: a (others: the app)" in text
    assert f"Try           : curl -H 'x-dev: a' http://hello.{NS}/" in text
    pb_, lb = _start(team, b, "dev-b", "--http-header", "x-dev=b")
    _wait_serving(b, lb, pb_)

    # from the laptops: routed by the header, not by who asks
    for lap in (a, b):
        assert _curl(lap, "-H", "x-dev: a", f"http://hello.{NS}/p") == "served by dev-a /p\n"
        assert _curl(lap, "-H", "x-dev: b", f"http://hello.{NS}/q") == "served by dev-b /q\n"
        assert "CLIENT VALUES:" in _curl(lap, f"http://hello.{NS}/")
    # one curl, one keep-alive connection, three requests for three destinations
    out = _curl(a, "-H", "x-dev: b", f"http://hello.{NS}/1", "--next", f"http://hello.{NS}/2",
                "--next", "-H", "x-dev: a", f"http://hello.{NS}/3")
    assert out.startswith("served by dev-b /1\n") and "CLIENT VALUES:" in out and out.endswith("served by dev-a /3\n")

    # from a pod: 1,000 requests on keep-alive connections mixing the headers; none misrouted
    r = a.kubectl("-n", NS, "exec", "-i", "deploy/tcpapp", "--", "python3", "-", f"hello.{NS}",
                  input=MIXED, timeout=600)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["n"] == 1000 and got["nbad"] == 0, got

    # a global intercept is refused, naming a holder; so is the same header again
    r = c.run(["tpnb", "intercept", "hello", "-n", NS, "--port", "9100", "--mount=false", "--", "sleep", "5"],
              check=False, timeout=180)
    assert r.returncode != 0
    assert "is already intercepted by" in r.stderr and "personal intercept" in r.stderr, r.stderr
    r = c.run(["tpnb", "intercept", "hello", "-n", NS, "--port", "9100", "--mount=false", "--http-header",
               "x-dev=a", "--", "sleep", "5"], check=False, timeout=180)
    assert r.returncode != 0 and "same HTTP filters" in r.stderr, r.stderr
    # nothing was disturbed (dev-c's failed `intercept -- CMD` connected and disconnected again)
    assert _curl(a, "-H", "x-dev: a", f"http://hello.{NS}/p") == "served by dev-a /p\n"

    # dev-b leaves: its requests go to the app; dev-a's still reach dev-a
    _stop(pb_)
    assert "CLIENT VALUES:" in _curl(a, "-H", "x-dev: b", f"http://hello.{NS}/")
    assert _curl(a, "-H", "x-dev: a", f"http://hello.{NS}/p") == "served by dev-a /p\n"

    # --http-header=auto: a header unique to dev-b's session, and a curl line that works as printed
    pb2, lb2 = _start(team, b, "dev-b", "--http-header=auto", "--http-path-prefix", "/api")
    text = _wait_serving(b, lb2, pb2)
    m = re.search(r"Try           : curl -H '(x-tpnb-intercept: [\w.-]+)' (http://hello\.\S+/api)", text)
    assert m, text
    assert _curl(a, "-H", m.group(1), m.group(2) + "/x") == "served by dev-b /api/x\n"
    assert "CLIENT VALUES:" in _curl(a, "-H", m.group(1), f"http://hello.{NS}/other")   # path does not match
    _stop(pb2)
    _stop(pa)   # (each `intercept -- CMD` connected its laptop, and disconnects it now)
    code = ("import urllib.request as u; print(u.urlopen(u.Request('http://hello/', headers={'x-dev': 'a'}), "
            "timeout=10).read().decode())")
    assert "CLIENT VALUES:" in a.kubectl("-n", NS, "exec", "deploy/tcpapp", "--", "python3", "-c", code).stdout


def test_a_filter_on_a_port_that_does_not_speak_http_fails_clearly(team: dict[str, Any]) -> None:
    c = team["c"]
    r = c.run(["tpnb", "intercept", "tcpapp", "-n", NS, "--port", "9200", "--mount=false",
               "--http-header", "x-dev=c", "--", "sleep", "5"], check=False, timeout=300)
    assert r.returncode != 0
    assert "does not speak HTTP" in r.stderr and "SSH-2.0" in r.stderr, r.stderr
    # the app still answers its clients through the agent, and nothing is left intercepted
    assert "tcpapp" not in c.run(["tpnb", "status"], check=False).stdout.split("Intercepts")[-1]
    out = c.kubectl("-n", NS, "exec", "deploy/hello", "-c", "traffic-agent", "--", "python3", "-c",
                    "import socket; s=socket.create_connection(('tcpapp', 5000), 5); print(s.recv(100))",
                    timeout=60).stdout
    assert "SSH-2.0" in out
