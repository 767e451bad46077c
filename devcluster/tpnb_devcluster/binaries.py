"""Build the Kubernetes and etcd binaries from the pinned Go module.

Why build instead of download: the machine reaches only package registries,
and the Go module proxy serves Kubernetes' and etcd's sources.  The versions
are pinned by `go/k8s/go.mod` (tool directives), so one `go build tool`
produces every binary.  The output directory is keyed by a hash of go.mod and
go.sum: changing a pin builds a new set, and an unchanged pin costs nothing.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from tpnb.errors import DevClusterError, PrerequisiteError
from .progress import ProgressFn, run_ticking

GO_MODULE_DIR = Path(__file__).resolve().parent / "go" / "k8s"

#: binary names the cluster needs, after renaming etcd's
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
)
#: what `go build -o DIR tool` calls go.etcd.io/etcd/server/v3's main
_ETCD_BUILD_NAMES = ("server", "v3")
#: `tool` directives need Go 1.24
MIN_GO = (1, 24)


def k8s_version(module_dir: Path = GO_MODULE_DIR) -> str:
    """The pinned k8s.io/kubernetes version, e.g. v1.32.13."""
    m = re.search(r"^\s*(?:require\s+)?k8s\.io/kubernetes\s+(v\S+)", (module_dir / "go.mod").read_text(), re.M)
    if not m:
        raise DevClusterError(f"no k8s.io/kubernetes pin in {module_dir / 'go.mod'}")
    return m.group(1)


def ldflags(version: str) -> str:
    """Strip symbols and stamp the version: a plain `go build` of the module
    reports v0.0.0-master, which confuses clients that check the server version."""
    major, minor = version.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {pkg}.gitVersion={version}", f"-X {pkg}.gitMajor={major}",
                  f"-X {pkg}.gitMinor={minor}", f"-X {pkg}.gitTreeState=clean"]
    return " ".join(flags)


def module_hash(module_dir: Path, flags: str) -> str:
    """Key of a Go module's build output: its go.mod, go.sum and the link flags."""
    h = hashlib.sha256()
    for name in ("go.mod", "go.sum"):
        h.update(name.encode() + b"\0" + (module_dir / name).read_bytes() + b"\0")
    h.update(flags.encode())
    return h.hexdigest()[:16]


def pin_hash(module_dir: Path = GO_MODULE_DIR) -> str:
    return module_hash(module_dir, ldflags(k8s_version(module_dir)))


def bin_dir(state_dir: Path, module_dir: Path = GO_MODULE_DIR) -> Path:
    return state_dir / "bin" / pin_hash(module_dir)


def complete(directory: Path) -> bool:
    return all(os.access(directory / b, os.X_OK) for b in BINARIES)


def find_go() -> str:
    """The `go` command, checked to be new enough; PrerequisiteError otherwise."""
    go = shutil.which("go") or ("/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None)
    if not go:
        raise PrerequisiteError(
            "the Go toolchain is missing",
            "the dev cluster builds Kubernetes from source through the Go module proxy",
            "install Go 1.24 or newer (e.g. `apt-get install -t bookworm-backports golang-1.24-go` "
            "and put /usr/lib/go-1.24/bin on PATH), then rerun",
        )
    out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True).stdout.strip()
    m = re.match(r"go(\d+)\.(\d+)", out)
    if not m or (int(m.group(1)), int(m.group(2))) < MIN_GO:
        raise PrerequisiteError(
            f"Go is too old ({out or 'unknown version'})",
            "the Kubernetes pins use go.mod tool directives, which need Go 1.24",
            "install Go 1.24 or newer and put it first on PATH",
        )
    return go


def ensure(state_dir: Path, progress: ProgressFn, *, frac: tuple[float, float] = (0.0, 1.0)) -> Path:
    """Return the directory holding every binary, building it first if needed."""
    out = bin_dir(state_dir)
    step = "binaries"
    if complete(out):
        progress(step, f"kubernetes binaries present in {out}", frac[1])
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / ".build.lock"
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(step, "another tpnb is building kubernetes; waiting for it…", frac[0])
            fcntl.flock(lock, fcntl.LOCK_EX)
        if complete(out):  # the other builder finished it
            return out
        _build(out, state_dir, progress, step, frac)
    return out


def _build(out: Path, state_dir: Path, progress: ProgressFn, step: str, frac: tuple[float, float]) -> None:
    go = find_go()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "build-kubernetes.log"
    env = dict(os.environ)
    env["GOFLAGS"] = (env.get("GOFLAGS", "") + " -buildvcs=false").strip()
    env["PATH"] = f"{Path(go).parent}:{env.get('PATH', '')}"
    progress(step, f"building kubernetes from {GO_MODULE_DIR} (log: {log_path}); "
             "a first build takes 10-20 min", frac[0])
    start = time.monotonic()
    with open(log_path, "w") as log:
        rc = run_ticking(
            [go, "build", "-trimpath", "-ldflags", ldflags(k8s_version()), "-o", str(tmp) + "/", "tool"],
            progress, step, "building kubernetes", frac[0],
            cwd=str(GO_MODULE_DIR), env=env, log=log, interval=2.0,
        )
    if rc != 0:
        tail = _tail(log_path, 15)
        raise DevClusterError(
            "building kubernetes failed",
            f"`go build tool` in {GO_MODULE_DIR} exited with {rc}:\n{tail}",
            f"see {log_path}; a network error means the Go module proxy was unreachable",
        )
    for name in _ETCD_BUILD_NAMES:
        if (tmp / name).exists():
            (tmp / name).rename(tmp / "etcd")
            break
    missing = [b for b in BINARIES if not (tmp / b).exists()]
    if missing:
        raise DevClusterError("building kubernetes produced no " + ", ".join(missing),
                              hint=f"see {log_path}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    for old in out.parent.iterdir():  # binaries of older pins: nothing uses them now
        if old.is_dir() and old != out:
            shutil.rmtree(old, ignore_errors=True)
    progress(step, f"built kubernetes in {time.monotonic() - start:.0f} s into {out}", frac[1])


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
