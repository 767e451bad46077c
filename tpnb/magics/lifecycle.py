"""What this kernel started, and ending it when the kernel ends.

Why: an intercept created from a notebook routes cluster traffic into this
kernel; if the kernel dies or restarts, the cluster should get its service
back.  So intercepts made here (by `%tp intercept`, `%%tp intercept` or the
panel) are remembered and left at interpreter exit (`atexit`, which runs on a
kernel shutdown or restart), and the in-kernel servers are stopped.  Intercepts
made elsewhere (the CLI, another kernel) are never touched.
"""
from __future__ import annotations

import atexit
import threading
from typing import Callable

from .. import inkernel
from ..api import Session

_lock = threading.Lock()
_owned: dict[str, int] = {}  # intercept name -> local port
_factory: Callable[[], Session] = Session
_session: Session | None = None
_registered = False


def session() -> Session:
    """One api.Session per kernel (it holds a gRPC channel; cheap to keep)."""
    global _session
    with _lock:
        if _session is None:
            _session = _factory()
        return _session


def set_session_factory(factory: Callable[[], Session]) -> None:
    """Tests (and embedding code) swap the Session class here."""
    global _factory, _session
    with _lock:
        _factory, _session = factory, None


def own(name: str, port: int) -> None:
    with _lock:
        _owned[name] = port
    _register_atexit()


def disown(name: str) -> None:
    with _lock:
        _owned.pop(name, None)


def owned() -> dict[str, int]:
    with _lock:
        return dict(_owned)


def ended(name: str) -> None:
    """An intercept is gone: forget it and stop its in-kernel server if the intercept owned it."""
    disown(name)
    inkernel.release(name)


def cleanup() -> None:
    """Leave what this kernel intercepted and stop its servers (best effort, never raises)."""
    names = list(owned())
    if names:
        try:
            s = session()
            for name in names:
                try:
                    s.leave(name)
                except Exception:  # noqa: BLE001 - already gone, daemon down: nothing left to do
                    pass
                disown(name)
        except Exception:  # noqa: BLE001
            pass
    inkernel.stop_all(grace=1.0)


def _register_atexit() -> None:
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
    atexit.register(cleanup)
