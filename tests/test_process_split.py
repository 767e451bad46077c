"""The process layout end to end: a user-level connector beside a networking-only root daemon.

Each test runs the real CLI as a real non-root user inside a laptop network
namespace of the dev cluster, and looks at the processes it started the way
`ps` would (/proc): who runs as root, what each process holds, and what a
`kill -9` of either leaves for the next `connect`.

The test users are made here (`useradd`); one may use sudo without a
password (a sudoers drop-in that the fixture removes again), the other may
not.  This machine's interpreter lives under /root (mode 0700), so commands
run in a private mount namespace where /root is a 0711 directory holding
bind mounts of just what the interpreter and the checkout need; nothing on
the machine itself changes.
"""
from __future__ import annotations

import os
import pwd
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import REPO, LaptopRunner

pytestmark = pytest.mark.cluster

NS = "tpsplit"
ECHO = "tpnb.local/echoserver:1.4"
SUDO_USER, PLAIN_USER = "tpnbsudo", "tpnbplain"
SUDOERS = Path("/etc/sudoers.d/tpnb-test")


def _ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
        return pwd.getpwnam(name)


def _under_root() -> list[str]:
    """Top-level entries of /root that the interpreter and the checkout live in."""
    out = []
    for p in (Path(sys.executable).resolve(), Path(sys.executable).absolute(), REPO.resolve()):
        if p.parts[:2] == ("/", "root") and len(p.parts) > 2:
            out.append(p.parts[2])
    return sorted(set(out))


class UserLaptop:
    """Runs commands in a laptop namespace as user `pw`, with its own kubeconfig copy."""

    def __init__(self, lap: LaptopRunner, pw: pwd.struct_passwd) -> None:
        self.lap, self.pw = lap, pw
        base = lap.cmd(["true"])
        self.netns = base[3]
        self.path = next(a.split("=", 1)[1] for a in base if a.startswith("PATH="))
        self.kubeconfig = Path(pw.pw_dir) / "kubeconfig"
        self.kubeconfig.write_bytes(Path(lap.cluster.kubeconfig_path).read_bytes())
        os.chown(self.kubeconfig, pw.pw_uid, pw.pw_gid)
        os.chmod(self.kubeconfig, 0o600)

    def cmd(self, argv: list[str]) -> list[str]:
        binds = "".join(f"mkdir -p \"$f/{e}\"; mount --bind \"/root/{e}\" \"$f/{e}\"; " for e in _under_root())
        script = ("set -e; f=$(mktemp -d); chmod 711 \"$f\"; " + binds
                  + ("mount --rbind \"$f\" /root; " if _under_root() else "")
                  + f"exec setpriv --reuid={self.pw.pw_uid} --regid={self.pw.pw_gid} --init-groups "
                  + f"env -i HOME={shlex.quote(self.pw.pw_dir)} USER={self.pw.pw_name} "
                  + f"PATH={shlex.quote(self.path)} KUBECONFIG={shlex.quote(str(self.kubeconfig))} \"$@\"")
        return ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private",
                "sh", "-c", script, "sh", *argv]

    def run(self, argv: list[str], *, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(self.cmd(argv), capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"as {self.pw.pw_name}: {argv} exited {res.returncode}\n"
                                 f"stdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-2000:]}")
        return res

    def tpnb_processes(self) -> dict[str, list[dict[str, Any]]]:
        """This laptop's tpnb processes (python ones, not the sudo launcher), by role."""
        netns_ino = os.stat(f"/run/netns/{self.netns}").st_ino
        out: dict[str, list[dict[str, Any]]] = {"connector": [], "daemon": []}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
                if os.stat(d / "ns" / "net").st_ino != netns_ino or not Path(argv[0].decode()).name.startswith("python"):
                    continue
                status = (d / "status").read_text()
                env = (d / "environ").read_bytes().split(b"\0")
                fds = [os.readlink(f) for f in (d / "fd").iterdir()]
                children = " ".join((t / "children").read_text() for t in (d / "task").iterdir()).split()
            except (OSError, IndexError):
                continue
            uid = int(next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1])
            for role in out:
                if f"tpnb.{role}".encode() in argv:
                    out[role].append({"pid": int(d.name), "uid": uid, "env": env, "fds": fds, "children": children})
        return out


@pytest.fixture(scope="module")
def users(devcluster: Any) -> Iterator[tuple[UserLaptop, UserLaptop]]:
    lap = LaptopRunner(devcluster, "split")
    lap.fresh_namespace(NS, timeout=120)
    lap.kubectl("-n", NS, "create", "deploy", "hello", f"--image={ECHO}")
    lap.kubectl("-n", NS, "expose", "deploy", "hello", "--port", "80", "--target-port", "8080")
    lap.kubectl("-n", NS, "rollout", "status", "deploy/hello", "--timeout=120s", timeout=150)
    sudo_pw, plain_pw = _ensure_user(SUDO_USER), _ensure_user(PLAIN_USER)
    SUDOERS.write_text(f"{SUDO_USER} ALL=(root) NOPASSWD: ALL\n")
    os.chmod(SUDOERS, 0o440)
    with_sudo, without = UserLaptop(lap, sudo_pw), UserLaptop(lap, plain_pw)
    try:
        yield with_sudo, without
    finally:
        for u in (with_sudo, without):
            u.run(["tpnb", "quit", "--daemon"], check=False)
        SUDOERS.unlink(missing_ok=True)
        lap.drop_namespace(NS)


def _curl(u: UserLaptop, host: str) -> subprocess.CompletedProcess[str]:
    return u.run(["curl", "-sS", "--max-time", "5", host], check=False, timeout=30)


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _no_sessions(users: tuple[UserLaptop, UserLaptop]) -> None:
    """Neither user has a connector or daemon in the laptop (what a failed test before may have left)."""
    for u in users:
        u.run(["tpnb", "quit", "--daemon"], check=False)
    _wait(lambda: all(u.tpnb_processes() == {"connector": [], "daemon": []} for u in users), 10,
          "the laptop to have no tpnb process")


def test_only_the_network_daemon_runs_as_root_and_it_holds_no_credentials(
        users: tuple[UserLaptop, UserLaptop]) -> None:
    u, _ = users
    _no_sessions(users)
    r = u.run(["tpnb", "connect", "--namespace", NS])
    assert "Connected to context" in r.stdout
    assert "CLIENT VALUES:" in _curl(u, f"hello.{NS}").stdout  # system-wide outbound, as the user
    proc = subprocess.Popen(u.cmd(["tpnb", "intercept", "hello", "--port", "9555", "--mount=false", "--",
                                   "python3", "-m", "http.server", "9555", "--bind", "127.0.0.1"]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait(lambda: "(ACTIVE)" in u.run(["tpnb", "status"]).stdout, 120, "the intercept to be ACTIVE")
        _check_processes(u)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    u.run(["tpnb", "quit", "--daemon"])
    _wait(lambda: u.tpnb_processes() == {"connector": [], "daemon": []}, 10, "connector and daemon to exit")


def _check_processes(u: UserLaptop) -> None:
    """What `ps` shows during a connected session with an intercept."""
    procs = u.tpnb_processes()
    assert len(procs["connector"]) == 1 and len(procs["daemon"]) == 1, procs
    conn, daemon = procs["connector"][0], procs["daemon"][0]
    assert conn["uid"] == u.pw.pw_uid  # the connector runs as the invoking user
    assert daemon["uid"] == 0          # ... and the root daemon is the only root process of tpnb
    assert any(e.startswith(b"KUBECONFIG=") for e in conn["env"])
    assert not any(e.startswith(b"KUBECONFIG=") for e in daemon["env"])
    assert not any("kubeconfig" in f or "token" in f for f in daemon["fds"]), daemon["fds"]
    assert daemon["children"] == []    # no exec credential plugin, no kubectl
    st = u.run(["tpnb", "status"]).stdout
    assert "TCP engine" in st and "hello: " in st


def test_kill9_of_either_process_then_connect_recovers(users: tuple[UserLaptop, UserLaptop]) -> None:
    u, _ = users
    _no_sessions(users)
    resolv_before = u.run(["cat", "/etc/resolv.conf"]).stdout
    u.run(["tpnb", "connect", "--namespace", NS])
    assert _curl(u, f"hello.{NS}").returncode == 0

    # the connector dies: the root daemon notices and takes the network down by itself
    os.kill(u.tpnb_processes()["connector"][0]["pid"], 9)
    _wait(lambda: (u.run(["cat", "/etc/resolv.conf"]).stdout == resolv_before
                   and "tpnb0" not in u.run(["ip", "-o", "link"]).stdout), 15,
          "the root daemon to restore resolv.conf and remove its TUN after its connector died")
    r = u.run(["tpnb", "connect", "--namespace", NS])
    assert "Connected to context" in r.stdout
    assert _curl(u, f"hello.{NS}").returncode == 0

    # the root daemon dies: the connector keeps the session; connect restarts the daemon
    old_daemon = u.tpnb_processes()["daemon"][0]["pid"]
    os.kill(old_daemon, 9)
    _wait(lambda: "not system-wide" in u.run(["tpnb", "status"]).stdout, 15, "status to report the lost daemon")
    r = u.run(["tpnb", "connect", "--namespace", NS])
    assert "Connected to context" in r.stdout
    assert [p["pid"] for p in u.tpnb_processes()["daemon"]] != [old_daemon]
    assert _curl(u, f"hello.{NS}").returncode == 0

    # the connector dies again and the root daemon outlives it: `quit --daemon` stops that one too
    os.kill(u.tpnb_processes()["connector"][0]["pid"], 9)
    _wait(lambda: u.tpnb_processes()["connector"] == [], 10, "the killed connector to be gone")
    r = u.run(["tpnb", "quit", "--daemon"])
    assert "root daemon" in r.stdout and "quitting...done" in r.stdout, r.stdout + r.stderr
    _wait(lambda: u.tpnb_processes() == {"connector": [], "daemon": []}, 10, "the lone root daemon to exit")
    assert u.run(["cat", "/etc/resolv.conf"]).stdout == resolv_before


def test_without_root_or_sudo_everything_but_outbound_works(users: tuple[UserLaptop, UserLaptop]) -> None:
    _, u = users
    _no_sessions(users)
    resolv_before = u.run(["cat", "/etc/resolv.conf"]).stdout
    r = u.run(["tpnb", "connect", "--namespace", NS])
    assert "Connected to context" in r.stdout
    assert "System-wide outbound needs the root daemon" in r.stdout, r.stdout
    assert "intercepts, env and volumes work" in r.stdout
    st = u.run(["tpnb", "status"]).stdout
    assert "Outbound         : not system-wide" in st and "sudo" in st, st
    procs = u.tpnb_processes()
    assert procs["daemon"] == [] and [p["uid"] for p in procs["connector"]] == [u.pw.pw_uid]
    assert u.run(["cat", "/etc/resolv.conf"]).stdout == resolv_before  # nothing of the machine changed

    # an intercept with a command: the cluster's request is answered by the user's process
    script = ("import http.server as h\n"
              "class H(h.BaseHTTPRequestHandler):\n"
              "    def do_GET(self):\n"
              "        self.send_response(200); self.end_headers(); self.wfile.write(b'from the rootless laptop')\n"
              "try:\n"
              "    h.HTTPServer(('127.0.0.1', 9556), H).serve_forever()\n"
              "except KeyboardInterrupt:\n"
              "    pass\n")
    proc = subprocess.Popen(u.cmd(["tpnb", "intercept", "hello", "--port", "9556", "--mount=false", "--",
                                   "python3", "-c", script]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        def answered() -> bool:
            code = "import urllib.request;print(urllib.request.urlopen('http://hello', timeout=5).read().decode())"
            r = u.lap.kubectl("-n", NS, "exec", "deploy/hello", "-c", "traffic-agent", "--", "python3", "-c", code,
                              check=False, timeout=60)
            return "from the rootless laptop" in r.stdout
        _wait(answered, 120, "the intercepted request to reach the user's command")
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # <ctrl>-C
        out, err = proc.communicate(timeout=60)
    assert "Intercept name: hello" in out, out + err
    assert "Traceback" not in out + err, out + err
    _wait(lambda: "hello: " not in u.run(["tpnb", "status"]).stdout, 10, "the intercept to end with its command")

    # env and files of the intercepted pod, with no route to pod IPs: files through the connector's forward
    code = ("from tpnb.api import Session; s = Session(); env = s.env('hello'); "
            "print(env['KUBERNETES_SERVICE_HOST'], env['HOSTNAME'].startswith('hello-')); "
            "print(s.files('hello').read_text('/var/run/secrets/kubernetes.io/serviceaccount/namespace'))")
    r = u.run(["tpnb", "intercept", "hello", "--port", "9557", "--mount=false", "--", "python3", "-c", code])
    lines = r.stdout.split()
    assert lines[-2:] == ["True", NS], r.stdout + r.stderr
    u.run(["tpnb", "quit", "--daemon"])
    _wait(lambda: u.tpnb_processes() == {"connector": [], "daemon": []}, 10, "connector and daemon to exit")


def test_another_user_reaches_neither_the_connector_nor_the_root_daemon(
        users: tuple[UserLaptop, UserLaptop]) -> None:
    """A second local user attacks the first one's sockets for real; the first one's own calls still work."""
    owner, other = users
    _no_sessions(users)
    owner.run(["tpnb", "connect", "--namespace", NS])
    try:
        uid = owner.pw.pw_uid
        probe = ("import glob, socket, sys\n"
                 "for path in sys.argv[1:]:\n"
                 "    s = socket.socket(socket.AF_UNIX)\n"
                 "    try:\n"
                 "        s.connect(path); print(path, 'CONNECTED')\n"
                 "    except OSError as e:\n"
                 "        print(path, type(e).__name__)\n")
        netns = os.stat(f"/run/netns/{owner.netns}").st_ino
        targets = [f"/run/tpnb/{netns}/daemon.sock", f"/tmp/tpnb-{uid}/{netns}/connector.sock"]
        targets += sorted(str(p) for p in Path(f"/tmp/tpnb-{uid}/{netns}").glob("manager-*.sock"))
        assert len(targets) == 3 and all(os.path.exists(t) for t in targets), targets
        out = other.run(["python3", "-c", probe, *targets]).stdout.splitlines()
        assert out == [f"{t} PermissionError" for t in targets], out
        # the other user's own connect works beside it, without taking the owner's daemon over
        r = other.run(["tpnb", "connect", "--namespace", NS])
        assert "Connected to context" in r.stdout and "System-wide outbound" in r.stdout
        assert "CLIENT VALUES:" in _curl(owner, f"hello.{NS}").stdout  # the owner's outbound still works
        assert "TCP engine" in owner.run(["tpnb", "status"]).stdout
    finally:
        _no_sessions(users)
