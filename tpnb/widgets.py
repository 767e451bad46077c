"""`tpnb.panel()` / `%tp panel`: an ipywidgets control panel for tpnb.

What it shows: the connection line with a Connect/Quit button; a namespace
selector; the namespace's workloads (services/ports, free / intercepted by me /
by someone else) each with a port field and an Intercept toggle, and the
personal-intercept filter fields used by the next Intercept (`--http-header`,
path prefix / equal / regex) and its app container (`--container`, for pods with
several); per in-kernel server a live chart of requests
per second by status class (2xx/3xx/4xx/5xx) and of latency p50/p99; the
request log, where picking a request opens its details (method, path,
headers, bodies) with Replay buttons (to the kernel's app, or to the cluster's
real app) that show the response; the chosen intercept's environment,
collapsible and filterable; a progress bar while a long step runs.

Why bqplot for the charts: it is ipywidgets-native (every scale, axis and mark
is an ipywidgets model, so updating a chart is setting a mark's `x`/`y`
traits, sent over the widget comm as binary arrays), and its wheel carries
the built JupyterLab 4 extension (installed into share/jupyter/labextensions
by pip), so it works in JupyterLab with no build step and no network.
plotly's FigureWidget also installs from PyPI, but since plotly 6 it goes
through anywidget, ships the whole plotly.js bundle (several MB) to the page
and re-sends figure diffs as JSON; for a few small live series bqplot is the
lighter fit, and its SVG marks carry CSS classes a browser test can watch.
Without bqplot (`pip install bqplot`) the panel shows the same figures as text.

Why it follows push streams and does not poll: intercepts change outside the
panel (the CLI, another kernel, another user), so a thread follows the
connector's status stream (`Session.watch_status`, which pushes every change
at once and repeats the state every 15 s); only while no connector runs
(nothing to follow yet) does it fall back to asking every `poll_interval`
seconds.  Requests are pushed by the in-kernel servers (`inkernel.watch`,
called on their loop thread after each request): the panel's follower only
notes the request and wakes the panel's thread, which redraws at most
`REDRAW_HZ` times a second, and once a second while the chart's window still
has traffic (so the rate falls back to zero), then sleeps until the next push.
Everything stops for good when the panel is closed (its Close button,
`panel.close()`, or the root widget closed) and pauses while no frontend view
shows the panel.

Why actions run on threads: button callbacks arrive on the kernel's shell
thread; a connect, intercept or replay takes time, so it runs on a worker
thread and the kernel stays responsive.  Every action is a call of the one
use-case layer (`tpnb.api.Session`, the same one the CLI and %tp use; the
intercept fields are mapped to its arguments by the CLI's own `intercept_kwargs`).
"""
from __future__ import annotations

import html
import os
import threading
import time
from collections import deque
from typing import Any, Callable

import ipywidgets as w

from . import inkernel, render
from .api import Status, Workload
from .errors import TpnbError
from .magics import lifecycle
from .magics.output import html_table
from .proto import pb

DEFAULT_PORT = 9000
LOG_ROWS = 15
#: seconds of traffic the charts show
WINDOW = 60
#: most chart/log redraws per second (pushes in between are batched)
REDRAW_HZ = 4.0
#: characters of a body shown in the request details
BODY_SHOW = 4000
_CLASS_COLORS = {"2xx": "#2e7d32", "3xx": "#1565c0", "4xx": "#ef6c00", "5xx": "#c62828"}


class Traffic:
    """Per-second counts by status class and latencies of one server's requests, the last `window` s."""

    def __init__(self, window: int | None = None) -> None:
        self.window = window or WINDOW
        self.buckets: dict[int, tuple[list[int], list[float]]] = {}  # second -> ([2xx..5xx], durations)

    def add(self, t: float, status: int, ms: float) -> None:
        sec = int(t)
        b = self.buckets.get(sec)
        if b is None:
            b = self.buckets[sec] = ([0, 0, 0, 0], [])
            for old in [k for k in self.buckets if k <= sec - self.window]:
                del self.buckets[old]
        b[0][min(max(status // 100, 2), 5) - 2] += 1
        b[1].append(ms)

    def active(self, now: float) -> bool:
        """Whether the window still holds requests (the chart must keep moving)."""
        return any(k > int(now) - self.window for k in self.buckets)

    def series(self, now: float) -> dict[str, list[float]]:
        """x (seconds ago, -window+1..0), per-class requests/s, p50 and p99 latency (ms) per second."""
        end = int(now)
        xs, classes, p50, p99 = [], [[], [], [], []], [], []
        for sec in range(end - self.window + 1, end + 1):
            counts, durs = self.buckets.get(sec, ([0, 0, 0, 0], []))
            xs.append(float(sec - end))
            for i in range(4):
                classes[i].append(float(counts[i]))
            if durs:
                d = sorted(durs)
                p50.append(d[len(d) // 2])
                p99.append(d[min(len(d) - 1, int(len(d) * 0.99))])
            else:
                p50.append(float("nan"))
                p99.append(float("nan"))
        return {"x": xs, "2xx": classes[0], "3xx": classes[1], "4xx": classes[2], "5xx": classes[3],
                "p50": p50, "p99": p99}

    def summary(self, now: float) -> str:
        s = self.series(now)
        last = [sum(s[c][-2] for c in ("2xx", "3xx", "4xx", "5xx"))]  # the last complete second
        total = int(sum(sum(s[c]) for c in ("2xx", "3xx", "4xx", "5xx")))
        lat = [v for v in s["p50"] if v == v]
        l99 = [v for v in s["p99"] if v == v]
        out = f"last {self.window} s: {total} requests, {last[0]:.0f} req/s"
        if lat:
            out += f", p50 {lat[-1]:.1f} ms, p99 {l99[-1]:.1f} ms"
        return out


class _Charts:
    """The two live charts of one server (bqplot), or their text stand-in without bqplot."""

    def __init__(self) -> None:
        self.text = w.HTML("")
        self.text.add_class("tpnb-traffic-summary")
        self.draws = 0
        #: the series last drawn (Traffic.series)
        self.last: dict[str, list[float]] = {}
        try:
            import bqplot as bq
        except ImportError:
            self.bq = None
            self.widget = w.VBox([self.text, w.HTML("<i>pip install bqplot for the charts</i>")])
            return
        self.bq = bq
        # requests/s by status class as stacked areas: one filled line per cumulative class total, the
        # largest first, so each band shows its class (bqplot's Bars want an ordinal x: 60 crowded labels)
        xs = bq.LinearScale(min=-(WINDOW - 1), max=0)
        ys = bq.LinearScale(min=0)
        order = list(reversed(_CLASS_COLORS))  # 5xx (the whole height) first, 2xx on top
        self.areas = bq.Lines(x=[0.0], y=[[0.0]] * 4, scales={"x": xs, "y": ys}, fill="bottom",
                              colors=[_CLASS_COLORS[c] for c in order],
                              fill_colors=[_CLASS_COLORS[c] for c in order], fill_opacities=[0.85] * 4,
                              labels=order, display_legend=True)
        self.rate = bq.Figure(marks=[self.areas], title="requests/s by status class",
                              axes=[bq.Axis(scale=xs, label="seconds ago", num_ticks=7),
                                    bq.Axis(scale=ys, orientation="vertical", label="req/s")],
                              legend_location="top-left", animation_duration=0,
                              fig_margin={"top": 40, "bottom": 40, "left": 50, "right": 10},
                              layout=w.Layout(width="460px", height="250px"))
        self.rate.add_class("tpnb-chart-rate")
        lxs = bq.LinearScale(min=-(WINDOW - 1), max=0)
        lys = bq.LinearScale(min=0)
        self.lines = bq.Lines(x=[0.0], y=[[0.0], [0.0]], scales={"x": lxs, "y": lys}, colors=["#1565c0", "#c62828"],
                              labels=["p50", "p99"], display_legend=True, marker="circle", marker_size=12)
        self.latency = bq.Figure(marks=[self.lines], title="latency (ms)",
                                 axes=[bq.Axis(scale=lxs, label="seconds ago", num_ticks=7),
                                       bq.Axis(scale=lys, orientation="vertical", label="ms")],
                                 legend_location="top-left", animation_duration=0,
                                 fig_margin={"top": 40, "bottom": 40, "left": 50, "right": 10},
                                 layout=w.Layout(width="460px", height="250px"))
        self.latency.add_class("tpnb-chart-latency")
        self.widget = w.VBox([self.text, w.HBox([self.rate, self.latency])])

    def draw(self, traffic: Traffic | None, now: float) -> None:
        self.draws += 1
        if traffic is None:
            self.text.value = "<i>no requests yet</i>"
            return
        s = self.last = traffic.series(now)
        self.text.value = html.escape(traffic.summary(now))
        if self.bq is None:
            return
        import numpy as np

        cum = np.cumsum(np.array([s[c] for c in _CLASS_COLORS]), axis=0)  # 2xx, +3xx, +4xx, +5xx
        with self.areas.hold_sync():
            self.areas.x = np.array(s["x"])
            self.areas.y = cum[::-1]
        with self.lines.hold_sync():
            self.lines.x = np.array(s["x"])
            self.lines.y = np.array([s["p50"], s["p99"]])

    def close(self) -> None:
        Panel._close_tree(self.widget)


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
        #: the push stream is being followed (else: poll every poll_interval)
        self.following = False
        self.pushes = 0
        #: wakes the traffic thread: a request pushed by an in-kernel server, a server change, close()
        self._wake = threading.Event()
        #: requests pushed by the in-kernel servers, not yet counted: (port, time, status, ms)
        self._pending: deque[tuple[int, float, int, float]] = deque()
        self._servers_changed = True
        self.traffic: dict[int, Traffic] = {}
        self.record_pushes = 0
        self._last_draw = 0.0
        self._detail: dict | None = None
        self._quiet_select = False
        self.replays = 0
        self._log_lock = threading.Lock()

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
        self.env_filter = w.Text(value="", placeholder="filter: part of a name or value", continuous_update=True,
                                 layout=w.Layout(width="300px"))
        self.env_filter.add_class("tpnb-env-filter")
        self.env_filter.observe(lambda _c: self._show_env(force=True), names="value")
        self.env_html = w.HTML("")
        self.env_html.add_class("tpnb-env")
        self.env_box = w.Accordion(children=[w.VBox([w.HBox([self.env_select, self.env_filter]), self.env_html])],
                                   selected_index=0)
        self.env_box.set_title(0, "Environment")
        self.env_box.add_class("tpnb-env-box")
        # personal-intercept filters for the next Intercept (the CLI's --http-header / --http-path-*)
        self.f_header = w.Text(value="", placeholder="NAME=VALUE, … or auto", description="HTTP header",
                               layout=w.Layout(width="340px"))
        self.f_header.add_class("tpnb-filter-header")
        self.f_path_kind = w.Dropdown(options=[("every path", ""), ("path prefix", "prefix"),
                                               ("path equal", "equal"), ("path regex", "regex")], value="",
                                      layout=w.Layout(width="130px"))
        self.f_path_kind.add_class("tpnb-filter-path-kind")
        self.f_path = w.Text(value="", placeholder="/api", layout=w.Layout(width="220px"))
        self.f_path.add_class("tpnb-filter-path")
        # the app container of the next Intercept, in pods with several (the CLI's --container)
        self.f_container = w.Text(value="", placeholder="app container (pods with several)", description="Container",
                                  layout=w.Layout(width="300px"))
        self.f_container.add_class("tpnb-intercept-container")
        filters = w.VBox([w.HBox([w.HTML("<b>Intercept only</b>&nbsp;", layout=w.Layout(width="110px")),
                                  self.f_header, self.f_path_kind, self.f_path]),
                          w.HBox([w.HTML("<b>In the pod</b>&nbsp;", layout=w.Layout(width="110px")),
                                  self.f_container])])
        # traffic: live charts per server, the request list and a request's details with Replay
        self.traffic_select = w.Dropdown(options=[], description="Traffic of", layout=w.Layout(width="360px"))
        self.traffic_select.add_class("tpnb-traffic-select")
        self.traffic_select.observe(lambda _c: self._wake.set(), names="value")
        self.charts = _Charts()
        self.req_select = w.Select(options=[], rows=8, layout=w.Layout(width="620px"))
        self.req_select.add_class("tpnb-request-select")
        self.req_select.observe(self._on_pick, names="value")
        self.detail_html = w.HTML("<i>pick a request above to see its details</i>")
        self.detail_html.add_class("tpnb-request-detail")
        self.replay_kernel_btn = w.Button(description="Replay to kernel", icon="repeat", disabled=True,
                                          tooltip="send this request again to the app served in this kernel",
                                          layout=w.Layout(width="160px"))
        self.replay_kernel_btn.add_class("tpnb-replay-kernel")
        self.replay_kernel_btn.on_click(lambda _b: self.replay("kernel"))
        self.replay_cluster_btn = w.Button(description="Replay to cluster", icon="cloud", disabled=True,
                                           tooltip="send this request to the real app in the cluster (not intercepted)",
                                           layout=w.Layout(width="160px"))
        self.replay_cluster_btn.add_class("tpnb-replay-cluster")
        self.replay_cluster_btn.on_click(lambda _b: self.replay("cluster"))
        self.replay_html = w.HTML("")
        self.replay_html.add_class("tpnb-replay-result")
        self.widget = w.VBox([
            w.HBox([self.status_html, self.connect_btn, self.refresh_btn, self.close_btn]),
            self.progress_box, self.message,
            w.HTML("<h4 style='margin:6px 0'>Workloads</h4>"), self.namespace, header, self.table, filters,
            w.HTML("<h4 style='margin:6px 0'>Requests served in this kernel</h4>"), self.counters,
            self.traffic_select, self.charts.widget, self.log_html,
            w.HTML("<b>Request details</b>"), self.req_select,
            w.HBox([self.replay_kernel_btn, self.replay_cluster_btn]), self.detail_html, self.replay_html,
            self.env_box,
        ])
        self.widget.add_class("tpnb-panel")
        try:
            self.widget._view_count = 0  # ask the frontend to count views (pause polling when none)
        except Exception:  # noqa: BLE001 - older ipywidgets: just never pause
            pass
        self._unwatch = inkernel.watch(self._on_record)  # requests are pushed to the panel
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
        """Stop following and close every widget of the panel."""
        self._stop.set()
        self._wake.set()
        self._unwatch()
        watch = self._watch
        if watch is not None:
            watch.cancel()
        self._close_tree(self.widget)
        for t in (self._thread, self._watcher):
            if t is not None and t is not threading.current_thread():
                t.join(timeout=5)

    @staticmethod
    def _close_tree(widget: Any) -> None:
        """Close a widget and what it holds: children, and a bqplot Figure's marks and axes with their scales."""
        parts = [*getattr(widget, "children", ()), *getattr(widget, "marks", ()), *getattr(widget, "axes", ())]
        scales = getattr(widget, "scales", None)  # a mark's {"x": scale, "y": scale}
        if isinstance(scales, dict):
            parts += list(scales.values())
        parts.append(getattr(widget, "scale", None))  # an axis's scale
        for child in parts:
            if isinstance(child, w.Widget) and getattr(child, "comm", None) is not None:
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
        """Follow the connector's status stream and redraw the connection and workloads on each message;
        with no connector to follow, ask every `poll_interval` seconds.  Its own thread: a status or list
        call that takes long (a busy API server) never holds up the traffic charts."""
        while not self._closed():
            try:
                watch = lifecycle.session().watch_status()
            except (TpnbError, AttributeError):  # no connector yet (or a session without a stream)
                self.following = False
                if self._stop.wait(self.poll_interval):
                    return
                self._refresh_unless_paused()
                continue
            self._watch = watch
            self.following = True
            try:
                for _st in watch:
                    if self._closed():
                        return
                    self.pushes += 1
                    self._refresh_unless_paused()
            except Exception:  # noqa: BLE001 - connector gone: fall back to polling until it is back
                pass
            finally:
                self.following = False
                self._watch = None
            self._refresh_unless_paused()  # the stream ended: show what the connector's absence means
            self._stop.wait(0.5)

    def _refresh_unless_paused(self) -> None:
        if self._closed() or self._paused():
            return
        try:
            self.refresh()
        except Exception:  # noqa: BLE001 - a closed widget mid-update: the loop ends next turn
            pass

    def _on_record(self, srv: Any, rec: dict | None) -> None:
        """An in-kernel server's push (its loop thread): note it and wake the panel's thread; nothing more."""
        if rec is None:
            self._servers_changed = True
        else:
            self._pending.append((srv.port, time.time(), int(rec.get("status") or 0),
                                  float(rec.get("duration_ms") or 0.0)))
            self.record_pushes += 1
        self._wake.set()

    def _traffic_active(self) -> bool:
        now = time.time()
        return any(t.active(now) for t in self.traffic.values())

    def _poll_loop(self) -> None:
        """The traffic thread: sleeps until an in-kernel server pushes a request, then redraws counters,
        charts and the request list (once a second while the charts' window still has traffic)."""
        while not self._closed():
            self._wake.wait(1.0 if self._traffic_active() else None)
            self._wake.clear()
            if self._closed():
                return
            # batch request pushes: at most REDRAW_HZ redraws a second
            gap = self._last_draw + 1.0 / REDRAW_HZ - time.monotonic()
            if gap > 0 and self._stop.wait(gap):
                return
            try:
                self.refresh_log()
            except Exception:  # noqa: BLE001 - a closed widget mid-update: the loop ends next turn
                if self._closed():
                    return

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
        """Count the pushed requests, redraw counters, charts and the request list (the panel's thread)."""
        with self._log_lock:
            self._refresh_log()

    def _refresh_log(self) -> None:
        self._last_draw = time.monotonic()
        while self._pending:
            port, t, status, ms = self._pending.popleft()
            self.traffic.setdefault(port, Traffic()).add(t, status, ms)
        srvs = inkernel.servers()
        names = {s.port: ", ".join(sorted(s.names)) or f":{s.port}" for s in srvs}
        opts = tuple((f"{names[s.port]} → 127.0.0.1:{s.port}", s.port) for s in srvs)
        if tuple(self.traffic_select.options) != opts:
            keep = self.traffic_select.value if self.traffic_select.value in names else None
            self.traffic_select.options = opts
            self.traffic_select.value = keep if keep is not None else (opts[0][1] if opts else None)
        port = self.traffic_select.value
        self.charts.draw(self.traffic.get(port) if port is not None else None, time.time())
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
        recent = sorted((r for s in srvs for r in s.recent(LOG_ROWS)), key=lambda r: r["time"])[-LOG_ROWS:]
        if not recent:
            self.log_html.value = "<i>no requests yet</i>"
            self._set_request_options(())
            return
        rows = [(r["time"][11:], names.get(r["port"], ""), r["method"],
                 r["path"] + (f"?{r['query']}" if r["query"] else ""), r["status"], r["duration_ms"])
                for r in reversed(recent)]
        self.log_html.value = html_table(["time", "intercept", "method", "path", "status", "ms"], rows)
        self._set_request_options(tuple(
            (f"{r['time'][11:]}  {names.get(r['port'], '')}  {r['method']} {r['path']}"
             f"{'?' + r['query'] if r['query'] else ''}  → {r['status']}  {r['duration_ms']} ms",
             (r["port"], r["seq"])) for r in reversed(recent)))

    # ---------------------------------------------------------------- request details and replay
    def _set_request_options(self, opts: tuple) -> None:
        chosen = self.req_select.value
        if chosen is not None and all(v != chosen for _l, v in opts) and self._detail is not None:
            d = self._detail  # keep the open request listed while newer ones arrive
            opts = opts + ((f"{d['time'][11:]}  {d.get('intercept', '')}  {d['method']} {d['path']}  → "
                            f"{d['status']}  (open)", chosen),)
        if tuple(self.req_select.options) == opts:
            return
        self._quiet_select = True
        try:
            self.req_select.options = opts
            self.req_select.value = chosen if any(v == chosen for _l, v in opts) else None
        finally:
            self._quiet_select = False

    def _on_pick(self, change: dict) -> None:
        if self._quiet_select or change["new"] is None:
            return
        self.show_request(*change["new"])

    def show_request(self, port: int, seq: int) -> dict | None:
        """Open the details of request `seq` of the server on `port` (what picking it in the list does)."""
        srv = inkernel.get_server(port)
        rec = srv.by_seq(seq) if srv is not None else None
        self._detail = rec
        self.replay_html.value = ""
        if rec is None:
            self.detail_html.value = "<i>that request is no longer in the log</i>"
            self.replay_kernel_btn.disabled = self.replay_cluster_btn.disabled = True
            return None
        self.detail_html.value = request_html(rec)
        http = rec.get("type", "http") == "http"
        self.replay_kernel_btn.disabled = not http
        self.replay_cluster_btn.disabled = not (http and rec.get("intercept"))
        return rec

    def replay(self, to: str) -> threading.Thread | None:
        """Replay the open request to "kernel" or "cluster" (through `Session.replay`) on a thread."""
        rec = self._detail
        if rec is None:
            return None
        self.replay_html.value = f"<i>replaying to {html.escape(to)}…</i>"

        def run() -> None:
            try:
                r = lifecycle.session().replay(rec, to=to)
                self.replay_html.value = replayed_html(r, to)
            except TpnbError as err:
                self.replay_html.value = _pre(str(err), error=True)
            except Exception as err:  # noqa: BLE001 - show it in the panel instead of losing it on a thread
                self.replay_html.value = _pre(f"{type(err).__name__}: {err}", error=True)
            finally:
                self.replays += 1

        t = threading.Thread(target=run, name=f"tpnb-panel-replay-{to}", daemon=True)
        t.start()
        return t

    def _show_env(self, st: Status | None = None, force: bool = False) -> None:
        if self._quiet:
            return
        name = self.env_select.value
        st = st or self.last_status
        if not name or st is None:
            self.env_html.value = ""
            self.env_box.set_title(0, "Environment (no intercept)")
            self._env_for = ""
            return
        env = next((ic.environment for ic in st.intercepts if ic.name == name), None) or {}
        needle = self.env_filter.value.strip().lower()
        key = f"{name}:{needle}:{hash(tuple(sorted(env.items())))}"
        if key == self._env_for and not force:
            return
        self._env_for = key
        shown = sorted((k, v) for k, v in env.items() if not needle or needle in k.lower() or needle in v.lower())
        self.env_box.set_title(0, f"Environment of {name} ({len(shown)} of {len(env)} variables)" if needle
                               else f"Environment of {name} ({len(env)} variables)")
        if not env:
            self.env_html.value = "<i>no environment captured (yet)</i>"
        elif not shown:
            self.env_html.value = f"<i>no variable matches {html.escape(needle)!s}</i>"
        else:
            self.env_html.value = html_table(["Variable", "Value"], shown)

    def _on_namespace(self, change: dict) -> None:
        if not self._quiet:
            threading.Thread(target=self.refresh, daemon=True).start()

    # ---------------------------------------------------------------- actions
    def _say(self, text: str, error: bool = False) -> None:
        self.message.value = _pre(text, error) if text else ""

    def intercept_kwargs(self) -> dict[str, Any]:
        """Session.intercept's filter and container arguments from the panel's fields: the fields are put
        in the shape of `tpnb intercept`'s parsed options (--http-header, --http-path-*, --container)
        and mapped by the CLI's own `intercept_kwargs`, so both faces pass the same arguments."""
        from argparse import Namespace

        from .cli import intercept_kwargs
        from .errors import ConfigError

        kind, path = self.f_path_kind.value, self.f_path.value.strip()
        if kind and not path:
            raise ConfigError(f"the path {kind} filter is empty", "a path filter needs a path",
                              "type one (e.g. /api), or choose 'every path'")
        opts = Namespace(http_header=[h.strip() for h in self.f_header.value.split(",") if h.strip()],
                         http_path_prefix="", http_path_equal="", http_path_regex="",
                         container=self.f_container.value.strip())
        if kind:
            setattr(opts, f"http_path_{kind}", path)
        return intercept_kwargs(opts)

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
            kwargs = self.intercept_kwargs()
            ic = lifecycle.session().intercept(name, port, namespace=namespace or None, progress=progress,
                                               owner_pid=os.getpid(), **kwargs)  # ends with this kernel
            lifecycle.own(ic.name, port)
            srv = inkernel.attach(ic.name, port)
            where = "this kernel" if srv is not None else "the program listening there"
            out = f"intercepted {ic.namespace}/{ic.workload} -> 127.0.0.1:{port} ({where})"
            if getattr(ic, "filtered", False):
                out += f"; {render.intercepting(ic)}"
            return out

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


def _pre(text: str, error: bool = False) -> str:
    color = "#c62828" if error else "#333"
    return f"<pre style='color:{color};margin:0;white-space:pre-wrap'>{html.escape(text)}</pre>"


def _body_html(body: Any, total: int | None = None) -> str:
    data = body if isinstance(body, (bytes, bytearray)) else str(body or "").encode()
    if not data:
        return "<i>empty</i>"
    text = bytes(data[:BODY_SHOW]).decode("utf-8", "replace")
    more = []
    if len(data) > BODY_SHOW:
        more.append(f"first {BODY_SHOW} of {len(data)} kept bytes shown")
    if total is not None and total > len(data):
        more.append(f"{total} bytes in all, {len(data)} kept")
    note = f"<div><i>{html.escape('; '.join(more))}</i></div>" if more else ""
    return (f"<pre style='margin:0;white-space:pre-wrap;max-height:200px;overflow:auto;background:#f6f6f6'>"
            f"{html.escape(text)}</pre>{note}")


def request_html(rec: dict) -> str:
    """One request's details: the line, status and timing, both header lists and both bodies."""
    target = rec["path"] + (f"?{rec['query']}" if rec.get("query") else "")
    line = (f"<b>{html.escape(str(rec['method']))} {html.escape(target)}</b> → <b>{rec['status']}</b> in "
            f"{rec['duration_ms']} ms · {rec.get('bytes', 0)} bytes · app v{rec.get('app_version')} · "
            f"{html.escape(str(rec.get('time', '')))} · from {html.escape(str(rec.get('client', '')))}")
    if rec.get("intercept"):
        line += f" · intercept {html.escape(rec['intercept'])}"
    if rec.get("error"):
        line += f"<br><span style='color:#c62828'>{html.escape(str(rec['error']))}</span>"
    parts = [line,
             "<b>Request headers</b>", html_table(["Header", "Value"], rec.get("request_headers") or []),
             "<b>Request body</b>", _body_html(rec.get("request_body"), rec.get("request_bytes")),
             "<b>Response headers</b>", html_table(["Header", "Value"], rec.get("response_headers") or []),
             "<b>Response body</b>", _body_html(rec.get("response_body"), rec.get("bytes"))]
    return "<div>" + "<br>".join(parts) + "</div>"


def replayed_html(r: Any, to: str) -> str:
    """The response to a replay."""
    color = "#2e7d32" if r.status < 400 else "#c62828"
    return (f"<div><b>Replayed to {html.escape(to)}</b> ({html.escape(r.url)}): "
            f"<b style='color:{color}'>{r.status} {html.escape(r.reason)}</b>, {len(r.body)} bytes<br>"
            + html_table(["Header", "Value"], r.headers) + _body_html(r.body) + "</div>")


def panel(poll_interval: float = 2.0) -> Panel:
    """The tpnb panel; the last expression of a cell displays it."""
    return Panel(poll_interval=poll_interval)
