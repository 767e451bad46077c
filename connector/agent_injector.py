"""Adding the traffic-agent to a workload, and taking it out again.

Runs in the root daemon with the *user's* kubeconfig, so every change is made
with the user's rights (a 403 names the verb and resource refused).

What injection changes, and where the undo information lives:

* the pod template gets a `traffic-agent` container (cluster/agent.py) and
  `shareProcessNamespace: true` -- the agent reads the app's environment from
  /proc/<pid>/environ of the app container's main process, which is exactly
  what `kubectl exec POD -c APP -- env` shows (envFrom, image ENV, service
  links included).  As a fallback for apps running under another uid, the
  app container's `env` and `envFrom` are also given to the agent renamed
  with the `TPNB_APP_ENV_` prefix (envFrom via its `prefix` field, env by
  renaming and rewriting `$(VAR)` references).
* every volumeMount of the app container is mounted into the agent under
  `agent.mount_prefix` + original path (same readOnly/subPath), listed in
  `TPNB_MOUNTS`; `mount_prefix` itself is an emptyDir (`tpnb-agent-volumes`)
  so that an agent of any uid can link the ServiceAccount volume in.
* the agent's securityContext satisfies Pod Security `restricted` beside a
  non-root app and takes the app's uid (see `_agent_security_context`).
* the pod gets the volume `tpnb-agent-token`: a projected ServiceAccount
  token (audience `tpnb-traffic-manager`, 1 h, rotated by the kubelet),
  mounted read-only into the agent only at /var/run/secrets/tpnb, its file
  named by `TPNB_AGENT_TOKEN_FILE`; the agent presents it to the manager,
  which verifies it with a TokenReview.  Removed again by `restore_workload`
  (volumes of these reserved names are ours).
* Service with a numeric targetPort: that port of the Service is pointed at
  the agent port; the original is kept in the Service annotation
  `tpnb.io/original-target-port` (JSON: service-port key -> original).
* Service with a named targetPort (`http`): the Service is left alone; the
  app's port `http` is renamed (`tpnb-orig-http`, probes referring to it
  follow) and the agent's port takes the name `http`.
* The workload annotation `tpnb.io/agent-injected` (JSON) records the app
  container, ports, Service, renamed ports and the original
  shareProcessNamespace, plus a hash of the agent spec for idempotency.

`remove_agent` computes the original objects from these records alone, so
the restored Deployment/Service equal the originals (apart from fields the
controllers own: status, generation, resourceVersion, revision annotations).

Objects are handled as plain JSON dicts (as `kubectl get -o json` shows them)
and changed with JSON patches that carry the resourceVersion read, so a
concurrent change is a 409 and we re-read and re-plan instead of overwriting.
The planning functions are pure (dict in, dict out) and unit-tested.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import anyio

from tpnb import config
from tpnb.errors import ClusterError, InterceptError, PermissionDenied

from .kube import credentials_rejected

log = logging.getLogger("tpnb.connector.agent_injector")

AGENT_CONTAINER = "traffic-agent"
#: init container redirecting the app's port to the agent inside the pod (headless Services only)
INIT_CONTAINER = "tpnb-agent-init"
ANN_INJECTED = "tpnb.io/agent-injected"
ANN_SVC_ORIG = "tpnb.io/original-target-port"
APP_ENV_PREFIX = "TPNB_APP_ENV_"
AGENT_PORT_NAME = "tpnb-agent"
#: the agent's projected ServiceAccount token for the traffic-manager (TokenReview)
TOKEN_VOLUME = "tpnb-agent-token"
TOKEN_AUDIENCE = "tpnb-traffic-manager"
TOKEN_DIR = "/var/run/secrets/tpnb"
TOKEN_ENV = "TPNB_AGENT_TOKEN_FILE"
#: an emptyDir at agent.mount_prefix, under which the app's volumes are mounted: a
#: directory the agent may write whatever its uid (it links the ServiceAccount volume in)
ROOT_VOLUME = "tpnb-agent-volumes"
#: pod volumes the injector adds (and removes again): names no app may use
AGENT_VOLUMES = (TOKEN_VOLUME, ROOT_VOLUME)
#: uid the agent uses when the pod demands non-root and tells us no uid
NONROOT_UID = 65532
KINDS: list[tuple[str, str]] = [
    ("Deployment", "deployments"),
    ("ReplicaSet", "replicasets"),
    ("StatefulSet", "statefulsets"),
]
_PLURAL = dict(KINDS)

#: the daemon's progress callback: progress(step, message, fraction) -- fraction -1
#: when unknown; a one-argument progress(message) is accepted too.  May be async.
Progress = Callable[..., Any] | None


@dataclass
class Workload:
    kind: str  # Deployment, ReplicaSet, StatefulSet
    name: str
    namespace: str
    obj: Any  # the object as a JSON dict (kubectl get -o json)


@dataclass
class ServiceTarget:
    service: str
    port_name: str  # the Service port's name ("" for an unnamed single port)
    port: int  # the Service port number
    target_port: int | str  # the Service's original targetPort
    container: str  # app container the traffic goes to
    container_port: int  # and its port number (the agent's APP_PORT)
    headless: bool = False  # the Service has no cluster IP: its clients connect to pod IPs

    @property
    def port_key(self) -> str:
        """How the Service port is identified in annotations: name, else number."""
        return self.port_name or str(self.port)


# ====================================================================== Kubernetes access

class _ApiError(Exception):
    def __init__(self, status: int, message: str, reason: str = "", body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.body = body


def _client(api: Any) -> Any:
    """Accept a kubernetes ApiClient or anything holding one in `.api` (KubeTarget)."""
    if hasattr(api, "call_api"):
        return api
    inner = getattr(api, "api", None)
    if inner is not None and hasattr(inner, "call_api"):
        return inner
    raise TypeError(f"expected a kubernetes ApiClient, got {type(api).__name__}")


def _request_sync(api: Any, method: str, path: str, *, query: dict[str, Any] | None = None,
                  body: Any = None, content_type: str | None = None,
                  raw: bool = False) -> Any:
    """One API call; JSON in and out.  Raises _ApiError for any non-2xx status."""
    client = _client(api)
    headers = {"Accept": "application/json" if not raw else "*/*"}
    if content_type:
        headers["Content-Type"] = content_type
    q = [(k, v) for k, v in (query or {}).items() if v is not None]
    try:
        m, url, h, b, pp = client.param_serialize(
            method=method, resource_path=path, query_params=q or None, header_params=headers,
            body=body, auth_settings=["BearerToken"])
        resp = client.call_api(m, url, header_params=h, body=b, post_params=pp,
                               _request_timeout=config.get().timeouts.api)
        data = resp.read()
    except _ApiError:
        raise
    except Exception as exc:  # urllib3 errors, ApiException(status=0) for TLS, ...
        status = getattr(exc, "status", 0) or 0
        if status:  # a client that raises for HTTP errors instead of returning them: same error, same body
            raise _status_error(status, getattr(exc, "body", None), str(getattr(exc, "reason", "") or exc)) from None
        raise ClusterError(
            "cannot reach the Kubernetes API server",
            f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
            "check the cluster is up and your kubeconfig points at it (kubectl cluster-info)",
        ) from None
    status = int(resp.status)
    if not 200 <= status <= 299:
        raise _status_error(status, data, str(resp.reason))
    if raw:
        return data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
    return json.loads(data) if data else {}


def _status_error(status: int, data: Any, fallback: str) -> _ApiError:
    """A non-2xx answer as _ApiError: the Status document's message and reason, and the body kept (the
    RBAC wording names the user the API server saw from it)."""
    message, reason = "", ""
    if isinstance(data, str):
        data = data.encode()
    try:
        doc = json.loads(data)
        message, reason = doc.get("message", ""), doc.get("reason", "")
    except (ValueError, AttributeError, TypeError):
        message = (data or b"")[:300].decode("utf-8", "replace")
    return _ApiError(status, message or fallback, reason, data)


def _denied(exc: _ApiError, verb: str, resource: str, namespace: str | None) -> PermissionDenied:
    try:  # the daemon's wording: names the user the API server saw
        from types import SimpleNamespace

        from . import kube

        return kube.rbac_error(SimpleNamespace(body=exc.body, reason=exc.reason, status=403),  # type: ignore[arg-type]
                               verb, resource, namespace)
    except ImportError:
        pass
    where = f" in namespace {namespace}" if namespace else " cluster-wide"
    ns_flag = f" -n {namespace}" if namespace else " -A"
    return PermissionDenied(
        f"not allowed to {verb} {resource}{where}",
        exc.message,
        f"ask a cluster admin for RBAC permission (check: kubectl auth can-i {verb} {resource}{ns_flag})",
    )


def _fail(exc: _ApiError, verb: str, resource: str, namespace: str | None) -> Exception:
    if exc.status == 403:
        return _denied(exc, verb, resource, namespace)
    if exc.status == 401:
        return credentials_rejected(f"cannot {verb} {resource}" + (f" in namespace {namespace}" if namespace else ""),
                                    exc.message)
    return ClusterError(f"cannot {verb} {resource}" + (f" in namespace {namespace}" if namespace else ""),
                        f"HTTP {exc.status} {exc.reason}: {exc.message}".strip(),
                        "see the daemon log for details")


def _apps_path(namespace: str | None, plural: str, name: str = "") -> str:
    base = f"/apis/apps/v1/namespaces/{namespace}/{plural}" if namespace else f"/apis/apps/v1/{plural}"
    return f"{base}/{name}" if name else base


def _core_path(namespace: str | None, plural: str, name: str = "") -> str:
    base = f"/api/v1/namespaces/{namespace}/{plural}" if namespace else f"/api/v1/{plural}"
    return f"{base}/{name}" if name else base


def _path_for(kind: str, namespace: str | None, name: str = "") -> str:
    if kind == "Service":
        return _core_path(namespace, "services", name)
    return _apps_path(namespace, _PLURAL[kind], name)


def _resource(kind: str) -> str:
    return "services" if kind == "Service" else f"{_PLURAL[kind]}.apps"


def _get_sync(api: Any, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _request_sync(api, "GET", _path_for(kind, namespace, name))
    except _ApiError as exc:
        if exc.status == 404:
            return None
        raise _fail(exc, "get", _resource(kind), namespace) from None


def _list_sync(api: Any, kind: str, namespace: str | None, **query: Any) -> list[dict[str, Any]]:
    try:
        doc = _request_sync(api, "GET", _path_for(kind, namespace), query=query)
    except _ApiError as exc:
        if exc.status == 404 and kind == "Service":
            return []
        raise _fail(exc, "list", _resource(kind), namespace) from None
    return list(doc.get("items") or [])


class _Conflict(Exception):
    """The object changed between our read and our patch."""


def _patch_sync(api: Any, kind: str, obj: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """JSON-patch `obj` into `new`, guarded by obj's resourceVersion (409 -> _Conflict)."""
    ops = json_patch(obj, new)
    if not ops:
        return obj
    md = obj["metadata"]
    ops.insert(0, {"op": "replace", "path": "/metadata/resourceVersion", "value": md["resourceVersion"]})
    try:
        return _request_sync(api, "PATCH", _path_for(kind, md["namespace"], md["name"]), body=ops,
                             content_type="application/json-patch+json")
    except _ApiError as exc:
        if exc.status == 409:
            raise _Conflict(exc.message) from None
        if exc.status == 422:
            raise InterceptError(f"the API server refused the change to {kind} {md['name']}",
                                 exc.message, "this is a tpnb bug; please report it with the daemon log") from None
        raise _fail(exc, "patch", _resource(kind), md["namespace"]) from None


async def _run(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kw))


def _arity3(fn: Callable[..., Any]) -> bool:
    try:
        inspect.signature(fn).bind("step", "message", -1.0)
        return True
    except (TypeError, ValueError):
        return False


async def _say(progress: Progress, message: str, step: str = "agent") -> None:
    log.info("%s", message)
    if progress is None:
        return
    res = progress(step, message, -1.0) if _arity3(progress) else progress(message)
    if inspect.isawaitable(res):
        await res


# ====================================================================== pure helpers

def _esc(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def json_patch(old: Any, new: Any, path: str = "") -> list[dict[str, Any]]:
    """RFC 6902 operations turning `old` into `new` (lists are replaced whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        ops: list[dict[str, Any]] = []
        for k in old:
            if k not in new:
                ops.append({"op": "remove", "path": f"{path}/{_esc(k)}"})
        for k, v in new.items():
            if k not in old:
                ops.append({"op": "add", "path": f"{path}/{_esc(k)}", "value": v})
            elif old[k] != v:
                ops.extend(json_patch(old[k], v, f"{path}/{_esc(k)}"))
        return ops
    if old == new and type(old) is type(new):
        return []
    return [{"op": "replace", "path": path, "value": new}]


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.setdefault("spec", {}).setdefault("template", {}).setdefault("spec", {})


def _annotations(obj: dict[str, Any]) -> dict[str, str]:
    return obj.get("metadata", {}).get("annotations") or {}


def injected_info(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The workload's `tpnb.io/agent-injected` record, or None."""
    raw = _annotations(obj).get(ANN_INJECTED)
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def has_agent(obj: dict[str, Any]) -> bool:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return any(c.get("name") == AGENT_CONTAINER for c in spec.get("containers") or [])


def _set_annotation(obj: dict[str, Any], key: str, value: str | None) -> None:
    md = obj.setdefault("metadata", {})
    anns = dict(md.get("annotations") or {})
    if value is None:
        anns.pop(key, None)
    else:
        anns[key] = value
    if anns:
        md["annotations"] = anns
    else:
        md.pop("annotations", None)


def _probe_keys() -> tuple[str, ...]:
    return ("readinessProbe", "livenessProbe", "startupProbe")


def _rename_port_refs(container: dict[str, Any], renames: dict[str, str]) -> None:
    """Rename named ports of `container` and every probe/hook reference to them."""
    for p in container.get("ports") or []:
        if p.get("name") in renames:
            p["name"] = renames[p["name"]]
    handlers: list[dict[str, Any]] = [container[k] for k in _probe_keys() if isinstance(container.get(k), dict)]
    lc = container.get("lifecycle") or {}
    handlers += [lc[k] for k in ("postStart", "preStop") if isinstance(lc.get(k), dict)]
    for h in handlers:
        for kind in ("httpGet", "tcpSocket"):
            action = h.get(kind)
            if isinstance(action, dict) and isinstance(action.get("port"), str) and action["port"] in renames:
                action["port"] = renames[action["port"]]


def orig_port_name(name: str) -> str:
    """The name the app's port gets while the agent owns `name` (IANA_SVC_NAME: <= 15 chars)."""
    cand = f"tpnb-orig-{name}"
    if len(cand) <= 15:
        return cand
    return "tpnb-o-" + hashlib.sha1(name.encode()).hexdigest()[:8]


def restore_workload(obj: dict[str, Any]) -> dict[str, Any]:
    """The workload as it was before injection (a new dict; `obj` is untouched)."""
    out = copy.deepcopy(obj)
    info = injected_info(out)
    if info is None and not has_agent(out):
        return out
    info = info or {}
    spec = _pod_spec(out)
    spec["containers"] = [c for c in spec.get("containers") or [] if c.get("name") != AGENT_CONTAINER]
    if "initContainers" in spec:
        inits = [c for c in spec.get("initContainers") or [] if c.get("name") != INIT_CONTAINER]
        if inits:
            spec["initContainers"] = inits
        else:
            spec.pop("initContainers")
    if "volumes" in spec:
        vols = [v for v in spec.get("volumes") or [] if v.get("name") not in AGENT_VOLUMES]
        if vols:
            spec["volumes"] = vols
        else:
            spec.pop("volumes")
    renamed: dict[str, str] = info.get("renamedPorts") or {}
    if renamed:
        back = {new: old for old, new in renamed.items()}
        for c in spec["containers"]:
            if c.get("name") == info.get("container"):
                _rename_port_refs(c, back)
    if "shareProcessNamespace" in info:
        orig = info["shareProcessNamespace"]
        if orig is None:
            spec.pop("shareProcessNamespace", None)
        else:
            spec["shareProcessNamespace"] = orig
    _set_annotation(out, ANN_INJECTED, None)
    return out


def _svc_port_key(p: dict[str, Any]) -> str:
    return p.get("name") or str(p.get("port"))


def restore_service(svc: dict[str, Any]) -> dict[str, Any]:
    """The Service as it was before injection."""
    out = copy.deepcopy(svc)
    raw = _annotations(out).get(ANN_SVC_ORIG)
    if raw is None:
        return out
    try:
        orig = json.loads(raw)
    except ValueError:
        orig = {}
    for p in out.get("spec", {}).get("ports") or []:
        key = _svc_port_key(p)
        if key in orig:
            if orig[key] is None:
                p.pop("targetPort", None)
            else:
                p["targetPort"] = orig[key]
    _set_annotation(out, ANN_SVC_ORIG, None)
    return out


def _selects(svc: dict[str, Any], labels: dict[str, str]) -> bool:
    sel = svc.get("spec", {}).get("selector") or {}
    return bool(sel) and all(labels.get(k) == v for k, v in sel.items())


def _template_labels(obj: dict[str, Any]) -> dict[str, str]:
    return obj.get("spec", {}).get("template", {}).get("metadata", {}).get("labels") or {}


def _describe_port(svc_name: str, p: dict[str, Any]) -> str:
    name = f"{p['name']}/" if p.get("name") else ""
    return f"{svc_name}:{name}{p.get('port')}->{p.get('targetPort', p.get('port'))}"


def _is_headless(svc: dict[str, Any]) -> bool:
    return (svc.get("spec", {}).get("clusterIP") or "") == "None"


def unsupported_pod_shape(wl: Workload, obj: dict[str, Any]) -> InterceptError | None:
    """Why pods of this shape cannot carry the traffic-agent (None: they can).  Pure."""
    spec = _pod_spec(copy.deepcopy(obj))
    ref = f"{wl.kind} {wl.name}"
    if spec.get("hostNetwork"):
        return InterceptError(
            f"cannot intercept {ref}: its pods use hostNetwork",
            "they share the node's network namespace, so the traffic-agent's port would be opened on the "
            "node itself and clients reach the app on the node's address, not through a Service's targetPort",
            "intercept a workload that runs in the pod network (without hostNetwork: true)")
    replicas = obj.get("spec", {}).get("replicas")
    if replicas is not None and int(replicas) == 0:
        return InterceptError(
            f"cannot intercept {ref}: it is scaled to 0 replicas",
            "there is no pod to carry the traffic-agent, so nothing would reach the laptop",
            f"scale it up first: kubectl -n {wl.namespace} scale {wl.kind.lower()} {wl.name} --replicas=1")
    return None


def _unusable_service(svc: dict[str, Any], ref: str) -> InterceptError | None:
    """Why a Service (named with --service) cannot be routed through an agent."""
    sname = svc["metadata"]["name"]
    spec = svc.get("spec", {})
    if spec.get("type") == "ExternalName":
        return InterceptError(f"Service {sname} is of type ExternalName",
                              f"it is a DNS alias for {spec.get('externalName')!r} and selects no pods of {ref}",
                              "intercept through a Service that selects the workload's pods")
    if not spec.get("selector"):
        return InterceptError(f"Service {sname} has no selector",
                              "its endpoints are written by hand or by another controller, not derived from the "
                              f"pods of {ref}, so tpnb cannot route it through the traffic-agent",
                              "intercept through a Service with a selector matching the pods")
    return None


def needs_redirect(wl: Workload, services: list[dict[str, Any]], target: ServiceTarget) -> bool:
    """Whether a headless Service selecting the pods reaches the intercepted container port (pure):
    its clients connect to pod IP and port directly, so the pod must redirect that port to the agent."""
    obj = restore_workload(wl.obj)
    labels = _template_labels(obj)
    containers = [c for c in _pod_spec(obj).get("containers") or [] if c.get("name") != AGENT_CONTAINER]
    for svc in services:
        svc = restore_service(svc)
        if not (_is_headless(svc) and _selects(svc, labels)):
            continue
        for p in svc.get("spec", {}).get("ports") or []:
            if (p.get("protocol") or "TCP") != "TCP":
                continue
            cname, cport, _ = _container_for(containers, p.get("targetPort", p.get("port")), target.container)
            if cname == target.container and cport == target.container_port:
                return True
    return False


def redirect_init_container(target: ServiceTarget, image: str, cfg: config.Config) -> dict[str, Any]:
    """The init container that redirects the app's port to the agent in the pod (cluster/redirect.py).
    Only it holds NET_ADMIN, for the one nft command; the agent never does."""
    return {
        "name": INIT_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python3", "-m", "tpnb.cluster.redirect"],
        "env": [{"name": "APP_PORT", "value": str(target.container_port)},
                {"name": "AGENT_PORT", "value": str(cfg.agent.port)}],
        "securityContext": {"runAsUser": 0, "runAsNonRoot": False, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}},
    }


def _check_container(containers: list[dict[str, Any]], container: str | None, ref: str) -> None:
    names = [c["name"] for c in containers]
    if container and container not in names:
        raise InterceptError(f"{ref} has no container {container!r}",
                             "its containers: " + ", ".join(names), "use --container with one of them")


def resolve_target(wl: Workload, services: list[dict[str, Any]], service: str | None,
                   port: str | int | None, container: str | None = None) -> ServiceTarget:
    """Pick the Service port to intercept (pure; works on restored objects).

    `container` (--container) names the app container whose port, env and
    volumes are intercepted; needed when several containers could serve the port.
    Several Services (or ports) reaching the same container port are one
    intercept: the agent takes that container port for all of them, and the
    first (by --service, else by name) is the one reported.
    """
    obj = restore_workload(wl.obj)
    svcs = [restore_service(s) for s in services]
    labels = _template_labels(obj)
    containers = [c for c in _pod_spec(obj).get("containers") or [] if c.get("name") != AGENT_CONTAINER]
    ref = f"{wl.kind} {wl.name}"
    bad = unsupported_pod_shape(wl, obj)
    if bad is not None:
        raise bad
    _check_container(containers, container, ref)
    matching = [s for s in svcs if _selects(s, labels)]
    if service:
        named = [s for s in svcs if s["metadata"]["name"] == service]
        if named and named[0] not in matching:
            bad = _unusable_service(named[0], ref)
            if bad is not None:
                raise bad
        named = [s for s in named if s in matching]
        if not named:
            exists = any(s["metadata"]["name"] == service for s in svcs)
            why = (f"Service {service} exists but its selector does not match the pod labels {labels}"
                   if exists else f"there is no Service {service} in namespace {wl.namespace}")
            choices = ", ".join(s["metadata"]["name"] for s in matching) or "none"
            raise InterceptError(f"{ref} is not exposed by Service {service}", why,
                                 f"Services selecting {wl.name}: {choices}")
        matching = named
    if not matching:
        raise InterceptError(
            f"workload {wl.name} has no Service",
            f"no Service in namespace {wl.namespace} selects its pod labels {labels}",
            f"expose it first, e.g. kubectl -n {wl.namespace} expose {wl.kind.lower()} {wl.name} "
            "--port 80 --target-port 8080",
        )
    cands: list[ServiceTarget] = []
    headless: list[ServiceTarget] = []
    available: list[str] = []
    unresolved: list[str] = []
    want = None if port is None or port == "" else str(port)
    for s in sorted(matching, key=lambda s: s["metadata"]["name"]):
        sname = s["metadata"]["name"]
        for p in s.get("spec", {}).get("ports") or []:
            if (p.get("protocol") or "TCP") != "TCP":
                continue
            available.append(_describe_port(sname, p))
            tp = p.get("targetPort", p.get("port"))
            if want is not None and want not in (str(p.get("port")), p.get("name") or "", str(tp)):
                continue
            cname, cport, why = _container_for(containers, tp, container)
            if cname is None:
                unresolved.append(f"{_describe_port(sname, p)} ({why})")
                continue
            t = ServiceTarget(service=sname, port_name=p.get("name") or "", port=int(p["port"]),
                              target_port=tp, container=cname, container_port=cport)
            (headless if _is_headless(s) else cands).append(t)
    if not cands and headless:   # reached through headless Services only: the pod-side redirect takes it
        cands = [dataclasses.replace(t, headless=True) for t in headless]
    if not cands:
        if want is not None:
            raise InterceptError(
                f"no port {want} on the Service(s) of {ref}",
                "ports: " + (", ".join(available) or "none (TCP)") + ("; unusable: " + ", ".join(unresolved) if unresolved else ""),
                "use --port with one of the names or numbers listed" + (
                    ", and --container with the container serving it" if container else ""),
            )
        raise InterceptError(
            f"{ref} has no usable TCP Service port",
            ", ".join(unresolved) or "its Services expose no TCP ports",
            "the traffic-agent forwards TCP only" if not unresolved else
            "use --port and/or --container to pick the port and the container serving it",
        )
    if len({(c.container, c.container_port) for c in cands}) > 1:
        raise InterceptError(
            f"{ref} is exposed on several Service ports; pick one",
            "choices: " + ", ".join(_describe_port(c.service, {"name": c.port_name, "port": c.port,
                                                              "targetPort": c.target_port}) for c in cands),
            "add --service NAME and/or --port NAME|NUMBER",
        )
    return cands[0]


def _container_for(containers: list[dict[str, Any]], tp: int | str,
                   want: str | None = None) -> tuple[str | None, int, str]:
    """(container, its port number, "") serving Service targetPort `tp`, or (None, 0, why not)."""
    names = [c["name"] for c in containers]
    if isinstance(tp, str) and not tp.isdigit():
        for c in containers:
            for p in c.get("ports") or []:
                if p.get("name") == tp and (p.get("protocol") or "TCP") == "TCP":
                    if want and c["name"] != want:
                        return None, 0, f"port {tp!r} is container {c['name']}'s, not {want}'s"
                    return c["name"], int(p["containerPort"]), ""
        return None, 0, f"no container port named {tp!r}"
    num = int(tp)
    for c in containers:
        for p in c.get("ports") or []:
            if int(p.get("containerPort", -1)) == num and (p.get("protocol") or "TCP") == "TCP":
                if want and c["name"] != want:
                    return None, 0, f"port {num} is container {c['name']}'s, not {want}'s"
                return c["name"], num, ""
    # an undeclared port (kubectl create deploy ... declares none): --container says whose it is;
    # with one container it can only be that one's
    if want:
        return want, num, ""
    if len(containers) == 1:
        return containers[0]["name"], num, ""
    if not containers:
        return None, 0, "the pod has no containers"
    return None, 0, (f"no container declares port {num}, and the pod has several: {', '.join(names)} "
                     "(say which with --container)")


_VAR_REF = re.compile(r"\$\$|\$\(([^)]*)\)")


def _rewrite_refs(value: str, names: set[str]) -> str:
    """$(NAME) -> $(TPNB_APP_ENV_NAME) for the app's own variables; $$ stays."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$$"
        ref = m.group(1)
        return f"$({APP_ENV_PREFIX}{ref})" if ref in names else m.group(0)
    return _VAR_REF.sub(sub, value)


def _env_copies(app: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    names = {e.get("name", "") for e in app.get("env") or []}
    env: list[dict[str, Any]] = []
    for e in app.get("env") or []:
        n = copy.deepcopy(e)
        n["name"] = APP_ENV_PREFIX + e["name"]
        if isinstance(n.get("value"), str):
            n["value"] = _rewrite_refs(n["value"], names)
        rf = (n.get("valueFrom") or {}).get("resourceFieldRef")
        if isinstance(rf, dict) and not rf.get("containerName"):
            rf["containerName"] = app["name"]  # else it would describe the agent
        env.append(n)
    env_from: list[dict[str, Any]] = []
    for ef in app.get("envFrom") or []:
        n = copy.deepcopy(ef)
        n["prefix"] = APP_ENV_PREFIX + (ef.get("prefix") or "")
        env_from.append(n)
    return env, env_from


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def agent_container(wl: Workload, app: dict[str, Any], pod_spec: dict[str, Any], target: ServiceTarget,
                    image: str, port_name: str, cfg: config.Config) -> dict[str, Any]:
    """The traffic-agent container for `app` (see the module docstring)."""
    a = cfg.agent
    prefix = a.mount_prefix.rstrip("/")
    mounts: list[dict[str, Any]] = [{"name": ROOT_VOLUME, "mountPath": prefix}]
    paths: list[str] = []
    for m in app.get("volumeMounts") or []:
        nm: dict[str, Any] = {"name": m["name"], "mountPath": prefix + "/" + m["mountPath"].lstrip("/")}
        for k in ("readOnly", "subPath", "subPathExpr"):
            if k in m:
                nm[k] = m[k]
        mounts.append(nm)
        paths.append(m["mountPath"])
    env_copies, env_from = _env_copies(app)
    env = [
        {"name": "TPNB_CONTAINER", "value": app["name"]},
        {"name": "AGENT_NAME", "value": wl.name},
        _field_env("AGENT_NAMESPACE", "metadata.namespace"),
        _field_env("AGENT_POD_NAME", "metadata.name"),
        _field_env("AGENT_POD_IP", "status.podIP"),
        {"name": "APP_PORT", "value": str(target.container_port)},
        {"name": "AGENT_PORT", "value": str(a.port)},
        {"name": "AGENT_SFTP_PORT", "value": str(a.sftp_port)},
        {"name": "AGENT_HEALTH_PORT", "value": str(a.health_port)},
        {"name": "MANAGER_HOST", "value": f"traffic-manager.{cfg.manager.namespace}"},
        {"name": "MANAGER_PORT", "value": str(cfg.manager.agent_port)},
        {"name": "TPNB_MOUNT_PREFIX", "value": prefix},
        {"name": "TPNB_MOUNTS", "value": json.dumps(paths)},
        {"name": "LOG_LEVEL", "value": cfg.logs.level or "info"},
        {"name": TOKEN_ENV, "value": f"{TOKEN_DIR}/token"},
    ] + env_copies
    c: dict[str, Any] = {
        "name": AGENT_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["agent"],
        # the traffic port only: the agent has no control port (nothing else for other pods to reach)
        "ports": [{"name": port_name, "containerPort": a.port, "protocol": "TCP"}],
        "env": env,
        # Probe the health port (accepts and closes, serves nothing), not the traffic
        # port: a probe of that would be forwarded to the laptop while intercepted.
        "readinessProbe": {"tcpSocket": {"port": a.health_port}, "periodSeconds": 2,
                           "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
    }
    if env_from:
        c["envFrom"] = env_from
    mounts.append({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True})
    c["volumeMounts"] = mounts
    sc = _agent_security_context(app, pod_spec)
    if sc:
        c["securityContext"] = sc
    return c


def _agent_security_context(app: dict[str, Any], pod_spec: dict[str, Any]) -> dict[str, Any]:
    """The agent's securityContext: Pod Security `restricted` whenever the app is non-root.

    Always: no privilege escalation, seccomp RuntimeDefault.  The uid is the
    app's effective one (container runAsUser, else the pod's), because only
    the same uid may read the app's /proc/<pid>/environ; then also non-root
    and every capability dropped.  A pod that demands non-root without naming
    a uid (the image's USER decides) gets NONROOT_UID, and the env comes from
    the injector's copies.  An app that may run as root (no uid, no
    runAsNonRoot: only possible where Pod Security is not `restricted`) keeps
    a root agent with the runtime's default capabilities, as before: a root
    process's environ is readable only by root holding at least its
    capabilities.
    """
    csc = app.get("securityContext") or {}
    psc = pod_spec.get("securityContext") or {}
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    non_root = bool(csc.get("runAsNonRoot", psc.get("runAsNonRoot", False)))
    out: dict[str, Any] = {"allowPrivilegeEscalation": False, "seccompProfile": {"type": "RuntimeDefault"}}
    if uid is None and non_root:
        uid, gid = NONROOT_UID, NONROOT_UID if gid is None else gid
    if uid is not None:
        out["runAsUser"] = int(uid)
    if gid is not None:
        out["runAsGroup"] = int(gid)
    if uid is not None and int(uid) != 0:
        out["runAsNonRoot"] = True
        out["capabilities"] = {"drop": ["ALL"]}
    return out


def agent_volumes() -> list[dict[str, Any]]:
    """The pod volumes the agent needs: its token for the traffic-manager (audience-bound,
    rotated by the kubelet, verified by the manager with a TokenReview), and the
    writable root of the volume tree it serves."""
    return [{"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
        "audience": TOKEN_AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}},
            {"name": ROOT_VOLUME, "emptyDir": {}}]


def _spec_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def inject_workload(obj: dict[str, Any], wl: Workload, target: ServiceTarget, image: str,
                    cfg: config.Config | None = None, redirect: bool = False) -> dict[str, Any]:
    """The workload with the agent added; `obj` must be the un-injected object.

    `redirect` (a headless Service reaches the port, see `needs_redirect`) adds
    the init container that sends the port's traffic from other pods to the agent."""
    cfg = cfg or config.get()
    out = copy.deepcopy(obj)
    spec = _pod_spec(out)
    ref = f"{wl.kind} {wl.name}"
    if spec.get("hostNetwork"):
        raise unsupported_pod_shape(wl, obj) or InterceptError(f"{ref} uses hostNetwork")
    containers = spec.get("containers") or []
    app = next((c for c in containers if c.get("name") == target.container), None)
    if app is None:
        raise InterceptError(f"{ref} has no container {target.container}")
    for c in containers:
        for p in c.get("ports") or []:
            if int(p.get("containerPort", -1)) in (cfg.agent.port, cfg.agent.health_port, cfg.agent.sftp_port):
                raise InterceptError(
                    f"container {c['name']} of {ref} already uses port {p['containerPort']}",
                    "the traffic-agent shares the pod's network and needs that port",
                    "set agent.port / agent.health_port / agent.sftp_port in ~/.config/tpnb/config.yaml "
                    "to free ports")
    renamed: dict[str, str] = {}
    port_name = AGENT_PORT_NAME
    if isinstance(target.target_port, str) and not target.target_port.isdigit():
        new = orig_port_name(target.target_port)
        taken = {p.get("name") for c in containers for p in c.get("ports") or []}
        if new in taken:
            raise InterceptError(f"{ref} already has a port named {new}",
                                 "tpnb renames the intercepted port to it", "rename that port")
        renamed[target.target_port] = new
        _rename_port_refs(app, renamed)
        port_name = target.target_port
    taken_vols = {v.get("name") for v in spec.get("volumes") or []} & set(AGENT_VOLUMES)
    if taken_vols:
        raise InterceptError(f"{ref} already has a volume named {sorted(taken_vols)[0]}",
                             "the traffic-agent adds a volume of that name", "rename that volume")
    agent = agent_container(wl, app, spec, target, image, port_name, cfg)
    spec["containers"] = containers + [agent]
    volumes = agent_volumes()
    spec["volumes"] = list(spec.get("volumes") or []) + volumes
    info = {
        "version": 1,
        "image": image,
        "container": target.container,
        "containerPort": target.container_port,
        "service": target.service,
        "servicePort": target.port_key,
        "agentPort": cfg.agent.port,
        "renamedPorts": renamed,
        "shareProcessNamespace": spec.get("shareProcessNamespace"),
    }
    init = None
    if redirect:
        if any(c.get("name") == INIT_CONTAINER for c in spec.get("initContainers") or []):
            raise InterceptError(f"{ref} already has an init container named {INIT_CONTAINER}",
                                 "the traffic-agent adds one of that name", "rename it")
        init = redirect_init_container(target, image, cfg)
        spec["initContainers"] = list(spec.get("initContainers") or []) + [init]
        info["redirectPort"] = target.container_port
    info["hash"] = _spec_hash({"info": info, "agent": agent, "volumes": volumes, **({"init": init} if init else {})})
    spec["shareProcessNamespace"] = True
    _set_annotation(out, ANN_INJECTED, json.dumps(info, sort_keys=True, separators=(",", ":")))
    return out


def inject_service(svc: dict[str, Any], target: ServiceTarget, cfg: config.Config | None = None) -> dict[str, Any]:
    """The Service pointed at the agent; `svc` must be the un-injected Service.

    Every TCP port of it whose numeric targetPort (or port, when it has no
    targetPort) is the intercepted container port now targets the agent, the
    others stay the app's.  A named targetPort needs no change here: the
    agent's port takes the name.  For the intercepted Service itself a
    numeric port that is not found is an error.
    """
    cfg = cfg or config.get()
    out = copy.deepcopy(svc)
    named = isinstance(target.target_port, str) and not target.target_port.isdigit()
    orig: dict[str, Any] = {}
    for p in out.get("spec", {}).get("ports") or []:
        if (p.get("protocol") or "TCP") != "TCP":
            continue
        tp = p.get("targetPort", p.get("port"))
        if isinstance(tp, str) and not tp.isdigit():
            continue
        if int(tp) == target.container_port:
            orig[_svc_port_key(p)] = p.get("targetPort")
            p["targetPort"] = cfg.agent.port
    if not orig:
        if not named and out.get("metadata", {}).get("name") == target.service:
            raise InterceptError(f"Service {target.service} has no port {target.port_key}")
        return out
    _set_annotation(out, ANN_SVC_ORIG, json.dumps(orig, sort_keys=True, separators=(",", ":")))
    return out


def plan_services(services: list[dict[str, Any]], labels: dict[str, str], target: ServiceTarget,
                  cfg: config.Config | None = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(current, wanted) for every Service that must change (pure).

    Each Service with a cluster IP that selects the pods (`labels`) reaches the
    intercepted container port through the agent; a Service tpnb changed
    before that no longer selects them, or is headless, is restored.
    """
    out: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for svc in services:
        base = restore_service(svc)
        if _selects(base, labels) and not _is_headless(base) and base.get("spec", {}).get("type") != "ExternalName":
            want = inject_service(base, target, cfg)
        elif ANN_SVC_ORIG in _annotations(svc):
            want = base
        else:
            continue
        if json_patch(svc, want):
            out.append((svc, want))
    return out


# ====================================================================== rollout state (pure)

#: waiting reasons that will not fix themselves (CreateContainerError and
#: RunContainerError can be transient on a slow node: left to the timeout)
_FATAL_WAITING = {"ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName", "CreateContainerConfigError"}


def pod_matches_template(pod: dict[str, Any], template_spec: dict[str, Any]) -> bool:
    """Whether `pod` was made from the current template, as far as the agent goes."""
    pcs = {c["name"]: c for c in pod.get("spec", {}).get("containers") or []}
    tcs = template_spec.get("containers") or []
    for c in tcs:
        pc = pcs.get(c["name"])
        if pc is None or pc.get("image") != c.get("image"):
            return False
    def has_init(spec: dict[str, Any]) -> bool:
        return any(c.get("name") == INIT_CONTAINER for c in spec.get("initContainers") or [])

    if has_init(pod.get("spec", {})) != has_init(template_spec):
        return False
    t_agent = next((c for c in tcs if c["name"] == AGENT_CONTAINER), None)
    p_agent = pcs.get(AGENT_CONTAINER)
    if (t_agent is None) != (p_agent is None):
        return False
    if t_agent is not None and p_agent is not None:
        return (t_agent.get("env") or []) == (p_agent.get("env") or [])
    return True


def _ready(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions") or [])


def _live(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")
            and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]


@dataclass
class RolloutState:
    done: bool
    message: str
    failure: str | None = None  # why it cannot succeed
    failed_pod: str | None = None
    failed_container: str | None = None
    crash: bool = False
    stale: list[str] | None = None  # pods to recreate (kinds that do not roll by themselves)


def rollout_state(kind: str, obj: dict[str, Any], pods: list[dict[str, Any]]) -> RolloutState:
    """Where the rollout of `obj` stands, from the object and its pods."""
    spec = obj.get("spec", {})
    status = obj.get("status", {})
    name = obj["metadata"]["name"]
    want = int(spec.get("replicas", 1) if spec.get("replicas") is not None else 1)
    tspec = spec.get("template", {}).get("spec", {})
    if kind == "Deployment" and spec.get("paused"):
        return RolloutState(False, "", failure=f"Deployment {name} is paused (kubectl rollout resume)")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return RolloutState(False, "", failure=f"pods cannot be created: {cond.get('message', '')}")
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return RolloutState(False, "", failure=f"{kind} {name} exceeded its progress deadline: "
                                f"{cond.get('message', '')}")
    live = _live(pods)
    new = [p for p in live if pod_matches_template(p, tspec)]
    old = [p for p in live if not pod_matches_template(p, tspec)]
    ready = [p for p in new if _ready(p)]
    for p in new:
        st = p.get("status", {})
        for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
            w = (cs.get("state") or {}).get("waiting") or {}
            reason = w.get("reason", "")
            if reason in _FATAL_WAITING:
                return RolloutState(False, "", failure=f"container {cs['name']} of pod {p['metadata']['name']}: "
                                    f"{reason}: {w.get('message', '')}".rstrip(": "),
                                    failed_pod=p["metadata"]["name"], failed_container=cs["name"])
            if reason == "CrashLoopBackOff" or (cs.get("restartCount", 0) >= 3 and not cs.get("ready")):
                term = (cs.get("lastState") or {}).get("terminated") or {}
                detail = f" (exit code {term.get('exitCode')}, {term.get('reason', '')})" if term else ""
                return RolloutState(False, "", failure=f"container {cs['name']} of pod {p['metadata']['name']} "
                                    f"keeps crashing{detail}", failed_pod=p["metadata"]["name"],
                                    failed_container=cs["name"], crash=True)
    observed = int(status.get("observedGeneration", 0)) >= int(obj["metadata"].get("generation", 0))
    stale = None
    if kind == "ReplicaSet" or (kind == "StatefulSet"
                               and (spec.get("updateStrategy") or {}).get("type") == "OnDelete"):
        stale = [p["metadata"]["name"] for p in old]
    done = observed and not old and len(ready) >= want
    msg = (f"{kind} {name}: {len(ready)}/{want} updated pod(s) ready"
           + (f", {len(old)} old pod(s) still running" if old else ""))
    return RolloutState(done, msg, stale=stale)


def _pending_reasons(pods: list[dict[str, Any]], tspec: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for p in _live(pods):
        if not pod_matches_template(p, tspec) or _ready(p):
            continue
        pname = p["metadata"]["name"]
        st = p.get("status", {})
        for cond in st.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                out.append(f"pod {pname} cannot be scheduled: {cond.get('message', cond.get('reason', ''))}")
        for cs in st.get("containerStatuses") or []:
            if cs.get("ready"):
                continue
            state = cs.get("state") or {}
            if "running" in state:
                out.append(f"container {cs['name']} of pod {pname} is running but not ready (readiness probe failing)")
            elif "waiting" in state:
                w = state["waiting"]
                out.append(f"container {cs['name']} of pod {pname} is waiting: {w.get('reason', '')} "
                           f"{w.get('message', '')}".strip())
    return out


# ====================================================================== async API

async def _get(api: Any, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    return await _run(_get_sync, api, kind, namespace, name)


async def find_workload(api: Any, namespace: str, name: str) -> Workload:
    """The Deployment, else ReplicaSet, else StatefulSet called `name`."""
    for kind, _ in KINDS:
        obj = await _get(api, kind, namespace, name)
        if obj is None:
            continue
        if kind == "ReplicaSet":
            owner = next((o for o in obj["metadata"].get("ownerReferences") or []
                          if o.get("controller") and o.get("kind") == "Deployment"), None)
            if owner is not None:
                raise InterceptError(f"ReplicaSet {name} is managed by Deployment {owner['name']}",
                                     "changes to it would be undone by the Deployment",
                                     f"intercept {owner['name']} instead")
        return Workload(kind, name, namespace, obj)
    other = await _run(_unsupported_kind_sync, api, namespace, name)
    if other is not None:
        raise other
    known = await _run(_workload_names_sync, api, namespace)
    raise InterceptError(
        f"no workload {name!r} in namespace {namespace}",
        "workloads there: " + (", ".join(known) if known else "none (is the namespace right?)"),
        "tpnb intercepts Deployments, ReplicaSets and StatefulSets; check the name with `tpnb list`",
    )


#: kinds tpnb finds by name but does not intercept: (API path, kind, why, what to do instead)
_UNSUPPORTED_KINDS = (
    ("/apis/apps/v1/namespaces/{ns}/daemonsets/{name}", "DaemonSet",
     "tpnb injects its agent into Deployments, ReplicaSets and StatefulSets only; a DaemonSet's pods are "
     "spread one per node, often on hostNetwork",
     "run the code you want to debug in a Deployment, or intercept a Deployment it talks to"),
    ("/apis/batch/v1/namespaces/{ns}/cronjobs/{name}", "CronJob",
     "its pods run to completion and serve no Service, so there is no traffic to intercept",
     "run the job's code on your machine after `tpnb connect` instead"),
    ("/apis/batch/v1/namespaces/{ns}/jobs/{name}", "Job",
     "its pods run to completion and serve no Service, so there is no traffic to intercept",
     "run the job's code on your machine after `tpnb connect` instead"),
    ("/api/v1/namespaces/{ns}/pods/{name}", "Pod",
     "a bare Pod's containers cannot be changed after creation, so the traffic-agent cannot be added",
     "manage the pod with a Deployment (or a StatefulSet) and intercept that"),
)


def _unsupported_kind_sync(api: Any, namespace: str, name: str) -> InterceptError | None:
    """A refusal naming why, when `name` is a workload of a kind tpnb does not intercept."""
    for path, kind, why, hint in _UNSUPPORTED_KINDS:
        try:
            obj = _request_sync(api, "GET", path.format(ns=namespace, name=name))
        except (_ApiError, ClusterError):
            continue
        owners = [o.get("kind") for o in obj.get("metadata", {}).get("ownerReferences") or [] if o.get("controller")]
        if kind == "Pod" and owners:
            continue  # a pod of some workload: the "no workload" answer lists the workloads
        return InterceptError(f"cannot intercept {kind} {name}", why, hint)
    return None


def _workload_names_sync(api: Any, namespace: str) -> list[str]:
    out = []
    for kind, _ in KINDS:
        for o in _list_sync(api, kind, namespace):
            if kind == "ReplicaSet" and o["metadata"].get("ownerReferences"):
                continue
            out.append(f"{kind}/{o['metadata']['name']}")
    return out


async def resolve_service(api: Any, wl: Workload, service: str | None, port: str | None,
                          container: str | None = None) -> ServiceTarget:
    """The Service port to intercept: by --service and --port (name or number), and --container."""
    services = await _run(_list_sync, api, "Service", wl.namespace)
    return resolve_target(wl, services, service, port, container)


async def _patch(api: Any, kind: str, obj: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    return await _run(_patch_sync, api, kind, obj, new)


async def _restore_services(api: Any, namespace: str, names: set[str], labels: dict[str, str] | None,
                            progress: Progress) -> None:
    """Undo our changes to the named Services (and any annotated one selecting `labels`)."""
    for _ in range(5):
        try:
            for svc in await _run(_list_sync, api, "Service", namespace):
                sname = svc["metadata"]["name"]
                if ANN_SVC_ORIG not in _annotations(svc):
                    continue
                if sname not in names and not (labels is not None and _selects(svc, labels)):
                    continue
                await _patch(api, "Service", svc, restore_service(svc))
                await _say(progress, f"Service {sname}: target port restored")
            return
        except _Conflict:
            continue
    raise ClusterError(f"Services in {namespace} keep changing under tpnb", hint="try again")


async def inject_agent(api: Any, wl: Workload, target: ServiceTarget, image: str, progress: Progress) -> bool:
    """Add the traffic-agent to `wl` and route `target` through it; True when anything was changed.

    Idempotent: an agent with the same image and port is left alone (no
    rollout).  The Service is switched to the agent only after the new pods
    are ready, so no request meets a pod without an agent; a failed rollout
    restores the workload and raises InterceptError naming the cause.
    """
    changed = False
    cfg = config.get()
    for attempt in range(6):
        obj = await _get(api, wl.kind, wl.namespace, wl.name)
        if obj is None:
            raise InterceptError(f"{wl.kind} {wl.name} disappeared from namespace {wl.namespace}")
        # read again on every attempt: a re-plan after a conflict must see the Services as they are now
        redirect = needs_redirect(Workload(wl.kind, wl.name, wl.namespace, obj),
                                  await _run(_list_sync, api, "Service", wl.namespace), target)
        base = restore_workload(obj)
        planned = inject_workload(base, wl, target, image, cfg, redirect)
        cur_info, new_info = injected_info(obj), injected_info(planned)
        if has_agent(obj) and cur_info and cur_info.get("hash") == (new_info or {}).get("hash"):
            wl.obj = obj
            await _say(progress, f"traffic-agent already installed in {wl.kind} {wl.name}")
            break
        old_service = (cur_info or {}).get("service")
        if old_service and old_service != target.service:
            await _restore_services(api, wl.namespace, {old_service}, None, progress)
        await _say(progress, f"Installing traffic-agent in {wl.kind} {wl.name}"
                   if not has_agent(obj) else f"Updating traffic-agent in {wl.kind} {wl.name}")
        try:
            wl.obj = await _patch(api, wl.kind, obj, planned)
        except _Conflict:
            log.debug("conflict patching %s/%s (attempt %d)", wl.kind, wl.name, attempt)
            continue
        changed = True
        break
    else:
        raise ClusterError(f"{wl.kind} {wl.name} keeps changing under tpnb", hint="try again")

    # Even when nothing changed, a rollout may still be under way (a second
    # intercept right after the first): never point the Service at pods
    # without an agent.
    try:
        await wait_rollout(api, wl, cfg.timeouts.rollout, progress)
    except InterceptError as exc:
        await _say(progress, f"Rollout failed; removing the traffic-agent from {wl.kind} {wl.name} again")
        try:
            await _revert_workload(api, wl)
        except Exception as rexc:  # report the original failure either way
            log.warning("reverting %s/%s failed: %s", wl.kind, wl.name, rexc)
            exc.hint = (exc.hint + "; " if exc.hint else "") + \
                f"tpnb could not undo the change, run `tpnb uninstall --agent {wl.name}`"
        else:
            exc.hint = (exc.hint + "; " if exc.hint else "") + "the workload was restored"
        raise

    labels = _template_labels(restore_workload(wl.obj))
    for _ in range(6):
        services = await _run(_list_sync, api, "Service", wl.namespace)
        if not any(x["metadata"]["name"] == target.service for x in services):
            raise InterceptError(f"Service {target.service} disappeared from namespace {wl.namespace}")
        try:
            for svc, want in plan_services(services, labels, target, cfg):
                await _patch(api, "Service", svc, want)
                changed = True
                name = svc["metadata"]["name"]
                routed = ANN_SVC_ORIG in _annotations(want)
                await _say(progress, f"Service {name}: port(s) "
                           + ", ".join(sorted(json.loads(_annotations(want)[ANN_SVC_ORIG]))) + " now target the traffic-agent"
                           if routed else f"Service {name}: target port restored")
        except _Conflict:
            continue
        return changed
    raise ClusterError(f"Services in namespace {wl.namespace} keep changing under tpnb", hint="try again")


async def _revert_workload(api: Any, wl: Workload) -> bool:
    for _ in range(6):
        obj = await _get(api, wl.kind, wl.namespace, wl.name)
        if obj is None:
            return False
        new = restore_workload(obj)
        if not json_patch(obj, new):
            wl.obj = obj
            return False
        try:
            wl.obj = await _patch(api, wl.kind, obj, new)
            return True
        except _Conflict:
            continue
    raise ClusterError(f"{wl.kind} {wl.name} keeps changing under tpnb", hint="try again")


def _owned_replicaset(kind: str, obj: dict[str, Any]) -> bool:
    """A ReplicaSet a Deployment controls: it carries the Deployment's template (agent included) as revision
    history, and only the Deployment is ever changed; patching it would rewrite that history."""
    return kind == "ReplicaSet" and any(o.get("controller") for o in obj["metadata"].get("ownerReferences") or [])


async def _find_any(api: Any, namespace: str, name: str) -> Workload | None:
    for kind, _ in KINDS:
        obj = await _get(api, kind, namespace, name)
        if obj is not None and not _owned_replicaset(kind, obj) and (injected_info(obj) is not None or has_agent(obj)):
            return Workload(kind, name, namespace, obj)
    return None


async def remove_agent(api: Any, namespace: str, name: str, progress: Progress) -> None:
    """Restore the workload and its Service exactly; wait for the rollout."""
    wl = await _find_any(api, namespace, name)
    if wl is None:
        await _say(progress, f"No traffic-agent in {name} (namespace {namespace})")
        # a Service may still point at an agent port if the workload was recreated
        for kind, _ in KINDS:
            obj = await _get(api, kind, namespace, name)
            if obj is not None:
                await _restore_services(api, namespace, set(), _template_labels(obj), progress)
                break
        return
    info = injected_info(wl.obj) or {}
    services = {info["service"]} if info.get("service") else set()
    await _restore_services(api, namespace, services, _template_labels(restore_workload(wl.obj)), progress)
    await _say(progress, f"Removing traffic-agent from {wl.kind} {wl.name}")
    if await _revert_workload(api, wl):
        await wait_rollout(api, wl, config.get().timeouts.rollout, progress)


async def _exists(api: Any, namespace: str, name: str) -> bool:
    for kind, _ in KINDS:
        if await _get(api, kind, namespace, name) is not None:
            return True
    return False


async def remove_all_agents(api: Any, progress: Progress) -> list[str]:
    """Remove every traffic-agent this cluster has; returns "namespace/name" of each."""
    found: list[Workload] = []
    for kind, _ in KINDS:
        for obj in await _run(_list_sync, api, kind, None):
            if not _owned_replicaset(kind, obj) and (injected_info(obj) is not None or has_agent(obj)):
                md = obj["metadata"]
                found.append(Workload(kind, md["name"], md["namespace"], obj))
    removed: list[str] = []
    for wl in found:
        await remove_agent(api, wl.namespace, wl.name, progress)
        removed.append(f"{wl.namespace}/{wl.name}")
    # Services whose workload is gone but which still point at an agent port
    for svc in await _run(_list_sync, api, "Service", None):
        if ANN_SVC_ORIG in _annotations(svc):
            md = svc["metadata"]
            await _restore_services(api, md["namespace"], {md["name"]}, None, progress)
    return removed


def _selector_string(obj: dict[str, Any]) -> str:
    sel = obj.get("spec", {}).get("selector") or {}
    parts = [f"{k}={v}" for k, v in (sel.get("matchLabels") or {}).items()]
    for e in sel.get("matchExpressions") or []:
        op, key, vals = e.get("operator"), e.get("key"), e.get("values") or []
        if op == "In":
            parts.append(f"{key} in ({','.join(vals)})")
        elif op == "NotIn":
            parts.append(f"{key} notin ({','.join(vals)})")
        elif op == "Exists":
            parts.append(key)
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
    return ",".join(parts)


def _pods_sync(api: Any, namespace: str, selector: str) -> list[dict[str, Any]]:
    try:
        doc = _request_sync(api, "GET", _core_path(namespace, "pods"), query={"labelSelector": selector})
    except _ApiError as exc:
        raise _fail(exc, "list", "pods", namespace) from None
    return list(doc.get("items") or [])


def endpoint_slices_sync(api: Any, namespace: str, service: str) -> list[dict[str, Any]]:
    """The Service's EndpointSlices as JSON dicts (blocking: run it in a thread)."""
    try:
        doc = _request_sync(api, "GET", f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
                            query={"labelSelector": f"kubernetes.io/service-name={service}"})
    except _ApiError as exc:
        raise _fail(exc, "list", "endpointslices.discovery.k8s.io", namespace) from None
    return list(doc.get("items") or [])


def _delete_pod_sync(api: Any, namespace: str, name: str) -> None:
    try:
        _request_sync(api, "DELETE", _core_path(namespace, "pods", name))
    except _ApiError as exc:
        if exc.status != 404:
            raise _fail(exc, "delete", "pods", namespace) from None


def _logs_sync(api: Any, namespace: str, pod: str, container: str, lines: int = 15) -> str:
    for previous in (True, False):
        try:
            text = _request_sync(api, "GET", _core_path(namespace, "pods", pod) + "/log",
                                 query={"container": container, "previous": "true" if previous else None,
                                        "tailLines": lines}, raw=True)
        except (_ApiError, ClusterError):
            continue
        if text.strip():
            return text.rstrip()
    return ""


def _events_sync(api: Any, namespace: str, pod: str) -> list[str]:
    try:
        doc = _request_sync(api, "GET", _core_path(namespace, "events"),
                            query={"fieldSelector": f"involvedObject.name={pod}"})
    except (_ApiError, ClusterError):
        return []
    evs = [e for e in doc.get("items") or [] if e.get("type") == "Warning"]
    evs.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    return [f"{e.get('reason')}: {e.get('message', '').strip()}" for e in evs[-3:]]


#: words of an API server refusal (admission plugins, webhooks, validation) in a
#: FailedCreate message; other create failures (timeouts, conflicts) may pass
_REFUSED = re.compile(r"forbidden|denied|is invalid|violates|exceeded quota|must specify", re.I)


def _ts(value: Any) -> str:
    """A Kubernetes timestamp cut to seconds ("2025-01-02T03:04:05"): comparable as text."""
    return str(value or "")[:19]


def changed_at(obj: dict[str, Any]) -> str:
    """When the object's spec was last written, by the API server's clock (managedFields)."""
    times = [_ts(f.get("time")) for f in obj.get("metadata", {}).get("managedFields") or []
             if f.get("operation") in ("Update", "Apply")]
    return max(times, default="")


def _event_time(e: dict[str, Any]) -> str:
    return _ts((e.get("series") or {}).get("lastObservedTime") or e.get("lastTimestamp")
               or e.get("eventTime") or e.get("metadata", {}).get("creationTimestamp"))


def _failed_create_events_sync(api: Any, namespace: str, kind: str, name: str, since: str) -> list[str]:
    try:
        doc = _request_sync(api, "GET", _core_path(namespace, "events"), query={
            "fieldSelector": f"involvedObject.kind={kind},involvedObject.name={name},reason=FailedCreate"})
    except (_ApiError, ClusterError):
        return []
    evs = [e for e in doc.get("items") or [] if e.get("type") == "Warning" and _event_time(e) >= since]
    evs.sort(key=_event_time)
    return [str(e.get("message", "")).strip() for e in evs]


def _current_replicasets_sync(api: Any, dep: dict[str, Any], selector: str) -> list[dict[str, Any]]:
    """The Deployment's ReplicaSet(s) of its current revision."""
    md = dep["metadata"]
    rev = _annotations(dep).get("deployment.kubernetes.io/revision")
    try:
        doc = _request_sync(api, "GET", _apps_path(md["namespace"], "replicasets"),
                            query={"labelSelector": selector or None})
    except (_ApiError, ClusterError):
        return []
    out = []
    for rs in doc.get("items") or []:
        if not any(o.get("uid") == md.get("uid") for o in rs["metadata"].get("ownerReferences") or []):
            continue
        if rev is not None and _annotations(rs).get("deployment.kubernetes.io/revision") != rev:
            continue
        out.append(rs)
    return out


def admission_refusal_sync(api: Any, wl: Workload, obj: dict[str, Any], selector: str, since: str) -> str | None:
    """Why the API server refuses to create the workload's current pods, if it does.

    Admission (Pod Security, a ResourceQuota, a webhook) refuses pods, not
    the template, so the patch succeeds and the controller fails to create
    them: a ReplicaSet says so in its ReplicaFailure condition, a StatefulSet
    only in FailedCreate events (those since `since`, the patch's time).
    """
    owners: list[dict[str, Any]] = []
    if wl.kind == "Deployment":
        owners = _current_replicasets_sync(api, obj, selector)
    elif wl.kind == "ReplicaSet":
        owners = [obj]
    for rs in owners:
        for cond in rs.get("status", {}).get("conditions") or []:
            if (cond.get("type") == "ReplicaFailure" and cond.get("status") == "True"
                    and _REFUSED.search(cond.get("message") or "")):
                return str(cond["message"]).strip()
    names = [(o["metadata"]["name"], "ReplicaSet") for o in owners]
    if wl.kind == "StatefulSet":
        names = [(wl.name, "StatefulSet")]
    for name, kind in names:
        msgs = [m for m in _failed_create_events_sync(api, wl.namespace, kind, name, since) if _REFUSED.search(m)]
        if msgs:
            return msgs[-1]
    return None


def _refusal_hint(why: str, namespace: str) -> str:
    if "PodSecurity" in why and "NET_ADMIN" in why:
        return (f"a headless Service reaches the intercepted port, so tpnb adds an init container with NET_ADMIN "
                f"(it redirects the port to the agent inside the pod), which namespace {namespace}'s Pod Security "
                "level forbids; intercept a workload that headless Services do not expose on that port")
    if "PodSecurity" in why:
        return (f"namespace {namespace} enforces a Pod Security level the pods do not meet; the traffic-agent "
                "meets `restricted` beside an app that runs as non-root (runAsNonRoot / runAsUser), so check "
                f"the app's own securityContext (kubectl get ns {namespace} --show-labels)")
    if "quota" in why:
        return (f"a ResourceQuota of namespace {namespace} refuses the pods (kubectl -n {namespace} describe "
                "resourcequota); the traffic-agent sets no resources, so a quota that demands requests/limits "
                "needs a LimitRange with defaults")
    return f"kubectl -n {namespace} get events --field-selector reason=FailedCreate"


async def wait_rollout(api: Any, wl: Workload, timeout: float, progress: Progress) -> None:
    """Wait until every pod of `wl` runs the current template and is ready.

    ReplicaSets (and OnDelete StatefulSets) do not replace pods on a template
    change, so their outdated pods are deleted here.  Hopeless states fail at
    once with the cause: image pull errors, crash loops (with the last log
    lines), pods that cannot be created; on timeout the error says what was
    still pending (unschedulable, readiness failing, ...).
    """
    deadline = time.monotonic() + timeout
    last = ""
    deleted: set[str] = set()
    selector = _selector_string(wl.obj)
    since = changed_at(wl.obj)
    while True:
        obj = await _get(api, wl.kind, wl.namespace, wl.name)
        if obj is None:
            raise InterceptError(f"{wl.kind} {wl.name} was deleted during the rollout")
        wl.obj = obj
        selector = _selector_string(obj) or selector
        pods = await _run(_pods_sync, api, wl.namespace, selector)
        st = rollout_state(wl.kind, obj, pods)
        if not st.done:
            refused = await _run(admission_refusal_sync, api, wl, obj, selector, since)
            if refused:
                raise InterceptError(f"the cluster refuses to create the pods of {wl.kind} {wl.name}",
                                     refused, _refusal_hint(refused, wl.namespace))
        if st.failure:
            why = st.failure
            if st.failed_pod and st.failed_container:
                if st.crash:
                    logs = await _run(_logs_sync, api, wl.namespace, st.failed_pod, st.failed_container)
                    if logs:
                        why += "\n  last log lines:\n    " + "\n    ".join(logs.splitlines()[-15:])
                else:
                    evs = await _run(_events_sync, api, wl.namespace, st.failed_pod)
                    if evs:
                        why += "\n  events: " + "; ".join(evs)
            hint = "kubectl -n {ns} describe pod {pod}".format(ns=wl.namespace, pod=st.failed_pod or "...")
            if "Image" in why or "image" in why:
                hint = ("make the image available to the cluster's nodes "
                        "(for the dev cluster: build and import it, see `tpnb devcluster --help`)")
            raise InterceptError(f"rollout of {wl.kind} {wl.name} failed", why, hint)
        if st.done:
            await _say(progress, f"{wl.kind} {wl.name} rolled out", "rollout")
            return
        for pname in st.stale or []:
            if pname not in deleted:
                deleted.add(pname)
                await _say(progress, f"Recreating pod {pname} with the new template")
                await _run(_delete_pod_sync, api, wl.namespace, pname)
        if st.message != last:
            last = st.message
            await _say(progress, f"Waiting for {st.message}", "rollout")
        if time.monotonic() > deadline:
            reasons = _pending_reasons(pods, obj.get("spec", {}).get("template", {}).get("spec", {}))
            extra: list[str] = []
            for p in _live(pods):
                if pod_matches_template(p, obj.get("spec", {}).get("template", {}).get("spec", {})) and not _ready(p):
                    extra += await _run(_events_sync, api, wl.namespace, p["metadata"]["name"])
                    break
            why = "; ".join(reasons + extra) or st.message
            raise InterceptError(f"rollout of {wl.kind} {wl.name} did not finish within {timeout:.0f}s", why,
                                 f"kubectl -n {wl.namespace} get pods -l '{selector}' and describe the pending pods")
        await anyio.sleep(1.0)


def list_workloads(api: Any, namespace: str) -> list[dict[str, Any]]:
    """Workloads of `namespace` for `tpnb list` (blocking: run it in a thread).

    Each: name, namespace, kind, services ("svc:port->targetPort", as before
    injection), agent_installed, agent_image.
    """
    services = [restore_service(s) for s in _list_sync(api, "Service", namespace)]
    out: list[dict[str, Any]] = []
    for kind, _ in KINDS:
        for obj in _list_sync(api, kind, namespace):
            md = obj["metadata"]
            if _owned_replicaset(kind, obj):
                continue
            labels = _template_labels(restore_workload(obj))
            ports = [_describe_port(s["metadata"]["name"], p) for s in services if _selects(s, labels)
                     for p in s.get("spec", {}).get("ports") or []]
            info = injected_info(obj)
            out.append({
                "name": md["name"],
                "namespace": md["namespace"],
                "kind": kind,
                "services": ports,
                "agent_installed": has_agent(obj),
                "agent_image": (info or {}).get("image"),
            })
    out.sort(key=lambda d: (d["name"], d["kind"]))
    return out


__all__ = [
    "Workload", "ServiceTarget", "find_workload", "resolve_service", "inject_agent", "remove_agent",
    "remove_all_agents", "wait_rollout", "list_workloads", "resolve_target", "inject_workload",
    "inject_service", "restore_workload", "restore_service", "json_patch", "rollout_state",
]
