"""`tpnb intercept` end to end (issue 4): cluster traffic served by the laptop.

Real CLI in laptop namespaces of the dev cluster; cluster-side traffic comes
from inside the intercepted pod's own agent container (it has python3).
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

from conftest import LaptopRunner

pytestmark = pytest.mark.cluster

NS, NS2 = "tpic", "tpic2"
ECHO = "tpnb.local/echoserver:1.4"


def _deploy(lap: LaptopRunner, ns: str, name: str, service: bool = True) -> None:
    lap.kubectl("-n", ns, "create", "deploy", name, f"--image={ECHO}")
    if service:
        lap.kubectl("-n", ns, "expose", "deploy", name, "--port", "80", "--target-port", "8080")
    lap.kubectl("-n", ns, "rollout", "status", f"deploy/{name}", "--timeout=120s", timeout=150)


@pytest.fixture(scope="module")
def laps(devcluster: Any) -> Iterator[tuple[LaptopRunner, LaptopRunner]]:
    a, b = LaptopRunner(devcluster, "ica"), LaptopRunner(devcluster, "icb")
    for lap in (a, b):
        lap.run(["tpnb", "quit", "--daemon"], check=False)
    for ns in (NS, NS2):
        a.kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=true", timeout=180)
        a.kubectl("create", "ns", ns)
    _deploy(a, NS, "hello")
    _deploy(a, NS2, "hello2")
    _deploy(a, NS, "lonely", service=False)
    yield a, b
    for lap in (a, b):
        lap.run(["tpnb", "quit", "--daemon"], check=False)
    for ns in (NS, NS2):
        a.kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=false", check=False)


def _from_cluster(lap: LaptopRunner, url: str, ns: str = NS, workload: str = "hello") -> str:
    """GET url from inside the cluster (the intercepted pod's agent container)."""
    code = f"import urllib.request;print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
    r = lap.kubectl("-n", ns, "exec", f"deploy/{workload}", "-c", "traffic-agent", "--", "python3", "-c", code,
                    check=False, timeout=60)
    return r.stdout + r.stderr


def _wait_active(lap: LaptopRunner, name: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = lap.run(["tpnb", "status"], check=False).stdout
        if f"{name}: " in st and "(ACTIVE)" in st:
            return
        time.sleep(0.5)
    raise AssertionError(f"intercept {name} never became ACTIVE:\n{st}")


def _wait_listening(lap: LaptopRunner, port: int, timeout: float = 30) -> None:
    """The intercept is ACTIVE before its command starts: wait until the command serves."""
    r = lap.run(["bash", "-c", f"for i in $(seq {int(timeout * 10)}); do "
                               f"(echo > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && exit 0; sleep 0.1; done; exit 1"],
                check=False, timeout=timeout + 10)
    assert r.returncode == 0, f"nothing listens on 127.0.0.1:{port} in laptop {lap.name}"


def test_intercept_with_a_command_like_the_seed(laps: tuple[LaptopRunner, LaptopRunner], tmp_path: Path) -> None:
    a, _ = laps
    www = tmp_path / "www"
    www.mkdir()
    (www / "file1.txt").write_text("one\n")
    (www / "file2.txt").write_text("two\n")
    os.chmod(tmp_path, 0o755)
    log = tmp_path / "intercept.log"
    # no session yet: intercept connects first and disconnects when the command ends
    with open(log, "w") as out:
        proc = subprocess.Popen(
            a.cmd(["sh", "-c", f"cd {www} && exec tpnb intercept hello --namespace {NS} --port 9000 "
                               "-- python3 -u -m http.server 9000"]),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_active(a, "hello")
        _wait_listening(a, 9000)
        r = a.run(["curl", "-sS", "--max-time", "10", "hello"], check=False)   # short name: namespace mapped
        assert "Directory listing for /" in r.stdout and "file1.txt" in r.stdout, r.stderr
        r = a.run(["curl", "-sS", "--max-time", "10", f"hello.{NS}/file2.txt"], check=False)
        assert r.stdout == "two\n"
        # traffic from inside the cluster reaches the laptop too
        assert "file1.txt" in _from_cluster(a, f"http://hello.{NS}/")
        text = log.read_text()
        assert "Connected to context tpnb-dev" in text
        assert "Using deployment hello" in text and "State         : ACTIVE" in text
        assert '"GET / HTTP/1.1" 200' in text
    finally:
        os.killpg(proc.pid, signal.SIGINT)   # <ctrl>-C
        rc = proc.wait(60)
    text = log.read_text()
    assert "Disconnecting...done" in text
    assert "Traceback" not in text
    assert rc in (0, 130, -2), text
    # the cluster's own app answers again, through the agent that stays installed
    out = _from_cluster(a, f"http://hello.{NS}/")
    assert "CLIENT VALUES:" in out
    pods = a.kubectl("-n", NS, "get", "pod", "-l", "app=hello", "--field-selector=status.phase=Running").stdout
    assert " 2/2 " in pods
    desc = a.kubectl("-n", NS, "describe", "pod", "-l", "app=hello").stdout
    assert "traffic-agent:" in desc and "AGENT_NAME:" in desc and "APP_PORT:" in desc
    assert "traffic-manager" in a.kubectl("-n", "tpnb", "get", "deploy").stdout


def test_intercept_ends_when_its_owner_is_killed(laps: tuple[LaptopRunner, LaptopRunner]) -> None:
    """A kernel (or CLI running `-- CMD`) killed with -9 leaves nothing hijacked."""
    a, _ = laps
    a.run(["tpnb", "connect", "--namespace", NS], timeout=120)
    proc = subprocess.Popen(a.cmd(["tpnb", "intercept", "hello", "--port", "9300", "--mount=false",
                                   "--", "sleep", "600"]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_active(a, "hello")
        cli = a.run(["pgrep", "-f", "-n", "tpnb intercept hello --port 9300"]).stdout.strip()
        a.run(["kill", "-9", cli])
        deadline = time.monotonic() + 10
        while "hello: " in a.run(["tpnb", "status"]).stdout:
            assert time.monotonic() < deadline, "the intercept outlived its killed owner by 10 s"
            time.sleep(0.5)
        assert "CLIENT VALUES:" in _from_cluster(a, f"http://hello.{NS}/")
    finally:
        proc.kill()
        a.run(["pkill", "-f", "sleep 600"], check=False)
        a.run(["tpnb", "quit"], check=False)


def test_two_laptops_two_namespaces_and_a_refusal(laps: tuple[LaptopRunner, LaptopRunner]) -> None:
    a, b = laps
    alice = ["env", "USER=alice", "LOGNAME=alice"]
    bob = ["env", "USER=bob", "LOGNAME=bob"]
    servers = []
    try:
        for lap, port, body in ((a, 9101, "from alice"), (b, 9102, "from bob")):
            code = ("import http.server as h\nclass H(h.BaseHTTPRequestHandler):\n def do_GET(s):\n"
                    f"  s.send_response(200);s.end_headers();s.wfile.write(b'{body}')\n"
                    f"h.HTTPServer(('127.0.0.1',{port}),H).serve_forever()")
            servers.append(subprocess.Popen(lap.cmd(["python3", "-c", code]), start_new_session=True,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        a.run([*alice, "tpnb", "connect", "--namespace", NS], timeout=120)
        b.run([*bob, "tpnb", "connect", "--namespace", NS2], timeout=120)
        time.sleep(0.5)
        a.run([*alice, "tpnb", "intercept", "hello", "--port", "9101"], timeout=240)
        b.run([*bob, "tpnb", "intercept", "hello2", "--port", "9102"], timeout=240)
        assert "from alice" in _from_cluster(a, f"http://hello.{NS}/")
        assert "from bob" in _from_cluster(b, f"http://hello2.{NS2}/", ns=NS2, workload="hello2")
        # each laptop reaches the other's intercepted service through the cluster
        assert a.run(["curl", "-sS", "--max-time", "10", f"hello2.{NS2}"]).stdout == "from bob"
        # bob may not take alice's workload, and is told who holds it
        r = b.run([*bob, "tpnb", "intercept", "hello", "--namespace", NS, "--port", "9102"], check=False,
                  timeout=240)
        assert r.returncode != 0
        assert "already intercepted by alice@" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        lst = b.run(["tpnb", "list", "--namespace", NS]).stdout
        assert "intercepted by alice@" in lst
        # alice's session ends: her intercept ends, the app answers again within seconds
        a.run(["tpnb", "quit", "--daemon"])
        deadline = time.monotonic() + 20
        while "CLIENT VALUES" not in _from_cluster(a, f"http://hello.{NS}/"):
            assert time.monotonic() < deadline, "the app did not answer again after the session ended"
            time.sleep(1)
    finally:
        for s in servers:
            os.killpg(s.pid, signal.SIGTERM)
        b.run(["tpnb", "quit", "--daemon"], check=False)


def _user_objects(lap: LaptopRunner, ns: str) -> list[dict[str, Any]]:
    """Deployments and Services as the user wrote them (server-managed fields dropped)."""
    items = json.loads(lap.kubectl("-n", ns, "get", "deploy,svc", "-o", "json").stdout)["items"]
    out = []
    for it in items:
        md = it["metadata"]
        for k in ("resourceVersion", "generation", "managedFields", "uid", "creationTimestamp"):
            md.pop(k, None)
        anns = {k: v for k, v in (md.get("annotations") or {}).items()
                if k != "deployment.kubernetes.io/revision"}
        if anns:
            md["annotations"] = anns
        else:
            md.pop("annotations", None)
        it.pop("status", None)
        tmpl = it.get("spec", {}).get("template", {}).get("metadata", {})
        tmpl.pop("creationTimestamp", None)
        tanns = tmpl.get("annotations") or {}
        tanns.pop("kubectl.kubernetes.io/restartedAt", None)
        if not tanns:
            tmpl.pop("annotations", None)
        out.append(it)
    return sorted(out, key=lambda o: (o["kind"], o["metadata"]["name"]))


def test_bad_input_is_clear_and_changes_nothing(laps: tuple[LaptopRunner, LaptopRunner]) -> None:
    a, _ = laps
    a.run(["tpnb", "connect", "--namespace", NS], timeout=120)
    before = _user_objects(a, NS)
    cases = [
        (["tpnb", "intercept", "nosuch", "--port", "9000", "--", "true"], "nosuch"),
        (["tpnb", "intercept", "hello", "--port", "9555"], "nothing listens on 127.0.0.1:9555"),
        (["tpnb", "intercept", "hello", "--port", "9000:nope", "--", "true"], "nope"),
        (["tpnb", "intercept", "lonely", "--port", "9000", "--", "true"], "no Service"),
    ]
    for argv, needle in cases:
        t0 = time.monotonic()
        r = a.run(argv, check=False, timeout=120)
        assert r.returncode != 0, argv
        assert needle in r.stderr, (argv, r.stderr)
        assert "Traceback" not in r.stderr and time.monotonic() - t0 < 30
    # nothing was half-changed by the refused intercepts (hello may carry its agent
    # from an earlier test, but not a new one; lonely none at all)
    after = _user_objects(a, NS)
    assert [o for o in after if o["metadata"]["name"] == "lonely"] == \
           [o for o in before if o["metadata"]["name"] == "lonely"]
    assert after == before
    a.run(["tpnb", "quit"], check=False)


def test_rbac_denial_names_what_was_refused(laps: tuple[LaptopRunner, LaptopRunner], tmp_path: Path) -> None:
    """A user who may read and port-forward, but not change workloads, is told exactly that."""
    a, _ = laps
    a.run(["tpnb", "quit", "--daemon"], check=False)
    a.run(["tpnb", "connect", "--namespace", NS], timeout=120)   # as admin: the manager is current
    a.run(["tpnb", "quit", "--daemon"])
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "tpnb-test-reader"},
            "rules": [{"apiGroups": ["", "apps", "discovery.k8s.io"], "resources": ["*"],
                       "verbs": ["get", "list", "watch"]},
                      {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "tpnb-test-reader"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                           "name": "tpnb-test-reader"},
               "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": NS}]}
    a.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                     "items": [role, binding]}))
    try:
        # a workload without an agent yet: intercepting it means changing it
        a.kubectl("-n", NS2, "delete", "deploy,svc", "plain", "--ignore-not-found")
        _deploy(a, NS2, "plain")
        before = _user_objects(a, NS2)
        f = a.kubeconfig_as("reader", NS, tmp_path)
        env = ["env", f"KUBECONFIG={f}"]
        a.run([*env, "tpnb", "connect", "--namespace", NS], timeout=120)
        r = a.run([*env, "tpnb", "intercept", "plain", "--namespace", NS2, "--port", "9000", "--", "true"],
                  check=False, timeout=120)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert "system:serviceaccount:tpic:reader" in r.stderr, r.stderr
        assert re.search(r"(patch|update).*deployments", r.stderr), r.stderr
        assert _user_objects(a, NS2) == before   # nothing half-changed
    finally:
        a.run(["tpnb", "quit", "--daemon"], check=False)
        a.kubectl("delete", "clusterrolebinding,clusterrole", "tpnb-test-reader", check=False)
        a.kubectl("-n", NS2, "delete", "deploy,svc", "plain", "--ignore-not-found", check=False)


def test_uninstall_everything_restores_the_cluster(laps: tuple[LaptopRunner, LaptopRunner]) -> None:
    a, _ = laps
    a.run(["tpnb", "quit", "--daemon"], check=False)
    a.run(["tpnb", "uninstall", "--everything"], timeout=300)   # start clean
    before = _user_objects(a, NS2)
    server = subprocess.Popen(a.cmd(["python3", "-m", "http.server", "9200", "--bind", "127.0.0.1"]),
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        a.run(["tpnb", "connect", "--namespace", NS2], timeout=120)
        time.sleep(0.5)
        a.run(["tpnb", "intercept", "hello2", "--port", "9200"], timeout=240)
        assert _user_objects(a, NS2) != before   # the agent is really there
        a.run(["tpnb", "leave", "hello2"])
        r = a.run(["tpnb", "uninstall", "--everything"], timeout=300)
        assert "traffic-manager" in r.stdout
    finally:
        os.killpg(server.pid, signal.SIGTERM)
    assert _user_objects(a, NS2) == before
    assert a.kubectl("get", "ns", "tpnb", check=False).returncode != 0
    roles = a.kubectl("get", "clusterrole,clusterrolebinding", "-o", "name").stdout
    assert "tpnb" not in roles
    a.run(["tpnb", "quit", "--daemon"], check=False)
