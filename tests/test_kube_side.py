"""The daemon's Kubernetes side: kubeconfig loading, reachability, the
port-forward channel protocol, manager manifests -- and, against the dev
cluster, a real port-forward and the manager's install error path.

unit:    pure logic plus fakes on loopback (a fake API server speaking the
         kubelet's WebSocket channel protocol).
netns:   reachability failures inside a throw-away network namespace.
cluster: the dev cluster (`tpnb devcluster up`), run from the laptop netns.
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import types
import uuid
from pathlib import Path
from typing import Any, Self

import pytest
from conftest import rerun_in_laptop
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tpnb.connector import kube, manager_install, portforward
from tpnb.connector.kube import KubeTarget, check_reachable, load_target
from tpnb.connector.portforward import PortForward, decode_frame, encode_frame, open_stream

from tpnb.errors import ClusterError, PermissionDenied

REPO = Path(__file__).resolve().parent.parent

# async tests run on asyncio through anyio's pytest plugin
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ======================================================================= PKI
def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, Any] | None = None,
          ip: str | None = None, ca: bool = False, client: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer[0].subject if issuer else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
    if client:
        b = b.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer[1] if issuer else key, hashes.SHA256())


class PKI:
    """A CA with a server cert for 127.0.0.1 and a client cert."""

    def __init__(self) -> None:
        self.ca_key = _key()
        self.ca = _cert("test-ca", self.ca_key, ca=True)
        self.server_key = _key()
        self.server = _cert("apiserver", self.server_key, (self.ca, self.ca_key), ip="127.0.0.1")
        self.client_key = _key()
        self.client = _cert("alice", self.client_key, (self.ca, self.ca_key), client=True)

    @staticmethod
    def pem(c: x509.Certificate) -> bytes:
        return c.public_bytes(serialization.Encoding.PEM)

    def server_ctx(self, tmp: Path, require_client: bool = False) -> ssl.SSLContext:
        (tmp / "srv.crt").write_bytes(self.pem(self.server))
        (tmp / "srv.key").write_bytes(_pem_key(self.server_key))
        (tmp / "ca.crt").write_bytes(self.pem(self.ca))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(tmp / "srv.crt", tmp / "srv.key")
        if require_client:
            ctx.load_verify_locations(tmp / "ca.crt")
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@pytest.fixture(scope="module")
def pki() -> PKI:
    return PKI()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_kubeconfig(path: Path, server: str, pki: PKI | None = None, *, token: str | None = None,
                     token_file: str | None = None, namespace: str | None = None, client_cert: bool = True,
                     context: str = "test", current: str | None = "test", ca_pem: bytes | None = None) -> Path:
    """A kubeconfig trusting `pki`'s CA (or `ca_pem`), with `pki`'s client certificate and/or a token."""
    cluster: dict[str, Any] = {"server": server}
    if ca_pem is None and pki is not None:
        ca_pem = PKI.pem(pki.ca)
    if ca_pem is not None:
        cluster["certificate-authority-data"] = b64(ca_pem)
    user: dict[str, Any] = {}
    if pki is not None and client_cert:
        user["client-certificate-data"] = b64(PKI.pem(pki.client))
        user["client-key-data"] = b64(_pem_key(pki.client_key))
    if token:
        user["token"] = token
    if token_file:
        user["tokenFile"] = token_file
    ctx: dict[str, Any] = {"cluster": f"{context}-cluster", "user": f"{context}-user"}
    if namespace:
        ctx["namespace"] = namespace
    doc = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": f"{context}-cluster", "cluster": cluster}],
        "users": [{"name": f"{context}-user", "user": user}],
        "contexts": [{"name": context, "context": ctx}],
    }
    if current is not None:
        doc["current-context"] = current
    path.write_text(yaml.safe_dump(doc))
    return path


# ============================================================ kubeconfig (unit)
@pytest.mark.unit
def test_load_target_inline_cert_data(tmp_path: Path, pki: PKI) -> None:
    kc = write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:6443", pki, namespace="team-a")
    t = load_target(str(kc), None)
    assert t.context == "test"
    assert t.server == "https://127.0.0.1:6443"
    assert t.namespace == "team-a"
    assert t.headers == {}
    assert len(t.ssl_context.get_ca_certs()) == 1
    assert t.ssl_context.verify_mode == ssl.CERT_REQUIRED
    cfg = t.api.configuration
    # *-data fields went to private files
    for f in (cfg.ssl_ca_cert, cfg.cert_file, cfg.key_file):
        assert f and os.path.isfile(f)
        assert os.stat(f).st_mode & 0o077 == 0, f"{f} is readable by others"
        assert os.stat(os.path.dirname(f)).st_mode & 0o077 == 0


@pytest.mark.unit
def test_load_target_token_and_default_namespace(tmp_path: Path, pki: PKI) -> None:
    kc = write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:6443", pki, token="s3cr3t", client_cert=False)
    t = load_target(str(kc), "test")
    assert t.namespace == "default"
    assert t.headers == {"Authorization": "Bearer s3cr3t"}


@pytest.mark.unit
def test_load_target_token_file(tmp_path: Path, pki: PKI) -> None:
    (tmp_path / "tok").write_text("from-file\n")
    kc = write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:6443", pki, token_file=str(tmp_path / "tok"),
                          client_cert=False)
    t = load_target(str(kc), None)
    assert t.headers["Authorization"].startswith("Bearer from-file")


def _with_exec(kc: Path, script: str) -> Path:
    doc = yaml.safe_load(kc.read_text())
    doc["users"][0]["user"] = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "/bin/sh",
                                        "args": ["-c", script], "interactiveMode": "Never"}}
    kc.write_text(yaml.safe_dump(doc))
    return kc


@pytest.mark.unit
def test_load_target_exec_plugin(tmp_path: Path, pki: PKI) -> None:
    cred = json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                       "status": {"token": "from-plugin"}})
    kc = _with_exec(write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:6443", pki), f"echo '{cred}'")
    t = load_target(str(kc), None)
    assert t.headers == {"Authorization": "Bearer from-plugin"}
    assert t.auth_headers() == {"Authorization": "Bearer from-plugin"}
    bad = _with_exec(write_kubeconfig(tmp_path / "kc2", "https://127.0.0.1:6443", pki),
                     "echo 'please log in first' >&2; exit 1")
    with pytest.raises(ClusterError) as ei:
        load_target(str(bad), None)
    assert "credential plugin" in ei.value.what and "please log in first" in ei.value.why


@pytest.mark.unit
def test_missing_context_is_a_clear_error(tmp_path: Path, pki: PKI) -> None:
    kc = write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:6443", pki)
    with pytest.raises(ClusterError) as ei:
        load_target(str(kc), "nope")
    msg = str(ei.value)
    assert "'nope' not found" in msg and "test" in ei.value.why and str(kc) in msg


@pytest.mark.unit
def test_no_current_context(tmp_path: Path, pki: PKI) -> None:
    kc = write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:6443", pki, current=None)
    with pytest.raises(ClusterError, match="no Kubernetes context selected"):
        load_target(str(kc), None)


@pytest.mark.unit
def test_missing_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(ClusterError) as ei:
        load_target(str(tmp_path / "absent"), None)
    assert "no kubeconfig found" in str(ei.value) and "absent" in ei.value.why
    bad = tmp_path / "bad"
    bad.write_text("clusters: [ {name: x\n")
    with pytest.raises(ClusterError) as ei:
        load_target(str(bad), None)
    assert f"cannot parse kubeconfig {bad}" in str(ei.value)
    notmap = tmp_path / "list"
    notmap.write_text("- a\n- b\n")
    with pytest.raises(ClusterError, match="not a YAML mapping"):
        load_target(str(notmap), None)


@pytest.mark.unit
def test_bad_cert_data(tmp_path: Path, pki: PKI) -> None:
    kc = write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:6443", pki)
    doc = yaml.safe_load(kc.read_text())
    doc["users"][0]["user"]["client-key-data"] = b64(b"not a key")
    kc.write_text(yaml.safe_dump(doc))
    with pytest.raises(ClusterError, match="bad certificate data"):
        load_target(str(kc), None)


@pytest.mark.unit
def test_kubeconfig_list_merges_like_kubectl(tmp_path: Path, pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    a = write_kubeconfig(tmp_path / "a", "https://127.0.0.1:1111", pki, context="first", current="first")
    b = write_kubeconfig(tmp_path / "b", "https://127.0.0.1:2222", pki, context="second", current="second",
                         token="tok-b", client_cert=False)
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing'}:{a}:{b}")
    t = load_target(None, None)  # first file's current-context wins
    assert (t.context, t.server) == ("first", "https://127.0.0.1:1111")
    t2 = load_target(None, "second")
    assert (t2.server, t2.headers) == ("https://127.0.0.1:2222", {"Authorization": "Bearer tok-b"})
    t3 = load_target(f"{b}:{a}", None)  # explicit list
    assert t3.context == "second"


# ============================================================ reachability (unit)
# Credentials and TLS failures are checked against the dev cluster's real API server
# (test_cluster_check_reachable_rejections, below); a closed loopback port needs no server.
@pytest.mark.unit
async def test_check_reachable_refused(tmp_path: Path, pki: PKI) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    kc = write_kubeconfig(tmp_path / "kc", f"https://127.0.0.1:{port}", pki)
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as ei:
        await check_reachable(load_target(str(kc), None), 5)
    assert time.monotonic() - t0 < 5
    assert f"https://127.0.0.1:{port}" in str(ei.value) and "Connection refused" in ei.value.why
    assert "Traceback" not in str(ei.value)


# =========================================================== messages (unit)
@pytest.mark.unit
def test_rbac_error_names_what_was_refused() -> None:
    from kubernetes.client import ApiException

    body = json.dumps({
        "kind": "Status", "code": 403, "reason": "Forbidden",
        "message": 'clusterroles.rbac.authorization.k8s.io is forbidden: User "bob" cannot create resource '
                   '"clusterroles" in API group "rbac.authorization.k8s.io" at the cluster scope'})
    err = kube.rbac_error(ApiException(status=403, reason="Forbidden", body=body), "create", "clusterroles", None)
    assert isinstance(err, PermissionDenied)
    assert "'bob' may not create clusterroles.rbac.authorization.k8s.io cluster-wide" in err.what
    body = json.dumps({"message": 'pods "x" is forbidden: User "system:serviceaccount:ci:runner" cannot '
                                  'create resource "pods/portforward" in API group "" in the namespace "tpnb"'})
    err = kube.rbac_error(ApiException(status=403, reason="Forbidden", body=body), "get", "pods/portforward", "x")
    assert err.what == "user 'system:serviceaccount:ci:runner' may not create pods/portforward in namespace 'tpnb'"
    assert "kubectl auth can-i create pods/portforward -n tpnb" in err.hint


@pytest.mark.unit
def test_parse_service_range() -> None:
    msgs = {
        'Service "p" is invalid: spec.clusterIPs: Invalid value: []string{"1.1.1.1"}: failed to allocate IP '
        '1.1.1.1: the provided IP (1.1.1.1) is not in the valid range. The range of valid IPs is 10.43.0.0/16':
            ["10.43.0.0/16"],
        "failed to allocated ip:1.1.1.1 with error:provided IP is not in the valid range. "
        "The range of valid IPs is 10.96.0.0/12": ["10.96.0.0/12"],
        "The range of valid IPs is CIDR 172.20.0.0/16": ["172.20.0.0/16"],
        "something else": [],
    }
    for msg, want in msgs.items():
        assert kube.parse_service_range(msg) == want


# =============================================================== framing (unit)
@pytest.mark.unit
def test_channel_frames() -> None:
    assert encode_frame(0, b"abc") == b"\x00abc"
    ch, payload = decode_frame(b"\x01oops")
    assert ch == 1 and bytes(payload) == b"oops" and isinstance(payload, memoryview)
    with pytest.raises(ValueError):
        decode_frame(b"")
    assert portforward.encode_port(8081) == b"\x91\x1f"  # little endian
    assert portforward.decode_port(b"\x91\x1f") == 8081

    r = portforward._ChannelReader(8081)
    assert r.feed(b"\x00\x91\x1f") is None and not r.ready
    assert r.feed(b"\x01\x91\x1f") is None and r.ready
    assert bytes(r.feed(b"\x00hello")) == b"hello"
    assert r.feed(b"\x01connection refused") is None and r.error == "connection refused"
    r2 = portforward._ChannelReader(8081)
    assert bytes(r2.feed(b"\x00\x91\x1fearly")) == b"early"  # preamble + data in one message
    with pytest.raises(ClusterError, match="wrong port"):
        portforward._ChannelReader(80).feed(b"\x00\x91\x1f")
    with pytest.raises(ClusterError, match="unknown channel"):
        portforward._ChannelReader(80).feed(b"\x05xx")


# ============================================== fake API server + kubelet (unit)
class FakeKubelet:
    """An API server on loopback that speaks the kubelet's port-forward
    WebSocket protocol, forwarding pod port P to 127.0.0.1:ports[P]."""

    def __init__(self, ssl_ctx: ssl.SSLContext, ports: dict[int, int]) -> None:
        self.ssl_ctx = ssl_ctx
        self.ports = ports
        self.pods = {"default/echo"}
        self.forbidden = False
        self.seen_headers: list[dict[str, str]] = []
        self.port = 0
        self._server: Any = None
        self.max_message = 0

    async def __aenter__(self) -> Self:
        from websockets.asyncio.server import serve

        self._server = await serve(self._handle, "127.0.0.1", 0, ssl=self.ssl_ctx,
                                   subprotocols=["v4.channel.k8s.io"],  # type: ignore[list-item]
                                   process_request=self._check, max_size=2**22, compression=None)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    def _check(self, conn: Any, req: Any) -> Any:
        from websockets.datastructures import Headers
        from websockets.http11 import Response

        self.seen_headers.append({k.lower(): v for k, v in req.headers.raw_items()})
        parts = req.path.split("?")[0].split("/")  # /api/v1/namespaces/NS/pods/POD/portforward
        ns, pod = parts[4], parts[6]

        def status(code: int, reason: str, msg: str) -> Response:
            body = json.dumps({"kind": "Status", "status": "Failure", "message": msg, "code": code}).encode()
            return Response(code, reason, Headers([("Content-Type", "application/json"),
                                                   ("Content-Length", str(len(body)))]), body)

        if self.forbidden:
            return status(403, "Forbidden", f'pods "{pod}" is forbidden: User "alice" cannot create resource '
                                            f'"pods/portforward" in API group "" in the namespace "{ns}"')
        if f"{ns}/{pod}" not in self.pods:
            return status(404, "Not Found", f'pods "{pod}" not found')
        return None

    async def _handle(self, ws: Any) -> None:
        from urllib.parse import parse_qs, urlsplit

        port = int(parse_qs(urlsplit(ws.request.path).query)["ports"][0])
        pre = portforward.encode_port(port)
        await ws.send(b"\x00" + pre)
        await ws.send(b"\x01" + pre)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", self.ports.get(port, 1))
        except OSError as exc:
            await ws.send(b"\x01" + f"error forwarding port {port} to pod echo: dial tcp 127.0.0.1:{port}: "
                                    f"connect: {os.strerror(exc.errno or 111).lower()}".encode())
            await ws.close()
            return

        async def up() -> None:
            async for msg in ws:
                self.max_message = max(self.max_message, len(msg))
                assert msg[0] == 0
                w.write(msg[1:])
                await w.drain()

        async def down() -> None:
            while data := await r.read(32768):
                await ws.send(b"\x00" + data)

        tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        w.close()
        await ws.close()


async def _echo_server() -> tuple[asyncio.AbstractServer, int]:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        w.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


@pytest.fixture
async def fake_cluster(tmp_path: Path, pki: PKI):  # type: ignore[no-untyped-def]
    echo, echo_port = await _echo_server()
    async with FakeKubelet(pki.server_ctx(tmp_path), {8080: echo_port}) as fk:
        kc = write_kubeconfig(tmp_path / "kc", f"https://127.0.0.1:{fk.port}", pki, token="pf-token")
        yield fk, load_target(str(kc), None)
    echo.close()


@pytest.mark.unit
async def test_portforward_roundtrip_large(fake_cluster: tuple[FakeKubelet, KubeTarget]) -> None:
    fk, t = fake_cluster
    pf = PortForward(t, "default", "echo", 8080)
    port = await pf.start()
    assert port == pf.local_port and port > 0
    assert fk.seen_headers[-1]["authorization"] == "Bearer pf-token"
    assert fk.seen_headers[-1]["sec-websocket-protocol"].startswith("v4.channel.k8s.io")
    try:
        payload = os.urandom(8 * 1024 * 1024)

        async def one() -> None:
            r, w = await asyncio.open_connection("127.0.0.1", port)

            async def send() -> None:
                w.write(payload)
                await w.drain()

            sender = asyncio.create_task(send())
            got = await r.readexactly(len(payload))
            await sender
            assert got == payload
            w.close()

        await asyncio.wait_for(asyncio.gather(one(), one(), one()), 60)
        assert fk.max_message > 64 * 1024 + 1  # big frames, not tiny chunks
        assert fk.max_message <= portforward.FRAME_MAX + 1
    finally:
        await pf.aclose()
    # nothing listens any more
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.unit
async def test_portforward_refused_port(fake_cluster: tuple[FakeKubelet, KubeTarget]) -> None:
    _fk, t = fake_cluster
    with pytest.raises(ClusterError) as ei:
        await PortForward(t, "default", "echo", 9999).start()
    assert "connection refused" in ei.value.why and "default/echo:9999" in str(ei.value)


@pytest.mark.unit
async def test_portforward_error_channel_closes_local(fake_cluster: tuple[FakeKubelet, KubeTarget],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    fk, t = fake_cluster
    pf = PortForward(t, "default", "echo", 8080)
    port = await pf.start()
    try:
        fk.ports[8080] = 1  # the pod stopped listening
        r, w = await asyncio.open_connection("127.0.0.1", port)
        with caplog.at_level(logging.WARNING, logger="tpnb.connector.portforward"):
            assert await asyncio.wait_for(r.read(), 10) == b""  # closed by us
            await asyncio.sleep(0.1)
        w.close()
        assert "connection refused" in caplog.text
        assert "connection refused" in pf.last_error
    finally:
        await pf.aclose()


@pytest.mark.unit
async def test_portforward_missing_pod_and_forbidden(fake_cluster: tuple[FakeKubelet, KubeTarget]) -> None:
    fk, t = fake_cluster
    with pytest.raises(ClusterError) as ei:
        await PortForward(t, "default", "gone", 8080).start()
    assert "not found" in str(ei.value) and 'pods "gone" not found' in ei.value.why
    fk.forbidden = True
    with pytest.raises(PermissionDenied) as pe:
        await PortForward(t, "default", "echo", 8080).start()
    assert pe.value.what == "user 'alice' may not create pods/portforward in namespace 'default'"


@pytest.mark.unit
async def test_open_stream(fake_cluster: tuple[FakeKubelet, KubeTarget]) -> None:
    _fk, t = fake_cluster
    r, w = await open_stream(t, "default", "echo", 8080)
    w.write(b"ping\n")
    await w.drain()
    assert await asyncio.wait_for(r.readline(), 5) == b"ping\n"
    w.close()
    with pytest.raises(ClusterError):
        await open_stream(t, "default", "gone", 8080)


@pytest.mark.unit
async def test_portforward_half_close_gets_answer(fake_cluster: tuple[FakeKubelet, KubeTarget]) -> None:
    """A client that shuts down its write side still receives the answer."""
    _fk, t = fake_cluster
    async with PortForward(t, "default", "echo", 8080) as pf:
        s = socket.create_connection(("127.0.0.1", pf.local_port))
        s.sendall(b"request")
        s.shutdown(socket.SHUT_WR)
        s.setblocking(False)
        loop = asyncio.get_running_loop()
        got = b""
        while len(got) < 7:
            got += await asyncio.wait_for(loop.sock_recv(s, 100), 5)
        assert got == b"request"
        s.close()


# ============================================================== manifests (unit)
@pytest.mark.unit
def test_manager_manifests() -> None:
    image = "tpnb.local/tpnb:0.1.0-abcdef0123"
    objs = manager_install.manifests(image, "tpnb", 8081)
    kinds = [o["kind"] for o in objs]
    assert kinds == ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment"]
    for o in objs:
        assert o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tpnb"
        if o["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == "tpnb"
    role = objs[2]
    assert role["metadata"]["name"] == "tpnb-traffic-manager"
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {("", "nodes"), ("", "namespaces"), ("", "services"), ("", "pods"), ("", "endpoints"),
                       ("discovery.k8s.io", "endpointslices"), ("apps", "deployments"), ("apps", "replicasets"),
                       ("apps", "statefulsets"), ("authentication.k8s.io", "tokenreviews")}
    for rule in role["rules"]:  # read only, plus checking the agents' tokens
        want = ["create"] if rule["resources"] == ["tokenreviews"] else ["get", "list", "watch"]
        assert rule["verbs"] == want, rule
    crb = objs[3]
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": "traffic-manager", "namespace": "tpnb"}]
    svc = objs[4]["spec"]
    # a real ClusterIP: the name resolves even while the manager pod restarts; it carries only the
    # agents' port (the client port is on the pod's loopback, for port-forwards)
    assert "clusterIP" not in svc and [(p["port"], p["name"]) for p in svc["ports"]] == [(8082, "agents")]
    dep = objs[5]
    assert dep["metadata"]["name"] == "traffic-manager" and dep["spec"]["replicas"] == 1
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert (c["image"], c["args"], c["imagePullPolicy"]) == (image, ["manager"], "IfNotPresent")
    assert pod["dnsPolicy"] == "ClusterFirst" and pod["serviceAccountName"] == "traffic-manager"
    env = {e["name"]: e for e in c["env"]}
    assert env["MANAGER_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["TPNB_MANAGER_GRPC_PORT"]["value"] == "8081"
    assert env["TPNB_MANAGER_AGENT_PORT"]["value"] == "8082"
    assert [p["containerPort"] for p in c["ports"]] == [8082]
    assert c["readinessProbe"]["tcpSocket"]["port"] == 8082
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert dep["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "traffic-manager"}
    # the hash changes with the image and is stable otherwise
    h = dep["metadata"]["annotations"][manager_install.HASH_ANNOTATION]
    assert manager_install.manifests(image, "tpnb", 8081)[5]["metadata"]["annotations"][
        manager_install.HASH_ANNOTATION] == h
    assert manager_install.manifests(image + "x", "tpnb", 8081)[5]["metadata"]["annotations"][
        manager_install.HASH_ANNOTATION] != h
    assert manager_install.image_tag(image) == "0.1.0-abcdef0123"
    assert manager_install.image_tag("reg:5000/a/b:v1") == "v1"
    assert manager_install.image_tag("reg:5000/a/b") == "latest"
    other = manager_install.manifests(image, "tpnb-test", 8081)  # a second install keeps to its own RBAC
    assert other[2]["metadata"]["name"] == other[3]["metadata"]["name"] == "tpnb-traffic-manager-tpnb-test"
    assert other[3]["roleRef"]["name"] == "tpnb-traffic-manager-tpnb-test"
    paths = [manager_install.object_path(o)[0] for o in objs]
    assert paths == [
        "/api/v1/namespaces/tpnb",
        "/api/v1/namespaces/tpnb/serviceaccounts/traffic-manager",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/tpnb-traffic-manager",
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/tpnb-traffic-manager",
        "/api/v1/namespaces/tpnb/services/traffic-manager",
        "/apis/apps/v1/namespaces/tpnb/deployments/traffic-manager",
    ]


# ========================================================== unreachable (netns)
def _have_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


_PROBE = textwrap.dedent("""
    import asyncio, json, sys, time
    from tpnb.connector.kube import load_target, check_reachable
    from tpnb.errors import ClusterError
    t = load_target(sys.argv[1], None)
    t0 = time.monotonic()
    try:
        v = asyncio.run(check_reachable(t, float(sys.argv[2])))
        out = {"ok": v}
    except ClusterError as e:
        out = {"what": e.what, "why": e.why, "hint": e.hint, "type": type(e).__name__}
    out["elapsed"] = time.monotonic() - t0
    print(json.dumps(out))
""")


@pytest.mark.netns
@pytest.mark.skipif(not _have_netns(), reason="needs root and iproute2")
@pytest.mark.parametrize("mode", ["no-route", "blackhole"])
def test_check_reachable_unreachable_in_netns(tmp_path: Path, pki: PKI, mode: str) -> None:
    """An API server address nobody answers, inside a namespace of our own.

    no-route: only lo, so connect() fails at once (ENETUNREACH).
    blackhole: a veth link owns 10.254.254.0/24, so the SYN vanishes and
    only the timeout ends the attempt.  Nothing ever leaves the namespace.
    """
    ns = f"tpnbkt-{uuid.uuid4().hex[:6]}"
    kc = write_kubeconfig(tmp_path / "kc", "https://10.254.254.1:6443", pki, token="t")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        ex = ["ip", "netns", "exec", ns]
        subprocess.run(ex + ["ip", "link", "set", "lo", "up"], check=True)
        if mode == "blackhole":
            # a veth pair wholly inside the namespace; a permanent neighbour entry
            # so no ARP failure cuts the wait short: the SYN goes to v1 and dies
            for cmd in (["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
                        ["ip", "addr", "add", "10.254.254.2/24", "dev", "v0"],
                        ["ip", "link", "set", "v0", "up"], ["ip", "link", "set", "v1", "up"],
                        ["ip", "neigh", "add", "10.254.254.1", "lladdr", "02:00:00:00:00:01", "dev", "v0",
                         "nud", "permanent"]):
                subprocess.run(ex + cmd, check=True)
        t0 = time.monotonic()
        p = subprocess.run(ex + [sys.executable, "-c", _PROBE, str(kc), "3"], capture_output=True, text=True,
                           timeout=30, cwd=str(REPO), check=False)
        elapsed = time.monotonic() - t0
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert elapsed < 10 and out["elapsed"] < 10
    assert out["type"] == "ClusterError"
    assert "https://10.254.254.1:6443" in out["what"]
    if mode == "no-route":
        assert "Network is unreachable" in out["why"]
    else:
        assert "timed out" in out["why"] and 2.5 < out["elapsed"]


# ================================================ manager install (unit, fake API)
class FakeAPI:
    """In-memory stand-in for `kube.request`, enough for the manager's flow:
    server-side apply, GET/DELETE, pods by label, logs, namespace deletion.

    `scenario` decides what the manager pod does: ok | neverpull | crash | pending.
    """

    def __init__(self, scenario: str = "ok") -> None:
        self.scenario = scenario
        self.store: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.forbid: set[str] = set()
        self.ns_linger = 2  # GETs a deleted namespace survives

    def _pods_path(self, ns: str) -> str:
        return f"/api/v1/namespaces/{ns}/pods"

    def _make_pod(self, dep: dict[str, Any]) -> None:
        ns = dep["metadata"]["namespace"]
        image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
        name = f"traffic-manager-{uuid.uuid4().hex[:5]}"
        st: dict[str, Any] = {"phase": "Pending", "conditions": []}
        cs: dict[str, Any] = {"name": "manager", "ready": False, "restartCount": 0, "state": {}}
        if self.scenario == "ok":
            st = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
            cs["state"] = {"running": {}}
            dep["status"] = {"observedGeneration": dep["metadata"]["generation"], "replicas": 1,
                             "updatedReplicas": 1, "availableReplicas": 1, "readyReplicas": 1}
        elif self.scenario == "neverpull":
            cs["state"] = {"waiting": {"reason": "ErrImageNeverPull",
                                       "message": f'Container image "{image}" is not present with pull policy of Never'}}
        elif self.scenario == "crash":
            st["phase"] = "Running"
            cs["state"] = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s restarting"}}
            cs["lastState"] = {"terminated": {"exitCode": 3}}
        st["containerStatuses"] = [cs]
        pods = {p: o for p, o in self.store.items() if p.startswith(self._pods_path(ns) + "/")}
        for p in pods:
            del self.store[p]
        self.store[f"{self._pods_path(ns)}/{name}"] = {
            "metadata": {"name": name, "namespace": ns, "labels": dict(manager_install.SELECTOR),
                         "creationTimestamp": "2025-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "manager", "image": image}]},
            "status": st,
        }

    async def __call__(self, t: Any, method: str, path: str, *, query: Any = None, body: Any = None,
                       content_type: str | None = None, timeout: float | None = None,
                       accept_status: tuple[int, ...] = (), raw: bool = False) -> Any:
        from kubernetes.client import ApiException

        self.calls.append((method, path))
        if method == "POST" and path.endswith("/selfsubjectaccessreviews"):  # `kubectl auth can-i`
            res = body["spec"]["resourceAttributes"]["resource"]
            return {"status": {"allowed": res not in self.forbid}}
        for f in self.forbid:
            if f in path and method != "GET":
                raise ApiException(status=403, reason="Forbidden", body=json.dumps({
                    "message": f'{f} "x" is forbidden: User "carol" cannot create resource "{f}" in API group '
                               f'"rbac.authorization.k8s.io" at the cluster scope'}))
        if method == "GET" and path.endswith("/log"):
            return b"Traceback (most recent call last):\nRuntimeError: boom\n"
        if method == "GET" and path.endswith("/pods"):
            items = [o for p, o in self.store.items() if p.startswith(path + "/")]
            return {"items": items}
        if method == "GET":
            obj = self.store.get(path)
            if obj is None:
                raise ApiException(status=404, reason="Not Found", body='{"message": "not found"}')
            if obj["metadata"].get("deletionTimestamp"):
                self.ns_linger -= 1
                if self.ns_linger < 0:
                    self._purge(path)
                    raise ApiException(status=404, reason="Not Found", body='{"message": "not found"}')
            return json.loads(json.dumps(obj))
        if method == "PATCH":
            assert content_type == "application/apply-patch+yaml" and query["fieldManager"] == "tpnb"
            old = self.store.get(path)
            obj = json.loads(json.dumps(body))
            gen = (old or {}).get("metadata", {}).get("generation", 0)
            changed = old is None or old.get("spec") != obj.get("spec")
            obj["metadata"]["generation"] = gen + 1 if changed else gen
            self.store[path] = obj
            if obj["kind"] == "Deployment" and changed:
                self._make_pod(obj)
            return obj
        if method == "DELETE":
            if path not in self.store:
                raise ApiException(status=404, reason="Not Found", body='{"message": "not found"}')
            obj = self.store[path]
            if obj.get("kind") == "Namespace":
                obj["metadata"]["deletionTimestamp"] = "now"
            else:
                del self.store[path]
            if "/pods/" in path:  # the ReplicaSet makes a new one
                ns = obj["metadata"]["namespace"]
                dep = next((o for o in self.store.values()
                            if o.get("kind") == "Deployment" and o["metadata"].get("namespace") == ns), None)
                if dep is not None:
                    self._make_pod(dep)
            return {}
        raise AssertionError(f"unexpected {method} {path}")

    def _purge(self, ns_path: str) -> None:
        ns = ns_path.rsplit("/", 1)[1]
        for p in [p for p in self.store if p == ns_path or f"/namespaces/{ns}/" in p]:
            del self.store[p]


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> FakeAPI:
    from tpnb import config

    fake = FakeAPI()
    monkeypatch.setattr(manager_install, "request", fake)
    monkeypatch.setattr(manager_install.asyncio, "sleep", _fast_sleep)
    monkeypatch.setattr(config.get().timeouts, "rollout", 5.0)
    return fake


_real_sleep = asyncio.sleep


async def _fast_sleep(delay: float, result: Any = None) -> Any:
    return await _real_sleep(min(delay, 0.01), result)


IMG = "tpnb.local/tpnb:0.1.0-aaaa"
FAKE_T: Any = types.SimpleNamespace(server="https://fake:6443")


@pytest.mark.unit
async def test_ensure_manager_install_reuse_upgrade(fake_api: FakeAPI) -> None:
    lines: list[tuple[str, str, float]] = []
    h = await manager_install.ensure_manager(FAKE_T, IMG, lambda *a: lines.append(a))
    assert (h.namespace, h.version) == ("tpnb", "0.1.0-aaaa") and h.pod.startswith("traffic-manager-")
    assert lines[0][0] == "install" and lines[-1][0] == "ready" and lines[-1][2] == 1.0
    assert all(0 <= f <= 1 for _, _, f in lines)
    applied = [p for m, p in fake_api.calls if m == "PATCH"]
    assert len(applied) == 6 and applied[0] == "/api/v1/namespaces/tpnb"

    fake_api.calls.clear()
    h2 = await manager_install.ensure_manager(FAKE_T, IMG, lambda *a: lines.append(a))
    assert h2.pod == h.pod and not [c for c in fake_api.calls if c[0] != "GET"]  # reuse: nothing written

    lines.clear()
    h3 = await manager_install.ensure_manager(FAKE_T, IMG + "b", lambda *a: lines.append(a))
    assert h3.version == "0.1.0-aaaab" and h3.pod != h.pod
    assert lines[0][0] == "upgrade" and "0.1.0-aaaa -> 0.1.0-aaaab" in lines[0][1]
    assert await manager_install.find_manager_pod(FAKE_T) == h3.pod


@pytest.mark.unit
async def test_ensure_manager_image_missing_then_uninstall(fake_api: FakeAPI) -> None:
    fake_api.scenario = "neverpull"
    with pytest.raises(ClusterError) as ei:
        await manager_install.ensure_manager(FAKE_T, IMG, None)
    msg = str(ei.value)
    assert f"image {IMG} is not in the cluster (ErrImageNeverPull)" in msg
    # the first pod in back-off was replaced once (the image may have been loaded since it started)
    assert sum(1 for m, p in fake_api.calls if m == "DELETE" and "/pods/" in p) == 1
    assert "tpnb devcluster up" in msg and "kind load image-archive" in msg
    with pytest.raises(ClusterError, match="no ready traffic-manager pod"):
        await manager_install.find_manager_pod(FAKE_T)
    steps: list[str] = []
    await manager_install.uninstall_manager(FAKE_T, lambda s, m, f: steps.append(m))
    assert fake_api.store == {}  # namespace content and cluster RBAC gone
    assert steps[-1] == "traffic-manager removed"
    await manager_install.uninstall_manager(FAKE_T, None)  # idempotent


@pytest.mark.unit
async def test_ensure_manager_crashloop_and_timeout(fake_api: FakeAPI) -> None:
    fake_api.scenario = "crash"
    with pytest.raises(ClusterError) as ei:
        await manager_install.ensure_manager(FAKE_T, IMG, None)
    assert "keeps crashing (exit code 3)" in ei.value.what and "RuntimeError: boom" in ei.value.why
    fake_api.store.clear()
    fake_api.scenario = "pending"
    from tpnb import config

    config.get().timeouts.rollout = 0.3
    with pytest.raises(ClusterError) as ei:
        await manager_install.ensure_manager(FAKE_T, IMG, None)
    assert "did not become ready within 0.3s" in ei.value.what


@pytest.mark.unit
async def test_ensure_manager_rbac_denied(fake_api: FakeAPI) -> None:
    fake_api.forbid.add("clusterroles")
    with pytest.raises(PermissionDenied) as ei:
        await manager_install.ensure_manager(FAKE_T, IMG, None)
    # asked before anything is applied: nothing half-installed, and the admin's way named
    assert ei.value.what == "no traffic-manager in namespace tpnb, and you may not install one"
    assert "create clusterroles.rbac.authorization.k8s.io (cluster-wide)" in ei.value.why
    assert "helm install traffic-manager charts/traffic-manager -n tpnb" in ei.value.hint
    assert not [c for c in fake_api.calls if c[0] == "PATCH"]


# ================================================================ dev cluster
DEVCLUSTER_KUBECONFIG = Path("/var/lib/tpnb/devcluster/kubeconfig")
ECHO_IMAGE = "tpnb.local/echoserver:1.4"


@pytest.fixture
def in_cluster(request: pytest.FixtureRequest) -> KubeTarget | None:
    """The dev cluster's KubeTarget when running inside a laptop netns.

    Outside one, the test re-runs itself inside `tpnb-laptop` and this
    fixture yields None (the test body then returns at once).
    """
    if rerun_in_laptop(request, DEVCLUSTER_KUBECONFIG, timeout=900):
        return load_target(str(DEVCLUSTER_KUBECONFIG), None)
    return None


async def _images_on_node(t: KubeTarget) -> set[str]:
    nodes = await kube.request(t, "GET", "/api/v1/nodes")
    return {n for node in nodes["items"] for img in node.get("status", {}).get("images") or []
            for n in img.get("names") or []}


async def _wait_gone(t: KubeTarget, path: str, timeout: float = 120) -> None:
    from kubernetes.client import ApiException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await kube.request(t, "GET", path)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        await asyncio.sleep(1)
    raise AssertionError(f"{path} still exists after {timeout}s")


@pytest.fixture
async def echo_pod(in_cluster: KubeTarget | None):  # type: ignore[no-untyped-def]
    """(target, namespace) with a Ready echoserver pod "echo" in a fresh namespace."""
    t = in_cluster
    if t is None:
        yield None
        return
    if ECHO_IMAGE not in await _images_on_node(t):
        pytest.skip(f"{ECHO_IMAGE} is not imported into the dev cluster")
    ns = f"tpnb-kt-{uuid.uuid4().hex[:6]}"
    await kube.request(t, "POST", "/api/v1/namespaces",
                       body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    try:
        await kube.request(t, "POST", f"/api/v1/namespaces/{ns}/pods", body={
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "echo"},
            "spec": {"terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "echo", "image": ECHO_IMAGE, "imagePullPolicy": "IfNotPresent",
                                     "ports": [{"containerPort": 8080}]}]}})
        for _ in range(120):
            pod = await kube.request(t, "GET", f"/api/v1/namespaces/{ns}/pods/echo")
            if any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])):
                break
            await asyncio.sleep(1)
        else:
            raise AssertionError(f"echo pod not ready: {pod['status']}")
        yield t, ns
    finally:
        await kube.request(t, "DELETE", f"/api/v1/namespaces/{ns}")


async def _http_get(port: int, path: str) -> str:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: kt\r\nConnection: close\r\n\r\n".encode())
    await w.drain()
    data = await asyncio.wait_for(r.read(), 20)
    w.close()
    return data.decode()


@pytest.mark.cluster
async def test_cluster_reachable_and_subnets(in_cluster: KubeTarget | None) -> None:
    t = in_cluster
    if t is None:
        return
    from tpnb_devcluster import config

    dc = config.get()
    assert (await check_reachable(t, 10)).startswith("v1.")
    pods, services = await kube.cluster_subnets(t)
    # every node's pod subnet (node 1: node_pod_cidr, node i the i-th /24 after it), adjacent ones merged
    import ipaddress
    import re as _re
    import subprocess as _sp

    from tpnb_devcluster.manifests import node_pod_cidr
    names = [ln.split()[0] for ln in _sp.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()]
    n_nodes = sum(1 for n in names if _re.fullmatch(r"tpnb-node\d*", n))
    want = ipaddress.collapse_addresses(ipaddress.ip_network(node_pod_cidr(dc, i)) for i in range(1, n_nodes + 1))
    assert n_nodes >= 1 and pods == [str(net) for net in want], (n_nodes, pods)
    assert services == [dc.service_cidr]


@pytest.mark.cluster
async def test_cluster_check_reachable_rejections(in_cluster: KubeTarget | None, tmp_path: Path) -> None:
    """The real API server: its version with the user's credentials; a token it does not know is a 401 (so
    the token is sent: anonymous requests may read /version); a kubeconfig trusting another CA fails TLS."""
    t = in_cluster
    if t is None:
        return
    from tpnb_devcluster.binaries import k8s_version

    assert await check_reachable(t, 10) == k8s_version()
    dev_ca = (DEVCLUSTER_KUBECONFIG.parent / "pki" / "ca.crt").read_bytes()
    bad = load_target(str(write_kubeconfig(tmp_path / "kc-token", t.server, token="expired-token",
                                           ca_pem=dev_ca)), None)
    with pytest.raises(ClusterError) as ei:
        await check_reachable(bad, 10)
    assert "rejected your credentials" in str(ei.value) and "401" in str(ei.value), str(ei.value)
    other = load_target(str(write_kubeconfig(tmp_path / "kc-ca", t.server, PKI())), None)  # another CA
    with pytest.raises(ClusterError) as ei:
        await check_reachable(other, 10)
    hostport = t.server.split("://", 1)[1]
    assert "TLS verification" in str(ei.value) and hostport in str(ei.value), str(ei.value)
    assert "Traceback" not in str(ei.value)


@pytest.mark.cluster
@pytest.mark.parametrize("protocol", ["spdy", "websocket"])
async def test_cluster_portforward_echoserver(echo_pod: tuple[KubeTarget, str] | None, protocol: str) -> None:
    if echo_pod is None:
        return
    t, ns = echo_pod
    async with PortForward(t, ns, "echo", 8080, protocol) as pf:
        assert pf.protocol == protocol
        body = await _http_get(pf.local_port, "/kube-side?x=1")
        assert "CLIENT VALUES:" in body and "real path=/kube-side?x=1" in body
        # several connections at once, each its own WebSocket
        bodies = await asyncio.gather(*(_http_get(pf.local_port, f"/n{i}") for i in range(5)))
        assert all(f"real path=/n{i}" in b for i, b in enumerate(bodies))
    r, w = await open_stream(t, ns, "echo", 8080)
    w.write(b"GET /stream HTTP/1.1\r\nHost: kt\r\nConnection: close\r\n\r\n")
    await w.drain()
    assert "real path=/stream" in (await asyncio.wait_for(r.read(), 20)).decode()
    w.close()


@pytest.mark.cluster
@pytest.mark.parametrize("protocol", ["spdy", "websocket"])
async def test_cluster_portforward_errors(echo_pod: tuple[KubeTarget, str] | None, protocol: str) -> None:
    if echo_pod is None:
        return
    t, ns = echo_pod
    with pytest.raises(ClusterError) as ei:
        await PortForward(t, ns, "echo", 9999, protocol).start()
    assert "refused" in ei.value.why, str(ei.value)
    with pytest.raises(ClusterError) as ei:
        await PortForward(t, ns, "no-such-pod", 8080, protocol).start()
    assert "not found" in str(ei.value)


@pytest.fixture
def manager_ns(monkeypatch: pytest.MonkeyPatch) -> str:
    """A manager namespace of our own: the shared `tpnb` install is left alone."""
    from tpnb import config

    ns = f"tpnb-kt-mgr-{uuid.uuid4().hex[:6]}"
    monkeypatch.setattr(config.get().manager, "namespace", ns)
    monkeypatch.setattr(config.get().timeouts, "rollout", 150.0)
    return ns


async def _assert_uninstalled(t: KubeTarget, ns: str) -> None:
    from kubernetes.client import ApiException

    await _wait_gone(t, f"/api/v1/namespaces/{ns}", 5)
    for kind in ("clusterroles", "clusterrolebindings"):
        with pytest.raises(ApiException) as ei:
            await kube.request(t, "GET", f"/apis/rbac.authorization.k8s.io/v1/{kind}/"
                                         f"{manager_install.rbac_name(ns)}")
        assert ei.value.status == 404


@pytest.mark.cluster
async def test_cluster_manager_image_missing(in_cluster: KubeTarget | None, manager_ns: str) -> None:
    t = in_cluster
    if t is None:
        return
    image = "tpnb.local/tpnb:0.0.0-kube-side-missing"
    lines: list[tuple[str, str, float]] = []
    t0 = time.monotonic()
    try:
        with pytest.raises(ClusterError) as ei:
            await manager_install.ensure_manager(t, image, lambda *a: lines.append(a))
        assert time.monotonic() - t0 < 150
        assert f"image {image} is not in the cluster" in ei.value.what, str(ei.value)
        assert "tpnb devcluster up" in ei.value.hint
        assert lines and lines[0][0] == "install"
    finally:
        await manager_install.uninstall_manager(t, lambda *a: lines.append(a))
    await _assert_uninstalled(t, manager_ns)


@pytest.mark.cluster
async def test_cluster_manager_end_to_end(in_cluster: KubeTarget | None, manager_ns: str) -> None:
    """Install in a namespace of our own, reuse, talk gRPC over the port-forward, uninstall."""
    t = in_cluster
    if t is None:
        return
    from tpnb.imageref import default_image

    image = default_image()
    if image not in await _images_on_node(t):
        pytest.skip(f"tpnb image {image} is not imported into the dev cluster (tpnb devcluster up)")
    import grpc

    from tpnb.proto import tpnb_pb2, tpnb_pb2_grpc

    try:
        h = await manager_install.ensure_manager(t, image, None)
        assert h.namespace == manager_ns and h.version == image.split(":")[1]
        assert await manager_install.find_manager_pod(t) == h.pod
        h2 = await manager_install.ensure_manager(t, image, None)  # reuse
        assert h2.pod == h.pod
        async with PortForward(t, h.namespace, h.pod, 8081) as pf, \
                grpc.aio.insecure_channel(f"127.0.0.1:{pf.local_port}") as ch:
            info = await tpnb_pb2_grpc.ManagerStub(ch).Version(tpnb_pb2.Empty(), timeout=20)
        assert info.name == "traffic-manager"
    finally:
        await manager_install.uninstall_manager(t, None)
    await _assert_uninstalled(t, manager_ns)
