"""Certificates and kubeconfigs for the dev cluster.

Every component authenticates with an x509 client certificate signed by one
CA, so RBAC sees the same identities a kubeadm cluster has
(system:kube-scheduler, system:node:<node>, ...), and Node authorization lets
the kubelet do what a real kubelet does.  Keys are ECDSA P-256 (fast to make);
the service-account signing key is RSA, the one kind every client accepts.

Certificates are made once and kept across `down`/`up`; `ensure` remakes the
whole set when the wanted names or addresses changed (e.g. a new lan_cidr).
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=3650)


@dataclass(frozen=True)
class CertSpec:
    """One leaf certificate: file stem, subject, usage and SANs."""

    name: str
    cn: str
    orgs: tuple[str, ...] = ()
    client: bool = False
    server: bool = False
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class PkiPlan:
    """What the cluster's PKI must contain, derived from the config."""

    node_name: str
    node_ip: str
    api_service_ip: str
    cluster_domain: str = "cluster.local"
    certs: tuple[CertSpec, ...] = field(default=())

    @classmethod
    def make(cls, node_name: str, node_ip: str, api_service_ip: str,
             cluster_domain: str = "cluster.local") -> PkiPlan:
        api_dns = (
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            f"kubernetes.default.svc.{cluster_domain}",
            "localhost",
        )
        certs = (
            CertSpec("apiserver", "kube-apiserver", server=True, dns=api_dns,
                     ips=(node_ip, "127.0.0.1", api_service_ip)),
            CertSpec("admin", "tpnb-admin", ("system:masters",), client=True),
            CertSpec("controller-manager", "system:kube-controller-manager", client=True),
            CertSpec("scheduler", "system:kube-scheduler", client=True),
            CertSpec("kube-proxy", "system:kube-proxy", client=True),
            CertSpec("kubelet", f"system:node:{node_name}", ("system:nodes",), client=True),
            CertSpec("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                     ("system:masters",), client=True),
            # the API server's identity towards aggregated API servers
            CertSpec("front-proxy-client", "front-proxy-client", client=True),
            CertSpec("kubelet-serving", node_name, server=True,
                     dns=(node_name, "localhost"), ips=(node_ip, "127.0.0.1")),
        )
        return cls(node_name, node_ip, api_service_ip, cluster_domain, certs)

    def fingerprint(self) -> str:
        """Stable text that changes whenever the wanted PKI changes."""
        return json.dumps([[c.name, c.cn, c.orgs, c.client, c.server, c.dns, c.ips] for c in self.certs])


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str, orgs: tuple[str, ...] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def make_ca(cn: str = "tpnb-devcluster-ca") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    now = dt.datetime.now(dt.timezone.utc)
    name = _name(cn)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_leaf(spec: CertSpec, ca_key: ec.EllipticCurvePrivateKey,
              ca_cert: x509.Certificate) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    now = dt.datetime.now(dt.timezone.utc)
    usages = []
    if spec.client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    if spec.server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(spec.cn, spec.orgs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                     key_cert_sign=False, crl_sign=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in spec.dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in spec.ips]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    tmp.replace(path)


class Pki:
    """The PKI directory: `<dir>/ca.crt`, `<dir>/<name>.crt|.key`, `sa.key|.pub`."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def crt(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    @property
    def ca(self) -> Path:
        return self.crt("ca")

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"

    def _stamp(self) -> Path:
        return self.dir / "plan.json"

    def current(self, plan: PkiPlan) -> bool:
        try:
            if self._stamp().read_text() != plan.fingerprint():
                return False
        except OSError:
            return False
        names = ["ca", *(c.name for c in plan.certs)]
        return all(self.crt(n).exists() and self.key(n).exists() for n in names) and \
            self.sa_key.exists() and self.sa_pub.exists()

    def ensure(self, plan: PkiPlan) -> bool:
        """Make the PKI if missing or stale; True when (re)made."""
        if self.current(plan):
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        ca_key, ca_cert = make_ca()
        _write(self.ca, _cert_pem(ca_cert), 0o644)
        _write(self.key("ca"), _key_pem(ca_key), 0o600)
        for spec in plan.certs:
            key, cert = make_leaf(spec, ca_key, ca_cert)
            _write(self.crt(spec.name), _cert_pem(cert), 0o644)
            _write(self.key(spec.name), _key_pem(key), 0o600)
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write(self.sa_key, _key_pem(sa), 0o600)
        _write(self.sa_pub, sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
        _write(self._stamp(), plan.fingerprint().encode(), 0o644)
        return True

    def kubeconfig(self, name: str, server: str, context: str = "tpnb-dev", embed: bool = False) -> str:
        """A kubeconfig for client cert `name` against `server`.

        Components get file references (certs stay 0600); the user kubeconfig
        is embedded so it can be copied elsewhere and still work.
        """
        if embed:
            import base64

            def b64(p: Path) -> str:
                return base64.b64encode(p.read_bytes()).decode()

            cluster = {"server": server, "certificate-authority-data": b64(self.ca)}
            user = {"client-certificate-data": b64(self.crt(name)),
                    "client-key-data": b64(self.key(name))}
        else:
            cluster = {"server": server, "certificate-authority": str(self.ca)}
            user = {"client-certificate": str(self.crt(name)), "client-key": str(self.key(name))}
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": context, "cluster": cluster}],
            "users": [{"name": f"{context}-{name}", "user": user}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": f"{context}-{name}"}}],
            "current-context": context,
            "preferences": {},
        }
        return yaml.safe_dump(doc, sort_keys=False)

    def write_kubeconfig(self, path: Path, name: str, server: str, *, mode: int = 0o600,
                         embed: bool = False, context: str = "tpnb-dev") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, self.kubeconfig(name, server, context=context, embed=embed).encode(), mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cert_sans(path: Path) -> tuple[set[str], set[str]]:
    """(DNS names, IP addresses) of a certificate, for checks and tests."""
    cert = load_cert(path)
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return set(ext.get_values_for_type(x509.DNSName)), \
        {str(i) for i in ext.get_values_for_type(x509.IPAddress)}


def node_certs(node_name: str, node_ip: str) -> tuple[CertSpec, ...]:
    """A kubelet's two certificates: its client identity (Node authorization
    and NodeRestriction know it by system:node:<name>) and its serving
    certificate (the API server checks it for logs, exec and port-forward)."""
    return (
        CertSpec("kubelet", f"system:node:{node_name}", ("system:nodes",), client=True),
        CertSpec("kubelet-serving", node_name, server=True,
                 dns=(node_name, "localhost"), ips=(node_ip, "127.0.0.1")),
    )


def ensure_node_pki(cluster: Pki, directory: Path, node_name: str, node_ip: str) -> Pki:
    """The PKI dir of an added node: the cluster's CA certificate, its kube-proxy
    identity, and this node's kubelet certificates signed by the cluster's CA.

    Remade whenever the cluster's CA changed or the node's name or address did,
    so a node never holds certificates of an earlier cluster.
    """
    pki = Pki(directory)
    specs = node_certs(node_name, node_ip)
    ca = cluster.ca.read_bytes()
    stamp = json.dumps([ca.decode(), [[c.name, c.cn, c.orgs, c.dns, c.ips] for c in specs]])
    names = ["kube-proxy", *(c.name for c in specs)]
    try:
        fresh = pki._stamp().read_text() == stamp and pki.ca.read_bytes() == ca and \
            all(pki.crt(n).exists() and pki.key(n).exists() for n in names)
    except OSError:
        fresh = False
    if fresh:
        return pki
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    _write(pki.ca, ca, 0o644)
    for n in ("kube-proxy",):
        _write(pki.crt(n), cluster.crt(n).read_bytes(), 0o644)
        _write(pki.key(n), cluster.key(n).read_bytes(), 0o600)
    ca_key = serialization.load_pem_private_key(cluster.key("ca").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = load_cert(cluster.ca)
    for spec in specs:
        key, cert = make_leaf(spec, ca_key, ca_cert)
        _write(pki.crt(spec.name), _cert_pem(cert), 0o644)
        _write(pki.key(spec.name), _key_pem(key), 0o600)
    _write(pki._stamp(), stamp.encode(), 0o644)
    return pki
