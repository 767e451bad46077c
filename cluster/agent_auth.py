"""Who may arrive at the traffic-manager as a traffic-agent, and for which workload.

The agent API listens on the pod network, where any pod of a shared cluster
can reach it, so an agent's word is not enough.  Each injected agent mounts a
projected ServiceAccount token with audience `AUDIENCE` (connector/
agent_injector.py) and sends it on arrival.  The manager then:

  1. asks the API server (TokenReview) whether the token is valid for that
     audience, and which pod it is bound to (the pod name and uid the kubelet
     put into it; a token copied out of a pod dies with the pod);
  2. reads that pod (the manager's own ServiceAccount) and requires that it
     really is an agent: a `traffic-agent` container whose AGENT_NAME is the
     workload the agent claims, and a controller chain (ReplicaSet ->
     Deployment, or StatefulSet) that ends at that workload;
  3. takes namespace, pod name and pod IP from the API server, not from the
     agent.

So a pod can only ever speak for the workload that owns it, in its own
namespace: someone who can create such pods could change the workload anyway.
A manager that serves a list of namespaces (Helm's namespace-scoped mode,
TPNB_MANAGER_NAMESPACES) refuses agents from any other.

The Kubernetes calls are blocking (the `kubernetes` client) and run in a
worker thread.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any, Protocol

from tpnb.proto import pb

log = logging.getLogger("tpnb.manager.auth")

#: the audience of the agents' projected ServiceAccount tokens
AUDIENCE = "tpnb-traffic-manager"
AGENT_CONTAINER = "traffic-agent"
POD_NAME_KEY = "authentication.kubernetes.io/pod-name"
POD_UID_KEY = "authentication.kubernetes.io/pod-uid"


class AgentRefused(Exception):
    """The arriving agent is not who it says it is; the text says why (logged, and sent to it)."""


class AgentVerifier(Protocol):
    async def verify(self, token: str, claimed: pb.AgentInfo) -> pb.AgentInfo:
        """The agent's info with namespace, pod and pod IP as the API server knows them."""
        ...


def managed_namespaces() -> frozenset[str]:
    """TPNB_MANAGER_NAMESPACES (comma list); empty: the whole cluster."""
    raw = os.environ.get("TPNB_MANAGER_NAMESPACES", "")
    return frozenset(n.strip() for n in raw.split(",") if n.strip())


@dataclass
class Review:
    """What a TokenReview said about a token (the parts we use)."""

    authenticated: bool
    username: str
    audiences: list[str]
    extra: dict[str, list[str]]
    error: str = ""


def check_review(review: Review, claimed: pb.AgentInfo) -> tuple[str, str]:
    """(namespace, pod name) the token is bound to; raises AgentRefused otherwise."""
    if not review.authenticated:
        raise AgentRefused(f"the API server rejected the token ({review.error or 'not authenticated'})")
    if AUDIENCE not in review.audiences:
        raise AgentRefused(f"the token is not for audience {AUDIENCE!r}")
    parts = review.username.split(":")
    if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
        raise AgentRefused(f"{review.username!r} is not a ServiceAccount")
    pods = review.extra.get(POD_NAME_KEY) or []
    if len(pods) != 1:
        raise AgentRefused("the token is not bound to a pod (use the injected projected token)")
    namespace, pod = parts[2], pods[0]
    if claimed.namespace and claimed.namespace != namespace:
        raise AgentRefused(f"the token belongs to namespace {namespace}, not {claimed.namespace}")
    if claimed.pod_name and claimed.pod_name != pod:
        raise AgentRefused(f"the token belongs to pod {pod}, not {claimed.pod_name}")
    return namespace, pod


def _env_value(container: dict[str, Any], name: str) -> str | None:
    for e in container.get("env") or []:
        if e.get("name") == name:
            return e.get("value")
    return None


def _controller(meta: dict[str, Any]) -> tuple[str, str] | None:
    for ref in meta.get("ownerReferences") or meta.get("owner_references") or []:
        if ref.get("controller"):
            return ref.get("kind", ""), ref.get("name", "")
    return None


def check_pod(pod: dict[str, Any], claimed: pb.AgentInfo, owner_of: Any, uid: str | None) -> None:
    """The pod is an injected agent of workload `claimed.name`; raises AgentRefused otherwise.

    `owner_of(kind, name)` returns the controller (kind, name) of that object
    (a ReplicaSet's Deployment) or None.
    """
    meta = pod.get("metadata") or {}
    if uid and meta.get("uid") != uid:
        raise AgentRefused("the token's pod was replaced (uid differs)")
    containers = (pod.get("spec") or {}).get("containers") or []
    agent = next((c for c in containers if c.get("name") == AGENT_CONTAINER), None)
    if agent is None:
        raise AgentRefused(f"pod {meta.get('name')} has no {AGENT_CONTAINER} container")
    if _env_value(agent, "AGENT_NAME") != claimed.name:
        raise AgentRefused(f"pod {meta.get('name')} is not an agent of {claimed.name!r}")
    chain = _controller(meta)
    names = []
    while chain is not None and len(names) < 3:
        names.append(chain)
        if chain[1] == claimed.name and chain[0] in ("Deployment", "StatefulSet", "ReplicaSet"):
            return
        chain = owner_of(*chain) if chain[0] == "ReplicaSet" else None
    raise AgentRefused(f"pod {meta.get('name')} does not belong to workload {claimed.name!r}"
                       f" (controllers: {', '.join(f'{k}/{n}' for k, n in names) or 'none'})")


class KubeAgentVerifier:
    """TokenReview + pod checks with the manager's in-cluster ServiceAccount."""

    def __init__(self) -> None:
        self._api: Any = None

    def _clients(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            config.load_incluster_config()
            self._api = client.ApiClient()
        return self._api

    def _review(self, token: str) -> Review:
        from kubernetes import client

        api = client.AuthenticationV1Api(self._clients())
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=[AUDIENCE]))
        st = api.create_token_review(body, _request_timeout=10).status
        user = st.user
        return Review(authenticated=bool(st.authenticated), username=(user.username if user else "") or "",
                      audiences=list(st.audiences or []), extra=dict((user.extra if user else None) or {}),
                      error=st.error or "")

    def _verify(self, token: str, claimed: pb.AgentInfo) -> pb.AgentInfo:
        from kubernetes import client

        review = self._review(token)
        namespace, pod_name = check_review(review, claimed)
        allowed = managed_namespaces()
        if allowed and namespace not in allowed:
            raise AgentRefused(f"this traffic-manager serves namespaces {', '.join(sorted(allowed))} only")
        api = self._clients()
        core = client.CoreV1Api(api)
        apps = client.AppsV1Api(api)
        pod = api.sanitize_for_serialization(core.read_namespaced_pod(pod_name, namespace, _request_timeout=10))

        def owner_of(kind: str, name: str) -> tuple[str, str] | None:
            if kind != "ReplicaSet":
                return None
            rs = api.sanitize_for_serialization(
                apps.read_namespaced_replica_set(name, namespace, _request_timeout=10))
            return _controller(rs.get("metadata") or {})

        uids = review.extra.get(POD_UID_KEY) or []
        check_pod(pod, claimed, owner_of, uids[0] if uids else None)
        out = pb.AgentInfo()
        out.CopyFrom(claimed)
        out.namespace, out.pod_name = namespace, pod_name
        out.pod_ip = ((pod.get("status") or {}).get("podIP")) or claimed.pod_ip
        return out

    async def verify(self, token: str, claimed: pb.AgentInfo) -> pb.AgentInfo:
        if not token:
            raise AgentRefused("no token (an agent injected by an older tpnb: run `tpnb intercept` again "
                               "to update it)")
        try:
            return await asyncio.to_thread(self._verify, token, claimed)
        except AgentRefused:
            raise
        except Exception as exc:  # noqa: BLE001 - API errors become a refusal with their reason
            status = getattr(exc, "status", None)
            reason = getattr(exc, "reason", None) or str(exc)
            raise AgentRefused(f"cannot verify the agent: {status or ''} {reason}".strip()) from None
