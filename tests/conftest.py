"""Shared pytest fixtures and options.

Fixtures here are for every test module; add new ones in their own section
with a docstring saying what they give and what they cost.

Dev cluster:
* `devcluster` (session): the running `DevCluster`, booted once via the
  Python API (quick when `tpnb devcluster up` already ran).  It is *not*
  torn down at the end of the session: other modules and the next run reuse
  it.  Needs root; skipped otherwise.
* `laptop` (session): a `LaptopRunner` for the default laptop namespace:
  `laptop.run([...])` runs a command inside it, `laptop.kubectl(...)` runs
  kubectl there against the dev cluster.

Tests marked `devcluster_down` (they stop the cluster) run after every other
test of the session, and are skipped with `--keep-cluster`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--keep-cluster", action="store_true", default=bool(os.environ.get("TPNB_KEEP_CLUSTER")),
        help="skip tests that stop the dev cluster (devcluster_down); also TPNB_KEEP_CLUSTER=1",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "devcluster_down: stops the dev cluster (runs last; skipped with --keep-cluster)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # noqa: ANN201
    """Under the README's test command (TPNB_REQUIRE_ALL=1) a skipped cluster or
    netns test is a failure: a skipped end-to-end test must never read as a pass."""
    outcome = yield
    rep = outcome.get_result()
    if (rep.skipped and os.environ.get("TPNB_REQUIRE_ALL") == "1"
            and (item.get_closest_marker("cluster") or item.get_closest_marker("netns"))
            and not item.get_closest_marker("devcluster_down")):
        rep.outcome = "failed"
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.longrepr = f"skipped under TPNB_REQUIRE_ALL=1 (counts as a failure): {reason}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move cluster-stopping tests to the very end, so every other test
    module still finds the cluster running."""
    last = [i for i in items if i.get_closest_marker("devcluster_down")]
    if not last:
        return
    rest = [i for i in items if not i.get_closest_marker("devcluster_down")]
    items[:] = rest + last
    if config.getoption("--keep-cluster"):
        skip = pytest.mark.skip(reason="--keep-cluster: not stopping the dev cluster")
        for i in last:
            i.add_marker(skip)


# ------------------------------------------------------------------ dev cluster
def _progress_to_terminal() -> Any:
    """Progress lines straight to the real stderr: a cold boot builds
    Kubernetes for many minutes, and a silent test run looks hung."""
    from tpnb_devcluster.progress import Printer

    return Printer(stream=sys.__stderr__, tick_every=30)


@pytest.fixture(scope="session")
def devcluster() -> Iterator[Any]:
    """The running dev cluster (booted once per session, left running)."""
    if os.geteuid() != 0:
        pytest.skip("the dev cluster needs root")
    from tpnb_devcluster.cluster import DevCluster

    dc = DevCluster()
    if not os.environ.get("TPNB_LAPTOP"):  # inside a laptop: the outer run booted it
        dc.up(_progress_to_terminal())
    yield dc


class LaptopRunner:
    """Runs commands inside laptop network namespace tpnb-<name>."""

    def __init__(self, cluster: Any, name: str = "laptop") -> None:
        self.cluster = cluster
        self.name = name
        cluster.ensure_laptop(name)

    def cmd(self, argv: list[str]) -> list[str]:
        return self.cluster.laptop_cmd(self.name, argv)

    def run(self, argv: list[str], *, timeout: float = 60, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(self.cmd(argv), capture_output=True, text=True, timeout=timeout, input=input)
        if check and res.returncode != 0:
            raise AssertionError(f"in laptop {self.name}: {argv} exited {res.returncode}\n"
                                 f"stdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-2000:]}")
        return res

    def sh(self, script: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-c", script], **kw)

    def kubeconfig_as(self, serviceaccount: str, namespace: str, directory: Path) -> Path:
        """A kubeconfig for the dev cluster that authenticates as a ServiceAccount (made if missing)."""
        import json

        self.kubectl("-n", namespace, "create", "serviceaccount", serviceaccount, check=False)
        token = self.kubectl("-n", namespace, "create", "token", serviceaccount).stdout.strip()
        kc = json.loads(self.kubectl("config", "view", "--raw", "-o", "json").stdout)
        kc["users"] = [{"name": serviceaccount, "user": {"token": token}}]
        kc["contexts"][0]["context"]["user"] = serviceaccount
        path = directory / f"{serviceaccount}.kubeconfig"
        path.write_text(json.dumps(kc))
        os.chmod(directory, 0o755)  # the laptop's processes run as root, but keep it readable anyway
        return path

    def kubectl(self, *args: str, timeout: float = 60, check: bool = True,
                input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.run(["kubectl", *args], timeout=timeout, check=check, input=input)

    def fresh_namespace(self, ns: str, timeout: float = 180) -> None:
        """No tpnb session in this laptop, and namespace `ns` new (deleted first if it exists)."""
        self.run(["tpnb", "quit", "--daemon"], check=False)
        self.kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=true", timeout=timeout)
        self.kubectl("create", "ns", ns)

    def drop_namespace(self, ns: str) -> None:
        """End this laptop's session and start deleting `ns` (fixture teardown)."""
        self.run(["tpnb", "quit", "--daemon"], check=False)
        self.kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture(scope="session")
def laptop(devcluster: Any) -> LaptopRunner:
    """The default laptop (`tpnb-laptop`) of the running dev cluster; another
    name with TPNB_DEVCLUSTER_TEST_LAPTOP (e.g. for a second dev cluster set
    up through TPNB_DEVCLUSTER_* variables)."""
    return LaptopRunner(devcluster, os.environ.get("TPNB_DEVCLUSTER_TEST_LAPTOP", "laptop"))


# ------------------------------------------------------------------ tests that must run inside a laptop
LAPTOP_NS = "tpnb-laptop"
IN_LAPTOP_ENV = "TPNB_TEST_IN_LAPTOP"


def stop_process_group(p: subprocess.Popen[Any], grace: float = 30) -> None:
    """End a test's `tpnb ... -- CMD` started with start_new_session: continue it (a test may have
    stopped it), <ctrl>-C its group, SIGKILL after `grace` seconds."""
    if p.poll() is not None:
        return
    for sig in (signal.SIGCONT, signal.SIGINT):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)


def in_laptop_netns() -> bool:
    """Whether this process runs in a laptop namespace of the dev cluster.

    Decided by namespace identity, never by probing the API address: from the
    host namespace a connection to it would leave the machine.
    """
    names = {LAPTOP_NS}
    if os.environ.get("TPNB_LAPTOP"):
        names.add(f"tpnb-{os.environ['TPNB_LAPTOP']}")
    try:
        here = os.stat("/proc/self/ns/net").st_ino
        return any(os.stat(f"/run/netns/{n}").st_ino == here for n in names if os.path.exists(f"/run/netns/{n}"))
    except OSError:
        return False


def rerun_in_laptop(request: pytest.FixtureRequest, kubeconfig: Path, timeout: float = 1200) -> bool:
    """Make a test run inside the laptop: True when the caller already is there.

    Otherwise this re-runs the very test inside `tpnb-laptop` (a nested
    pytest), asserts it passed, and returns False: the outer test body then
    has nothing left to do.
    """
    if not kubeconfig.exists():
        pytest.skip(f"dev cluster not up ({kubeconfig} missing): tpnb devcluster up")
    if in_laptop_netns():
        return True
    if os.environ.get(IN_LAPTOP_ENV):
        pytest.skip(f"not inside {LAPTOP_NS} after all")
    if os.geteuid() != 0 or not Path(f"/run/netns/{LAPTOP_NS}").exists():
        pytest.skip(f"API server unreachable here and no {LAPTOP_NS} netns to run in")
    p = subprocess.run(["ip", "netns", "exec", LAPTOP_NS, "env", f"{IN_LAPTOP_ENV}=1", sys.executable, "-m",
                        "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "cluster", request.node.nodeid],
                       cwd=str(REPO), capture_output=True, text=True, timeout=timeout, check=False)
    tail = (p.stdout + p.stderr)[-6000:]
    if p.returncode == 5 or (" skipped" in tail and " passed" not in tail):
        why = [ln for ln in tail.splitlines() if ln.startswith("SKIPPED")] or tail.strip().splitlines()[-1:]
        pytest.skip(f"skipped inside {LAPTOP_NS}: {why[0]}")
    assert p.returncode == 0, f"inside {LAPTOP_NS}:\n{tail}"
    return False
