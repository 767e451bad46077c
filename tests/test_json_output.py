"""`-o json` end to end (issue 10): the real CLI in its own laptop namespace and
cluster namespace, so it cannot disturb the other cluster tests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from typing import Any, Iterator

import pytest

from conftest import LaptopRunner
from tpnb import render
from tpnb.api import DataPlane, Intercept, Status

pytestmark = pytest.mark.cluster

NS = "tpjson"
ECHO = "tpnb.local/echoserver:1.4"
PORT = 9400


@pytest.fixture(scope="module")
def lap(devcluster: Any) -> Iterator[LaptopRunner]:
    lap = LaptopRunner(devcluster, "json")
    lap.fresh_namespace(NS, timeout=120)
    lap.kubectl("-n", NS, "create", "deploy", "hello", f"--image={ECHO}")
    lap.kubectl("-n", NS, "expose", "deploy", "hello", "--port", "80", "--target-port", "8080")
    lap.kubectl("-n", NS, "rollout", "status", "deploy/hello", "--timeout=120s", timeout=150)
    yield lap
    lap.drop_namespace(NS)


@pytest.fixture()
def server(lap: LaptopRunner) -> Iterator[int]:
    """A local HTTP server in the laptop on 127.0.0.1:PORT (the intercept's destination)."""
    code = ("import http.server as h\nclass H(h.BaseHTTPRequestHandler):\n def do_GET(s):\n"
            "  s.send_response(200);s.end_headers();s.wfile.write(b'from the json laptop')\n"
            f"h.HTTPServer(('127.0.0.1',{PORT}),H).serve_forever()")
    proc = subprocess.Popen(lap.cmd(["python3", "-c", code]), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = lap.run(["bash", "-c", f"for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/{PORT}) 2>/dev/null "
                                   "&& exit 0; sleep 0.1; done; exit 1"], check=False, timeout=30)
        assert r.returncode == 0, "the local server did not start"
        yield PORT
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def _json(lap: LaptopRunner, *argv: str, timeout: float = 120, check: bool = True) -> tuple[Any, Any]:
    """Run `tpnb ARGV -o json`; (parsed stdout, the CompletedProcess).  stdout must be one JSON document."""
    r = lap.run(["tpnb", *argv, "-o", "json"], timeout=timeout, check=check)
    return json.loads(r.stdout), r


def _status_from(doc: dict[str, Any]) -> Status:
    return Status(**{**doc, "intercepts": [Intercept(**i) for i in doc["intercepts"]],
                     "data_plane": DataPlane(**doc["data_plane"])})


def test_connect_status_list_intercept_leave_quit_as_json(lap: LaptopRunner, server: int) -> None:
    st, r = _json(lap, "connect", "--namespace", NS)
    assert st["connected"] is True and st["context"] == "tpnb-dev", r.stdout
    assert "Connected to context tpnb-dev" in r.stderr  # the text lines went to stderr

    st, _ = _json(lap, "status")
    assert st["connected"] is True and st["daemon_running"] is True
    assert st["context"] == "tpnb-dev" and st["server"] == "https://10.250.0.1:6443"
    assert st["namespace"] == NS and st["intercepts"] == []
    # the text form is unchanged: the very text render.status_text gives for that status
    text = lap.run(["tpnb", "status"]).stdout
    assert text.startswith("tpnb daemon: running") and "Connected to context tpnb-dev (https://10.250.0.1:6443)" in text
    assert text == render.status_text(_status_from(st)) + "\n"

    ws, _ = _json(lap, "list", "--namespace", NS)
    hello = next(w for w in ws if w["name"] == "hello")
    assert hello["namespace"] == NS and hello["kind"] == "Deployment" and hello["intercept"] is None
    assert isinstance(hello["state"], str) and hello["state"]
    assert any(s.startswith("hello") for s in hello["services"])

    doc, r = _json(lap, "intercept", "hello", "--namespace", NS, "--port", str(server), timeout=240)
    ic = doc["intercept"]
    assert ic["name"] == "hello" and ic["state"] == "ACTIVE" and ic["workload"] == "hello"
    assert ic["namespace"] == NS and ic["local_port"] == server and ic["kind"] == "Deployment"
    if "volumes not mounted" not in r.stderr:
        assert doc["mount_point"] and os.path.isabs(doc["mount_point"])
    else:
        assert doc["mount_point"] is None
    assert "Using deployment" not in r.stdout
    assert lap.run(["curl", "-sS", "--max-time", "10", f"hello.{NS}"]).stdout == "from the json laptop"

    st, _ = _json(lap, "status")
    assert [(i["name"], i["state"]) for i in st["intercepts"]] == [("hello", "ACTIVE")]
    ws, _ = _json(lap, "list", "--namespace", NS)
    hello = next(w for w in ws if w["name"] == "hello")
    assert hello["intercept"]["name"] == "hello" and hello["agent_installed"] is True

    doc, _ = _json(lap, "leave", "hello")
    assert doc == {"left": "hello"}
    assert _json(lap, "status")[0]["intercepts"] == []
    doc, r = _json(lap, "quit")
    assert doc == {"daemon_was_running": True, "was_connected": True, "daemon_stopped": False}
    assert "Disconnecting...done" in r.stderr
    assert _json(lap, "status")[0]["connected"] is False


def test_intercept_json_then_the_command(lap: LaptopRunner) -> None:
    lap.run(["tpnb", "connect", "--namespace", NS], timeout=120)
    try:
        r = lap.run(["tpnb", "intercept", "hello", "--namespace", NS, "--port", "9401", "--mount=false",
                     "-o", "json", "--", "sh", "-c", "echo the-command-ran"], timeout=240)
        doc, end = json.JSONDecoder().raw_decode(r.stdout)  # the document first, then the command's output
        assert doc["intercept"]["name"] == "hello" and doc["intercept"]["state"] == "ACTIVE"
        assert doc["mount_point"] is None
        assert r.stdout[end:].strip() == "the-command-ran"
        assert _json(lap, "status")[0]["intercepts"] == []  # ended with the command
    finally:
        lap.run(["tpnb", "quit"], check=False)


def test_errors_as_json_keep_the_exit_status(lap: LaptopRunner) -> None:
    lap.run(["tpnb", "quit", "--daemon"], check=False)
    doc, r = _json(lap, "list", check=False)
    assert r.returncode == 5 and set(doc) == {"error"}
    assert doc["error"]["what"] == "not connected" and doc["error"]["fix"]
    assert r.stderr.startswith("not connected\n")

    lap.run(["tpnb", "connect", "--namespace", NS], timeout=120)
    try:
        doc, r = _json(lap, "intercept", "hello", "--namespace", NS, "--port", "9555", check=False, timeout=240)
        assert r.returncode != 0 and "nothing listens on 127.0.0.1:9555" in doc["error"]["why"] + doc["error"]["what"]
        assert "Traceback" not in r.stderr
    finally:
        lap.run(["tpnb", "quit", "--daemon"], check=False)
