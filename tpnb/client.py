"""Talking to the connector: start it (and the root daemon) when needed, call it, map its errors.

This is the only place the faces touch gRPC.  Calls are synchronous on
purpose: a CLI blocks anyway, and a notebook cell runs them off the kernel's
event loop (see tpnb.api), so nothing here needs a running loop.

Two processes are started from here, never one from the other:
- the connector (`python -m tpnb.connector`) as the invoking user, always;
- the root daemon (`python -m tpnb.daemon`) as root, through `sudo -n` when
  the user is not root, only when system-wide outbound is wanted.  Its
  environment carries no KUBECONFIG: it never needs one.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

import grpc

from . import config as tpnb_config
from .errors import DaemonError, PrerequisiteError, TpnbError
from .proto import pb, rpc

ProgressFn = Callable[[pb.Progress], None]
T = TypeVar("T")


def _wire_error(exc: grpc.RpcError) -> TpnbError:
    from tpnb.common.errors_wire import decode

    return decode(exc.code(), exc.details())


def _answers(sock: Path, call: Callable[[grpc.Channel], object]) -> bool:
    if not sock.exists():
        return False
    with grpc.insecure_channel(f"unix://{sock}") as ch:
        try:
            call(ch)
            return True
        except grpc.RpcError:
            return False


class _Launch:
    """A process started in the background, and how to tell it is ready."""

    def __init__(self, argv: list[str], env: dict[str, str], startup_log: Path, ready: Callable[[], bool],
                 what: str, log_name: str) -> None:
        self.startup_log, self.ready, self.what, self.log_name = startup_log, ready, what, log_name
        with open(startup_log, "ab") as out:
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                             start_new_session=True, env=env, close_fds=True)

    def wait(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            time.sleep(0.05)
        tail = ""
        try:
            tail = self.startup_log.read_text()[-800:].strip()
        except OSError:
            pass
        raise DaemonError(f"the tpnb {self.what} did not start", tail or "no output",
                          f"see {self.startup_log.parent}/{self.log_name}")


def private_dir(path: Path) -> None:
    """Create `path` (and its parent) for this user only; refuse one that someone else owns."""
    for d in (path.parent, path):
        d.mkdir(mode=0o700, exist_ok=True)
        st = d.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise PrerequisiteError(f"{d} is not a directory of this user",
                                    "the connector's socket must be in a directory only you can enter",
                                    f"remove {d}, or set connector.socket in ~/.config/tpnb/config.yaml")
        if st.st_mode & 0o077:
            os.chmod(d, 0o700)


def outbound_unavailable() -> str:
    """Why the root daemon cannot be started here ("" when it can)."""
    if os.geteuid() == 0:
        return ""
    sudo = shutil.which("sudo")
    if sudo is None:
        return "system-wide outbound needs the root daemon, and sudo is not installed"
    if subprocess.run([sudo, "-n", "true"], capture_output=True).returncode != 0:
        return "system-wide outbound needs the root daemon, and sudo asks for a password (run `sudo -v` first)"
    return ""


class DaemonClient:
    """The faces' handle on the connector (and, to start or stop it, the root daemon)."""

    def __init__(self, cfg: tpnb_config.Config | None = None) -> None:
        self.cfg = cfg or tpnb_config.get()
        self._channel: grpc.Channel | None = None
        self._stub: rpc.ConnectorStub | None = None

    # ---------------------------------------------------------------- lifecycle
    @property
    def socket(self) -> Path:
        return self.cfg.connector_socket

    def running(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            self.stub().Version(pb.Empty(), timeout=2)
            return True
        except grpc.RpcError:
            return False

    def root_daemon_running(self) -> bool:
        return _answers(self.cfg.socket_path, lambda ch: rpc.RootDaemonStub(ch).Version(pb.Empty(), timeout=2))

    def stub(self) -> rpc.ConnectorStub:
        if self._stub is None:
            self._channel = grpc.insecure_channel(f"unix://{self.socket}")
            self._stub = rpc.ConnectorStub(self._channel)
        return self._stub

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None

    def _env(self) -> dict[str, str]:
        log_dir = self.cfg.log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        # not through its own proxy (a rootless kernel's environment has the variables pointing at it)
        env = {k: v for k, v in os.environ.items() if "://tpnb:" not in v or not k.lower().endswith("_proxy")}
        env["TPNB_OWNER_UID"] = str(os.getuid())
        env["TPNB_LOGS_DIR"] = str(log_dir)
        return env

    def ensure_connector(self, say: Callable[[str], None] | None = None) -> None:
        """Start the connector as this user unless it runs."""
        launch = self._launch_connector(say)
        if launch is not None:
            launch.wait()

    def _launch_connector(self, say: Callable[[str], None] | None) -> _Launch | None:
        if self.running():
            return None
        self.close()
        if say:
            say(f"Launching tpnb daemon v{_version()}")
        private_dir(self.socket.parent)
        # a fresh channel per probe: a cached one would sit in gRPC's reconnect back-off after
        # the first probe found no socket, and answer up to a second late
        ready = lambda: _answers(self.socket, lambda ch: rpc.ConnectorStub(ch).Version(pb.Empty(), timeout=2))  # noqa: E731
        return _Launch([sys.executable, "-m", "tpnb.connector"], self._env(),
                       self.cfg.log_dir / "connector-startup.log", ready, "connector", "connector.log")

    def ensure_processes(self, say: Callable[[str], None] | None = None,
                         no_root: bool = False) -> tuple[str, str]:
        """Connector and (when wanted and possible) root daemon, started side by side.

        Returns (the root daemon's socket, "") or ("", why there is none).
        `connector.outbound`: "never" does not try; "always" raises when the
        daemon cannot start; "auto" reports why and goes on without it.
        """
        conn = self._launch_connector(say)
        if no_root:
            sock, why, root = "", "rootless mode (--no-root): no root daemon", None
        else:
            sock, why, root = self._launch_root_daemon()
        for launch in (conn, root):
            if launch is not None:
                launch.wait()
        return sock, why

    def _launch_root_daemon(self) -> tuple[str, str, _Launch | None]:
        mode = self.cfg.connector.outbound
        sock = self.cfg.socket_path
        if mode == "never":
            return "", "system-wide outbound is off (connector.outbound is never)", None
        if self.root_daemon_running():
            return str(sock), "", None
        why = outbound_unavailable()
        if why:
            if mode == "always":
                raise PrerequisiteError("the tpnb root daemon cannot start", why,
                                        "run `sudo -v` first, run tpnb as root, or set connector.outbound to auto")
            return "", why, None
        env = self._env()
        # no KUBECONFIG, no HOME of the user's credentials: the root daemon never needs them
        env.pop("KUBECONFIG", None)
        argv = [sys.executable, "-m", "tpnb.daemon"]
        if os.geteuid() != 0:
            keep = ["TPNB_OWNER_UID", "TPNB_LOGS_DIR", "TPNB_CONFIG"]
            keep += [k for k in env if k.startswith("TPNB_DAEMON_") or k.startswith("TPNB_LOGS_")]
            argv = [shutil.which("sudo") or "sudo", "-n", f"--preserve-env={','.join(dict.fromkeys(keep))}", *argv]
        return str(sock), "", _Launch(argv, env, self.cfg.log_dir / "daemon-startup.log", self.root_daemon_running,
                                      "root daemon", "daemon.log")

    def stop_root_daemon(self) -> None:
        """Stop a root daemon that outlived its connector (kill -9 of the connector, then `quit --daemon`)."""
        if self.root_daemon_running():
            with grpc.insecure_channel(f"unix://{self.cfg.socket_path}") as ch:
                try:
                    rpc.RootDaemonStub(ch).Quit(pb.Empty(), timeout=30)
                except grpc.RpcError:
                    pass

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
        raise DaemonError("the connector ended the operation without a result",
                          hint="see ~/.cache/tpnb/logs/connector.log")

    def watch(self, fn: Callable[..., Iterator], request: object, convert: Callable[[object], T]) -> "Watch[T]":
        """A server stream as a cancellable iterator of converted messages."""
        return Watch(fn(request), convert)

    def not_running_error(self) -> DaemonError:
        return DaemonError("the tpnb daemon is not running", f"no connector answers on {self.socket}",
                           "run `tpnb connect` to start it")


class Watch(Generic[T]):
    """Iterate a push stream; `cancel()` (from any thread) ends the iteration quietly.

    `convert` may return None for a message that is not for the caller (it is skipped);
    `messages` is the call's stream when part of it was read already (default: the call)."""

    def __init__(self, call: Any, convert: Callable[[object], T | None], messages: Iterator | None = None) -> None:
        self._call = call
        self._convert = convert
        self._messages = call if messages is None else messages
        self._cancelled = False

    def __iter__(self) -> Iterator[T]:
        try:
            for msg in self._messages:
                out = self._convert(msg)
                if out is not None:
                    yield out
        except grpc.RpcError as exc:
            if self._cancelled or exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise _wire_error(exc) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


def _version() -> str:
    from .version import __version__

    return __version__
