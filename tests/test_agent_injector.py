"""Agent injection against the dev cluster.

Each test makes its own namespace with the seed's echoserver Deployment and
Service, injects the traffic-agent, checks that traffic from another pod
still reaches the app *through the agent* (no manager needed: the agent
forwards whenever it has no active intercept), removes the agent and checks
that the objects are back exactly as they were.

The API server is only reachable from a laptop network namespace; when this
file runs elsewhere, each test re-runs itself inside `tpnb-laptop`.
"""
from __future__ import annotations

import asyncio
import copy
import glob
import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import rerun_in_laptop

from tpnb.errors import InterceptError
from tpnb.imageref import default_image
from tpnb_devcluster import config as devcluster_config

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent
STATE = Path(devcluster_config.get().state_dir)
KUBECONFIG = STATE / "kubeconfig"
ECHO_IMAGE = "tpnb.local/echoserver:1.4"


def _kubectl_bin() -> str:
    found = sorted(glob.glob(str(STATE / "bin" / "*" / "kubectl")))
    if not found:
        pytest.skip("no kubectl under the dev cluster's bin directory")
    return found[-1]


class Cluster:
    """kubectl and the injector's API client, in one test namespace."""

    def __init__(self) -> None:
        from tpnb.connector import kube

        self.kubectl_bin = _kubectl_bin()
        self.target = kube.load_target(str(KUBECONFIG), None)
        self.api = self.target.api
        self.ns = f"tpnb-ait-{uuid.uuid4().hex[:6]}"
        self.image = default_image()

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([self.kubectl_bin, "--kubeconfig", str(KUBECONFIG), *args], input=input,
                           capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {p.stderr.strip()}")
        return p

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return json.loads(self.kubectl("-n", self.ns, "get", kind, name, "-o", "json").stdout)

    def apply(self, *objs: dict[str, Any]) -> None:
        self.kubectl("-n", self.ns, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                          "items": list(objs)}))

    def image_on_node(self, image: str) -> bool:
        """The dev cluster's own record of imported images (the node status
        lists only the newest 50 images, and late)."""
        try:
            return image in json.loads((STATE / "images-imported.json").read_text())
        except (OSError, ValueError):
            return False

    def rollout(self, name: str) -> None:
        self.kubectl("-n", self.ns, "rollout", "status", f"deploy/{name}", "--timeout=120s", timeout=150)

    def pods(self, selector: str) -> list[dict[str, Any]]:
        out = json.loads(self.kubectl("-n", self.ns, "get", "pods", "-l", selector, "-o", "json").stdout)
        return [p for p in out["items"] if not p["metadata"].get("deletionTimestamp")]

    def exec(self, pod: str, container: str, *argv: str, timeout: float = 60) -> str:
        return self.kubectl("-n", self.ns, "exec", pod, "-c", container, "--", *argv, timeout=timeout).stdout

    def http(self, url: str) -> str:
        """GET `url` from the client pod (another pod in the cluster)."""
        code = ("import sys, urllib.request; "
                "print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())")
        last = ""
        for _ in range(20):  # endpoints may lag the rollout by a moment
            p = self.kubectl("-n", self.ns, "exec", "client", "--", "python3", "-c", code, url, check=False)
            if p.returncode == 0:
                return p.stdout
            last = p.stderr
            time.sleep(1)
        raise AssertionError(f"GET {url} from the client pod failed: {last}")

    def http_until(self, url: str, via_agent: bool, timeout: float = 40) -> str:
        """GET until the answer comes via the agent (the app sees a loopback
        client) or directly: EndpointSlices and kube-proxy follow a rollout
        with a short lag."""
        end = time.monotonic() + timeout
        while True:
            body = self.http(url)
            if ("client_address=127.0.0.1" in body) == via_agent or time.monotonic() > end:
                return body
            time.sleep(1)


@pytest.fixture
def cl(request: pytest.FixtureRequest) -> Any:
    if not rerun_in_laptop(request, KUBECONFIG):
        yield None
        return
    c = Cluster()
    if not c.image_on_node(c.image):
        pytest.skip(f"tpnb image {c.image} is not imported into the dev cluster (tpnb devcluster up)")
    if not c.image_on_node(ECHO_IMAGE):
        pytest.skip(f"{ECHO_IMAGE} is not imported into the dev cluster")
    c.kubectl("create", "namespace", c.ns)
    for _ in range(60):  # pods are refused until the namespace's default ServiceAccount exists
        if c.kubectl("-n", c.ns, "get", "serviceaccount", "default", check=False).returncode == 0:
            break
        time.sleep(0.5)
    try:
        yield c
    finally:
        c.kubectl("delete", "namespace", c.ns, "--wait=false", check=False)


def _echo_objects(name: str, *, named: bool = False, service: bool = True,
                  extra_ports: str = "") -> list[dict[str, Any]]:
    container: dict[str, Any] = {
        "name": "echoserver", "image": ECHO_IMAGE, "imagePullPolicy": "IfNotPresent",
        "env": [{"name": "GREETING", "value": "hello from the app"},
                {"name": "DERIVED", "value": "$(GREETING)!"}],
        "volumeMounts": [{"name": "cfg", "mountPath": "/config", "readOnly": True}],
    }
    if extra_ports:
        container["env"].append({"name": "EXTRA_PORTS", "value": extra_ports})
    if named:
        container["ports"] = [{"name": "http", "containerPort": 8080}]
        container["readinessProbe"] = {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 2}
    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-cfg"},
         "data": {"settings.txt": "answer=42\n"}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": {"app": name}},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                  "template": {"metadata": {"labels": {"app": name}},
                               "spec": {"containers": [container], "terminationGracePeriodSeconds": 5,
                                        "volumes": [{"name": "cfg", "configMap": {"name": f"{name}-cfg"}}]}}}},
    ]
    if service:
        objs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                     "spec": {"selector": {"app": name},
                              "ports": [{"port": 80, "targetPort": "http" if named else 8080}]}})
    return objs


def _client_pod(image: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
            "spec": {"containers": [{"name": "client", "image": image, "imagePullPolicy": "IfNotPresent",
                                     "command": ["sleep", "infinity"]}],
                     "terminationGracePeriodSeconds": 1}}


_VOLATILE_MD = ("resourceVersion", "generation", "managedFields", "uid", "creationTimestamp")


def _comparable(obj: dict[str, Any]) -> dict[str, Any]:
    """The object minus what the API server and controllers own."""
    o = copy.deepcopy(obj)
    o.pop("status", None)
    md = o["metadata"]
    for k in _VOLATILE_MD:
        md.pop(k, None)
    anns = md.get("annotations") or {}
    anns.pop("deployment.kubernetes.io/revision", None)
    if not anns:
        md.pop("annotations", None)
    return o


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _inject(cl: Cluster, name: str, service: str | None = None, port: str | None = None,
                  image: str | None = None) -> list[str]:
    from tpnb.connector import agent_injector as inj

    lines: list[str] = []
    wl = await inj.find_workload(cl.api, cl.ns, name)
    target = await inj.resolve_service(cl.api, wl, service, port)
    await inj.inject_agent(cl.api, wl, target, image or cl.image, lambda s, m, f: lines.append(m))
    await inj.wait_rollout(cl.api, wl, 120, lambda s, m, f: lines.append(m))
    return lines


async def _remove(cl: Cluster, name: str) -> list[str]:
    from tpnb.connector import agent_injector as inj

    lines: list[str] = []
    await inj.remove_agent(cl.api, cl.ns, name, lambda s, m, f: lines.append(m))
    return lines


def _check_agent_pod(cl: Cluster, name: str) -> dict[str, Any]:
    pods = cl.pods(f"app={name}")
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    pod = pods[0]
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert names == ["echoserver", "traffic-agent"]
    statuses = pod["status"].get("containerStatuses") or []
    assert len(statuses) == 2 and all(s["ready"] for s in statuses), statuses
    assert pod["spec"]["shareProcessNamespace"] is True
    return pod


def _agent_view(cl: Cluster, pod: str) -> dict[str, Any]:
    """What the agent would report: the app's environment and a mounted file."""
    code = ("import json; from tpnb.cluster import agent as a; s = a.AgentSettings.from_env(); "
            "print(json.dumps({'env': a.app_environment(s), 'mounts': s.mounts, "
            "'file': open(s.mount_prefix + '/config/settings.txt').read()}))")
    return json.loads(cl.exec(pod, "traffic-agent", "python3", "-c", code).strip().splitlines()[-1])


def test_inject_forward_remove_numeric_target_port(cl: Cluster | None) -> None:
    if cl is None:
        return  # ran inside the laptop netns
    cl.apply(*_echo_objects("hello"), _client_pod(cl.image))
    cl.rollout("hello")
    cl.kubectl("-n", cl.ns, "wait", "--for=condition=Ready", "pod/client", "--timeout=120s", timeout=150)
    before_dep, before_svc = cl.get("deploy", "hello"), cl.get("svc", "hello")
    direct = cl.http(f"http://hello.{cl.ns}/")
    assert "client_address=127.0.0.1" not in direct

    lines = run(_inject(cl, "hello"))
    assert any("Installing traffic-agent" in m for m in lines)
    pod = _check_agent_pod(cl, "hello")
    svc = cl.get("svc", "hello")
    assert svc["spec"]["ports"][0]["targetPort"] == 9900
    assert json.loads(svc["metadata"]["annotations"]["tpnb.io/original-target-port"]) == {"80": 8080}
    # the Service now reaches the app via the agent: the app sees a loopback client
    via_agent = cl.http_until(f"http://hello.{cl.ns}/", True)
    assert "client_address=127.0.0.1" in via_agent and "real path=/" in via_agent
    # the agent sees the app's environment (through /proc) and its volumes
    view = _agent_view(cl, pod["metadata"]["name"])
    assert view["env"]["GREETING"] == "hello from the app" and view["env"]["DERIVED"] == "hello from the app!"
    assert "AGENT_PORT" not in view["env"] and view["env"].get("HOSTNAME") == pod["metadata"]["name"]
    assert view["mounts"] == ["/config"] and view["file"] == "answer=42\n"

    # idempotent: nothing changes, no new rollout
    dep_rv = cl.get("deploy", "hello")["metadata"]["resourceVersion"]
    lines = run(_inject(cl, "hello", port="80"))
    assert any("already installed" in m for m in lines)
    assert cl.get("deploy", "hello")["metadata"]["resourceVersion"] == dep_rv

    run(_remove(cl, "hello"))
    assert _comparable(cl.get("deploy", "hello")) == _comparable(before_dep)
    assert _comparable(cl.get("svc", "hello")) == _comparable(before_svc)
    pods = cl.pods("app=hello")
    assert len(pods) == 1 and [c["name"] for c in pods[0]["spec"]["containers"]] == ["echoserver"]
    assert "client_address=127.0.0.1" not in cl.http_until(f"http://hello.{cl.ns}/", False)
    run(_remove(cl, "hello"))  # idempotent


def test_inject_named_target_port(cl: Cluster | None) -> None:
    if cl is None:
        return
    cl.apply(*_echo_objects("web", named=True), _client_pod(cl.image))
    cl.rollout("web")
    cl.kubectl("-n", cl.ns, "wait", "--for=condition=Ready", "pod/client", "--timeout=120s", timeout=150)
    before_dep, before_svc = cl.get("deploy", "web"), cl.get("svc", "web")

    run(_inject(cl, "web", port="http"))
    pod = _check_agent_pod(cl, "web")
    app, agent = pod["spec"]["containers"]
    assert app["ports"][0]["name"] == "tpnb-orig-http" and app["readinessProbe"]["httpGet"]["port"] == "tpnb-orig-http"
    assert agent["ports"][0]["name"] == "http" and agent["ports"][0]["containerPort"] == 9900
    assert _comparable(cl.get("svc", "web")) == _comparable(before_svc)  # Service untouched
    assert "client_address=127.0.0.1" in cl.http_until(f"http://web.{cl.ns}/", True)

    run(_remove(cl, "web"))
    assert _comparable(cl.get("deploy", "web")) == _comparable(before_dep)
    assert _comparable(cl.get("svc", "web")) == _comparable(before_svc)


def test_errors_are_clear_and_change_nothing(cl: Cluster | None) -> None:
    if cl is None:
        return
    from tpnb.connector import agent_injector as inj

    cl.apply(*_echo_objects("lonely", service=False))
    cl.apply(*_echo_objects("multi", extra_ports="9090"))
    cl.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "multi-metrics"},
              "spec": {"selector": {"app": "multi"}, "ports": [{"name": "metrics", "port": 9090}]}})
    cl.rollout("lonely")
    snap = {k: cl.get(*k.split("/"))["metadata"]["resourceVersion"]
            for k in ("deploy/lonely", "deploy/multi", "svc/multi", "svc/multi-metrics")}

    async def main() -> None:
        with pytest.raises(InterceptError) as ei:
            await inj.find_workload(cl.api, cl.ns, "nope")
        assert "no workload 'nope'" in ei.value.what
        assert "Deployment/lonely" in ei.value.why and "Deployment/multi" in ei.value.why

        wl = await inj.find_workload(cl.api, cl.ns, "lonely")
        with pytest.raises(InterceptError) as ei:
            await inj.resolve_service(cl.api, wl, None, None)
        assert ei.value.what == "workload lonely has no Service" and "expose" in ei.value.hint

        wl = await inj.find_workload(cl.api, cl.ns, "multi")
        with pytest.raises(InterceptError) as ei:
            await inj.resolve_service(cl.api, wl, None, None)
        assert "several Service ports" in ei.value.what
        assert "multi:80->8080" in ei.value.why and "multi-metrics:metrics/9090->9090" in ei.value.why
        with pytest.raises(InterceptError) as ei:
            await inj.resolve_service(cl.api, wl, None, "7777")
        assert "no port 7777" in ei.value.what
        t = await inj.resolve_service(cl.api, wl, "multi-metrics", None)
        assert (t.service, t.container_port) == ("multi-metrics", 9090)

        # an image the node cannot get: the rollout error names it, the workload is restored
        before = cl.get("deploy", "multi")
        t = await inj.resolve_service(cl.api, wl, "multi", None)
        with pytest.raises(InterceptError) as ei:
            await inj.inject_agent(cl.api, wl, t, "tpnb.local/does-not-exist:0", None)
        msg = str(ei.value)
        assert "rollout of Deployment multi failed" in msg
        assert any(r in msg for r in ("ImagePullBackOff", "ErrImagePull", "ErrImageNeverPull")), msg
        assert "restored" in msg
        after = cl.get("deploy", "multi")
        assert _comparable(after) == _comparable(before)
        assert cl.get("svc", "multi")["spec"]["ports"][0]["targetPort"] == 8080

    run(main())
    for k, rv in snap.items():
        if k != "deploy/multi":  # reverted above, so its resourceVersion moved
            assert cl.get(*k.split("/"))["metadata"]["resourceVersion"] == rv, k


@pytest.mark.parametrize("kind", ["ReplicaSet", "StatefulSet"])
def test_replicaset_and_statefulset(cl: Cluster | None, kind: str) -> None:
    """A bare ReplicaSet does not replace its pods on a template change (the
    injector recreates them); a StatefulSet rolls by itself."""
    if cl is None:
        return
    objs = _echo_objects("wl")
    dep = objs[1]
    dep["kind"] = kind
    if kind == "StatefulSet":
        dep["spec"]["serviceName"] = "wl"
    cl.apply(*objs, _client_pod(cl.image))
    res = kind.lower()
    for _ in range(120):
        pods = cl.pods("app=wl")
        if pods and all(c.get("ready") for p in pods for c in p["status"].get("containerStatuses") or [{}]):
            break
        time.sleep(1)
    cl.kubectl("-n", cl.ns, "wait", "--for=condition=Ready", "pod/client", "--timeout=120s", timeout=150)
    before, before_svc = cl.get(res, "wl"), cl.get("svc", "wl")

    run(_inject(cl, "wl"))
    _check_agent_pod(cl, "wl")
    assert "client_address=127.0.0.1" in cl.http_until(f"http://wl.{cl.ns}/", True)

    run(_remove(cl, "wl"))
    assert _comparable(cl.get(res, "wl")) == _comparable(before)
    assert _comparable(cl.get("svc", "wl")) == _comparable(before_svc)
    pods = cl.pods("app=wl")
    assert len(pods) == 1 and [c["name"] for c in pods[0]["spec"]["containers"]] == ["echoserver"]
