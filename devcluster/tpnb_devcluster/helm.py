"""Build the `helm` CLI from the pinned Go module (for tests of the chart).

Like the Kubernetes binaries (`binaries.py`): the machine reaches only
package registries, and the Go module proxy serves `helm.sh/helm/v3`.  The
version is pinned by `go/helm/go.mod` (a tool directive), in its own module
so a Helm bump never rebuilds Kubernetes.  The output directory is keyed by
a hash of that go.mod and go.sum: <state>/helm/<hash>/helm.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from tpnb.errors import DevClusterError, PrerequisiteError

from . import binaries, config as devcluster_config
from .manifests import Layout
from .progress import ProgressFn, run_ticking, silent

HELM_MODULE_DIR = Path(__file__).resolve().parent / "go" / "helm"
HELM_MODULE = "helm.sh/helm/v3"


def helm_version(module_dir: Path = HELM_MODULE_DIR) -> str:
    """The pinned helm.sh/helm/v3 version, e.g. v3.22.0."""
    m = re.search(r"^\s*(?:require\s+)?helm\.sh/helm/v3\s+(v\S+)", (module_dir / "go.mod").read_text(), re.M)
    if not m:
        raise DevClusterError(f"no {HELM_MODULE} pin in {module_dir / 'go.mod'}")
    return m.group(1)


def min_go(module_dir: Path = HELM_MODULE_DIR) -> tuple[int, int]:
    """The Go version the module needs (its `go` line: Helm 3.22 needs 1.26)."""
    m = re.search(r"^go\s+(\d+)\.(\d+)", (module_dir / "go.mod").read_text(), re.M)
    return (int(m.group(1)), int(m.group(2))) if m else (1, 24)


def client_go_version(module_dir: Path = HELM_MODULE_DIR) -> tuple[int, int]:
    """(major, minor) of the Kubernetes API helm is built against (client-go v0.37 -> 1.37)."""
    m = re.search(r"^\s*k8s\.io/client-go\s+v0\.(\d+)\.", (module_dir / "go.mod").read_text(), re.M)
    return (1, int(m.group(1))) if m else (1, 20)


def ldflags(version: str, module_dir: Path = HELM_MODULE_DIR) -> str:
    """Strip symbols and stamp what helm's Makefile stamps: its version (`helm
    version` says v3.22 otherwise) and the Kubernetes version `helm template`
    assumes without a cluster (else 1.20, older than the chart's kubeVersion)."""
    major, minor = client_go_version(module_dir)
    flags = ["-s", "-w", f"-X helm.sh/helm/v3/internal/version.version={version}"]
    for pkg in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
        flags += [f"-X {pkg}.k8sVersionMajor={major}", f"-X {pkg}.k8sVersionMinor={minor}"]
    return " ".join(flags)


def pin_hash(module_dir: Path = HELM_MODULE_DIR) -> str:
    return binaries.module_hash(module_dir, ldflags(helm_version(module_dir)))


def helm_dir(state_dir: Path | None = None) -> Path:
    state = state_dir or Layout.from_config(devcluster_config.get()).state
    return state / "helm" / pin_hash()


def helm_path(state_dir: Path | None = None) -> Path:
    """Where the built helm is (it may not be built yet; see `ensure`)."""
    return helm_dir(state_dir) / "helm"


def find_go() -> tuple[str, bool]:
    """(the `go` command, whether it is older than the module needs).

    An older Go (>= 1.21) still builds helm: with GOTOOLCHAIN=auto it fetches
    the Go toolchain the module names, itself a module of the Go module proxy.
    """
    go = shutil.which("go") or ("/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None)
    want = min_go()
    need = f"{want[0]}.{want[1]}"
    if not go:
        raise PrerequisiteError("the Go toolchain is missing",
                                f"the helm CLI is built from {HELM_MODULE} through the Go module proxy",
                                f"install Go {need} or newer and put it on PATH, then rerun")
    out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True,
                         env={**os.environ, "GOTOOLCHAIN": "local"}).stdout.strip()
    m = re.match(r"go(\d+)\.(\d+)", out)
    if not m or (int(m.group(1)), int(m.group(2))) < (1, 21):
        raise PrerequisiteError(f"Go is too old to build helm {helm_version()} ({out or 'unknown version'})",
                                f"{HELM_MODULE} {helm_version()} needs Go {need}",
                                f"install Go {need} or newer and put it first on PATH")
    return go, (int(m.group(1)), int(m.group(2))) < want


def ensure(progress: ProgressFn = silent, *, frac: tuple[float, float] = (0.0, 1.0),
           state_dir: Path | None = None) -> Path:
    """Path of the helm binary, building it first if needed (about 2-4 min cold)."""
    state = state_dir or Layout.from_config(devcluster_config.get()).state
    out = helm_dir(state)
    step = "helm"
    binary = out / "helm"
    if os.access(binary, os.X_OK):
        progress(step, f"helm {helm_version()} present in {out}", frac[1])
        return binary
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(step, "another tpnb is building helm; waiting for it…", frac[0])
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.access(binary, os.X_OK):
            _build(out, state, progress, step, frac)
    return binary


def _build(out: Path, state: Path, progress: ProgressFn, step: str, frac: tuple[float, float]) -> None:
    go, too_old = find_go()
    version = helm_version()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log_dir = state / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "build-helm.log"
    env = {**os.environ, "CGO_ENABLED": "0", "GOTOOLCHAIN": "auto" if too_old else "local"}
    if too_old:
        want = min_go()
        progress(step, f"{go} is older than Go {want[0]}.{want[1]}, which helm {version} needs: "
                 "letting go fetch that toolchain from the module proxy", frac[0])
    env["GOFLAGS"] = (env.get("GOFLAGS", "") + " -buildvcs=false").strip()
    env["PATH"] = f"{Path(go).parent}:{env.get('PATH', '')}"
    env.setdefault("HOME", "/root")
    progress(step, f"building helm {version} from {HELM_MODULE_DIR} (log: {log_path}); "
             "a first build takes 2-5 min", frac[0])
    start = time.monotonic()
    with open(log_path, "w") as log:
        rc = run_ticking([go, "build", "-trimpath", "-ldflags", ldflags(version), "-o", str(tmp) + "/", "tool"],
                         progress, step, f"building helm {version}", frac[0],
                         cwd=str(HELM_MODULE_DIR), env=env, log=log, interval=2.0)
    if rc != 0:
        try:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            tail = ""
        raise DevClusterError("building helm failed",
                              f"`go build tool` in {HELM_MODULE_DIR} exited with {rc}:\n{tail}",
                              f"see {log_path}; a network error means the Go module proxy was unreachable")
    if not (tmp / "helm").exists():
        raise DevClusterError("building helm produced no helm binary", hint=f"see {log_path}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    for old in out.parent.iterdir():  # helm of older pins: nothing uses it now
        if old.is_dir() and old != out:
            shutil.rmtree(old, ignore_errors=True)
    progress(step, f"built helm {version} in {time.monotonic() - start:.0f} s into {out}", frac[1])
