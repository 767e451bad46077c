"""`tpnb devcluster user NAME [--group G]`: kubeconfigs of other Kubernetes users.

The API server must see exactly that user and those groups, RBAC must start
from nothing, and a RoleBinding must grant what it says.
"""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from conftest import LaptopRunner

NS = "tpusers"


def _whoami(lap: LaptopRunner, kubeconfig: str) -> dict[str, Any]:
    r = lap.kubectl("--kubeconfig", kubeconfig, "auth", "whoami", "-o", "json")
    return json.loads(r.stdout)["status"]["userInfo"]


@pytest.mark.cluster
def test_user_kubeconfig_authenticates_as_that_user_with_no_rights(laptop: LaptopRunner) -> None:
    from tpnb_devcluster.users import user_kubeconfig

    cli = subprocess.run([sys.executable, "-m", "tpnb_devcluster.cli", "user", "dev-alice",
                          "--group", "team-a", "--group", "devs"], capture_output=True, text=True, check=True)
    path = cli.stdout.strip()
    assert path == str(user_kubeconfig("dev-alice", ["team-a", "devs"]))  # same file, reused
    info = _whoami(laptop, path)
    assert info["username"] == "dev-alice"
    assert {"team-a", "devs", "system:authenticated"} <= set(info["groups"])
    other = str(user_kubeconfig("dev-bob"))
    assert other != path and _whoami(laptop, other)["username"] == "dev-bob"

    laptop.kubectl("delete", "ns", NS, "--ignore-not-found", "--wait=true", timeout=180)
    laptop.kubectl("create", "ns", NS)
    try:
        denied = laptop.kubectl("--kubeconfig", path, "-n", NS, "get", "pods", check=False)
        assert denied.returncode != 0 and "forbidden" in denied.stderr.lower(), denied.stderr
        laptop.kubectl("-n", NS, "create", "rolebinding", "alice-view", "--clusterrole=view", "--user=dev-alice")
        allowed = laptop.kubectl("--kubeconfig", path, "-n", NS, "get", "pods", check=False)
        assert allowed.returncode == 0, allowed.stderr
        # bob got nothing
        denied = laptop.kubectl("--kubeconfig", other, "-n", NS, "get", "pods", check=False)
        assert denied.returncode != 0 and "forbidden" in denied.stderr.lower(), denied.stderr
    finally:
        laptop.kubectl("delete", "ns", NS, "--ignore-not-found", "--wait=false", check=False)


@pytest.mark.unit
def test_user_rejects_reserved_names() -> None:
    r = subprocess.run([sys.executable, "-m", "tpnb_devcluster.cli", "user", "system:admin"],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "system:" in r.stderr and "Traceback" not in r.stderr
