"""`%load_ext tpnb`: the %tp line magic and the %%tp cell magic.

The magics are a face of `tpnb.api` like the CLI: the same parser
(`tpnb.cli.build_parser`, extended in `parser.py`), the same text
(`tpnb.render`).  A failure raises a `TpnbError` whose `_render_traceback_`
makes IPython show only its what/why/fix lines (no traceback of tpnb's
internals), and because it is raised the cell fails, so "Run All" stops at the
failing cell instead of carrying on with `None` (`env = %tp env hello`).

    commands.py   %tp <command>           (line magic)
    cell.py       %%tp intercept ...      (serve the cell's app in-kernel + intercept)
    lifecycle.py  what this kernel owns; cleanup at kernel exit
    progress.py   progress bar widget / printed lines
    output.py     error text, HTML tables for env and request logs
"""
from __future__ import annotations

import shlex
from typing import Any

from IPython.core.magic import Magics, line_cell_magic, magics_class

from ..errors import ConfigError, Interrupted, TpnbError
from . import commands, lifecycle
from .parser import HelpShown, parse

__all__ = ["TpMagics", "load_ipython_extension", "unload_ipython_extension", "tp"]


def tp(line: str, cell: str | None = None, shell: Any = None) -> Any:
    """Run one %tp / %%tp invocation; returns its value, or raises a TpnbError (shown as what/why/fix)."""
    try:
        if line.strip().split(" ", 1)[0] == "devcluster":  # parsed by tpnb_devcluster; cli.run says if it is missing
            from ..cli import run

            code = run(shlex.split(line))
            if code:
                raise TpnbError(f"%tp {line.strip()} exited with status {code}")
            return None
        args, cmd = parse(line)
        if cell is not None:
            if args.cmd != "intercept":
                raise ConfigError(f"%%tp {args.cmd or ''}: only `%%tp intercept` takes a cell",
                                  hint="use %tp (one percent sign) for the other commands")
            if shell is None:
                raise ConfigError("%%tp intercept needs an IPython shell")
            from .cell import intercept_cell

            intercept_cell(shell, args, cmd, cell)
            return None
        if args.cmd == "serve":
            return commands.do_serve(args, cmd, shell.user_ns if shell is not None else {})
        return commands.COMMANDS[args.cmd](args, cmd)
    except HelpShown:
        return None
    except KeyboardInterrupt:
        raise Interrupted() from None
    except SystemExit as exc:  # a delegated CLI path (devcluster) exiting
        if exc.code not in (0, None):
            raise TpnbError(f"%tp {line.strip()} exited with status {exc.code}") from None
        return None


@magics_class
class TpMagics(Magics):
    @line_cell_magic
    def tp(self, line: str, cell: str | None = None) -> Any:
        """tpnb: `%tp connect`, `%tp intercept NAME --port N`, `%%tp intercept NAME --port N` ...

        `%tp --help` lists the commands; `%tp COMMAND --help` explains one.
        """
        return tp(line, cell, self.shell)


def _expose_top_level() -> None:
    """Make `tpnb.panel()` and `tpnb.requests_log()` work once the extension is loaded."""
    import tpnb

    from .. import inkernel

    if not hasattr(tpnb, "requests_log"):
        tpnb.requests_log = inkernel.requests_table  # type: ignore[attr-defined]
    if not hasattr(tpnb, "replay"):
        tpnb.replay = inkernel.replay  # type: ignore[attr-defined]
    if not hasattr(tpnb, "panel"):
        def panel(*a: Any, **kw: Any) -> Any:
            from ..widgets import panel as _panel

            return _panel(*a, **kw)

        tpnb.panel = panel  # type: ignore[attr-defined]


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(TpMagics)
    _expose_top_level()
    lifecycle._register_atexit()


def unload_ipython_extension(ipython: Any) -> None:
    lifecycle.cleanup()
    mm = ipython.magics_manager
    for kind in ("line", "cell"):
        mm.magics[kind].pop("tp", None)
