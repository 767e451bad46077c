"""`tpnb`: the command-line face of tpnb.api.

Output follows the shapes of Telepresence 2's walkthrough; errors print as
"what / why / fix" lines and a non-zero exit status, never a traceback.

`-o json` (every subcommand, like Telepresence's `--output json`): stdout is
exactly one JSON document, `tpnb.render.as_json` of the api's result (status,
connect: Status; list: [Workload]; intercept: {"intercept": Intercept,
"mount_point": local volume root or null}; version: {name: version}; quit,
leave, loglevel, uninstall, config view: a small object); progress and other
text lines go to stderr.  With `-- CMD` the document is printed before CMD
starts and CMD's own output follows it.  An error prints {"error": {"what",
"why", "fix"}} on stdout and its usual text on stderr, with the usual exit status.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from . import render
from .api import Intercept, Session, Status
from .errors import ConfigError, TpnbError, run_reporting
from .proto import pb


class Progress:
    """One progress line per step; a rewritten line on a terminal."""

    def __init__(self, stream=None) -> None:  # noqa: ANN001
        self.stream = stream or sys.stdout  # looked up now: -o json sends it to stderr
        self.tty = self.stream.isatty()
        self.last = ""

    def __call__(self, p: pb.Progress) -> None:
        msg = p.message
        if msg == self.last:
            return
        self.last = msg
        if self.tty and 0 <= p.fraction < 1:
            bar = "#" * int(p.fraction * 20)
            self.stream.write(f"\r\033[K[{bar:<20}] {msg}")
        else:
            if self.tty:
                self.stream.write("\r\033[K")
            self.stream.write(msg + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.tty and self.last:
            self.stream.write("\r\033[K")
            self.stream.flush()


def connect_saying(s: Session, **kwargs: Any) -> Status:
    """Connect with a progress line, then say "Connected to context ..." once (the progress' last step may
    have said it already) and, without system-wide outbound, what the user gets instead."""
    prog = Progress()
    st = s.connect(progress=prog, say=lambda m: print(m, flush=True), **kwargs)
    prog.end()
    text = render.connected_text(st)
    if prog.last and text.startswith(prog.last):
        text = text[len(prog.last):].lstrip("\n")
    if text:
        print(text, flush=True)
    return st


def split_cmd(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def parse_port(value: str) -> tuple[int, str]:
    local, _, svc = value.partition(":")
    try:
        port = int(local)
    except ValueError:
        raise ConfigError(f"invalid --port {value!r}", "the local port must be a number",
                          "use --port 9000 or --port 9000:http") from None
    if not 0 < port < 65536:
        raise ConfigError(f"invalid --port {value!r}", "ports are 1..65535")
    return port, svc


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage errors as the same what/fix lines as every other error.

    Shared with the %tp magic (tpnb/magics/parser.py builds on this parser),
    so a mistyped command reads the same in a terminal and in a notebook.
    """

    def error(self, message: str):  # noqa: ANN201 - NoReturn
        usage = " ".join(self.format_usage().split())
        raise ConfigError(f"{self.prog}: {message}", hint=usage)


OUTPUTS = ("text", "json")


def _output_parent() -> argparse.ArgumentParser:
    """`-o/--output`, on every subcommand (a parent parser), as in `tpnb status -o json`."""
    o = argparse.ArgumentParser(add_help=False)
    o.add_argument("-o", "--output", choices=OUTPUTS, default="text",
                   help="text (default) or json: one JSON document on stdout, progress on stderr")
    return o


def wants_json(argv: Sequence[str]) -> bool:
    """Whether `argv` asks for -o json, read the way argparse reads it (also when
    the rest of the line is invalid: that error is then reported as JSON too)."""
    own, _ = split_cmd(argv)
    if not own or own[0] == "devcluster":
        return False
    try:
        known, _ = _output_parent().parse_known_args(own)
    except (ConfigError, SystemExit):
        return False
    return known.output == "json"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="tpnb", description="Telepresence-style local development for Kubernetes")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    out = [_output_parent()]  # -o/--output on every subcommand but devcluster (parsed by its own CLI)

    sub.add_parser("version", parents=out, help="show client, daemon and traffic-manager versions")

    c = sub.add_parser("connect", parents=out, help="connect this machine to the cluster [-- CMD ARGS]")
    c.add_argument("--namespace", "-n", help="namespace whose short names resolve (default: the context's)")
    c.add_argument("--mapped-namespaces", default="", help="more namespaces for short names, comma separated")
    c.add_argument("--also-proxy", action="append", default=[], metavar="CIDR",
                   help="also route this subnet through the cluster (repeatable)")
    c.add_argument("--context", help="kubeconfig context")
    c.add_argument("--no-root", action="store_true",
                   help="never start the root daemon: outbound through the connector's SOCKS5/HTTP proxy "
                        "(exported to CMD, or printed as export lines for eval) and in-kernel sockets")
    c.add_argument("--in-cluster", action="store_true", default=None,
                   help="this runs in a pod of the cluster: no tunnel for outbound, no root daemon, the pod's "
                        "ServiceAccount (default: connector.in_cluster, auto-detected from the pod's environment)")

    sub.add_parser("status", parents=out, help="show the connection and intercepts")

    q = sub.add_parser("quit", parents=out, help="end the session (and with --daemon, stop the daemon)")
    q.add_argument("--daemon", "-r", "-s", action="store_true", help="stop the daemon too")
    q.add_argument("-u", action="store_true", help=argparse.SUPPRESS)  # seed compatibility: no-op

    ls = sub.add_parser("list", parents=out, help="list interceptable workloads")
    ls.add_argument("--namespace", "-n")

    i = sub.add_parser("intercept", parents=out, help="route a workload's traffic to this machine [-- CMD ARGS]")
    i.add_argument("name")
    i.add_argument("--port", "-p", required=True, help="LOCAL[:SERVICE_PORT_NAME_OR_NUMBER]")
    i.add_argument("--namespace", "-n")
    i.add_argument("--service")
    i.add_argument("--container", default="", help="the app container, in pods with several")
    i.add_argument("--workload", help="workload name when it differs from the intercept name")
    i.add_argument("--env-file", help="write the pod's environment here (docker --env-file syntax)")
    i.add_argument("--env-json", help="write the pod's environment here as JSON")
    i.add_argument("--mount", default="true", metavar="DIR|false",
                   help="mount the pod's volumes on DIR (empty or new; default: a fresh temp dir), "
                        "or not at all with --mount=false; CMD gets it as $TPNB_ROOT")
    add_filter_args(i)

    w = sub.add_parser("wiretap", parents=out,
                       help="print a copy of each request a workload's app serves (it keeps serving); ^C ends")
    w.add_argument("name")
    w.add_argument("--port", "-p", default="", metavar="SERVICE_PORT",
                   help="the Service port to copy, by name or number (default: as intercept picks it)")
    w.add_argument("--namespace", "-n")
    w.add_argument("--service")
    w.add_argument("--workload", help="workload name when it differs from the wiretap name")
    w.add_argument("--max-body", type=int, default=None, metavar="BYTES",
                   help="bytes of each body to copy (default: the wiretap.max_body setting)")
    w.add_argument("--count", type=int, default=0, metavar="N", help="end after N records")
    add_filter_args(w)

    lv = sub.add_parser("leave", parents=out, help="end an intercept (or a wiretap)")
    lv.add_argument("name")

    u = sub.add_parser("uninstall", parents=out, help="remove agents and/or the traffic-manager from the cluster")
    g = u.add_mutually_exclusive_group(required=True)
    g.add_argument("--agent", "-d", metavar="NAME")
    g.add_argument("--all-agents", "-a", action="store_true")
    g.add_argument("--everything", "-e", action="store_true")
    u.add_argument("--namespace", "-n")

    cf = sub.add_parser("config", parents=out, help="show configuration")
    cf.add_argument("action", choices=["view"])

    ll = sub.add_parser("loglevel", parents=out, help="set the daemon's and manager's log level")
    ll.add_argument("level", choices=["debug", "info", "warning", "error"])

    sub.add_parser("devcluster", help="the built-in dev cluster (up, status, kubeconfig, laptop, down)",
                   add_help=False)
    return p


def add_filter_args(p: argparse.ArgumentParser) -> None:
    """The personal-intercept (HTTP filter) options of `intercept`."""
    p.add_argument("--http-header", action="append", default=[], metavar="NAME=VALUE|auto",
                   help="only HTTP requests with this header (repeatable: all must match); the rest go to "
                        "the app. `auto`: a header unique to this session (printed with a curl line)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--http-path-prefix", default="", metavar="PREFIX", help="only requests whose path starts so")
    g.add_argument("--http-path-equal", default="", metavar="PATH", help="only requests for exactly this path")
    g.add_argument("--http-path-regex", default="", metavar="RE", help="only requests whose whole path matches")


def parse_http_headers(values: Sequence[str]) -> list[tuple[str, str]]:
    """["x-user=alice", "auto"] -> [("x-user", "alice"), ("", "")] (("", ""): the session's auto header)."""
    out: list[tuple[str, str]] = []
    for v in values:
        if v == "auto":
            out.append(("", ""))
            continue
        name, sep, value = v.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--http-header {v!r}: expected NAME=VALUE or auto",
                              hint="e.g. --http-header x-user=alice")
        out.append((name.strip(), value))
    return out


def filter_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The HTTP filter arguments of Session.intercept and Session.wiretap from parsed options (CLI and %tp)."""
    return {"http_headers": parse_http_headers(getattr(args, "http_header", None) or []),
            "http_path_prefix": getattr(args, "http_path_prefix", "") or "",
            "http_path_equal": getattr(args, "http_path_equal", "") or "",
            "http_path_regex": getattr(args, "http_path_regex", "") or ""}


def intercept_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Session.intercept's filter and container arguments from parsed `intercept` options (CLI and %tp)."""
    return {**filter_kwargs(args), "container": getattr(args, "container", "") or ""}


def write_env_files(env: dict[str, str], env_file: str | None, env_json: str | None) -> None:
    """Docker env-file lines (no quoting exists there: a value with a newline cannot be written).

    Both files are attempted; the first failure is raised afterwards."""
    failed: ConfigError | None = None
    if env_file:
        bad = sorted(k for k, v in env.items() if "\n" in v)
        lines = [f"{k}={v}" for k, v in sorted(env.items()) if k not in bad]
        try:
            _write(env_file, "\n".join(lines) + "\n")
        except ConfigError as err:
            failed = err
        if bad:
            print(f"note: {', '.join(bad)} hold newlines, which the env-file format cannot express; "
                  f"use --env-json for them", file=sys.stderr)
    if env_json:
        try:
            _write(env_json, json.dumps(env, indent=2, sort_keys=True) + "\n")
        except ConfigError as err:
            failed = failed or err
    if failed is not None:
        raise failed


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as fh:
            fh.write(text)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}", exc.strerror or str(exc),
                          "choose a writable path") from None


#: the pod's values for these would break a local command, so the local ones stay
LOCAL_ONLY_ENV = ("PATH", "HOME", "HOSTNAME", "PWD", "SHLVL", "TERM", "USER", "SHELL")


def command_env(pod_env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in pod_env.items() if k not in LOCAL_ONLY_ENV}


#: the signals `-- CMD` receives from tpnb when tpnb gets them (and then tpnb cleans up)
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: seconds CMD has to exit after a forwarded signal before it is killed
KILL_AFTER = 5.0
_PR_SET_PDEATHSIG = 1


def _foreground_tty() -> int | None:
    """The controlling terminal's fd when tpnb is its foreground job (so ^C would reach us), else None."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return fd
        except OSError:
            continue
    return None


def _give_terminal(fd: int | None, pgrp: int) -> None:
    if fd is None:
        return
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a background group may set the foreground like this
    try:
        os.tcsetpgrp(fd, pgrp)
    except OSError:
        pass
    finally:
        signal.signal(signal.SIGTTOU, old)


def _child_setup(parent: int, tty: int | None) -> None:
    """In CMD's process before exec: its own process group (the terminal's foreground job, like a
    shell does it, so ^C goes to CMD alone and tpnb forwards only what was sent to tpnb), death with
    tpnb (even by `kill -9`), and signals unblocked."""
    os.setpgid(0, 0)
    _give_terminal(tty, os.getpid())
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except Exception:  # noqa: BLE001 - not Linux: the forwarding below still covers signals tpnb gets
        pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    if os.getppid() != parent:  # tpnb died before prctl took effect
        os._exit(1)


def _run_cmd(cmd: list[str], env: dict[str, str] | None = None,
             lost: "Callable[[], str | None] | None" = None) -> int:
    """Run the user's command in the foreground until it exits; returns its status (128+N for signal N).

    CMD runs as its own job (process group; the terminal's foreground when tpnb had it), so the
    terminal's ^C reaches CMD once, and SIGINT, SIGTERM and SIGHUP sent to tpnb are forwarded to it;
    after a forwarded signal CMD has KILL_AFTER seconds before SIGKILL.  CMD dies with tpnb even when
    tpnb is killed (PR_SET_PDEATHSIG).  `lost()`, polled while CMD runs, names a reason to end CMD
    (the intercept or the connector went away).
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    sigs = set(FORWARDED_SIGNALS) | {signal.SIGCHLD}
    tty = _foreground_tty()
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)  # taken with sigtimedwait below, in order, none lost
    try:
        try:
            me = os.getpid()
            proc = subprocess.Popen(cmd, env=full_env, preexec_fn=lambda: _child_setup(me, tty))
        except OSError as exc:
            raise ConfigError(f"cannot run {cmd[0]!r}", exc.strerror or str(exc),
                              "check the command after `--`") from None
        with contextlib.suppress(OSError):
            os.setpgid(proc.pid, proc.pid)  # as shells do: no race with the first forwarded signal
        kill_at: float | None = None
        next_check = 0.0
        while True:
            rc = proc.poll()
            if rc is not None:
                return 128 - rc if rc < 0 else rc
            info = signal.sigtimedwait(sigs, 0.2)
            now = time.monotonic()
            if info is not None and info.si_signo != signal.SIGCHLD:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(info.si_signo)
                kill_at = kill_at or now + KILL_AFTER
            if lost is not None and kill_at is None and now >= next_check:
                next_check = now + 0.5
                why = lost()
                if why:
                    print(f"tpnb: {why}; stopping the command", file=sys.stderr, flush=True)
                    with contextlib.suppress(ProcessLookupError):
                        proc.terminate()
                    kill_at = now + KILL_AFTER
            if kill_at is not None and now >= kill_at:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                kill_at = now + 3600
    finally:
        _give_terminal(tty, os.getpgrp())
        # signals still pending are taken now, so none is acted upon later in the middle of the clean-up
        while signal.sigtimedwait(sigs, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)


def _watch_intercept(s: Session, name: str) -> "tuple[Callable[[], str | None], Callable[[], None]]":
    """Follow the connector's status stream on a thread; returns (reason it was lost or None, stop)."""
    import threading

    state: dict[str, object] = {"why": None, "stopped": False, "watch": None}

    def run() -> None:
        try:
            w = s.watch_status()
            state["watch"] = w
            if state["stopped"]:
                w.cancel()
            for st in w:
                if not any(ic.name == name for ic in st.intercepts):
                    state["why"] = (f"the intercept {name} ended" if st.connected
                                    else f"the session ended, and with it the intercept {name}")
                    return
            if not state["stopped"]:
                state["why"] = "the tpnb connector closed its status stream"
        except TpnbError as err:
            if not state["stopped"]:
                state["why"] = f"lost the connection to the tpnb connector ({err.what})"
        except Exception as exc:  # noqa: BLE001 - any break of the stream is a lost connection
            if not state["stopped"]:
                state["why"] = f"lost the connection to the tpnb connector ({exc})"

    def stop() -> None:
        state["stopped"] = True
        w = state["watch"]
        if w is not None:
            with contextlib.suppress(Exception):
                w.cancel()  # type: ignore[attr-defined]

    threading.Thread(target=run, name="tpnb-watch", daemon=True).start()
    return (lambda: None if state["stopped"] else state["why"]), stop  # type: ignore[return-value]


def quit_session(s: Session, stop_daemon: bool) -> dict[str, bool]:
    """`quit` for the CLI and `%tp quit`: same steps, same words; returns what it did (-o json)."""
    st = s.status()
    if not st.daemon_running:
        # The connector is gone; a root daemon may outlive it (connector killed): `--daemon` stops that too.
        lone_root = stop_daemon and s.client.root_daemon_running()
        if lone_root:
            s.quit(stop_daemon=True)
            print("tpnb root daemon (left by a connector that had quit) quitting...done")
        else:
            print("tpnb daemon had already quit")
        return {"daemon_was_running": False, "was_connected": False, "daemon_stopped": lone_root}
    if st.connected:
        print("Disconnecting...", end="", flush=True)
    s.quit(stop_daemon=stop_daemon)
    print("done" if st.connected else "tpnb was not connected")
    if stop_daemon:
        print("tpnb daemon quitting...done")
    return {"daemon_was_running": True, "was_connected": st.connected, "daemon_stopped": stop_daemon}


class Output:
    """A command's result: its text (-o text), or one JSON document on the real stdout (-o json)."""

    def __init__(self, fmt: str = "text", stream=None) -> None:  # noqa: ANN001
        self.json = fmt == "json"
        self.stream = stream or sys.stdout
        self.emitted = False

    def result(self, obj: object, text: str | None = None) -> None:
        """Print `text` (nothing when None), or with -o json `render.as_json(obj)`."""
        if self.json:
            print(render.as_json(obj), file=self.stream, flush=True)
            self.emitted = True
        elif text is not None:
            print(text, file=self.stream, flush=True)


def config_data(cfg) -> dict[str, object]:  # noqa: ANN001 - a tpnb.config.Config
    """`tpnb config view` as data: every setting, where overrides came from, derived paths."""
    from . import config as tpnb_config

    return {"settings": cfg.as_dict(),
            "sources": {k: v for k, v in cfg.sources.items() if v != "default"},
            "derived": {"connector_socket": cfg.connector_socket, "daemon_socket": cfg.socket_path,
                        "logs": cfg.log_dir, "manager_image": cfg.manager_image},
            "file": tpnb_config.config_file()}


def config_text(cfg) -> str:  # noqa: ANN001 - a tpnb.config.Config
    from . import config as tpnb_config

    lines = []
    for sect, values in cfg.as_dict().items():
        lines.append(f"{sect}:")
        for k, v in values.items():
            src = cfg.sources.get(f"{sect}.{k}", "default")
            lines.append(f"  {k}: {v!r}" + ("" if src == "default" else f"   # from {src}"))
    lines.append(f"# derived: connector_socket={cfg.connector_socket} daemon_socket={cfg.socket_path} "
                 f"logs={cfg.log_dir} manager_image={cfg.manager_image}")
    lines.append(f"# file: {tpnb_config.config_file()}")
    return "\n".join(lines)


def run(argv: Sequence[str]) -> int:
    if argv and argv[0] == "devcluster":  # a separate distribution, tpnb-devcluster (devcluster/)
        try:
            from tpnb_devcluster.cli import main as devcluster_main
        except ModuleNotFoundError as exc:
            if exc.name != "tpnb_devcluster":
                raise
            from .errors import PrerequisiteError

            raise PrerequisiteError("tpnb devcluster: the dev cluster is not installed",
                                    "it is its own package, tpnb-devcluster (the devcluster/ folder of "
                                    "the tpnb repository), not part of tpnb",
                                    "install it: pip install ./devcluster (from the tpnb checkout; "
                                    "scripts/install-deps does it)") from None
        return devcluster_main(list(argv[1:]))
    own, cmd = split_cmd(argv)
    args = build_parser().parse_args(own)
    if args.cmd is None:
        build_parser().print_help()
        return 2
    out = Output(getattr(args, "output", "text"))  # bound to the real stdout
    if not out.json:
        return _run(args, cmd, out)
    with contextlib.redirect_stdout(sys.stderr):  # -o json: every text line to stderr
        try:
            return _run(args, cmd, out)
        except (TpnbError, KeyboardInterrupt) as exc:
            if not out.emitted:
                raise  # main() reports it, as JSON on stdout too
            # the document is out already (a `-- CMD` ran): stdout keeps exactly one
            print(str(exc) if isinstance(exc, TpnbError) else "interrupted", file=sys.stderr)
            return exc.exit_code if isinstance(exc, TpnbError) else 130


def _run(args: argparse.Namespace, cmd: list[str], out: Output) -> int:
    s = Session()
    if args.cmd == "version":
        v = s.version()
        out.result(v, render.versions_text(v))
        return 0
    if args.cmd == "config":
        from . import config as tpnb_config

        cfg = tpnb_config.get()
        out.result(config_data(cfg), config_text(cfg))
        return 0
    if args.cmd == "connect":
        # `eval "$(tpnb connect --no-root)"`: stdout is only the export lines, everything else stderr
        for_eval = args.no_root and not cmd and not out.json
        with contextlib.redirect_stdout(sys.stderr) if for_eval else contextlib.nullcontext():
            mapped = [m.strip() for m in args.mapped_namespaces.split(",") if m.strip()]
            st = connect_saying(s, namespace=args.namespace, mapped_namespaces=mapped, also_proxy=args.also_proxy,
                                context=args.context, no_root=args.no_root, in_cluster=args.in_cluster)
        if for_eval:
            from . import rootless

            print(rootless.export_lines(st.proxy_env), flush=True)
        out.result(st)  # -o json only: the text is the lines above
        if cmd:
            try:
                return _run_cmd(cmd, env=st.proxy_env)
            finally:
                print("Disconnecting...", end="", flush=True)
                s.quit()
                print("done")
        return 0
    if args.cmd == "status":
        st = s.status()
        out.result(st, render.status_text(st))
        return 0
    if args.cmd == "quit":
        out.result(quit_session(s, args.daemon))
        return 0
    if args.cmd == "list":
        ws = s.list(args.namespace)
        out.result(ws, render.workloads_text(ws))
        return 0
    if args.cmd == "leave":
        s.leave(args.name)  # unmounts its volumes too (tpnb/mounts.py)
        out.result({"left": args.name})
        return 0
    if args.cmd == "loglevel":
        s.set_log_level(args.level)
        out.result({"log_level": args.level})
        return 0
    if args.cmd == "uninstall":
        prog = Progress()
        msg = s.uninstall(agent=args.agent, all_agents=args.all_agents, everything=args.everything,
                          namespace=args.namespace, progress=prog)
        prog.end()
        out.result({"message": msg}, msg)
        return 0
    if args.cmd == "intercept":
        return _intercept(s, args, cmd, out)
    if args.cmd == "wiretap":
        return _wiretap(s, args, out)
    raise ConfigError(f"unknown command {args.cmd!r}")


def _intercept(s: Session, args: argparse.Namespace, cmd: list[str], out: Output | None = None) -> int:
    out = out or Output()
    port, svc_port = parse_port(args.port)
    prog = Progress()
    connected_here = False
    if not s.status().connected:
        connect_saying(s, namespace=args.namespace)
        connected_here = True
    try:
        ic = s.intercept(args.name, port, namespace=args.namespace, service=args.service,
                         service_port=svc_port or None, workload=args.workload, progress=prog,
                         skip_port_check=bool(cmd), owner_pid=os.getpid() if cmd else None,
                         **intercept_kwargs(args))
        prog.end()
        root = _mount_volumes(s, ic, args.mount)
        # -o json: "mount_point" is the local root of the pod's volumes (ic.mount_point: the agent's side)
        out.result({"intercept": ic, "mount_point": None if root is None else str(root)},
                   render.intercept_block(ic, mount_root=root))
        try:
            write_env_files(ic.environment, args.env_file, args.env_json)
        except TpnbError as err:  # the intercept itself works: say so, and go on
            print(f"warning: {err}", file=sys.stderr)
        if not cmd:
            return 0
        env = {**s.status().proxy_env, **command_env(ic.environment)}  # rootless: CMD reaches the cluster too
        if root is not None:
            env["TPNB_ROOT"] = str(root)
        lost, stop_watch = _watch_intercept(s, ic.name)
        try:
            return _run_cmd(cmd, env=env, lost=lost)
        finally:
            why = lost()
            stop_watch()
            if why:
                print(f"tpnb: ending the intercept {ic.name}: {why}", file=sys.stderr, flush=True)
            try:
                if root is not None:
                    s.unmount(ic.name)
            except TpnbError as err:
                print(str(err), file=sys.stderr)
            try:
                s.leave(ic.name)
            except TpnbError as err:
                print(str(err), file=sys.stderr)
    finally:
        if connected_here and cmd:
            print("Disconnecting...", end="", flush=True)
            s.quit(stop_daemon=True)
            print("done")
            print("tpnb daemon quitting...done")


def wiretap_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Session.wiretap's arguments from parsed `wiretap` options (CLI and %tp)."""
    if args.max_body is not None and args.max_body < 0:
        raise ConfigError(f"--max-body {args.max_body}: must be 0 or more", hint="e.g. --max-body 4096")
    return {"service_port": args.port or None, "namespace": args.namespace, "service": args.service,
            "workload": args.workload, "max_body": args.max_body, **filter_kwargs(args)}


def _short(b: bytes, n: int = 40) -> str:
    return repr(b[:n]) + ("..." if len(b) > n else "")


def wiretap_line(r: dict) -> str:
    """One line per copied exchange (the CLI's text output)."""
    t = r["time"][11:]
    if r["type"] == "tcp":
        return (f"{t} {r['client']} TCP up {r['bytes_up']} B down {r['bytes_down']} B {r['duration_ms']:.1f} ms "
                f"first {_short(r['first_up'])} -> {_short(r['first_down'])}")
    path = r["path"] + (f"?{r['query']}" if r["query"] else "")
    tail = f" error: {r['error']}" if r["error"] else ""
    grpc = ""
    if r.get("grpc_code") is not None:   # a gRPC call: its status and messages each way
        grpc = f" {r['grpc_code']}" + (f" ({r['grpc_message']})" if r.get("grpc_message") else "")
    msgs = f" {r['request_messages']}->{r['response_messages']} msgs" if r.get("request_messages") is not None else ""
    return (f"{t} {r['client']} {r['method']} {path} {r['status']}{grpc} {r['duration_ms']:.1f} ms"
            f"{msgs} {r['bytes']} B{tail}")


def _jsonable(v: Any) -> Any:
    """Bytes as text when they are UTF-8, else {"base64": ...}; the rest as it is."""
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            import base64

            return {"base64": base64.b64encode(v).decode("ascii")}
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def wiretap_json(r: dict) -> str:
    """One JSON line per copied exchange (`-o json`)."""
    return json.dumps(_jsonable(r), separators=(",", ":"))


def _wiretap(s: Session, args: argparse.Namespace, out: Output) -> int:
    """`tpnb wiretap NAME`: one line (or JSON line) per exchange until ^C / SIGTERM / --count / leave."""
    kwargs = wiretap_kwargs(args)
    prog = Progress()
    if not s.status().connected:
        connect_saying(s, namespace=args.namespace)
    prev = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends it like ^C
    stream = None
    try:
        stream = s.wiretap(args.name, progress=prog, **kwargs)
        prog.end()
        print(f"Wiretapping {render.wiretap_what(stream.stats)}; ^C ends", flush=True)
        dropped = 0
        n = 0
        for rec in stream:
            print(wiretap_json(rec) if out.json else wiretap_line(rec), file=out.stream, flush=True)
            n += 1
            if rec["dropped"] > dropped:
                dropped = rec["dropped"]
                print(f"tpnb: {dropped} record(s) dropped so far (this machine read too slowly)",
                      file=sys.stderr, flush=True)
            if args.count and n >= args.count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, prev)
        if stream is not None:
            stream.cancel()
            st = stream.stats
            why = f" ({st.message})" if st.message and st.state != "WAITING" else ""
            print(f"Wiretap {args.name} ended: {st.records} records, {st.dropped} dropped{why}",
                  file=sys.stderr, flush=True)
    return 0


def _mount_volumes(s: Session, ic: Intercept, mount: str) -> Path | None:
    """Mount the pod's volumes per --mount; a failure is a warning (the intercept works without them)."""
    if str(mount).lower() in ("false", "no", "0", "off", ""):
        return None
    try:
        return s.mount(ic.name, None if str(mount).lower() in ("true", "yes", "1", "on") else mount,
                       intercept=ic)
    except TpnbError as err:
        print(f"warning: volumes not mounted: {err}", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else argv
        return run_reporting(lambda: run(argv), json_errors=wants_json(argv))
    except BrokenPipeError:  # `tpnb ... | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
