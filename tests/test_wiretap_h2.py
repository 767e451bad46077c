"""Wiretaps of HTTP/2 (h2c) end to end: a gRPC service's calls recorded one by one on a laptop.

The app is tests/greeter_app.py, a grpcio server run by the tpnb image's python3 in the dev cluster
(Deployment + Service `greeter`, port 50051; tests/greeter_rig.py).  Laptop `dev-a`
runs two wiretaps of it (`tpnb wiretap ... -o json`): one of every call, one filtered on the gRPC
metadata `x-dev: alice`.  A grpcio client in a pod calls through ONE channel -- one HTTP/2
connection to the agent -- unary, server-, client- and bidi-streaming calls, an error and 50
concurrent unary calls, with and without the metadata.  The client gets every answer from the app,
unchanged; each call is one record with its method as the path, HTTP status 200, its grpc-status
(OK, INVALID_ARGUMENT for the error) and its messages each way; the filtered wiretap has exactly the
alice calls.  Once the wiretaps end, the app still serves.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import LaptopRunner, stop_process_group
from greeter_rig import APP, PORT, deploy_greeter

pytestmark = pytest.mark.cluster

NS = "tpwireh2"
TARGET = f"greeter.{NS}:{PORT}"
G = "/greeter.Greeter/"


@pytest.fixture(scope="module")
def greeter(devcluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    a = LaptopRunner(devcluster, "dev-a")
    a.fresh_namespace(NS)
    deploy_greeter(a, NS)
    d = tmp_path_factory.mktemp("wireh2")
    os.chmod(d, 0o755)
    procs: list[subprocess.Popen[str]] = []
    yield {"a": a, "dir": d, "procs": procs}
    for p in procs:
        stop_process_group(p)
    a.drop_namespace(NS)


def _wiretap(g: dict[str, Any], name: str, *flags: str) -> tuple[subprocess.Popen[str], Path, Path]:
    out, err = (g["dir"] / f"{name}.{x}" for x in ("out", "err"))
    argv = g["a"].cmd(["tpnb", "wiretap", name, "-n", NS, "--workload", "greeter", *flags])
    with open(out, "w") as o, open(err, "w") as e:
        p = subprocess.Popen(argv, stdout=o, stderr=e, text=True, start_new_session=True)
    g["procs"].append(p)
    return p, out, err


def _wait_for(path: Path, text: str, proc: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        assert proc.poll() is None, f"ended early:\n{path.read_text()}"
        time.sleep(0.3)
    raise AssertionError(f"{text!r} not seen:\n{path.read_text()}")


def _check_from_pod(g: dict[str, Any], wants: str, calls: int = 50) -> dict[str, Any]:
    code = APP.read_text().replace("def check(target, header, wants, calls=300):",
                                   f"def check(target, header, wants, calls={calls}):")
    r = g["a"].kubectl("-n", NS, "exec", "-i", "deploy/caller", "--", "python3", "-", "--check", TARGET,
                       "x-dev", wants, input=code, timeout=300)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _answers_from_the_app(got: dict[str, Any], names: tuple[str, ...], calls: int) -> None:
    assert got["n"] == calls and got["nbad"] == 0, got
    for name in names:
        s = got["streams"][name]
        assert s["unary"] == f"hello {name} from app", s
        assert s["server"] == [f"hello {name} #{i} from app" for i in range(5)], s
        assert s["client"] == "64 messages, 4194304 bytes to app", s
        assert s["bidi"] == [f"{name}-{i} from app" for i in range(20)], s
        assert s["error"] == "INVALID_ARGUMENT: no such name (from app)", s


def test_wiretap_records_each_grpc_call_with_method_and_grpc_status(greeter: dict[str, Any]) -> None:
    a = greeter["a"]
    a.run(["tpnb", "connect", "-n", NS], timeout=240)
    p_all, out_all, err_all = _wiretap(greeter, "greeter", "-o", "json", "--max-body", "32", "--count", "60")
    _wait_for(err_all, "Wiretapping", p_all)
    p_al, out_al, err_al = _wiretap(greeter, "alice", "--http-header", "x-dev=alice", "--count", "30")
    _wait_for(out_al, "Wiretapping", p_al)

    got = _check_from_pod(greeter, "alice=app,=app")   # 2 x (unary, server, client, bidi, error) + 50 unary
    _answers_from_the_app(got, ("alice", "none"), 50)
    p_all.wait(120)
    p_al.wait(120)

    docs = [json.loads(ln) for ln in out_all.read_text().splitlines()]   # -o json: one record a line
    assert len(docs) == 60, docs[:2]
    assert all(d["type"] == "http" and d["http_version"] == "2" and d["method"] == "POST" and d["status"] == 200
               and d["duration_ms"] > 0 and not d["error"] for d in docs), docs[:2]
    count: dict[str, int] = {}
    for d in docs:
        count[d["path"]] = count.get(d["path"], 0) + 1
    assert count == {G + "SayHello": 54, G + "SayHellos": 2, G + "Collect": 2, G + "Chat": 2}, count
    codes = sorted(d["grpc_code"] for d in docs if d["path"] == G + "SayHello")
    assert codes == ["INVALID_ARGUMENT"] * 2 + ["OK"] * 52, codes
    fail = [d for d in docs if d["grpc_code"] == "INVALID_ARGUMENT"]
    assert all(d["grpc_message"] == "no such name (from app)" for d in fail), fail
    assert all(d["grpc_code"] == "OK" for d in docs if d["path"] != G + "SayHello")
    assert all((d["request_messages"], d["response_messages"]) == (1, 5) for d in docs if d["path"] == G + "SayHellos")
    assert all((d["request_messages"], d["response_messages"]) == (20, 20) for d in docs if d["path"] == G + "Chat")
    for d in (d for d in docs if d["path"] == G + "Collect"):   # 64 messages of 64 KiB; 32 bytes kept
        assert d["request_messages"] == 64 and d["request_bytes"] == 64 * (5 + 1 + 3 + 65536), d
        assert d["request_body"] == {"base64": "AAABAAQKgIAEeHh4eHh4eHh4eHh4eHh4eHh4eHh4eHg="}, d["request_body"]
        assert ["x-count", "64"] in d["response_trailers"], d
    unary = [d for d in docs if d["path"] == G + "SayHello" and d["grpc_code"] == "OK"]
    assert all(["grpc-status", "0"] in d["response_trailers"] for d in unary)
    assert sum(["x-dev", "alice"] in d["request_headers"] for d in docs) == 30
    assert "Wiretap greeter ended: 60 records, 0 dropped" in err_all.read_text()

    # the filtered wiretap: the CLI's lines, exactly the 30 calls with x-dev: alice
    lines = [ln for ln in out_al.read_text().splitlines() if f" POST {G}" in ln]
    assert len(lines) == 30, out_al.read_text()[-2000:]
    assert sum(bool(re.search(rf" POST {G}SayHello 200 OK [\d.]+ ms 1->1 msgs \d+ B$", ln)) for ln in lines) == 26
    assert any(re.search(rf" POST {G}SayHello 200 INVALID_ARGUMENT \(no such name \(from app\)\) [\d.]+ ms 1->0 msgs",
                         ln) for ln in lines), lines
    assert any(re.search(rf" POST {G}Chat 200 OK [\d.]+ ms 20->20 msgs", ln) for ln in lines), lines
    assert "Wiretap alice ended: 30 records, 0 dropped" in err_al.read_text()

    # the wiretaps are gone; the app serves as before
    _answers_from_the_app(_check_from_pod(greeter, "=app", calls=20), ("none",), 20)
