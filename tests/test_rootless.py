"""Rootless laptop mode end to end: a non-root user with no sudo, a real kernel, the real cluster.

The user (`tpnbrootless`, made here, no sudoers entry) runs in a laptop network
namespace of the dev cluster, as tests/test_process_split.py's users do.  A
notebook shaped like notebooks/quickstart.ipynb runs in a real kernel
(nbclient) as that user: `%tp connect --no-root`, `requests.get` of a Service
name, urllib, asyncio streams and a raw socket to a raw TCP port (the kernel's
own sockets through the connector), `curl` in a subprocess and a grpcio
client to a gRPC server in a pod (the proxy variables the kernel got), `%%tp intercept` answered from the kernel for a
pod's request, env and files of the pod, leave, quit.  Then the CLI:
`tpnb connect --no-root -- curl` and `eval "$(tpnb connect --no-root)"`.
Throughout, no tpnb process runs as root and the laptop's routes,
resolv.conf and nftables stay exactly as they were.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import nbformat
import pytest

from conftest import REPO, LaptopRunner
from run_notebook import tagged, text_of
from test_process_split import ECHO, UserLaptop, _ensure_user

pytestmark = pytest.mark.cluster

NS = "tprootless"
USER = "tpnbrootless"


def _tcp_objects() -> dict[str, Any]:
    labels = {"app": "rawtcp"}
    return {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "rawtcp"},
         "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
             "containers": [{"name": "tcp", "image": ECHO, "env": [{"name": "EXTRA_PORTS", "value": "7000"}],
                             "ports": [{"containerPort": 7000}]}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "rawtcp"},
         "spec": {"selector": labels, "ports": [{"name": "tcp", "port": 7000, "protocol": "TCP"}]}},
    ]}


@pytest.fixture(scope="module")
def user(devcluster: Any) -> Iterator[UserLaptop]:
    lap = LaptopRunner(devcluster, "rootless")
    lap.fresh_namespace(NS, timeout=120)
    lap.kubectl("-n", NS, "create", "deploy", "hello", f"--image={ECHO}")
    lap.kubectl("-n", NS, "expose", "deploy", "hello", "--port", "80", "--target-port", "8080")
    lap.kubectl("-n", NS, "apply", "-f", "-", input=json.dumps(_tcp_objects()))
    lap.kubectl("-n", NS, "rollout", "status", "deploy/hello", "--timeout=120s", timeout=150)
    lap.kubectl("-n", NS, "rollout", "status", "deploy/rawtcp", "--timeout=120s", timeout=150)
    u = UserLaptop(lap, _ensure_user(USER))
    assert u.run(["sudo", "-n", "true"], check=False).returncode != 0  # really no sudo
    try:
        yield u
    finally:
        u.run(["tpnb", "quit", "--daemon"], check=False)
        lap.drop_namespace(NS)


def _machine(u: UserLaptop) -> tuple[str, str, str]:
    """What system-wide outbound would change: routes, resolv.conf, nftables (read as root)."""
    routes = u.lap.run(["ip", "route", "show", "table", "all"]).stdout
    routes = "\n".join(sorted(ln for ln in routes.splitlines() if "fe80:" not in ln))
    return routes, u.lap.run(["cat", "/etc/resolv.conf"]).stdout, u.lap.run(["nft", "list", "ruleset"]).stdout


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


#: the kernel pauses here while the test (as root) looks at the laptop's processes
PROCS = """
import os, time
home = os.path.expanduser('~')
open(os.path.join(home, 'procs.ready'), 'w').close()
for _ in range(600):
    if os.path.exists(os.path.join(home, 'procs.checked')):
        break
    time.sleep(0.1)
print('PROCS CHECKED')
"""

CELLS = [
    ("load", "%load_ext tpnb"),
    ("connect", f"%tp connect --no-root --namespace {NS}"),
    ("requests", f"import requests\nprint('REQ', requests.get('http://hello.{NS}', timeout=20).text)"),
    # the kernel's own sockets, no proxy variables involved
    ("hooks", f"""
s = requests.Session(); s.trust_env = False
print('HOOKED', s.get('http://hello', timeout=20).text)
import urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({{}}))
print('URLLIB', opener.open('http://hello.{NS}.svc.cluster.local/u', timeout=20).read().decode())
"""),
    ("asyncio", f"""
import asyncio
async def talk():
    r, w = await asyncio.open_connection('rawtcp.{NS}', 7000)
    w.write(b'GET /async HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n'); await w.drain()
    data = await asyncio.wait_for(r.read(), 20)
    w.close()
    return data.decode()
print('ASYNC', await talk())
"""),
    ("socket", f"""
import socket
ip = socket.gethostbyname('rawtcp.{NS}')
t = socket.create_connection((socket.getaddrinfo('rawtcp.{NS}', 7000)[0][4][0], 7000), timeout=20)
t.sendall(b'GET /raw HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n'); t.shutdown(socket.SHUT_WR)
buf = b''
while chunk := t.recv(65536):
    buf += chunk
print('RAW', ip, buf.decode())
"""),
    ("curl", f"""
import subprocess
print('CURL', subprocess.run(['curl', '-sS', '--max-time', '20', 'http://hello.{NS}/curl'],
                             capture_output=True, text=True, timeout=30).stdout)
"""),
    # grpcio's C-core makes its own sockets (no hooks) but honours http(s)_proxy: a CONNECT through the proxy
    ("grpc", """
import grpc
from tpnb.proto import pb, rpc
with grpc.insecure_channel('traffic-manager.tpnb:8082') as ch:
    print('GRPC', rpc.AgentHubStub(ch).Version(pb.Empty(), timeout=30).version)
"""),
    ("intercept", f"""%%tp intercept hello --namespace {NS} --port 9000
def app(environ, start_response):
    body = b"hello from the rootless kernel\\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""),
    ("pod", f"""
import subprocess, time
code = "import urllib.request; print(urllib.request.urlopen('http://hello.{NS}', timeout=10).read().decode())"
def from_pod():
    return subprocess.run(['kubectl', '-n', '{NS}', 'exec', 'deploy/hello', '-c', 'traffic-agent', '--',
                           'python3', '-c', code], capture_output=True, text=True, timeout=60).stdout
print('POD', from_pod())
"""),
    ("env", f"""
env = %tp env hello
import tpnb.api
print('ENV', env['KUBERNETES_SERVICE_HOST'], env['HOSTNAME'].startswith('hello-'))
print('FILE', tpnb.api.Session().files('hello').read_text('/var/run/secrets/kubernetes.io/serviceaccount/namespace'))
"""),
    ("status", "%tp status"),
    ("procs", PROCS),
    ("leave", f"%tp leave hello\nprint('AFTER', from_pod())"),
    ("quit", "%tp quit --daemon"),
]


def test_a_user_without_root_runs_the_quickstart_rootless(user: UserLaptop) -> None:
    u = user
    u.run(["tpnb", "quit", "--daemon"], check=False)
    before = _machine(u)
    nb = nbformat.v4.new_notebook()
    for tag, src in CELLS:
        nb.cells.append(nbformat.v4.new_code_cell(src.strip("\n"), metadata={"tags": [tag]}))
    home = Path(u.pw.pw_dir)
    src, dst = home / "rootless.ipynb", home / "rootless.out.ipynb"
    nbformat.write(nb, src)
    import os

    os.chown(src, u.pw.pw_uid, u.pw.pw_gid)
    ready, checked = home / "procs.ready", home / "procs.checked"
    ready.unlink(missing_ok=True)
    checked.unlink(missing_ok=True)
    proc = subprocess.Popen(u.cmd([str(Path(REPO) / ".venv/bin/python"), str(REPO / "tests/run_notebook.py"),
                                   str(src), str(dst), "--timeout", "180"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs: dict[str, list[dict[str, Any]]] = {}
    try:
        _wait(lambda: ready.exists() or proc.poll() is not None, 400, "the notebook to reach its process check")
        procs = u.tpnb_processes()  # while the kernel is connected and intercepting
        checked.touch()
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    out = nbformat.read(dst, as_version=4)

    def text(tag: str) -> str:
        return text_of(tagged(out, tag), ("stdout", "stderr"))

    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + "".join(text(t) for t, _ in CELLS)
    assert "Connected to context" in text("connect"), text("connect")
    assert "outbound is rootless" in text("connect"), text("connect")
    assert "CLIENT VALUES" in text("requests") and f"hello.{NS}" in text("requests")
    assert "HOOKED CLIENT VALUES" in text("hooks") and "URLLIB CLIENT VALUES" in text("hooks"), text("hooks")
    assert "real path=/u" in text("hooks"), text("hooks")
    assert "ASYNC HTTP/1.0 200" in text("asyncio") and "real path=/async" in text("asyncio"), text("asyncio")
    assert "real path=/raw" in text("socket"), text("socket")
    assert "CURL CLIENT VALUES" in text("curl") and "real path=/curl" in text("curl"), text("curl")
    assert "GRPC 0." in text("grpc"), text("grpc")
    assert "POD hello from the rootless kernel" in text("pod"), text("pod")
    assert "ENV 10." in text("env") and "True" in text("env") and f"FILE {NS}" in text("env"), text("env")
    st = text("status")
    assert "Outbound         : not system-wide (rootless mode" in st, st
    assert "Rootless outbound: SOCKS5 + HTTP proxy on 127.0.0.1:" in st and "Not covered      : native" in st, st
    assert "PROCS CHECKED" in text("procs")
    # the kernel's connector, as the user; no root daemon, nothing of tpnb as root
    assert procs["daemon"] == [] and [p["uid"] for p in procs["connector"]] == [u.pw.pw_uid], procs
    assert "AFTER CLIENT VALUES" in text("leave"), text("leave")  # the app answers again
    assert _machine(u) == before  # routes, resolv.conf, nftables: untouched
    _wait(lambda: u.tpnb_processes() == {"connector": [], "daemon": []}, 10, "the connector to exit")


def test_connect_no_root_gives_commands_the_proxy(user: UserLaptop) -> None:
    u = user
    u.run(["tpnb", "quit", "--daemon"], check=False)
    before = _machine(u)
    # -- CMD: the variables are exported to it; curl resolves the name through SOCKS5 (socks5h)
    r = u.run(["tpnb", "connect", "--no-root", "--namespace", NS, "--", "sh", "-c",
               f"echo ALL=$ALL_PROXY; curl -sS --max-time 20 http://hello.{NS}/viacmd; "
               f"curl -sS --max-time 20 -p -x \"$HTTPS_PROXY\" http://hello/viaconnect"], timeout=180)
    assert "ALL=socks5h://tpnb:" in r.stdout, r.stdout + r.stderr
    assert "real path=/viacmd" in r.stdout and "real path=/viaconnect" in r.stdout, r.stdout + r.stderr
    # eval: stdout is nothing but export lines
    r = u.run(["sh", "-c", f"eval \"$(tpnb connect --no-root --namespace {NS})\" && "
               f"curl -sS --max-time 20 http://hello.{NS}/evald && echo NO=$NO_PROXY"], timeout=180)
    assert "real path=/evald" in r.stdout and "NO=localhost,127.0.0.1,::1" in r.stdout, r.stdout + r.stderr
    assert "Connected to context" in r.stderr
    doc = json.loads(u.run(["tpnb", "status", "-o", "json"]).stdout)
    assert doc["outbound"] is False and doc["outbound_mode"] == "rootless", doc
    assert doc["proxy_env"]["ALL_PROXY"].startswith("socks5h://tpnb:") and doc["outbound_not_covered"], doc
    # without the token the proxy refuses (another local user cannot use it)
    port = doc["proxy_http_url"].rsplit(":", 1)[1]
    r = u.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{port}",
               f"http://hello.{NS}/"], check=False)
    assert r.stdout == "407", r.stdout + r.stderr
    procs = u.tpnb_processes()
    assert procs["daemon"] == [] and [p["uid"] for p in procs["connector"]] == [u.pw.pw_uid]
    u.run(["tpnb", "quit", "--daemon"])
    assert _machine(u) == before
