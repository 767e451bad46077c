"""In-cluster mode's pure logic: when it is chosen, the ServiceAccount as credentials, what status says.

No cluster here: the ServiceAccount directory is a temporary one with the
files the kubelet mounts (token, ca.crt, namespace), read by the real
kubernetes client loader.  The cluster test is tests/test_incluster.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from tpnb import render
from tpnb.api import Status
from tpnb.common import incluster
from tpnb.connector import kube
from tpnb.connector.incluster import credentials_text
from tpnb.errors import ClusterError
from tpnb.proto import pb

pytestmark = pytest.mark.unit


@pytest.fixture
def sa(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from tpnb_devcluster.pki import make_ca

    _, cert = make_ca("incluster-unit-ca")
    (tmp_path / "ca.crt").write_bytes(cert.public_bytes(Encoding.PEM))
    (tmp_path / "token").write_text("tok-123")
    (tmp_path / "namespace").write_text("jupyter\n")
    monkeypatch.setenv("TPNB_SERVICEACCOUNT_DIR", str(tmp_path))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.43.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    return tmp_path


def test_detected_from_the_pod_environment(sa: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    got = incluster.decide("auto")
    assert got.in_cluster and "KUBERNETES_SERVICE_HOST=10.43.0.1" in got.why
    assert not incluster.decide("never").in_cluster
    (sa / "token").unlink()  # a pod with automountServiceAccountToken: false
    got = incluster.decide("auto")
    assert not got.in_cluster and "no ServiceAccount token" in got.why
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert not incluster.decide("auto").in_cluster
    assert incluster.decide("auto", forced=True).in_cluster  # --in-cluster
    assert incluster.decide("always").in_cluster


def test_the_serviceaccount_is_the_target(sa: Path) -> None:
    t = kube.load_in_cluster_target()
    assert t.server == "https://10.43.0.1:443"
    assert t.namespace == "jupyter"
    assert t.context == kube.IN_CLUSTER_CONTEXT
    assert t.auth_headers()["Authorization"] == "bearer tok-123"
    assert t._configuration is not None and t._configuration.refresh_api_key_hook is not None  # rotated tokens
    assert credentials_text(t, "system:serviceaccount:jupyter:notebook") == "ServiceAccount jupyter/notebook"


def test_no_serviceaccount_is_a_clear_error(sa: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(ClusterError) as err:
        kube.load_in_cluster_target()
    assert "cannot use this pod's ServiceAccount" in str(err.value)
    assert "KUBECONFIG" in str(err.value)  # the fix names the other ways


def test_status_says_in_cluster_and_what_it_covers() -> None:
    st = pb.ConnectionStatus(connected=True, context="in-cluster", server="https://10.43.0.1:443",
                             outbound_note="in-cluster mode", in_cluster=True,
                             in_cluster_note="in a pod (KUBERNETES_SERVICE_HOST=10.43.0.1)",
                             credentials="ServiceAccount jupyter/notebook", pod_ip="10.42.0.9")
    s = Status.from_pb(st)
    assert s.outbound_mode == "in-cluster" and not s.proxy_env
    text = render.status_text(s)
    assert "Mode             : in-cluster (in a pod" in text
    assert "Credentials      : ServiceAccount jupyter/notebook" in text
    assert "Pod IP           : 10.42.0.9" in text
    assert "every process of this pod" in text
    assert "In-cluster mode" in render.connected_text(s)
    assert "proxy" not in render.connected_text(s).lower()
