"""Workload shapes (issue 12) end to end, with the real CLI in laptop `shapes`.

* A StatefulSet behind a Service with a named targetPort and a second port
  (`web`: http -> `http`, metrics -> 9090), a second Service selecting it
  (`web-internal`, numeric) and its governing headless Service (`web-hl`):
  the intercepted port goes to the laptop, through both Services; the other
  port stays the app's; `leave` gives each back to the app; re-intercepting
  the injected StatefulSet is quick (the CLI's wall time is printed); removing
  the agent restores every object.
* A pod with two containers: `--container` picks whose port, env and
  volumes are intercepted; a port no container declares is ambiguous and the
  error lists the containers; a wrong name lists them too.
* Shapes tpnb cannot intercept are refused naming why, before anything changes:
  hostNetwork pods, a Service without selector, a Service that is only
  headless, a bare Pod.

Traffic from inside the cluster comes from a plain client pod (the project image's python3).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import LaptopRunner

pytestmark = pytest.mark.cluster

NS = "tpshape"
ECHO = "tpnb.local/echoserver:1.4"

#: the laptop's server: answers on every port given, naming the port and path
SERVER = r'''
import http.server, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = f"served by the laptop on {self.server.server_port} {self.path}\n".encode()
        self.send_response(503 if self.path == "/ready" else 200)   # a probe that reached the laptop fails
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
servers = [http.server.ThreadingHTTPServer(("127.0.0.1", int(p)), H) for p in sys.argv[1:]]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
servers[0].serve_forever()
'''

#: GET each URL given from the client pod; prints one JSON list of bodies (or errors)
GET = r'''
import json, sys, urllib.request
out = []
for url in sys.argv[1:]:
    try:
        out.append(urllib.request.urlopen(url, timeout=10).read().decode())
    except Exception as exc:
        out.append(f"ERROR {exc}")
print(json.dumps(out))
'''


def _objects(image: str) -> list[dict[str, Any]]:
    def meta(name: str) -> dict[str, Any]:
        return {"name": name, "labels": {"app": name}}

    def tmpl(name: str, spec: dict[str, Any], replicas: int = 1) -> dict[str, Any]:
        return {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}},
                             "spec": {"terminationGracePeriodSeconds": 2, **spec}}}

    def svc(name: str, app: str, ports: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                "spec": {"selector": {"app": app}, "ports": ports, **spec}}

    web = {"name": "web", "image": ECHO, "env": [{"name": "EXTRA_PORTS", "value": "9090"}],
           "ports": [{"name": "http", "containerPort": 8080}, {"name": "metrics", "containerPort": 9090}],
           "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 2}}
    duo = [{"name": "echoserver", "image": ECHO, "env": [{"name": "WHO", "value": "echoserver"}],
            "ports": [{"name": "http", "containerPort": 8080}]},
           {"name": "sidecar", "image": image, "env": [{"name": "WHO", "value": "sidecar"},
                                                       {"name": "SIDECAR_ONLY", "value": "yes"}],
            "command": ["python3", "-m", "http.server", "7000"]}]   # port 7000 not declared
    sleeper = {"name": "main", "image": image, "command": ["sleep", "infinity"]}
    return [
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta("web"),
         "spec": {**tmpl("web", {"containers": [web]}), "serviceName": "web-hl"}},
        svc("web", "web", [{"name": "http", "port": 80, "targetPort": "http"},
                           {"name": "metrics", "port": 9090, "targetPort": 9090}]),
        svc("web-internal", "web", [{"port": 8080, "targetPort": 8080}]),
        svc("web-hl", "web", [{"name": "http", "port": 8080}], clusterIP="None"),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-manual"},   # no selector
         "spec": {"ports": [{"port": 80, "targetPort": 8080}]}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("duo"), "spec": tmpl("duo", {"containers": duo})},
        svc("duo", "duo", [{"name": "http", "port": 80, "targetPort": "http"},
                           {"name": "admin", "port": 7000, "targetPort": 7000}]),
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("hostnet"),
         "spec": tmpl("hostnet", {"containers": [sleeper], "hostNetwork": True})},
        svc("hostnet", "hostnet", [{"port": 80, "targetPort": 8080}]),
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("hlonly"),
         "spec": tmpl("hlonly", {"containers": [{"name": "app", "image": ECHO, "readinessProbe": {
             "httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 1, "failureThreshold": 2}}]})},
        svc("hlonly", "hlonly", [{"port": 8080}], clusterIP="None"),
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
         "spec": {"containers": [{**sleeper, "name": "client"}], "terminationGracePeriodSeconds": 1}},
    ]


@pytest.fixture(scope="module")
def shapes(devcluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from tpnb.imageref import default_image

    lap = LaptopRunner(devcluster, "shapes")
    lap.fresh_namespace(NS)
    lap.kubectl("-n", NS, "apply", "-f", "-",
                input=json.dumps({"apiVersion": "v1", "kind": "List", "items": _objects(default_image())}))
    lap.kubectl("-n", NS, "rollout", "status", "statefulset/web", "--timeout=180s", timeout=200)
    for d in ("duo", "hostnet", "hlonly"):
        lap.kubectl("-n", NS, "rollout", "status", f"deploy/{d}", "--timeout=180s", timeout=200)
    lap.kubectl("-n", NS, "wait", "--for=condition=Ready", "pod/client", "--timeout=180s", timeout=200)
    d = tmp_path_factory.mktemp("shapes")
    os.chmod(d, 0o755)
    (d / "srv.py").write_text(SERVER)
    server = subprocess.Popen(lap.cmd(["python3", str(d / "srv.py"), "9400", "9401"]), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lap.run(["tpnb", "connect", "--namespace", NS], timeout=180)
        yield {"lap": lap, "dir": d}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)
        lap.drop_namespace(NS)


def _get(lap: LaptopRunner, *urls: str) -> list[str]:
    r = lap.kubectl("-n", NS, "exec", "-i", "client", "--", "python3", "-", *urls, input=GET, timeout=120)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _intercept(lap: LaptopRunner, *args: str, check: bool = True) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    r = lap.run(["tpnb", "intercept", *args, "--mount=false"], check=check, timeout=300)
    return r, time.monotonic() - t0


def _user_view(lap: LaptopRunner, kinds: str) -> list[dict[str, Any]]:
    """The objects as their author wrote them (what the API server and controllers own dropped)."""
    doc = json.loads(lap.kubectl("-n", NS, "get", kinds, "-o", "json").stdout)
    items = doc["items"] if "items" in doc else [doc]
    for it in items:
        md = it["metadata"]
        for k in ("resourceVersion", "generation", "managedFields", "uid", "creationTimestamp"):
            md.pop(k, None)
        anns = {k: v for k, v in (md.get("annotations") or {}).items()
                if k not in ("deployment.kubernetes.io/revision", "kubectl.kubernetes.io/last-applied-configuration")}
        md["annotations"] = anns
        it.pop("status", None)
    return sorted(items, key=lambda o: (o["kind"], o["metadata"]["name"]))


def test_statefulset_multi_port_several_services_and_quick_reintercept(shapes: dict[str, Any]) -> None:
    lap = shapes["lap"]
    before = _user_view(lap, "statefulset,svc")
    app, laptop = "CLIENT VALUES:", "served by the laptop on 9400"
    urls = [f"http://web.{NS}/a", f"http://web.{NS}:9090/b", f"http://web-internal.{NS}:8080/c",
            f"http://web-0.web-hl.{NS}:8080/d"]   # the governing headless Service: the pod's own IP
    assert [app in b for b in _get(lap, *urls)] == [True] * 4

    r, first = _intercept(lap, "web", "--port", "9400:http")
    assert "State         : ACTIVE" in r.stdout and "Service       : web" in r.stdout, r.stdout
    print(f"\nfirst intercept of StatefulSet web (agent injection + rollout): {first:.2f} s")
    # the intercepted port (through both Services reaching it) to the laptop, the other port to the app
    a, b, c, d = _get(lap, *urls)
    assert a == f"{laptop} /a\n" and app in b and c == f"{laptop} /c\n" and d == f"{laptop} /d\n", (a, b, c, d)
    assert "client_address=127.0.0.1" not in b   # port 9090 is not the agent's at all

    lap.run(["tpnb", "leave", "web"])
    got = _get(lap, *urls)
    assert [app in x for x in got] == [True] * 4, got
    assert "client_address=127.0.0.1" in got[0] and "client_address=127.0.0.1" in got[3]   # via the agent

    # again, the agent already in: no rollout, no waiting for endpoints
    times = []
    for _ in range(3):
        r, dt = _intercept(lap, "web", "--port", "9400:http")
        times.append(dt)
        assert "Waiting for Service" not in r.stderr, r.stderr
        a, b, c, d = _get(lap, *urls)   # the first request after intercept returns is already intercepted
        assert a == f"{laptop} /a\n" and app in b and c == f"{laptop} /c\n" and d == f"{laptop} /d\n", (a, b, c, d)
        lap.run(["tpnb", "leave", "web"])
    print(f"re-intercept of the injected StatefulSet (CLI wall time): {', '.join(f'{t:.2f}' for t in times)} s")
    assert max(times) < 5, times
    assert [app in x for x in _get(lap, *urls)] == [True] * 4

    lap.run(["tpnb", "uninstall", "--agent", "web"], timeout=300)
    assert _user_view(lap, "statefulset,svc") == before


def test_container_picks_whose_port_env_and_volumes(shapes: dict[str, Any]) -> None:
    lap, d = shapes["lap"], shapes["dir"]
    before = _user_view(lap, "deploy/duo")
    r, _ = _intercept(lap, "duo", "--port", "9401:admin", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "no container declares port 7000, and the pod has several: echoserver, sidecar" in r.stderr, r.stderr
    assert "--container" in r.stderr
    r, _ = _intercept(lap, "duo", "--port", "9401:admin", "--container", "nope", check=False)
    assert r.returncode != 0 and "has no container 'nope'" in r.stderr and "echoserver, sidecar" in r.stderr, r.stderr
    r, _ = _intercept(lap, "duo", "--port", "9401:http", "--container", "sidecar", check=False)
    assert r.returncode != 0 and "container echoserver's, not sidecar's" in r.stderr, r.stderr
    assert _user_view(lap, "deploy/duo") == before   # nothing changed by the refusals

    env_file = d / "duo-env.json"
    _intercept(lap, "duo", "--port", "9401:admin", "--container", "sidecar", "--env-json", str(env_file))
    env = json.loads(env_file.read_text())
    assert env["WHO"] == "sidecar" and env["SIDECAR_ONLY"] == "yes", env
    a, b = _get(lap, f"http://duo.{NS}:7000/x", f"http://duo.{NS}/y")
    assert a == "served by the laptop on 9401 /x\n" and "CLIENT VALUES:" in b, (a, b)
    lap.run(["tpnb", "leave", "duo"])
    a, b = _get(lap, f"http://duo.{NS}:7000/", f"http://duo.{NS}/")
    assert "Directory listing" in a and "CLIENT VALUES:" in b, (a, b)   # the sidecar's own server again

    # the other container, by its declared port: its env now
    _intercept(lap, "duo", "--port", "9401:http", "--env-json", str(env_file))
    env = json.loads(env_file.read_text())
    assert env["WHO"] == "echoserver" and "SIDECAR_ONLY" not in env, env
    a, b = _get(lap, f"http://duo.{NS}/y", f"http://duo.{NS}:7000/")
    assert a == "served by the laptop on 9401 /y\n" and "Directory listing" in b, (a, b)
    lap.run(["tpnb", "leave", "duo"])
    lap.run(["tpnb", "uninstall", "--agent", "duo"], timeout=300)
    assert _user_view(lap, "deploy/duo") == before


def test_unsupported_shapes_are_refused_naming_why(shapes: dict[str, Any]) -> None:
    lap = shapes["lap"]
    before = _user_view(lap, "deploy,statefulset,svc")
    cases = [
        (["hostnet"], "its pods use hostNetwork"),
        (["web", "--service", "web-manual"], "Service web-manual has no selector"),
        (["client"], "cannot intercept Pod client"),
    ]
    for args, needle in cases:
        t0 = time.monotonic()
        r = lap.run(["tpnb", "intercept", *args, "--port", "9402", "--mount=false", "--", "true"],
                    check=False, timeout=120)
        assert r.returncode != 0, args
        assert needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert time.monotonic() - t0 < 30, args
    assert _user_view(lap, "deploy,statefulset,svc") == before


def test_headless_service_reaches_the_laptop_by_pod_ip(shapes: dict[str, Any]) -> None:
    """clusterIP: None: clients connect to the pod IP and the app's port; the agent takes them there."""
    lap = shapes["lap"]
    before = _user_view(lap, "deploy/hlonly")
    url = f"http://hlonly.{NS}:8080/h"   # resolves to the pod's IP
    r, _ = _intercept(lap, "hlonly", "--port", "9400")
    assert "Service       : hlonly" in r.stdout, r.stdout
    pods = [p for p in json.loads(lap.kubectl("-n", NS, "get", "pod", "-l", "app=hlonly", "-o", "json").stdout)["items"]
            if not p["metadata"].get("deletionTimestamp")]
    init = [(c["name"], c["state"].get("terminated", {}).get("exitCode")) for p in pods
            for c in p["status"].get("initContainerStatuses") or []]
    assert init == [("tpnb-agent-init", 0)], init   # the redirect was in place before the app started
    a, = _get(lap, url)
    assert a == "served by the laptop on 9400 /h\n", a
    # the node's own traffic (the kubelet's probes, GET /ready on 8080 every second; the laptop would
    # answer 503) is not redirected: the pod stays ready while intercepted
    time.sleep(4)
    ready = lap.kubectl("-n", NS, "get", "pod", "-l", "app=hlonly", "-o",
                        "jsonpath={.items[0].status.containerStatuses[*].ready}").stdout
    assert ready == "true true", ready
    lap.run(["tpnb", "leave", "hlonly"])
    a, = _get(lap, url)
    assert "CLIENT VALUES:" in a and "client_address=127.0.0.1" in a, a   # the app, through the agent
    lap.run(["tpnb", "uninstall", "--agent", "hlonly"], timeout=300)
    assert _user_view(lap, "deploy/hlonly") == before
    a, = _get(lap, url)
    assert "CLIENT VALUES:" in a and "client_address=127.0.0.1" not in a, a
