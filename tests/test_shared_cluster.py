"""A shared, partly hostile cluster (issue 11): what a pod of another team can reach, for real.

One laptop connects and intercepts `hello` (whose pod holds a Secret in its
environment and mounts it).  Then a plain pod in another namespace -- the
project's image, so it has Python, grpcio and tpnb's own stubs, plus a
projected ServiceAccount token for the manager's audience, i.e. everything a
forged agent would need -- tries every door tpnb opens in the cluster:

  manager (client API: session, intercept list with env, tunnel to an
  arbitrary address, intercept create/remove, log level), agent API
  (arrival without, with a wrong-audience and with a right-audience token of
  its own pod; forged tunnels), the agent's control port and its file
  service (read the ServiceAccount token, list `/`).  The holder itself, with
  raw SFTP, reads its volumes and nothing outside them (cluster/sftpjail.py).

Every door must be shut; the same things done from the laptop work, so the
test fails if the checks are broken in either direction.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import LaptopRunner

pytestmark = pytest.mark.cluster

NS, EVIL = "tpsec", "tpsec-evil"
LAPTOP = "sec"
SECRET = "s3cr3t-of-team-a"

#: run inside the attacker pod; prints one JSON object {check: "refused: ..." | "GOT: ..."}
ATTACK = r'''
import asyncio, json, socket, sys
import grpc
from tpnb.proto import pb, rpc

mgr_ip, agent_ip, ns = sys.argv[1], sys.argv[2], sys.argv[3]
out = {}
tok = open("/var/run/secrets/tpnb/token").read().strip()
sa_tok = open("/var/run/secrets/kubernetes.io/serviceaccount/token").read().strip()

def ip(s):
    return socket.inet_aton(s)

async def rpc_check(name, coro):
    try:
        got = await asyncio.wait_for(coro, 8)
        out[name] = "GOT: " + str(got).replace("\n", " ")[:300]
    except grpc.aio.AioRpcError as e:
        out[name] = f"refused: {e.code().name}: {e.details()}"[:300]
    except Exception as e:
        out[name] = f"refused: {type(e).__name__}: {e}"[:300]

async def first_frame(stub, open_):
    call = stub.Tunnel()
    await call.write(pb.TunnelFrame(open=open_))
    f = await call.read()
    call.cancel()
    if f is grpc.aio.EOF or f.WhichOneof("kind") != "opened":
        raise RuntimeError(f"tunnel refused: {f}")
    return "tunnel opened"

async def stream_first(call):
    got = await call.read()
    call.cancel()
    if got is grpc.aio.EOF:
        raise RuntimeError("stream ended")
    return got

def tcp(host, port, send=b"", timeout=5):
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        if send:
            s.sendall(send)
        data = s.recv(4096)
        return data
    finally:
        s.close()

async def main():
    # the client API: the Service and the pod IP, on the client port and on the agents' port
    for label, target in (("svc", f"traffic-manager.tpnb:8081"), ("pod", f"{mgr_ip}:8081"),
                          ("agentport", f"{mgr_ip}:8082")):
        ch = grpc.aio.insecure_channel(target)
        m = rpc.ManagerStub(ch)
        await rpc_check(f"manager_session_{label}", m.ArriveAsClient(pb.ClientInfo(name="evil@pod"), timeout=5))
        await rpc_check(f"manager_list_{label}", stream_first(m.WatchIntercepts(pb.SessionInfo(session_id=""), timeout=5)))
        await rpc_check(f"manager_tunnel_{label}", first_frame(m, pb.TunnelOpen(dst_ip=ip(agent_ip), dst_port=9902)))
        spec = pb.InterceptSpec(name="hello", namespace=ns, workload="hello", local_port=1)
        await rpc_check(f"manager_create_{label}", m.CreateIntercept(pb.CreateInterceptRequest(spec=spec), timeout=5))
        await rpc_check(f"manager_remove_{label}", m.RemoveIntercept(pb.RemoveInterceptRequest(name="hello"), timeout=5))
        await rpc_check(f"manager_loglevel_{label}", m.SetLogLevel(pb.LogLevelRequest(level="debug"), timeout=5))
        await ch.close()
    # the agent API: a forged agent of `hello`, with each token it can get
    ch = grpc.aio.insecure_channel(f"{mgr_ip}:8082")
    hub = rpc.AgentHubStub(ch)
    forged = pb.AgentInfo(name="hello", namespace=ns, pod_name="hello-forged", pod_ip=agent_ip)
    for label, md in (("none", ()), ("sa_token", (("authorization", "Bearer " + sa_tok),)),
                      ("projected_token", (("authorization", "Bearer " + tok),))):
        await rpc_check(f"agent_arrive_{label}", hub.ArriveAsAgent(forged, metadata=md, timeout=10))
    mine = pb.AgentInfo(name="evil", namespace="", pod_name="", pod_ip="")
    await rpc_check("agent_arrive_as_itself", hub.ArriveAsAgent(mine, metadata=(("authorization", "Bearer " + tok),), timeout=10))
    await rpc_check("agent_instructions_forged_id",
                    stream_first(hub.WatchAgentInstructions(pb.AgentSession(agent_id="0" * 32), timeout=5)))
    await rpc_check("agent_tunnel_forged_id", first_frame(hub, pb.TunnelOpen(
        session_id="0" * 32, kind=pb.TunnelOpen.AGENT_INTERCEPTED, intercept_id="x")))
    await rpc_check("agent_tunnel_outbound", first_frame(hub, pb.TunnelOpen(
        kind=pb.TunnelOpen.OUTBOUND, dst_ip=ip(agent_ip), dst_port=9902)))
    await ch.close()
    # the agent's own ports on its pod IP
    ch = grpc.aio.insecure_channel(f"{agent_ip}:9901")
    await rpc_check("agent_control_port", ch.unary_unary("/tpnb.v1.Agent/Version")(b"", timeout=5))
    await ch.close()
    try:
        data = tcp(agent_ip, 9902, send=bytes.fromhex("0000000501") + (3).to_bytes(4, "big"))
        out["agent_files"] = f"GOT: {data!r}"
    except OSError as e:
        out["agent_files"] = f"refused: {e}"

asyncio.run(main())
print(json.dumps(out))
'''


def _objects(image: str) -> list[dict[str, Any]]:
    app = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "hello", "namespace": NS},
           "spec": {"selector": {"matchLabels": {"app": "hello"}}, "template": {
               "metadata": {"labels": {"app": "hello"}},
               "spec": {"containers": [{
                   "name": "app", "image": image, "imagePullPolicy": "IfNotPresent",
                   "command": ["python3", "-m", "http.server", "8080"], "workingDir": "/data",
                   "ports": [{"containerPort": 8080}],
                   "env": [{"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}],
                   "volumeMounts": [{"name": "db", "mountPath": "/etc/db", "readOnly": True},
                                    {"name": "data", "mountPath": "/data"}]}],
                   "volumes": [{"name": "db", "secret": {"secretName": "db"}}, {"name": "data", "emptyDir": {}}]}}}}
    evil = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "evil", "namespace": EVIL},
            "spec": {"containers": [{
                "name": "evil", "image": image, "imagePullPolicy": "IfNotPresent",
                "command": ["python3", "-c", "import time; time.sleep(100000)"],
                "volumeMounts": [{"name": "tok", "mountPath": "/var/run/secrets/tpnb", "readOnly": True}]}],
                "terminationGracePeriodSeconds": 0,
                "volumes": [{"name": "tok", "projected": {"sources": [{"serviceAccountToken": {
                    "audience": "tpnb-traffic-manager", "expirationSeconds": 3600, "path": "token"}}]}}]}}
    return [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "namespace": NS},
         "stringData": {"pw": SECRET}},
        app,
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hello", "namespace": NS},
         "spec": {"selector": {"app": "hello"}, "ports": [{"port": 80, "targetPort": 8080}]}},
        evil,
    ]


@pytest.fixture(scope="module")
def lab(devcluster: Any) -> Iterator[LaptopRunner]:
    from tpnb.imageref import default_image

    lap = LaptopRunner(devcluster, LAPTOP)
    lap.run(["tpnb", "quit", "--daemon"], check=False)
    for ns in (NS, EVIL):
        lap.kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=true", timeout=180)
        lap.kubectl("create", "ns", ns)
    lap.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                       "items": _objects(default_image())}))
    lap.kubectl("-n", NS, "rollout", "status", "deploy/hello", "--timeout=120s", timeout=150)
    lap.kubectl("-n", EVIL, "wait", "--for=condition=Ready", "pod/evil", "--timeout=120s", timeout=150)
    yield lap
    lap.run(["tpnb", "quit", "--daemon"], check=False)
    for ns in (NS, EVIL):
        lap.kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=false", check=False)


def _json(lap: LaptopRunner, *argv: str) -> Any:
    return json.loads(lap.run(["tpnb", *argv, "-o", "json"], timeout=120).stdout)


def _pod_ip(lap: LaptopRunner, ns: str, selector: str) -> str:
    pods = json.loads(lap.kubectl("-n", ns, "get", "pod", "-l", selector, "-o", "json").stdout)["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp") and p["status"].get("podIP")
            and all(c.get("ready") for c in p["status"].get("containerStatuses") or [])]
    assert live, f"no ready pod for {selector} in {ns}"
    return str(live[0]["status"]["podIP"])


def test_a_pod_of_another_team_reaches_nothing_the_laptop_reaches_everything(lab: LaptopRunner,
                                                                               tmp_path: Path) -> None:
    lap = lab
    server = subprocess.Popen(lap.cmd(["python3", "-m", "http.server", "9000", "--bind", "127.0.0.1"]),
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              cwd=str(tmp_path))
    try:
        lap.run(["tpnb", "connect", "--namespace", NS], timeout=180)
        lap.run(["tpnb", "intercept", "hello", "--port", "9000", "--mount=false"], timeout=240)

        # --- the legitimate laptop: its own intercept, with the pod's environment and files
        st = _json(lap, "status")
        ic = next(i for i in st["intercepts"] if i["name"] == "hello")
        assert ic["environment"]["DB_PASSWORD"] == SECRET
        files = lap.run(["python3", "-c",
                         "import tpnb.api as a;s=a.Session();f=s.files('hello');"
                         "print(f.read_text('/etc/db/pw'));print(sorted(f.listdir('/')))"], timeout=60)
        assert SECRET in files.stdout and "etc" in files.stdout, files.stdout + files.stderr
        token = lap.run(["python3", "-c",
                         "import tpnb.api as a;s=a.Session();"
                         "print(len(s.files('hello').read_text("
                         "'/var/run/secrets/kubernetes.io/serviceaccount/token')))"], timeout=60)
        assert int(token.stdout.strip()) > 100, token.stdout + token.stderr
        # even the holder, speaking raw SFTP with absolute paths, gets nothing outside the volumes
        jail = lap.run(["python3", "-c",
                        "import tpnb.api as a, tpnb.remotefs as r;s=a.Session();ic=s.get_intercept('hello');"
                        "h,p=s._file_service(ic);f=r.RemoteFS(h,p,prefix='');"
                        "print(f.read_text('/tpnb/volumes/etc/db/pw'))\n"
                        "for x in ('/etc/passwd','/proc/self/environ','/tpnb/volumes/../../etc/hostname'):\n"
                        "  try: f.read_bytes(x); print('GOT', x)\n"
                        "  except FileNotFoundError: print('none', x)"], timeout=60)
        assert SECRET in jail.stdout and "GOT" not in jail.stdout and jail.stdout.count("none") == 3, \
            jail.stdout + jail.stderr

        # --- the attacker, from a plain pod in another namespace
        mgr_ip = _pod_ip(lap, "tpnb", "app.kubernetes.io/name=traffic-manager")
        agent_ip = _pod_ip(lap, NS, "app=hello")
        r = lap.kubectl("-n", EVIL, "exec", "-i", "evil", "--", "python3", "-", mgr_ip, agent_ip, NS,
                        input=ATTACK, timeout=180)
        results = json.loads(r.stdout.strip().splitlines()[-1])
        got = {k: v for k, v in results.items() if not v.startswith("refused")}
        assert not got, f"the attacker got through: {json.dumps(got, indent=1)}"
        # every door was tried (a check that silently did not run would read as a pass)
        assert len(results) == 3 * 6 + 4 + 3 + 2, sorted(results)
        # the forged agents were refused for the right reasons
        assert "UNAUTHENTICATED" in results["agent_arrive_projected_token"], results
        assert "not bound" not in results["agent_arrive_projected_token"], results
        assert "audience" in results["agent_arrive_sa_token"] or "rejected" in results["agent_arrive_sa_token"]
        assert SECRET not in r.stdout

        # the attacker's attempts changed nothing: the laptop still holds its intercept and serves it
        st = _json(lap, "status")
        assert any(i["name"] == "hello" and i["state"] == "ACTIVE" for i in st["intercepts"]), st
        logs = lap.kubectl("-n", "tpnb", "logs", "deploy/traffic-manager", "--tail=200").stdout
        assert "refused an agent" in logs
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        lap.run(["tpnb", "leave", "hello"], check=False)


# ---------------------------------------------------------------- two developers, two Kubernetes users

def _as(kubeconfig: Path) -> list[str]:
    return ["env", f"KUBECONFIG={kubeconfig}"]


@pytest.fixture(scope="module")
def devs(lab: LaptopRunner) -> Iterator[tuple[LaptopRunner, Path, LaptopRunner, Path]]:
    """alice and bob: client certificates of the dev cluster's CA, with `edit` rights; own laptops."""
    from tpnb_devcluster.users import user_kubeconfig

    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "tpsec-devs"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
               "subjects": [{"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"},
                            {"kind": "User", "name": "bob", "apiGroup": "rbac.authorization.k8s.io"}]}
    lab.kubectl("apply", "-f", "-", input=json.dumps(binding))
    alice, bob = LaptopRunner(lab.cluster, "seca"), LaptopRunner(lab.cluster, "secb")
    # the manager is current (installed by the admin laptop); the developers only use it
    lab.run(["tpnb", "connect", "--namespace", NS], timeout=180)
    lab.run(["tpnb", "quit", "--daemon"])
    yield alice, user_kubeconfig("alice"), bob, user_kubeconfig("bob")
    for lap in (alice, bob):
        lap.run(["tpnb", "quit", "--daemon"], check=False)
    lab.kubectl("delete", "clusterrolebinding", "tpsec-devs", "--ignore-not-found", check=False)


def test_two_kubernetes_users_see_and_touch_only_their_own(devs: tuple[LaptopRunner, Path, LaptopRunner, Path],
                                                          tmp_path: Path) -> None:
    alice, akc, bob, bkc = devs
    servers = []
    try:
        for lap, port, body in ((alice, 9201, "from alice"), (bob, 9202, "from bob")):
            code = ("import http.server as h\nclass H(h.BaseHTTPRequestHandler):\n def do_GET(s):\n"
                    f"  s.send_response(200);s.end_headers();s.wfile.write(b'{body}')\n"
                    f"h.HTTPServer(('127.0.0.1',{port}),H).serve_forever()")
            servers.append(subprocess.Popen(lap.cmd(["python3", "-c", code]), start_new_session=True,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        alice.run([*_as(akc), "tpnb", "connect", "--namespace", NS], timeout=180)
        bob.run([*_as(bkc), "tpnb", "connect", "--namespace", NS], timeout=180)
        alice.run([*_as(akc), "tpnb", "intercept", "hello", "--port", "9201", "--mount=false"], timeout=240)
        mine = json.loads(alice.run(["tpnb", "status", "-o", "json"]).stdout)["intercepts"]
        assert mine[0]["environment"]["DB_PASSWORD"] == SECRET

        # bob sees that hello is taken, and by whom -- nothing of alice's environment
        listing = bob.run(["tpnb", "list", "--namespace", NS, "-o", "json"]).stdout
        assert SECRET not in listing
        hello = next(w for w in json.loads(listing) if w["name"] == "hello")
        assert hello["state"] == "intercepted_by_other" and "(alice)" in hello["holder"], hello
        assert not (hello.get("intercept") or {}).get("environment"), hello
        text = bob.run(["tpnb", "list", "--namespace", NS]).stdout
        assert "intercepted by" in text and "(alice)" in text, text
        assert json.loads(bob.run(["tpnb", "status", "-o", "json"]).stdout)["intercepts"] == []

        # bob cannot take it (the refusal names alice), nor leave it, nor read its files
        r = bob.run([*_as(bkc), "tpnb", "intercept", "hello", "--port", "9202", "--mount=false"], check=False,
                    timeout=240)
        assert r.returncode != 0 and "(alice)" in r.stderr and "Traceback" not in r.stderr, r.stderr
        r = bob.run(["tpnb", "leave", "hello"], check=False)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        r = bob.run(["python3", "-c", "import tpnb.api as a;a.Session().files('hello')"], check=False)
        assert r.returncode != 0 and SECRET not in r.stdout + r.stderr
        # ...and the cluster's requests for hello reach alice only
        got = bob.run(["curl", "-sS", "--max-time", "10", f"http://hello.{NS}/"]).stdout
        assert got == "from alice", got
        # alice's intercept is untouched by all of that
        st = json.loads(alice.run(["tpnb", "status", "-o", "json"]).stdout)
        assert [(i["name"], i["state"]) for i in st["intercepts"]] == [("hello", "ACTIVE")]
        alice.run(["tpnb", "leave", "hello"])
        # now it is free: bob may take it
        bob.run([*_as(bkc), "tpnb", "intercept", "hello", "--port", "9202", "--mount=false"], timeout=240)
        deadline = time.monotonic() + 30
        while (got := alice.run(["curl", "-sS", "--max-time", "10", f"http://hello.{NS}/"],
                                check=False).stdout) != "from bob":
            assert time.monotonic() < deadline, got
            time.sleep(1)
        bob.run(["tpnb", "leave", "hello"])
    finally:
        for s in servers:
            os.killpg(s.pid, signal.SIGTERM)
