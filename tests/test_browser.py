"""The panel in a real browser: JupyterLab + Chromium (Playwright), all on loopback.

Flow: start JupyterLab on 127.0.0.1 with a token, open panel.ipynb, Run All,
click Intercept on `hello` (in the cluster: a personal intercept, its header
typed into the panel's filter field; a request without it still reaches the
cluster's app), send a request, see it in the panel's request log;
then send requests in a (bounded) loop and watch the requests/s chart (bqplot's
SVG) change from one second to the next, pick a request in the list, see its
details (headers, body), click Replay to kernel (and, in the cluster, Replay to
cluster: the real `hello` app answers, not the notebook) and see the response;
screenshots in test-artifacts/ (panel.png: the panel after the replays;
panel-chart.png: the chart while the requests arrive).

* `cluster` test: JupyterLab, the kernel and Chromium all run inside the dev
  cluster's laptop netns (the test re-runs itself there through
  `DevCluster.laptop_cmd`), and the request is `curl http://hello.default/...`
  from the laptop, through the real intercept.
* `unit` test: the same browser mechanics against a fake api.Session and a
  direct request to the in-kernel server; proves the panel renders and updates
  in JupyterLab without a cluster.

Network safety: Chromium is Debian's (/usr/bin/chromium, never `playwright
install`), started with background networking, component updates and sync
off; JupyterLab's news feed and update check are off; every URL is loopback
or a dev-cluster service.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_notebook as rn  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-extensions",
                 "--metrics-recording-only", "--no-default-browser-check", "--disable-breakpad"]
ARTIFACTS = rn.REPO / "test-artifacts"
PROBE_PATH = "/from-the-browser-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """A throwaway JupyterLab server on 127.0.0.1, its state in a temp dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root.parent / "jupyterlab.log"

    def start(self, timeout: float = 120) -> None:
        state = self.root.parent / "jupyter-state"
        for d in ("config", "runtime", "workspaces", "settings"):
            (state / d).mkdir(parents=True, exist_ok=True)
        cfg = state / "config" / "jupyter_server_config.json"
        cfg.write_text(json.dumps({
            "ServerApp": {"ip": "127.0.0.1", "port": self.port, "open_browser": False, "allow_root": True,
                          "root_dir": str(self.root), "port_retries": 0},
            "IdentityProvider": {"token": self.token},
            "LabApp": {"news_url": None,
                       "check_for_updates_class": "jupyterlab.handlers.announcements.NeverCheckForUpdate"},
        }))
        news = state / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        news.parent.mkdir(parents=True, exist_ok=True)
        news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))  # no prompt, no fetch
        env = dict(os.environ, JUPYTER_CONFIG_DIR=str(state / "config"), JUPYTER_RUNTIME_DIR=str(state / "runtime"),
                   JUPYTERLAB_WORKSPACES_DIR=str(state / "workspaces"),
                   JUPYTERLAB_SETTINGS_DIR=str(state / "settings"))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "jupyterlab"], stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL, env=env, cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited:\n{self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.url('api/status')}", timeout=2).read()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"JupyterLab did not answer in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def url(self, path: str) -> str:
        sep = "&" if "?" in path else "?"
        return f"http://127.0.0.1:{self.port}/{path}{sep}token={self.token}"

    def stop(self) -> None:
        """SIGTERM: the server shuts its kernels down, whose atexit hooks leave their intercepts."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _accept_kernel_dialog(page: object, seconds: float) -> None:
    """JupyterLab may ask which kernel to start (a race at page load): take the notebook's own."""
    dialog = page.locator(".jp-Dialog")  # type: ignore[attr-defined]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if dialog.count() and dialog.first.is_visible():
            dialog.locator(".jp-mod-accept").first.click()
            return
        time.sleep(0.25)


def _dismiss_news_toast(page: object) -> None:
    """Answer "No" to JupyterLab's news prompt (it would cover the panel in the screenshot)."""
    no = page.locator(".jp-Notification-Toast-Button, .Toastify__toast button", has_text="No")  # type: ignore[attr-defined]
    try:
        if no.count() and no.first.is_visible():
            no.first.click()
    except Exception:  # noqa: BLE001 - cosmetic
        pass


class _Load:
    """Requests in a background loop while the chart is watched (bounded: at most `limit`, every `pause` s)."""

    def __init__(self, send: Callable[[str], str], limit: int = 400, pause: float = 0.05) -> None:
        import threading

        self.send, self.limit, self.pause = send, limit, pause
        self.sent = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and self.sent < self.limit:
            try:
                answer = self.send(f"{PROBE_PATH}/load/{self.sent}")
                if "hello from the panel notebook" not in answer:
                    self.failed.append(answer[:200])
            except Exception as exc:  # noqa: BLE001 - counted, asserted on by the test
                self.failed.append(repr(exc))
            self.sent += 1
            self._stop.wait(self.pause)

    def __enter__(self) -> "_Load":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(30)


def watch_chart_move(page: object, load: _Load, shot: Path, frames: int = 3) -> list[str]:
    """The requests/s chart's SVG, `frames` times a bit more than a second apart while `load` runs:
    each differs from the one before (bars grow and the window moves), and the summary counts up."""
    page.locator(".tpnb-chart-rate svg").first.wait_for(timeout=30_000)  # type: ignore[attr-defined]
    # the whole figure: bqplot draws the axes and the marks in separate <svg>s, and the axes alone only
    # change when the y range does
    chart = page.locator(".tpnb-chart-rate").first  # type: ignore[attr-defined]
    summary = page.locator(".tpnb-traffic-summary").first  # type: ignore[attr-defined]
    seen, counts = [], []
    deadline = time.monotonic() + 60
    while len(seen) < frames and time.monotonic() < deadline:
        time.sleep(1.3)
        svg = chart.inner_html()
        text = summary.inner_text()
        if not seen or svg != seen[-1]:
            seen.append(svg)
            counts.append(int(text.split(" requests")[0].rsplit(" ", 1)[-1]) if " requests" in text else 0)
    assert len(seen) == frames, f"the chart did not change {frames} times in 60 s"
    assert counts == sorted(counts) and counts[-1] > counts[0] > 0, counts
    assert load.sent > 0 and not load.failed, load.failed[:3]
    page.locator(".tpnb-chart-rate").first.screenshot(path=str(shot))  # type: ignore[attr-defined]
    return seen


def open_and_replay(page: object, cluster_text: str | None) -> None:
    """Pick the newest probe request in the request list, check its details, replay it to the kernel
    (and to the cluster when `cluster_text`, which the cluster's real app answers, is given)."""
    select = page.locator(".tpnb-request-select select").first  # type: ignore[attr-defined]
    option = select.locator("option", has_text=PROBE_PATH).first
    option.wait_for(state="attached", timeout=30_000)
    select.select_option(label=option.text_content())
    detail = page.locator(".tpnb-request-detail").first  # type: ignore[attr-defined]
    page.locator(".tpnb-request-detail", has_text="Request headers").wait_for(timeout=30_000)  # type: ignore[attr-defined]
    text = detail.inner_text()
    assert f"GET {PROBE_PATH}" in text and "Response body" in text and "hello from the panel notebook" in text, text
    assert "user-agent" in text.lower() or "host" in text.lower(), text
    page.locator(".tpnb-replay-kernel").first.click()  # type: ignore[attr-defined]
    result = page.locator(".tpnb-replay-result", has_text="Replayed to kernel")  # type: ignore[attr-defined]
    result.wait_for(timeout=30_000)
    rtext = result.inner_text()
    assert "200 OK" in rtext and "hello from the panel notebook" in rtext, rtext
    if cluster_text is not None:
        page.locator(".tpnb-replay-cluster").first.click()  # type: ignore[attr-defined]
        result = page.locator(".tpnb-replay-result", has_text="Replayed to cluster")  # type: ignore[attr-defined]
        result.wait_for(timeout=60_000)
        rtext = result.inner_text()
        assert "200" in rtext and cluster_text in rtext and "hello from the panel notebook" not in rtext, rtext


def drive_panel(root: Path, notebook: str, port: int, send_request: Callable[[], str],
                shot: Path, wait_s: float = 240, send_path: Callable[[str], str] | None = None,
                cluster_text: str | None = None, http_header: str = "",
                unmatched: Callable[[], str] | None = None) -> None:
    """Open `notebook` in JupyterLab, Run All, intercept `hello` to `port`, request, find it in the log;
    with `send_path`: watch the chart move under a request loop, open a request's details and replay it.
    With `http_header` ("NAME=VALUE") the intercept is a personal one, typed into the panel's filter
    field; `unmatched()` then sends a request without the header, which the cluster's app must answer."""
    from playwright.sync_api import sync_playwright

    lab = JupyterLab(root)
    lab.start()
    ms = int(wait_s * 1000)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            try:
                page.goto(lab.url(f"lab/tree/{notebook}"), timeout=ms)
                page.locator(".jp-Notebook").first.wait_for(timeout=ms)
                _accept_kernel_dialog(page, 10)
                page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=ms)
                page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
                page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
                _accept_kernel_dialog(page, 5)

                row = page.locator(".tpnb-row-hello")
                row.wait_for(timeout=ms)
                port_box = row.locator("input")
                port_box.fill(str(port))
                port_box.press("Enter")
                if http_header:
                    header_box = page.locator(".tpnb-filter-header input").first
                    header_box.fill(http_header)
                    header_box.press("Enter")
                toggle = page.locator(".tpnb-intercept-hello")
                toggle.click()
                page.locator(".tpnb-intercept-hello", has_text="Leave").wait_for(timeout=ms)

                _dismiss_news_toast(page)
                answer = send_request()
                assert "hello from the panel notebook" in answer, answer
                if unmatched is not None:  # a personal intercept: others still reach the cluster's app
                    other = unmatched()
                    assert "CLIENT VALUES" in other and "hello from the panel notebook" not in other, other
                    page.locator(".tpnb-message", has_text="HTTP requests with header").wait_for(timeout=30_000)
                page.locator(".tpnb-request-log", has_text=PROBE_PATH).wait_for(timeout=30_000)
                panel = page.locator(".tpnb-panel")
                shot.parent.mkdir(parents=True, exist_ok=True)
                if send_path is not None:
                    page.locator(".tpnb-chart-rate").first.scroll_into_view_if_needed()
                    with _Load(send_path) as load:
                        watch_chart_move(page, load, shot.with_name(shot.stem + "-chart.png"))
                    open_and_replay(page, cluster_text)
                page.set_viewport_size({"width": 1500, "height": 3000})  # the whole panel, replay result included
                panel.scroll_into_view_if_needed()
                panel.screenshot(path=str(shot))
                page.screenshot(path=str(shot.with_name(shot.stem + "-page.png")))
                assert "intercepted by me" in panel.inner_text()
            except Exception:
                shot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shot.with_name(shot.stem + "-failure.png")))
                raise
            finally:
                browser.close()
    finally:
        lab.stop()


# ------------------------------------------------------------------ without a cluster
FAKE_CELL = """import sys; sys.path.insert(0, {tests!r})
from test_magics_unit import FakeSession
from tpnb.magics import lifecycle
from tpnb.api import Session as _Session
FakeSession.replay = _Session.replay  # the panel's Replay goes through the real use-case layer
fake = FakeSession(connected=False)
lifecycle.set_session_factory(lambda: fake)"""


@pytest.mark.unit
@pytest.mark.timeout(600)
def test_panel_in_jupyterlab_with_fake_session(tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    import nbformat

    port = _free_port()
    root = tmp_path / "nb"
    root.mkdir()
    nb = nbformat.read(rn.REPO / "notebooks" / "panel.ipynb", as_version=4)
    fake = nbformat.v4.new_code_cell(FAKE_CELL.format(tests=str(Path(__file__).resolve().parent)))
    nb.cells.insert(1, fake)
    for cell in nb.cells:
        cell.source = cell.source.replace("--port 9000", f"--port {port}")
    nbformat.write(nb, root / "panel.ipynb")

    def get(path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.read().decode()

    drive_panel(root, "panel.ipynb", port, lambda: get(PROBE_PATH), ARTIFACTS / "panel-fake.png", wait_s=120,
                send_path=get)


# ------------------------------------------------------------------ in the dev cluster's laptop
@pytest.mark.cluster
@pytest.mark.timeout(1500)
def test_panel_in_jupyterlab(tmp_path: Path) -> None:
    if not rn.in_laptop():
        try:
            rn.dev_cluster()
            rn.ensure_hello()
        except Exception as exc:  # noqa: BLE001 - fail with the reason, never skip
            pytest.fail(f"dev cluster not usable: {exc}")
        try:
            argv = rn.laptop_argv([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-x", "-q",
                                   "-m", "cluster", f"{Path(__file__).resolve()}::test_panel_in_jupyterlab"])
            res = subprocess.run(argv, capture_output=True, text=True, timeout=1400, cwd=rn.REPO)
        finally:
            rn.stop_laptop_daemon()
        assert res.returncode == 0, f"in the laptop:\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
        assert (ARTIFACTS / "panel.png").exists()
        return

    assert Path(CHROMIUM).exists(), "install Debian's chromium: apt-get install -y chromium"
    root = tmp_path / "nb"
    root.mkdir()
    shutil.copy(rn.REPO / "notebooks" / "panel.ipynb", root / "panel.ipynb")  # the repo copy stays clean

    # a personal intercept typed into the panel's filter field: only requests with this header come here
    name, value = "x-tpnb-panel", "browser-test"

    def curl(*extra: str) -> str:
        res = subprocess.run(["curl", "-s", "--max-time", "20", *extra, f"http://hello.default{PROBE_PATH}"],
                             capture_output=True, text=True, timeout=30)
        return res.stdout + res.stderr

    def get(path: str) -> str:  # through the intercept, like curl (the root daemon's DNS and redirect)
        req = urllib.request.Request(f"http://hello.default{path}", headers={name: value})
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.read().decode()

    # the cluster's real hello (the seed's echoserver) answers a replay to the cluster with its CLIENT VALUES
    drive_panel(root, "panel.ipynb", 9000, lambda: curl("-H", f"{name}: {value}"), ARTIFACTS / "panel.png",
                send_path=get, cluster_text="CLIENT VALUES", http_header=f"{name}={value}", unmatched=curl)
