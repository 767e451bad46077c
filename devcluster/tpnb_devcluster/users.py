"""Kubeconfigs for other Kubernetes users of the dev cluster (for tests).

`user_kubeconfig("alice", ["team-a"])` returns the path of a kubeconfig whose
user is a client certificate with CN=alice and O=team-a, signed by the dev
cluster's CA: the API server authenticates it as user `alice` in group
`team-a` (plus `system:authenticated`), and RBAC decides what it may do --
nothing, until a Role or ClusterRole is bound to it.  Same server address
and context name as the laptop kubeconfig (`tpnb devcluster kubeconfig`).

The certificate is made once and reused while it still names the same user
and groups and was signed by the current CA (`up` remakes the CA when the
wanted PKI changes).  Files live under <state>/kubeconfigs/users/; the
kubeconfig (key embedded) is 0644 like the laptop kubeconfig, so a test may
hand it to any local user.  Needs root (it signs with the CA's key).
"""
from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from tpnb.errors import ConfigError, DevClusterError

from . import config as devcluster_config
from .manifests import KUBECONFIG_CONTEXT, Addresses, Layout
from .pki import CertSpec, Pki, _cert_pem, _key_pem, _write, load_cert, make_leaf

USERS_SUBDIR = "users"


def users_dir(layout: Layout | None = None) -> Path:
    layout = layout or Layout.from_config(devcluster_config.get())
    return layout.kubeconfig_dir / USERS_SUBDIR


def _stem(name: str, groups: tuple[str, ...]) -> str:
    """File stem: readable, and distinct for every (name, groups)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:40] or "user"
    digest = hashlib.sha256("\0".join((name, *groups)).encode()).hexdigest()[:8]
    return f"{safe}-{digest}"


def _matches(crt: Path, key: Path, name: str, groups: tuple[str, ...], ca: x509.Certificate) -> bool:
    """The existing certificate names this user and groups and is the current CA's."""
    try:
        cert = load_cert(crt)
        if not key.exists():
            return False
        subject = cert.subject
        cn = [a.value for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        orgs = tuple(a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME))
        if cn != [name] or orgs != groups:
            return False
        cert.verify_directly_issued_by(ca)
        return True
    except Exception:  # unreadable, or another CA: make a new one
        return False


def user_kubeconfig(name: str, groups: Iterable[str] = ()) -> Path:
    """Path of a kubeconfig for Kubernetes user `name` in `groups` (made if needed)."""
    if not name or name.startswith("system:"):
        raise ConfigError(f"invalid user name {name!r}",
                          "a user name must be non-empty and outside the reserved system: prefix",
                          "choose a plain name such as alice")
    groups_t = tuple(groups)
    cfg = devcluster_config.get()
    layout = Layout.from_config(cfg)
    pki = Pki(layout.pki_dir)
    if not (pki.ca.exists() and pki.key("ca").exists()):
        raise DevClusterError("the dev cluster has no certificate authority yet",
                              f"{pki.ca} is missing",
                              "run `tpnb devcluster up` first")
    ca_cert = load_cert(pki.ca)
    out_dir = users_dir(layout)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _stem(name, groups_t)
    crt, key = out_dir / f"{stem}.crt", out_dir / f"{stem}.key"
    path = out_dir / f"{stem}.kubeconfig"
    try:
        if not _matches(crt, key, name, groups_t, ca_cert):
            ca_key = serialization.load_pem_private_key(pki.key("ca").read_bytes(), password=None)
            leaf_key, leaf = make_leaf(CertSpec(stem, name, groups_t, client=True), ca_key, ca_cert)  # type: ignore[arg-type]
            _write(key, _key_pem(leaf_key), 0o600)
            _write(crt, _cert_pem(leaf), 0o644)
        server = f"{Addresses.from_config(cfg).api_server}:{cfg.api_port}"
        text = _kubeconfig_text(name, server, pki.ca, crt, key)
        if not path.exists() or path.read_text() != text:
            _write(path, text.encode(), 0o644)
    except PermissionError as exc:
        raise DevClusterError(f"cannot make a kubeconfig for {name}", str(exc),
                              "run as root (the dev cluster's CA key is readable only by root)") from None
    return path


def _kubeconfig_text(name: str, server: str, ca: Path, crt: Path, key: Path) -> str:
    """Like the laptop kubeconfig (embedded data, context tpnb-dev), user `name`."""
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    ctx = KUBECONFIG_CONTEXT
    user = f"{ctx}-{name}"
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": ctx, "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(crt), "client-key-data": b64(key)}}],
        "contexts": [{"name": ctx, "context": {"cluster": ctx, "user": user}}],
        "current-context": ctx,
        "preferences": {},
    }
    return yaml.safe_dump(doc, sort_keys=False)
