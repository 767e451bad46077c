"""The traffic-agent's file service: the app's volumes over plain SFTP.

The laptop mounts the intercepted pod's volumes with `sshfs -o directport=`
(or reads them through tpnb/remotefs.py without FUSE).  No SSH is involved:
each TCP connection accepted on `agent.sftp_port` gets its own Debian
`/usr/lib/openssh/sftp-server` process whose stdin/stdout *is* the socket, so
file data never passes through Python (that is what makes 200 MB reads fast).

What is exposed, and why that is acceptable for a dev tool:

* The injector mounts every volume of the app container into the agent under
  `mount_prefix` (`/tpnb/volumes`) + the original mountPath, with the same
  readOnly/subPath, so the laptop sees exactly what the app sees, read-write
  where the app may write.
* sftp-server starts in `mount_prefix` (`-d`); it cannot chroot without
  privileges, so a client that asks for absolute paths outside it reads the
  agent container's own filesystem (the project image; nothing secret beyond
  what the pod already mounts).  Only clients that reach the pod IP -- i.e.
  tpnb-connected laptops of users allowed to intercept -- get here at all.
* The pod's ServiceAccount token volume is added to every container by
  admission, so it is not in the workload template the injector copies; we
  link the agent's own (the same projected volume) into the tree, so it
  appears like any other volume.

Runs inside the cluster image: Python 3.11, stdlib only.
"""
from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import pwd
import socket
from pathlib import Path
from typing import Any

log = logging.getLogger("tpnb.agent.sftp")

SFTP_SERVER = "/usr/lib/openssh/sftp-server"
#: where admission mounts the pod's ServiceAccount token into every container
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: concurrent clients: each is one sftp-server process (a few MB of memory)
MAX_SESSIONS = 32
#: Debian's libnss-wrapper (in the image): a passwd entry for a uid the image does not know
NSS_WRAPPER_GLOB = "/usr/lib/*/libnss_wrapper.so"
#: the name the agent's uid gets when the image's /etc/passwd has no entry for it
AGENT_USER = "tpnb-agent"


def link_service_account(root: str, sa_dir: str = SA_DIR) -> str | None:
    """Make the pod's ServiceAccount volume visible under `root` like the others.

    A symlink (clients follow it server-side) rather than a copy: the token
    is rotated by the kubelet and must stay current.  Returns the link path,
    or None when there is nothing to link or no permission to do it.
    """
    if not os.path.isdir(sa_dir):
        return None
    link = Path(root) / sa_dir.lstrip("/")
    if link.exists() or link.is_symlink():
        return str(link) if link.is_symlink() else None  # the app mounts something there itself
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(sa_dir, target_is_directory=True)
    except OSError as exc:
        log.info("ServiceAccount volume not linked into %s: %s", root, exc)
        return None
    return str(link)


def server_argv(root: str) -> list[str]:
    """sftp-server logging its errors to stderr (= the agent's log), starting in `root`."""
    return [SFTP_SERVER, "-e", "-l", "ERROR", "-d", root]


def passwd_with(uid: int, gid: int, home: str, passwd: str, group: str) -> tuple[str, str]:
    """/etc/passwd and /etc/group texts that also name `uid` and `gid` (added when missing)."""
    def has(text: str, field: int, ident: int) -> bool:
        for line in text.splitlines():
            parts = line.split(":")
            if len(parts) > field and parts[field] == str(ident):
                return True
        return False

    def ends(text: str) -> str:
        return text if not text or text.endswith("\n") else text + "\n"

    if not has(passwd, 2, uid):
        passwd = ends(passwd) + f"{AGENT_USER}:x:{uid}:{gid}:tpnb traffic-agent:{home}:/usr/sbin/nologin\n"
    if not has(group, 2, gid):
        group = ends(group) + f"{AGENT_USER}:x:{gid}:\n"
    return passwd, group


class _Spawn:
    """How sftp-server is started: env and inherited fds (computed once per agent).

    sftp-server exits at once ("No user found for uid N", the client sees
    "Connection reset by peer") when its uid has no passwd entry -- the case
    whenever the agent runs as the app's uid, which images rarely list.
    Without root nothing can add one to /etc/passwd, so sftp-server then runs
    under nss_wrapper (LD_PRELOAD), reading passwd and group from in-memory
    files (memfd, inherited; no writable directory needed) that are the
    image's plus one line for our uid/gid.
    """

    def __init__(self, home: str) -> None:
        self.env: dict[str, str] | None = None
        self.fds: tuple[int, ...] = ()
        uid, gid = os.getuid(), os.getgid()
        try:
            pwd.getpwuid(uid)
            return
        except KeyError:
            pass
        lib = sorted(glob.glob(NSS_WRAPPER_GLOB))
        if not lib:
            log.warning("uid %d has no passwd entry and %s is missing: sftp-server will refuse to run "
                        "(volumes cannot be mounted)", uid, NSS_WRAPPER_GLOB)
            return
        texts = []
        for f in ("/etc/passwd", "/etc/group"):
            try:
                texts.append(Path(f).read_text())
            except OSError:
                texts.append("")
        passwd, group = passwd_with(uid, gid, home, texts[0], texts[1])
        fds = []
        for name, text in (("passwd", passwd), ("group", group)):
            fd = os.memfd_create(f"tpnb-{name}")  # close-on-exec; the child gets it via pass_fds
            os.write(fd, text.encode())
            fds.append(fd)
        self.fds = tuple(fds)
        self.env = dict(os.environ, LD_PRELOAD=lib[0], NSS_WRAPPER_PASSWD=f"/proc/self/fd/{fds[0]}",
                        NSS_WRAPPER_GROUP=f"/proc/self/fd/{fds[1]}")
        log.info("uid %d has no passwd entry in the image: sftp-server runs with nss_wrapper", uid)

    def kwargs(self) -> dict[str, Any]:
        return {"env": self.env, "pass_fds": self.fds} if self.env is not None else {}


_spawn: _Spawn | None = None


def spawn_kwargs(root: str) -> dict[str, Any]:
    """Extra arguments for starting sftp-server (see `_Spawn`)."""
    global _spawn
    if _spawn is None:
        _spawn = _Spawn(root)
    return _spawn.kwargs()


async def _session(conn: socket.socket, peer: str, root: str, sem: asyncio.Semaphore) -> None:
    try:
        async with sem:
            conn.setblocking(True)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *server_argv(root), stdin=conn.fileno(), stdout=conn.fileno(), close_fds=True,
                    **spawn_kwargs(root))
            except OSError as exc:
                log.warning("cannot start %s for %s: %s", SFTP_SERVER, peer, exc)
                return
            finally:
                conn.close()  # the child holds its own copy of the socket
            log.debug("sftp session for %s: pid %d", peer, proc.pid)
            try:
                rc = await proc.wait()
            except asyncio.CancelledError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                raise
            log.debug("sftp session for %s ended (exit %s)", peer, rc)
    finally:
        conn.close()


async def serve(port: int, root: str) -> None:
    """Accept SFTP clients on the pod's loopback, 127.0.0.1:`port`, until cancelled.

    Loopback only: other pods must not reach the app's files.  The one client
    is the agent itself, joining a tunnel that the manager brokers for the
    session holding the intercept (agent.Agent._answer_files).

    Never raises for a missing sftp-server or an unusable port: the agent's
    first job is the workload's traffic, so the file service only logs.
    """
    if not os.access(SFTP_SERVER, os.X_OK):
        log.warning("%s not found: volumes cannot be mounted on laptops", SFTP_SERVER)
        return
    with contextlib.suppress(OSError):  # no volumes: the runtime created no prefix dir
        os.makedirs(root, exist_ok=True)
    link_service_account(root)
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        lsock.bind(("127.0.0.1", port))
        lsock.listen(64)
    except OSError as exc:
        lsock.close()
        log.warning("file service disabled: cannot listen on port %d: %s", port, exc)
        return
    lsock.setblocking(False)
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(MAX_SESSIONS)
    tasks: set[asyncio.Task[None]] = set()
    log.info("volumes of the app served over SFTP on 127.0.0.1:%d (root %s)", port, root)
    try:
        while True:
            conn, addr = await loop.sock_accept(lsock)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = asyncio.ensure_future(_session(conn, f"{addr[0]}:{addr[1]}", root, sem))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
    finally:
        lsock.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
