"""The notebook face without a daemon: %tp parsing, error text, %%tp intercept logic, the panel.

A fake api.Session stands in for the daemon, so these run anywhere in seconds.
"""
from __future__ import annotations

import argparse
import socket
from pathlib import Path
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from tpnb import cli, inkernel
from tpnb.api import Intercept, Status, Workload
from tpnb.errors import InterceptError, NotConnected
from tpnb.magics import lifecycle, parser

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------ fakes
def _ic(name: str, port: int, state: str = "ACTIVE") -> Intercept:
    return Intercept(name=name, workload=name, namespace="default", kind="Deployment", service=name,
                     service_port="80", local_port=port, target_host="127.0.0.1", state=state, message="",
                     holder="me@here", pod_ips=["10.42.0.9"],
                     environment={"HOSTNAME": f"{name}-abc", "KUBERNETES_SERVICE_HOST": "10.43.0.1"},
                     mount_point="", id=f"id-{name}")


@dataclass
class FakeSession:
    connected: bool = True
    intercepts: dict[str, Intercept] = field(default_factory=dict)
    calls: list[tuple] = field(default_factory=list)
    fail_intercept: Exception | None = None

    def status(self) -> Status:
        return Status(connected=self.connected, context="dev", server="https://10.0.0.1:6443", outbound=True,
                      namespace="default", mapped_namespaces=["default"], daemon_version="0.1.0",
                      intercepts=list(self.intercepts.values()))

    def connect(self, namespace: Any = None, progress: Any = None, say: Any = None, **kw: Any) -> Status:
        self.calls.append(("connect", namespace))
        if progress:
            from tpnb.proto import pb

            progress(pb.Progress(step="x", message="Connecting to traffic manager...", fraction=0.5))
        self.connected = True
        return self.status()

    def quit(self, stop_daemon: bool = False) -> bool:
        self.calls.append(("quit", stop_daemon))
        self.connected = False
        self.intercepts.clear()
        return True

    def list(self, namespace: str | None = None) -> list[Workload]:
        self._require()
        self.calls.append(("list", namespace))
        out = []
        for name in ("hello", "other"):
            ic = self.intercepts.get(name)
            state = "intercepted_by_me" if ic else ("intercepted_by_other" if name == "other" else "free")
            out.append(Workload(name=name, namespace="default", kind="Deployment",
                                services=[f"{name}:80->8080"], state=state, agent_installed=bool(ic),
                                intercept=ic, holder="bob@far" if name == "other" else ""))
        return out

    def _require(self) -> None:
        if not self.connected:
            raise NotConnected("not connected", "the tpnb daemon is not running",
                               "run `tpnb connect` (or `%tp connect`) first")

    def intercept(self, name: str, port: int, progress: Any = None, **kw: Any) -> Intercept:
        self._require()
        self.calls.append(("intercept", name, port))
        if self.fail_intercept:
            raise self.fail_intercept
        ic = self.intercepts[name] = _ic(name, port)
        return ic

    def leave(self, name: str) -> None:
        self._require()
        self.calls.append(("leave", name))
        if self.intercepts.pop(name, None) is None:
            raise NotConnected(f"no intercept named {name!r}")

    def get_intercept(self, name: str) -> Intercept:
        if name not in self.intercepts:
            raise NotConnected(f"no intercept named {name!r}", hint="`tpnb list` shows what is intercepted")
        return self.intercepts[name]

    def env(self, name: str) -> dict[str, str]:
        return dict(self.get_intercept(name).environment)

    def version(self) -> dict[str, str]:
        return {"client": "0.1.0", "daemon": "0.1.0"}


@pytest.fixture()
def ip():
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython() or __import__("IPython").get_ipython()  # one shell per test process
    shell.run_line_magic("load_ext", "tpnb")
    yield shell


@pytest.fixture()
def fake():
    f = FakeSession()
    lifecycle.set_session_factory(lambda: f)
    yield f
    inkernel.stop_all(grace=0)
    for name in list(lifecycle.owned()):
        lifecycle.disown(name)
    lifecycle.set_session_factory(__import__("tpnb.api", fromlist=["Session"]).Session)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ parsing: the CLI's parser
CLI_LINES = [
    "connect", "connect -n staging --mapped-namespaces a,b --also-proxy 10.1.0.0/16 --context dev",
    "status", "list", "list -n default", "quit", "quit -r", "quit -u",
    "intercept hello --port 9000", "intercept hello -p 9000:http -n default --service hello --workload hello",
    "intercept hello --port 9000 --env-json /tmp/e.json --env-file /tmp/e.env",
    "leave hello", "uninstall --everything", "uninstall --agent hello -n default", "uninstall -a",
    "version", "config view", "loglevel debug",
]


@pytest.mark.parametrize("line", CLI_LINES)
def test_magic_parses_like_the_cli(line: str) -> None:
    want = vars(cli.build_parser().parse_args(line.split()))
    got, cmd = parser.parse(line)
    got = vars(got)
    got.pop("app", None)  # the only notebook addition to a CLI command (for %%tp intercept)
    assert got == want and cmd == []


def test_magic_parser_covers_every_cli_command() -> None:
    cli_cmds = set(parser._subparsers(cli.build_parser()).choices)
    magic_cmds = set(parser._subparsers(parser.build_magic_parser()).choices)
    assert cli_cmds <= magic_cmds
    assert set(parser.NOTEBOOK_ONLY) <= magic_cmds


def test_command_after_double_dash_is_split_off() -> None:
    args, cmd = parser.parse("intercept hello --port 9000 -- python3 -m http.server 9000")
    assert args.name == "hello" and cmd == ["python3", "-m", "http.server", "9000"]


def test_cell_magic_accepts_app_option() -> None:
    args, _ = parser.parse("intercept hello --port 9000 --app myapp")
    assert isinstance(args, argparse.Namespace) and args.app == "myapp"


# ------------------------------------------------------------------ errors: raised (the cell fails), shown readable
def failing(ip: Any, capsys: Any, source: str) -> str:
    """Run `source` as a cell the way a notebook does; it must fail with a TpnbError shown as its lines only."""
    from tpnb.errors import TpnbError

    result = ip.run_cell(source)
    assert not result.success, "the cell should fail (so Run All stops)"
    assert isinstance(result.error_in_exec, TpnbError), repr(result.error_in_exec)
    cap = capsys.readouterr()
    text = cap.out + cap.err
    assert "Traceback" not in text and "tpnb/" not in text and 'File "' not in text, text
    assert str(result.error_in_exec) in text
    return text


def test_bad_argument_is_readable_without_traceback(ip, capsys) -> None:
    err = failing(ip, capsys, "%tp intercept hello")
    assert "%tp intercept: the following arguments are required: --port/-p" in err
    assert "fix: usage: %tp intercept" in err


def test_bad_port_uses_the_cli_words(ip, fake, capsys) -> None:
    err = failing(ip, capsys, "%tp intercept hello --port nine")
    assert "invalid --port 'nine'" in err and "fix:" in err


def test_unknown_command_and_bad_quotes(ip, capsys) -> None:
    assert "invalid choice: 'frobnicate'" in failing(ip, capsys, "%tp frobnicate")
    err = failing(ip, capsys, "%tp leave 'hello")
    assert "cannot parse" in err and "check the quotes" in err


def test_api_error_prints_what_why_fix(ip, fake, capsys) -> None:
    fake.connected = False
    err = failing(ip, capsys, "x = %tp list\nreached = True")
    assert "reached" not in ip.user_ns  # the rest of the cell (and of Run All) does not run
    assert err.splitlines() == ["not connected", "  why: the tpnb daemon is not running",
                                "  fix: run `tpnb connect` (or `%tp connect`) first"]


def test_help_prints_and_returns_none(ip, capsys) -> None:
    assert ip.run_line_magic("tp", "intercept --help") is None
    out = capsys.readouterr()
    assert "usage: %tp intercept" in out.out and "--app" in out.out and not out.err


def test_other_cell_magics_are_refused(ip, fake, capsys) -> None:
    assert "only `%%tp intercept` takes a cell" in failing(ip, capsys, "%%tp status\nx = 1")


# ------------------------------------------------------------------ line commands mirror the CLI text
def test_status_list_version_text(ip, fake, capsys) -> None:
    ip.run_line_magic("tp", "status")
    ip.run_line_magic("tp", "list")
    ip.run_line_magic("tp", "version")
    out = capsys.readouterr().out
    assert "Connected to context dev (https://10.0.0.1:6443)" in out
    assert "hello : free (Deployment; hello:80->8080)" in out
    assert "Client: v0.1.0" in out


def test_connect_prints_like_cli(ip, fake, capsys) -> None:
    fake.connected = False
    ip.run_line_magic("tp", "connect -n default")
    out = capsys.readouterr().out
    assert "Connecting to traffic manager..." in out  # progress, as lines outside a notebook frontend
    assert out.rstrip().endswith("Connected to context dev (https://10.0.0.1:6443)")


def test_line_intercept_env_mounts_leave(ip, fake, capsys) -> None:
    ip.run_line_magic("tp", "intercept hello --port 9123")
    out = capsys.readouterr().out
    assert "Using deployment hello" in out and "Destination   : 127.0.0.1:9123" in out
    assert lifecycle.owned() == {"hello": 9123}
    env = ip.run_line_magic("tp", "env hello")
    assert isinstance(env, dict) and env["KUBERNETES_SERVICE_HOST"] == "10.43.0.1"
    assert "<table>" in env._repr_html_() and "HOSTNAME" in env._repr_html_()
    assert ip.run_line_magic("tp", "mounts hello") == ""
    assert "no volumes are mounted for hello" in capsys.readouterr().err
    ip.run_line_magic("tp", "leave hello")
    assert "hello" not in fake.intercepts and lifecycle.owned() == {}


def test_quit_forgets_intercepts(ip, fake, capsys) -> None:
    ip.run_line_magic("tp", "intercept hello --port 9124")
    ip.run_line_magic("tp", "quit")
    out = capsys.readouterr().out
    assert "Disconnecting...done" in out
    assert lifecycle.owned() == {}


# ------------------------------------------------------------------ %%tp intercept
WSGI_CELL = '''
VERSION = "{v}"
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"hello from the notebook {{VERSION}}".encode()]
'''


def test_cell_serves_in_kernel_and_rerun_swaps_without_reintercepting(ip, fake, capsys) -> None:
    port = free_port()
    ip.run_cell_magic("tp", f"intercept hello --port {port}", WSGI_CELL.format(v="v1"))
    out = capsys.readouterr().out
    assert f"serving `app` (WSGI) from this kernel on http://127.0.0.1:{port}" in out
    assert "Using deployment hello" in out
    assert requests.get(f"http://127.0.0.1:{port}/").text == "hello from the notebook v1"

    ip.run_cell_magic("tp", f"intercept hello --port {port}", WSGI_CELL.format(v="v2"))
    out = capsys.readouterr().out
    assert "swapped in the new `app`" in out and "intercept hello kept" in out
    assert requests.get(f"http://127.0.0.1:{port}/x").text == "hello from the notebook v2"
    assert [c for c in fake.calls if c[0] == "intercept"] == [("intercept", "hello", port)]  # created once

    import tpnb

    log = tpnb.requests_log("hello")  # a DataFrame (pandas is installed here)
    assert list(zip(log.method, log.path, log.status, log.app_version)) == [("GET", "/", 200, 1), ("GET", "/x", 200, 2)]
    assert ip.run_line_magic("tp", "requests hello").equals(log)
    assert ip.run_line_magic("tp", "requests hello --tail 1").path.tolist() == ["/x"]
    assert ("host", f"127.0.0.1:{port}") in log.iloc[0].request_headers
    assert log.iloc[1].response_body == b"hello from the notebook v2"
    assert tpnb.replay(log.iloc[0], to="kernel").text == "hello from the notebook v2"  # now served by v2
    assert len(inkernel.requests_log("hello")) == 3  # the replay is a request too

    ip.run_line_magic("tp", "leave hello")
    assert inkernel.get_server(port) is None  # leave stops the cell's server
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert len(tpnb.requests_log("hello")) == 3  # the log outlives the server


GRPC_CELL = '''
import sys
sys.path.insert(0, {nbdir!r})
import greeter_grpc
from google.protobuf.wrappers_pb2 import StringValue

class Greeter(greeter_grpc.GreeterServicer):
    def SayHello(self, request, context):
        return StringValue(value=f"hello {{request.value}} from {v}")

app = Greeter()
'''


def test_cell_with_a_grpc_servicer_serves_it_and_rerun_swaps(ip, fake, capsys) -> None:
    import grpc
    from google.protobuf.wrappers_pb2 import StringValue

    nbdir = str(Path(__file__).resolve().parent.parent / "notebooks")
    port = free_port()
    ip.run_cell_magic("tp", f"intercept greeter --port {port}", GRPC_CELL.format(nbdir=nbdir, v="v1"))
    out = capsys.readouterr().out
    assert f"serving `app` (GRPC) from this kernel on 127.0.0.1:{port} (gRPC)" in out
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        say = ch.unary_unary("/greeter.Greeter/SayHello", request_serializer=StringValue.SerializeToString,
                             response_deserializer=StringValue.FromString)
        assert say(StringValue(value="ann"), timeout=10).value == "hello ann from v1"
        ip.run_cell_magic("tp", f"intercept greeter --port {port}", GRPC_CELL.format(nbdir=nbdir, v="v2"))
        out = capsys.readouterr().out
        assert "swapped in the new `app` (app v2)" in out and "intercept greeter kept" in out
        assert say(StringValue(value="bob"), timeout=10).value == "hello bob from v2"  # same channel
    assert [c for c in fake.calls if c[0] == "intercept"] == [("intercept", "greeter", port)]
    ip.run_line_magic("tp", "leave greeter")
    assert inkernel.get_server(port) is None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_cell_with_custom_app_name_and_asgi(ip, fake, capsys) -> None:
    port = free_port()
    cell = '''
async def web(scope, receive, send):
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"asgi here"})
'''
    ip.run_cell_magic("tp", f"intercept hello --port {port} --app web", cell)
    assert "(ASGI)" in capsys.readouterr().out
    assert requests.get(f"http://127.0.0.1:{port}/").text == "asgi here"


def test_cell_that_fails_serves_nothing(ip, fake, capsys) -> None:
    port = free_port()
    result = ip.run_cell(f"%%tp intercept hello --port {port}\napp = 1/0")
    assert not result.success and "the cell raised" in str(result.error_in_exec)
    text = "".join(capsys.readouterr())
    assert "ZeroDivisionError" in text  # the cell's own traceback is shown, then tpnb's lines
    assert inkernel.get_server(port) is None and not fake.intercepts


def test_cell_without_app_and_nothing_listening(ip, fake, capsys) -> None:
    ip.user_ns.pop("nothing_here", None)
    err = failing(ip, capsys, f"%%tp intercept hello --port {free_port()} --app nothing_here\nx = 1")
    assert "the cell defined no `nothing_here` and nothing listens" in err


def test_cell_that_starts_its_own_server_is_just_intercepted(ip, fake, capsys) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    try:
        ip.user_ns.pop("nope", None)
        ip.run_cell_magic("tp", f"intercept hello --port {port} --app nope", "started = True")
        assert ("intercept", "hello", port) in fake.calls
        assert inkernel.get_server(port) is None
    finally:
        srv.close()


def test_failed_intercept_stops_the_fresh_server(ip, fake, capsys) -> None:
    port = free_port()
    fake.fail_intercept = InterceptError("cannot intercept hello", "agent refused", "try again")
    err = failing(ip, capsys, f"%%tp intercept hello --port {port}\n" + WSGI_CELL.format(v="v1"))
    assert "cannot intercept hello" in err
    assert inkernel.get_server(port) is None


def test_existing_intercept_on_another_port_is_an_error(ip, fake, capsys) -> None:
    fake.intercepts["hello"] = _ic("hello", 1234)
    err = failing(ip, capsys, f"%%tp intercept hello --port {free_port()}\n" + WSGI_CELL.format(v="v1"))
    assert "hello is already intercepted to port 1234" in err


def test_not_connected_cell_connects_first(ip, fake, capsys) -> None:
    fake.connected = False
    port = free_port()
    ip.run_cell_magic("tp", f"intercept hello --port {port}", WSGI_CELL.format(v="v1"))
    assert fake.calls[0][0] == "connect"
    assert "Connected to context dev" in capsys.readouterr().out


def test_cleanup_leaves_owned_intercepts_and_stops_servers(ip, fake, capsys) -> None:
    port = free_port()
    ip.run_cell_magic("tp", f"intercept hello --port {port}", WSGI_CELL.format(v="v1"))
    lifecycle.cleanup()
    assert ("leave", "hello") in fake.calls and inkernel.get_server(port) is None


def test_cell_on_a_taken_port_fails_with_the_readable_error(ip, fake, capsys) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        err = failing(ip, capsys, f"%%tp intercept hello --port {port}\n" + WSGI_CELL.format(v="v1"))
    assert err.splitlines() == [f"127.0.0.1:{port} is already in use",
                                "  why: another program (or another kernel) listens on that port",
                                "  fix: choose another --port, or stop the other server"]
    assert not fake.intercepts


def test_serve_line_magic(ip, fake, capsys) -> None:
    port = free_port()
    ip.run_cell(WSGI_CELL.format(v="vs"))
    ip.run_line_magic("tp", f"serve --port {port}")
    assert requests.get(f"http://127.0.0.1:{port}/").text == "hello from the notebook vs"
    ip.run_line_magic("tp", f"serve --port {port} --stop")
    assert inkernel.get_server(port) is None


# ------------------------------------------------------------------ the panel
def _wait(pred: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_panel_rows_toggle_log_env_and_close(fake) -> None:
    from tpnb.widgets import Panel

    port = free_port()
    inkernel.serve(lambda e, sr: (sr("200 OK", []), [b"ok"])[1], port)
    p = Panel(poll_interval=0.2)
    try:
        assert "Connected" in p.status_html.value and p.connect_btn.description == "Quit"
        rows = {k[1]: r for k, r in p._rows.items()}
        assert set(rows) == {"hello", "other"}
        assert rows["other"].toggle.disabled and not rows["hello"].toggle.disabled
        rows["hello"].port.value = port
        rows["hello"].toggle.value = True  # the user clicks Intercept
        assert _wait(lambda: "hello" in fake.intercepts and rows["hello"].toggle.description == "Leave")
        assert "intercepted by me" in rows["hello"].state.value
        assert "this kernel" in p.message.value
        requests.get(f"http://127.0.0.1:{port}/from-test")
        assert _wait(lambda: "/from-test" in p.log_html.value)
        assert "hello" in p.counters.value and "1 requests" in p.counters.value
        assert p.env_select.value == "hello" and "KUBERNETES_SERVICE_HOST" in p.env_html.value
        # a change made elsewhere (the CLI) shows up by polling
        fake.intercepts.pop("hello")
        assert _wait(lambda: rows["hello"].toggle.description == "Intercept")
        assert p.namespace.value == "default"
        p.namespace.value = "lead"  # the user types another namespace
        assert _wait(lambda: ("list", "lead") in fake.calls)
        polls = p.polls
        assert p.polling
    finally:
        p.close()
    assert not p.polling
    time.sleep(0.5)
    assert p.polls == polls or p.polls == polls + 1  # no polling after close


def test_panel_shows_errors_and_not_connected(fake) -> None:
    from tpnb.widgets import Panel

    fake.connected = False
    p = Panel(start=False)
    try:
        assert "Not connected" in p.status_html.value and p.connect_btn.description == "Connect"
        t = p.intercept("hello", 9999)
        assert t is not None
        t.join(5)
        assert "not connected" in p.message.value and "fix:" in p.message.value
        t = p._connect_or_quit()
        assert t is not None
        t.join(5)
        assert "Connected" in p.status_html.value
    finally:
        p.close()


class _PushStream:
    """What `Session.watch_status()` gives: an iterator that a test pushes into, cancellable."""

    def __init__(self) -> None:
        import queue

        self.q: Any = queue.Queue()
        self.cancelled = False

    def __iter__(self) -> Any:
        while True:
            item = self.q.get()
            if item is None:
                return
            yield item

    def cancel(self) -> None:
        self.cancelled = True
        self.q.put(None)


def test_panel_follows_the_push_stream_without_polling(fake) -> None:
    from tpnb.widgets import Panel

    stream = _PushStream()
    fake.watch_status = lambda: stream  # the connector's WatchStatus, as the api gives it
    p = Panel(poll_interval=3600)  # a poll would never come in this test's time: only pushes redraw
    try:
        assert _wait(lambda: p.following)
        rows = {k[1]: r for k, r in p._rows.items()}
        assert rows["hello"].toggle.description == "Intercept"
        polls = p.polls
        fake.intercepts["hello"] = fake.intercept("hello", 9123)  # changed elsewhere (the CLI) ...
        time.sleep(1.0)
        assert p.polls == polls  # ... and nothing asks until the connector pushes
        stream.q.put(fake.status())
        assert _wait(lambda: {k[1]: r for k, r in p._rows.items()}["hello"].toggle.description == "Leave")
        assert p.pushes == 1 and p.polls == polls + 1
    finally:
        p.close()
    assert stream.cancelled and not p.polling


def test_try_line_is_curl_for_http_and_grpcurl_for_h2c_in_the_cli_and_the_magic(ip, fake, capsys) -> None:
    from dataclasses import replace

    from tpnb import render

    http = replace(_ic("hello", 9123), http_headers={"x-tpnb-intercept": "alice-7f3a"}, app_protocol="http/1.1")
    assert render.try_command(http) == "curl -H 'x-tpnb-intercept: alice-7f3a' http://hello.default:80/"
    grpc = replace(http, name="greeter", workload="greeter", service="greeter", service_port="50051",
                   app_protocol="h2c")
    assert render.try_command(grpc) == "grpcurl -plaintext -H 'x-tpnb-intercept: alice-7f3a' greeter.default:50051 list"
    # one method by --http-path-equal: that method (`list` would go to the app's reflection service)
    one = replace(grpc, http_path_equal="/greeter.Greeter/SayHello")
    assert render.try_command(one).endswith(" greeter.default:50051 greeter.Greeter/SayHello")
    # the Service's port not given (`--port 9300`): the pod's traffic-agent, which the Service routes to
    pod = replace(grpc, service_port="", agent_port=9900)
    assert render.try_command(pod) == "grpcurl -plaintext -H 'x-tpnb-intercept: alice-7f3a' 10.42.0.9:9900 list"
    assert render.try_command(replace(grpc, http_headers={})) == ""   # no header filter: no Try line
    assert f"    Try           : {render.try_command(grpc)}" in render.intercept_block(grpc).splitlines()

    # the magic prints the same block, by the same renderer
    real = fake.intercept

    def intercept(name: str, port: int, progress: Any = None, **kw: Any) -> Intercept:
        real(name, port, progress, **kw)
        ic = fake.intercepts[name] = replace(grpc, local_port=port)
        return ic

    fake.intercept = intercept
    ip.run_line_magic("tp", "intercept greeter --port 9300 --http-header auto")
    out = capsys.readouterr().out
    assert "    Try           : grpcurl -plaintext -H 'x-tpnb-intercept: alice-7f3a' greeter.default:50051 list" in out
