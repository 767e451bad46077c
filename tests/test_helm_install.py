"""Admin install with Helm, and a namespace-scoped developer (issue 11).

A cluster admin installs charts/traffic-manager with the real `helm` CLI
(built from the helm.sh/helm/v3 Go module by `tpnb devcluster up`),
namespace-scoped to team-a, into its own namespace (so the self-installed
manager other tests use in `tpnb` is never touched).  A developer -- a client
certificate from the dev cluster's CA, bound by Roles only -- connects and
intercepts in team-a from a laptop namespace; in team-b (read-only there) and
team-c (full rights, but not served by the manager) the intercept is refused
within seconds, naming what is missing, and nothing there changes.
`helm uninstall` leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from conftest import REPO, LaptopRunner

CHART = REPO / "charts" / "traffic-manager"
MNS = "tphelm-system"          # the manager's namespace (TPNB_MANAGER_NAMESPACE for the developer)
TEAM_A, TEAM_B, TEAM_C = "team-a", "team-b", "team-c"
RELEASE = "traffic-manager"
DEV = "tphelm-dev"
DEV_IMAGE = "tpnb.local/tpnb:0.1.0-another-build"
ECHO = "tpnb.local/echoserver:1.4"
#: extra `helm --set` arguments, e.g. for a manager image older than the chart
EXTRA_SET = [a for a in os.environ.get("TPNB_TEST_HELM_SET", "").split() if a]


def _image() -> str:
    from tpnb import config

    return config.get().manager_image


def _helm() -> str:
    from tpnb_devcluster import helm

    return str(helm.ensure())


def _render(*values: str, namespace: str = "tpnb") -> list[dict[str, Any]]:
    repo, _, tag = _image().rpartition(":")
    out = subprocess.run([_helm(), "template", RELEASE, str(CHART), "-n", namespace,
                          "--set", f"image.repository={repo}", "--set", f"image.tag={tag}", *values],
                         capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


# ---------------------------------------------------------------- the chart itself
@pytest.mark.cluster
def test_chart_renders_the_objects_connect_installs() -> None:
    """Same names, labels, ports, env, probes and security context as
    manager_install.manifests(): connect finds a Helm-installed manager the
    way it finds its own, and agents reach it the same way."""
    from tpnb.connector import manager_install

    image = _image()
    mine = {(o["kind"], o["metadata"]["name"]): o for o in manager_install.manifests(image, "tpnb")}
    chart = {(o["kind"], o["metadata"]["name"]): o for o in _render()}
    assert set(chart) == set(mine) - {("Namespace", "tpnb")}   # helm install --create-namespace makes it
    for key, obj in chart.items():
        want = mine[key]
        for k, v in {**manager_install.SELECTOR, "app.kubernetes.io/part-of": "tpnb"}.items():
            assert obj["metadata"]["labels"][k] == v, key
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert obj["metadata"].get("namespace") == want["metadata"].get("namespace"), key
    assert chart[("ClusterRole", "tpnb-traffic-manager")]["rules"] == mine[("ClusterRole", "tpnb-traffic-manager")]["rules"]
    assert chart[("Service", "traffic-manager")]["spec"] == mine[("Service", "traffic-manager")]["spec"]
    dep, want = chart[("Deployment", "traffic-manager")], mine[("Deployment", "traffic-manager")]
    assert dep["spec"]["selector"] == want["spec"]["selector"]
    assert dep["spec"]["strategy"] == want["spec"]["strategy"]
    pod, wpod = dep["spec"]["template"]["spec"], want["spec"]["template"]["spec"]
    for k in ("serviceAccountName", "securityContext", "dnsPolicy", "terminationGracePeriodSeconds"):
        assert pod[k] == wpod[k], k
    (c,), (wc,) = pod["containers"], wpod["containers"]
    for k in ("name", "image", "imagePullPolicy", "args", "ports", "readinessProbe", "resources", "securityContext"):
        assert c[k] == wc[k], k
    env = {e["name"]: e for e in c["env"]}
    for e in wc["env"]:
        assert env[e["name"]] == e, e["name"]
    assert "TPNB_MANAGER_NAMESPACES" not in env

    scoped = _render("--set", "managedNamespaces={team-a,team-x}", namespace=MNS)
    kinds = [(o["kind"], o["metadata"].get("namespace")) for o in scoped]
    assert ("Role", "team-a") in kinds and ("RoleBinding", "team-x") in kinds
    (cr,) = [o for o in scoped if o["kind"] == "ClusterRole"]
    assert cr["metadata"]["name"] == manager_install.rbac_name(MNS)
    assert cr["rules"] == [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}]
    (dep,) = [o for o in scoped if o["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TPNB_MANAGER_NAMESPACES"] == "team-a,team-x"
    missing = subprocess.run([_helm(), "template", RELEASE, str(CHART)], capture_output=True, text=True)
    assert missing.returncode != 0 and "image.tag is required" in missing.stderr


# ---------------------------------------------------------------- admin install + developer
def _deploy(admin: LaptopRunner, ns: str, name: str = "hello") -> None:
    admin.kubectl("-n", ns, "create", "deploy", name, f"--image={ECHO}")
    admin.kubectl("-n", ns, "expose", "deploy", name, "--port", "80", "--target-port", "8080")
    admin.kubectl("-n", ns, "rollout", "status", f"deploy/{name}", "--timeout=120s", timeout=150)


#: what a developer needs where they work (README, "RBAC"): read and patch the workloads and
#: Services they intercept, see pods, their logs and events; create Services (a dry run that
#: tells the service subnet: nothing is created)
DEV_RULES = [
    {"apiGroups": ["apps"], "resources": ["deployments", "statefulsets", "replicasets"],
     "verbs": ["get", "list", "watch", "patch", "update"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch", "patch", "update", "create"]},
    {"apiGroups": [""], "resources": ["pods", "endpoints", "events"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
]
#: and in the manager's namespace: find the manager and port-forward to it
DEV_MANAGER_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
    {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create"]},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
]


def _role(admin: LaptopRunner, ns: str, rules: list[dict[str, Any]]) -> None:
    docs = [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "tpnb-developer", "namespace": ns}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "tpnb-developer", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tpnb-developer"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": DEV}]},
    ]
    admin.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))


def _leftovers(admin: LaptopRunner) -> list[str]:
    """Every object of the release, in any namespace or cluster-wide."""
    sel = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/managed-by=Helm"
    out = admin.kubectl("get", "clusterrole,clusterrolebinding,role,rolebinding,deploy,svc,sa,pods", "-A",
                        "-l", sel, "-o", "name", check=False).stdout.split()
    return out


class Env:
    def __init__(self, admin: LaptopRunner, dev: LaptopRunner, kubeconfig: Path) -> None:
        self.admin, self.dev, self.kubeconfig = admin, dev, kubeconfig

    def as_dev(self, argv: list[str]) -> list[str]:
        # the developer's tpnb is another build than the admin's release (same API): the release's
        # image is used as it runs, agents included, and this tag (never loaded) is never asked for
        return ["env", f"KUBECONFIG={self.kubeconfig}", f"TPNB_MANAGER_NAMESPACE={MNS}",
                f"TPNB_MANAGER_IMAGE={DEV_IMAGE}", "USER=dev", *argv]

    def tpnb(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.dev.run(self.as_dev(["tpnb", *args]), timeout=timeout, check=check)


def _uninstall(admin: LaptopRunner) -> None:
    admin.run(["helm", "uninstall", RELEASE, "-n", MNS, "--wait", "--timeout", "120s"], check=False, timeout=180)


@pytest.fixture(scope="module")
def helm_env(devcluster: Any, laptop: LaptopRunner) -> Iterator[Env]:
    from tpnb_devcluster.users import user_kubeconfig

    _helm()  # built on first use (not by `up`); then on every laptop's PATH
    admin = laptop
    dev = LaptopRunner(devcluster, "helmdev")
    dev.run(["tpnb", "quit", "--daemon"], check=False)
    kubeconfig = user_kubeconfig(DEV, ["tphelm-devs"])
    namespaces = (MNS, TEAM_A, TEAM_B, TEAM_C)
    try:
        _uninstall(admin)
        for ns in namespaces:
            admin.kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=true", timeout=180)
        for ns in (TEAM_A, TEAM_B, TEAM_C):
            admin.kubectl("create", "ns", ns)
            _deploy(admin, ns)
        repo, _, tag = _image().rpartition(":")
        r = admin.run(["helm", "install", RELEASE, str(CHART), "-n", MNS, "--create-namespace",
                       "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
                       "--set", f"managedNamespaces={{{TEAM_A}}}", *EXTRA_SET,
                       "--wait", "--timeout", "180s"], timeout=240)
        assert "STATUS: deployed" in r.stdout, r.stdout
        _role(admin, MNS, DEV_MANAGER_RULES)
        _role(admin, TEAM_A, DEV_RULES)
        _role(admin, TEAM_C, DEV_RULES)
        admin.kubectl("-n", TEAM_B, "create", "rolebinding", "dev-view", "--clusterrole=view", f"--user={DEV}")
        yield Env(admin, dev, kubeconfig)
    finally:
        dev.run(["tpnb", "quit", "--daemon"], check=False)
        _uninstall(admin)
        for ns in namespaces:
            admin.kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=false", check=False)


def _snapshot(admin: LaptopRunner, ns: str) -> list[tuple[str, str, str]]:
    """(kind/name, resourceVersion, containers) of the Deployments and Services in ns."""
    items = json.loads(admin.kubectl("-n", ns, "get", "deploy,svc", "-o", "json").stdout)["items"]
    return sorted((f"{i['kind']}/{i['metadata']['name']}", i["metadata"]["resourceVersion"],
                   ",".join(c["name"] for c in i["spec"].get("template", {}).get("spec", {}).get("containers", [])))
                  for i in items)


def _manager_deployment(admin: LaptopRunner) -> dict[str, Any]:
    return json.loads(admin.kubectl("-n", MNS, "get", "deploy", "traffic-manager", "-o", "json").stdout)


@pytest.mark.cluster
def test_developer_without_install_rights_connects_to_the_helm_manager(helm_env: Env) -> None:
    e = helm_env
    # the developer really has no rights beyond the Roles
    for verb, res, ns in (("create", "clusterroles", ""), ("list", "namespaces", ""), ("get", "nodes", ""),
                          ("patch", "deployments", MNS), ("list", "pods", "default")):
        r = e.dev.run(e.as_dev(["kubectl", "auth", "can-i", verb, res, *(["-n", ns] if ns else [])]), check=False)
        assert r.stdout.strip() == "no", (verb, res, ns, r.stdout)
    before = _manager_deployment(e.admin)
    r = e.tpnb("connect", "--namespace", TEAM_A, timeout=180)
    assert "Connected to context tpnb-dev" in r.stdout + r.stderr
    assert "installed by a cluster admin (Helm release traffic-manager)" in r.stdout + r.stderr
    st = e.tpnb("status").stdout
    assert "Connected" in st or "connected" in st, st
    after = _manager_deployment(e.admin)
    # connect never applied over the admin's release
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert {f["manager"] for f in after["metadata"].get("managedFields", [])} <= {"helm", "kube-controller-manager"}
    # cluster Services of team-a by name, through the connection
    r = e.dev.run(["curl", "-sS", "--max-time", "10", f"hello.{TEAM_A}"], check=False)
    assert "CLIENT VALUES:" in r.stdout, r.stderr


def _from_cluster(admin: LaptopRunner, ns: str, url: str) -> str:
    code = f"import urllib.request;print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
    r = admin.kubectl("-n", ns, "exec", "deploy/hello", "-c", "traffic-agent", "--", "python3", "-c", code,
                      check=False, timeout=60)
    return r.stdout + r.stderr


@pytest.mark.cluster
def test_developer_intercepts_in_team_a(helm_env: Env, tmp_path: Path) -> None:
    e = helm_env
    e.tpnb("connect", "--namespace", TEAM_A, timeout=180)
    www = tmp_path / "www"
    www.mkdir()
    (www / "who.txt").write_text("served by the developer's laptop\n")
    os.chmod(tmp_path, 0o755)
    server = subprocess.Popen(e.dev.cmd(["python3", "-m", "http.server", "9400", "--bind", "127.0.0.1",
                                         "--directory", str(www)]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(0.5)
        r = e.tpnb("intercept", "hello", "--namespace", TEAM_A, "--port", "9400", "--mount=false", timeout=240)
        assert "State         : ACTIVE" in r.stdout, r.stdout + r.stderr
        assert _from_cluster(e.admin, TEAM_A, f"http://hello.{TEAM_A}/who.txt").strip() == \
            "served by the developer's laptop"
        pod = json.loads(e.admin.kubectl("-n", TEAM_A, "get", "deploy", "hello", "-o", "json").stdout)
        images = {c["name"]: c["image"] for c in pod["spec"]["template"]["spec"]["containers"]}
        assert images["traffic-agent"] == _image() != DEV_IMAGE   # the release's image, not the client's tag
        e.tpnb("leave", "hello")
        deadline = time.monotonic() + 20
        while "CLIENT VALUES" not in _from_cluster(e.admin, TEAM_A, f"http://hello.{TEAM_A}/"):
            assert time.monotonic() < deadline, "the app did not answer again after leave"
            time.sleep(1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        e.tpnb("leave", "hello", check=False)


@pytest.mark.cluster
@pytest.mark.parametrize("ns, what", [
    # read-only there (view): the missing verb is patch
    (TEAM_B, f"you ({DEV}) may not patch deployments.apps in namespace {TEAM_B}"),
    # full rights there, but the admin's manager serves team-a only
    (TEAM_C, f"the traffic-manager serves namespaces {TEAM_A} only, not {TEAM_C}"),
])
def test_developer_is_refused_outside_team_a_and_nothing_changes(helm_env: Env, ns: str, what: str) -> None:
    e = helm_env
    e.tpnb("connect", "--namespace", TEAM_A, timeout=180)
    before = _snapshot(e.admin, ns)
    server = subprocess.Popen(e.dev.cmd(["python3", "-m", "http.server", "9401", "--bind", "127.0.0.1"]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        r = e.tpnb("intercept", "hello", "--namespace", ns, "--port", "9401", "--mount=false", check=False,
                   timeout=60)
        took = time.monotonic() - t0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
    assert r.returncode != 0
    assert what in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert took < 10, f"refused only after {took:.1f} s"
    assert _snapshot(e.admin, ns) == before
    assert "traffic-agent" not in e.admin.kubectl("-n", ns, "get", "pods", "-o", "yaml").stdout


@pytest.mark.cluster
def test_a_manager_of_another_api_version_is_refused_with_the_helm_upgrade(helm_env: Env) -> None:
    """What connect raises when the Version RPC answers another API generation
    (a real Helm release read with the developer's credentials)."""
    e = helm_env
    code = (
        "import asyncio\n"
        "from tpnb.connector import kube, manager_install\n"
        "from tpnb.version import API_VERSION\n"
        "t = kube.load_target()\n"
        "err = asyncio.run(manager_install.incompatible_error(t, API_VERSION + 1, '9.9.9-old', "
        "'tpnb.local/tpnb:0.1.0-new'))\n"
        "print(err.what); print(err.why); print(err.hint)\n")
    out = e.dev.run(e.as_dev([sys.executable, "-c", code])).stdout
    assert f"the traffic-manager in {MNS} is not compatible with this tpnb" in out
    assert "is 9.9.9-old and speaks API" in out
    assert (f"ask your cluster admin to upgrade it: `helm upgrade {RELEASE} charts/traffic-manager -n {MNS} "
            "--reuse-values --set image.tag=0.1.0-new`") in out, out


@pytest.mark.cluster
def test_no_rights_in_the_manager_namespace_says_ask_the_admin(helm_env: Env) -> None:
    e = helm_env
    e.tpnb("quit", "--daemon", check=False)
    r = e.dev.run(["env", f"KUBECONFIG={e.kubeconfig}", "TPNB_MANAGER_NAMESPACE=tphelm-nowhere",
                   "tpnb", "connect", "--namespace", TEAM_A], check=False, timeout=120)
    assert r.returncode != 0
    # no rights at all there: whether a manager runs is unknowable, so both ways out are named
    assert ("cannot find a traffic-manager in namespace tphelm-nowhere: user 'tphelm-dev' may not list pods"
            in r.stderr), r.stderr
    assert "ask for get/list on pods and create (or get) on pods/portforward in tphelm-nowhere" in r.stderr
    assert "helm install traffic-manager charts/traffic-manager -n tphelm-nowhere" in r.stderr
    assert "Traceback" not in r.stderr
    # an admin with manager.install: never is not offered an install either, and none happens
    adm = LaptopRunner(e.admin.cluster, "helmadm")
    adm.run(["tpnb", "quit", "--daemon"], check=False)   # a fresh connector reads the settings below
    r = adm.run(["env", "TPNB_MANAGER_NAMESPACE=tphelm-nowhere", "TPNB_MANAGER_INSTALL=never",
                 "tpnb", "connect"], check=False, timeout=120)
    adm.run(["tpnb", "quit", "--daemon"], check=False)
    assert r.returncode != 0
    assert "no traffic-manager in namespace tphelm-nowhere" in r.stderr, r.stderr
    assert 'manager.install is "never"' in r.stderr and "helm install traffic-manager" in r.stderr
    assert e.admin.kubectl("get", "ns", "tphelm-nowhere", check=False).returncode != 0


@pytest.mark.cluster
def test_helm_uninstall_leaves_nothing_and_self_install_still_works(helm_env: Env) -> None:
    e = helm_env
    e.tpnb("quit", "--daemon", check=False)
    assert _leftovers(e.admin), "the release's objects should exist before uninstall"
    r = e.admin.run(["helm", "uninstall", RELEASE, "-n", MNS, "--wait", "--timeout", "120s"], timeout=180)
    assert "uninstalled" in r.stdout
    deadline = time.monotonic() + 60
    while _leftovers(e.admin):
        assert time.monotonic() < deadline, f"left behind: {_leftovers(e.admin)}"
        time.sleep(1)
    from tpnb.connector.manager_install import rbac_name

    for kind in ("clusterrole", "clusterrolebinding"):
        assert e.admin.kubectl("get", kind, rbac_name(MNS), check=False).returncode != 0
    assert e.admin.kubectl("-n", MNS, "get", "all,sa,secrets", "-o", "name").stdout.split() \
        in ([], ["serviceaccount/default"]), "helm's release record or objects remain"
    # the self-installed, cluster-wide manager in `tpnb` (other tests') is untouched and works
    other = LaptopRunner(e.admin.cluster, "helmadm")
    try:
        r = other.run(["tpnb", "connect"], timeout=240)
        assert "Connected to context tpnb-dev" in r.stdout + r.stderr
        dep = json.loads(e.admin.kubectl("-n", "tpnb", "get", "deploy", "traffic-manager", "-o", "json").stdout)
        assert dep["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tpnb"
    finally:
        other.run(["tpnb", "quit", "--daemon"], check=False)
