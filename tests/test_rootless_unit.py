"""The rootless proxy (connector/proxy.py) against real clients on loopback.

A loopback HTTP server plays the cluster: the proxy's route sends "cluster"
names and addresses to it, exactly where the connector would open a tunnel
through the manager.  Clients are real: curl (SOCKS5 with remote DNS, HTTP
forwarding, CONNECT), and Python's own http.client through CONNECT.
"""
from __future__ import annotations

import asyncio
import http.server
import socket
import subprocess
import threading
from typing import Iterator

import pytest

from tpnb import render, rootless
from tpnb.api import Status
from tpnb.connector.clusterdns import cluster_names
from tpnb.connector.proxy import OutboundProxy, Refused, Route, _direct

pytestmark = pytest.mark.unit

CLUSTER_IP = "10.43.7.7"


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = f"cluster says hi to {self.path} host={self.headers.get('Host')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture
def proxy() -> Iterator[tuple[OutboundProxy, dict[str, int]]]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    backend = httpd.server_address[1]
    seen: dict[str, int] = {}

    async def tunnel(ip: str, port: int):
        seen[f"{ip}:{port}"] = seen.get(f"{ip}:{port}", 0) + 1
        if port != 80:
            raise Refused(f"{ip}:{port}: connection refused", 5)
        return await _direct("127.0.0.1", backend)

    async def resolve(name: str):
        if name in ("hello.default", "hello"):
            return [CLUSTER_IP]
        if name.endswith(".default"):
            return []  # a cluster-looking name the cluster does not know
        return None

    loop = asyncio.new_event_loop()
    p = OutboundProxy(Route(tunnel=tunnel, resolve=resolve, in_cluster=lambda ip: ip.startswith("10.43.")),
                      token="s3cret")
    loop.run_until_complete(p.start())
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    yield p, seen
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)
    httpd.shutdown()


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=20)


def test_socks5_with_remote_dns_reaches_a_cluster_name(proxy) -> None:
    p, seen = proxy
    r = _curl("-x", p.urls()["socks"], "http://hello.default/x")
    assert r.returncode == 0, r.stderr
    assert "cluster says hi to /x host=hello.default" in r.stdout
    assert seen == {f"{CLUSTER_IP}:80": 1}


def test_http_forwarding_and_connect(proxy) -> None:
    p, seen = proxy
    r = _curl("-x", p.urls()["http"], "http://hello.default/plain?q=1")
    assert r.returncode == 0, r.stderr
    assert "cluster says hi to /plain?q=1 host=hello.default" in r.stdout  # origin-form on the wire
    r = _curl("-p", "-x", p.urls()["http"], f"http://{CLUSTER_IP}/tunnelled")
    assert r.returncode == 0, r.stderr
    assert "cluster says hi to /tunnelled" in r.stdout
    assert seen == {f"{CLUSTER_IP}:80": 2}


def test_the_token_is_required(proxy) -> None:
    p, seen = proxy
    port = p.port
    r = _curl("-x", f"http://127.0.0.1:{port}", "-o", "/dev/null", "-w", "%{http_code}", "http://hello.default/")
    assert r.stdout == "407"
    r = _curl("-x", f"http://tpnb:wrong@127.0.0.1:{port}", "-o", "/dev/null", "-w", "%{http_code}",
              "http://hello.default/")
    assert r.stdout == "407"
    r = _curl("-x", f"socks5h://127.0.0.1:{port}", "http://hello.default/")
    assert r.returncode != 0
    r = _curl("-x", f"socks5h://tpnb:wrong@127.0.0.1:{port}", "http://hello.default/")
    assert r.returncode != 0
    assert seen == {}  # nothing was ever tunnelled for them


def test_unknown_cluster_names_and_refused_ports_fail_fast(proxy) -> None:
    p, seen = proxy
    r = _curl("-x", p.urls()["socks"], "http://nosuch.default/")
    assert r.returncode == 97, (r.returncode, r.stderr)  # curl: "proxy handshake error" (SOCKS5 host unreachable)
    r = _curl("-x", p.urls()["http"], "-o", "/dev/null", "-w", "%{http_code}", "http://hello.default:81/")
    assert r.stdout == "502"
    assert seen == {f"{CLUSTER_IP}:81": 1}


def test_not_cluster_destinations_go_direct(proxy) -> None:
    """A loopback listener stands for 'not the cluster' (no traffic leaves the machine)."""
    p, seen = proxy
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]

    def answer() -> None:
        c, _ = srv.accept()
        c.recv(4096)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\ndirect")
        c.close()

    threading.Thread(target=answer, daemon=True).start()
    r = _curl("-x", p.urls()["socks"], f"http://127.0.0.1:{port}/")
    srv.close()
    assert r.stdout == "direct", r.stderr
    assert seen == {}


def test_cluster_name_rules() -> None:
    ns = {"default", "tpnb"}
    assert cluster_names("hello", "cluster.local", ns, ["default"]) == ["hello.default.svc.cluster.local"]
    assert cluster_names("hello.default", "cluster.local", ns, []) == ["hello.default.svc.cluster.local"]
    assert cluster_names("hello.default.svc", "cluster.local", ns, []) == ["hello.default.svc.cluster.local"]
    assert cluster_names("x.y.svc.cluster.local.", "cluster.local", ns, []) == ["x.y.svc.cluster.local"]
    assert cluster_names("example.com", "cluster.local", ns, ["default"]) is None
    assert cluster_names("localhost", "cluster.local", ns, ["default"]) is None
    assert cluster_names("10.0.0.1", "cluster.local", ns, ["default"]) is None


def test_status_and_env_words() -> None:
    st = Status(connected=True, context="dev", server="https://10.0.0.1:6443", outbound=False,
                outbound_note="rootless mode (--no-root): no root daemon", outbound_mode="rootless",
                proxy_socks_url="socks5h://tpnb:t@127.0.0.1:4000", proxy_http_url="http://tpnb:t@127.0.0.1:4000",
                outbound_not_covered=rootless.NOT_COVERED)
    env = rootless.proxy_env(st)
    assert env["ALL_PROXY"] == env["all_proxy"] == "socks5h://tpnb:t@127.0.0.1:4000"
    assert env["HTTPS_PROXY"] == env["http_proxy"] == "http://tpnb:t@127.0.0.1:4000"
    assert "127.0.0.1" in env["NO_PROXY"].split(",")
    text = render.status_text(st)
    assert "Outbound         : not system-wide (rootless mode" in text
    assert "SOCKS5 + HTTP proxy on 127.0.0.1:4000" in text
    assert "Not covered      : native clients" in text
    lines = rootless.export_lines(env).splitlines()
    assert "export ALL_PROXY=socks5h://tpnb:t@127.0.0.1:4000" in lines


class _FakeConnector:
    """Stands in for the connector's two RPCs the hooks use; the 'cluster' is a loopback server."""

    def __init__(self, backend: int) -> None:
        self.backend, self.forwards = backend, []

    def stub(self) -> "_FakeConnector":
        return self

    def ResolveName(self, req, timeout=None):  # noqa: N802, ANN001
        from tpnb.proto import pb

        if req.name in ("hello", "hello.default"):
            return pb.ResolveReply(cluster_name=True, ips=[CLUSTER_IP], subnets=["10.43.0.0/16"])
        if req.name.endswith(".default"):
            return pb.ResolveReply(cluster_name=True, subnets=["10.43.0.0/16"])
        return pb.ResolveReply(cluster_name=False, subnets=["10.43.0.0/16"])

    def ForwardToCluster(self, req, timeout=None):  # noqa: N802, ANN001
        from tpnb.proto import pb

        self.forwards.append((req.ip, req.port))
        return pb.ForwardReply(local_port=self.backend)


def test_in_process_hooks_route_python_clients(monkeypatch) -> None:
    import os
    import urllib.request

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    fake = _FakeConnector(httpd.server_address[1])

    class _S:
        client = fake

    st = Status(connected=True, proxy_socks_url="socks5h://tpnb:t@127.0.0.1:1", proxy_http_url="http://tpnb:t@127.0.0.1:1",
                pod_subnets=["10.43.0.0/16"])
    orig = socket.getaddrinfo
    for k in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(k, raising=False)
    try:
        assert rootless.enable_in_process(_S(), st)
        assert os.environ["http_proxy"] == "http://tpnb:t@127.0.0.1:1"
        assert socket.gethostbyname("hello.default") == CLUSTER_IP
        assert socket.getaddrinfo("hello", 80, 0, socket.SOCK_STREAM)[0][4] == (CLUSTER_IP, 80)
        with pytest.raises(socket.gaierror):
            socket.getaddrinfo("nosuch.default", 80)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        assert "cluster says hi to /u host=hello.default" in opener.open("http://hello.default/u", timeout=5).read().decode()

        async def streams() -> bytes:
            r, w = await asyncio.open_connection("hello", 80)
            w.write(b"GET /a HTTP/1.0\r\nHost: hello\r\n\r\n")
            data = await r.read()
            w.close()
            return data

        assert b"cluster says hi to /a" in asyncio.run(streams())
        t = socket.create_connection((CLUSTER_IP, 80), timeout=5)
        t.sendall(b"GET /raw HTTP/1.0\r\n\r\n")
        assert b"cluster says hi to /raw" in t.makefile("rb").read()
        t.close()
        assert set(fake.forwards) == {(CLUSTER_IP, 80)}  # one forward per destination, reused
    finally:
        rootless.disable_in_process()
        httpd.shutdown()
    assert socket.getaddrinfo is orig and "http_proxy" not in os.environ


def test_cluster_names_ask_the_cluster_with_a_real_dns_message() -> None:
    """The lookup gets exactly what goes into Manager.LookupDNS (a protobuf bytes field)."""
    from dnslib import RR, A, DNSRecord

    from tpnb.connector.clusterdns import ClusterNames
    from tpnb.proto import pb

    asked: list[str] = []

    async def lookup(query: bytes) -> bytes:
        msg = pb.DNSRequest(session_id="s", query=query)  # raises for anything but bytes
        q = DNSRecord.parse(msg.query)
        name = str(q.q.qname).rstrip(".")
        asked.append(name)
        reply = q.reply()
        if name == "hello.default.svc.cluster.local":
            reply.add_answer(RR(q.q.qname, rdata=A("10.43.0.10"), ttl=5))
        else:
            reply.header.rcode = 3
        return bytes(reply.pack())

    names = ClusterNames(lookup, lambda: "cluster.local", lambda: {"default"}, lambda: ["tpnb", "default"])
    assert asyncio.run(names.resolve("hello")) == ["10.43.0.10"]
    assert asked == ["hello.tpnb.svc.cluster.local", "hello.default.svc.cluster.local"]
    assert asyncio.run(names.resolve("nosuch.default")) == []
    assert asyncio.run(names.resolve("example.com")) is None

    async def broken(query: bytes) -> bytes:
        raise ConnectionError("link down")

    with pytest.raises(LookupError, match="link down"):
        asyncio.run(ClusterNames(broken, lambda: "cluster.local", lambda: set(), lambda: ["d"]).resolve("x"))
