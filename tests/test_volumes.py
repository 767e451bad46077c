"""The intercepted pod's environment and volumes on the laptop (issue 5).

Unit tests: the SFTP v3 client (tpnb/remotefs.py) against a real Debian
sftp-server on a socketpair, mount-dir validation, mount-table parsing and
the state file of tpnb/mounts.py.

Cluster tests: a Deployment of the project image (it has `env`, unlike the
echoserver) with env from literals, a ConfigMap, a Secret and the downward
API, and ConfigMap, Secret and emptyDir volumes, in namespace `tpvol`,
intercepted from laptop `vol`.  Each laptop invocation has its own mount
namespace, so every check of a mount runs inside the invocation that made it
(one `sh -c` script).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from tpnb import errors, mounts, remotefs

SFTP_SERVER = "/usr/lib/openssh/sftp-server"


# ====================================================================== unit: SFTP client

@pytest.fixture
def sftp_root(tmp_path: Path) -> Iterator[tuple[remotefs.RemoteFS, Path]]:
    """A RemoteFS talking to a local sftp-server over a socketpair; files under `root`."""
    if not os.access(SFTP_SERVER, os.X_OK):
        pytest.skip("openssh-sftp-server is not installed (scripts/install-deps installs it)")
    root = tmp_path / "volumes"
    (root / "etc" / "config" / "..2024_01_01").mkdir(parents=True)
    (root / "etc" / "config" / "..2024_01_01" / "app.yaml").write_text("greeting: hello\n")
    os.symlink("..2024_01_01", root / "etc" / "config" / "..data")
    os.symlink("..data/app.yaml", root / "etc" / "config" / "app.yaml")
    (root / "data").mkdir()
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([SFTP_SERVER, "-e", "-d", str(root)], stdin=theirs, stdout=theirs)
    theirs.close()
    fs = remotefs.RemoteFS("local", 0, prefix=str(root), sock=ours)
    try:
        yield fs, root
    finally:
        fs.close()
        proc.wait(10)


@pytest.mark.unit
def test_remotefs_lists_reads_and_walks(sftp_root: tuple[remotefs.RemoteFS, Path]) -> None:
    fs, _ = sftp_root
    assert fs.version == 3
    assert fs.listdir("/") == ["data", "etc"]
    assert fs.listdir("/etc/config") == ["..2024_01_01", "..data", "app.yaml"]
    assert fs.read_text("/etc/config/app.yaml") == "greeting: hello\n"   # through the symlink
    assert fs.exists("/etc/config/app.yaml") and not fs.exists("/etc/nope")
    assert fs.is_dir("/etc/config/..data") and fs.is_file("/etc/config/app.yaml")
    walked = {d: (sorted(ds), sorted(fs_)) for d, ds, fs_ in fs.walk("/")}
    assert walked["/etc/config"] == (["..2024_01_01", "..data"], ["app.yaml"])
    assert walked["/etc/config/..data"] == ([], ["app.yaml"])
    with pytest.raises(FileNotFoundError):
        fs.read_bytes("/etc/missing.txt")
    with pytest.raises(FileNotFoundError):
        fs.listdir("/nowhere")


@pytest.mark.unit
def test_remotefs_big_and_odd_sized_files(sftp_root: tuple[remotefs.RemoteFS, Path]) -> None:
    fs, root = sftp_root
    for size in (0, 1, remotefs.CHUNK, remotefs.CHUNK * remotefs.WINDOW * 3 + 12345):
        data = os.urandom(size)
        (root / "data" / f"f{size}").write_bytes(data)
        assert fs.read_bytes(f"/data/f{size}") == data
    assert fs.stat(f"/data/f{remotefs.CHUNK}").size == remotefs.CHUNK


@pytest.mark.unit
def test_remotefs_writes_and_cannot_climb_above_the_prefix(sftp_root: tuple[remotefs.RemoteFS, Path]) -> None:
    fs, root = sftp_root
    assert fs.write_text("/data/new.txt", "from the laptop\n") == 16
    assert (root / "data" / "new.txt").read_text() == "from the laptop\n"
    big = os.urandom(300_000)
    fs.write_bytes("/data/big.bin", big)
    assert (root / "data" / "big.bin").read_bytes() == big
    # the app's paths: '..' stops at the app's '/', which is the prefix
    assert fs._path("/../../etc/passwd") == f"{root}/etc/passwd"
    assert fs._path("/") == str(root)


@pytest.mark.unit
def test_remotefs_refuses_a_non_sftp_peer() -> None:
    a, b = socket.socketpair()
    b.sendall(b"\x00\x00\x00\x05\x65hello")   # a STATUS, not a VERSION
    with pytest.raises(ConnectionError, match="not an SFTP server"):
        remotefs.RemoteFS("x", 1, sock=a)
    b.close()


@pytest.mark.unit
def test_agent_links_the_service_account_volume(tmp_path: Path) -> None:
    from tpnb.cluster import sftp

    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("tok")
    root = tmp_path / "volumes"
    link = sftp.link_service_account(str(root), str(sa))
    assert link and (Path(link) / "token").read_text() == "tok"
    assert Path(link) == root / str(sa).lstrip("/")
    assert sftp.link_service_account(str(root), str(sa)) == link          # idempotent
    assert sftp.link_service_account(str(root), str(tmp_path / "none")) is None
    assert sftp.server_argv("/tpnb/volumes")[-2:] == ["-d", "/tpnb/volumes"]


# ====================================================================== unit: mounts

@pytest.mark.unit
def test_mount_dir_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = mounts.prepare_root(None, "hello")
    try:
        assert fresh.name.startswith("tpnb-hello-") and fresh.is_dir() and not os.listdir(fresh)
    finally:
        fresh.rmdir()
    assert mounts.prepare_root(tmp_path / "new" / "dir", "x") == tmp_path / "new" / "dir"
    full = tmp_path / "full"
    full.mkdir()
    (full / "a").write_text("x")
    with pytest.raises(errors.ConfigError, match="cannot mount on") as ei:
        mounts.prepare_root(full, "x")
    assert "not empty" in ei.value.why
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(errors.ConfigError, match="not a directory|cannot mount"):
        mounts.prepare_root(afile, "x")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(mounts.os, "access", lambda p, m: False)
    with pytest.raises(errors.ConfigError) as ei:
        mounts.prepare_root(empty, "x")
    assert "not writable" in ei.value.why


@pytest.mark.unit
def test_fuse_missing_is_a_prerequisite_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mounts.shutil, "which", lambda b: None)
    if os.path.exists("/dev/fuse"):
        with pytest.raises(errors.PrerequisiteError, match="sshfs and fusermount3 not installed") as ei:
            mounts.check_fuse()
        assert "--mount=false" in ei.value.hint
    real_exists = os.path.exists
    monkeypatch.setattr(mounts.os.path, "exists", lambda p: False if p == "/dev/fuse" else real_exists(p))
    with pytest.raises(errors.PrerequisiteError, match="/dev/fuse is missing"):
        mounts.check_fuse()


@pytest.mark.unit
def test_mountinfo_parsing(tmp_path: Path) -> None:
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        "129 55 0:75 / /tmp/tpnb-hello-x rw,nosuid,nodev - fuse.sshfs 10.42.0.9:/tpnb/volumes rw,user_id=0\n"
        "130 55 0:76 / /tmp/with\\040space rw - fuse.sshfs 10.42.0.9:/tpnb/volumes rw\n"
        "131 55 0:77 / /mnt/other rw - fuse.something x rw\n")
    assert mounts.sshfs_mounts(str(mi)) == ["/tmp/tpnb-hello-x", "/tmp/with space"]


@pytest.mark.unit
def test_state_file_forgets_mounts_that_are_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mounts, "_state_path", lambda: tmp_path / "cache" / "mounts.json")
    gone = tmp_path / "tpnb-gone-1"
    gone.mkdir()
    with mounts._state() as st:
        st[mounts._key("gone")] = {"root": str(gone), "pod_ip": "10.42.0.9", "made": True}
        st["mnt:[1] other"] = {"root": "/tmp/x", "pod_ip": "10.42.0.9", "made": True}   # a dead namespace
    assert mounts.mounts() == {}
    mounts.cleanup_stale()
    assert not gone.exists()                                  # the empty dir we made is removed
    assert json.loads((tmp_path / "cache" / "mounts.json").read_text()) == {}
    assert mounts.unmount_name("gone") is None


@pytest.mark.unit
def test_intercept_block_shows_the_mount_point() -> None:
    from tpnb import render
    from tpnb.api import Intercept

    ic = Intercept(name="hello", workload="hello", namespace="ns", kind="Deployment", service="hello",
                   service_port="", local_port=9000, target_host="127.0.0.1", state="ACTIVE", message="",
                   holder="", pod_ips=["10.42.0.9"], environment={}, mount_point="/tpnb/volumes", id="1")
    text = render.intercept_block(ic, mount_root="/tmp/tpnb-hello-abc")
    assert "    Volume Mount Point: /tmp/tpnb-hello-abc" in text.splitlines()
    assert "Volume Mount Point" not in render.intercept_block(ic)


@pytest.mark.unit
def test_env_json_written_even_when_env_file_fails(tmp_path: Path) -> None:
    from tpnb import cli

    ej = tmp_path / "e.json"
    with pytest.raises(errors.ConfigError, match="cannot write"):
        cli.write_env_files({"A": "1"}, str(tmp_path / "missing" / "x.env"), str(ej))
    assert json.loads(ej.read_text()) == {"A": "1"}


# ====================================================================== cluster

NS = "tpvol"
LAPTOP = "vol"
SMALL_FILES = 2000


def _manifest(image: str) -> dict[str, Any]:
    env = [
        {"name": "LITERAL", "value": "a literal value"},
        {"name": "CFG_COLOR", "valueFrom": {"configMapKeyRef": {"name": "appcfg", "key": "COLOR"}}},
        {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "appsecret", "key": "password"}}},
        {"name": "MY_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "MY_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "MY_CPU_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
    ]
    return {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "appcfg"},
         "data": {"app.yaml": "greeting: hello\nlevel: 3\n", "COLOR": "blue"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "appsecret"},
         "stringData": {"password": "s3cr3t", "token.txt": "tok-123\n"}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "hello"},
         "spec": {"selector": {"matchLabels": {"app": "hello"}}, "template": {
             "metadata": {"labels": {"app": "hello"}},
             "spec": {"containers": [{
                 "name": "app", "image": image, "imagePullPolicy": "IfNotPresent",
                 "command": ["python3", "-m", "http.server", "8080"], "workingDir": "/data",
                 "ports": [{"containerPort": 8080}], "env": env,
                 "envFrom": [{"configMapRef": {"name": "appcfg"}, "prefix": "CM_"}],
                 "volumeMounts": [{"name": "config", "mountPath": "/etc/config"},
                                  {"name": "secret", "mountPath": "/etc/secret", "readOnly": True},
                                  {"name": "scratch", "mountPath": "/data"}]}],
                 "volumes": [{"name": "config", "configMap": {"name": "appcfg"}},
                             {"name": "secret", "secret": {"secretName": "appsecret"}},
                             {"name": "scratch", "emptyDir": {}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hello"},
         "spec": {"selector": {"app": "hello"}, "ports": [{"port": 80, "targetPort": 8080}]}},
    ]}


@pytest.fixture(scope="module")
def vol(devcluster: Any) -> Iterator[Any]:
    from conftest import LaptopRunner
    from tpnb.imageref import default_image

    lap = LaptopRunner(devcluster, LAPTOP)
    lap.fresh_namespace(NS)
    lap.kubectl("-n", NS, "apply", "-f", "-", input=json.dumps(_manifest(default_image())))
    lap.kubectl("-n", NS, "rollout", "status", "deploy/hello", "--timeout=120s", timeout=150)
    yield lap
    lap.drop_namespace(NS)
    host = Path("/proc/self/mountinfo").read_text()
    assert "tpnb-hello-" not in host and "/tpvol/" not in host, "a volume mount leaked to the host"


def _app_pod(lap: Any) -> str:
    out = lap.kubectl("-n", NS, "get", "pod", "-l", "app=hello", "-o", "json").stdout
    pods = [p for p in json.loads(out)["items"]
            if not p["metadata"].get("deletionTimestamp") and p["status"].get("phase") == "Running"
            and any(c["name"] == "traffic-agent" for c in p["spec"]["containers"])]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return str(pods[0]["metadata"]["name"])


def _pod_env(lap: Any, pod: str) -> dict[str, str]:
    raw = lap.kubectl("-n", NS, "exec", pod, "-c", "app", "--", "env", "-0").stdout
    return dict(e.split("=", 1) for e in raw.split("\0") if e)


def _pod_cat(lap: Any, pod: str, path: str) -> str:
    return str(lap.kubectl("-n", NS, "exec", pod, "-c", "app", "--", "cat", path).stdout)


SERVER = "python3 -m http.server 9000 >/dev/null 2>&1 & SRV=$!; trap 'kill $SRV' EXIT; "


@pytest.mark.cluster
def test_env_and_volumes_with_a_command(vol: Any, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    os.chmod(tmp_path, 0o755)
    # the command: its environment, the mounted files, a write into the emptyDir
    inner = (
        "python3 -c 'import json,os;print(json.dumps(dict(os.environ)))' > $OUT/cmd.json; "
        "echo $TPNB_ROOT > $OUT/root; "
        "cp -rL $TPNB_ROOT/etc $OUT/etc; "
        "cp -rL $TPNB_ROOT/var $OUT/var; "
        "echo from-the-laptop > $TPNB_ROOT/data/laptop.txt; "
        "grep -c fuse.sshfs /proc/self/mountinfo > $OUT/mounted; true")
    (tmp_path / "inner.sh").write_text(inner + "\n")
    script = (
        f"{SERVER} OUT={out_dir}; export OUT; "
        f"tpnb intercept hello -n {NS} --port 9000 --env-file {out_dir}/pod.env --env-json {out_dir}/pod.json "
        f"-- sh {tmp_path}/inner.sh > {out_dir}/intercept.log 2>&1; echo rc=$? >> {out_dir}/intercept.log; "
        f"grep -c fuse.sshfs /proc/self/mountinfo > {out_dir}/after || true")
    vol.sh(script, timeout=400)
    log = (out_dir / "intercept.log").read_text()
    assert "rc=0" in log and "Traceback" not in log, log
    assert "State         : ACTIVE" in log and "    Volume Mount Point: " in log, log
    pod = _app_pod(vol)
    want = _pod_env(vol, pod)
    assert {"LITERAL", "CFG_COLOR", "DB_PASSWORD", "MY_POD_NAME", "MY_POD_IP", "CM_COLOR", "HOSTNAME",
            "KUBERNETES_SERVICE_HOST", "PATH", "HOME"} <= set(want)
    assert want["LITERAL"] == "a literal value" and want["DB_PASSWORD"] == "s3cr3t"
    # --env-json: exactly `kubectl exec POD -c app -- env`
    assert json.loads((out_dir / "pod.json").read_text()) == want
    # --env-file: docker syntax, every value without a newline
    lines = (out_dir / "pod.env").read_text().splitlines()
    assert dict(ln.split("=", 1) for ln in lines) == {k: v for k, v in want.items() if "\n" not in v}
    # `-- CMD` sees the pod's values (the laptop keeps its own PATH, HOME, HOSTNAME...)
    from tpnb.cli import LOCAL_ONLY_ENV

    cmd_env = json.loads((out_dir / "cmd.json").read_text())
    for k, v in want.items():
        if k not in LOCAL_ONLY_ENV and k.replace("_", "a").isalnum():  # sh drops names like CM_app.yaml
            assert cmd_env.get(k) == v, k
    root = (out_dir / "root").read_text().strip()
    assert root and cmd_env["TPNB_ROOT"] == root and f"Volume Mount Point: {root}" in log
    # the mounted files are the pod's
    for rel in ("etc/config/app.yaml", "etc/config/COLOR", "etc/secret/password", "etc/secret/token.txt",
                "var/run/secrets/kubernetes.io/serviceaccount/token",
                "var/run/secrets/kubernetes.io/serviceaccount/namespace",
                "var/run/secrets/kubernetes.io/serviceaccount/ca.crt"):
        assert (out_dir / rel).read_text() == _pod_cat(vol, pod, "/" + rel), rel
    # a file written locally into the emptyDir is seen by the app
    assert _pod_cat(vol, pod, "/data/laptop.txt") == "from-the-laptop\n"
    # mounted while the command ran; nothing mounted, and the temp dir gone, after
    assert (out_dir / "mounted").read_text().strip() == "1"
    assert (out_dir / "after").read_text().strip() == "0"
    assert not Path(root).exists()


@pytest.mark.cluster
def test_mount_outlives_the_cli_until_leave_and_api_reads_without_fuse(vol: Any, tmp_path: Path) -> None:
    pod = _app_pod(vol)
    vol.kubectl("-n", NS, "exec", pod, "-c", "app", "--", "python3", "-c",
                "import os\nos.makedirs('/data/many/sub', exist_ok=True)\n"
                f"for i in range({SMALL_FILES}):\n"
                "  open(f'/data/many/sub/f{i}.txt' if i % 2 else f'/data/many/f{i}.txt', 'w').write(str(i))\n",
                timeout=120)
    api = (
        "import json, time\n"
        "from tpnb.api import Session\n"
        "s = Session()\n"
        "fs = s.files('hello')\n"
        "out = {'mounts': {k: str(v) for k, v in s.mounts().items()},\n"
        "       'app': fs.read_text('/etc/config/app.yaml'), 'ls': fs.listdir('/etc/secret'),\n"
        "       'exists': [fs.exists('/data/many'), fs.exists('/nope')],\n"
        "       'n': sum(len(f) for _, _, f in fs.walk('/data/many'))}\n"
        "print(json.dumps(out))\n")
    (tmp_path / "api.py").write_text(api)
    os.chmod(tmp_path, 0o755)
    mnt = tmp_path / "mnt"
    script = (
        f"{SERVER} set -e; "
        f"tpnb intercept hello -n {NS} --port 9000 --mount {mnt}; "
        f"grep -c ' {mnt} .* fuse.sshfs' /proc/self/mountinfo; "
        f"S=$(date +%s.%N); N=$(ls -R {mnt}/data/many | grep -c '^f'); E=$(date +%s.%N); "
        f"echo LS $N $(python3 -c \"print($E-$S)\"); "
        f"cat {mnt}/etc/config/app.yaml; "
        f"python3 {tmp_path}/api.py; "
        f"tpnb leave hello; "
        f"echo AFTER $(grep -c fuse.sshfs /proc/self/mountinfo || true); ls -A {mnt} | wc -l")
    r = vol.sh(script, timeout=400)
    lines = r.stdout.splitlines()
    ls_line = next(ln for ln in lines if ln.startswith("LS "))
    _, n, secs = ls_line.split()
    assert int(n) == SMALL_FILES and float(secs) < 5.0, ls_line
    assert "greeting: hello" in r.stdout
    out = json.loads(next(ln for ln in lines if ln.startswith("{")))
    assert out["mounts"] == {"hello": str(mnt)}
    assert out["app"] == "greeting: hello\nlevel: 3\n"
    assert out["ls"] == ["..data", "password", "token.txt"] or set(out["ls"]) >= {"password", "token.txt"}
    assert out["exists"] == [True, False] and out["n"] == SMALL_FILES
    assert "AFTER 0" in r.stdout and lines[-1].strip() == "0", r.stdout


@pytest.mark.cluster
def test_bad_input_warns_and_the_intercept_still_works(vol: Any, tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine\n")
    os.chmod(tmp_path, 0o755)
    venv_bin = str(Path(shutil.which("tpnb") or "/work/main/.venv/bin/tpnb").parent)
    script = (
        f"{SERVER} "
        # a non-empty --mount dir and an --env-file that cannot be written
        f"tpnb intercept hello -n {NS} --port 9000 --mount {full} --env-file /proc/nope/pod.env "
        f"-- sh -c 'echo CMD-RAN LITERAL=$LITERAL ROOT=${{TPNB_ROOT:-none}}'; echo rc=$?; "
        # no sshfs/fusermount3 on PATH: "FUSE missing"
        f"env PATH={venv_bin} tpnb intercept hello -n {NS} --port 9000 "
        f"-- /bin/sh -c 'echo CMD2-RAN ROOT=${{TPNB_ROOT:-none}}'; echo rc2=$?; "
        # a crashed client: the mount outlives it; `tpnb quit` cleans it up
        f"tpnb intercept hello -n {NS} --port 9000 >/dev/null 2>&1; "
        f"echo BEFORE $(grep -c fuse.sshfs /proc/self/mountinfo); tpnb quit >/dev/null; "
        f"echo QUIT $(grep -c fuse.sshfs /proc/self/mountinfo || true)")
    r = vol.sh(script, timeout=500, check=False)
    text = r.stdout + r.stderr
    assert "Traceback" not in text
    assert "CMD-RAN LITERAL=a literal value ROOT=none" in text and "rc=0" in text, text
    assert f"warning: volumes not mounted: cannot mount on {full}" in text and "not empty" in text
    assert "warning: cannot write /proc/nope/pod.env" in text
    assert (full / "keep.txt").read_text() == "mine\n"
    assert "CMD2-RAN ROOT=none" in text and "rc2=0" in text
    assert "sshfs and fusermount3 not installed" in text
    assert "BEFORE 1" in text and "QUIT 0" in text, text
