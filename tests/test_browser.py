"""The panel in a real browser: JupyterLab + Chromium (Playwright), all on loopback.

Flow: start JupyterLab on 127.0.0.1 with a token, open panel.ipynb, Run All,
click Intercept on `hello`, send a request, see it in the panel's request log,
save a screenshot to test-artifacts/panel.png.

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


def drive_panel(root: Path, notebook: str, port: int, send_request: Callable[[], str],
                shot: Path, wait_s: float = 240) -> None:
    """Open `notebook` in JupyterLab, Run All, intercept `hello` to `port`, request, find it in the log."""
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
                toggle = page.locator(".tpnb-intercept-hello")
                toggle.click()
                page.locator(".tpnb-intercept-hello", has_text="Leave").wait_for(timeout=ms)

                _dismiss_news_toast(page)
                answer = send_request()
                assert "hello from the panel notebook" in answer, answer
                page.locator(".tpnb-request-log", has_text=PROBE_PATH).wait_for(timeout=30_000)
                panel = page.locator(".tpnb-panel")
                panel.scroll_into_view_if_needed()
                shot.parent.mkdir(parents=True, exist_ok=True)
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

    def request() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{PROBE_PATH}", timeout=10) as r:
            return r.read().decode()

    drive_panel(root, "panel.ipynb", port, request, ARTIFACTS / "panel-fake.png", wait_s=120)


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

    def request() -> str:
        res = subprocess.run(["curl", "-s", "--max-time", "20", f"http://hello.default{PROBE_PATH}"],
                             capture_output=True, text=True, timeout=30)
        return res.stdout + res.stderr

    drive_panel(root, "panel.ipynb", 9000, request, ARTIFACTS / "panel.png")
