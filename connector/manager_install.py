"""Install, upgrade and remove the traffic-manager, with the user's credentials.

All objects are applied with server-side apply (field manager "tpnb"), so an
install, an upgrade and a repair are the same idempotent operation, and a
half-finished earlier attempt is simply completed.

Whether to touch a running manager is decided by its image (= version) and a
hash of the rendered manifests stored on the Deployment: equal -> reuse it
untouched (no restart of other users' sessions), different -> apply and wait
for the rollout.

A manager a cluster admin installed with Helm (label
app.kubernetes.io/managed-by=Helm), or one the user has no rights to change,
is never applied over: connect uses it when its API version matches, and
otherwise says who can upgrade it and how (`helm upgrade ...`).  Reads that a
namespace-scoped developer may not make (the Namespace, the Deployment) are
optional: a 403 there means "use what runs", not a failure.
`manager.install: never` makes connect only ever use an installed manager.

The manager only reads cluster state (the connector injects agents with the
user's own rights), so its ClusterRole is get/list/watch, plus creating
TokenReviews to check the agents' tokens.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes.client import ApiException

from tpnb import config
from tpnb.errors import ClusterError, PermissionDenied, TpnbError

from .kube import KubeTarget, api_error, path_quote, request, status_message, whoami

log = logging.getLogger(__name__)

#: progress(step, message, fraction 0..1)
Progress = Callable[[str, str, float], None]

MANAGED_BY = {"app.kubernetes.io/managed-by": "tpnb"}
SELECTOR = {"app.kubernetes.io/name": "traffic-manager"}
NAME = "traffic-manager"
RBAC_NAME = "tpnb-traffic-manager"
HASH_ANNOTATION = "tpnb.io/manifest-hash"
FIELD_MANAGER = "tpnb"
#: the managed-by label value of objects a Helm release owns
HELM = "Helm"
#: where the chart lives in the tpnb repository (for messages)
CHART = "charts/traffic-manager"

#: container states that will not fix themselves within a rollout
_FATAL_WAITING = {
    "ErrImageNeverPull", "ImagePullBackOff", "InvalidImageName", "CrashLoopBackOff",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
}
_IMAGE_REASONS = {"ErrImageNeverPull", "ImagePullBackOff", "ErrImagePull", "InvalidImageName"}


@dataclass
class ManagerHandle:
    namespace: str
    pod: str
    #: the image tag (tpnb version + source hash)
    version: str
    image: str = ""
    #: "tpnb" (self-installed), "Helm" (an admin's release), or "" (unknown / unreadable)
    managed_by: str = "tpnb"


#: a read the user may not make (403): the object may well exist
FORBIDDEN: Any = object()


def image_tag(image: str) -> str:
    """Tag of an image reference ("repo:tag" or "repo@sha256:..." -> digest)."""
    ref = image.split("@", 1)
    if len(ref) == 2:
        return ref[1]
    last = ref[0].rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else "latest"


def _label_value(s: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in s)[:63]
    return out.strip("-_.") or "unknown"


# ----------------------------------------------------------------- manifests
def rbac_name(namespace: str) -> str:
    """Name of the cluster-scoped RBAC objects of the manager in `namespace`.

    The default install uses the plain name; a manager in another namespace
    (manager.namespace set, e.g. tests next to a shared install) gets its own
    ClusterRole/Binding, so installing or uninstalling it never rewires or
    removes the other manager's permissions.
    """
    return RBAC_NAME if namespace == config.ManagerConfig.namespace else f"{RBAC_NAME}-{namespace}"


def manifests(image: str, namespace: str | None = None, grpc_port: int | None = None) -> list[dict[str, Any]]:
    """Every object of a manager install, in apply order (namespace first).

    The client port (`grpc_port`) is served on the pod's loopback only and is
    neither a containerPort nor in the Service: clients reach it through a
    port-forward.  The Service carries the agents' port.
    """
    cfg = config.get()
    namespace = namespace or cfg.manager.namespace
    grpc_port = grpc_port or cfg.manager.grpc_port
    agent_port = cfg.manager.agent_port
    version = _label_value(image_tag(image))
    labels = {**MANAGED_BY, **SELECTOR, "app.kubernetes.io/part-of": "tpnb"}
    rbac = rbac_name(namespace)
    meta = lambda name, ns=namespace: {
        "name": name, **({"namespace": ns} if ns else {}), "labels": dict(labels)}
    read = ["get", "list", "watch"]
    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": namespace, "labels": {**MANAGED_BY, "app.kubernetes.io/part-of": "tpnb"}}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(NAME)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": meta(rbac, None),
         "rules": [
             {"apiGroups": [""], "resources": ["nodes", "namespaces", "services", "pods", "endpoints"], "verbs": read},
             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
             {"apiGroups": ["apps"], "resources": ["deployments", "replicasets", "statefulsets"], "verbs": read},
             # agents prove who they are with a projected ServiceAccount token (cluster/agent_auth.py)
             {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": meta(rbac, None),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": rbac},
         "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": namespace}]},
        # A ClusterIP Service, not headless: its name always resolves, so an
        # agent starting while the manager restarts is not handed a cached NXDOMAIN.
        {"apiVersion": "v1", "kind": "Service", "metadata": meta(NAME),
         "spec": {"selector": dict(SELECTOR),
                  "ports": [{"name": "agents", "port": agent_port, "targetPort": agent_port, "protocol": "TCP"}]}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {**meta(NAME), "labels": {**labels, "app.kubernetes.io/version": version}},
         "spec": {
             "replicas": 1,
             "selector": {"matchLabels": dict(SELECTOR)},
             # sessions live in the manager's memory: never two managers at once
             "strategy": {"type": "Recreate"},
             "template": {
                 "metadata": {"labels": {**labels, "app.kubernetes.io/version": version}},
                 "spec": {
                     "serviceAccountName": NAME,
                     "dnsPolicy": "ClusterFirst",
                     "terminationGracePeriodSeconds": 5,
                     "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{
                         "name": "manager",
                         "image": image,
                         "imagePullPolicy": "IfNotPresent",
                         "args": ["manager"],
                         "env": [
                             {"name": "MANAGER_NAMESPACE",
                              "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                             # the config module's spelling, so config.get() agrees in the pod
                             {"name": "TPNB_MANAGER_NAMESPACE",
                              "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                             {"name": "TPNB_MANAGER_GRPC_PORT", "value": str(grpc_port)},
                             {"name": "TPNB_MANAGER_AGENT_PORT", "value": str(agent_port)},
                             {"name": "TPNB_MANAGER_SESSION_TTL", "value": str(cfg.manager.session_ttl)},
                         ],
                         "ports": [{"name": "agents", "containerPort": agent_port, "protocol": "TCP"}],
                         "readinessProbe": {"tcpSocket": {"port": agent_port},
                                            "periodSeconds": 2, "failureThreshold": 3},
                         "resources": {"requests": {"cpu": "20m", "memory": "64Mi"},
                                       "limits": {"memory": "256Mi"}},
                         "securityContext": {"allowPrivilegeEscalation": False,
                                             "capabilities": {"drop": ["ALL"]}},
                     }],
                 },
             },
         }},
    ]
    digest = hashlib.sha256(json.dumps(objs, sort_keys=True).encode()).hexdigest()[:16]
    objs[-1]["metadata"]["annotations"] = {HASH_ANNOTATION: digest}
    # the pods carry it too: after a change that keeps the image (configuration only), it is what tells
    # the new pod from the old one, still there (and maybe crash-looping) until the controller acts
    objs[-1]["spec"]["template"]["metadata"]["annotations"] = {HASH_ANNOTATION: digest}
    return objs


def object_path(obj: dict[str, Any]) -> tuple[str, str, str | None]:
    """(API path, plural resource for messages, namespace) of a manifest."""
    kind = obj["kind"]
    name = path_quote(obj["metadata"]["name"])
    ns = obj["metadata"].get("namespace")
    table = {
        "Namespace": ("/api/v1", "namespaces", False),
        "ServiceAccount": ("/api/v1", "serviceaccounts", True),
        "Service": ("/api/v1", "services", True),
        "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
        "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
        "Deployment": ("/apis/apps/v1", "deployments", True),
    }
    base, plural, namespaced = table[kind]
    group = base.split("/")[2] if base.startswith("/apis/") else ""
    res = f"{plural}.{group}" if group else plural
    if namespaced:
        return f"{base}/namespaces/{path_quote(ns)}/{plural}/{name}", res, ns
    return f"{base}/{plural}/{name}", res, None


# ------------------------------------------------------------------- helpers
def _noop(step: str, message: str, fraction: float) -> None:
    log.info("%s: %s", step, message)


async def _get(t: KubeTarget, path: str, resource: str, ns: str | None) -> dict[str, Any] | None:
    try:
        return await request(t, "GET", path)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise api_error(exc, f"get {resource}", "get", resource, ns, t.server) from None


async def _get_optional(t: KubeTarget, path: str, resource: str, ns: str | None) -> Any:
    """Like _get, but a 403 returns FORBIDDEN (a namespace-scoped developer may
    not read the manager's Namespace, or even its Deployment)."""
    try:
        return await request(t, "GET", path)
    except ApiException as exc:
        if exc.status == 404:
            return None
        if exc.status == 403:
            log.info("may not get %s %s: %s", resource, path, status_message(exc.body))
            return FORBIDDEN
        raise api_error(exc, f"get {resource}", "get", resource, ns, t.server) from None


def managed_by(obj: dict[str, Any] | None) -> str:
    return str((((obj or {}).get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/managed-by", ""))


def helm_release(obj: dict[str, Any] | None) -> str:
    meta = (obj or {}).get("metadata") or {}
    return str((meta.get("annotations") or {}).get("meta.helm.sh/release-name")
               or (meta.get("labels") or {}).get("app.kubernetes.io/instance") or "traffic-manager")


def helm_upgrade_hint(namespace: str, release: str, image: str) -> str:
    return (f"ask your cluster admin to upgrade it: `helm upgrade {release} {CHART} -n {namespace} "
            f"--reuse-values --set image.tag={image_tag(image)}` (README: Helm install)")


def helm_install_hint(namespace: str, image: str) -> str:
    return (f"ask a cluster admin to install it: `helm install traffic-manager {CHART} -n {namespace} "
            f"--create-namespace --set image.tag={image_tag(image)}` (README: Helm install)")


async def can_i(t: KubeTarget, verb: str, resource: str, namespace: str | None = None,
                name: str | None = None) -> bool | None:
    """SelfSubjectAccessReview (every authenticated user may ask); None when it cannot be asked.

    `resource` is "plural" or "plural.group", or "plural/subresource[.group]".
    """
    plural, _, group = resource.partition(".")
    plural, _, sub = plural.partition("/")
    attrs: dict[str, Any] = {"verb": verb, "group": group, "resource": plural}
    if sub:
        attrs["subresource"] = sub
    if namespace:
        attrs["namespace"] = namespace
    if name:
        attrs["name"] = name
    body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attrs}}
    try:
        res = await request(t, "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", body=body)
    except (ApiException, ClusterError) as exc:
        log.info("cannot ask whether we may %s %s: %s", verb, resource, exc)
        return None
    return bool(((res or {}).get("status") or {}).get("allowed"))


async def _missing_rights(t: KubeTarget, objs: list[dict[str, Any]], present: set[str]) -> list[str]:
    """What the user may not do of what applying `objs` needs ("create clusterroles.rbac..." ...)."""
    missing = []
    for obj in objs:
        _, resource, ns = object_path(obj)
        # server-side apply patches an existing object and creates a missing one
        verbs = ["patch"] if obj["kind"] in present else ["create", "patch"]
        for verb in verbs:
            if await can_i(t, verb, resource, ns, obj["metadata"]["name"]) is False:
                where = f" in namespace {ns}" if ns else " (cluster-wide)"
                missing.append(f"{verb} {resource}{where}")
                break
    return missing


async def _apply(t: KubeTarget, obj: dict[str, Any]) -> None:
    path, resource, ns = object_path(obj)
    query = {"fieldManager": FIELD_MANAGER, "force": "true"}
    try:
        try:
            await request(t, "PATCH", path, query=query, body=obj, content_type="application/apply-patch+yaml")
        except ApiException as exc:
            if exc.status != 422 or obj["kind"] != "Service":
                raise
            # an immutable field changed (e.g. an older headless manager Service): recreate it
            await _delete(t, path, resource, ns)
            await request(t, "PATCH", path, query=query, body=obj, content_type="application/apply-patch+yaml")
    except ApiException as exc:
        if exc.status == 403 and "being terminated" in status_message(exc.body):
            raise ClusterError(f"namespace {ns} is still being deleted", status_message(exc.body),
                               "wait until `kubectl get ns` no longer lists it, then retry") from None
        raise api_error(exc, f"apply {resource} {obj['metadata']['name']}", "create", resource, ns,
                        t.server) from None


async def _delete(t: KubeTarget, path: str, resource: str, ns: str | None) -> bool:
    """Delete; False when it was already gone."""
    try:
        await request(t, "DELETE", path, query={"propagationPolicy": "Background"})
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise api_error(exc, f"delete {resource}", "delete", resource, ns, t.server) from None


def _pod_ready(pod: dict[str, Any]) -> bool:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def _is_wanted(pod: dict[str, Any], image: str, want_hash: str) -> bool:
    """Whether `pod` is of the manifests being rolled out: by their hash where the pod carries one, else
    (a pod of a tpnb that did not annotate pods) by image."""
    have = ((pod.get("metadata") or {}).get("annotations") or {}).get(HASH_ANNOTATION)
    return have == want_hash if have is not None else _pod_image(pod) == image


def _pod_image(pod: dict[str, Any]) -> str:
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == "manager":
            return str(c.get("image") or "")
    return ""


async def _manager_pods(t: KubeTarget, namespace: str) -> list[dict[str, Any]]:
    sel = ",".join(f"{k}={v}" for k, v in SELECTOR.items())
    try:
        res = await request(t, "GET", f"/api/v1/namespaces/{path_quote(namespace)}/pods",
                            query={"labelSelector": sel})
    except ApiException as exc:
        raise api_error(exc, "list traffic-manager pods", "list", "pods", namespace, t.server) from None
    return list(res.get("items") or [])


async def _last_logs(t: KubeTarget, namespace: str, pod: str, lines: int = 15) -> str:
    """Tail of the crashed container's log (previous instance first)."""
    base = f"/api/v1/namespaces/{path_quote(namespace)}/pods/{path_quote(pod)}/log"
    for previous in ("true", "false"):
        try:
            resp = await _raw_text(t, base, {"container": "manager", "tailLines": str(lines), "previous": previous})
            if resp.strip():
                return resp.strip()
        except ApiException:
            continue
        except ClusterError:
            break
    return "(no log output)"


async def _raw_text(t: KubeTarget, path: str, query: dict[str, str]) -> str:
    """GET returning text (pod logs are not JSON)."""
    data = await request(t, "GET", path, query=query, raw=True)
    return bytes(data or b"").decode("utf-8", "replace")


def _image_missing_error(image: str, reason: str, message: str) -> ClusterError:
    return ClusterError(
        f"the traffic-manager cannot start: image {image} is not in the cluster ({reason})",
        message,
        "for the dev cluster run `tpnb devcluster up` (it builds and loads the image); for your own "
        "cluster load it, e.g. `kind load image-archive tpnb.tar`, `k3s ctr images import tpnb.tar`, "
        "`minikube image load " + image + "`, or push it to a registry and set manager.image",
    )


async def _pod_problem(t: KubeTarget, namespace: str, pods: list[dict[str, Any]], image: str, want_hash: str,
                       retried: set[str] | None = None) -> ClusterError | None:
    """A fatal problem of the new manager pod, or None while it may still come up.

    A pod stuck in image-pull back-off may predate the image's arrival (the
    image was loaded after the Deployment was updated; the kubelet then waits
    up to minutes before it tries again): such a pod is deleted once, so its
    replacement pulls at once, and only a replacement failing too is fatal.
    """
    for pod in pods:
        if (pod.get("metadata") or {}).get("deletionTimestamp") or not _is_wanted(pod, image, want_hash):
            continue
        name = pod["metadata"]["name"]
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason") or ""
            msg = waiting.get("message") or ""
            if reason in _IMAGE_REASONS and reason != "ErrImagePull":
                if retried is not None and image not in retried:
                    retried.add(image)
                    log.info("manager pod %s: %s; deleting it once in case the image arrived since", name, reason)
                    try:
                        await request(t, "DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}")
                    except TpnbError as exc:
                        log.info("could not delete %s: %s", name, exc)
                    return None
                return _image_missing_error(image, reason, msg)
            if reason == "CrashLoopBackOff":
                logs = await _last_logs(t, namespace, name)
                last = ((cs.get("lastState") or {}).get("terminated") or {})
                code = last.get("exitCode")
                return ClusterError(
                    f"the traffic-manager pod {namespace}/{name} keeps crashing"
                    + (f" (exit code {code})" if code is not None else ""),
                    "last log lines:\n" + "\n".join("    " + ln for ln in logs.splitlines()),
                    f"see `kubectl -n {namespace} logs {name} --previous`; `tpnb uninstall` removes it",
                )
            if reason in _FATAL_WAITING:
                return ClusterError(f"the traffic-manager pod {namespace}/{name} cannot start ({reason})", msg,
                                    f"see `kubectl -n {namespace} describe pod {name}`")
    return None


def _describe_pending(pods: list[dict[str, Any]], dep: dict[str, Any] | None) -> str:
    """Why the rollout is not done, for the timeout message and progress lines."""
    for pod in pods:
        status = pod.get("status") or {}
        for c in status.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                return f"pod {pod['metadata']['name']} unschedulable: {c.get('message', '')}"
        for cs in status.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting")
            if waiting:
                return f"pod {pod['metadata']['name']}: {waiting.get('reason')} {waiting.get('message', '')}".strip()
        if pod.get("status", {}).get("phase") == "Running" and not _pod_ready(pod):
            return f"pod {pod['metadata']['name']} running, not ready yet (readiness probe on the agents' port)"
    if not pods:
        for c in ((dep or {}).get("status") or {}).get("conditions") or []:
            if c.get("status") == "False" or c.get("type") == "ReplicaFailure":
                return f"{c.get('reason')}: {c.get('message')}"
        return "no pod created yet"
    return "waiting for the pod"


# ------------------------------------------------------------------- public
async def ensure_manager(t: KubeTarget, image: str, progress: Progress | None = None) -> ManagerHandle:
    """Make a Ready traffic-manager running `image` exist; return where it is.

    absent -> install; other image or other manifests -> apply and wait for
    the rollout; same -> reuse.  Failures are reported with the reason the
    pod gives (image missing, crash loop with its last log lines, timeout).

    Never applied over: a Helm-installed manager, one the user may not read
    or change, or any when manager.install is "never" -- those are used as
    they run (`use_installed`); the API version check happens on the link.
    """
    progress = progress or _noop
    cfg = config.get()
    ns = cfg.manager.namespace
    objs = manifests(image, ns, cfg.manager.grpc_port)
    want_hash = objs[-1]["metadata"]["annotations"][HASH_ANNOTATION]
    dep_path, _, _ = object_path(objs[-1])
    ns_path, _, _ = object_path(objs[0])
    deadline = time.monotonic() + cfg.timeouts.rollout

    nsobj = await _get_optional(t, ns_path, "namespaces", None)
    if isinstance(nsobj, dict) and (nsobj.get("metadata") or {}).get("deletionTimestamp"):
        progress("install", f"namespace {ns} is still being deleted; waiting", 0.02)
        while isinstance(nsobj, dict):
            if time.monotonic() > deadline:
                raise ClusterError(f"namespace {ns} is stuck terminating",
                                   _ns_conditions(nsobj), f"see `kubectl get ns {ns} -o yaml`")
            await asyncio.sleep(1)
            nsobj = await _get_optional(t, ns_path, "namespaces", None)

    dep = await _get_optional(t, dep_path, "deployments.apps", ns) if nsobj is not None else None
    if dep is FORBIDDEN:
        progress("reuse", f"you may not read the traffic-manager Deployment in {ns}; using the running manager", 0.3)
        return await use_installed(t, ns, None, progress, deadline)
    if dep and managed_by(dep) == HELM:
        progress("reuse", f"traffic-manager installed by a cluster admin (Helm release {helm_release(dep)}) "
                 f"in {ns}; using it", 0.3)
        return await use_installed(t, ns, dep, progress, deadline)
    if cfg.manager.install == "never":
        if dep:
            progress("reuse", f"manager.install is never: using the traffic-manager in {ns} as it is", 0.3)
            return await use_installed(t, ns, dep, progress, deadline)
        raise ClusterError(f"no traffic-manager in namespace {ns}",
                           "manager.install is \"never\", so connect does not install one",
                           helm_install_hint(ns, image) + "; or set manager.install: auto to let connect "
                           "install it with your rights")
    current_image = ""
    if dep:
        containers = (((dep.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []
        current_image = next((c.get("image", "") for c in containers if c.get("name") == "manager"), "")
    current_hash = ((dep or {}).get("metadata") or {}).get("annotations", {}).get(HASH_ANNOTATION) if dep else None

    if dep and current_image == image and current_hash == want_hash:
        step = "reuse"
        progress(step, f"traffic-manager {image_tag(image)} already installed in {ns}", 0.5)
    else:
        present = {"Deployment"} if dep else set()
        if nsobj is not None:
            present.add("Namespace")
        missing = await _missing_rights(t, objs, present)
        if missing and dep:
            progress("reuse", f"you may not upgrade the traffic-manager in {ns} ({missing[0]}); "
                     "using it as it is", 0.3)
            return await use_installed(t, ns, dep, progress, deadline)
        if missing:
            raise PermissionDenied(
                f"no traffic-manager in namespace {ns}, and you may not install one",
                "installing it needs rights you lack: " + "; ".join(missing[:4])
                + (" ..." if len(missing) > 4 else ""),
                helm_install_hint(ns, image))
        if not dep:
            step = "install"
            progress(step, f"installing traffic-manager {image_tag(image)} in namespace {ns}", 0.05)
        elif current_image != image:
            step = "upgrade"
            progress(step, f"upgrading traffic-manager {image_tag(current_image)} -> {image_tag(image)}", 0.05)
        else:
            step = "upgrade"
            progress(step, "updating the traffic-manager's configuration", 0.05)
        for i, obj in enumerate(objs):
            await _apply(t, obj)
            progress(step, f"applied {obj['kind']} {obj['metadata']['name']}", 0.05 + 0.25 * (i + 1) / len(objs))

    pod = await _wait_rollout(t, ns, dep_path, image, want_hash, deadline, progress, step)
    progress("ready", f"traffic-manager {image_tag(image)} ready ({ns}/{pod})", 1.0)
    return ManagerHandle(namespace=ns, pod=pod, version=image_tag(image), image=image)


async def use_installed(t: KubeTarget, ns: str, dep: dict[str, Any] | None, progress: Progress,
                        deadline: float) -> ManagerHandle:
    """Wait for a Ready pod of the manager someone else installed (never change it)."""
    who = managed_by(dep) if dep else ""
    last = ""
    while True:
        try:
            pods = await _manager_pods(t, ns)
        except PermissionDenied as exc:
            if dep is not None:
                raise
            # nothing in ns is readable: whether a manager is there at all is unknown
            raise PermissionDenied(
                f"cannot find a traffic-manager in namespace {ns}: {exc.what}",
                exc.why,
                f"if a cluster admin installed it there, ask for get/list on pods and create (or get) on pods/portforward "
                f"in {ns} (README: RBAC); if none is installed, {helm_install_hint(ns, config.get().manager_image)}",
            ) from None
        ready = [p for p in pods if _pod_ready(p)]
        if ready:
            ready.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp", ""), reverse=True)
            img = _pod_image(ready[0])
            name = str(ready[0]["metadata"]["name"])
            progress("ready", f"traffic-manager {image_tag(img)} ready ({ns}/{name})", 1.0)
            return ManagerHandle(namespace=ns, pod=name, version=image_tag(img), image=img, managed_by=who)
        note = _describe_pending(pods, dep)
        if note != last:
            progress("wait", note, 0.5)
            last = note
        if time.monotonic() > deadline:
            fix = (f"ask your cluster admin (Helm release {helm_release(dep)}): "
                   f"`kubectl -n {ns} describe pods -l app.kubernetes.io/name=traffic-manager`") if who == HELM \
                else f"see `kubectl -n {ns} describe pods -l app.kubernetes.io/name=traffic-manager`"
            raise ClusterError(f"no ready traffic-manager in namespace {ns}", note, fix)
        await asyncio.sleep(1.0)


async def incompatible_error(t: KubeTarget, api: int, version: str, image: str) -> ClusterError:
    """What to say when the manager speaks another API generation than this tpnb."""
    ns = config.get().manager.namespace
    dep = await _get_optional(t, f"/apis/apps/v1/namespaces/{path_quote(ns)}/deployments/{NAME}",
                              "deployments.apps", ns)
    dep = dep if isinstance(dep, dict) else None
    from tpnb.version import API_VERSION

    why = (f"the traffic-manager in {ns} is {version or 'of unknown version'} and speaks API {api}; "
           f"this tpnb speaks API {API_VERSION}")
    if managed_by(dep) == HELM:
        fix = helm_upgrade_hint(ns, helm_release(dep), image)
    elif dep is None or config.get().manager.install == "never":
        fix = ("ask whoever installed it to upgrade it to " + image_tag(image)
               + ", or use the tpnb release that matches it")
    else:
        fix = ("run `tpnb connect` as someone allowed to upgrade it (manager.install: auto), "
               "or use the tpnb release that matches it")
    return ClusterError(f"the traffic-manager in {ns} is not compatible with this tpnb", why, fix)


def _rollout_complete(dep: dict[str, Any]) -> bool:
    meta = dep.get("metadata") or {}
    st = dep.get("status") or {}
    want = (dep.get("spec") or {}).get("replicas", 1)
    return (
        st.get("observedGeneration", 0) >= meta.get("generation", 1)
        and st.get("updatedReplicas", 0) >= want
        and st.get("replicas", 0) <= want  # no old pods left
        and st.get("availableReplicas", 0) >= 1
    )


async def _wait_rollout(t: KubeTarget, ns: str, dep_path: str, image: str, want_hash: str, deadline: float,
                        progress: Progress, step: str) -> str:
    last_note = ""
    started = time.monotonic()
    retried: set[str] = set()
    while True:
        dep = await _get(t, dep_path, "deployments.apps", ns)
        pods = await _manager_pods(t, ns)
        if dep and _rollout_complete(dep):
            ready = [p for p in pods if _pod_ready(p) and _is_wanted(p, image, want_hash)]
            if ready:
                ready.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp", ""), reverse=True)
                return str(ready[0]["metadata"]["name"])
        problem = await _pod_problem(t, ns, pods, image, want_hash, retried)
        if problem is not None:
            raise problem
        note = _describe_pending([p for p in pods if _is_wanted(p, image, want_hash)], dep)
        if note != last_note:
            elapsed = time.monotonic() - started
            total = max(deadline - started, 1.0)
            progress(step if step != "reuse" else "wait", note, min(0.35 + 0.6 * elapsed / total, 0.95))
            last_note = note
        if time.monotonic() > deadline:
            raise ClusterError(
                f"the traffic-manager did not become ready within {config.get().timeouts.rollout:g}s",
                note,
                f"see `kubectl -n {ns} describe pods -l app.kubernetes.io/name=traffic-manager`; "
                "raise timeouts.rollout for slow clusters",
            )
        await asyncio.sleep(1.0)


async def find_manager_pod(t: KubeTarget) -> str:
    """Name of a Ready traffic-manager pod (the newest, if several)."""
    ns = config.get().manager.namespace
    pods = [p for p in await _manager_pods(t, ns) if _pod_ready(p)]
    if not pods:
        raise ClusterError(f"no ready traffic-manager pod in namespace {ns}",
                           hint="`tpnb connect` installs or repairs it; "
                                f"`kubectl -n {ns} get pods` shows what is there")
    pods.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp", ""), reverse=True)
    return str(pods[0]["metadata"]["name"])


def _ns_conditions(nsobj: dict[str, Any]) -> str:
    conds = (nsobj.get("status") or {}).get("conditions") or []
    bad = [f"{c.get('type')}: {c.get('message')}" for c in conds if c.get("status") == "True"]
    return "; ".join(bad) or "no conditions reported"


async def uninstall_manager(t: KubeTarget, progress: Progress | None = None) -> None:
    """Remove the manager: its namespace (if tpnb created it) and the
    cluster-scoped RBAC; waits until the namespace is gone.

    A namespace that is not labelled managed-by=tpnb (manager.namespace set
    to an existing namespace) is left alone; only our objects in it go.
    """
    progress = progress or _noop
    cfg = config.get()
    ns = cfg.manager.namespace
    objs = manifests("tpnb.local/tpnb:any", ns, cfg.manager.grpc_port)  # only names matter here
    ns_path, _, _ = object_path(objs[0])
    nsobj = await _get(t, ns_path, "namespaces", None)
    owned = bool(nsobj) and ((nsobj.get("metadata") or {}).get("labels") or {}).get(
        "app.kubernetes.io/managed-by") == "tpnb"

    if nsobj and owned:
        progress("uninstall", f"deleting namespace {ns}", 0.1)
        await _delete(t, ns_path, "namespaces", None)
    elif nsobj:
        progress("uninstall", f"namespace {ns} is not tpnb's; deleting only the traffic-manager objects", 0.1)
        for obj in reversed(objs[1:]):
            if obj["kind"] in ("Deployment", "Service", "ServiceAccount"):
                path, resource, ons = object_path(obj)
                await _delete(t, path, resource, ons)
    for obj in objs:
        if obj["kind"] in ("ClusterRoleBinding", "ClusterRole"):
            path, resource, _ = object_path(obj)
            if await _delete(t, path, resource, None):
                progress("uninstall", f"deleted {obj['kind']} {obj['metadata']['name']}", 0.2)

    deadline = time.monotonic() + cfg.timeouts.rollout
    if nsobj and owned:
        progress("uninstall", f"waiting for namespace {ns} to be removed", 0.3)
        while True:
            cur = await _get(t, ns_path, "namespaces", None)
            if cur is None:
                break
            if time.monotonic() > deadline:
                raise ClusterError(f"namespace {ns} was not removed within {cfg.timeouts.rollout:g}s",
                                   _ns_conditions(cur), f"see `kubectl get ns {ns} -o yaml` (finalizers?)")
            await asyncio.sleep(1)
    elif nsobj:
        while await _manager_pods(t, ns):
            if time.monotonic() > deadline:
                raise ClusterError(f"traffic-manager pods in {ns} did not go away in time",
                                   hint=f"`kubectl -n {ns} get pods`")
            await asyncio.sleep(1)
    progress("uninstall", "traffic-manager removed", 1.0)


# ------------------------------------------------------------------ intercept preflight
_KIND_RESOURCE = {"Deployment": "deployments.apps", "StatefulSet": "statefulsets.apps",
                  "ReplicaSet": "replicasets.apps"}


async def managed_namespaces(t: KubeTarget) -> frozenset[str] | None:
    """The namespaces the installed manager serves (its TPNB_MANAGER_NAMESPACES);
    empty: all; None: unknown (its Deployment cannot be read)."""
    ns = config.get().manager.namespace
    dep = await _get_optional(t, f"/apis/apps/v1/namespaces/{path_quote(ns)}/deployments/{NAME}",
                              "deployments.apps", ns)
    if not isinstance(dep, dict):
        return None
    containers = (((dep.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []
    for c in containers:
        if c.get("name") == "manager":
            for e in c.get("env") or []:
                if e.get("name") == "TPNB_MANAGER_NAMESPACES":
                    return frozenset(n.strip() for n in str(e.get("value") or "").split(",") if n.strip())
    return frozenset()


async def preflight_intercept(t: KubeTarget, namespace: str, kind: str, name: str, service: str) -> None:
    """Refuse an intercept before anything is changed: without the rights
    injecting the agent needs (patch the workload and its Service), or outside
    the namespaces the manager serves.  A check that cannot be made is skipped (the
    API server still refuses what is not allowed)."""
    from tpnb.errors import InterceptError

    needs = [("patch", _KIND_RESOURCE.get(kind, f"{kind.lower()}s.apps"), name)]
    if service:
        needs.append(("patch", "services", service))
    for verb, resource, obj_name in needs:
        if await can_i(t, verb, resource, namespace, obj_name) is False:
            who = await whoami(t)
            raise PermissionDenied(
                f"you{f' ({who})' if who else ''} may not {verb} {resource} in namespace {namespace}",
                f"intercepting {kind.lower()} {name} injects the traffic-agent: it patches the {kind}"
                + (f" and Service {service}" if service else "") + "; nothing was changed",
                f"ask a cluster admin for RBAC permission to {verb} {resource} in namespace {namespace} "
                f"(check with `kubectl auth can-i {verb} {resource} -n {namespace}`), or intercept where you may")
    scope = await managed_namespaces(t)
    if scope and namespace not in scope:
        mns = config.get().manager.namespace
        raise InterceptError(
            f"the traffic-manager serves namespaces {', '.join(sorted(scope))} only, not {namespace}",
            f"it was installed namespace-scoped (Helm value managedNamespaces) in {mns}",
            f"intercept in {' or '.join(sorted(scope))}, or ask your cluster admin to add {namespace}: "
            f"`helm upgrade traffic-manager {CHART} -n {mns} --reuse-values "
            f"--set 'managedNamespaces={{{','.join(sorted(scope | {namespace}))}}}'`")
