"""Progress for long steps (connect, intercept, uninstall) in a notebook.

api methods report `pb.Progress` events through a callable.  In a notebook
frontend that callable drives an ipywidgets bar + label; when the step ends the
widget is replaced by one plain text line, so a saved notebook shows what
happened without needing live widget state.  Anywhere else (terminal IPython,
tests, nbconvert without widgets) it prints one line per step, like the CLI.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from ..proto import pb


def in_notebook_frontend() -> bool:
    """True in a Jupyter kernel (where widgets can render), False in a terminal or plain Python."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    if ip is None or type(ip).__name__ != "ZMQInteractiveShell":
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


class LineProgress:
    """One printed line per distinct step message."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.last = ""
        self.steps = 0

    def __call__(self, p: pb.Progress) -> None:
        if p.message and p.message != self.last:
            self.last = p.message
            self.steps += 1
            print(p.message, file=self.stream or sys.stdout, flush=True)

    def end(self, ok: bool = True) -> None:
        pass


class WidgetProgress:
    """An ipywidgets bar + label, displayed on the first event, replaced by a text line at the end."""

    def __init__(self, title: str = "") -> None:
        self.title = title
        self.last = ""
        self.steps = 0
        self.t0 = time.monotonic()
        self._box: Any = None
        self._bar: Any = None
        self._label: Any = None
        self._handle: Any = None

    def _show(self) -> None:
        import ipywidgets as w
        from IPython.display import display

        self._bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, bar_style="info",
                                    layout=w.Layout(width="240px"))
        self._label = w.Label(value="")
        self._box = w.HBox([w.Label(self.title), self._bar, self._label]) if self.title else \
            w.HBox([self._bar, self._label])
        self._handle = display(self._box, display_id=True)

    def __call__(self, p: pb.Progress) -> None:
        if self._box is None:
            self._show()
        if p.message and p.message != self.last:
            self.last = p.message
            self.steps += 1
        self._label.value = p.message or self._label.value
        if p.fraction >= 0:
            self._bar.value = min(max(float(p.fraction), 0.0), 1.0)
        else:  # unknown: creep forward so it visibly moves
            self._bar.value = min(self._bar.value + (1 - self._bar.value) * 0.1, 0.95)

    def end(self, ok: bool = True) -> None:
        if self._box is None:
            return
        took = time.monotonic() - self.t0
        mark = "done" if ok else "failed"
        text = f"{self.title + ': ' if self.title else ''}{self.last} ({mark}, {self.steps} steps, {took:.1f} s)"
        try:
            self._handle.update({"text/plain": text}, raw=True)
            self._box.close()
        except Exception:  # noqa: BLE001 - cosmetic only
            pass
        self._box = None


def make_progress(title: str = "") -> LineProgress | WidgetProgress:
    return WidgetProgress(title) if in_notebook_frontend() else LineProgress()
