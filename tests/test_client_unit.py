"""Pure-logic tests of the client side: no daemon, no cluster."""
from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from tpnb import cli, config, errors
from tpnb.common import errors_wire

pytestmark = pytest.mark.unit


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tpnb.cli", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_bad_port_is_one_clear_error_without_traceback() -> None:
    r = run_cli("intercept", "hello", "--port", "nine")
    assert r.returncode == errors.ConfigError.exit_code
    assert "invalid --port 'nine'" in r.stderr
    assert "fix:" in r.stderr
    assert "Traceback" not in r.stderr


def test_port_out_of_range() -> None:
    with pytest.raises(errors.ConfigError, match="invalid --port"):
        cli.parse_port("70000")
    assert cli.parse_port("9000:http") == (9000, "http")
    assert cli.parse_port("9000") == (9000, "")


def test_wire_errors_round_trip_keep_class_and_words() -> None:
    err = errors.PermissionDenied("cannot patch deployments in namespace default",
                                  "user alice may not patch", "ask for the edit role")
    code, details = errors_wire.encode(err)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    back = errors_wire.decode(code, details)
    assert type(back) is errors.PermissionDenied
    assert str(back) == str(err)


def test_undecodable_wire_error_still_actionable() -> None:
    back = errors_wire.decode(grpc.StatusCode.UNAVAILABLE, "connect: no such file")
    assert isinstance(back, errors.DaemonError)
    assert "tpnb connect" in back.hint


def test_config_file_and_env_override(tmp_path, monkeypatch) -> None:
    f = tmp_path / "config.yaml"
    f.write_text("manager:\n  namespace: mgr\ntimeouts:\n  api: 3\n")
    monkeypatch.setenv("TPNB_CONFIG", str(f))
    monkeypatch.setenv("TPNB_DAEMON_TUN_NAME", "tpnbx")
    cfg = config.load()
    assert cfg.manager.namespace == "mgr"
    assert cfg.timeouts.api == 3.0
    assert cfg.daemon.tun_name == "tpnbx"
    assert cfg.sources["manager.namespace"] == str(f)
    assert cfg.sources["daemon.tun_name"] == "TPNB_DAEMON_TUN_NAME"


def test_config_rejects_unknown_keys(tmp_path, monkeypatch) -> None:
    f = tmp_path / "config.yaml"
    f.write_text("manager:\n  namespaec: x\n")
    monkeypatch.setenv("TPNB_CONFIG", str(f))
    with pytest.raises(errors.ConfigError, match="unknown key manager.namespaec"):
        config.load()


def test_config_rejects_ports_out_of_range(tmp_path, monkeypatch) -> None:
    f = tmp_path / "config.yaml"
    f.write_text("manager:\n  grpc_port: 70000\n")
    monkeypatch.setenv("TPNB_CONFIG", str(f))
    with pytest.raises(errors.ConfigError) as ei:
        config.load()  # gRPC itself would bind 4464 (70000 mod 65536) without a word
    assert ei.value.what == f"invalid value 70000 for manager.grpc_port (set in {f})"
    assert "1-65535" in ei.value.why
    monkeypatch.setenv("TPNB_AGENT_PORT", "0")
    f.write_text("manager:\n  grpc_port: 8081\n")
    with pytest.raises(errors.ConfigError, match="invalid value 0 for agent.port"):
        config.load()
    monkeypatch.setenv("TPNB_AGENT_PORT", "9900")
    assert config.load().manager.grpc_port == 8081


def test_config_view_shows_sources(tmp_path) -> None:
    f = tmp_path / "config.yaml"
    f.write_text("logs:\n  level: debug\n")
    import os

    env = dict(os.environ, TPNB_CONFIG=str(f))
    r = run_cli("config", "view", env=env)
    assert r.returncode == 0, r.stderr
    assert f"level: 'debug'   # from {f}" in r.stdout
    assert "namespace: 'tpnb'" in r.stdout


def test_uninstall_needs_exactly_one_choice() -> None:
    r = run_cli("uninstall")
    assert r.returncode == 2
    assert "one of the arguments" in r.stderr


def test_env_file_formats(tmp_path) -> None:
    env = {"A": "1", "B": "two words", "C": "line1\nline2"}
    ef, ej = tmp_path / "e.env", tmp_path / "e.json"
    cli.write_env_files(env, str(ef), str(ej))
    assert ef.read_text() == "A=1\nB=two words\n"
    import json

    assert json.loads(ej.read_text()) == env
    with pytest.raises(errors.ConfigError, match="cannot write"):
        cli.write_env_files(env, str(tmp_path / "missing" / "x.env"), None)


def test_command_env_keeps_local_path() -> None:
    assert cli.command_env({"PATH": "/pod", "DB": "x"}) == {"DB": "x"}
