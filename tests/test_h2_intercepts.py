"""Personal intercepts over HTTP/2 end to end: a gRPC service intercepted by metadata header.

The app is tests/greeter_app.py, a grpcio server run by the tpnb image's python3 in the dev cluster
(Deployment + Service `greeter`, port 50051).  Laptops `dev-a` and `dev-b` each run `tpnb intercept
greeter --http-header x-dev=... -- python3 greeter_app.py --serve 9300 dev-a|dev-b`.  A grpcio
client in a pod (and one on a laptop) calls through ONE channel -- one HTTP/2 connection to the
agent: calls with x-dev=alice metadata are answered by dev-a's servicer, x-dev=bob by dev-b's, all
others by the app; unary, server-, client- and bidi-streaming calls, a gRPC error status, and 300
concurrent unary calls mixing them with none misrouted.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import LaptopRunner, stop_process_group
from greeter_rig import APP, PORT, deploy_greeter

pytestmark = pytest.mark.cluster

NS = "tph2"
TARGET = f"greeter.{NS}:{PORT}"


@pytest.fixture(scope="module")
def team(devcluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    a, b = (LaptopRunner(devcluster, n) for n in ("dev-a", "dev-b"))
    b.run(["tpnb", "quit", "--daemon"], check=False)
    a.fresh_namespace(NS)
    deploy_greeter(a, NS)
    d = tmp_path_factory.mktemp("h2")
    os.chmod(d, 0o755)
    procs: list[subprocess.Popen[bytes]] = []
    yield {"a": a, "b": b, "dir": d, "procs": procs}
    for p in procs:
        stop_process_group(p)
    b.run(["tpnb", "quit", "--daemon"], check=False)
    a.drop_namespace(NS)


def _start(team: dict[str, Any], lap: LaptopRunner, tag: str, *flags: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = team["dir"] / f"{lap.name}-{len(team['procs'])}.log"
    with open(log, "w") as out:
        p = subprocess.Popen(lap.cmd(["tpnb", "intercept", "greeter", "-n", NS, "--port", "9300", "--mount=false",
                                      *flags, "--", sys.executable, str(APP), "--serve", "9300", tag]),
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    team["procs"].append(p)
    return p, log


def _wait_serving(lap: LaptopRunner, log: Path, proc: subprocess.Popen[bytes], timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        assert proc.poll() is None, f"intercept in {lap.name} ended:\n{text}"
        if "State         : ACTIVE" in text and "serving greeter.Greeter" in text:
            return text
        time.sleep(0.5)
    raise AssertionError(f"no ACTIVE intercept in {lap.name}:\n{log.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(60)


def _check_from_pod(team: dict[str, Any], wants: str) -> dict[str, Any]:
    r = team["a"].kubectl("-n", NS, "exec", "-i", "deploy/caller", "--", "python3", "-", "--check", TARGET,
                          "x-dev", wants, input=APP.read_text(), timeout=300)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _assert_streams(got: dict[str, Any], name: str, tag: str) -> None:
    s = got["streams"][name]
    assert s["unary"] == f"hello {name} from {tag}", s
    assert s["server"] == [f"hello {name} #{i} from {tag}" for i in range(5)], s
    assert s["client"] == f"64 messages, 4194304 bytes to {tag}", s
    assert s["bidi"] == [f"{name}-{i} from {tag}" for i in range(20)], s
    assert s["error"] == f"INVALID_ARGUMENT: no such name (from {tag})", s


def test_grpc_calls_are_routed_by_metadata_stream_by_stream(team: dict[str, Any]) -> None:
    a, b = team["a"], team["b"]
    pa, la = _start(team, a, "dev-a", "--http-header", "x-dev=alice")
    text = _wait_serving(a, la, pa)
    assert "Intercepting  : HTTP requests with header x-dev: alice (others: the app)" in text
    # the agent found the port speaks h2c: a ready grpcurl line (to the pod's agent: no Service port given)
    assert re.search(r"Try           : grpcurl -plaintext -H 'x-dev: alice' 10\.\d+\.\d+\.\d+:\d+ list\n", text), text
    pb_, lb = _start(team, b, "dev-b", "--http-header", "x-dev=bob")
    _wait_serving(b, lb, pb_)

    # from a pod: one channel, every kind of call, and 300 concurrent calls mixing the headers
    got = _check_from_pod(team, "alice=dev-a,bob=dev-b,=app,carol=app")
    assert got["n"] == 300 and got["nbad"] == 0, got
    for name, tag in (("alice", "dev-a"), ("bob", "dev-b"), ("none", "app"), ("carol", "app")):
        _assert_streams(got, name, tag)

    # from a laptop (through its TUN): the same routing, whoever asks
    r = b.run([sys.executable, str(APP), "--check", TARGET, "x-dev", "alice=dev-a,=app"], timeout=300)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["n"] == 300 and got["nbad"] == 0, got
    _assert_streams(got, "alice", "dev-a")

    # dev-b leaves: bob's calls go to the app; alice's still reach dev-a
    _stop(pb_)
    got = _check_from_pod(team, "bob=app,alice=dev-a")
    assert got["nbad"] == 0, got
    _stop(pa)
    got = _check_from_pod(team, "alice=app,=app")
    assert got["nbad"] == 0, got
    _assert_streams(got, "alice", "app")
