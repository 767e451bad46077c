"""The agent injector (connector/agent_injector.py) against the dev cluster's real API server.

What a user relies on when tpnb changes their workload, shown with the real
Deployment controller and real RBAC rather than a look-alike:

* a concurrent write between the injector's read and its PATCH really gets a
  409 from the API server (the PATCH carries the resourceVersion read), the
  injector re-reads and re-plans, and the other writer's change survives;
* the agent really rolls out and becomes Ready, and the Service is pointed
  at it only once no pod without an agent is left;
* `tpnb list` data, an idempotent second injection that writes nothing, and
  removal that gives back the Deployment and Service exactly;
* a user who may read but not patch Deployments gets a PermissionDenied that
  names the verb, the resource and the identity the API server saw, and
  nothing changes; with patch rights the same identity succeeds.
* `remove_all_agents` (`tpnb uninstall --all-agents`) restores the
  Deployment and leaves the ReplicaSets its controller owns alone.

Each test runs inside the `tpnb-laptop` netns (the `in_cluster` fixture
re-runs it there) in a fresh namespace of its own, deleted at the end.
"""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from test_kube_side import (_access_is, _namespace, _poll, _service_account, _wait_access,  # noqa: F401
                            in_cluster)

from tpnb import config
from tpnb.connector import agent_injector as inj
from tpnb.connector import kube
from tpnb.connector.kube import KubeTarget
from tpnb.errors import InterceptError, PermissionDenied
from tpnb.imageref import default_image

pytestmark = pytest.mark.cluster

ECHO_IMAGE = "tpnb.local/echoserver:1.4"
APP = "hello"
#: an unrelated annotation another writer adds while the injector is planning
OTHER_WRITER = "example.com/touched-by"
#: the Deployment controller's annotation (1, 2, 3 as templates change), not ours to restore
REVISION = "deployment.kubernetes.io/revision"


# ====================================================================== the real client, watched

@dataclass
class Call:
    method: str
    path: str
    status: int


class WatchedClient:
    """The product's real ApiClient, passed to the injector in its place.

    Every request still goes to the real API server unchanged; this only
    records what was sent and what the server answered, and runs a test's
    hook (real API calls of its own) just before a chosen request leaves, so
    the cluster can change exactly between the injector's read and its write.
    `scope_to` turns the cluster-wide lists remove_all_agents makes into lists
    of one namespace: the dev cluster is shared with other test sessions
    whose agents must not be removed under them.
    """

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: list[Call] = []
        self.scope_to: str | None = None
        self.scoped: list[str] = []  # cluster-wide paths that were narrowed
        #: a failing hook must fail the test, not pass for an unreachable API server inside the injector
        self.hook_errors: list[BaseException] = []
        self._hooks: list[tuple[str, str, Callable[[], None]]] = []
        self._lock = threading.Lock()

    def before_once(self, method: str, path: str, hook: Callable[[], None]) -> None:
        """Run `hook` right before the next `method path` request is sent."""
        with self._lock:
            self._hooks.append((method, path, hook))

    def param_serialize(self, *args: Any, **kw: Any) -> Any:
        path = kw.get("resource_path", "")
        if self.scope_to and kw.get("method") == "GET" and path in (
                "/apis/apps/v1/deployments", "/apis/apps/v1/replicasets", "/apis/apps/v1/statefulsets",
                "/api/v1/services"):
            self.scoped.append(path)
            prefix, plural = path.rsplit("/", 1)
            kw["resource_path"] = f"{prefix}/namespaces/{self.scope_to}/{plural}"
        return self.real.param_serialize(*args, **kw)

    def call_api(self, method: str, url: str, header_params: Any = None, body: Any = None,
                 post_params: Any = None, _request_timeout: Any = None) -> Any:
        path = urlsplit(url).path
        with self._lock:
            due = [h for h in self._hooks if h[0] == method and h[1] == path]
            for h in due:
                self._hooks.remove(h)
        for _, _, hook in due:
            try:
                hook()
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.hook_errors.append(exc)
        resp = self.real.call_api(method, url, header_params=header_params, body=body,
                                  post_params=post_params, _request_timeout=_request_timeout)
        with self._lock:
            self.calls.append(Call(method, path, int(resp.status)))
        return resp

    def writes(self) -> list[Call]:
        return [c for c in self.calls if c.method != "GET"]


def _call_sync(api: Any, method: str, path: str, body: Any = None,
               content_type: str = "application/json", query: dict[str, str] | None = None) -> Any:
    """A blocking request through a real ApiClient (for hooks, which run in the injector's worker thread)."""
    m, url, h, b, pp = api.param_serialize(
        method=method, resource_path=path, query_params=list((query or {}).items()) or None,
        header_params={"Accept": "application/json", "Content-Type": content_type}, body=body,
        auth_settings=["BearerToken"])
    resp = api.call_api(m, url, header_params=h, body=b, post_params=pp, _request_timeout=20)
    data = resp.read()
    assert 200 <= resp.status < 300, f"{method} {path}: HTTP {resp.status} {data[:300]!r}"
    return json.loads(data) if data else None


# ====================================================================== cluster helpers

def _dep_path(ns: str) -> str:
    return f"/apis/apps/v1/namespaces/{ns}/deployments/{APP}"


def _svc_path(ns: str) -> str:
    return f"/api/v1/namespaces/{ns}/services/{APP}"


def _ready(pod: dict[str, Any]) -> bool:
    st = pod.get("status", {})
    return (any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions") or [])
            and all(cs.get("ready") for cs in st.get("containerStatuses") or [{}]))


async def _live_pods(t: KubeTarget, ns: str) -> list[dict[str, Any]]:
    """The app's pods that are not on their way out."""
    doc = await kube.request(t, "GET", f"/api/v1/namespaces/{ns}/pods", query={"labelSelector": f"app={APP}"})
    return [p for p in doc["items"] if not p["metadata"].get("deletionTimestamp")]


async def _deploy_hello(t: KubeTarget, ns: str) -> None:
    """The Deployment `hello` (echoserver on 8080) and Service `hello` 80 -> 8080, rolled out."""
    await kube.request(t, "POST", f"/apis/apps/v1/namespaces/{ns}/deployments", body={
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": APP, "labels": {"app": APP}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": APP}},
                 "template": {"metadata": {"labels": {"app": APP}},
                              "spec": {"terminationGracePeriodSeconds": 2,
                                       "containers": [{"name": "echoserver", "image": ECHO_IMAGE,
                                                       "imagePullPolicy": "IfNotPresent",
                                                       "ports": [{"containerPort": 8080}]}]}}}})
    await kube.request(t, "POST", f"/api/v1/namespaces/{ns}/services", body={
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": APP},
        "spec": {"selector": {"app": APP}, "ports": [{"port": 80, "targetPort": 8080}]}})

    async def one_ready_pod() -> bool:
        pods = await _live_pods(t, ns)
        return len(pods) == 1 and _ready(pods[0])

    await _poll(one_ready_pod, 180, f"a Ready pod of Deployment {APP}", interval=1)


def _containers(pod: dict[str, Any]) -> list[str]:
    return [c["name"] for c in pod["spec"]["containers"]]


def _anns(obj: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, str]:
    return {k: v for k, v in (obj["metadata"].get("annotations") or {}).items() if k not in drop}


async def _agent_rolled_out(t: KubeTarget, ns: str) -> dict[str, Any]:
    """The one live pod, which must run the app and a Ready traffic-agent of the expected image."""
    pods = await _live_pods(t, ns)
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    pod = pods[0]
    assert _containers(pod) == ["echoserver", inj.AGENT_CONTAINER]
    agent = next(c for c in pod["spec"]["containers"] if c["name"] == inj.AGENT_CONTAINER)
    assert agent["image"] == default_image()
    assert _ready(pod), pod["status"]
    return pod


# ====================================================================== injection, conflict, removal

def test_injection_survives_a_real_conflict_and_removal_restores_exactly(in_cluster: KubeTarget | None) -> None:
    """The whole injector flow on the admin's credentials, as `tpnb intercept` / `tpnb uninstall` run it."""
    t = in_cluster
    if t is None:
        return  # ran inside the laptop netns
    asyncio.run(_injection_flow(t))


async def _injection_flow(t: KubeTarget) -> None:
    image = default_image()
    agent_port = config.get().agent.port
    async with _namespace(t, wait_gone=240) as ns:
        await _deploy_hello(t, ns)
        dep0 = await kube.request(t, "GET", _dep_path(ns))
        svc0 = await kube.request(t, "GET", _svc_path(ns))
        pod0 = (await _live_pods(t, ns))[0]["metadata"]["name"]
        api = WatchedClient(t.api)
        lines: list[tuple[str, str]] = []

        def progress(step: str, message: str, fraction: float) -> None:
            lines.append((step, message))

        wl = await inj.find_workload(api, ns, APP)
        assert (wl.kind, wl.name, wl.namespace) == ("Deployment", APP, ns)
        target = await inj.resolve_service(api, wl, None, None)
        assert (target.service, target.port, target.target_port, target.container, target.container_port) == (
            APP, 80, 8080, "echoserver", 8080)

        # another writer changes the Deployment after the injector read it, before its PATCH lands
        concurrent: dict[str, str] = {}

        def other_writer() -> None:
            got = _call_sync(t.api, "PATCH", _dep_path(ns), {"metadata": {"annotations": {OTHER_WRITER: "ci"}}},
                             "application/merge-patch+json")
            concurrent["rv"] = got["metadata"]["resourceVersion"]

        # what the cluster looks like at the moment the Service is pointed at the agent
        at_switch: dict[str, Any] = {}

        def look_at_pods() -> None:
            doc = _call_sync(t.api, "GET", f"/api/v1/namespaces/{ns}/pods", query={"labelSelector": f"app={APP}"})
            at_switch["pods"] = [p for p in doc["items"] if not p["metadata"].get("deletionTimestamp")]

        api.before_once("PATCH", _dep_path(ns), other_writer)
        api.before_once("PATCH", _svc_path(ns), look_at_pods)
        assert await inj.inject_agent(api, wl, target, image, progress) is True
        assert api.hook_errors == []

        # the real API server refused the stale PATCH; the injector re-read and re-planned
        dep_patches = [c for c in api.calls if c.method == "PATCH" and c.path == _dep_path(ns)]
        statuses = [c.status for c in dep_patches]
        assert statuses[0] == 409 and statuses[-1] == 200 and set(statuses[:-1]) == {409}, api.calls
        first, second = api.calls.index(dep_patches[0]), api.calls.index(dep_patches[-1])
        assert any(c.method == "GET" and c.path == _dep_path(ns) for c in api.calls[first + 1:second])
        dep = await kube.request(t, "GET", _dep_path(ns))
        assert inj.has_agent(dep)
        assert _anns(dep)[OTHER_WRITER] == "ci"  # the other writer's change was not overwritten
        assert int(dep["metadata"]["resourceVersion"]) > int(concurrent["rv"])

        # a real rollout: the new pod runs app + agent, both Ready
        pod = await _agent_rolled_out(t, ns)
        assert pod["metadata"]["name"] != pod0

        # the Service was switched after the rollout, when every live pod had a Ready agent
        svc_patches = [i for i, c in enumerate(api.calls) if c.method == "PATCH" and c.path == _svc_path(ns)]
        assert svc_patches and svc_patches[0] > second and api.calls[svc_patches[0]].status == 200
        assert at_switch["pods"], "no live pod when the Service was switched"
        for p in at_switch["pods"]:
            assert inj.AGENT_CONTAINER in _containers(p) and _ready(p), (p["metadata"]["name"], p["status"])
        said = [m for _, m in lines]
        rolled = next(i for i, m in enumerate(said) if "rolled out" in m)
        routed = next(i for i, m in enumerate(said) if "now target the traffic-agent" in m)
        assert rolled < routed, said
        svc = await kube.request(t, "GET", _svc_path(ns))
        assert svc["spec"]["ports"][0]["targetPort"] == agent_port
        assert json.loads(_anns(svc)[inj.ANN_SVC_ORIG]) == {"80": 8080}

        # `tpnb list`: the Service as the user made it, and the agent
        listed = await asyncio.to_thread(inj.list_workloads, t.api, ns)
        assert listed == [{"name": APP, "namespace": ns, "kind": "Deployment", "services": ["hello:80->8080"],
                           "agent_installed": True, "agent_image": image}]

        # injecting again: nothing is written, no new rollout
        api.calls.clear()
        lines.clear()
        assert await inj.inject_agent(api, wl, target, image, progress) is False
        assert api.writes() == []
        assert any("already installed" in m for _, m in lines), lines
        again = await kube.request(t, "GET", _dep_path(ns))
        assert again["metadata"]["generation"] == dep["metadata"]["generation"]
        assert [p["metadata"]["name"] for p in await _live_pods(t, ns)] == [pod["metadata"]["name"]]

        # `tpnb uninstall --all-agents` finds it through the cluster-wide lists ...
        everywhere = await asyncio.to_thread(inj._list_sync, t.api, "Deployment", None)
        assert any(o["metadata"]["namespace"] == ns and inj.has_agent(o) for o in everywhere)
        # ... and restores it (lists narrowed to our namespace: other sessions' agents stay)
        api.scope_to = ns
        api.calls.clear()
        assert f"{ns}/{APP}" in await inj.remove_all_agents(api, progress)
        assert set(api.scoped) == {"/apis/apps/v1/deployments", "/apis/apps/v1/replicasets",
                                   "/apis/apps/v1/statefulsets", "/api/v1/services"}
        assert {c.path for c in api.writes()} >= {_dep_path(ns), _svc_path(ns)}
        assert all(c.status == 200 for c in api.writes()), api.writes()

        dep1 = await kube.request(t, "GET", _dep_path(ns))
        svc1 = await kube.request(t, "GET", _svc_path(ns))
        assert dep1["spec"] == dep0["spec"]
        assert dep1["metadata"].get("labels") == dep0["metadata"].get("labels")
        assert _anns(dep1, (REVISION,)) == {**_anns(dep0, (REVISION,)), OTHER_WRITER: "ci"}
        assert svc1["spec"] == svc0["spec"]
        assert svc1["metadata"].get("labels") == svc0["metadata"].get("labels")
        assert _anns(svc1) == _anns(svc0)
        pods = await _live_pods(t, ns)
        assert len(pods) == 1 and _containers(pods[0]) == ["echoserver"] and _ready(pods[0])

        # nothing left to remove: no write
        api.scope_to = None
        api.calls.clear()
        lines.clear()
        await inj.remove_agent(api, ns, APP, progress)
        assert api.writes() == []
        assert any("No traffic-agent in hello" in m for _, m in lines), lines

        # a workload that is not there: the error names what is
        with pytest.raises(InterceptError) as ei:
            await inj.find_workload(api, ns, "nope")
        assert "no workload 'nope'" in ei.value.what and f"namespace {ns}" in ei.value.what
        assert "Deployment/hello" in ei.value.why


def test_remove_all_agents_leaves_the_deployments_replicasets_alone(in_cluster: KubeTarget | None) -> None:
    """`tpnb uninstall --all-agents` reports the Deployment once and does not rewrite its revision history
    (the ReplicaSet the Deployment controller made from the injected template keeps it)."""
    t = in_cluster
    if t is None:
        return
    asyncio.run(_remove_all_flow(t))


async def _remove_all_flow(t: KubeTarget) -> None:
    async with _namespace(t, wait_gone=240) as ns:
        await _deploy_hello(t, ns)
        wl = await inj.find_workload(t, ns, APP)
        target = await inj.resolve_service(t, wl, None, None)
        await inj.inject_agent(t, wl, target, default_image(), None)
        rs_path = f"/apis/apps/v1/namespaces/{ns}/replicasets"
        with_agent = [rs for rs in (await kube.request(t, "GET", rs_path))["items"] if inj.has_agent(rs)]
        assert len(with_agent) == 1  # the Deployment controller's ReplicaSet of the injected template
        api = WatchedClient(t.api)
        api.scope_to = ns
        removed = await inj.remove_all_agents(api, None)
        rs_writes = [c for c in api.writes() if "/replicasets/" in c.path]
        after = await kube.request(t, "GET", f"{rs_path}/{with_agent[0]['metadata']['name']}")
        untouched = after["spec"]["template"] == with_agent[0]["spec"]["template"]
        assert removed == [f"{ns}/{APP}"] and rs_writes == [], (removed, rs_writes)
        assert untouched


# ====================================================================== RBAC

SA = "dev"
READ_ONLY = [
    {"apiGroups": ["apps"], "resources": ["deployments", "replicasets"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["services", "pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
]
PATCH = [
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["patch"]},
]


async def _grant(t: KubeTarget, ns: str, name: str, rules: list[dict[str, Any]]) -> None:
    """A Role with `rules`, bound to the ServiceAccount."""
    await kube.request(t, "POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles", body={
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name}, "rules": rules})
    await kube.request(t, "POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings", body={
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": ns}]})


def test_patch_refused_by_rbac_names_who_and_changes_nothing(in_cluster: KubeTarget | None,
                                                             tmp_path: Path) -> None:
    """A ServiceAccount that may read but not patch: refused with the real 403's identity; with patch, allowed."""
    t = in_cluster
    if t is None:
        return
    asyncio.run(_rbac_flow(t, tmp_path))


async def _rbac_flow(t: KubeTarget, tmp: Path) -> None:
    image = default_image()
    async with _namespace(t, wait_gone=240) as ns:
        await _deploy_hello(t, ns)
        dev, user = await _service_account(t, ns, SA, tmp)
        await _grant(t, ns, "read-workloads", READ_ONLY)
        await _wait_access(dev, "list", "deployments.apps", ns, True, timeout=60)
        assert await _access_is(dev, "patch", "deployments.apps", ns, False)
        dep0 = await kube.request(t, "GET", _dep_path(ns))
        svc0 = await kube.request(t, "GET", _svc_path(ns))
        pods0 = [p["metadata"]["name"] for p in await _live_pods(t, ns)]

        api = WatchedClient(dev.api)
        wl = await inj.find_workload(api, ns, APP)
        target = await inj.resolve_service(api, wl, None, None)
        with pytest.raises(PermissionDenied) as pe:
            await inj.inject_agent(api, wl, target, image, None)
        err = pe.value
        assert err.what == f"user {user!r} may not patch deployments.apps in namespace {ns!r}", str(err)
        assert f'User "{user}" cannot patch resource "deployments" in API group "apps"' in err.why, err.why
        assert f"kubectl auth can-i patch deployments.apps -n {ns}" in err.hint, err.hint
        assert "Traceback" not in str(err)
        # the one write tried was refused; nothing in the cluster changed
        assert [(c.method, c.path, c.status) for c in api.writes()] == [("PATCH", _dep_path(ns), 403)]
        dep = await kube.request(t, "GET", _dep_path(ns))
        svc = await kube.request(t, "GET", _svc_path(ns))
        assert not inj.has_agent(dep) and dep["spec"] == dep0["spec"] and _anns(dep) == _anns(dep0)
        assert dep["metadata"]["generation"] == dep0["metadata"]["generation"]
        assert svc["spec"] == svc0["spec"] and _anns(svc) == _anns(svc0)
        assert [p["metadata"]["name"] for p in await _live_pods(t, ns)] == pods0

        # the legitimate path: with patch rights, the very same token injects and removes
        await _grant(t, ns, "patch-workloads", PATCH)
        await _wait_access(dev, "patch", "deployments.apps", ns, True, timeout=60)
        await _wait_access(dev, "patch", "services", ns, True, timeout=60)
        wl = await inj.find_workload(dev, ns, APP)
        assert await inj.inject_agent(dev, wl, target, image, None) is True
        await _agent_rolled_out(t, ns)
        svc = await kube.request(t, "GET", _svc_path(ns))
        assert svc["spec"]["ports"][0]["targetPort"] == config.get().agent.port
        await inj.remove_agent(dev, ns, APP, None)
        dep1 = await kube.request(t, "GET", _dep_path(ns))
        svc1 = await kube.request(t, "GET", _svc_path(ns))
        assert dep1["spec"] == dep0["spec"] and _anns(dep1, (REVISION,)) == _anns(dep0, (REVISION,))
        assert svc1["spec"] == svc0["spec"] and _anns(svc1) == _anns(svc0)
