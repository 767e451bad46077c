"""The intercepted pod's volumes on the laptop, through sshfs.

The traffic-agent serves the app container's volumes with sftp-server on its
pod's loopback (cluster/sftp.py); the traffic-manager joins it to a tunnel of
the session holding the intercept, which the connector offers on a 127.0.0.1
port (ForwardToCluster with the intercept's id).  sshfs talks SFTP straight to
that port (`-o directport`): no ssh, no keys.

Mounts outlive the process that made them (sshfs runs in the background, so
`tpnb intercept NAME` without `-- CMD` leaves the volumes mounted until
`tpnb leave NAME`).  A small state file, ~/.cache/tpnb/mounts.json, remembers
what we mounted so a crashed client's leftovers are unmounted by the next
`connect`/`intercept`/`leave`/`quit`.  Entries are per mount namespace: a
laptop invocation (`tpnb devcluster laptop`) has its own, and a mount is only
visible -- and only removable -- from inside it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

from . import config as tpnb_config
from .errors import ConfigError, InterceptError, PrerequisiteError

#: sshfs options, measured with bench/volumes.py (see its docstring for figures):
#: * follow_symlinks: ConfigMap/Secret files are symlinks into ..data/, and the
#:   ServiceAccount volume is linked in by the agent; resolved on the server they
#:   read like plain files;
#: * max_read/max_write=65536: sshfs's ceiling (default 32 KiB); each SFTP request
#:   crosses the tunnel, so bigger ones gave +40-50 % on the 200 MB read;
#: * kernel_cache: re-reads come from the page cache (volumes rarely change under us);
#: * reconnect: a restarted tunnel or daemon does not leave a dead mount;
#: * dir_cache (default on) with short timeouts: `ls -R` of thousands of files
#:   stays fast while changes made in the pod show up within seconds.
#: max_conns=2 measured within noise; not used (twice the sftp-server processes).
SSHFS_OPTIONS = (
    "reconnect",
    "idmap=none",
    "follow_symlinks",
    "kernel_cache",
    "max_read=65536",
    "max_write=65536",
    "dcache_timeout=5",
    "entry_timeout=5",
    "attr_timeout=5",
)
#: kernel readahead for the mount (KiB; FUSE's default is 128): more READs in
#: flight over the tunnel's latency, +10 % on sequential reads; root only
READ_AHEAD_KB = 4096
MOUNT_TIMEOUT = 30.0


class _HasPods(Protocol):
    name: str
    pod_ips: list[str]


# ------------------------------------------------------------------ checks

def check_fuse() -> None:
    """FUSE and sshfs are present, or a PrerequisiteError saying what to install."""
    if not os.path.exists("/dev/fuse"):
        raise PrerequisiteError("cannot mount the pod's volumes: /dev/fuse is missing",
                                "the kernel's FUSE module is not loaded (or this container has no /dev/fuse)",
                                "run `modprobe fuse`, or in a container add --device /dev/fuse; "
                                "`--mount=false` skips mounting")
    missing = [b for b in ("sshfs", "fusermount3") if shutil.which(b) is None]
    if missing:
        raise PrerequisiteError(f"cannot mount the pod's volumes: {' and '.join(missing)} not installed",
                                "tpnb mounts volumes with sshfs over FUSE 3",
                                "apt-get install sshfs fuse3 (or use `--mount=false`; the Python API "
                                "`Session.files(NAME)` reads files without FUSE)")


def prepare_root(root: str | os.PathLike[str] | None, name: str) -> Path:
    """The directory to mount on: a fresh temp dir, or the user's, which must be empty and writable."""
    if root is None or str(root) == "":
        return Path(tempfile.mkdtemp(prefix=f"tpnb-{name}-"))
    p = Path(root).expanduser().absolute()
    if not p.exists():
        try:
            p.mkdir(parents=True)
        except OSError as exc:
            raise ConfigError(f"cannot create mount point {p}", exc.strerror or str(exc),
                              "choose a directory you can write, or leave --mount out for a temp dir") from None
        return p
    if not p.is_dir():
        raise ConfigError(f"cannot mount on {p}", "it is not a directory", "choose an empty directory")
    if is_mounted(p):
        raise ConfigError(f"cannot mount on {p}", "something is already mounted there",
                          f"`fusermount3 -u {p}` or choose another directory")
    try:
        entries = os.listdir(p)
    except OSError as exc:
        raise ConfigError(f"cannot mount on {p}", exc.strerror or str(exc), "choose an empty directory") from None
    if entries:
        raise ConfigError(f"cannot mount on {p}", f"the directory is not empty ({len(entries)} entries)",
                          "choose an empty directory, or leave --mount out for a fresh temp dir")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot mount on {p}", "the directory is not writable by you",
                          "choose a directory you own, or leave --mount out for a fresh temp dir")
    return p


# ------------------------------------------------------------------ mount table

def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def sshfs_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points of fuse.sshfs filesystems in our mount namespace."""
    out = []
    try:
        text = Path(mountinfo).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        parts = left.split()
        if len(parts) >= 5 and right.split(" ", 1)[0] == "fuse.sshfs":
            out.append(_unescape(parts[4]))
    return out


def is_mounted(root: str | os.PathLike[str]) -> bool:
    return os.path.realpath(root) in {os.path.realpath(m) for m in sshfs_mounts()} or \
        str(root) in sshfs_mounts()


# ------------------------------------------------------------------ state file

def _state_path() -> Path:
    return tpnb_config._home() / ".cache" / "tpnb" / "mounts.json"


def _mnt_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/mnt")
    except OSError:
        return "mnt:[?]"


def _processes_by_mnt_ns() -> dict[str, list[tuple[int, str]]]:
    """mount namespace -> [(pid, command name)] of every process we may look at."""
    out: dict[str, list[tuple[int, str]]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                ns = os.readlink(f"/proc/{d}/ns/mnt")
                comm = Path(f"/proc/{d}/comm").read_text().strip()
                out.setdefault(ns, []).append((int(d), comm))
    return out


def _live_mnt_namespaces() -> set[str]:
    """Mount namespaces some process still uses (a gone one's mounts are gone with it)."""
    return set(_processes_by_mnt_ns())


def _reap_orphan_sshfs() -> list[int]:
    """Stop sshfs daemons that are the last processes of their mount namespace.

    A client that mounted from a private mount namespace (e.g. every
    `ip netns exec` call) and exited leaves sshfs as the only thing keeping
    that namespace, and its mount, alive: nobody can reach the mount any more,
    so the daemon would serve it forever.  The user's own namespace always
    has other processes, so a mount still in use is never touched.
    """
    mine = _mnt_ns()
    killed = []
    for ns, procs in _processes_by_mnt_ns().items():
        if ns != mine and procs and all(comm == "sshfs" for _, comm in procs):
            for pid, _ in procs:
                with contextlib.suppress(OSError):
                    os.kill(pid, 15)
                    killed.append(pid)
    return killed


@contextlib.contextmanager
def _state() -> Iterator[dict[str, Any]]:
    """The state file, locked for the duration, written back on exit."""
    path = _state_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a+")
    except OSError:  # no writable cache dir: mounts work, only crash cleanup is lost
        yield {}
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            with contextlib.suppress(OSError):
                tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
                os.replace(tmp, path)


def _key(name: str) -> str:
    return f"{_mnt_ns()} {name}"


def mounts() -> dict[str, Path]:
    """Intercept name -> mount point, for the mounts of this mount namespace that are still there."""
    _reap_orphan_sshfs()
    mine = _mnt_ns() + " "
    live = set(sshfs_mounts())
    with _state() as st:
        return {k[len(mine):]: Path(v["root"]) for k, v in st.items()
                if k.startswith(mine) and v.get("root") in live}


# ------------------------------------------------------------------ mount / unmount

def sshfs_argv(pod_ip: str, root: Path, port: int, prefix: str) -> list[str]:
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return ["sshfs", f"{host}:{prefix}", str(root), "-o", ",".join((f"directport={port}", *SSHFS_OPTIONS))]


def mount(intercept: _HasPods, root: str | os.PathLike[str] | None = None,
          cfg: tpnb_config.Config | None = None, *, via: tuple[str, int]) -> Path:
    """Mount the intercepted pod's volumes on `root` (default: a fresh temp dir); returns the mount point.

    Paths below it are the app's: `<root>/etc/config/app.yaml` is the app's
    `/etc/config/app.yaml`.
    """
    cfg = cfg or tpnb_config.get()
    check_fuse()
    if not intercept.pod_ips:
        raise InterceptError(f"cannot mount the volumes of {intercept.name}",
                             "the intercept has no pod address yet", "retry once it is ACTIVE")
    cleanup_stale()
    made = root is None or str(root) == "" or not Path(root).exists()
    target = prepare_root(root, intercept.name)
    # `via`: the connector's loopback forward to this intercept's file service
    host, port = via
    argv = sshfs_argv(host, target, port, cfg.agent.mount_prefix)
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=MOUNT_TIMEOUT,
                             stdin=subprocess.DEVNULL)
        err = (res.stderr or res.stdout).strip()
        ok = res.returncode == 0
    except subprocess.TimeoutExpired:
        ok, err = False, f"sshfs did not finish within {MOUNT_TIMEOUT:.0f}s"
    except OSError as exc:
        ok, err = False, exc.strerror or str(exc)
    if not ok or not _wait_mounted(target):
        if is_mounted(target):
            _fusermount(target)
        if made:
            with contextlib.suppress(OSError):
                target.rmdir()
        raise InterceptError(
            f"cannot mount the volumes of {intercept.name} on {target}", err or "sshfs failed",
            "is the traffic-agent's file service up? `kubectl logs POD -c traffic-agent`; "
            "the intercept itself works without it")
    _raise_readahead(target)
    with _state() as st:
        st[_key(intercept.name)] = {"root": str(target), "pod_ip": intercept.pod_ips[0], "made": made,
                                    "pid": os.getpid(), "time": time.time()}
    return target


def _raise_readahead(root: Path) -> None:
    """Best effort: /sys/class/bdi/<major:minor>/read_ahead_kb of the new mount (root only)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        parts = line.split()
        if len(parts) > 4 and _unescape(parts[4]) == str(root):
            with contextlib.suppress(OSError):
                Path(f"/sys/class/bdi/{parts[2]}/read_ahead_kb").write_text(str(READ_AHEAD_KB))
            return


def _wait_mounted(root: Path, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mounted(root):
            return True
        time.sleep(0.05)
    return False


def _fusermount(root: str | Path) -> str:
    """Unmount; lazily when busy (a shell still cd'd into it). '' on success, else why not."""
    err = ""
    for args in (["-u"], ["-u", "-z"]):
        try:
            res = subprocess.run(["fusermount3", *args, str(root)], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            err = str(exc)
            continue
        if res.returncode == 0 or not is_mounted(root):
            return ""
        err = res.stderr.strip()
    return err or "fusermount3 failed"


def _drop(root: str, made: bool) -> None:
    if made:
        with contextlib.suppress(OSError):
            os.rmdir(root)  # only ever an empty dir we created


def unmount(root: str | os.PathLike[str]) -> None:
    """Unmount `root` (lazily if busy) and forget it."""
    root = str(root)
    err = _fusermount(root) if is_mounted(root) else ""
    with _state() as st:
        for k, v in list(st.items()):
            if v.get("root") == root:
                del st[k]
                if not err:
                    _drop(root, bool(v.get("made")))
    if err:
        raise InterceptError(f"cannot unmount {root}", err, f"close programs using it, then `fusermount3 -u {root}`")


def unmount_name(name: str) -> Path | None:
    """Unmount the volumes of intercept `name` mounted from this mount namespace; the root, or None."""
    with _state() as st:
        entry = st.get(_key(name))
    if not entry:
        return None
    unmount(entry["root"])
    return Path(entry["root"])


def cleanup_stale(active: dict[str, list[str]] | None = None) -> list[str]:
    """Unmount and forget what no live intercept needs; returns the roots cleaned.

    `active`: intercept name -> pod IPs of the session's intercepts (None:
    only drop entries whose mount or mount namespace is gone).  Mounts of
    other mount namespaces are never touched (we could not see them).
    """
    _reap_orphan_sshfs()
    mine = _mnt_ns() + " "
    live = set(sshfs_mounts())
    alive_ns: set[str] | None = None
    cleaned: list[str] = []
    with _state() as st:
        for k, v in list(st.items()):
            root = str(v.get("root", ""))
            if not k.startswith(mine):
                if alive_ns is None:
                    alive_ns = _live_mnt_namespaces()
                if k.split(" ", 1)[0] not in alive_ns:
                    del st[k]
                continue
            name = k[len(mine):]
            if root not in live:
                del st[k]
                _drop(root, bool(v.get("made")))
                continue
            if active is not None and v.get("pod_ip") not in active.get(name, []):
                if not _fusermount(root):
                    del st[k]
                    _drop(root, bool(v.get("made")))
                    cleaned.append(root)
    return cleaned
