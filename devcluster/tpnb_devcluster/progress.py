"""Progress lines for long dev-cluster operations.

Booting a cluster from scratch takes minutes (a cold Kubernetes build alone
takes ten or more), and most of the tools involved print nothing while they
work.  A user staring at a silent terminal cannot tell a slow step from a hung
one, so every step prints a line saying what it does, how far the whole
operation is, and how long it has run.

The callable signature `progress(step, message, fraction)` is the contract
shared with `tpnb_devcluster.images.build_all`.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from typing import Callable, Protocol, TextIO


class ProgressFn(Protocol):
    def __call__(self, step: str, message: str, fraction: float) -> None: ...


def silent(step: str, message: str, fraction: float) -> None:
    """A progress callback that prints nothing (for tests and library use)."""


class Printer:
    """Prints `[  12.3s  45%] step: message` lines.

    On a terminal, repeated updates of the same step (a ticking build timer)
    overwrite one line instead of scrolling; elsewhere (logs, CI) they are
    rate-limited to one line every `tick_every` seconds so logs stay short.
    """

    def __init__(self, stream: TextIO | None = None, tick_every: float = 15.0) -> None:
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.tick_every = tick_every
        self._last_step = ""
        self._last_print = 0.0
        self._last_frac = 0.0
        self._open_line = False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def __call__(self, step: str, message: str, fraction: float) -> None:
        now = time.monotonic()
        pct = max(0, min(100, int(round(fraction * 100))))
        line = f"[{self.elapsed():7.1f}s {pct:3d}%] {step}: {message}"
        same = step == self._last_step
        if self.tty:
            # one screen line, or the carriage return cannot overwrite it
            width = shutil.get_terminal_size((120, 24)).columns - 1
            if len(line) > width:
                line = line[:width - 1] + "…"
            if same and self._open_line:
                self.stream.write("\r\033[K" + line)
            else:
                if self._open_line:
                    self.stream.write("\n")
                self.stream.write(line)
            self._open_line = True
        else:
            if same and message.endswith("…") and now - self._last_print < self.tick_every:
                return  # a tick of a running step; keep logs short
            if same and now - self._last_print < 2.0 and abs(fraction - self._last_frac) < 0.01:
                return  # a chatty tool (debootstrap, pip): at most a line every 2 s
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last_step = step
        self._last_print = now
        self._last_frac = fraction

    def done(self) -> None:
        """End an open terminal line (call once at the end)."""
        if self.tty and self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


def run_ticking(
    argv: list[str],
    progress: ProgressFn,
    step: str,
    label: str,
    fraction: float,
    *,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    log: TextIO | None = None,
    interval: float = 1.0,
    timeout: float | None = None,
) -> int:
    """Run a quiet command, reporting `label (N s)…` every `interval` seconds.

    Plain subprocess polling is enough here: one child, one timer, no
    concurrency worth an event loop.  Output goes to `log` (or is discarded);
    the return code is returned, or -1 after `timeout` (the child is killed).
    """
    start = time.monotonic()
    out = log if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        while True:
            try:
                return proc.wait(timeout=interval)
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - start
                if timeout is not None and elapsed > timeout:
                    proc.kill()
                    proc.wait()
                    return -1
                progress(step, f"{label} ({int(elapsed)} s)…", fraction)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def wait_until(
    check: Callable[[], bool],
    progress: ProgressFn,
    step: str,
    label: str,
    fraction: float,
    timeout: float,
    interval: float = 1.0,
) -> bool:
    """Poll `check` until it is true or `timeout` seconds pass, ticking progress."""
    start = time.monotonic()
    while True:
        if check():
            return True
        elapsed = time.monotonic() - start
        if elapsed > timeout:
            return False
        progress(step, f"{label} ({int(elapsed)} s)…", fraction)
        time.sleep(interval)
