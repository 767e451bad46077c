"""The notebooks, executed by a real Jupyter kernel (nbclient).

* `unit`: the magics inside a real ipykernel (its asyncio loop running, widgets
  progress, the in-kernel server thread) against a fake api.Session, talking
  only to 127.0.0.1.
* `cluster`: notebooks/quickstart.ipynb run inside the dev cluster's laptop
  netns, checked cell by cell against the seed walkthrough.  Fails (does not
  skip) with the reason when the dev cluster is missing.
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_notebook as rn  # noqa: E402

ARTIFACTS = rn.REPO / "test-artifacts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _code(src: str, tag: str) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(src)
    cell.metadata["tags"] = [tag]
    return cell


APP = '''%%tp intercept hello --port {port}
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"from the kernel {v}"]'''

CURL = 'import subprocess\nprint(subprocess.run(["curl", "-s", "http://127.0.0.1:{port}/"], ' \
       'capture_output=True, text=True, timeout=30).stdout)'


@pytest.mark.unit
def test_magics_in_a_real_kernel(tmp_path: Path) -> None:
    port = _free_port()
    tests_dir = Path(__file__).resolve().parent
    left_file = tmp_path / "left.txt"
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [
        _code(f"import sys; sys.path.insert(0, {str(tests_dir)!r})\n"
              "from test_magics_unit import FakeSession\n"
              "from tpnb.magics import lifecycle\n"
              "fake = FakeSession(connected=False)\n"
              "lifecycle.set_session_factory(lambda: fake)\n"
              "_leave = fake.leave\n"
              f"def leave(name):\n    open({str(left_file)!r}, 'a').write(name + '\\n')\n    return _leave(name)\n"
              "fake.leave = leave", "fake"),
        _code("%load_ext tpnb", "load"),
        _code(APP.format(port=port, v="v1"), "v1"),
        _code(CURL.format(port=port), "curl1"),
        _code(APP.format(port=port, v="v2"), "v2"),
        _code(CURL.format(port=port), "curl2"),
        _code("print([c for c in fake.calls if c[0] in ('connect', 'intercept')])", "calls"),
        _code("env = %tp env hello\nprint(sorted(env))", "env"),
        _code("import tpnb\ndf = tpnb.requests_log('hello')\nprint(list(zip(df.path, df.status, df.app_version)))",
              "log"),
        _code("p = tpnb.panel()\np", "panel"),
        _code("print(p.polling, sorted(r[1] for r in p._rows)); p.close(); print(p.polling)", "panel-close"),
        _code("%tp leave hello", "leave"),
        _code(f"from tpnb import inkernel\nprint('server gone:', inkernel.get_server({port}) is None)", "gone"),
        _code("%tp intercept keepme --port 1", "keepme"),  # never left by the notebook: kernel exit must
        _code("%tp intercept hello", "bad"),  # fails: Run All stops here, showing the error's lines only
        _code("print('ran after the failing cell')", "after-bad"),
    ]
    src, dst = tmp_path / "kernel.ipynb", tmp_path / "kernel.out.ipynb"
    nbformat.write(nb, src)
    code = rn.execute(src, dst, timeout=120)
    out = nbformat.read(dst, as_version=4)
    assert code == 1, rn.errors_of(out)  # stopped at "bad", and only there

    v1 = rn.text_of(rn.tagged(out, "v1"))
    assert "Connected to context dev" in v1
    assert f"serving `app` (WSGI) from this kernel on http://127.0.0.1:{port}" in v1
    assert "Using deployment hello" in v1
    progress_outputs = [o for o in rn.tagged(out, "v1").outputs if o.get("output_type") == "display_data"]
    assert any("steps" in o["data"].get("text/plain", "") for o in progress_outputs)  # the bar, replaced by text
    assert rn.text_of(rn.tagged(out, "curl1")).strip() == "from the kernel v1"
    assert "intercept hello kept" in rn.text_of(rn.tagged(out, "v2"))
    assert rn.text_of(rn.tagged(out, "curl2")).strip() == "from the kernel v2"
    assert rn.text_of(rn.tagged(out, "calls")).strip() == f"[('connect', None), ('intercept', 'hello', {port})]"
    assert "KUBERNETES_SERVICE_HOST" in rn.text_of(rn.tagged(out, "env"))
    assert rn.text_of(rn.tagged(out, "log")).strip() == "[('/', 200, 1), ('/', 200, 2)]"
    errors = [(c.metadata.get("tags", [""])[0], o) for c in out.cells for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert [tag for tag, _ in errors] == ["bad"], rn.errors_of(out)
    err = errors[0][1]
    assert err["ename"] == "ConfigError"
    assert err["traceback"][0] == "%tp intercept: the following arguments are required: --port/-p"
    assert err["traceback"][1].startswith("  fix: usage: %tp intercept") and len(err["traceback"]) == 2
    after = rn.tagged(out, "after-bad")
    assert not after.get("outputs") and after.get("execution_count") is None
    panel_out = rn.tagged(out, "panel").outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in panel_out)
    assert rn.text_of(rn.tagged(out, "panel-close")).split() == ["True", "['hello',", "'other']", "False"]
    assert rn.text_of(rn.tagged(out, "gone")).strip() == "server gone: True"
    # nbclient shut the kernel down gracefully: its atexit hook left what the notebook had not
    assert left_file.read_text().split() == ["hello", "keepme"]


@pytest.mark.unit
def test_run_all_stops_at_a_cell_whose_port_is_taken(tmp_path: Path) -> None:
    """Run All: the `%%tp intercept` cell on a busy port fails with the three readable lines; nothing after runs."""
    tests_dir = Path(__file__).resolve().parent
    with socket.socket() as other:  # another program holds the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                               "language": "python"}})
        nb.cells = [
            _code(f"import sys; sys.path.insert(0, {str(tests_dir)!r})\n"
                  "from test_magics_unit import FakeSession\nfrom tpnb.magics import lifecycle\n"
                  "fake = FakeSession()\nlifecycle.set_session_factory(lambda: fake)\n%load_ext tpnb", "fake"),
            _code(APP.format(port=port, v="v1"), "taken"),
            _code("env = %tp env hello\nprint(env['HOSTNAME'])", "next"),
        ]
        src, dst = tmp_path / "taken.ipynb", tmp_path / "taken.out.ipynb"
        nbformat.write(nb, src)
        code = rn.execute(src, dst, timeout=120)
    out = nbformat.read(dst, as_version=4)
    assert code == 1
    errs = [o for o in rn.tagged(out, "taken").outputs if o.get("output_type") == "error"]
    assert len(errs) == 1 and errs[0]["traceback"] == [
        f"127.0.0.1:{port} is already in use", "  why: another program (or another kernel) listens on that port",
        "  fix: choose another --port, or stop the other server"]
    assert rn.tagged(out, "next").get("execution_count") is None and not rn.tagged(out, "next").get("outputs")


# ------------------------------------------------------------------ against the dev cluster
def _laptop_with(ensure_app):
    """The dev cluster with the app a notebook calls; the laptop's daemon stopped afterwards."""
    try:
        rn.dev_cluster()
        ensure_app()
    except Exception as exc:  # noqa: BLE001 - fail with the reason, never skip
        pytest.fail(f"dev cluster not usable: {exc}")
    yield
    rn.stop_laptop_daemon()


def _run_in_laptop(name: str) -> tuple[nbformat.NotebookNode, list[str]]:
    """Execute notebooks/NAME.ipynb in the laptop namespace; the executed copy stays in test-artifacts/.

    Fails with every cell's problem and the runner's stderr when the notebook did not run to its end."""
    ARTIFACTS.mkdir(exist_ok=True)
    dst = ARTIFACTS / f"{name}.out.ipynb"
    argv = rn.laptop_argv([sys.executable, str(Path(rn.__file__)), str(rn.REPO / "notebooks" / f"{name}.ipynb"),
                           str(dst), "--timeout", "300"])
    res = subprocess.run(argv, capture_output=True, text=True, timeout=1100, cwd=rn.REPO)
    assert dst.exists(), f"nothing executed:\n{res.stdout}\n{res.stderr}"
    nb = nbformat.read(dst, as_version=4)
    problems = rn.errors_of(nb)
    assert res.returncode == 0, "\n".join([f"cell problems (see test-artifacts/{name}.out.ipynb):", *problems,
                                           "runner stderr (tail):", res.stderr[-1500:]])
    return nb, problems


@pytest.fixture()
def laptop_with_hello():
    yield from _laptop_with(rn.ensure_hello)


@pytest.mark.cluster
@pytest.mark.timeout(1200)
def test_quickstart_notebook_in_the_laptop(laptop_with_hello) -> None:
    nb, problems = _run_in_laptop("quickstart")

    assert "Connected to context" in rn.text_of(rn.tagged(nb, "connect")), problems
    echo = rn.text_of(rn.tagged(nb, "echo-before"))
    assert "CLIENT VALUES" in echo and "request_uri=http://hello.default" in echo, echo
    assert "Using deployment hello" in rn.text_of(rn.tagged(nb, "intercept-v1")), problems
    assert "hello from the notebook v1" in rn.text_of(rn.tagged(nb, "curl-v1")), problems
    assert "hello from the notebook v1" in rn.text_of(rn.tagged(nb, "from-cluster")), problems
    assert "intercept hello kept" in rn.text_of(rn.tagged(nb, "intercept-v2")), problems
    assert "hello from the notebook v2" in rn.text_of(rn.tagged(nb, "curl-v2")), problems
    swap = rn.text_of(rn.tagged(nb, "load-stop"))
    m = re.search(r"requests during the swap: (\d+) answered, (\d+) failed", swap)
    assert m and int(m.group(1)) > 0 and m.group(2) == "0", swap
    keys = rn.text_of(rn.tagged(nb, "env-keys"))
    assert "HOSTNAME" in keys and "KUBERNETES_SERVICE_HOST" in keys, keys
    records = rn.text_of(rn.tagged(nb, "records"))
    assert "requests served in this kernel" in records and "replayed to the kernel: hello from the notebook v2" in records
    after = rn.text_of(rn.tagged(nb, "echo-after"))
    assert "CLIENT VALUES" in after and "hello from the notebook" not in after, after
    assert "Disconnecting...done" in rn.text_of(rn.tagged(nb, "quit"))
    assert not any("Traceback" in p for p in problems), problems


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_killed_kernel_leaves_nothing_hijacked(laptop_with_hello) -> None:
    """kill -9 of a kernel that serves an intercept: the daemon ends it within seconds."""
    script = Path(__file__).with_name("kernel_kill_check.py")
    res = subprocess.run(rn.laptop_argv([sys.executable, str(script)]), capture_output=True, text=True,
                         timeout=500, cwd=rn.REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    seconds = float(res.stdout.split("RESULT ", 1)[1].split()[0])
    assert seconds <= 10, f"the intercept ended {seconds:.1f} s after the kernel was killed"
    # and the cluster's own app answers again
    out = subprocess.run(rn.laptop_argv(["sh", "-c", "tpnb connect >/dev/null && curl -sS --max-time 10 "
                                         "http://hello.default; tpnb quit >/dev/null"]),
                         capture_output=True, text=True, timeout=200)
    assert "CLIENT VALUES:" in out.stdout, out.stdout + out.stderr


@pytest.mark.cluster
@pytest.mark.timeout(1200)
def test_frameworks_notebook_fastapi_and_flask_in_the_laptop(laptop_with_hello) -> None:
    """notebooks/frameworks.ipynb: FastAPI (JSON, SSE, websocket echo) and Flask served in the kernel,
    called from another laptop process and from a pod, re-run under load with zero failed requests."""
    nb, problems = _run_in_laptop("frameworks")
    assert "serving `app` (ASGI)" in rn.text_of(rn.tagged(nb, "fastapi-v1"))
    for tag in ("fastapi-laptop", "fastapi-pod"):
        text = rn.text_of(rn.tagged(nb, tag))
        assert "json:   {'hello': 'caller', 'version': 'v1'}" in text, (tag, text, problems)
        assert "stream: ['v1 event 0', 'v1 event 1', 'v1 event 2']" in text, (tag, text)
        assert "ws:     ['v1 echo: one', 'v1 echo: two']" in text, (tag, text)
    assert "swapped in the new `app` (app v2)" in rn.text_of(rn.tagged(nb, "fastapi-v2"))
    for tag in ("fastapi-load-stop", "flask-load-stop"):
        text = rn.text_of(rn.tagged(nb, tag))
        for who in ("laptop", "pod"):
            m = re.search(rf"{who}: (\d+) answered, (\d+) failed, versions (\S+)", text)
            assert m, (tag, text)
            assert int(m.group(1)) > 20 and m.group(2) == "0" and m.group(3) == "v1,v2", (tag, text)
    log = rn.text_of(rn.tagged(nb, "fastapi-log"))
    m = re.search(r"(\d+) requests; (\d+) websocket sessions; versions \[1, 2\]", log)
    assert m and int(m.group(2)) >= 1, log
    replay = rn.text_of(rn.tagged(nb, "fastapi-replay"))
    assert "replayed: 200 {'hello': 'caller', 'version': 'v2'}" in replay, replay
    assert "GET /json name=caller -> b'{\"hello\":\"caller\",\"version\":\"v1\"}'" in replay, replay
    assert "serving `app` (WSGI)" in rn.text_of(rn.tagged(nb, "flask-v1"))
    flask = rn.text_of(rn.tagged(nb, "flask-calls"))
    assert flask.count("json:   {'hello': 'caller', 'version': 'v1'}") == 2, flask  # laptop and pod
    assert flask.count("stream: ['v1 event 0', 'v1 event 1', 'v1 event 2']") == 2, flask
    assert "Disconnecting...done" in rn.text_of(rn.tagged(nb, "quit"))
    assert not any("Traceback" in p for p in problems), problems


@pytest.fixture()
def laptop_with_greeter():
    yield from _laptop_with(rn.ensure_greeter)


@pytest.mark.cluster
@pytest.mark.timeout(1200)
def test_grpc_notebook_servicer_intercepted_from_the_kernel(laptop_with_greeter) -> None:
    """notebooks/grpc.ipynb: the cluster's grpcio Greeter intercepted by a servicer defined in a cell; a grpcio
    client in a pod gets the kernel's answer; re-running the cell under load fails no call."""
    nb, problems = _run_in_laptop("grpc")
    assert "pod gets: hello caller from the cluster" in rn.text_of(rn.tagged(nb, "before")), problems
    assert "serving `app` (GRPC) from this kernel on 127.0.0.1:9200 (gRPC)" in rn.text_of(rn.tagged(nb, "grpc-v1"))
    assert "pod gets: hello caller from the kernel v1" in rn.text_of(rn.tagged(nb, "grpc-pod")), problems
    assert "swapped in the new `app` (app v2)" in rn.text_of(rn.tagged(nb, "grpc-v2"))
    text = rn.text_of(rn.tagged(nb, "grpc-load-stop"))
    m = re.search(r"pod: (\d+) answered, (\d+) failed, versions (\S+)", text)
    assert m and int(m.group(1)) > 20 and m.group(2) == "0" and m.group(3) == "v1,v2", text
    log = rn.text_of(rn.tagged(nb, "grpc-log"))
    m = re.search(r"(\d+) calls; statuses \['OK'\] ; versions \[1, 2\]", log)
    assert m and int(m.group(1)) > 20, log
    assert "pod gets: hello caller from the cluster" in rn.text_of(rn.tagged(nb, "after")), problems
