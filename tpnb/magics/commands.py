"""The %tp line commands: the CLI's commands, run through tpnb.api, printed through tpnb.render.

Each function mirrors the branch of `tpnb.cli.run` with the same name (same
calls, same text), swapping the terminal progress line for a notebook progress
bar and returning values where a notebook user wants data (env, requests).

`-o json` (the CLI's option, same parser): the command returns the data of the
CLI's JSON document as Python data (`json.loads(render.as_json(result))`, a
dict or list) instead of printing its text result; progress and messages
still show.  With `-- CMD` the value comes once CMD has ended.  (`%%tp
intercept` serves a cell and keeps printing its text.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from .. import inkernel, render, rootless
from ..cli import (command_env, config_data, config_text, intercept_kwargs, parse_port, quit_session, wiretap_kwargs,
                   write_env_files)
from ..errors import ConfigError, TpnbError
from . import lifecycle
from .output import EnvTable, RequestTable
from .parser import build_magic_parser
from .progress import make_progress


def _connected_line(st: Any) -> str:
    return render.connected_text(st)


def run_streaming(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run a command after `--`, echoing its output into the cell as it comes (Ctrl-C / interrupt stops it)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    try:
        proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, bufsize=1)
    except OSError as exc:
        raise ConfigError(f"cannot run {cmd[0]!r}", exc.strerror or str(exc), "check the command after `--`") from None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
        print("interrupted", file=sys.stderr)
        return 130


def _json(args: argparse.Namespace) -> bool:
    return getattr(args, "output", "text") == "json"


def _result(args: argparse.Namespace, obj: Any, text: str | None = None) -> Any:
    """Print the text result, or with -o json return the CLI's JSON document as Python data."""
    if _json(args):
        return json.loads(render.as_json(obj))
    if text is not None:
        print(text)
    return None


def do_help(args: argparse.Namespace, cmd: list[str]) -> None:
    build_magic_parser().print_help()


def do_version(args: argparse.Namespace, cmd: list[str]) -> Any:
    v = lifecycle.session().version()
    return _result(args, v, render.versions_text(v))


def do_connect(args: argparse.Namespace, cmd: list[str]) -> Any:
    s = lifecycle.session()
    prog = make_progress("connect")
    mapped = [m.strip() for m in args.mapped_namespaces.split(",") if m.strip()]
    ok = False
    try:
        st = s.connect(namespace=args.namespace, mapped_namespaces=mapped, also_proxy=args.also_proxy,
                       context=args.context, progress=prog, say=lambda m: print(m, flush=True),
                       **({"no_root": True} if getattr(args, "no_root", False) else {}),
                       **({"in_cluster": True} if getattr(args, "in_cluster", None) else {}))
        ok = True
    finally:
        prog.end(ok)
    rootless.enable_in_process(s, st)  # rootless: this kernel's sockets and env (tpnb/rootless.py)
    print(_connected_line(st))
    if cmd:
        try:
            code = run_streaming(cmd)
            if code:
                print(f"command exited with status {code}", file=sys.stderr)
        finally:
            print("Disconnecting...", end="", flush=True)
            s.quit()
            _forget_all()
            rootless.disable_in_process()
            print("done")
    return _result(args, st)


def do_status(args: argparse.Namespace, cmd: list[str]) -> Any:
    st = lifecycle.session().status()
    return _result(args, st, render.status_text(st))


def _forget_all() -> None:
    for name in lifecycle.owned():
        lifecycle.ended(name)


def do_quit(args: argparse.Namespace, cmd: list[str]) -> Any:
    try:
        done = quit_session(lifecycle.session(), args.daemon)
    finally:
        _forget_all()  # the session's intercepts ended with it
        rootless.disable_in_process()
    return _result(args, done)


def do_list(args: argparse.Namespace, cmd: list[str]) -> Any:
    ws = lifecycle.session().list(args.namespace)
    return _result(args, ws, render.workloads_text(ws))


def do_leave(args: argparse.Namespace, cmd: list[str]) -> Any:
    if args.name in _wiretaps and args.name not in lifecycle.owned():  # this kernel's wiretap
        _wiretaps.pop(args.name).stop()
        return _result(args, {"left": args.name})
    try:
        lifecycle.session().leave(args.name)
    finally:
        lifecycle.ended(args.name)
    return _result(args, {"left": args.name})


def do_loglevel(args: argparse.Namespace, cmd: list[str]) -> Any:
    lifecycle.session().set_log_level(args.level)
    return _result(args, {"log_level": args.level})


def do_config(args: argparse.Namespace, cmd: list[str]) -> Any:
    from .. import config as tpnb_config

    cfg = tpnb_config.get()
    return _result(args, config_data(cfg), config_text(cfg))


def do_uninstall(args: argparse.Namespace, cmd: list[str]) -> Any:
    prog = make_progress("uninstall")
    ok = False
    try:
        msg = lifecycle.session().uninstall(agent=args.agent, all_agents=args.all_agents,
                                            everything=args.everything, namespace=args.namespace, progress=prog)
        ok = True
    finally:
        prog.end(ok)
    return _result(args, {"message": msg}, msg)


def ensure_connected(namespace: str | None) -> None:
    """Like `tpnb intercept`: connect first when there is no session."""
    s = lifecycle.session()
    if s.status().connected:
        return
    prog = make_progress("connect")
    ok = False
    try:
        st = s.connect(namespace=namespace, progress=prog, say=lambda m: print(m, flush=True))
        ok = True
    finally:
        prog.end(ok)
    rootless.enable_in_process(s, st)
    print(_connected_line(st))


def create_intercept(args: argparse.Namespace, port: int, svc_port: str, skip_port_check: bool = False,
                     show: bool = True) -> Any:
    """Create the intercept with a progress bar, print the CLI's block (unless not `show`),
    remember it as this kernel's."""
    prog = make_progress(f"intercept {args.name}")
    ok = False
    try:
        ic = lifecycle.session().intercept(args.name, port, namespace=args.namespace, service=args.service,
                                           service_port=svc_port or None, workload=args.workload,
                                           progress=prog, skip_port_check=skip_port_check, owner_pid=os.getpid(),
                                           **intercept_kwargs(args))
        ok = True
    finally:
        prog.end(ok)
    lifecycle.own(ic.name, port)
    inkernel.attach(ic.name, port)
    if show:
        print(render.intercept_block(ic), flush=True)
    try:
        write_env_files(ic.environment, args.env_file, args.env_json)
    except TpnbError as err:  # like the CLI: the intercept itself works, say so and go on
        print(f"warning: {err}", file=sys.stderr)
    return ic


def do_intercept(args: argparse.Namespace, cmd: list[str]) -> Any:
    """`%tp intercept NAME --port N [-- CMD]`: route NAME to whatever listens on N (or to CMD)."""
    port, svc_port = parse_port(args.port)
    ensure_connected(args.namespace)
    ic = create_intercept(args, port, svc_port, skip_port_check=bool(cmd), show=not _json(args))
    data = {"intercept": ic, "mount_point": None}  # the CLI's shape; the magic mounts no volumes
    if not cmd:
        return _result(args, data)
    try:
        code = run_streaming(cmd, env=command_env(ic.environment))
        if code:
            print(f"command exited with status {code}", file=sys.stderr)
    finally:
        try:
            lifecycle.session().leave(ic.name)
        except TpnbError as err:
            print(str(err), file=sys.stderr)
        lifecycle.ended(ic.name)
    return _result(args, data)


def do_env(args: argparse.Namespace, cmd: list[str]) -> EnvTable:
    return EnvTable(lifecycle.session().env(args.name))


def do_mounts(args: argparse.Namespace, cmd: list[str]) -> str:
    mp = lifecycle.session().get_intercept(args.name).mount_point
    if not mp:
        print(f"no volumes are mounted for {args.name}", file=sys.stderr)
    return mp


def do_requests(args: argparse.Namespace, cmd: list[str]) -> Any:
    """A pandas DataFrame of the requests served in-kernel (plain records as a table without pandas)."""
    table = inkernel.requests_table(args.name)
    if isinstance(table, list):
        return RequestTable(table[-args.tail:] if args.tail > 0 else table)
    return table.tail(args.tail) if args.tail > 0 else table


#: this kernel's wiretaps, by name (their logs keep filling while they run)
_wiretaps: dict[str, Any] = {}


def do_wiretap(args: argparse.Namespace, cmd: list[str]) -> Any:
    """`%tp wiretap NAME`: a live WiretapLog (list of record dicts, `.df()`); `--stop NAME` ends it."""
    from ..wiretaplog import WiretapLog

    if getattr(args, "stop", False):
        log = _wiretaps.pop(args.name, None)
        if log is None:
            raise ConfigError(f"no wiretap named {args.name!r} runs in this kernel",
                              hint=f"start one with `%tp wiretap {args.name}`")
        log.stop()
        print(f"Wiretap {args.name} ended: {len(log)} records, {log.dropped} dropped")
        return _result(args, {"stopped": args.name, "records": len(log), "dropped": log.dropped})
    old = _wiretaps.get(args.name)
    if old is not None and old.running:
        raise ConfigError(f"wiretap {args.name!r} already runs in this kernel",
                          hint=f"use the list it returned, or `%tp wiretap --stop {args.name}` first")
    kwargs = wiretap_kwargs(args)
    ensure_connected(args.namespace)
    prog = make_progress(f"wiretap {args.name}")
    ok = False
    try:
        stream = lifecycle.session().wiretap(args.name, progress=prog, **kwargs)
        ok = True
    finally:
        prog.end(ok)
    log = _wiretaps[args.name] = WiretapLog(stream)
    print(f"Wiretapping {render.wiretap_what(stream.stats)}; `%tp wiretap --stop {args.name}` ends it", flush=True)
    return log


def do_panel(args: argparse.Namespace, cmd: list[str]) -> Any:
    from ..widgets import panel

    return panel()


def do_serve(args: argparse.Namespace, cmd: list[str], user_ns: dict) -> None:
    if args.stop:
        if not inkernel.stop(args.port):
            print(f"no in-kernel server on port {args.port}", file=sys.stderr)
        return
    if args.app not in user_ns:
        raise ConfigError(f"no variable {args.app!r} in the notebook",
                          hint="define your WSGI/ASGI app first, or pass --app NAME")
    existed = inkernel.get_server(args.port) is not None
    srv = inkernel.serve(user_ns[args.app], args.port)
    verb = "swapped in" if existed else "serving"
    print(f"{verb} {args.app} ({srv.kind.upper()}, app v{srv.app_version}) on http://127.0.0.1:{args.port}")


COMMANDS = {
    None: do_help, "version": do_version, "connect": do_connect, "status": do_status, "quit": do_quit,
    "list": do_list, "leave": do_leave, "loglevel": do_loglevel, "config": do_config,
    "uninstall": do_uninstall, "intercept": do_intercept, "env": do_env, "mounts": do_mounts,
    "requests": do_requests, "panel": do_panel, "wiretap": do_wiretap,
}
