"""The connector's side of in-cluster mode: what it tells `tpnb status` about the pod it runs in.

In a pod the connector needs no tunnel for outbound (the pod's own network
and cluster DNS reach every Service and pod) and no root daemon; its
credentials are the pod's ServiceAccount (`kube.load_in_cluster_target`)
unless a kubeconfig is mounted.  Intercepted connections still arrive
through the session's tunnel from the traffic-manager and are dialled to
this pod's loopback (see README, "In the cluster"): the agent does not dial
the pod's IP, so the kernel's server listens on 127.0.0.1 only and no other
pod can reach it.
"""
from __future__ import annotations

import os
import socket

from . import kube


def pod_ip() -> str:
    """This pod's IP: POD_IP (downward API) when set, else what the pod's hostname resolves to."""
    if os.environ.get("POD_IP"):
        return os.environ["POD_IP"]
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return ""


def credentials_text(target: kube.KubeTarget | None, user: str) -> str:
    """Whose rights the session uses: the ServiceAccount (by its Kubernetes user name) or a kubeconfig."""
    if target is None:
        return ""
    if target.context == kube.IN_CLUSTER_CONTEXT:
        prefix = "system:serviceaccount:"
        if user.startswith(prefix):
            return "ServiceAccount " + user[len(prefix):].replace(":", "/", 1)
        return f"this pod's ServiceAccount ({user or 'user unknown'})"
    return f"kubeconfig {target.kubeconfig} (context {target.context})"
