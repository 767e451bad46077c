"""The %tp argument parser: the CLI's own parser, plus the notebook-only commands.

Why reuse `tpnb.cli.build_parser()`: `%tp intercept hello --port 9000` must
accept exactly what `tpnb intercept hello --port 9000` accepts, and any option
added to the CLI appears in the magic without a second definition.  Only
things that make no sense in a terminal are added here (`env`, `mounts`,
`requests`, `panel`, `serve`, and `--app` for the `%%tp intercept` cell).

argparse's habit of printing usage and calling `sys.exit` would kill a cell
with a SystemExit traceback, so errors become `ConfigError`s instead.
"""
from __future__ import annotations

import argparse
import shlex
from typing import NoReturn

from ..cli import split_cmd, build_parser
from ..errors import ConfigError

PROG = "%tp"

#: subcommands that exist only in the notebook face
NOTEBOOK_ONLY = ("env", "mounts", "requests", "panel", "serve")


class HelpShown(Exception):
    """`--help` was printed: the magic has nothing more to do."""


def _subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("tpnb.cli.build_parser() has no subcommands")


def _tame(p: argparse.ArgumentParser) -> None:
    """Make one (sub)parser raise instead of exiting the process.

    Usage errors already raise ConfigError (tpnb.cli.ArgumentParser); only
    `--help`'s exit is left to catch.
    """
    def exit(status: int = 0, message: str | None = None) -> NoReturn:  # noqa: A001 - argparse's name
        if status:
            raise ConfigError(f"{p.prog}: {(message or 'invalid arguments').strip()}")
        raise HelpShown()

    p.exit = exit  # type: ignore[method-assign]


def build_magic_parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = PROG
    sub = _subparsers(p)

    e = sub.add_parser("env", help="the intercepted pod's environment (a dict, shown as a table)")
    e.add_argument("name")
    m = sub.add_parser("mounts", help="local root of the intercepted pod's volumes (empty if none)")
    m.add_argument("name")
    r = sub.add_parser("requests", help="requests served in this kernel for an intercept (list of dicts)")
    r.add_argument("name")
    r.add_argument("--tail", type=int, default=0, help="only the last N")
    sub.add_parser("panel", help="the interactive panel (workloads, intercepts, request log)")
    s = sub.add_parser("serve", help="serve a WSGI/ASGI app from this kernel on 127.0.0.1:PORT (no intercept)")
    s.add_argument("--port", "-p", required=True, type=int)
    s.add_argument("--app", default="app", help="variable holding the app (default: app)")
    s.add_argument("--stop", action="store_true", help="stop the in-kernel server on that port")

    sub.choices["wiretap"].add_argument(
        "--stop", action="store_true", help="end this kernel's wiretap NAME (its records stay in the list)")
    sub.choices["intercept"].add_argument(
        "--app", default="app",
        help="with %%%%tp intercept: the variable in the cell holding the WSGI/ASGI app (default: app)")

    for name, child in sub.choices.items():
        child.prog = f"{PROG} {name}"
        _tame(child)
    _tame(p)
    return p


def split_line(line: str) -> tuple[list[str], list[str]]:
    """Shell-split a magic line; (own args, command after `--`)."""
    try:
        argv = shlex.split(line, posix=True)
    except ValueError as exc:
        raise ConfigError(f"{PROG}: cannot parse {line!r}", str(exc), "check the quotes") from None
    return split_cmd(argv)


def parse(line: str) -> tuple[argparse.Namespace, list[str]]:
    own, cmd = split_line(line)
    return build_magic_parser().parse_args(own), cmd
