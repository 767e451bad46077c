"""The agent link (issue 15) end to end: intercepted connections straight from the agent pods to the
connector over one authenticated link per pod (an upgrade through the API server's pods/proxy, or a
port-forward), the traffic-manager off the data path.

A two-replica echoserver is intercepted from laptop `lnk`; a client pod in the cluster sends 500
requests (keep-alive and new connections) and 64 MiB each way through it, and `tpnb status` shows
that pods/proxy links carried them (and the manager none).  An attacker pod in another namespace
knocks on the agent pods' link port by pod IP (raw link frames, another HTTP request, our upgrade
with a wrong key) and gets nothing past the nonce; another laptop that may port-forward to the
pods (a second user of the namespace) reaches the loopback link port and fails the handshake with
no key or a wrong one, while the legitimate link serves on.  `agent.link: port-forward` and a
user RBAC does not allow pods/proxy both take port-forward links, byte-exact too.  A personal
(header) intercept routes per request through the link; leave / intercept again works; and kill
-9 of the connector while a pod sends requests leaves the app serving again, as without links.
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

NS, EVIL_NS = "tplink", "tplink-evil"
ECHO = "tpnb.local/echoserver:1.4"
LINK_PORT = 9903
MIB64 = 64 * 1024 * 1024

SERVER = r'''
import hashlib, http.server, random, sys
from urllib.parse import urlsplit, parse_qs
port, tag = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _send(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        u = urlsplit(self.path)
        if u.path == "/down":
            q = parse_qs(u.query)
            return self._send(random.Random(int(q["seed"][0])).randbytes(int(q["n"][0])))
        self._send(f"served by {tag}\n".encode())
    def do_POST(self):
        n, h = int(self.headers["Content-Length"]), hashlib.sha256()
        left = n
        while left:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
        self._send(f"{n - left} {h.hexdigest()}".encode())
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''

#: in the client pod: 250 requests on one keep-alive connection, 250 on new connections, then bulk
CLIENT = r'''
import hashlib, http.client, json, random, sys
host, size, want = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = {"ok": 0, "bad": 0, "errors": []}
def check(body):
    if want in body.decode("latin-1"):
        out["ok"] += 1
    else:
        out["bad"] += 1
        out["errors"].append(body[:80].decode("latin-1"))
c = http.client.HTTPConnection(host, 80, timeout=20)
for i in range(250):
    try:
        c.request("GET", f"/keep/{i}")
        check(c.getresponse().read())
    except Exception as exc:
        out["bad"] += 1; out["errors"].append(repr(exc)); c.close(); c = http.client.HTTPConnection(host, 80, timeout=20)
c.close()
for i in range(250):
    try:
        c = http.client.HTTPConnection(host, 80, timeout=20)
        c.request("GET", f"/new/{i}", headers={"Connection": "close"})
        check(c.getresponse().read())
        c.close()
    except Exception as exc:
        out["bad"] += 1; out["errors"].append(repr(exc))
if size:
    c = http.client.HTTPConnection(host, 80, timeout=120)
    c.request("GET", f"/down?n={size}&seed=7")
    got = c.getresponse().read()
    out["down_exact"] = hashlib.sha256(got).digest() == hashlib.sha256(random.Random(7).randbytes(size)).digest()
    body = random.Random(8).randbytes(size)
    c.request("POST", "/up", body=body)
    out["up_exact"] = c.getresponse().read().decode() == f"{size} {hashlib.sha256(body).hexdigest()}"
    c.close()
out["errors"] = out["errors"][:5]
print(json.dumps(out))
'''

#: in the client pod: a request on a new connection every 0.2 s for `secs`, recording who answered
LOOP = r'''
import http.client, json, sys, time
host, secs = sys.argv[1], float(sys.argv[2])
seen, end = [], time.monotonic() + secs
while time.monotonic() < end:
    t0 = time.monotonic()
    try:
        c = http.client.HTTPConnection(host, 80, timeout=3)
        c.request("GET", "/loop", headers={"Connection": "close"})
        body = c.getresponse().read().decode("latin-1")
        seen.append("laptop" if "served by laptop" in body else "app" if "CLIENT VALUES" in body else "other")
    except Exception as exc:
        seen.append("error")
    time.sleep(max(0.0, 0.2 - (time.monotonic() - t0)))
print(json.dumps(seen))
'''

#: the attacker pod: knock on each agent pod's link port by pod IP; report what came back past the
#: 101 and the nonce (an upgrade is answered with those two: they prove nothing and give nothing)
POD_IP_ATTACK = r'''
import json, os, socket, struct, sys, time
UPGRADE = (b"GET /tpnb-link HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: tpnb-link\r\n\r\n")
WRONG = struct.pack("!BII", 2, 0, 80) + os.urandom(64) + b"0123456789abcdef"
def knock(ip, send):
    try:
        s = socket.create_connection((ip, 9903), 5)
    except OSError as exc:
        return {"refused": exc.__class__.__name__}
    s.settimeout(12)
    t0 = time.monotonic()
    s.sendall(send)
    got = b""
    try:
        while d := s.recv(65536):
            got += d
    except OSError:
        pass
    head, sep, rest = got.partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 101 ") and rest[9:17] == b"TPNBLNK1":
        rest = rest[49:]      # the 101 and the HELLO frame with its nonce
        head = "101+hello"
    else:
        head, rest = "", got
    return {"head": head, "after": len(rest), "closed_after_s": round(time.monotonic() - t0, 1)}
out = {}
for ip in sys.argv[1:]:
    out[ip] = {"raw-frames": knock(ip, WRONG), "http": knock(ip, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
               "upgrade-wrong-key": knock(ip, UPGRADE + WRONG), "upgrade-silent": knock(ip, UPGRADE)}
print(json.dumps(out))
'''

#: the attacking laptop, through its own port-forward to the link port: read the hello, then
#: (a) answer with a wrong key, (b) answer with garbage, (c) say nothing; report all it received
PF_ATTACK = r'''
import json, os, socket, struct, sys, time
port = int(sys.argv[1])
def attempt(answer):
    s = socket.create_connection(("127.0.0.1", port), 10)
    s.settimeout(15)
    got = b""
    while len(got) < 9 + 40:
        d = s.recv(4096)
        if not d:
            break
        got += d
    hello = got[:49]
    nonce = hello[17:49]
    t0 = time.monotonic()
    if answer == "wrong-key":
        payload = os.urandom(32) + os.urandom(32) + b"0123456789abcdef"
        s.sendall(struct.pack("!BII", 2, 0, len(payload)) + payload)
    elif answer == "garbage":
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    rest, how = b"", "closed"
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            rest += d
    except OSError as exc:
        how = exc.__class__.__name__   # a reset: still nothing received
    return {"hello": hello[9:17].decode("latin-1"), "after": len(rest), "end": how,
            "closed_after_s": round(time.monotonic() - t0, 1)}
print(json.dumps({a: attempt(a) for a in ("wrong-key", "garbage", "silent")}))
'''


@pytest.fixture(scope="module")
def env(devcluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from tpnb.imageref import default_image

    lap, evil = LaptopRunner(devcluster, "lnk"), LaptopRunner(devcluster, "lnkevil")
    for lp in (lap, evil):
        lp.run(["tpnb", "quit", "--daemon"], check=False)
    for ns in (NS, EVIL_NS):
        lap.kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=true", timeout=180)
        lap.kubectl("create", "ns", ns)
    lap.kubectl("-n", NS, "create", "deploy", "hello", f"--image={ECHO}", "--replicas=2")
    lap.kubectl("-n", NS, "expose", "deploy", "hello", "--port", "80", "--target-port", "8080")
    lap.kubectl("-n", NS, "create", "deploy", "client", f"--image={default_image()}", "--", "sleep", "infinity")
    lap.kubectl("-n", EVIL_NS, "create", "deploy", "attacker", f"--image={default_image()}", "--", "sleep", "infinity")
    for ns, d in ((NS, "hello"), (NS, "client"), (EVIL_NS, "attacker")):
        lap.kubectl("-n", ns, "rollout", "status", f"deploy/{d}", "--timeout=180s", timeout=200)
    d = tmp_path_factory.mktemp("agentlink")
    os.chmod(d, 0o755)
    (d / "srv.py").write_text(SERVER)
    server = subprocess.Popen(lap.cmd(["python3", str(d / "srv.py"), "9400", "laptop"]), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs: list[subprocess.Popen[Any]] = [server]
    yield {"lap": lap, "evil": evil, "dir": d, "procs": procs}
    for p in procs:
        stop_process_group(p)
    for lp in (lap, evil):
        lp.run(["tpnb", "quit", "--daemon"], check=False)
    for ns in (NS, EVIL_NS):
        lap.kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=false", check=False)


def _in_pod(lap: LaptopRunner, script: str, *args: str, ns: str = NS, deploy: str = "client",
            timeout: float = 600) -> Any:
    r = lap.kubectl("-n", ns, "exec", "-i", f"deploy/{deploy}", "--", "python3", "-", *args, input=script,
                    timeout=timeout)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _data_path(lap: LaptopRunner, name: str = "hello") -> str:
    st = lap.run(["tpnb", "status"]).stdout
    m = re.search(rf"^    {name}: .*\n      data path: (.*)$", st, re.M)
    assert m, st
    return m.group(1)


def _counts(path: str) -> tuple[int, int]:
    m = re.search(r"connections: (\d+) via agent links, (\d+) via the traffic-manager", path)
    assert m, path
    return int(m.group(1)), int(m.group(2))


def _hello_pods(lap: LaptopRunner) -> dict[str, str]:
    pods = json.loads(lap.kubectl("-n", NS, "get", "pod", "-l", "app=hello", "-o", "json").stdout)["items"]
    return {p["metadata"]["name"]: p["status"].get("podIP", "") for p in pods
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")}


def test_intercept_through_the_agent_links(env: dict[str, Any]) -> None:
    lap, evil = env["lap"], env["evil"]
    lap.run(["tpnb", "connect", "--namespace", NS], timeout=180)
    lap.run(["tpnb", "intercept", "hello", "--port", "9400", "--mount=false"], timeout=300)
    path = _data_path(lap)
    assert path.startswith("agent link (2/2 pods, pods/proxy)"), path   # one link per replica, both up

    got = _in_pod(lap, CLIENT, f"hello.{NS}", str(MIB64), "served by laptop")
    assert got["ok"] == 500 and got["bad"] == 0, got
    assert got["down_exact"] and got["up_exact"], got
    via_link, via_manager = _counts(_data_path(lap))
    assert via_link >= 252 and via_manager == 0, _data_path(lap)   # 250 new + keep-alive + bulk

    # --- attacks, while the legitimate link serves ---
    pods = _hello_pods(lap)
    assert len(pods) == 2
    # (1) a pod of another namespace, by pod IP: reaches the upgrade listener, gets nothing past the nonce
    res = _in_pod(lap, POD_IP_ATTACK, *pods.values(), ns=EVIL_NS, deploy="attacker", timeout=240)
    for ip, tries in res.items():
        assert tries["raw-frames"] == {"head": "", "after": 0, "closed_after_s": tries["raw-frames"]["closed_after_s"]}, res
        assert tries["http"]["head"] == "" and tries["http"]["after"] == 0, res
        for t in ("upgrade-wrong-key", "upgrade-silent"):
            assert tries[t]["head"] == "101+hello" and tries[t]["after"] == 0, res
        assert all(t["closed_after_s"] <= 10 for t in tries.values()), res   # nobody is kept waiting on
    # (2) another user's laptop that may port-forward to the pods: reaches the port, fails the handshake
    evil.run(["tpnb", "connect", "--namespace", NS], timeout=180)   # a session of its own, too
    pod = sorted(pods)[0]
    fwd = subprocess.Popen(evil.cmd(["kubectl", "-n", NS, "port-forward", f"pod/{pod}", f"19903:{LINK_PORT}"]),
                           start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    env["procs"].append(fwd)
    try:
        assert fwd.stdout is not None and "Forwarding from" in fwd.stdout.readline()
        (env["dir"] / "pfattack.py").write_text(PF_ATTACK)
        r = evil.run(["python3", str(env["dir"] / "pfattack.py"), "19903"], timeout=120)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        for how, what in res.items():
            assert what["hello"] == "TPNBLNK1", res     # the real link port answered ...
            assert what["after"] == 0, res              # ... and sent nothing after its nonce
        assert res["silent"]["closed_after_s"] <= 10, res  # and a caller who says nothing is dropped
        # the legitimate path served throughout
        assert _in_pod(lap, LOOP, f"hello.{NS}", "2") and all(
            s == "laptop" for s in _in_pod(lap, LOOP, f"hello.{NS}", "2")), "the intercept stopped serving"
    finally:
        stop_process_group(fwd, grace=5)
    # the other session's intercept list never shows a key: keys stay with their session
    other = evil.run(["tpnb", "list", "--namespace", NS, "--output", "json"], check=False).stdout
    assert "secret" not in other, other
    evil.run(["tpnb", "quit", "--daemon"], check=False)
    agent_log = lap.kubectl("-n", NS, "logs", f"pod/{pod}", "-c", "traffic-agent").stdout
    assert "link from" in agent_log and "refused: authentication failed" in agent_log, agent_log[-3000:]
    assert "refused: not a tpnb-link upgrade request" in agent_log, agent_log[-3000:]
    assert _counts(_data_path(lap))[1] == 0

    # --- leave, and intercept again with `agent.link: port-forward`: the app answers in between, the
    # links come back as port-forwards, byte-exact too ---
    lap.run(["tpnb", "leave", "hello"])
    assert all(s == "app" for s in _in_pod(lap, LOOP, f"hello.{NS}", "2"))
    lap.run(["tpnb", "quit", "--daemon"])   # the connector reads its configuration when it starts
    lap.run(["env", "TPNB_AGENT_LINK=port-forward", "tpnb", "connect", "--namespace", NS], timeout=180)
    lap.run(["tpnb", "intercept", "hello", "--port", "9400", "--mount=false"], timeout=300)
    assert _data_path(lap).startswith("agent link (2/2 pods, port-forward)"), _data_path(lap)
    got = _in_pod(lap, CLIENT, f"hello.{NS}", str(MIB64 // 4), "served by laptop")
    assert got["ok"] == 500 and got["bad"] == 0 and got["down_exact"] and got["up_exact"], got
    assert _counts(_data_path(lap))[1] == 0
    lap.run(["tpnb", "leave", "hello"])
    lap.run(["tpnb", "quit", "--daemon"])
    lap.run(["tpnb", "connect", "--namespace", NS], timeout=180)

    # --- a personal intercept: routed request by request, the matching ones over the link ---
    lap.run(["tpnb", "intercept", "hello", "--port", "9400", "--mount=false", "--http-header", "x-dev=me"],
            timeout=300)
    assert _data_path(lap).startswith("agent link (2/2 pods, pods/proxy)"), _data_path(lap)
    mixed = r'''
import http.client, json, sys
c = http.client.HTTPConnection(sys.argv[1], 80, timeout=20)
out = []
for i in range(100):
    c.request("GET", f"/p{i}", headers={"x-dev": "me"} if i % 2 else {})
    out.append("laptop" if "served by laptop" in c.getresponse().read().decode("latin-1") else "app")
print(json.dumps(out))
'''
    seen = _in_pod(lap, mixed, f"hello.{NS}")
    assert seen == ["app" if i % 2 == 0 else "laptop" for i in range(100)], seen
    via_link, via_manager = _counts(_data_path(lap))
    assert via_link >= 1 and via_manager == 0, _data_path(lap)
    lap.run(["tpnb", "leave", "hello"])


def _developer_roles(ns: str, manager_ns: str = "tpnb") -> list[dict[str, Any]]:
    """README's developer rows ("RBAC: every rule"), pods/portforward in the workload's namespace, and
    not `get pods/proxy`: a user who may port-forward but not proxy."""
    def role(name: str, namespace: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                 "metadata": {"name": name, "namespace": namespace}, "rules": rules},
                {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                 "metadata": {"name": name, "namespace": namespace},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                 "subjects": [{"kind": "ServiceAccount", "name": "pfonly", "namespace": ns}]}]
    rw = ["get", "list", "watch", "patch", "update"]
    return role("tpnb-test-pfonly", manager_ns, [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
    ]) + role("tpnb-test-pfonly", ns, [
        {"apiGroups": ["apps"], "resources": ["deployments", "statefulsets", "replicasets"], "verbs": rw},
        {"apiGroups": [""], "resources": ["services"], "verbs": rw},
        {"apiGroups": [""], "resources": ["pods", "events"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create"]},
    ])


def test_without_pods_proxy_rbac_the_links_take_port_forwards(env: dict[str, Any], tmp_path: Path) -> None:
    """A developer with README's rules but not `get pods/proxy`: the links fall back to port-forwards at
    once, `tpnb status` says why, and the intercept carries every request and byte through them."""
    lap = env["lap"]
    lap.run(["tpnb", "quit", "--daemon"], check=False)
    lap.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                     "items": _developer_roles(NS)}))
    f = lap.kubeconfig_as("pfonly", NS, tmp_path)
    as_dev = ["env", f"KUBECONFIG={f}"]
    try:
        denied = lap.run([*as_dev, "kubectl", "auth", "can-i", "get", "pods", "--subresource=proxy", "-n", NS], check=False)
        assert denied.stdout.strip() == "no", denied.stdout
        lap.run([*as_dev, "tpnb", "connect", "--namespace", NS], timeout=180)
        lap.run([*as_dev, "tpnb", "intercept", "hello", "--port", "9400", "--mount=false"], timeout=300)
        path = _data_path(lap)
        assert path.startswith("agent link (2/2 pods, port-forward)"), path
        assert "pods/proxy not allowed" in path and "pods/proxy" in path, path
        got = _in_pod(lap, CLIENT, f"hello.{NS}", str(MIB64 // 4), "served by laptop")
        assert got["ok"] == 500 and got["bad"] == 0 and got["down_exact"] and got["up_exact"], got
        assert _counts(_data_path(lap))[1] == 0
        lap.run([*as_dev, "tpnb", "leave", "hello"])
    finally:
        lap.run(["tpnb", "quit", "--daemon"], check=False)
        for ns in (NS, "tpnb"):
            lap.kubectl("-n", ns, "delete", "role,rolebinding", "tpnb-test-pfonly", "--ignore-not-found", check=False)


def _connector_pids(netns: str) -> list[int]:
    ino = os.stat(f"/run/netns/{netns}").st_ino
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            if os.stat(d / "ns" / "net").st_ino == ino and b"tpnb.connector" in argv \
                    and Path(argv[0].decode()).name.startswith("python"):
                out.append(int(d.name))
        except (OSError, IndexError):
            continue
    return out


def test_kill9_of_the_connector_gives_the_workload_back(env: dict[str, Any]) -> None:
    lap = env["lap"]
    lap.run(["tpnb", "connect", "--namespace", NS], timeout=180)
    lap.run(["tpnb", "intercept", "hello", "--port", "9400", "--mount=false"], timeout=300)
    assert _data_path(lap).startswith("agent link (2/2 pods, pods/proxy)"), _data_path(lap)
    loop = subprocess.Popen(lap.cmd(["kubectl", "-n", NS, "exec", "-i", "deploy/client", "--", "python3", "-",
                                     f"hello.{NS}", "60"]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert loop.stdin is not None and loop.stdout is not None
    loop.stdin.write(LOOP)
    loop.stdin.close()
    time.sleep(8)
    pids = _connector_pids("tpnb-lnk")
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    out = loop.stdout.read()   # the loop ends by itself after 60 s
    loop.wait(180)
    err = out
    seen = json.loads(out.strip().splitlines()[-1])
    first_app = seen.index("app") if "app" in seen else len(seen)
    assert "laptop" in seen[:first_app], seen            # served by the laptop before the kill
    # after the kill: the app serves again (the session expires as without links) and stays serving
    assert first_app < len(seen) and set(seen[first_app:]) == {"app"}, seen
    assert "Traceback" not in err
    logs = " ".join(lap.kubectl("-n", NS, "logs", f"pod/{p}", "-c", "traffic-agent").stdout for p in _hello_pods(lap))
    assert "agent link for intercept" in logs and "down" in logs
    lap.run(["tpnb", "quit", "--daemon"], check=False)
