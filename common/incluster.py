"""Is this process in a pod of the cluster?  (In-cluster mode, issue 14.)

Shared by the faces (which then start no root daemon and patch no sockets:
the pod's own network and cluster DNS already reach every Service) and the
connector (which then takes its credentials from the pod's ServiceAccount
when no kubeconfig is mounted).  The test is the one client-go and the
Python kubernetes client use for in-cluster config: the API server's
address in ``KUBERNETES_SERVICE_HOST`` and a token mounted at the
ServiceAccount path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: where the kubelet mounts the pod's ServiceAccount token, CA and namespace
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class Detection:
    in_cluster: bool
    #: why (shown by `tpnb status`): what was found, or what is missing
    why: str


def sa_dir() -> Path:
    """The ServiceAccount directory (TPNB_SERVICEACCOUNT_DIR overrides it, for tests of the logic)."""
    return Path(os.environ.get("TPNB_SERVICEACCOUNT_DIR") or SA_DIR)


def pod_environment() -> Detection:
    """What the process environment says, whatever the configuration."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    token = sa_dir() / "token"
    if not host:
        return Detection(False, "KUBERNETES_SERVICE_HOST is not set (not in a pod)")
    if not token.is_file():
        return Detection(False, f"KUBERNETES_SERVICE_HOST is set but there is no ServiceAccount token at {token}")
    return Detection(True, f"in a pod (KUBERNETES_SERVICE_HOST={host}, ServiceAccount token at {token})")


def decide(setting: str, forced: bool | None = None) -> Detection:
    """In-cluster or not: `forced` (--in-cluster) wins, then connector.in_cluster, then the environment."""
    if forced:
        return Detection(True, "asked for (--in-cluster)")
    if setting == "never":
        return Detection(False, "connector.in_cluster is never")
    if setting == "always":
        return Detection(True, "connector.in_cluster is always")
    return pod_environment()


def pod_namespace() -> str:
    """The pod's own namespace, from the ServiceAccount mount ("" when unknown)."""
    try:
        return (sa_dir() / "namespace").read_text().strip()
    except OSError:
        return ""
