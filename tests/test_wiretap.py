"""Wiretaps (issue 12) end to end on the dev cluster: a copy of what the app serves, on the laptop.

* `%tp wiretap hello` in a real kernel in laptop `wire-a` while a pod sends 200 requests: the
  kernel's live list holds all 200 with status and latency, byte for byte what the app answered;
  the kernel killed mid-stream leaves the app serving (no failed request) and the wiretap removed.
* `tpnb wiretap`: one line per request, `-o json` one JSON document per line; a reader that is
  stopped (SIGSTOP) does not slow the app's answers: records are dropped and counted (in the
  stream and in `tpnb status`).
* Another session (laptop `wire-b`) does not see the wiretap, cannot watch or remove it -- tried
  for real against the manager's API with its own session, and against the agent API as a pod --
  while its own wiretap and its personal intercept of the same workload work beside it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import LaptopRunner, stop_process_group

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_personal_intercepts import SERVER  # noqa: E402  (the laptops' HTTP server)
from wiretap_kernel_check import LOAD  # noqa: E402

pytestmark = pytest.mark.cluster

NS = "tpwire"
ECHO = "tpnb.local/echoserver:1.4"
REPO = Path(__file__).resolve().parent.parent


#: as a pod: call the manager's agent API (the traffic-manager Service) with a made-up agent id
FORGE = r'''
import grpc, json
from tpnb.proto import pb, rpc
ch = grpc.insecure_channel("traffic-manager.tpnb:8082")
hub = rpc.AgentHubStub(ch)
out = {}
try:
    hub.UploadWiretap(iter([pb.WiretapUpload(agent_id="0" * 32, records=[pb.WiretapRecord(target=b"/forged")])]),
                      timeout=10)
    out["upload"] = "OK"
except grpc.RpcError as e:
    out["upload"] = e.code().name
try:
    hub.ArriveAsAgent(pb.AgentInfo(name="hello", namespace="tpwire", pod_name="loader"), timeout=10)
    out["arrive"] = "OK"
except grpc.RpcError as e:
    out["arrive"] = e.code().name
print(json.dumps(out))
'''

#: in laptop wire-b: its own session at the manager (through kubectl port-forward, as any user with
#: pods/portforward could), then try to read and remove wire-a's wiretap by name
MALLORY = r'''
import grpc, json, subprocess, sys, time
pod = sys.argv[1]
pf = subprocess.Popen(["kubectl", "-n", "tpnb", "port-forward", f"pod/{pod}", "18081:8081"],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
try:
    pf.stdout.readline()
    from tpnb.proto import pb, rpc
    stub = rpc.ManagerStub(grpc.insecure_channel("127.0.0.1:18081"))
    me = stub.ArriveAsClient(pb.ClientInfo(name="mallory@wire-b"), timeout=10)
    out = {}
    try:
        first = next(iter(stub.WatchWiretap(pb.WiretapRef(session_id=me.session_id, name="hello"), timeout=5)))
        out["watch"] = "GOT " + str(first)[:80]
    except grpc.RpcError as e:
        out["watch"] = e.code().name
    try:
        stub.RemoveWiretap(pb.WiretapRef(session_id=me.session_id, name="hello"), timeout=5)
        out["remove"] = "OK"
    except grpc.RpcError as e:
        out["remove"] = e.code().name
    lst = next(iter(stub.WatchIntercepts(me, timeout=5)))
    out["listed"] = [w.spec.name for w in lst.wiretaps]
    stub.Depart(me, timeout=5)
    print(json.dumps(out))
finally:
    pf.terminate()
    pf.wait(10)
'''


@pytest.fixture(scope="module")
def wire(devcluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from tpnb.imageref import default_image

    a, b = LaptopRunner(devcluster, "wire-a"), LaptopRunner(devcluster, "wire-b")
    for lap in (a, b):
        lap.run(["tpnb", "quit", "--daemon"], check=False)
    a.kubectl("delete", "ns", NS, "--ignore-not-found", "--wait=true", timeout=180)
    a.kubectl("create", "ns", NS)
    a.kubectl("-n", NS, "create", "deploy", "hello", f"--image={ECHO}")
    a.kubectl("-n", NS, "expose", "deploy", "hello", "--port", "80", "--target-port", "8080")
    a.kubectl("-n", NS, "run", "loader", f"--image={default_image()}", "--image-pull-policy=Never",
              "--restart=Never", "--command", "--", "sleep", "infinity")
    a.kubectl("-n", NS, "rollout", "status", "deploy/hello", "--timeout=120s", timeout=150)
    a.kubectl("-n", NS, "wait", "pod/loader", "--for=condition=Ready", "--timeout=120s", timeout=150)
    d = tmp_path_factory.mktemp("wire")
    os.chmod(d, 0o755)
    (d / "srv.py").write_text(SERVER)
    (d / "mallory.py").write_text(MALLORY)
    procs: list[subprocess.Popen[str]] = []
    yield {"a": a, "b": b, "dir": d, "procs": procs}
    for p in procs:
        stop_process_group(p)
    for lap in (a, b):
        lap.run(["tpnb", "quit", "--daemon"], check=False)
    a.kubectl("delete", "ns", NS, "--ignore-not-found", "--wait=false", check=False)


def _load(lap: LaptopRunner, n: int, tag: str, delay: float = 0.0, pad: int = 0) -> list[list[Any]]:
    """n requests from the loader pod; [path, status, body, ms, error] each."""
    code = LOAD if not pad else LOAD.replace('headers={"x-wire": tag}', f'headers={{"x-wire": tag, "x-pad": "p" * {pad}}}')
    r = lap.kubectl("-n", NS, "exec", "loader", "--", "python3", "-c", code, f"hello.{NS}", str(n), str(delay), tag,
                    timeout=600)
    return json.loads(r.stdout)


def _ok(results: list[list[Any]]) -> None:
    bad = [r for r in results if r[1] != 200 or "CLIENT VALUES" not in r[2]]
    assert not bad, bad[:3]


def _wiretap(wire: dict[str, Any], lap: LaptopRunner, *flags: str, env: dict[str, str] | None = None
             ) -> tuple[subprocess.Popen[str], Path, Path]:
    out, err = (wire["dir"] / f"{lap.name}-{len(wire['procs'])}.{x}" for x in ("out", "err"))
    argv = lap.cmd(["env", *[f"{k}={v}" for k, v in (env or {}).items()], "tpnb", "wiretap", "hello", "-n", NS,
                    *flags])
    with open(out, "w") as o, open(err, "w") as e:
        p = subprocess.Popen(argv, stdout=o, stderr=e, text=True, start_new_session=True)
    wire["procs"].append(p)
    return p, out, err


def _wait_for(path: Path, text: str, proc: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        assert proc.poll() is None, f"ended early:\n{path.read_text()}"
        time.sleep(0.3)
    raise AssertionError(f"{text!r} not seen:\n{path.read_text()}")


def _status(lap: LaptopRunner) -> dict[str, Any]:
    return json.loads(lap.run(["tpnb", "status", "-o", "json"]).stdout)


def _no_wiretaps(lap: LaptopRunner, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while _status(lap)["wiretaps"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)
    return True


def test_kernel_wiretap_records_every_request_and_a_killed_kernel_leaves_the_app_serving(wire: dict[str, Any]) -> None:
    a = wire["a"]
    a.run(["tpnb", "connect", "-n", NS], timeout=240)
    res = subprocess.run(a.cmd([sys.executable, str(REPO / "tests" / "wiretap_kernel_check.py"), NS]),
                         capture_output=True, text=True, timeout=900, cwd=REPO)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    one = json.loads(res.stdout.split("RESULT1 ", 1)[1].splitlines()[0])
    pod, kern = one["pod"], one["kernel"]
    _ok(pod)
    assert kern["ok"] and kern["running"] and kern["dropped"] == 0 and kern["df"][0] == 200, kern["df"]
    assert kern["df_cols"] == ["time", "type", "method", "path", "query", "status", "duration_ms"]
    assert kern["status_wiretaps"] == ["hello"]
    recs = {r[0]: r for r in kern["records"]}
    assert sorted(recs) == sorted(p[0] for p in pod)  # all 200, each once
    for path, status, body, _ms, _err in pod:
        _p, st, latency, copy, kind, method = recs[path]
        assert (st, kind, method) == (status, "http", "GET") and latency > 0
        assert copy == body  # the copy is byte for byte what the app answered the pod (under max_body)
    two = json.loads(res.stdout.split("RESULT2 ", 1)[1].splitlines()[0])
    assert two["loader_rc"] == 0 and len(two["pod"]) == 300, two["loader_err"]
    _ok(two["pod"])  # the app kept serving while the kernel died: no failed request
    assert two["gone"] is not None and two["gone"] <= 10, two
    _ok(_load(a, 20, "after"))
    assert _no_wiretaps(a)


def test_cli_lines_json_lines_and_a_stopped_reader_costs_drops_not_latency(wire: dict[str, Any]) -> None:
    a = wire["a"]
    a.run(["tpnb", "connect", "-n", NS], timeout=240)
    p, out, err = _wiretap(wire, a, "--count", "20")
    _wait_for(out, "Wiretapping", p)
    _ok(_load(a, 20, "cli"))
    p.wait(60)
    lines = [ln for ln in out.read_text().splitlines() if " GET " in ln]
    assert len(lines) == 20 and all(re.search(r" GET /cli-\d+ 200 [\d.]+ ms \d+ B$", ln) for ln in lines), lines[:3]
    assert "Wiretap hello ended: 20 records, 0 dropped" in err.read_text()

    p, out, err = _wiretap(wire, a, "--count", "20", "-o", "json")
    _wait_for(err, "Wiretapping", p)
    _ok(_load(a, 20, "js"))
    p.wait(60)
    docs = [json.loads(ln) for ln in out.read_text().splitlines()]  # stdout: only JSON lines
    assert len(docs) == 20 and {d["status"] for d in docs} == {200} and all(d["duration_ms"] > 0 for d in docs)
    assert sorted(d["path"] for d in docs) == sorted(f"/js-{i}" for i in range(20))
    assert all("CLIENT VALUES" in d["response_body"] and ["x-wire", "js"] in d["request_headers"] for d in docs)

    # a reader that stops reading: the app's answers do not wait for it
    base = _load(a, 400, "base", pad=2000)
    _ok(base)
    p, out, err = _wiretap(wire, a, "-o", "json", env={"TPNB_WIRETAP_BUFFER": "50"})
    _wait_for(err, "Wiretapping", p)
    os.killpg(p.pid, signal.SIGSTOP)
    try:
        stalled = _load(a, 3000, "stall", pad=2000)
        _ok(stalled)
        deadline = time.monotonic() + 20
        while True:
            taps = _status(a)["wiretaps"]
            if taps and taps[0]["dropped"] > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert taps and taps[0]["dropped"] > 0, taps  # counted, and shown by `tpnb status`
        assert re.search(r"hello: tpwire/hello \(ACTIVE, \d+ records, [1-9]\d* dropped\)", a.run(["tpnb", "status"]).stdout)
        assert re.search(r"wiretapped by me \(\d+ records, [1-9]\d* dropped\)", a.run(["tpnb", "list", "-n", NS]).stdout)
    finally:
        os.killpg(p.pid, signal.SIGCONT)
    p50_base = statistics.median(r[3] for r in base)
    p50_stall = statistics.median(r[3] for r in stalled)
    print(f"p50 without a wiretap {p50_base:.2f} ms, with a stopped reader {p50_stall:.2f} ms")
    assert p50_stall < p50_base * 2 + 2.0, (p50_base, p50_stall)
    time.sleep(3)
    os.killpg(p.pid, signal.SIGTERM)  # SIGTERM ends it like ^C, and removes it
    p.wait(60)
    docs = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert docs and docs[-1]["dropped"] > 0 and len(docs) < 3000
    assert "dropped so far" in err.read_text() and "Wiretap hello ended:" in err.read_text()
    assert _no_wiretaps(a)

    # `tpnb quit` ends a running wiretap (the CLI says why and exits)
    p, out, err = _wiretap(wire, a)
    _wait_for(out, "Wiretapping", p)
    a.run(["tpnb", "quit"], timeout=60)
    p.wait(20)
    assert "(the session ended (tpnb quit))" in err.read_text(), err.read_text()
    a.run(["tpnb", "connect", "-n", NS], timeout=240)  # so the fixture's `quit --daemon` ends the root daemon too


def test_another_session_cannot_see_or_touch_a_wiretap_and_its_own_work_beside_it(wire: dict[str, Any]) -> None:
    a, b, d = wire["a"], wire["b"], wire["dir"]
    a.run(["tpnb", "connect", "-n", NS], timeout=240)
    b.run(["tpnb", "connect", "-n", NS], timeout=240)
    pa, out_a, err_a = _wiretap(wire, a, "-o", "json")
    _wait_for(err_a, "Wiretapping", pa)
    # wire-b sees nothing of it, and its `leave` cannot end it
    assert not _status(b)["wiretaps"]
    r = b.run(["tpnb", "leave", "hello"], check=False)
    assert r.returncode != 0 and "no intercept named 'hello'" in r.stdout + r.stderr
    # for real against the manager, with a session of its own
    mgr = b.kubectl("-n", "tpnb", "get", "pod", "-l", "app.kubernetes.io/name=traffic-manager", "-o",
                    "jsonpath={.items[0].metadata.name}").stdout.strip()
    got = json.loads(b.run([sys.executable, str(d / "mallory.py"), mgr], timeout=60).stdout)
    assert got == {"watch": "NOT_FOUND", "remove": "NOT_FOUND", "listed": []}, got
    # and as a pod against the agents' API: no agent session, no token -> refused
    forged = json.loads(a.kubectl("-n", NS, "exec", "loader", "--", "python3", "-c", FORGE, timeout=60).stdout)
    assert forged == {"upload": "NOT_FOUND", "arrive": "UNAUTHENTICATED"}, forged
    # wire-b's own wiretap and personal intercept of the same workload work beside wire-a's
    pb_, out_b, err_b = _wiretap(wire, b, "-o", "json")
    _wait_for(err_b, "Wiretapping", pb_)
    log = d / "intercept-b.log"
    with open(log, "w") as o:
        pi = subprocess.Popen(b.cmd(["tpnb", "intercept", "hello", "-n", NS, "--port", "9100", "--mount=false",
                                     "--http-header", "x-wire=mine", "--", "python3", str(d / "srv.py"), "9100", "b"]),
                              stdout=o, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wire["procs"].append(pi)
    _wait_for(log, "State         : ACTIVE", pi)
    time.sleep(1)
    _ok(_load(a, 30, "both"))
    mine = _load(a, 10, "mine")  # x-wire: mine -> wire-b's laptop, not the app
    assert all(r[1] == 200 and r[2].startswith("served by b /mine-") for r in mine), mine[:2]
    time.sleep(2)
    a.run(["tpnb", "leave", "hello"])  # ends wire-a's wiretap (no intercept of that name there)
    pa.wait(30)
    assert "ended by `tpnb leave`" in err_a.read_text(), err_a.read_text()
    os.killpg(pb_.pid, signal.SIGINT)
    pb_.wait(60)
    os.killpg(pi.pid, signal.SIGINT)
    pi.wait(60)
    for out in (out_a, out_b):
        paths = [json.loads(ln)["path"] for ln in out.read_text().splitlines()]
        assert sorted(p for p in paths if p.startswith("/both-")) == sorted(f"/both-{i}" for i in range(30)), paths
        assert not [p for p in paths if p.startswith("/mine-")]  # served by a laptop, not the app: not copied
    assert _no_wiretaps(a) and _no_wiretaps(b)
