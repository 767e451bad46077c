"""`%%tp intercept NAME --port N [--app VAR]`: serve the cell's app from the kernel and intercept to it.

`app` is a WSGI/ASGI app (served on uvicorn) or a gRPC servicer instance (served on grpc.aio; see
`inkernel.grpc_registrations` for the convention).

Re-running the cell is the edit loop: the cell runs again, the new app object
is swapped into the running in-kernel server (same port, same connections),
and the intercept is left alone, so the cluster sees the new code on its next
request with no gap.  A cell that starts its own server on the port instead of
defining an app is fine too: then the intercept just points at that port.
"""
from __future__ import annotations

import argparse
import socket
from typing import Any

from .. import inkernel
from ..cli import parse_port
from ..errors import ConfigError, InterceptError
from . import lifecycle
from .commands import create_intercept, ensure_connected

#: states in which an existing intercept of the same name is kept rather than recreated
_LIVE_STATES = ("ACTIVE", "WAITING", "NO_AGENT")


def port_listens(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def intercept_cell(shell: Any, args: argparse.Namespace, cmd: list[str], cell: str) -> None:
    if cmd:
        raise ConfigError("%%tp intercept takes no `-- CMD`",
                          "the cell itself is what gets served",
                          "use the line magic `%tp intercept NAME --port N -- CMD` to run a command")
    port, svc_port = parse_port(args.port)

    result = shell.run_cell(cell, store_history=False)  # user code: its own errors show as usual
    if not result.success:  # its traceback is shown above; failing here too stops "Run All"
        raise InterceptError("the cell raised, so nothing new was served",
                             "the traceback above is the cell's own error",
                             "fix the cell and run it again (the intercept, if any, is unchanged)")

    app = shell.user_ns.get(args.app)
    fresh_server = False
    if app is not None:
        fresh_server = inkernel.get_server(port) is None
        grpc_app = bool(inkernel.grpc_registrations(app))
        srv = (inkernel.serve_grpc if grpc_app else inkernel.serve)(app, port, stop_on_leave=True)
        where = f"127.0.0.1:{port} (gRPC)" if grpc_app else f"http://127.0.0.1:{port}"
        if fresh_server:
            print(f"serving `{args.app}` ({srv.kind.upper()}) from this kernel on {where}")
        else:
            print(f"swapped in the new `{args.app}` (app v{srv.app_version}) on {where}; "
                  f"in-flight {'calls' if grpc_app else 'requests'} finish on the old one")
    elif not port_listens(port):
        raise InterceptError(
            f"the cell defined no `{args.app}` and nothing listens on 127.0.0.1:{port}",
            "%%tp intercept serves the WSGI/ASGI app the cell assigns to `app` (or --app NAME), "
            "or intercepts to a server the cell started itself",
            f"assign your app to `{args.app}` (e.g. `app = Flask(__name__)`), or pass --app NAME")

    try:
        _ensure_intercept(args, port, svc_port)
    except BaseException:
        if fresh_server:  # leave no half-made state behind: a re-run starts clean
            inkernel.stop(port, grace=0)
        raise


def _ensure_intercept(args: argparse.Namespace, port: int, svc_port: str) -> None:
    """Create the intercept unless one of that name already routes to `port`."""
    ensure_connected(args.namespace)
    s = lifecycle.session()
    for ic in s.status().intercepts:
        if ic.name != args.name:
            continue
        if ic.state in _LIVE_STATES:
            if ic.local_port != port:
                raise InterceptError(f"{args.name} is already intercepted to port {ic.local_port}",
                                     f"this cell serves port {port}",
                                     f"run `%tp leave {args.name}` first, or use --port {ic.local_port}")
            lifecycle.own(args.name, port)
            inkernel.attach(args.name, port)
            print(f"intercept {args.name} kept ({ic.state}, -> 127.0.0.1:{port})")
            return
        s.leave(args.name)  # an ERROR/REMOVED leftover of the same name: replace it
    create_intercept(args, port, svc_port)
