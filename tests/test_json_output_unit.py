"""`-o json` without a cluster: the rendering, the parser, the error shape, stdout purity (issue 10)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from tpnb import cli, render
from tpnb.api import Intercept, Status, Workload
from tpnb.errors import ClusterError, ConfigError, NotConnected, run_reporting

pytestmark = pytest.mark.unit


def _ic(name: str = "hello", state: str = "ACTIVE") -> Intercept:
    return Intercept(name=name, workload=name, namespace="default", kind="Deployment", service=name,
                     service_port="80", local_port=9000, target_host="127.0.0.1", state=state, message="",
                     holder="me@here", pod_ips=["10.42.0.9"], environment={"A": "1", "B": "two\nlines"},
                     mount_point="/tpnb/volumes", id="id-1")


def _status() -> Status:
    return Status(connected=True, context="dev", server="https://10.0.0.1:6443", namespace="default",
                  mapped_namespaces=["default"], pod_subnets=["10.42.0.0/24"], daemon_version="0.1.0",
                  intercepts=[_ic()])


def _workload(ic: Intercept | None = None) -> Workload:
    return Workload(name="hello", namespace="default", kind="Deployment", services=["hello:80->8080"],
                    state="intercepted_by_me" if ic else "free", agent_installed=bool(ic), intercept=ic)


# ------------------------------------------------------------------ rendering: dataclasses.asdict, round trip
def test_status_round_trip_has_every_field() -> None:
    st = _status()
    doc = json.loads(render.as_json(st))
    assert doc == dataclasses.asdict(st)  # every field, also ones added later
    assert set(doc) == {f.name for f in dataclasses.fields(Status)}
    assert doc["connected"] is True and doc["context"] == "dev" and doc["namespace"] == "default"
    assert doc["intercepts"][0]["name"] == "hello" and doc["intercepts"][0]["environment"]["B"] == "two\nlines"


def test_workloads_render_as_a_list() -> None:
    doc = json.loads(render.as_json([_workload(), _workload(_ic())]))
    assert isinstance(doc, list) and [w["name"] for w in doc] == ["hello", "hello"]
    assert doc[0]["state"] == "free" and doc[0]["intercept"] is None
    assert doc[1]["intercept"]["state"] == "ACTIVE"


def test_intercept_document_with_mount_point() -> None:
    doc = json.loads(render.as_json({"intercept": _ic(), "mount_point": Path("/tmp/tpnb-hello-x")}))
    assert doc["mount_point"] == "/tmp/tpnb-hello-x"
    assert doc["intercept"] == dataclasses.asdict(_ic())


def test_new_fields_are_included_without_listing_them() -> None:
    @dataclasses.dataclass
    class More(Status):
        brand_new: str = "yes"

    assert json.loads(render.as_json(More(connected=False)))["brand_new"] == "yes"


def test_version_dict_and_plain_values() -> None:
    assert json.loads(render.as_json({"client": "0.1.0", "daemon": "0.1.0"})) == {"client": "0.1.0",
                                                                                  "daemon": "0.1.0"}
    assert json.loads(render.as_json({"p": Path("/x"), "t": ("a", 1)})) == {"p": "/x", "t": ["a", 1]}


# ------------------------------------------------------------------ the parser: -o on every subcommand
LINES = [
    "status", "list", "list -n default", "intercept hello --port 9000", "intercept hello -p 9000:http -n x",
    "version", "connect", "connect -n staging --also-proxy 10.1.0.0/16", "config view", "leave hello",
    "quit", "quit --daemon", "uninstall --everything", "uninstall --agent hello", "loglevel debug",
]


@pytest.mark.parametrize("line", LINES)
@pytest.mark.parametrize("opt", ["-o json", "--output json", "--output=json", "-ojson"])
def test_parser_accepts_output_json(line: str, opt: str) -> None:
    args = cli.build_parser().parse_args(line.split() + opt.split())
    assert args.output == "json"
    assert cli.wants_json(line.split() + opt.split())


@pytest.mark.parametrize("line", LINES)
def test_default_is_text(line: str) -> None:
    assert cli.build_parser().parse_args(line.split()).output == "text"
    assert not cli.wants_json(line.split())


def test_every_cli_subcommand_but_devcluster_has_output() -> None:
    from tpnb.magics.parser import _subparsers

    for name, child in _subparsers(cli.build_parser()).choices.items():
        has = any("--output" in a.option_strings for a in child._actions)
        assert has == (name != "devcluster"), name


def test_bad_output_value_is_a_usage_error() -> None:
    with pytest.raises(ConfigError, match="invalid choice: 'yaml'"):
        cli.build_parser().parse_args(["status", "-o", "yaml"])


def test_wants_json_ignores_the_command_after_dashes_and_devcluster() -> None:
    assert not cli.wants_json(["intercept", "hello", "--port", "9", "--", "jq", "-o", "json"])
    assert cli.wants_json(["intercept", "hello", "-o", "json", "--port", "9", "--", "sh"])
    assert not cli.wants_json(["devcluster", "image", "-o", "json"])
    assert cli.wants_json(["status", "--bogus", "-o", "json"])  # the usage error is reported as JSON


# ------------------------------------------------------------------ errors
def test_error_json_shape_and_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    def body() -> int:
        raise ClusterError("cannot reach the API server", "connection refused", "check KUBECONFIG")

    assert run_reporting(body, json_errors=True) == ClusterError.exit_code
    out = capsys.readouterr()
    assert json.loads(out.out) == {"error": {"what": "cannot reach the API server", "why": "connection refused",
                                             "fix": "check KUBECONFIG"}}
    assert out.err.splitlines() == ["cannot reach the API server", "  why: connection refused",
                                    "  fix: check KUBECONFIG"]


def test_error_text_mode_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_reporting(lambda: (_ for _ in ()).throw(NotConnected("not connected"))) == NotConnected.exit_code
    out = capsys.readouterr()
    assert out.out == "" and out.err == "not connected\n"


# ------------------------------------------------------------------ the CLI end to end with a fake api
class FakeSession:
    def __init__(self, connected: bool = True) -> None:
        self.connected = connected

    def status(self) -> Status:
        return _status() if self.connected else Status(connected=False, daemon_running=False)

    def list(self, namespace: str | None = None) -> list[Workload]:
        if not self.connected:
            raise NotConnected("not connected", "the tpnb daemon is not running", "run `tpnb connect` first")
        return [_workload()]

    def version(self) -> dict[str, str]:
        return {"client": "0.1.0", "daemon": "0.1.0"}

    def intercept(self, name: str, port: int, progress: Any = None, **kw: Any) -> Intercept:
        if progress:
            from tpnb.proto import pb

            progress(pb.Progress(step="x", message="Waiting for the agent...", fraction=0.5))
        return dataclasses.replace(_ic(name), local_port=port)

    def leave(self, name: str) -> None:
        pass


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeSession:
    f = FakeSession()
    monkeypatch.setattr(cli, "Session", lambda: f)
    return f


def test_cli_status_json_is_the_only_stdout(fake: FakeSession, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "-o", "json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == dataclasses.asdict(_status())
    assert cli.main(["status"]) == 0
    assert capsys.readouterr().out == render.status_text(_status()) + "\n"  # text unchanged


def test_cli_list_and_version_json(fake: FakeSession, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "hello"
    assert cli.main(["version", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"client": "0.1.0", "daemon": "0.1.0"}


def test_cli_intercept_json_progress_on_stderr(fake: FakeSession, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["intercept", "hello", "--port", "9123", "--mount=false", "-o", "json"]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert doc["intercept"]["name"] == "hello" and doc["intercept"]["state"] == "ACTIVE"
    assert doc["intercept"]["local_port"] == 9123 and doc["mount_point"] is None
    assert "Waiting for the agent..." in out.err and "Using deployment" not in out.out


def test_cli_intercept_json_then_the_command(fake: FakeSession, capfd: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["intercept", "hello", "--port", "9124", "--mount=false", "-o", "json", "--",
                   "echo", "from-the-command"])
    assert rc == 0
    out = capfd.readouterr().out
    doc, end = json.JSONDecoder().raw_decode(out)  # the document first, then the command's output
    assert doc["intercept"]["name"] == "hello" and out[end:].strip() == "from-the-command"


def test_cli_error_json_keeps_exit_code(fake: FakeSession, capsys: pytest.CaptureFixture[str]) -> None:
    fake.connected = False
    assert cli.main(["list", "-o", "json"]) == NotConnected.exit_code
    out = capsys.readouterr()
    assert json.loads(out.out)["error"] == {"what": "not connected", "why": "the tpnb daemon is not running",
                                            "fix": "run `tpnb connect` first"}
    assert out.err.startswith("not connected\n")
    assert cli.main(["intercept", "-o", "json"]) == ConfigError.exit_code  # usage errors too
    assert "required" in json.loads(capsys.readouterr().out)["error"]["what"]


# ------------------------------------------------------------------ the magic returns the data
def test_magic_json_returns_data(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from tpnb.magics import commands, lifecycle, parser

    f = FakeSession()
    monkeypatch.setattr(lifecycle, "session", lambda: f)
    args, cmd = parser.parse("status -o json")
    assert commands.COMMANDS[args.cmd](args, cmd) == dataclasses.asdict(_status())
    args, cmd = parser.parse("list -o json")
    got = commands.COMMANDS[args.cmd](args, cmd)
    assert isinstance(got, list) and got[0]["name"] == "hello"
    assert capsys.readouterr().out == ""  # the data instead of the text
    args, cmd = parser.parse("version")
    assert commands.COMMANDS[args.cmd](args, cmd) is None and "Client: v0.1.0" in capsys.readouterr().out
