"""The process layout as a user and a packager see it: who may import whom, what the wheel holds,
and the words the faces print for the structured state the connector sends."""
from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tpnb import render
from tpnb.api import Status, Workload
from tpnb.proto import pb

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent

#: folder -> import prefixes its code must never use (a process never reaches into another's folder)
FORBIDDEN = {
    "daemon": ("tpnb.connector", "tpnb.cluster", "tpnb.api", "tpnb.cli", "tpnb.magics", "kubernetes"),
    "connector": ("tpnb.daemon", "tpnb.cluster", "tpnb.api", "tpnb.cli", "tpnb.magics"),
    "cluster": ("tpnb.daemon", "tpnb.connector", "tpnb.api", "tpnb.cli", "tpnb.magics"),
    "common": ("tpnb.daemon", "tpnb.connector", "tpnb.cluster", "tpnb.api", "tpnb.cli", "tpnb.magics"),
    # (the CLI may hand `tpnb devcluster` to the separately installed tpnb_devcluster)
    "tpnb": ("tpnb.daemon", "tpnb.connector", "tpnb.cluster"),
}


def _imports(path: Path, package: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")
                base = base[: len(base) - node.level + 1] if node.level > 1 else base
                out.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                out.add(node.module)
    return out


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_process_reaches_into_another_ones_folder(folder: str) -> None:
    pkg = "tpnb" if folder == "tpnb" else f"tpnb.{folder}"
    bad = []
    for path in sorted((REPO / folder).rglob("*.py")):
        if "_pb2" in path.name:
            continue
        rel = path.relative_to(REPO / folder).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        package = ".".join([pkg, *parts[:-1]]) if path.name != "__init__.py" else ".".join([pkg, *parts])
        for mod in _imports(path, package):
            if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN[folder]):
                bad.append(f"{path.relative_to(REPO)} imports {mod}")
    assert bad == []


def test_the_users_wheel_has_no_dev_cluster_and_every_process(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("tpnb-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if "devcluster" in n or n.endswith((".go", "go.mod", "go.sum"))]
    for must in ("tpnb/connector/__main__.py", "tpnb/daemon/__main__.py", "tpnb/common/forward.py",
                 "tpnb/cluster/manager.py", "tpnb/proto/tpnb.proto", "tpnb/cli.py"):
        assert must in names, must


def test_status_without_the_root_daemon_says_what_works() -> None:
    st = Status(connected=True, context="dev", server="https://10.0.0.1:6443", namespace="default",
                outbound=False, outbound_note="system-wide outbound needs the root daemon, and sudo is not installed")
    text = render.status_text(st)
    assert "Outbound         : not system-wide (system-wide outbound needs the root daemon, and sudo" in text
    assert "DNS" not in text and "TCP engine" not in text
    lines = render.connected_text(st).splitlines()
    assert lines[0] == "Connected to context dev (https://10.0.0.1:6443)"
    assert lines[1].startswith("System-wide outbound needs the root daemon") and "intercepts, env and volumes work" in lines[1]
    up = Status(connected=True, context="dev", server="s", outbound=True, dns_ip="169.254.53.53", tun_name="tpnb0",
                tcp_engine="kernel")
    assert render.connected_text(up) == "Connected to context dev (s)"
    assert "DNS              : 169.254.53.53 (via tpnb0)" in render.status_text(up)


def test_every_workload_state_of_the_protocol_has_words() -> None:
    for name in pb.WorkloadState.keys():
        w = Workload(name="hello", namespace="default", kind="Deployment", services=[], state=name.lower(),
                     agent_installed=False, intercept=None, holder="bob@far")
        assert w.state_text != w.state or w.state == "free", name
    w = Workload(name="hello", namespace="default", kind="Deployment", services=["hello:80->8080"],
                 state="intercepted_by_other", agent_installed=True, intercept=None, holder="bob@far")
    assert render.workloads_text([w]) == "hello : intercepted by bob@far (Deployment; hello:80->8080)"
