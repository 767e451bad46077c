"""Intercepts where Pod Security `restricted` is enforced and the app runs as a
non-root uid the image does not know (issue 11), and admission refusals.

Unit (needs root for setpriv): sftp-server as a uid without a passwd entry
exits at once ("No user found"; the laptop saw "Connection reset by peer"),
and runs under the agent's nss_wrapper spawn.

Cluster: namespace `tppss` enforces `restricted`; a Deployment and a
StatefulSet of the project image (it has python3 and sh, unlike the
echoserver) run as uid 10001 with a ConfigMap and an emptyDir.  Each is
intercepted from a laptop: a request through the Service reaches the laptop's
server, the env is exactly what `kubectl exec` shows (PYTHONPATH and PATH
come from the image, so the agent read /proc/<pid>/environ, not its fallback
copies), the volumes are read through sshfs and through the FUSE-less API.
Namespace `tppssq` has a ResourceQuota that demands cpu limits, which the
agent does not set: `intercept` fails within 10 s with the quota's message
and the workload's spec is unchanged.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
UID = 10001

# ====================================================================== unit: sftp-server as a foreign uid

_PROBE = textwrap.dedent("""\
    import importlib.util, json, socket, subprocess, sys
    def load(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    sftp = load("sftp", sys.argv[1])
    remotefs = load("remotefs", sys.argv[2])
    root, wrapped = sys.argv[3], sys.argv[4] == "1"
    ours, theirs = socket.socketpair()
    kw = sftp.spawn_kwargs(root) if wrapped else {}
    proc = subprocess.Popen(sftp.server_argv(root), stdin=theirs, stdout=theirs, stderr=subprocess.PIPE, **kw)
    theirs.close()
    try:
        fs = remotefs.RemoteFS("local", 0, prefix=root, sock=ours)
        out = {"ok": True, "text": fs.read_text("/etc/config/COLOR"), "ls": fs.listdir("/")}
        fs.close()
    except Exception as exc:
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        ours.close()
    proc.wait(10)
    out["stderr"] = proc.stderr.read().decode()
    print(json.dumps(out))
    """)


@pytest.mark.unit
def test_sftp_server_runs_as_a_uid_without_a_passwd_entry() -> None:
    import pwd

    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.access(SFTP_SERVER, os.X_OK):
        pytest.skip("needs root, setpriv and sftp-server (scripts/install-deps)")
    if not list(Path("/usr/lib").glob("*/libnss_wrapper.so")):
        pytest.skip("libnss-wrapper is not installed (scripts/install-deps installs it)")
    with pytest.raises(KeyError):
        pwd.getpwuid(UID)
    work = Path(tempfile.mkdtemp(prefix="tpnb-pss-"))
    try:
        os.chmod(work, 0o755)
        (work / "volumes" / "etc" / "config").mkdir(parents=True)
        (work / "volumes" / "etc" / "config" / "COLOR").write_text("blue")
        for rel, src in (("sftp.py", REPO / "cluster" / "sftp.py"), ("remotefs.py", REPO / "tpnb" / "remotefs.py"),
                         ("probe.py", None)):
            dst = work / rel
            dst.write_text(src.read_text() if src else _PROBE)
            dst.chmod(0o644)
        python = "/usr/bin/python3"  # the venv's interpreter may live where uid 10001 cannot read

        def probe(wrapped: bool) -> dict[str, Any]:
            r = subprocess.run(["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", python,
                                str(work / "probe.py"), str(work / "sftp.py"), str(work / "remotefs.py"),
                                str(work / "volumes"), "1" if wrapped else "0"],
                               capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
            assert r.returncode == 0, r.stderr
            return dict(json.loads(r.stdout.strip().splitlines()[-1]))

        plain = probe(False)  # what the agent did before: the laptop's mount was reset
        assert not plain["ok"] and f"No user found for uid {UID}" in plain["stderr"], plain
        wrapped = probe(True)
        assert wrapped["ok"] and wrapped["text"] == "blue" and wrapped["ls"] == ["etc"], wrapped
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.unit
def test_passwd_lines_for_a_foreign_uid() -> None:
    from tpnb.cluster import sftp

    base_pw, base_gr = "root:x:0:0:root:/root:/bin/bash\n", "root:x:0:\n"
    pw, gr = sftp.passwd_with(10001, 10001, "/tpnb/volumes", base_pw, base_gr)
    assert pw == base_pw + "tpnb-agent:x:10001:10001:tpnb traffic-agent:/tpnb/volumes:/usr/sbin/nologin\n"
    assert gr == base_gr + "tpnb-agent:x:10001:\n"
    assert sftp.passwd_with(0, 0, "/", base_pw, base_gr) == (base_pw, base_gr)  # known ids: unchanged
    assert sftp.passwd_with(5, 0, "/", "root:x:0:0::/:/bin/sh", base_gr)[0].count("\n") == 2


@pytest.mark.unit
def test_refusal_messages_and_server_times() -> None:
    from tpnb.connector import agent_injector as inj

    assert inj._REFUSED.search('pods "a" is forbidden: failed quota: q: must specify limits.cpu for: traffic-agent')
    assert inj._REFUSED.search('pods "a" is forbidden: violates PodSecurity "restricted:latest": ...')
    assert not inj._REFUSED.search("Timeout: request did not complete within requested timeout")
    obj = {"metadata": {"managedFields": [
        {"operation": "Update", "time": "2025-01-02T03:04:05Z"},
        {"operation": "Update", "time": "2025-01-02T03:04:09Z", "subresource": "status"},
        {"operation": "Apply", "time": "2025-01-02T03:04:07Z"}]}}
    assert inj.changed_at(obj) == "2025-01-02T03:04:09"
    assert inj._event_time({"eventTime": "2025-01-02T03:04:06.123456Z"}) == "2025-01-02T03:04:06"
    assert inj._event_time({"lastTimestamp": "2025-01-02T03:04:06Z",
                            "series": {"lastObservedTime": "2025-01-02T03:05:00.000001Z"}}) == "2025-01-02T03:05:00"


# ====================================================================== cluster

NS = "tppss"
NSQ = "tppssq"
LAPTOP = "pss"
RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                  "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _workload(kind: str, name: str, image: str, resources: dict[str, Any] | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "app", "image": image, "imagePullPolicy": "IfNotPresent",
        "command": ["python3", "-m", "http.server", "8080"], "workingDir": "/data",
        "ports": [{"containerPort": 8080}],
        "env": [{"name": "LITERAL", "value": f"a literal of {name}"},
                {"name": "CFG_COLOR", "valueFrom": {"configMapKeyRef": {"name": "appcfg", "key": "COLOR"}}}],
        "securityContext": RESTRICTED_CONTAINER,
        "volumeMounts": [{"name": "config", "mountPath": "/etc/config"}, {"name": "scratch", "mountPath": "/data"}],
    }
    if resources:
        container["resources"] = resources
    spec: dict[str, Any] = {
        "selector": {"matchLabels": {"app": name}},
        "template": {"metadata": {"labels": {"app": name}}, "spec": {
            "securityContext": RESTRICTED_POD, "terminationGracePeriodSeconds": 2,
            "containers": [container],
            "volumes": [{"name": "config", "configMap": {"name": "appcfg"}}, {"name": "scratch", "emptyDir": {}}]}}}
    if kind == "StatefulSet":
        spec["serviceName"] = name
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def _manifest(image: str, resources: dict[str, Any] | None = None) -> dict[str, Any]:
    items: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "appcfg"},
         "data": {"COLOR": "blue", "app.yaml": "greeting: hello\n"}}]
    for kind, name in (("Deployment", "web"), ("StatefulSet", "db")):
        items.append(_workload(kind, name, image, resources))
        items.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                      "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}})
    return {"apiVersion": "v1", "kind": "List", "items": items}


def _namespace(lap: Any, ns: str, labels: dict[str, str]) -> None:
    lap.run(["tpnb", "quit", "--daemon"], check=False)
    lap.kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=true", timeout=180)
    lap.kubectl("apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}))


def _rolled_out(lap: Any, ns: str) -> None:
    lap.kubectl("-n", ns, "rollout", "status", "deploy/web", "--timeout=120s", timeout=150)
    lap.kubectl("-n", ns, "rollout", "status", "statefulset/db", "--timeout=120s", timeout=150)


@pytest.fixture(scope="module")
def lap(devcluster: Any) -> Iterator[Any]:
    from conftest import LaptopRunner
    from tpnb.imageref import default_image

    lap = LaptopRunner(devcluster, LAPTOP)
    _namespace(lap, NS, {"pod-security.kubernetes.io/enforce": "restricted",
                         "pod-security.kubernetes.io/enforce-version": "latest"})
    lap.kubectl("-n", NS, "apply", "-f", "-", input=json.dumps(_manifest(default_image())))
    _rolled_out(lap, NS)
    yield lap
    lap.drop_namespace(NS)
    lap.kubectl("delete", "ns", NSQ, "--ignore-not-found", "--wait=false", check=False)


def _pod_of(lap: Any, ns: str, app: str) -> dict[str, Any]:
    out = lap.kubectl("-n", ns, "get", "pod", "-l", f"app={app}", "-o", "json").stdout
    pods = [p for p in json.loads(out)["items"]
            if not p["metadata"].get("deletionTimestamp") and p["status"].get("phase") == "Running"
            and any(c["name"] == "traffic-agent" for c in p["spec"]["containers"])]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return dict(pods[0])


def _exec(lap: Any, ns: str, pod: str, container: str, *argv: str) -> str:
    return str(lap.kubectl("-n", ns, "exec", pod, "-c", container, "--", *argv, timeout=60).stdout)


GET = "import sys,urllib.request;print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"


@pytest.mark.cluster
@pytest.mark.parametrize("kind,name", [("Deployment", "web"), ("StatefulSet", "db")])
def test_intercept_env_and_volumes_beside_a_restricted_non_root_app(lap: Any, kind: str, name: str,
                                                                    tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    port = 9010 if kind == "Deployment" else 9011
    site, out = tmp_path / "site", tmp_path / "out"
    site.mkdir()
    out.mkdir()
    (site / "who").write_text(f"the laptop serves {name}\n")
    mnt = tmp_path / "mnt"
    api = (
        "import json\n"
        "from tpnb.api import Session\n"
        f"fs = Session().files({name!r})\n"
        "print('API ' + json.dumps({'color': fs.read_text('/etc/config/COLOR'), 'ls': sorted(fs.listdir('/data')),\n"
        "                          'app': fs.read_text('/data/from-app.txt')}))\n")
    (tmp_path / "api.py").write_text(api)
    script = (
        f"cd {site} && exec python3 -m http.server {port} >/dev/null 2>&1 & SRV=$!; trap 'kill $SRV' EXIT; set -e; "
        f"tpnb connect --namespace {NS} >/dev/null; "
        f"S=$(date +%s.%N); "
        f"tpnb intercept {name} -n {NS} --port {port} --mount {mnt} --env-json {out}/pod.json; "
        f"echo TOOK $(python3 -c \"print($(date +%s.%N)-$S)\"); "
        f"while [ ! -e {tmp_path}/go ]; do sleep 0.2; done; "
        f"echo COLOR $(cat {mnt}/etc/config/COLOR); echo APPFILE $(cat {mnt}/data/from-app.txt); "
        f"echo from-the-laptop > {mnt}/data/laptop.txt; "
        f"python3 {tmp_path}/api.py; "
        f"while [ ! -e {tmp_path}/done ]; do sleep 0.2; done; "
        f"tpnb leave {name} >/dev/null")
    pre = _spec(lap, NS, kind, name)

    # the intercept, and while it is held a request through the Service from inside the cluster
    proc = subprocess.Popen(lap.cmd(["sh", "-c", script]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("TOOK "):
                # the app (uid 10001) writes into its emptyDir; the laptop reads it next
                pod = _pod_of(lap, NS, name)["metadata"]["name"]
                _exec(lap, NS, pod, "app", "sh", "-c", "echo written-by-uid-$(id -u) > /data/from-app.txt")
                (tmp_path / "go").touch()
            if line.startswith("API ") or "Traceback" in line:
                break
        text = "".join(lines)
        assert any(ln.startswith("API ") for ln in lines), text
        agent_pod = _pod_of(lap, NS, name)
        pname = agent_pod["metadata"]["name"]
        got = _exec(lap, NS, pname, "traffic-agent", "python3", "-c", GET, f"http://{name}.{NS}/who")
        assert got.strip() == f"the laptop serves {name}", got
    finally:
        (tmp_path / "done").touch()  # the script leaves and stops its server (trap)
        try:
            rest, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
        lines.append(rest or "")
    assert proc.returncode == 0, "".join(lines)

    # the pod that served this was admitted under `restricted`, its agent as the app's uid
    spec = agent_pod["spec"]
    agent = next(c for c in spec["containers"] if c["name"] == "traffic-agent")
    assert agent["securityContext"]["runAsUser"] == UID and agent["securityContext"]["runAsNonRoot"] is True
    assert agent["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert [p["containerPort"] for p in agent.get("ports") or []] == [9900]
    assert _exec(lap, NS, pname, "traffic-agent", "id", "-u").strip() == str(UID)
    # env: exactly `kubectl exec POD -c app -- env` (image ENV lines too: read from /proc)
    raw = lap.kubectl("-n", NS, "exec", pname, "-c", "app", "--", "env", "-0").stdout
    want = dict(e.split("=", 1) for e in raw.split("\0") if e)
    assert want["LITERAL"] == f"a literal of {name}" and want["CFG_COLOR"] == "blue" and "PYTHONPATH" in want
    assert json.loads((out / "pod.json").read_text()) == want
    # volumes: sshfs and the FUSE-less API, both ways
    assert "COLOR blue" in text and f"APPFILE written-by-uid-{UID}" in text, text
    api_out = json.loads(next(ln for ln in lines if ln.startswith("API "))[4:])
    assert api_out == {"color": "blue", "ls": ["from-app.txt", "laptop.txt"], "app": f"written-by-uid-{UID}\n"}
    assert _exec(lap, NS, pname, "app", "cat", "/data/laptop.txt") == "from-the-laptop\n"
    took = float(next(ln for ln in lines if ln.startswith("TOOK ")).split()[1])
    assert took < 120, text
    # uninstall restores the workload exactly (the agent's token volume goes too)
    lap.run(["tpnb", "uninstall", "--agent", name, "-n", NS], timeout=180)
    post = _spec(lap, NS, kind, name)
    assert post == pre
    assert "tpnb-agent-token" not in json.dumps(post)


def _spec(lap: Any, ns: str, kind: str, name: str) -> dict[str, Any]:
    obj = json.loads(lap.kubectl("-n", ns, "get", kind.lower(), name, "-o", "json").stdout)
    anns = {k: v for k, v in (obj["metadata"].get("annotations") or {}).items()
            if k not in ("deployment.kubernetes.io/revision",)}
    return {"spec": obj["spec"], "annotations": anns, "labels": obj["metadata"].get("labels")}


@pytest.mark.cluster
@pytest.mark.parametrize("kind,name", [("Deployment", "web"), ("StatefulSet", "db")])
def test_admission_refusal_is_reported_fast_and_the_workload_restored(lap: Any, kind: str, name: str) -> None:
    from tpnb.imageref import default_image

    if kind == "Deployment":  # one namespace for both cases
        _namespace(lap, NSQ, {})
        lap.kubectl("-n", NSQ, "apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "cpu-limits"},
             "spec": {"hard": {"limits.cpu": "4", "requests.cpu": "4"}}}))
        res = {"requests": {"cpu": "50m"}, "limits": {"cpu": "200m"}}
        lap.kubectl("-n", NSQ, "apply", "-f", "-", input=json.dumps(_manifest(default_image(), res)))
        _rolled_out(lap, NSQ)
    pre = _spec(lap, NSQ, kind, name)
    lap.run(["tpnb", "connect", "--namespace", NSQ], timeout=120)
    start = time.monotonic()
    r = lap.run(["tpnb", "intercept", name, "-n", NSQ, "--port", "9000", "--mount=false", "--", "true"], check=False,
                timeout=240)
    took = time.monotonic() - start
    text = r.stdout + r.stderr
    print(f"{kind}: {took:.1f}s\n{text}")
    assert r.returncode != 0 and "Traceback" not in text, text
    assert "refuses to create the pods" in text and "must specify limits.cpu" in text, text
    assert "traffic-agent" in text and "ResourceQuota" in text, text  # the hint names the cause
    assert took < 10 + 1, f"{took:.1f}s\n{text}"  # (+ the CLI's own start)
    assert "restored" in text, text
    assert _spec(lap, NSQ, kind, name) == pre
    _rolled_out(lap, NSQ)  # and the app's pods run again


@pytest.mark.cluster
def test_a_stall_that_is_no_refusal_still_times_out_naming_the_pending_pods(lap: Any) -> None:
    """A new pod that cannot be scheduled (its hostPort is held by the old pod on
    the one node both are pinned to) is not an admission refusal: the rollout timeout (8 s here)
    reports the pending pod and why; the workload is restored."""
    ns = "tppsss"
    _namespace(lap, ns, {})
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "stuck"}, "spec": {
        "selector": {"matchLabels": {"app": "stuck"}},
        "template": {"metadata": {"labels": {"app": "stuck"}}, "spec": {
            "nodeSelector": {"kubernetes.io/hostname": "tpnb-node"}, "containers": [{
            "name": "app", "image": "tpnb.local/echoserver:1.4", "imagePullPolicy": "IfNotPresent",
            "ports": [{"containerPort": 8080, "hostPort": 18080}]}]}}}}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "stuck"},
           "spec": {"selector": {"app": "stuck"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    lap.kubectl("-n", ns, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                               "items": [dep, svc]}))
    lap.kubectl("-n", ns, "rollout", "status", "deploy/stuck", "--timeout=120s", timeout=150)
    pre = _spec(lap, ns, "Deployment", "stuck")
    try:
        lap.run(["env", "TPNB_TIMEOUTS_ROLLOUT=8", "tpnb", "connect", "--namespace", ns], timeout=120)
        r = lap.run(["tpnb", "intercept", "stuck", "-n", ns, "--port", "9000", "--mount=false", "--", "true"],
                    check=False, timeout=240)
        text = r.stdout + r.stderr
        assert r.returncode != 0 and "Traceback" not in text, text
        assert "did not finish within 8s" in text and "cannot be scheduled" in text, text
        assert "describe the pending pods" in text and "refuses" not in text, text
        assert _spec(lap, ns, "Deployment", "stuck") == pre
    finally:
        lap.run(["tpnb", "quit", "--daemon"], check=False)
        lap.kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=false", check=False)
