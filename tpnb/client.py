"""Talking to the daemon: start it when needed, call it, turn its errors back into ours.

This is the only place the user side touches gRPC.  Calls are synchronous on
purpose: a CLI blocks anyway, and a notebook cell runs them off the kernel's
event loop (see tpnb.api), so nothing here needs a running loop.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import grpc

from . import config as tpnb_config
from .errors import DaemonError, PrerequisiteError, TpnbError
from .proto import pb, rpc

ProgressFn = Callable[[pb.Progress], None]
T = TypeVar("T")


def _wire_error(exc: grpc.RpcError) -> TpnbError:
    from tpnb.daemon.errors_wire import decode

    return decode(exc.code(), exc.details())


class DaemonClient:
    def __init__(self, cfg: tpnb_config.Config | None = None) -> None:
        self.cfg = cfg or tpnb_config.get()
        self._channel: grpc.Channel | None = None
        self._stub: rpc.DaemonStub | None = None

    # ---------------------------------------------------------------- lifecycle
    @property
    def socket(self) -> Path:
        return self.cfg.socket_path

    def running(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            self.stub().Version(pb.Empty(), timeout=2)
            return True
        except grpc.RpcError:
            return False

    def stub(self) -> rpc.DaemonStub:
        if self._stub is None:
            self._channel = grpc.insecure_channel(f"unix://{self.socket}")
            self._stub = rpc.DaemonStub(self._channel)
        return self._stub

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None

    def ensure_daemon(self, say: Callable[[str], None] | None = None) -> None:
        """Start the root daemon unless it runs; through sudo when we are not root."""
        if self.running():
            return
        self.close()
        if say:
            say(f"Launching tpnb daemon v{_version()}")
        log_dir = self.cfg.log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["TPNB_OWNER_UID"] = str(os.getuid())
        env["TPNB_LOGS_DIR"] = str(log_dir)
        argv = [sys.executable, "-m", "tpnb.daemon"]
        if os.geteuid() != 0:
            sudo = shutil.which("sudo")
            if sudo is None:
                raise PrerequisiteError(
                    "the tpnb daemon needs root, and sudo is not installed",
                    "it creates a TUN device, routes and DNS settings",
                    "install sudo, or start it as root: `sudo python -m tpnb.daemon`")
            check = subprocess.run([sudo, "-n", "true"], capture_output=True)
            if check.returncode != 0:
                raise PrerequisiteError(
                    "the tpnb daemon needs root, and sudo asks for a password",
                    "tpnb cannot answer a password prompt here",
                    "run `sudo -v` in a terminal first, then retry")
            argv = [sudo, "-n", "--preserve-env=TPNB_OWNER_UID,TPNB_LOGS_DIR,KUBECONFIG,HOME", *argv]
        startup_log = log_dir / "daemon-startup.log"
        with open(startup_log, "ab") as out:
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                             start_new_session=True, env=env, close_fds=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.running():
                return
            time.sleep(0.1)
        tail = ""
        try:
            tail = startup_log.read_text()[-800:].strip()
        except OSError:
            pass
        raise DaemonError("the tpnb daemon did not start", tail or "no output",
                          f"see {log_dir}/daemon.log")

    # ---------------------------------------------------------------- calls
    def call(self, fn: Callable[..., T], request: object, timeout: float | None = 30) -> T:
        try:
            return fn(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise _wire_error(exc) from None

    def stream(self, fn: Callable[..., Iterator], request: object, progress: ProgressFn | None,
               result_field: str = "done") -> object:
        """Consume a progress stream; return its final `done` payload."""
        try:
            for ev in fn(request):
                kind = ev.WhichOneof("kind")
                if kind == "progress":
                    if progress:
                        progress(ev.progress)
                elif kind == result_field:
                    return getattr(ev, result_field)
        except grpc.RpcError as exc:
            raise _wire_error(exc) from None
        raise DaemonError("the daemon ended the operation without a result",
                          hint="see ~/.cache/tpnb/logs/connector.log")

    def not_running_error(self) -> DaemonError:
        return DaemonError("the tpnb daemon is not running", f"no daemon answers on {self.socket}",
                           "run `tpnb connect` to start it")


def _version() -> str:
    from .version import __version__

    return __version__
