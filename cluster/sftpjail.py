"""Keep SFTP requests inside the app's volumes.

sftp-server (cluster/sftp.py) cannot chroot without root, and the agent runs
without root or capabilities (Pod Security "restricted").  So the agent reads
the client's request stream on its way to sftp-server and lets a path through
only when it resolves (symlinks followed, `..` collapsed) inside the served
tree or the pod's ServiceAccount volume that the tree links to.  A request for
anything else has its path replaced by one that cannot exist inside the tree,
so sftp-server itself answers it with "no such file" under the request's own
id: from the client's side the outside of the tree does not exist, as in a
chroot.  Only the client-to-server direction is parsed; replies (file data)
pass untouched.

No library does this: paramiko and asyncssh implement whole SFTP servers on
top of SSH, not a filter in front of OpenSSH's sftp-server over a plain
stream; the framing needed here (SFTP v3, draft-ietf-secsh-filexfer-02: a
uint32 length, a type byte, a uint32 id, then strings) is a few lines.

Known limit: a symlink swapped in by the app between the check and
sftp-server's use of the path (a race only the workload itself can run) is
not caught; only the intercept's holder reaches this service at all.
"""
from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterable

log = logging.getLogger("tpnb.agent.sftp")

#: request types whose first string (after the id) is a path
_ONE_PATH = {3: "open", 7: "lstat", 9: "setstat", 11: "opendir", 13: "remove", 14: "mkdir", 15: "rmdir",
             16: "realpath", 17: "stat", 19: "readlink"}
#: requests naming two paths
_TWO_PATHS = {18: "rename", 20: "symlink"}
#: those that act on the final symlink itself (its parent must be inside; its target may be anywhere)
_NO_FOLLOW = {7, 13, 19, 18}
SSH_FXP_EXTENDED = 200
#: OpenSSH extensions: name -> how many path strings follow the name (None: no path; refused if unknown)
_EXTENSIONS: dict[str, int | None] = {
    "posix-rename@openssh.com": 2, "statvfs@openssh.com": 1, "hardlink@openssh.com": 2,
    "fstatvfs@openssh.com": None, "fsync@openssh.com": None, "lsetstat@openssh.com": 1,
    "limits@openssh.com": None, "expand-path@openssh.com": 1,
}
#: largest request accepted (sftp-server's own limit is 256 KiB of payload)
MAX_PACKET = 1 << 20


class Jail:
    """Decides whether a requested path may be served."""

    def __init__(self, root: str, also: Iterable[str] = ()) -> None:
        self.root = os.path.realpath(root)
        self.allowed = [self.root, *(os.path.realpath(a) for a in also)]
        self.denied_path = os.path.join(self.root, ".tpnb-outside-the-app-volumes", "denied")

    def _inside(self, real: str) -> bool:
        return any(real == a or real.startswith(a.rstrip("/") + "/") for a in self.allowed)

    def resolve(self, path: str, follow: bool = True) -> str:
        """The real path sftp-server would touch for `path` (relative paths start at the root)."""
        full = os.path.normpath(os.path.join(self.root, path) if not path.startswith("/") else path)
        if follow:
            return os.path.realpath(full)
        parent, name = os.path.split(full)
        return os.path.join(os.path.realpath(parent), name) if name else os.path.realpath(full)

    def allows(self, path: str, follow: bool = True) -> bool:
        return self._inside(self.resolve(path, follow))


def _string(buf: bytes, off: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from(">I", buf, off)
    end = off + 4 + n
    if end > len(buf):
        raise ValueError("string runs past the packet")
    return buf[off + 4:end], end


def _pack(s: bytes) -> bytes:
    return struct.pack(">I", len(s)) + s


def filter_packet(packet: bytes, jail: Jail) -> bytes:
    """One whole request (length prefix included) as sftp-server may see it."""
    if len(packet) < 9:
        return packet
    ptype = packet[4]
    body_at = 9  # length(4) type(1) id(4)
    try:
        if ptype in _ONE_PATH:
            path, end = _string(packet, body_at)
            if jail.allows(path.decode("utf-8", "surrogateescape"), follow=ptype not in _NO_FOLLOW):
                return packet
            return _rebuild(packet, body_at, [jail.denied_path.encode()], end, _ONE_PATH[ptype], [path])
        if ptype in _TWO_PATHS:
            a, mid = _string(packet, body_at)
            b, end = _string(packet, mid)
            if ptype == 20:  # symlink: refused outright (a link out of the tree is a way out of the jail)
                ok = False
            else:
                ok = all(jail.allows(p.decode("utf-8", "surrogateescape"), follow=False) for p in (a, b))
            if ok:
                return packet
            return _rebuild(packet, body_at, [jail.denied_path.encode()] * 2, end, _TWO_PATHS[ptype], [a, b])
        if ptype == SSH_FXP_EXTENDED:
            name, at = _string(packet, body_at)
            ext = name.decode("ascii", "replace")
            if ext not in _EXTENSIONS:
                log.info("sftp: extension %s refused", ext)
                return _rebuild(packet, body_at, [b"tpnb-refused@tpnb.io"], at, ext, [])
            npaths = _EXTENSIONS[ext]
            if not npaths:
                return packet
            paths, end = [], at
            for _ in range(npaths):
                p, end = _string(packet, end)
                paths.append(p)
            ok = ext != "hardlink@openssh.com" and all(
                jail.allows(p.decode("utf-8", "surrogateescape"), follow=ext != "posix-rename@openssh.com")
                for p in paths)
            if ok:
                return packet
            return _rebuild(packet, at, [jail.denied_path.encode()] * npaths, end, ext, paths)
    except (ValueError, struct.error):
        log.info("sftp: malformed request of type %d passed on (sftp-server rejects it)", ptype)
    return packet


def _rebuild(packet: bytes, at: int, strings: list[bytes], end: int, what: str, asked: list[bytes]) -> bytes:
    log.info("sftp: %s %s refused: outside the app's volumes", what,
             " ".join(a.decode("utf-8", "replace") for a in asked))
    body = packet[4:at] + b"".join(_pack(s) for s in strings) + packet[end:]
    return struct.pack(">I", len(body)) + body


class RequestFilter:
    """Feed it the client's bytes in any chunking; it hands whole, checked requests to `out`."""

    def __init__(self, jail: Jail, out: Callable[[bytes], None]) -> None:
        self.jail = jail
        self.out = out
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 4:
            (n,) = struct.unpack_from(">I", self.buf, 0)
            if n > MAX_PACKET:
                raise ValueError(f"SFTP request of {n} bytes is larger than {MAX_PACKET}")
            if len(self.buf) < 4 + n:
                return
            packet = bytes(self.buf[:4 + n])
            del self.buf[:4 + n]
            self.out(filter_packet(packet, self.jail))


class FilteringWriter:
    """An asyncio StreamWriter stand-in that filters what is written (see RequestFilter)."""

    def __init__(self, writer: object, jail: Jail) -> None:
        self._w = writer
        self._filter = RequestFilter(jail, writer.write)  # type: ignore[attr-defined]

    def write(self, data: bytes) -> None:
        self._filter.feed(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._w, name)
