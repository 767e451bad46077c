"""In-cluster mode end to end: a notebook pod of the dev cluster runs the quickstart's steps.

The pod runs the notebook image (`tpnb_devcluster.images.build_notebook_image`:
the project image's Debian and Python, the tpnb client, ipykernel, nbclient)
as uid 1000 in a namespace that enforces Pod Security "restricted" (so: no
root, every capability dropped, no NET_ADMIN, no privilege escalation); its
ServiceAccount has exactly the developer rules of README's RBAC table and
no more.  `kubectl exec` runs tests/run_notebook.py (nbclient) in it on
notebooks/quickstart.ipynb itself (the last test: a mounted kubeconfig for its
`default` namespace), and first on a notebook of the same steps whose
requests "from another pod" come from a caller pod while the kernel waits:

* `%tp connect` is near-instant (measured in the kernel) and says in-cluster;
  `%tp status` names the mode, the ServiceAccount and what it covers; no
  proxy variables, no root daemon, no tpnb process as root;
* `requests.get("http://hello.NS")` in the kernel (cluster DNS, as it is);
* `%%tp intercept hello --port 9000`: a caller pod's request to the Service
  is answered by the kernel in the notebook pod (v1, then v2 after a re-run);
* `%tp env hello` (a value from a ConfigMap) and the pod's volume through the
  FUSE-less reader;
* `%tp leave hello`: the echo server answers the caller pod again.

While the kernel holds the intercept, another developer's pod (same image,
its own ServiceAccount with the same rights) attacks for real: it dials the
notebook pod's kernel port, the agent's file service and the manager's
client API directly (all refused: loopback only), opens its own manager
session and asks for the notebook's intercept's files by its id, to take
the intercept over, and to remove it (all refused), and sees the intercept
without its environment.  The caller pod is still answered by the notebook.
"""
from __future__ import annotations

import json
import re
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import nbformat
import pytest

from conftest import REPO, LaptopRunner
from tpnb_devcluster.manifests import NODE_NAME
from run_notebook import tagged, text_of

pytestmark = pytest.mark.cluster

APP_NS = "tpincluster"          # hello and the caller pod
NB_NS = "tpincluster-nb"        # notebook pods: Pod Security "restricted" enforced
MANAGER_NS = "tpnb"
ECHO = "tpnb.local/echoserver:1.4"
POD_TIMEOUT = 180


# ------------------------------------------------------------------ objects
def _app_objects() -> list[dict[str, Any]]:
    labels = {"app": "hello"}
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "hello-config", "namespace": APP_NS},
         "data": {"GREETING": "hi-from-a-configmap", "app.yaml": "color: teal\n"}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "hello", "namespace": APP_NS},
         "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
             "containers": [{"name": "echo", "image": ECHO, "ports": [{"containerPort": 8080}],
                             "env": [{"name": "GREETING", "valueFrom": {"configMapKeyRef": {
                                 "name": "hello-config", "key": "GREETING"}}}],
                             "volumeMounts": [{"name": "config", "mountPath": "/etc/config"}]}],
             "volumes": [{"name": "config", "configMap": {"name": "hello-config",
                                                          "items": [{"key": "app.yaml", "path": "app.yaml"}]}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hello", "namespace": APP_NS},
         "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}},
    ]


def _caller_pod(image: str) -> dict[str, Any]:
    """A pod of the cluster that calls the Service (the project image has python3)."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "caller", "namespace": APP_NS},
            "spec": {"containers": [{"name": "caller", "image": image, "imagePullPolicy": "IfNotPresent",
                                     "command": ["python3", "-c", "import time; time.sleep(10**7)"]}],
                     "terminationGracePeriodSeconds": 0}}


#: the developer rules of README's RBAC table ("In the cluster (JupyterHub)" uses the same)
def _rbac(sa: str) -> list[dict[str, Any]]:
    subject = [{"kind": "ServiceAccount", "name": sa, "namespace": NB_NS}]
    manager_rules = [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
    ]
    app_rules = [
        {"apiGroups": ["apps"], "resources": ["deployments", "replicasets", "statefulsets"],
         "verbs": ["get", "list", "watch", "patch", "update"]},
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch", "patch", "update"]},
        {"apiGroups": [""], "resources": ["pods", "events"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
    ]
    out: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "ServiceAccount",
                                  "metadata": {"name": sa, "namespace": NB_NS}}]
    for ns, rules in ((MANAGER_NS, manager_rules), (APP_NS, app_rules)):
        name = f"tpnb-developer-{NB_NS}-{sa}"
        out.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                    "metadata": {"name": name, "namespace": ns}, "rules": rules})
        out.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                    "metadata": {"name": name, "namespace": ns}, "subjects": subject,
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}})
    return out


def _notebook_pod(name: str, sa: str, image: str, **security: Any) -> dict[str, Any]:
    """A notebook server's pod as a hub would start it: non-root, nothing added, restricted."""
    ctx = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, **security}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NB_NS},
            "spec": {"serviceAccountName": sa, "terminationGracePeriodSeconds": 0,
                     # the test imports the notebook image into the first node's containerd only
                     "nodeSelector": {"kubernetes.io/hostname": NODE_NAME},
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{"name": "notebook", "image": image, "imagePullPolicy": "Never",
                                     "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {
                                         "fieldPath": "status.podIP"}}}],
                                     "securityContext": ctx}]}}


# ------------------------------------------------------------------ fixture
class Cluster:
    """Admin kubectl (from the node netns) and `kubectl exec` into the test's pods."""

    def __init__(self, dc: Any) -> None:
        self.dc = dc

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.dc.kubectl(*args, input=input, timeout=timeout, check=check)

    def apply(self, objs: list[dict[str, Any]] | dict[str, Any]) -> None:
        items = objs if isinstance(objs, list) else [objs]
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))

    def exec_argv(self, ns: str, pod: str, argv: list[str], stdin: bool = False) -> list[str]:
        return self.dc.node_exec_cmd([str(self.dc.bin_dir / "kubectl"), f"--kubeconfig={self.dc.admin_kubeconfig}",
                                      "-n", ns, "exec", *(["-i"] if stdin else []), pod, "--", *argv])

    def exec(self, ns: str, pod: str, argv: list[str], input: str | None = None, timeout: float = 60,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(self.exec_argv(ns, pod, argv, stdin=input is not None), input=input,
                             capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"kubectl exec {pod} {argv[:3]} exited {res.returncode}\n"
                                 f"stdout: {res.stdout[-3000:]}\nstderr: {res.stderr[-3000:]}")
        return res

    def pod_ip(self, ns: str, selector: str) -> str:
        return self.kubectl("-n", ns, "get", "pod", *selector.split(), "-o",
                            "jsonpath={.items[0].status.podIP}" if selector.startswith("-l")
                            else "jsonpath={.status.podIP}").stdout.strip()

    def python_in(self, ns: str, pod: str, code: str, timeout: float = 60) -> str:
        return self.exec(ns, pod, ["python3", "-c", code], timeout=timeout).stdout


def _wait_ready(c: Cluster, ns: str, pod: str) -> None:
    c.kubectl("-n", ns, "wait", "--for=condition=Ready", f"pod/{pod}", f"--timeout={POD_TIMEOUT}s",
              timeout=POD_TIMEOUT + 20)


@pytest.fixture(scope="module")
def cluster(devcluster: Any) -> Iterator[Cluster]:
    from tpnb_devcluster import images
    from tpnb_devcluster.progress import Printer
    import sys

    from tpnb.imageref import default_image

    c = Cluster(devcluster)
    printer = Printer(stream=sys.__stderr__, tick_every=30)
    nb_image = images.build_notebook_image(printer)
    devcluster._import_images([nb_image], printer, (0.0, 1.0))
    # the traffic-manager of this build, installed by an admin: the notebooks' ServiceAccounts may not install it
    lap = LaptopRunner(devcluster, "incluster")
    lap.run(["tpnb", "connect"], timeout=240)
    lap.run(["tpnb", "quit", "--daemon"], timeout=60)
    for ns in (APP_NS, NB_NS):
        c.kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=true", timeout=180)
    c.kubectl("create", "ns", APP_NS)
    c.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NB_NS, "labels": {
        "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}}})
    c.apply(_app_objects() + [_caller_pod(default_image())] + _rbac("notebook") + _rbac("intruder"))
    c.apply([_notebook_pod("notebook", "notebook", nb_image.name), _notebook_pod("intruder", "intruder", nb_image.name)])
    c.kubectl("-n", APP_NS, "rollout", "status", "deploy/hello", f"--timeout={POD_TIMEOUT}s", timeout=POD_TIMEOUT + 20)
    for ns, pod in ((APP_NS, "caller"), (NB_NS, "notebook"), (NB_NS, "intruder")):
        _wait_ready(c, ns, pod)
    c.nb_image = nb_image.name  # type: ignore[attr-defined]
    try:
        yield c
    finally:
        for pod in ("notebook", "intruder"):
            c.exec(NB_NS, pod, ["python3", "-m", "tpnb.cli", "quit", "--daemon"], check=False, timeout=60)
        c.kubectl("delete", "ns", APP_NS, NB_NS, "--ignore-not-found", "--wait=false", check=False)


# ------------------------------------------------------------------ the notebook
def _wait_cell(tag: str) -> str:
    """The kernel pauses here until the test (outside) is done with step `tag`."""
    return textwrap.dedent(f"""
        import os, time
        open('/tmp/{tag}.ready', 'w').close()
        for _ in range(1800):  # bounded: 3 minutes
            if os.path.exists('/tmp/{tag}.go'):
                break
            time.sleep(0.1)
        print('{tag.upper()} DONE', os.path.exists('/tmp/{tag}.go'))
    """)


APP = textwrap.dedent('''\
    %%tp intercept hello --port 9000
    VERSION = "{v}"


    def app(environ, start_response):
        """A tiny WSGI app (no framework needed; a Flask or FastAPI app works the same way)."""
        body = f"hello from the notebook {{VERSION}} in pod {{os.environ['POD_IP']}}\\n".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
''')

CELLS = [
    ("load", "%load_ext tpnb"),
    ("version", "%tp version"),
    ("connect", f"import os, time\nt0 = time.monotonic()\n%tp connect --namespace {APP_NS}\n"
                "print('CONNECT_SECONDS', round(time.monotonic() - t0, 3))"),
    ("reconnect", f"t0 = time.monotonic()\n%tp connect --in-cluster --namespace {APP_NS}\n"
                  "print('RECONNECT_SECONDS', round(time.monotonic() - t0, 3))"),
    ("status", "%tp status"),
    ("noproxy", "print('PROXY_VARS', sorted(k for k in os.environ if k.lower().endswith('_proxy')))"),
    ("requests", f"import requests\nprint(requests.get('http://hello.{APP_NS}', timeout=10).text)"),
    ("list", "%tp list"),
    ("intercept1", APP.format(v="v1")),
    ("wait1", _wait_cell("served1")),
    ("intercept2", APP.format(v="v2")),
    ("wait2", _wait_cell("served2")),
    ("env", "env = %tp env hello\nprint('GREETING', env.get('GREETING'))"),
    ("files", "from tpnb.magics import lifecycle\n"
              "print('FILE', lifecycle.session().files('hello').read_text('/etc/config/app.yaml').strip())"),
    ("wait3", _wait_cell("attacked")),
    ("served", "import tpnb\nrecs = tpnb.requests_log('hello')\n"
               "recs = recs.to_dict('records') if hasattr(recs, 'to_dict') else recs\n"
               "print('SERVED', len(recs), sorted({r['path'] for r in recs}))"),
    ("leave", "%tp leave hello"),
    ("after", f"print(requests.get('http://hello.{APP_NS}', timeout=10).text)"),
    ("quit", "%tp quit"),
]


def _notebook() -> Any:
    nb = nbformat.v4.new_notebook()
    for tag, src in CELLS:
        nb.cells.append(nbformat.v4.new_code_cell(src, metadata={"tags": [tag]}))
    return nbformat.writes(nb)


class Kernel:
    """tests/run_notebook.py running in the notebook pod, in the background."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        c.exec(NB_NS, "notebook", ["sh", "-c", "rm -f /tmp/*.ready /tmp/*.go; cat > /home/jovyan/incluster.ipynb"],
               input=_notebook())
        script = (REPO / "tests" / "run_notebook.py").read_text()
        self.proc = subprocess.Popen(
            c.exec_argv(NB_NS, "notebook", ["python3", "-", "/home/jovyan/incluster.ipynb",
                                            "/home/jovyan/out.ipynb", "--timeout", "240"], stdin=True),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdin is not None
        self.proc.stdin.write(script)
        self.proc.stdin.close()

    def at(self, tag: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the notebook ended before step {tag}:\n{self.result_text()}")
            if self.c.exec(NB_NS, "notebook", ["test", "-e", f"/tmp/{tag}.ready"], check=False).returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"the kernel never reached step {tag}:\n{self.result_text()}")

    def go(self, tag: str) -> None:
        self.c.exec(NB_NS, "notebook", ["touch", f"/tmp/{tag}.go"])

    def partial(self) -> Any:
        """The notebook as executed so far (run_notebook.py writes it when it ends)."""
        out = self.c.exec(NB_NS, "notebook", ["cat", "/home/jovyan/out.ipynb"], check=False).stdout
        return nbformat.reads(out, as_version=4) if out else None

    def finish(self, timeout: float = 300) -> tuple[int, Any]:
        code = self.proc.wait(timeout)
        return code, self.partial()

    def result_text(self) -> str:
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            err = ""
        nb = self.partial()
        cells = "\n".join(f"[{','.join(c.metadata.get('tags', []))}] {text_of(c, ('stdout', 'stderr'))[-800:]}"
                          for c in nb.cells) if nb else "(no notebook written)"
        return f"{cells}\nstderr: {err[-3000:]}"


def _call_hello(c: Cluster, path: str = "/from-the-caller-pod") -> str:
    return c.python_in(APP_NS, "caller", "import urllib.request; print(urllib.request.urlopen("
                       f"'http://hello.{APP_NS}{path}', timeout=15).read().decode())")


#: run in the intruder's pod: another developer's session against the notebook's intercept
ATTACK = r'''
import asyncio, ipaddress, json, socket, sys
import grpc
from tpnb.connector import kube, manager_install
from tpnb.connector.portforward import PortForward
from tpnb.common.forward import MANAGER_CHANNEL_OPTIONS, GrpcFrameChannel
from tpnb.proto import pb, rpc

victim_id, agent_ip, nb_ip, mgr_ip, ns = sys.argv[1:6]
out = {}

def dial(ip, port):
    try:
        socket.create_connection((ip, int(port)), timeout=5).close()
        return "CONNECTED"
    except OSError as exc:
        return type(exc).__name__

out["kernel_port"] = dial(nb_ip, 9000)       # the notebook pod's kernel server
out["agent_files"] = dial(agent_ip, 9902)    # the agent's SFTP, loopback of the app's pod
out["manager_api"] = dial(mgr_ip, 8081)      # the manager's client API, loopback of its pod

async def main():
    t = kube.load_in_cluster_target()
    pod = await manager_install.find_manager_pod(t)
    fwd = PortForward(t, "tpnb", pod, 8081, unix_path="/tmp/intruder-manager.sock")
    await fwd.start()
    ch = grpc.aio.insecure_channel(fwd.address, options=MANAGER_CHANNEL_OPTIONS)
    stub = rpc.ManagerStub(ch)
    sess = await stub.ArriveAsClient(pb.ClientInfo(name="intruder@pod", kube_user="intruder"), timeout=10)
    call = stub.WatchIntercepts(sess)
    lst = await asyncio.wait_for(call.read(), 10)
    call.cancel()
    out["seen"] = [{"mine": ic.mine, "id": ic.id, "env": len(ic.environment), "holder": ic.client_name}
                   for ic in lst.intercepts]
    chan = GrpcFrameChannel(stub.Tunnel())
    await chan.send(pb.TunnelFrame(open=pb.TunnelOpen(
        session_id=sess.session_id, kind=pb.TunnelOpen.AGENT_FILES, protocol=pb.TunnelOpen.TCP,
        dst_ip=ipaddress.ip_address(agent_ip).packed, dst_port=9902, intercept_id=victim_id)))
    first = await asyncio.wait_for(chan.recv(), 10)
    out["files_by_id"] = first.error if first is not None and first.WhichOneof("kind") == "error" else "OPENED"
    chan.cancel()
    spec = pb.InterceptSpec(name="hello", workload="hello", namespace=ns, local_port=9000, target_host="127.0.0.1")
    try:
        await stub.CreateIntercept(pb.CreateInterceptRequest(session=sess, spec=spec), timeout=10)
        out["take_over"] = "CREATED"
    except grpc.aio.AioRpcError as exc:
        out["take_over"] = exc.code().name + ": " + (exc.details() or "")
    try:
        await stub.RemoveIntercept(pb.RemoveInterceptRequest(session_id=sess.session_id, name="hello"), timeout=10)
        out["remove"] = "REMOVED"
    except grpc.aio.AioRpcError as exc:
        out["remove"] = exc.code().name
    await stub.Depart(sess, timeout=5)
    await ch.close()
    await fwd.aclose()

asyncio.run(main())
print("ATTACK", json.dumps(out))
'''


def _pid1_uid(c: Cluster, pod: str) -> str:
    return c.exec(NB_NS, pod, ["sh", "-c", "id -u; grep CapEff /proc/self/status"]).stdout


def test_a_notebook_pod_runs_the_quickstart_in_cluster(cluster: Cluster) -> None:
    c = cluster
    # the pod really is restricted: non-root, no capabilities; a pod asking for NET_ADMIN is refused here
    ident = _pid1_uid(c, "notebook")
    assert ident.split()[0] == "1000" and "CapEff:\t0000000000000000" in ident, ident
    bad = _notebook_pod("netadmin", "notebook", c.nb_image, capabilities={"add": ["NET_ADMIN"]})  # type: ignore[attr-defined]
    refused = c.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(bad), check=False)
    assert refused.returncode != 0 and "restricted" in refused.stderr, refused.stderr
    before = _call_hello(c)
    assert "CLIENT VALUES" in before  # the echo server answers before the intercept

    nb_ip = c.pod_ip(NB_NS, "notebook")
    k = Kernel(c)
    k.at("served1")
    got = _call_hello(c)
    assert f"hello from the notebook v1 in pod {nb_ip}" in got, got
    k.go("served1")
    k.at("served2")
    got = _call_hello(c)
    assert f"hello from the notebook v2 in pod {nb_ip}" in got, got
    k.go("served2")

    k.at("attacked")
    processes = c.exec(NB_NS, "notebook", ["ps", "-eo", "uid,args"]).stdout
    assert all(ln.split()[0] == "1000" for ln in processes.splitlines()[1:] if ln.strip()), processes
    assert "tpnb.daemon" not in processes and "tpnb.connector" in processes, processes
    # what the kernel printed so far is in the kernel's memory, not on disk yet: the intercept's id is in
    # the connector's status, read as the notebook's own user (the attacker gets it for free here)
    mine = json.loads(c.exec(NB_NS, "notebook", ["python3", "-m", "tpnb.cli", "status", "-o", "json"]).stdout)
    assert mine["in_cluster"] and mine["outbound_mode"] == "in-cluster", mine
    victim = mine["intercepts"][0]
    agent_ip = victim["pod_ips"][0]
    mgr_ip = c.pod_ip(MANAGER_NS, "-l app.kubernetes.io/name=traffic-manager")
    attack = c.exec(NB_NS, "intruder", ["python3", "-c", ATTACK, victim["id"], agent_ip, nb_ip, mgr_ip, APP_NS],
                    timeout=120).stdout
    res = json.loads(attack.split("ATTACK", 1)[1])
    assert res["kernel_port"] == "ConnectionRefusedError", res     # the kernel listens on its loopback only
    assert res["agent_files"] == "ConnectionRefusedError", res
    assert res["manager_api"] == "ConnectionRefusedError", res
    assert res["files_by_id"] == "no such intercept in this session", res
    assert res["take_over"].startswith("FAILED_PRECONDITION"), res
    assert res["remove"] == "PERMISSION_DENIED", res  # the name is theirs, in another session
    assert res["seen"] and all(not s["mine"] and not s["id"] and s["env"] == 0 for s in res["seen"]), res
    assert any("notebook" in s["holder"] for s in res["seen"]), res
    # the intruder's own tpnb says the same, in words
    intr = c.exec(NB_NS, "intruder", ["sh", "-c", f"python3 -m tpnb.cli connect -n {APP_NS} && "
                                      "python3 -m tpnb.cli intercept hello --port 9000 --mount=false "
                                      "-- python3 -m http.server 9000; "
                                      "python3 -m tpnb.cli quit --daemon"], check=False, timeout=120)
    assert "intercepted by" in (intr.stdout + intr.stderr) or "holds" in (intr.stdout + intr.stderr), intr
    got = _call_hello(c)
    assert f"hello from the notebook v2 in pod {nb_ip}" in got, got  # still the notebook's
    k.go("attacked")

    code, nb = k.finish()
    if nb is not None:  # the executed notebook, for a look at what the cells showed
        (REPO / "test-artifacts").mkdir(exist_ok=True)
        nbformat.write(nb, REPO / "test-artifacts" / "incluster.ipynb")
    assert code == 0, k.result_text()
    connect = text_of(tagged(nb, "connect"))
    assert "In-cluster mode" in connect, connect
    seconds = float(connect.split("CONNECT_SECONDS")[1].split()[0])
    again = float(text_of(tagged(nb, "reconnect")).split("RECONNECT_SECONDS")[1].split()[0])
    print(f"in-cluster %tp connect: {seconds:.2f} s (connector started), {again:.2f} s again")
    assert seconds < 5.0 and again < 1.5, (seconds, again)
    status = text_of(tagged(nb, "status"))
    assert "Mode             : in-cluster" in status, status
    assert f"Credentials      : ServiceAccount {NB_NS}/notebook" in status, status
    assert f"Pod IP           : {nb_ip}" in status, status
    assert "PROXY_VARS []" in text_of(tagged(nb, "noproxy"))
    assert "CLIENT VALUES" in text_of(tagged(nb, "requests"))
    assert "hello" in text_of(tagged(nb, "list"))
    assert "GREETING hi-from-a-configmap" in text_of(tagged(nb, "env"))
    assert "FILE color: teal" in text_of(tagged(nb, "files"))
    served = text_of(tagged(nb, "served"))
    assert "SERVED" in served and "'/from-the-caller-pod'" in served, served  # the caller pod's, in the kernel
    after = text_of(tagged(nb, "after"))
    assert "CLIENT VALUES" in after and "hello from the notebook" not in after, after
    assert "CLIENT VALUES" in _call_hello(c)  # `leave` restored hello for the cluster too


#: a kubeconfig mounted in the notebook pod: the pod's own ServiceAccount token and CA, namespace `default`
MOUNTED_KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- name: this-cluster
  cluster:
    server: https://kubernetes.default.svc
    certificate-authority: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
users:
- name: notebook
  user:
    tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token
contexts:
- name: notebook-default
  context: {cluster: this-cluster, user: notebook, namespace: default}
current-context: notebook-default
"""


def test_the_quickstart_notebook_itself_in_a_notebook_pod(cluster: Cluster) -> None:
    """notebooks/quickstart.ipynb unchanged, top to bottom, in the restricted notebook pod.

    Its `hello` is in `default` and its cells run `curl` and `kubectl exec` (the image has both), so
    the pod gets a mounted kubeconfig (its own ServiceAccount's token, namespace default) and the
    ServiceAccount the developer Role in `default` plus `pods/exec` for the notebook's own kubectl.
    """
    from run_notebook import ensure_hello, errors_of

    c = cluster
    ensure_hello()
    rules = [r for r in _rbac("notebook") if r["kind"] in ("Role", "RoleBinding")
             and r["metadata"]["namespace"] == APP_NS]
    for r in rules:
        r["metadata"] = {"name": "tpnb-incluster-quickstart", "namespace": "default"}
        if r["kind"] == "Role":
            r["rules"].append({"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]})
        else:
            r["roleRef"]["name"] = "tpnb-incluster-quickstart"
    c.apply(rules)
    src = (REPO / "notebooks" / "quickstart.ipynb").read_text()
    try:
        c.exec(NB_NS, "notebook", ["sh", "-c", "mkdir -p ~/.kube && cat > ~/.kube/config"], input=MOUNTED_KUBECONFIG)
        c.exec(NB_NS, "notebook", ["sh", "-c", "cat > /home/jovyan/quickstart.ipynb"], input=src)
        script = (REPO / "tests" / "run_notebook.py").read_text()
        res = c.exec(NB_NS, "notebook", ["python3", "-", "/home/jovyan/quickstart.ipynb", "/home/jovyan/qs.out.ipynb",
                                         "--timeout", "240"], input=script, timeout=600, check=False)
        out = c.exec(NB_NS, "notebook", ["cat", "/home/jovyan/qs.out.ipynb"], check=False).stdout
        assert out, f"nothing executed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        nb = nbformat.reads(out, as_version=4)
        (REPO / "test-artifacts").mkdir(exist_ok=True)
        nbformat.write(nb, REPO / "test-artifacts" / "quickstart.incluster.ipynb")
        problems = errors_of(nb)
        assert res.returncode == 0, "\n".join(["cell problems (test-artifacts/quickstart.incluster.ipynb):", *problems,
                                               res.stderr[-2000:]])
        connect = text_of(tagged(nb, "connect"))
        assert "In-cluster mode" in connect and "kubeconfig /home/jovyan/.kube/config" in connect, connect
        echo = text_of(tagged(nb, "echo-before"))
        assert "CLIENT VALUES" in echo and "request_uri=http://hello.default" in echo, echo
        assert "Using deployment hello" in text_of(tagged(nb, "intercept-v1")), problems
        assert "hello from the notebook v1" in text_of(tagged(nb, "curl-v1")), problems
        assert "hello from the notebook v1" in text_of(tagged(nb, "from-cluster")), problems  # the agent's pod
        assert "intercept hello kept" in text_of(tagged(nb, "intercept-v2")), problems
        assert "hello from the notebook v2" in text_of(tagged(nb, "curl-v2")), problems
        swap = text_of(tagged(nb, "load-stop"))
        m = re.search(r"requests during the swap: (\d+) answered, (\d+) failed", swap)
        assert m and int(m.group(1)) > 0 and m.group(2) == "0", swap
        assert "KUBERNETES_SERVICE_HOST" in text_of(tagged(nb, "env-keys"))
        records = text_of(tagged(nb, "records"))
        assert "replayed to the kernel: hello from the notebook v2" in records, records
        after = text_of(tagged(nb, "echo-after"))
        assert "CLIENT VALUES" in after and "hello from the notebook" not in after, after
        assert "Disconnecting...done" in text_of(tagged(nb, "quit"))
        assert "CLIENT VALUES" in c.kubectl("-n", "default", "exec", "deploy/hello", "-c", "traffic-agent", "--",
                                            "python3", "-c", "import urllib.request; print(urllib.request.urlopen("
                                            "'http://hello.default', timeout=10).read().decode())").stdout
    finally:
        c.exec(NB_NS, "notebook", ["sh", "-c", "python3 -m tpnb.cli quit; rm -f ~/.kube/config"], check=False)
        c.kubectl("-n", "default", "delete", "role,rolebinding", "tpnb-incluster-quickstart", "--ignore-not-found",
                  check=False)
