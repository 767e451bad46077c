"""The Debian base of the tpnb cluster image, made with debootstrap.

With no registry there is no `debian:bookworm-slim` to pull, so the base is
bootstrapped from the Debian mirror this machine already uses.  That takes a
few minutes, so the result is cached twice under the image cache: as a
trimmed root directory (to run the image's own python3 in a chroot, which
byte-compiles the dependency layer) and as the deterministic layer tar.  Both
are keyed by everything that shapes them; neither is rebuilt otherwise.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from tpnb.errors import DevClusterError, PrerequisiteError
from .oci import Layer, LayerWriter

SUITE = "bookworm"
VARIANT = "minbase"
#: what the cluster processes need beyond minbase (python3 runs them, sftp-server
#: serves volume mounts, nss_wrapper gives sftp-server a passwd entry when the
#: agent runs as an app's uid the image does not list, ip/ps help debugging and
#: the agent's network setup; nft redirects a headless Service's port to the agent, cluster/redirect.py)
PACKAGES = ("python3", "ca-certificates", "openssh-sftp-server", "libnss-wrapper", "iproute2", "procps", "nftables")
#: completed bases of other recipes kept beside the current one: worktrees of
#: different recipes share the cache and would otherwise re-bootstrap in turns
KEEP_OTHER = 2
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: bump when the trimming or post-processing below changes
RECIPE_VERSION = 1

#: removed after bootstrap: docs, manuals, translations and package caches are
#: never read by the cluster processes and would double the layer size
TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/linda",
    "usr/share/bash-completion",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/cache/debconf/templates.dat-old",
    "var/cache/debconf/config.dat-old",
    "var/lib/dpkg/status-old",
    "var/lib/dpkg/diversions-old",
    "var/log",
    "tmp",
    "run",
)

Progress = Callable[[str, str, float], None]


def cache_key() -> str:
    """Hash of what determines the rootfs (not the mirror: any mirror will do)."""
    h = hashlib.sha256()
    h.update(f"{SUITE}\0{VARIANT}\0{','.join(sorted(PACKAGES))}\0{RECIPE_VERSION}".encode())
    return h.hexdigest()[:16]


def debian_mirror() -> str:
    """The Debian archive URI this machine's apt uses (deb822 or one-line)."""
    texts: list[str] = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            texts.append(p.read_text())
        except OSError:
            continue
    return mirror_from(texts)


def mirror_from(texts: list[str]) -> str:
    """The first non-security archive serving SUITE in apt source files' texts."""
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split() and "security" not in uris.group(1):
                return uris.group(1).rstrip("/")
        for line in text.splitlines():
            m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s", line.strip() + " ")
            if m and m.group(2) == SUITE and "security" not in m.group(1):
                return m.group(1).rstrip("/")
    return DEFAULT_MIRROR


def ensure_rootfs(cache_dir: Path, progress: Progress, step: str) -> tuple[Path, Layer]:
    """(trimmed root directory, its layer), bootstrapping only on a cache miss."""
    key = cache_key()
    root = cache_dir / f"rootfs-{key}"
    tar = cache_dir / f"rootfs-{key}.tar"
    done = cache_dir / f"rootfs-{key}.done"
    if done.exists() and tar.exists() and root.is_dir():
        return root, Layer.from_cached(tar)
    _check_prerequisites()
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = cache_dir / f"rootfs-{key}.work"
    bootstrapped = cache_dir / f"rootfs-{key}.bootstrapped"
    _prune(cache_dir, key, keep=(work, bootstrapped) if bootstrapped.exists() else ())
    if not bootstrapped.exists():
        try:
            _debootstrap(work, progress, step)
        except BaseException:
            _remove(work)
            raise
        bootstrapped.touch()  # later steps may fail and retry without bootstrapping again
    progress(step, "trimming docs, locales and package caches", 0.75)
    _trim(work)
    progress(step, "byte-compiling the Python standard library", 0.8)
    chroot_python(work, ["-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash",
                         "/usr/lib/python3.11", "/usr/lib/python3"])
    progress(step, "writing the base layer", 0.9)
    with LayerWriter(tar) as w:
        w.add_tree(work)
    os.replace(work, root)
    bootstrapped.unlink()
    layer = Layer.from_cached(tar)
    done.write_text(layer.digest + "\n")
    return root, layer


def _prune(cache_dir: Path, key: str, keep: tuple[Path, ...]) -> None:
    """Remove this key's half-finished leftovers (but `keep`), other recipes'
    half-finished ones, and all but the KEEP_OTHER newest completed other bases."""
    done_other = sorted((p for p in cache_dir.glob("rootfs-*.done") if p.name != f"rootfs-{key}.done"),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    keep_keys = {p.name[len("rootfs-"):-len(".done")] for p in done_other[:KEEP_OTHER]}
    for old in cache_dir.glob("rootfs-*"):
        k = old.name[len("rootfs-"):].split(".", 1)[0]
        if old in keep or (k in keep_keys and not old.name.endswith((".work", ".bootstrapped"))):
            continue
        _remove(old)


def chroot_python(root: Path, args: list[str], what: str = "python3 failed inside the image rootfs",
                  hint: str = "") -> None:
    """Run the rootfs's own python3 (3.11) inside it: compiles matching .pyc files."""
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    proc = subprocess.run([chroot, str(root), "/usr/bin/python3", *args], capture_output=True,
                          text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"})
    if proc.returncode != 0:
        raise DevClusterError(what, ((proc.stdout or "") + (proc.stderr or "")).strip()[-1500:],
                              hint or f"remove {root} to bootstrap it again")


# ------------------------------------------------------------------ internals
def _check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise PrerequisiteError("building the tpnb image needs root",
                                "debootstrap creates device nodes and chroots",
                                "run `sudo tpnb devcluster up` (or build the image with cluster/Dockerfile)")
    if shutil.which("debootstrap") is None:
        raise PrerequisiteError("debootstrap is not installed",
                                "the image's Debian base is bootstrapped from the apt mirror",
                                "apt-get install debootstrap")


def _debootstrap(target: Path, progress: Progress, step: str) -> None:
    _remove(target)
    mirror = debian_mirror()
    argv = ["debootstrap", f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}",
            SUITE, str(target), mirror]
    progress(step, f"debootstrap {SUITE} from {mirror} (a few minutes, once)", 0.0)
    tail: list[str] = []
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"})
    assert proc.stdout is not None
    phases = {"Retrieving": 0.05, "Validating": 0.2, "Extracting": 0.3, "Installing": 0.4,
              "Unpacking": 0.45, "Configuring": 0.55, "Base system installed": 0.7}
    frac = 0.0
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-30:]
        for word, f in phases.items():
            if word in line:
                frac = max(frac, f)
        if line.startswith(("I:", "W:", "E:")):
            progress(step, line[3:].strip(), frac)
    rc = proc.wait()
    _umount_below(target)
    if rc != 0:
        log = target / "debootstrap" / "debootstrap.log"
        detail = "\n".join(tail)
        if log.exists():
            detail += "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise DevClusterError(f"debootstrap of Debian {SUITE} failed (exit {rc})", detail[-1500:],
                              f"check that {mirror} is reachable (apt-get update works?)")


def _trim(root: Path) -> None:
    for rel in TRIM:
        p = root / rel
        if p.is_dir() and not p.is_symlink():
            for child in p.iterdir():
                _remove(child)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for p in root.glob("usr/lib/python3*/**/__pycache__"):
        shutil.rmtree(p, ignore_errors=True)  # recompiled below without timestamps
    # Host identity must not leak into the image; the runtime bind-mounts these.
    for rel in ("etc/resolv.conf", "etc/hostname", "etc/machine-id"):
        p = root / rel
        if p.exists() or p.is_symlink():
            p.unlink()
        p.write_text("")


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].replace("\\040", " ")
            if mnt.startswith(prefix) or mnt == prefix[:-1]:
                out.append(mnt)
    return out


def _umount_below(path: Path) -> None:
    """debootstrap mounts /proc and /sys in the target; a failed run leaves them."""
    for mnt in sorted(_mounts_below(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], capture_output=True)


def _remove(p: Path) -> None:
    """Delete a file or tree, never following a mount point out of it."""
    if p.is_dir() and not p.is_symlink():
        _umount_below(p)
        if _mounts_below(p):
            raise DevClusterError(f"cannot clean {p}", "something is still mounted below it",
                                  f"unmount the mounts under {p} and retry")
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()
