"""Scaffolding of the gRPC end-to-end tests (test_h2_intercepts, test_wiretap_h2): the Greeter app
(tests/greeter_app.py) deployed in the dev cluster with a caller pod beside it -- one copy, so both
files intercept and wiretap the same workload.
"""
from __future__ import annotations

import json
from pathlib import Path

from conftest import LaptopRunner

#: the app, run by the tpnb image's python3 in the cluster and by the laptops' python, and its client
APP = Path(__file__).resolve().parent / "greeter_app.py"
PORT = 50051


def deploy_greeter(lap: LaptopRunner, ns: str) -> None:
    """In namespace `ns` (already there): Deployment + Service `greeter` serving gRPC on PORT as
    "app", and Deployment `caller`, a pod with grpcio (the tpnb image) outside the intercepted
    workload to call it from; returns once both have rolled out."""
    from tpnb.imageref import default_image

    labels = {"app": "greeter"}
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "greeter", "namespace": ns},
              "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
                  "metadata": {"labels": labels}, "spec": {"containers": [{
                      "name": "greeter", "image": default_image(), "imagePullPolicy": "IfNotPresent",
                      "command": ["python3", "-u", "-c", APP.read_text(), "--serve", str(PORT), "app"],
                      "ports": [{"name": "grpc", "containerPort": PORT}]}]}}}}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "greeter", "namespace": ns},
           "spec": {"selector": labels, "ports": [{"name": "grpc", "port": PORT, "targetPort": "grpc"}]}}
    lap.kubectl("apply", "-f", "-", input=json.dumps(deploy))
    lap.kubectl("apply", "-f", "-", input=json.dumps(svc))
    lap.kubectl("-n", ns, "create", "deploy", "caller", f"--image={default_image()}", "--",
                "python3", "-c", "import time; time.sleep(10**8)")
    for d in ("greeter", "caller"):
        lap.kubectl("-n", ns, "rollout", "status", f"deploy/{d}", "--timeout=120s", timeout=150)
