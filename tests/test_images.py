"""Dev-cluster images: the OCI writer, cache keys, and real imports into containerd.

`unit` tests check the pure logic (layer tars, docker-archive JSON and
digests, cache keys, recipes kept in step).  `netns` tests build the real
images, import them into a private throwaway containerd (its own root, state
and socket under /tmp, running inside a network namespace created here) and
run them, so "ctr 1.6 accepts our archives" is checked for real.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tpnb.errors import DevClusterError
from tpnb_devcluster import images, oci, rootfs

REPO = Path(__file__).resolve().parent.parent


# ====================================================================== unit
def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _sample_tree(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "etc").mkdir()
    (root / "etc" / "secret").write_text("s3cret\n")
    (root / "etc" / "secret").chmod(0o640)
    os.link(root / "bin" / "tool", root / "bin" / "tool-hardlink")
    (root / "bin" / "link").symlink_to("tool")
    (root / "dev").mkdir()
    (root / "dev" / "not-in-layer").write_text("x")
    (root / "proc").mkdir()
    (root / "proc" / "cpuinfo").write_text("x")
    os.mkfifo(root / "etc" / "fifo")
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)


@pytest.mark.unit
def test_layer_is_deterministic_and_normalised(tmp_path: Path) -> None:
    src = tmp_path / "tree"
    _sample_tree(src)
    with oci.LayerWriter(tmp_path / "a.tar") as w:
        w.add_tree(src)
    first = w.layer
    os.utime(src / "etc" / "secret", (12345, 12345))  # mtimes must not matter
    with oci.LayerWriter(tmp_path / "b.tar") as w:
        w.add_tree(src)
    assert first is not None and w.layer is not None
    assert first.digest == w.layer.digest == _sha((tmp_path / "a.tar").read_bytes())

    with tarfile.open(tmp_path / "a.tar") as tf:
        members = {m.name: m for m in tf.getmembers()}
        names = [m.name for m in tf.getmembers()]
    assert names == sorted(names, key=lambda n: n.split("/"))  # parents first, sorted
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members.values())
    assert members["etc/secret"].mode == 0o640
    assert members["bin/tool"].mode == 0o755
    assert members["tmp"].mode == 0o1777
    assert members["bin/link"].issym() and members["bin/link"].linkname == "tool"
    assert members["bin/tool-hardlink"].islnk() and members["bin/tool-hardlink"].linkname == "bin/tool"
    assert "etc/fifo" not in members  # no FIFOs, sockets or devices
    assert members["dev"].isdir() and members["proc"].isdir()
    assert "dev/not-in-layer" not in members and "proc/cpuinfo" not in members


@pytest.mark.unit
def test_layer_writer_adds_parents_and_prefix(tmp_path: Path) -> None:
    src = tmp_path / "deps"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "__init__.py").write_text("")
    with oci.LayerWriter(tmp_path / "l.tar") as w:
        w.add_bytes("opt/app/VERSION", b"1\n")
        w.add_tree(src, "opt/app/deps")
    with tarfile.open(tmp_path / "l.tar") as tf:
        names = tf.getnames()
    assert names == ["opt", "opt/app", "opt/app/VERSION", "opt/app/deps", "opt/app/deps/pkg",
                     "opt/app/deps/pkg/__init__.py"]


@pytest.mark.unit
def test_failed_layer_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with oci.LayerWriter(tmp_path / "x.tar") as w:
            w.add_bytes("a", b"a")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
def test_docker_archive_manifest_config_and_digests(tmp_path: Path) -> None:
    layers = []
    for i in range(2):
        with oci.LayerWriter(tmp_path / f"l{i}.tar") as w:
            w.add_bytes(f"file{i}", f"content {i}\n".encode(), mode=0o755)
        assert w.layer is not None
        layers.append(w.layer)
    cfg = oci.image_config(layers, entrypoint=["/app", "-x"], env={"A": "1"}, workdir="/w")
    out = tmp_path / "img.tar"
    image_id = oci.write_docker_archive(out, "tpnb.local/thing:1.2", layers, cfg)

    with tarfile.open(out) as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}  # type: ignore[union-attr]
    manifest = json.loads(files["manifest.json"])
    assert len(manifest) == 1
    assert manifest[0]["RepoTags"] == ["tpnb.local/thing:1.2"]
    cfg_name = manifest[0]["Config"]
    assert image_id == _sha(files[cfg_name]) and cfg_name == image_id.split(":")[1] + ".json"
    config = json.loads(files[cfg_name])
    assert config["os"] == "linux" and config["architecture"] == "amd64"
    assert config["config"]["Entrypoint"] == ["/app", "-x"]
    assert config["config"]["WorkingDir"] == "/w"
    assert "A=1" in config["config"]["Env"] and any(e.startswith("PATH=") for e in config["config"]["Env"])
    # diff_ids are the digests of the (uncompressed) layer tars, in order
    assert config["rootfs"]["diff_ids"] == [_sha(files[name]) for name in manifest[0]["Layers"]]
    assert config["rootfs"]["diff_ids"] == [layer.digest for layer in layers]
    assert len(config["history"]) == len(layers)
    assert json.loads(files["repositories"]) == {"tpnb.local/thing": {"1.2": layers[-1].digest[7:]}}
    assert oci.read_docker_archive(out) == (manifest, config)

    # the same inputs give a byte-identical archive (so reimports are no-ops)
    again = tmp_path / "again.tar"
    oci.write_docker_archive(again, "tpnb.local/thing:1.2", layers, cfg)
    assert again.read_bytes() == out.read_bytes()


@pytest.mark.unit
def test_docker_archive_rejects_bad_input(tmp_path: Path) -> None:
    with oci.LayerWriter(tmp_path / "l.tar") as w:
        w.add_bytes("f", b"x")
    assert w.layer is not None
    cfg = oci.image_config([w.layer], entrypoint=["/f"])
    with pytest.raises(DevClusterError):
        oci.write_docker_archive(tmp_path / "o.tar", "no-version", [w.layer], cfg)
    with pytest.raises(DevClusterError):
        oci.write_docker_archive(tmp_path / "o.tar", "a:b", [w.layer, w.layer], cfg)


@pytest.mark.unit
def test_cached_layer_digest_sidecar(tmp_path: Path) -> None:
    with oci.LayerWriter(tmp_path / "l.tar") as w:
        w.add_bytes("f", b"x")
    assert w.layer is not None
    assert oci.Layer.from_cached(tmp_path / "l.tar") == w.layer
    # a sidecar that no longer matches the tar is ignored and rewritten
    (tmp_path / "l.tar.digest").write_text("sha256:bogus 1\n")
    assert oci.Layer.from_cached(tmp_path / "l.tar") == w.layer


@pytest.mark.unit
def test_go_module_key_follows_sources(tmp_path: Path) -> None:
    if shutil.which("go") is None and not os.access("/usr/local/go/bin/go", os.X_OK):
        pytest.skip("no Go toolchain")
    mod = tmp_path / "tools"
    shutil.copytree(images.TOOLS_MODULE, mod)
    key = images.go_module_key(mod)
    assert images.go_module_key(mod) == key
    (mod / "cmd" / "echoserver" / "main_test.go").write_text("package main\n")
    assert images.go_module_key(mod) == key  # tests are not build inputs
    main = mod / "cmd" / "pause" / "main.go"
    main.write_text(main.read_text() + "\n// changed\n")
    assert images.go_module_key(mod) != key
    key2 = images.go_module_key(mod)
    (mod / "go.mod").write_text((mod / "go.mod").read_text() + "\n")
    assert images.go_module_key(mod) != key2


@pytest.mark.unit
def test_tpnb_image_keys(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("A = 1\n")
    b.write_text("B = 1\n")
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("dnslib==0.9.26\n")
    sources = [("tpnb/a.py", a), ("tpnb/b.py", b)]
    deps, app, key = images.tpnb_image_keys("t:1", sources, reqs)
    assert images.tpnb_image_keys("t:1", list(reversed(sources)), reqs) == (deps, app, key)
    b.write_text("B = 2\n")
    deps2, app2, key2 = images.tpnb_image_keys("t:1", sources, reqs)
    assert deps2 == deps and app2 != app and key2 != key  # a source change: app layer only
    reqs.write_text("dnslib==0.9.25\n")
    deps3, app3, key3 = images.tpnb_image_keys("t:1", sources, reqs)
    assert deps3 != deps and app3 == app2 and key3 != key2
    assert images.tpnb_image_keys("t:2", sources, reqs)[2] != key3


@pytest.mark.unit
def test_requirements_pinned_to_the_venv() -> None:
    """The image must run the stubs generated here: same protobuf and grpcio."""
    pins = {}
    for line in images.requirements_file().read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"unpinned requirement {line!r}"
            pins[name.lower()] = version
    assert {"grpcio", "protobuf", "kubernetes", "dnslib"} <= set(pins)
    for name in ("grpcio", "protobuf"):
        assert importlib.metadata.version(name) == pins[name], f"{name} differs from the venv"


@pytest.mark.unit
def test_dockerfile_matches_the_builtin_recipe() -> None:
    text = (REPO / "cluster" / "Dockerfile").read_text()
    final = text.split("\nFROM debian:bookworm-slim\n")[-1]
    apt = re.search(r"apt-get install -y --no-install-recommends ([^&\n]+)", final)
    assert apt is not None and set(apt.group(1).split()) - {"\\"} == set(rootfs.PACKAGES)
    assert 'ENTRYPOINT ["python3", "-m", "tpnb.cluster"]' in final
    assert "PYTHONPATH=/opt/tpnb:/opt/tpnb/deps" in final
    tools = re.search(r"grpcio-tools==(\S+)", text)
    assert tools is not None
    try:
        assert tools.group(1) == importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        pass
    # every app file the image carries is copied by the Dockerfile too
    from tpnb.imageref import image_sources

    for rel, _ in image_sources():
        top = rel.split("/")[1]
        if rel.startswith("tpnb/cluster/"):
            assert "COPY cluster/ /opt/tpnb/tpnb/cluster/" in final
        elif rel.startswith("tpnb/proto/"):
            assert "/opt/tpnb/tpnb/proto/" in final
        else:
            assert f"tpnb/{top}" in final, rel


@pytest.mark.unit
def test_image_sources_follow_the_folders() -> None:
    """Every .py of the packages the cluster processes import is in the image, and no client module."""
    from tpnb import imageref

    rels = {rel for rel, _ in imageref.image_sources()}
    for name in imageref.IMAGE_PACKAGES:
        folder = imageref.package_dir(name)
        if folder is None:
            continue
        for p in folder.rglob("*.py"):
            if "__pycache__" not in p.parts:
                assert f"{name.replace('.', '/')}/{p.relative_to(folder).as_posix()}" in rels
    assert "tpnb/proto/tpnb.proto" in rels and "tpnb/cluster/manager.py" in rels
    assert not {"tpnb/api.py", "tpnb/cli.py"} & rels and not any("devcluster" in r for r in rels)


@pytest.mark.unit
def test_coredns_directives_cover_every_imported_plugin() -> None:
    main = (images.COREDNS_MODULE / "main.go").read_text()
    imported = re.findall(r'_ "github.com/coredns/coredns/plugin/(\w+)"', main)
    directives = re.findall(r'^\t"(\w+)",$', main.split("var directives")[1], re.M)
    assert set(imported) <= set(directives)
    assert len(directives) == len(set(directives))
    gomod = (images.COREDNS_MODULE / "go.mod").read_text()
    assert f"github.com/coredns/coredns v{images.COREDNS_VERSION}\n" in gomod
    assert images.COREDNS_IMAGE.endswith(":" + images.COREDNS_VERSION)


@pytest.mark.unit
def test_mirror_parsing() -> None:
    deb822 = textwrap.dedent("""\
        Types: deb
        URIs: http://deb.debian.org/debian-security
        Suites: bookworm-security
        Components: main

        Types: deb
        URIs: http://mirror.example/debian/
        Suites: bookworm bookworm-updates
        Components: main
        """)
    assert rootfs.mirror_from([deb822]) == "http://mirror.example/debian"
    one_line = "deb [signed-by=/k.gpg] http://ftp.example/debian bookworm main contrib\n"
    assert rootfs.mirror_from(["# nothing\n", one_line]) == "http://ftp.example/debian"
    assert rootfs.mirror_from(["deb http://x/ubuntu jammy main\n"]) == rootfs.DEFAULT_MIRROR


@pytest.mark.unit
def test_echoserver_go_tests() -> None:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not os.access(go, os.X_OK):
        pytest.skip("no Go toolchain")
    proc = subprocess.run([go, "test", "./..."], cwd=images.TOOLS_MODULE, capture_output=True,
                          text=True, env={**os.environ, "CGO_ENABLED": "0", "GOTOOLCHAIN": "local"},
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ===================================================== real images, real ctr
def _have(*tools: str) -> bool:
    return all(shutil.which(t) for t in tools)


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not _have("containerd", "ctr", "runc", "ip", "nsenter", "debootstrap"),
    reason="needs root, containerd, ctr, runc, ip, nsenter and debootstrap",
)


@dataclass
class Containerd:
    """A private containerd inside a private network namespace."""

    base: Path
    netns: str
    proc: subprocess.Popen[bytes]

    @property
    def socket(self) -> Path:
        return self.base / "containerd.sock"

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["ctr", "--address", str(self.socket), "-n", "k8s.io", *args],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed: {proc.stderr or proc.stdout}")
        return proc

    def run(self, image: str, cid: str, *args: str, env: dict[str, str] | None = None,
            mounts: list[str] | None = None) -> None:
        """Start a detached container sharing our network namespace."""
        opts = ["-d", "--cgroup", f"/{self.netns}/{cid}",
                "--with-ns", f"network:/run/netns/{self.netns}"]
        for k, v in (env or {}).items():
            opts += ["--env", f"{k}={v}"]
        for m in mounts or []:
            opts += ["--mount", m]
        self.ctr("run", *opts, image, cid, *args)

    def stop(self, cid: str) -> None:
        self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        for _ in range(50):
            if self.ctr("tasks", "rm", "-f", cid, check=False).returncode == 0:
                break
            time.sleep(0.1)
        self.ctr("containers", "rm", cid, check=False)

    def in_netns(self, code: str, timeout: float = 30) -> str:
        """Run Python code inside the namespace (where the containers listen)."""
        proc = subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-c", code],
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]


def _pids_mentioning(text: str) -> list[int]:
    """PIDs whose command line names our private socket (our shims, nothing else)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                continue
    return [p for p in out if p != os.getpid()]


@pytest.fixture(scope="module")
def built() -> list[images.BuiltImage]:
    start = time.monotonic()
    result = images.build_all()
    print(f"build_all: {time.monotonic() - start:.1f} s")
    return result


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    netns = f"tpnbimg{os.getpid()}"
    base = Path(tempfile.mkdtemp(prefix="tpnbimg-ctd-", dir="/tmp"))
    cfg = base / "config.toml"
    cfg.write_text(textwrap.dedent(f"""\
        version = 2
        root = "{base}/root"
        state = "{base}/state"
        disabled_plugins = ["io.containerd.grpc.v1.cri"]
        [grpc]
          address = "{base}/containerd.sock"
        [ttrpc]
          address = "{base}/containerd.sock.ttrpc"
        [debug]
          address = ""
        [metrics]
          address = ""
        """))
    subprocess.run(["ip", "netns", "add", netns], check=True)
    proc = None
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        log = open(base / "containerd.log", "wb")
        # nsenter, not `ip netns exec`: that also remounts /sys in a new mount
        # namespace, hiding the cgroup mounts runc needs.
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{netns}", "containerd", "--config", str(cfg)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        ctd = Containerd(base, netns, proc)
        deadline = time.monotonic() + 30
        while ctd.ctr("version", check=False, timeout=10).returncode != 0:
            assert proc.poll() is None, (base / "containerd.log").read_text()
            assert time.monotonic() < deadline, "private containerd did not start"
            time.sleep(0.2)
        yield ctd
    finally:
        if proc is not None:
            for cid in (subprocess.run(["ctr", "--address", str(base / "containerd.sock"), "-n", "k8s.io",
                                        "containers", "ls", "-q"], capture_output=True, text=True)
                        .stdout.split()):
                Containerd(base, netns, proc).stop(cid)
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in _pids_mentioning(str(base / "containerd.sock")):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for mnt in sorted(_mounts_under(base), key=len, reverse=True):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        for d in Path("/sys/fs/cgroup").glob(f"*/{netns}"):
            try:
                d.rmdir()
            except OSError:
                pass
        try:
            Path(f"/sys/fs/cgroup/{netns}").rmdir()
        except OSError:
            pass
        if not _mounts_under(base):
            shutil.rmtree(base, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


@pytest.fixture(scope="module")
def imported(built: list[images.BuiltImage], containerd: Containerd) -> dict[str, str]:
    for img in built:
        containerd.ctr("images", "import", str(img.tar))
    refs = containerd.ctr("images", "ls", "-q").stdout.split()
    return {r: r for r in refs}


@pytest.mark.netns
@needs_root
def test_build_all_names_and_warm_cache(built: list[images.BuiltImage]) -> None:
    from tpnb.imageref import default_image

    assert [b.name for b in built] == [images.PAUSE_IMAGE, images.ECHO_IMAGE, images.COREDNS_IMAGE,
                                       default_image()]
    for b in built:
        assert b.tar.is_file() and b.tar.parent == images.images_dir()
        manifest, config = oci.read_docker_archive(b.tar)
        assert manifest[0]["RepoTags"] == [b.name]
    start = time.monotonic()
    again = images.build_all()
    assert time.monotonic() - start < 1.0
    assert again == built


@pytest.mark.netns
@needs_root
def test_ctr_import_yields_exactly_the_tags(built: list[images.BuiltImage], imported: dict[str, str]) -> None:
    assert sorted(imported) == sorted(b.name for b in built)


@pytest.mark.netns
@needs_root
def test_echoserver_answers_like_the_original(imported: dict[str, str], containerd: Containerd) -> None:
    containerd.run(images.ECHO_IMAGE, "echo-http", env={"EXTRA_PORTS": "8081"})
    try:
        out = containerd.in_netns(textwrap.dedent("""\
            import http.client, time
            for port in (8080, 8081):
                for _ in range(100):
                    try:
                        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                        c.putrequest("GET", "/", skip_host=True, skip_accept_encoding=True)
                        c.putheader("Host", "hello.default")
                        c.putheader("User-Agent", "curl/7.71.1")
                        c.putheader("Accept", "*/*")
                        c.endheaders()
                        print(c.getresponse().read().decode(), end="\\f")
                        break
                    except OSError:
                        time.sleep(0.1)
            """))
        first, second, _ = out.split("\f")
        assert first == textwrap.dedent("""\
            CLIENT VALUES:
            client_address=127.0.0.1
            command=GET
            real path=/
            query=nil
            request_version=1.1
            request_uri=http://hello.default:8080/

            SERVER VALUES:
            server_version=nginx: 1.10.0 - lua: 10001

            HEADERS RECEIVED:
            accept=*/*
            host=hello.default
            user-agent=curl/7.71.1
            BODY:
            -no body in request-""")
        assert "request_uri=http://hello.default:8081/" in second
    finally:
        containerd.stop("echo-http")


@pytest.mark.netns
@needs_root
def test_udpecho(imported: dict[str, str], containerd: Containerd) -> None:
    containerd.run(images.ECHO_IMAGE, "echo-udp", "/udpecho")
    try:
        out = containerd.in_netns(textwrap.dedent("""\
            import socket, time
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(0.2)
            for _ in range(50):
                s.sendto(b"ping", ("127.0.0.1", 9999))
                try:
                    print(s.recv(100).decode()); break
                except OSError:
                    time.sleep(0.1)
            """))
        assert out.strip() == "echo: ping"
    finally:
        containerd.stop("echo-udp")


@pytest.mark.netns
@needs_root
def test_pause_exits_promptly_on_sigterm(imported: dict[str, str], containerd: Containerd) -> None:
    containerd.run(images.PAUSE_IMAGE, "pause")
    try:
        time.sleep(0.3)
        containerd.ctr("tasks", "kill", "pause")  # SIGTERM
        deadline = time.monotonic() + 5
        while "RUNNING" in containerd.ctr("tasks", "ls").stdout:
            assert time.monotonic() < deadline, "pause ignored SIGTERM"
            time.sleep(0.1)
    finally:
        containerd.stop("pause")


@pytest.mark.netns
@needs_root
def test_coredns_serves(imported: dict[str, str], containerd: Containerd, tmp_path: Path) -> None:
    conf = tmp_path / "coredns"
    conf.mkdir()
    (conf / "Corefile").write_text(".:1053 {\n    errors\n    log\n    ready :8181\n    prometheus :9153\n"
                                   "    template IN A tpnb.test {\n        answer \"{{ .Name }} 60 IN A 10.1.2.3\"\n"
                                   "    }\n    whoami\n}\n")
    containerd.run(images.COREDNS_IMAGE, "coredns",
                   mounts=[f"type=bind,src={conf},dst=/etc/coredns,options=rbind:ro"])
    try:
        out = containerd.in_netns(textwrap.dedent("""\
            import time, urllib.request
            from dnslib import DNSRecord
            for _ in range(100):
                try:
                    urllib.request.urlopen("http://127.0.0.1:8181/ready", timeout=1).read(); break
                except OSError:
                    time.sleep(0.1)
            reply = DNSRecord.parse(DNSRecord.question("x.tpnb.test").send("127.0.0.1", 1053, timeout=3))
            print(reply.rr[0].rdata)
            """))
        assert out.strip() == "10.1.2.3"
    finally:
        containerd.stop("coredns")


@pytest.mark.netns
@needs_root
def test_tpnb_image_runs_python_with_the_deps(imported: dict[str, str], containerd: Containerd,
                                              built: list[images.BuiltImage], tmp_path: Path) -> None:
    from tpnb.imageref import default_image

    _, config = oci.read_docker_archive(built[-1].tar)
    assert config["config"]["Entrypoint"] == ["python3", "-m", "tpnb.cluster"]
    assert "PYTHONPATH=/opt/tpnb:/opt/tpnb/deps" in config["config"]["Env"]
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "probe.py").write_text(textwrap.dedent("""\
        import json, os, shutil, sys
        import grpc, google.protobuf, kubernetes.client, dnslib, yaml
        from tpnb.proto import pb, rpc
        from tpnb.imageref import default_image
        print(json.dumps({
            "python": sys.version_info[:2], "grpc": grpc.__version__,
            "protobuf": google.protobuf.__version__, "tag": default_image(),
            "sftp": os.path.exists("/usr/lib/openssh/sftp-server"),
            "tools": [bool(shutil.which(t)) for t in ("ip", "ps")],
        }))
        """))
    # ctr's COMMAND replaces the whole process (entrypoint included)
    out = containerd.ctr("run", "--rm", "--cgroup", f"/{containerd.netns}/probe",
                         "--with-ns", f"network:/run/netns/{containerd.netns}",
                         "--mount", f"type=bind,src={probe},dst=/probe,options=rbind:ro",
                         default_image(), "probe", "python3", "/probe/probe.py").stdout
    info = json.loads(out.strip().splitlines()[-1])
    assert info["python"] == [3, 11]
    assert info["grpc"] == importlib.metadata.version("grpcio")
    assert info["protobuf"] == importlib.metadata.version("protobuf")
    assert info["tag"] == default_image()  # the image computes its own tag identically
    assert info["sftp"] and all(info["tools"])
