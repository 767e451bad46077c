"""`tpnb intercept/connect -- CMD`: signals sent to tpnb reach CMD, and CMD never outlives tpnb.

Runs `tpnb.cli._run_cmd` (what both commands use) in a real child process with real commands,
on 127.0.0.1 only.  The end-to-end case (`kill -TERM` of `tpnb intercept ... -- python3 -m
http.server`) is in tests/test_signals.py.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

WRAP = ("import sys, tpnb.cli as c; c.KILL_AFTER = float(sys.argv[1]); "
        "lost_after = float(sys.argv[2]); import time; t0 = time.monotonic(); "
        "lost = (lambda: 'the test says so' if time.monotonic() - t0 > lost_after else None) if lost_after else None; "
        "sys.exit(c._run_cmd(sys.argv[3:], lost=lost))")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], kill_after: float = 5.0, lost_after: float = 0.0, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRAP, str(kill_after), str(lost_after), *cmd],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_listening(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def child_of(pid: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if kids:
            return int(kids[0])
        time.sleep(0.02)
    raise AssertionError("no child")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return not alive(pid)


def test_sigterm_ends_the_http_server_and_tpnb_within_2s() -> None:
    port = free_port()
    p = start(["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"])
    try:
        wait_listening(port)
        server = child_of(p.pid)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(5)
        assert time.monotonic() - t0 < 2.0
        assert gone_within(server, 0.5)
        assert rc == 128 + signal.SIGTERM  # like a shell: the command died of SIGTERM
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    finally:
        p.kill()


def test_kill_9_of_tpnb_takes_the_command_with_it() -> None:
    p = start(["sleep", "600"])
    try:
        child = child_of(p.pid)
        time.sleep(0.2)  # past exec
        p.kill()
        p.wait(5)
        assert gone_within(child, 2.0), "the command outlived a killed tpnb"
    finally:
        p.kill()


def test_a_command_ignoring_sigterm_is_killed_after_the_grace() -> None:
    p = start([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                     "print('ready', flush=True); time.sleep(600)"], kill_after=1.0)
    try:
        assert p.stdout.readline().strip() == "ready"
        child = child_of(p.pid)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(10)
        assert 0.9 < time.monotonic() - t0 < 4.0
        assert rc == 128 + signal.SIGKILL and not alive(child)
    finally:
        p.kill()


COUNTER = ("import signal, sys, time\nn = {'INT': 0, 'HUP': 0}\n"
           "signal.signal(signal.SIGINT, lambda *a: n.__setitem__('INT', n['INT'] + 1))\n"
           "signal.signal(signal.SIGHUP, lambda *a: n.__setitem__('HUP', n['HUP'] + 1))\n"
           "print('ready', flush=True)\nt = time.monotonic()\n"
           "while time.monotonic() - t < 2.5: time.sleep(0.05)\n"
           "print(n['INT'], n['HUP'], flush=True)\n")


def test_sigint_and_sighup_reach_the_command_exactly_once() -> None:
    """A signal to tpnb alone, and one to tpnb's whole process group (a ^C-like kill), each arrive once."""
    p = start([sys.executable, "-c", COUNTER], start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGINT)      # to tpnb only
        time.sleep(0.3)
        os.killpg(p.pid, signal.SIGHUP)   # to tpnb's process group: the command has its own
        out, _ = p.communicate(timeout=15)
        assert out.split() == ["1", "1"]
        assert p.returncode == 0
    finally:
        p.kill()


def test_lost_connection_stops_the_command_and_says_so() -> None:
    p = start(["sleep", "600"], lost_after=0.5)
    try:
        _, err = p.communicate(timeout=10)
        assert "tpnb: the test says so; stopping the command" in err
        assert p.returncode == 128 + signal.SIGTERM
    finally:
        p.kill()
