"""The agent's SFTP jail (cluster/sftpjail.py) in front of a real Debian sftp-server.

A hostile client -- tpnb's own SFTP client with no prefix, so it names any
absolute path it likes -- talks to sftp-server through the jail, exactly as
the agent relays the intercept holder's requests.  Inside the served tree
(and the ServiceAccount volume it links to) everything works; the agent
container's own files, `/`, and symlinks that lead out do not exist.
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from tpnb import remotefs
from tpnb.cluster import sftpjail

pytestmark = pytest.mark.unit

SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def _relay(client: socket.socket, server: socket.socket, jail: sftpjail.Jail) -> list[threading.Thread]:
    filt = sftpjail.RequestFilter(jail, server.sendall)

    def up() -> None:
        while data := client.recv(65536):
            filt.feed(data)
        server.shutdown(socket.SHUT_WR)

    def down() -> None:
        while data := server.recv(65536):
            client.sendall(data)
        client.shutdown(socket.SHUT_WR)

    threads = [threading.Thread(target=f, daemon=True) for f in (up, down)]
    for t in threads:
        t.start()
    return threads


@pytest.fixture
def jailed(tmp_path: Path) -> Iterator[tuple[remotefs.RemoteFS, Path, Path]]:
    if not os.access(SFTP_SERVER, os.X_OK):
        pytest.skip("openssh-sftp-server is not installed (scripts/install-deps installs it)")
    root = tmp_path / "volumes"
    cfg = root / "etc" / "config"
    (cfg / "..2024_01_01").mkdir(parents=True)
    (cfg / "..2024_01_01" / "app.yaml").write_text("greeting: hello\n")
    os.symlink("..2024_01_01", cfg / "..data")
    os.symlink("..data/app.yaml", cfg / "app.yaml")
    (root / "data").mkdir()
    os.symlink("/etc", root / "data" / "escape")          # a link the app made, leading out
    sa = tmp_path / "serviceaccount"                        # the pod's ServiceAccount volume, outside the tree
    sa.mkdir()
    (sa / "token").write_text("the-token")
    (root / "var" / "run" / "secrets" / "kubernetes.io").mkdir(parents=True)
    os.symlink(sa, root / "var" / "run" / "secrets" / "kubernetes.io" / "serviceaccount")
    (tmp_path / "outside.txt").write_text("not yours")

    ours, relay_c = socket.socketpair()
    relay_s, theirs = socket.socketpair()
    proc = subprocess.Popen([SFTP_SERVER, "-e", "-d", str(root)], stdin=theirs, stdout=theirs)
    theirs.close()
    threads = _relay(relay_c, relay_s, sftpjail.Jail(str(root), also=[str(sa)]))
    fs = remotefs.RemoteFS("agent", 0, prefix="", sock=ours)   # a client that names absolute paths
    try:
        yield fs, root, tmp_path
    finally:
        fs.close()
        proc.wait(10)
        for t in threads:
            t.join(5)


def test_inside_the_volumes_everything_works(jailed: tuple[remotefs.RemoteFS, Path, Path]) -> None:
    fs, root, _ = jailed
    assert fs.read_text(f"{root}/etc/config/app.yaml") == "greeting: hello\n"   # configmap-style symlinks
    assert sorted(fs.listdir(f"{root}/etc/config")) == ["..2024_01_01", "..data", "app.yaml"]
    assert fs.read_text(f"{root}/var/run/secrets/kubernetes.io/serviceaccount/token") == "the-token"
    fs.write_text(f"{root}/data/new.txt", "from the laptop\n")
    assert (root / "data" / "new.txt").read_text() == "from the laptop\n"
    assert fs.stat(f"{root}/data/escape", follow_symlinks=False).is_symlink()   # the link itself: visible


def test_outside_the_volumes_nothing_exists(jailed: tuple[remotefs.RemoteFS, Path, Path]) -> None:
    fs, root, tmp = jailed
    for path in ("/etc/passwd", f"{tmp}/outside.txt", f"{root}/../outside.txt", f"{root}/data/escape/passwd",
                 "/proc/self/environ"):
        with pytest.raises(FileNotFoundError):
            fs.read_bytes(path)
    for path in ("/", "/etc", f"{root}/data/escape", f"{root}/.."):
        with pytest.raises(FileNotFoundError):
            fs.listdir(path)
        with pytest.raises(FileNotFoundError):
            fs.stat(path)
    with pytest.raises(FileNotFoundError):
        fs.write_text(f"{tmp}/planted.txt", "x")
    assert not (tmp / "planted.txt").exists()
    # and the session still works after the refusals
    assert fs.read_text(f"{root}/etc/config/app.yaml") == "greeting: hello\n"


def _req(ptype: int, *strings: bytes) -> bytes:
    body = bytes([ptype]) + struct.pack(">I", 7) + b"".join(struct.pack(">I", len(s)) + s for s in strings)
    return struct.pack(">I", len(body)) + body


def test_links_and_renames_out_of_the_tree_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "v"
    (root / "a").mkdir(parents=True)
    jail = sftpjail.Jail(str(root))
    inside_rename = _req(18, f"{root}/a/x".encode(), f"{root}/a/y".encode())
    assert sftpjail.filter_packet(inside_rename, jail) == inside_rename
    lp = lambda s: struct.pack(">I", len(s)) + s  # noqa: E731 - an SFTP string
    for pkt, outside in ((_req(18, f"{root}/a/x".encode(), b"/tmp/x"), b"/tmp/x"),           # rename out
                         (_req(20, b"/etc/shadow", f"{root}/a/l".encode()), b"/etc/shadow"),  # symlink: never
                         (_req(200, b"hardlink@openssh.com", b"/etc/passwd", f"{root}/a/h".encode()),
                          b"/etc/passwd"),
                         (_req(200, b"posix-rename@openssh.com", f"{root}/a/x".encode(), b"/tmp/y"), b"/tmp/y"),
                         (_req(200, b"copy-data", b""), b"copy-data")):                    # unknown extension
        out = sftpjail.filter_packet(pkt, jail)
        assert out != pkt and lp(outside) not in out
        assert out[4] == pkt[4] and out[5:9] == pkt[5:9]   # same type and id: sftp-server answers it
        (n,) = struct.unpack(">I", out[:4])
        assert n == len(out) - 4
    # any chunking of the stream gives the same requests
    got: list[bytes] = []
    filt = sftpjail.RequestFilter(jail, got.append)
    stream = inside_rename + _req(17, b"/etc/passwd")
    for i in range(len(stream)):
        filt.feed(stream[i:i + 1])
    assert got[0] == inside_rename and lp(b"/etc/passwd") not in got[1]
    with pytest.raises(ValueError):
        sftpjail.RequestFilter(jail, got.append).feed(struct.pack(">I", 1 << 30))
