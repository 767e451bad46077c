"""User-facing errors.

Every failure a user can cause or fix is one of these: a short `what` line, a
`why`, and a `hint` saying what to do.  Front ends (CLI, magics, widgets) print
`str(err)` and never a traceback of tpnb's internals.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable


class TpnbError(Exception):
    """Base of all user-facing errors."""

    #: process exit status used by the CLI
    exit_code = 1

    def __init__(self, what: str, why: str = "", hint: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.why = why
        self.hint = hint

    def __str__(self) -> str:
        parts = [self.what]
        if self.why:
            parts.append(f"  why: {self.why}")
        if self.hint:
            parts.append(f"  fix: {self.hint}")
        return "\n".join(parts)

    def as_dict(self) -> dict[str, str]:
        """The same three parts as data (`-o json`): what, why, fix."""
        return {"what": self.what, "why": self.why, "fix": self.hint}

    def _render_traceback_(self) -> list[str]:
        """IPython shows a raised tpnb error as these lines only (what / why / fix), no traceback:
        a failing `%tp` line stops "Run All" at its cell and says why in the words of the CLI."""
        return str(self).splitlines()


class ConfigError(TpnbError):
    """Bad configuration or bad command-line input."""

    exit_code = 2


class PrerequisiteError(TpnbError):
    """Something the machine lacks (a package, a privilege, a device)."""

    exit_code = 3


class ClusterError(TpnbError):
    """The Kubernetes API refused or could not be reached."""

    exit_code = 4


class PermissionDenied(ClusterError):
    """RBAC denial: names the verb and resource that was refused."""


class DaemonError(TpnbError):
    """The privileged daemon is not running, not reachable, or failed."""

    exit_code = 5


class NotConnected(DaemonError):
    """An operation needs a session and there is none."""


class InterceptError(TpnbError):
    """An intercept could not be created, or was refused."""

    exit_code = 6


class Interrupted(TpnbError):
    """The user interrupted (Ctrl-C, the notebook's stop button)."""

    exit_code = 130

    def __init__(self, what: str = "interrupted", why: str = "", hint: str = "") -> None:
        super().__init__(what, why, hint)


class DevClusterError(TpnbError):
    """The built-in dev cluster failed to build, boot or stop."""

    exit_code = 7


def run_reporting(body: Callable[[], int], json_errors: bool = False) -> int:
    """Run a command-line command; a user-facing error or ^C becomes its message on
    stderr and an exit status, never a traceback.  With `json_errors` (`-o json`)
    stdout also gets `{"error": {"what": ..., "why": ..., "fix": ...}}`."""
    try:
        return body()
    except (TpnbError, KeyboardInterrupt) as exc:
        err = exc if isinstance(exc, TpnbError) else TpnbError("interrupted")
        if json_errors:
            print(json.dumps({"error": err.as_dict()}, indent=2), flush=True)
        print(str(err), file=sys.stderr)
        return err.exit_code if isinstance(exc, TpnbError) else 130
