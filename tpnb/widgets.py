"""`tpnb.panel()` / `%tp panel`: an ipywidgets control panel for tpnb.

What it shows: the connection line with a Connect/Quit button; a namespace
selector; the namespace's workloads (services/ports, free / intercepted by me /
by someone else) each with a port field and an Intercept toggle; live request
log and counters of the in-kernel servers; the environment of a chosen
intercept; a progress bar while a long step runs.

Why it follows a push stream: intercepts change outside the panel (the CLI,
another kernel, another user).  A thread follows the connector's status stream
(`Session.watch_status`, which pushes every change at once and repeats the
state every 15 s) and redraws on each message; only while no connector runs
(nothing to follow yet) does it fall back to asking every `poll_interval`
seconds.  The request log, which is local, is checked every 0.5 s.  Everything
stops for good when the panel is closed (its Close button, `panel.close()`, or
the root widget closed) and pauses while no frontend view shows the panel.

Why actions run on threads: button callbacks arrive on the kernel's shell
thread; a connect or intercept takes seconds, so it runs on a worker thread
(one at a time) and the kernel stays responsive.
"""
from __future__ import annotations

import html
import os
import threading
import time
from typing import Any, Callable

import ipywidgets as w

from . import inkernel
from .api import Status, Workload
from .errors import TpnbError
from .magics import lifecycle
from .magics.output import html_table
from .proto import pb

DEFAULT_PORT = 9000
LOG_ROWS = 15


def _classify(wl: Workload) -> str:
    """'free', 'mine' or 'other', from the connector's state enum."""
    return {"intercepted_by_me": "mine", "intercepted_by_other": "other"}.get(wl.state, "free")


_STATE_COLORS = {"free": "#2e7d32", "mine": "#1565c0", "other": "#c62828"}


class _Row:
    """One workload: name | services | state | port | Intercept toggle."""

    def __init__(self, panel: "Panel", wl: Workload) -> None:
        self.panel = panel
        self.key = (wl.namespace, wl.name)
        self.name = w.Label(wl.name, layout=w.Layout(width="160px"))
        self.services = w.Label("", layout=w.Layout(width="260px"))
        self.state = w.HTML("", layout=w.Layout(width="260px"))
        self.port = w.BoundedIntText(value=DEFAULT_PORT, min=1, max=65535, layout=w.Layout(width="90px"),
                                     description_allow_html=False)
        self.toggle = w.ToggleButton(value=False, description="Intercept", icon="exchange",
                                     layout=w.Layout(width="120px"), tooltip=f"intercept {wl.name}")
        self.toggle.add_class("tpnb-intercept")
        self.toggle.add_class(f"tpnb-intercept-{wl.name}")
        self.toggle.observe(self._on_toggle, names="value")
        self.box = w.HBox([self.name, self.services, self.state, self.port, self.toggle])
        self.box.add_class(f"tpnb-row-{wl.name}")  # stable hooks for browser tests and custom CSS
        self._quiet = False
        self.update(wl)

    def update(self, wl: Workload) -> None:
        kind = _classify(wl)
        self.services.value = ", ".join(wl.services) or "no service"
        label = wl.state_text
        self.state.value = f"<span style='color:{_STATE_COLORS[kind]}'>{html.escape(label)}</span>"
        self._quiet = True
        try:
            self.toggle.value = kind == "mine"
            self.toggle.description = "Leave" if kind == "mine" else "Intercept"
            self.toggle.button_style = "info" if kind == "mine" else ""
            self.toggle.disabled = kind == "other"
            if wl.intercept is not None and kind == "mine":
                self.port.value = wl.intercept.local_port
            self.port.disabled = kind != "free"
        finally:
            self._quiet = False

    def _on_toggle(self, change: dict) -> None:
        if self._quiet:
            return
        ns, name = self.key
        if change["new"]:
            self.panel.intercept(name, int(self.port.value), ns)
        else:
            self.panel.leave(name)


class Panel:
    """The panel.  Display it (it is the last value of a cell, or `display(panel)`); `close()` ends it."""

    def __init__(self, poll_interval: float = 2.0, start: bool = True) -> None:
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._busy = threading.Lock()
        self._apply_lock = threading.RLock()
        self._rows: dict[tuple[str, str], _Row] = {}
        self._quiet = False
        self._log_key: Any = None
        self._env_for = ""
        self._seen_view = False
        self.polls = 0
        self.last_status: Status | None = None
        self._thread: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._watch: Any = None
        #: set by the push stream: redraw now
        self._pushed = threading.Event()
        #: the push stream is being followed (else: poll every poll_interval)
        self.following = False
        self.pushes = 0

        self.status_html = w.HTML("<i>checking…</i>")
        self.connect_btn = w.Button(description="Connect", icon="plug", layout=w.Layout(width="110px"))
        self.connect_btn.add_class("tpnb-connect")
        self.connect_btn.on_click(lambda _b: self._connect_or_quit())
        self.refresh_btn = w.Button(icon="refresh", tooltip="refresh now", layout=w.Layout(width="40px"))
        self.refresh_btn.on_click(lambda _b: self.refresh())
        self.close_btn = w.Button(description="Close", icon="times", layout=w.Layout(width="90px"))
        self.close_btn.on_click(lambda _b: self.close())
        # a combobox: pick a mapped namespace or type any other (the API has no namespace listing)
        self.namespace = w.Combobox(options=[], value="", placeholder="namespace", description="Namespace",
                                    ensure_option=False, continuous_update=False, layout=w.Layout(width="300px"))
        self.namespace.observe(self._on_namespace, names="value")
        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, layout=w.Layout(width="240px"))
        self.bar_label = w.Label("")
        self.progress_box = w.HBox([self.bar, self.bar_label], layout=w.Layout(display="none"))
        self.message = w.HTML("")
        self.message.add_class("tpnb-message")
        header = w.HBox([w.HTML("<b>Name</b>", layout=w.Layout(width="160px")),
                         w.HTML("<b>Services</b>", layout=w.Layout(width="260px")),
                         w.HTML("<b>State</b>", layout=w.Layout(width="260px")),
                         w.HTML("<b>Local port</b>", layout=w.Layout(width="90px")), w.HTML("")])
        self.table = w.VBox([])
        self.counters = w.HTML("")
        self.log_html = w.HTML("<i>no in-kernel servers</i>")
        self.log_html.add_class("tpnb-request-log")
        self.env_select = w.Dropdown(options=[], description="Intercept", layout=w.Layout(width="300px"))
        self.env_select.observe(lambda _c: self._show_env(), names="value")
        self.env_html = w.HTML("")
        self.widget = w.VBox([
            w.HBox([self.status_html, self.connect_btn, self.refresh_btn, self.close_btn]),
            self.progress_box, self.message,
            w.HTML("<h4 style='margin:6px 0'>Workloads</h4>"), self.namespace, header, self.table,
            w.HTML("<h4 style='margin:6px 0'>Requests served in this kernel</h4>"), self.counters, self.log_html,
            w.HTML("<h4 style='margin:6px 0'>Environment</h4>"), self.env_select, self.env_html,
        ])
        self.widget.add_class("tpnb-panel")
        try:
            self.widget._view_count = 0  # ask the frontend to count views (pause polling when none)
        except Exception:  # noqa: BLE001 - older ipywidgets: just never pause
            pass
        self.refresh()
        self.refresh_log()
        if start:
            self.start()

    # ---------------------------------------------------------------- display & lifetime
    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll_loop, name="tpnb-panel", daemon=True)
            self._thread.start()
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=self._watch_loop, name="tpnb-panel-watch", daemon=True)
            self._watcher.start()

    @property
    def polling(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Stop polling and close every widget of the panel."""
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.cancel()
        self._close_tree(self.widget)
        for t in (self._thread, self._watcher):
            if t is not None and t is not threading.current_thread():
                t.join(timeout=5)

    @staticmethod
    def _close_tree(widget: Any) -> None:
        for child in getattr(widget, "children", ()):
            Panel._close_tree(child)
        widget.close()

    def _closed(self) -> bool:
        return self._stop.is_set() or getattr(self.widget, "comm", None) is None

    def _paused(self) -> bool:
        views = getattr(self.widget, "_view_count", None)
        if views:
            self._seen_view = True
        return bool(self._seen_view and views == 0)

    def _watch_loop(self) -> None:
        """Follow the connector's status stream; each message asks for a redraw."""
        while not self._closed():
            try:
                watch = lifecycle.session().watch_status()
            except (TpnbError, AttributeError):  # no connector yet (or a session without a stream)
                self.following = False
                self._stop.wait(self.poll_interval)
                continue
            self._watch = watch
            self.following = True
            try:
                for _st in watch:
                    if self._closed():
                        return
                    self.pushes += 1
                    self._pushed.set()
            except Exception:  # noqa: BLE001 - connector gone: fall back to polling until it is back
                pass
            finally:
                self.following = False
                self._watch = None
            self._pushed.set()  # the stream ended: show what the connector's absence means
            self._stop.wait(0.5)

    def _poll_loop(self) -> None:
        next_poll = time.monotonic() + self.poll_interval
        while not self._closed():
            due = self._pushed.is_set() or (not self.following and time.monotonic() >= next_poll)
            if due and not self._paused():
                self._pushed.clear()
                self.refresh()
                next_poll = time.monotonic() + self.poll_interval
            try:
                self.refresh_log()
            except Exception:  # noqa: BLE001 - a closed widget mid-update: the loop ends next turn
                pass
            self._stop.wait(0.5)

    # ---------------------------------------------------------------- polling
    def refresh(self) -> None:
        """Poll the daemon once and redraw (called by the thread, the refresh button and tests)."""
        if self._closed():
            return
        s = lifecycle.session()
        workloads: list[Workload] = []
        problem = ""
        try:
            st = s.status()
            if st.connected:
                workloads = s.list(self.namespace.value or st.namespace or None)
        except TpnbError as err:
            st, problem = Status(connected=False, daemon_running=False), str(err)
        except Exception as err:  # noqa: BLE001 - keep the panel alive; show why
            st, problem = Status(connected=False, daemon_running=False), f"{type(err).__name__}: {err}"
        self.polls += 1
        self.last_status = st
        try:
            self._apply(st, workloads, problem)
        except Exception:  # noqa: BLE001 - widgets closed under us
            if not self._closed():
                raise

    def _apply(self, st: Status, workloads: list[Workload], problem: str) -> None:
        with self._apply_lock:
            if not st.daemon_running:
                line = "<b>Not connected</b> (tpnb daemon not running)"
            elif not st.connected:
                line = "<b>Not connected</b>"
            else:
                line = (f"<b>Connected</b> to context {html.escape(st.context)} ({html.escape(st.server)}); "
                        f"namespace {html.escape(st.namespace)}")
            if st.error:
                line += f" <span style='color:#c62828'>{html.escape(st.error)}</span>"
            self.status_html.value = line
            if not self._busy.locked():
                self.connect_btn.description = "Quit" if st.connected else "Connect"
                self.connect_btn.icon = "power-off" if st.connected else "plug"
                self.connect_btn.disabled = False
            if problem and not self._busy.locked():
                self._say(problem, error=True)

            names = [st.namespace] if st.namespace else []
            names += [n for n in st.mapped_namespaces if n and n not in names]
            names += [wl.namespace for wl in workloads if wl.namespace not in names]
            current = self.namespace.value
            if current and current not in names:
                names.append(current)
            if tuple(self.namespace.options) != tuple(names) or (not current and names):
                self._quiet = True
                try:
                    self.namespace.options = tuple(names)
                    self.namespace.value = current or (names[0] if names else "")
                finally:
                    self._quiet = False

            seen = []
            for wl in workloads:
                key = (wl.namespace, wl.name)
                row = self._rows.get(key)
                if row is None:
                    row = self._rows[key] = _Row(self, wl)
                else:
                    row.update(wl)
                seen.append(key)
            for key in [k for k in self._rows if k not in seen]:
                self._close_tree(self._rows.pop(key).box)
            children = tuple(self._rows[k].box for k in seen)
            if tuple(self.table.children) != children:
                self.table.children = children if children else (
                    w.HTML("<i>connect to see workloads</i>" if not st.connected else "<i>no workloads</i>"),)

            ic_names = sorted({ic.name for ic in st.intercepts})
            if tuple(self.env_select.options) != tuple(ic_names):
                keep = self.env_select.value if self.env_select.value in ic_names else None
                self.env_select.options = ic_names
                self.env_select.value = keep or (ic_names[0] if ic_names else None)
            self._show_env(st)

    def refresh_log(self) -> None:
        """Redraw the counters and recent requests when an in-kernel server served something."""
        srvs = inkernel.servers()
        key = tuple((s.port, s.counters["requests"], s.app_version, tuple(sorted(s.names))) for s in srvs)
        if key == self._log_key:
            return
        self._log_key = key
        if not srvs:
            self.counters.value = ""
            self.log_html.value = "<i>no in-kernel servers (use %%tp intercept, or %tp serve)</i>"
            return
        lines = []
        for s in srvs:
            sm = s.summary()
            who = ", ".join(sm["names"]) or "(no intercept)"
            lines.append(f"<b>{html.escape(who)}</b> → 127.0.0.1:{sm['port']} ({sm['kind'].upper()}, "
                         f"app v{sm['app_version']}): {sm['requests']} requests · {sm['2xx']} 2xx · "
                         f"{sm['4xx']} 4xx · {sm['5xx']} 5xx · avg {sm['avg_ms']} ms")
        self.counters.value = "<br>".join(lines)
        names = {s.port: ", ".join(sorted(s.names)) or f":{s.port}" for s in srvs}
        recent = sorted((r for s in srvs for r in list(s.log)[-LOG_ROWS:]), key=lambda r: r["time"])[-LOG_ROWS:]
        if not recent:
            self.log_html.value = "<i>no requests yet</i>"
            return
        rows = [(r["time"][11:], names.get(r["port"], ""), r["method"],
                 r["path"] + (f"?{r['query']}" if r["query"] else ""), r["status"], r["duration_ms"])
                for r in reversed(recent)]
        self.log_html.value = html_table(["time", "intercept", "method", "path", "status", "ms"], rows)

    def _show_env(self, st: Status | None = None) -> None:
        if self._quiet:
            return
        name = self.env_select.value
        st = st or self.last_status
        if not name or st is None:
            self.env_html.value = ""
            self._env_for = ""
            return
        env = next((ic.environment for ic in st.intercepts if ic.name == name), None)
        key = f"{name}:{hash(tuple(sorted((env or {}).items())))}"
        if key == self._env_for:
            return
        self._env_for = key
        self.env_html.value = (html_table(["Variable", "Value"], sorted(env.items())) if env
                               else "<i>no environment captured (yet)</i>")

    def _on_namespace(self, change: dict) -> None:
        if not self._quiet:
            threading.Thread(target=self.refresh, daemon=True).start()

    # ---------------------------------------------------------------- actions
    def _say(self, text: str, error: bool = False) -> None:
        if not text:
            self.message.value = ""
            return
        color = "#c62828" if error else "#333"
        self.message.value = f"<pre style='color:{color};margin:0;white-space:pre-wrap'>{html.escape(text)}</pre>"

    def _progress(self, p: pb.Progress) -> None:
        self.bar_label.value = p.message or self.bar_label.value
        if p.fraction >= 0:
            self.bar.value = min(max(float(p.fraction), 0.0), 1.0)
        else:
            self.bar.value = min(self.bar.value + (1 - self.bar.value) * 0.1, 0.95)

    def _run_action(self, title: str, fn: Callable[[Callable[[pb.Progress], None]], str]) -> threading.Thread | None:
        """Run one long action on a worker thread with the progress bar; errors go to the message line."""
        if not self._busy.acquire(blocking=False):
            self._say("another action is still running", error=True)
            self.refresh()  # puts the toggles back as they were
            return None

        def run() -> None:
            self.connect_btn.disabled = True
            self.bar.value, self.bar_label.value = 0.0, title
            self.progress_box.layout.display = "flex"
            self._say("")
            try:
                self._say(fn(self._progress) or "")
            except (TpnbError, KeyboardInterrupt) as err:
                self._say(str(err) or type(err).__name__, error=True)
            except Exception as err:  # noqa: BLE001 - show it in the panel instead of losing it on a thread
                self._say(f"{type(err).__name__}: {err}", error=True)
            finally:
                self.progress_box.layout.display = "none"
                self._busy.release()
                self.refresh()
                self.refresh_log()

        t = threading.Thread(target=run, name=f"tpnb-panel-{title}", daemon=True)
        t.start()
        return t

    def intercept(self, name: str, port: int, namespace: str | None = None) -> threading.Thread | None:
        def act(progress: Callable[[pb.Progress], None]) -> str:
            ic = lifecycle.session().intercept(name, port, namespace=namespace or None, progress=progress,
                                               owner_pid=os.getpid())  # ends with this kernel
            lifecycle.own(ic.name, port)
            srv = inkernel.attach(ic.name, port)
            where = "this kernel" if srv is not None else "the program listening there"
            return f"intercepted {ic.namespace}/{ic.workload} -> 127.0.0.1:{port} ({where})"

        return self._run_action(f"intercept {name}", act)

    def leave(self, name: str) -> threading.Thread | None:
        def act(progress: Callable[[pb.Progress], None]) -> str:
            try:
                lifecycle.session().leave(name)
            finally:
                lifecycle.ended(name)
            return f"left {name}"

        return self._run_action(f"leave {name}", act)

    def _connect_or_quit(self) -> threading.Thread | None:
        st = self.last_status
        if st is not None and st.connected:
            def quit_(progress: Callable[[pb.Progress], None]) -> str:
                lifecycle.session().quit()
                for name in lifecycle.owned():
                    lifecycle.ended(name)
                return "disconnected"

            return self._run_action("quit", quit_)

        def connect(progress: Callable[[pb.Progress], None]) -> str:
            st = lifecycle.session().connect(progress=progress)
            return f"Connected to context {st.context} ({st.server})"

        return self._run_action("connect", connect)


def panel(poll_interval: float = 2.0) -> Panel:
    """The tpnb panel; the last expression of a cell displays it."""
    return Panel(poll_interval=poll_interval)
