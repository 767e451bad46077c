"""The dev cluster's container images, built without Docker or a registry.

The machine reaches package registries only, so every image the dev cluster
runs is built here and imported into its containerd as a docker-archive tar:

* `pause` and `echoserver` (+ `udpecho`): tiny static Go programs from
  `go/tools` (stdlib only), each in a scratch image;
* CoreDNS: compiled from the Go module proxy with only the plugins we use
  (`go/coredns`), in a scratch image;
* the tpnb image (traffic-manager and traffic-agent): a debootstrapped Debian
  base, a layer of Python dependencies, and a small app layer of tpnb sources.

Every output is cached by a hash of its inputs, so an unchanged image costs a
few file reads, and a changed tpnb source rebuilds only the app layer.
`cluster/Dockerfile` is the equivalent recipe for users with Docker.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tpnb.errors import DevClusterError, PrerequisiteError

from . import config, rootfs
from .oci import Layer, LayerWriter, image_config, write_docker_archive

COREDNS_VERSION = "1.12.1"  # keep in step with go/coredns/go.mod
COREDNS_IMAGE = f"tpnb.local/coredns:{COREDNS_VERSION}"
PAUSE_IMAGE = "tpnb.local/pause:3.10"
ECHO_IMAGE = "tpnb.local/echoserver:1.4"

GO_DIR = Path(__file__).resolve().parent / "go"
TOOLS_MODULE = GO_DIR / "tools"
COREDNS_MODULE = GO_DIR / "coredns"
#: bump when the way images are assembled changes, to invalidate every cache
RECIPE_VERSION = 2
#: glibc of Debian bookworm: wheels for any manylinux_2_N up to it run in the image
#: (pip does not widen a --platform manylinux_2_N to older N by itself)
_BOOKWORM_GLIBC_MINOR = 36
#: pip flags for the dependency layer: CPython 3.11 (bookworm's python3) binary wheels
PIP_TARGET_FLAGS: tuple[str, ...] = (
    "--python-version", "3.11", "--implementation", "cp", "--only-binary=:all:",
    *(arg for minor in range(_BOOKWORM_GLIBC_MINOR, 16, -1)
      for arg in ("--platform", f"manylinux_2_{minor}_x86_64")),
    "--platform", "manylinux2014_x86_64",
)
APP_DIR = "opt/tpnb"

Progress = Callable[[str, str, float], None]


@dataclass
class BuiltImage:
    """An image tag and the docker-archive tar that `ctr images import` loads."""

    name: str
    tar: Path


def _silent(step: str, message: str, fraction: float) -> None:
    pass


def images_dir() -> Path:
    return Path(config.get().state_dir) / "images"


def cache_dir() -> Path:
    return images_dir() / "cache"


# -------------------------------------------------------------- public API
def build_all(progress: Progress | None = None) -> list[BuiltImage]:
    """Every image the dev cluster runs, built or taken from the cache."""
    p = progress or _silent
    return [build_pause(p), build_echoserver(p), build_coredns(p), build_tpnb_image(p)]


def build_pause(progress: Progress | None = None) -> BuiltImage:
    """Pod sandbox image: /pause."""
    return _scratch_image(PAUSE_IMAGE, TOOLS_MODULE, {"pause": "./cmd/pause"},
                          ["/pause"], progress or _silent)


def build_echoserver(progress: Progress | None = None) -> BuiltImage:
    """Echo test app: /echoserver (HTTP :8080, EXTRA_PORTS) and /udpecho (UDP :9999)."""
    return _scratch_image(ECHO_IMAGE, TOOLS_MODULE,
                          {"echoserver": "./cmd/echoserver", "udpecho": "./cmd/udpecho"},
                          ["/echoserver"], progress or _silent)


def build_coredns(progress: Progress | None = None) -> BuiltImage:
    """Cluster DNS image: /coredns with our plugin subset."""
    return _scratch_image(COREDNS_IMAGE, COREDNS_MODULE, {"coredns": "."},
                          ["/coredns", "-conf", "/etc/coredns/Corefile"], progress or _silent)


def build_tpnb_image(progress: Progress | None = None) -> BuiltImage:
    """The traffic-manager/agent image, tagged `tpnb.imageref.default_image()`."""
    import tpnb.proto  # noqa: F401  (regenerates stale stubs before they are hashed)
    from tpnb.imageref import default_image, image_sources

    tag = default_image()
    sources = image_sources()
    reqs = requirements_file()
    deps_key, app_key, key = tpnb_image_keys(tag, sources, reqs)
    return _python_image(
        "tpnb", tag, key, progress or _silent, sources=sources, requirements=reqs, deps_key=deps_key,
        app_key=app_key, entrypoint=["python3", "-m", "tpnb.cluster"], workdir=f"/{APP_DIR}",
        title="tpnb cluster (traffic-manager, traffic-agent)")


def _python_image(short: str, tag: str, key: str, p: Progress, *, sources: list[tuple[str, Path]],
                  requirements: Path | str, deps_key: str, app_key: str, entrypoint: list[str], workdir: str,
                  title: str, layer_prefix: str = "", env: dict[str, str] | None = None,
                  extra_layers: Callable[[Path], tuple[list[Layer], list[Layer]]] | None = None,
                  user: str = "") -> BuiltImage:
    """A Python 3.11 image on the Debian base: its dependencies (`requirements`: a file, or the text of
    one) in /opt/tpnb/deps, `sources` in /opt/tpnb, byte-compiled -- the project image and the notebook
    pod's image are both built here, so they share the base, the recipe and the cache's rules.

    `short` names the archive (images/SHORT_VERSION_KEY.tar); `layer_prefix` the cached layers
    (PREFIXdeps-*, PREFIXapp-*); `extra_layers(root)` builds layers that go (before, after) the app
    layer; only the current app layer (and extra layers) of this image stay in the cache."""
    step = f"image {short}"
    out = _archive_path(short, tag, key)
    if out.exists():
        p(step, f"{tag} up to date", 1.0)
        return BuiltImage(tag, out)
    with _lock():
        if out.exists():
            return BuiltImage(tag, out)
        start = time.monotonic()
        cache = cache_dir()
        root, base = rootfs.ensure_rootfs(cache, p, step)
        reqs = requirements if isinstance(requirements, Path) else cache / f"{layer_prefix}requirements-{deps_key}.txt"
        if not isinstance(requirements, Path):
            reqs.write_text(requirements)
        try:
            deps = _deps_layer(root, reqs, deps_key, p, step, kind=f"{layer_prefix}deps")
        finally:
            if not isinstance(requirements, Path):
                reqs.unlink(missing_ok=True)
        p(step, "writing the app layer", 0.95)
        app = _app_layer(root, sources, app_key, kind=f"{layer_prefix}app")
        before, after = extra_layers(root) if extra_layers is not None else ([], [])
        layers = [base, deps, *before, app, *after]
        cfg = image_config(
            layers,
            entrypoint=entrypoint,
            env={"PYTHONPATH": f"/{APP_DIR}:/{APP_DIR}/deps", "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8",
                 **(env or {})},
            workdir=workdir,
            labels={"org.opencontainers.image.title": title},
        )
        if user:
            cfg["config"]["User"] = user
        p(step, f"writing {out.name}", 0.97)
        write_docker_archive(out, tag, layers, cfg)
        _prune(out, short)
        current = {layer.path.name for layer in layers}
        for kind in (f"{layer_prefix}app", *{_layer_kind(layer) for layer in after}):
            for old in cache.glob(f"{kind}-*.tar*"):   # earlier app (and after-app) layers of this image
                if old.name.removesuffix(".digest") not in current:
                    old.unlink(missing_ok=True)
        p(step, f"{tag} built in {time.monotonic() - start:.1f} s", 1.0)
    return BuiltImage(tag, out)


def _layer_kind(layer: Layer) -> str:
    """A cached layer's kind: the part of its file name before the key (nbuser-KEY.tar -> nbuser)."""
    return layer.path.name.rpartition("-")[0]


def tpnb_image_keys(tag: str, sources: list[tuple[str, Path]], reqs: Path) -> tuple[str, str, str]:
    """(dependency layer key, app layer key, image key).

    The dependency layer depends on the base and the requirements only, so a
    source change rebuilds the small app layer and nothing else.
    """
    deps_key = _hash(["deps", RECIPE_VERSION, rootfs.cache_key(), reqs.read_bytes(), *PIP_TARGET_FLAGS])
    app_key = _hash(["app", RECIPE_VERSION, *_hash_named(sources)])
    return deps_key, app_key, _hash([tag, deps_key, app_key])


def requirements_file() -> Path:
    """cluster/requirements.txt, wherever the tpnb.cluster package lives."""
    import tpnb.cluster

    return Path(tpnb.cluster.__file__).resolve().parent / "requirements.txt"


# --------------------------------------------------- the notebook pod image
NOTEBOOK_REPO = "tpnb.local/tpnb-notebook"
#: the notebook user: uid 1000 (group 100, "users"), as the Jupyter Docker Stacks' jovyan
NOTEBOOK_UID, NOTEBOOK_GID = 1000, 100
NOTEBOOK_HOME = "/home/jovyan"
#: the client's own dependencies (pyproject.toml) that a kernel in a pod imports, plus the kernel and
#: nbclient that run notebooks in it; the root daemon's (pyroute2, mitmproxy-rs) are left out: no root
NOTEBOOK_PACKAGES = ("anyio", "grpcio", "protobuf", "kubernetes", "websockets", "dnslib", "h11", "ipython",
                     "ipywidgets", "nest_asyncio", "pyyaml", "uvicorn", "httptools", "a2wsgi", "requests",
                     "ipykernel", "nbclient", "nbformat", "pandas")
#: Debian packages of the notebook image beyond the project image's base (what a notebook's `!curl` runs)
NOTEBOOK_DEBS = ("curl",)


def notebook_requirements() -> str:
    """Pinned to the versions of this venv (the tests' client), so the kernel in the pod runs the same stack."""
    from importlib.metadata import PackageNotFoundError, version

    lines = []
    for name in NOTEBOOK_PACKAGES:
        try:
            lines.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            raise PrerequisiteError(f"{name} is not installed in tpnb's venv",
                                    "the notebook image pins its packages to the venv's versions",
                                    "run ./scripts/install-deps") from None
    return "\n".join(lines) + "\n"


def notebook_sources() -> list[tuple[str, Path]]:
    """(path inside /opt/tpnb, source) of the client: tpnb/ (faces, magics, proto), common/, connector/,
    and cluster/ as in the project image (so `tpnb.imageref.default_image()` names the same manager
    image as the tests' client: a notebook never tries to "upgrade" the manager it finds).

    The root daemon (daemon/) stays out: a notebook pod never runs it.
    """
    import tpnb.proto  # noqa: F401  (regenerates stale stubs before they are copied)
    from tpnb.imageref import package_dir

    out: list[tuple[str, Path]] = []
    for name, suffixes, deep in (("tpnb", (".py",), False), ("tpnb.magics", (".py",), True),
                                 ("tpnb.proto", (".py", ".proto", ".pyi"), True),
                                 ("tpnb.common", (".py",), True), ("tpnb.connector", (".py",), True),
                                 ("tpnb.cluster", (".py",), True)):
        folder = package_dir(name)
        assert folder is not None, name
        prefix = name.replace(".", "/")
        for p in sorted(folder.rglob("*") if deep else folder.glob("*")):
            rel = p.relative_to(folder)
            if p.suffix in suffixes and p.is_file() and "__pycache__" not in rel.parts:
                out.append((f"{prefix}/{rel.as_posix()}", p))
    return out


def notebook_image_tag(sources: list[tuple[str, Path]] | None = None) -> str:
    from tpnb.version import __version__

    src = _hash(["notebook", *_hash_named(sources or notebook_sources())])[:10]
    return f"{NOTEBOOK_REPO}:{__version__}-{src}"


def build_notebook_image(progress: Progress | None = None) -> BuiltImage:
    """A notebook pod's image: the project image's Debian base and Python 3.11, the tpnb client with its
    dependencies, ipykernel and nbclient; runs as uid 1000 (HOME /home/jovyan) with nothing that needs
    root or a capability, so it is admitted under Pod Security "restricted".

    Not part of `build_all` (the dev cluster itself never runs it): tests/test_incluster.py builds it
    and imports it.  JupyterLab is left out (the tests drive the kernel with nbclient); a hub image adds
    it with `pip install jupyterlab`.
    """
    p = progress or _silent
    sources = notebook_sources()
    tag = notebook_image_tag(sources)
    req_text = notebook_requirements()
    deps_key = _hash(["nbdeps", RECIPE_VERSION, rootfs.cache_key(), req_text, *PIP_TARGET_FLAGS])
    app_key = _hash(["nbapp", RECIPE_VERSION, *_hash_named(sources)])
    key = _hash([tag, deps_key, app_key, _notebook_tools_key(), NOTEBOOK_UID, NOTEBOOK_GID])

    def tools_and_user(root: Path) -> tuple[list[Layer], list[Layer]]:
        return [_notebook_tools_layer(root, p, "image notebook")], [_notebook_user_layer(root, key)]

    return _python_image(
        "notebook", tag, key, p, sources=sources, requirements=req_text, deps_key=deps_key, app_key=app_key,
        layer_prefix="nb", entrypoint=["sleep", "infinity"], workdir=NOTEBOOK_HOME,
        env={"HOME": NOTEBOOK_HOME, "USER": "jovyan"}, extra_layers=tools_and_user,
        user=f"{NOTEBOOK_UID}:{NOTEBOOK_GID}", title="tpnb notebook pod (tpnb client, ipykernel, nbclient)")


def _kubectl() -> Path:
    """The dev cluster's own kubectl build (a static Go binary), for notebooks that run `!kubectl`."""
    from . import binaries

    path = binaries.bin_dir(Path(config.get().state_dir)) / "kubectl"
    if not os.access(path, os.X_OK):
        raise PrerequisiteError("the dev cluster's kubectl is not built yet", f"{path} is missing",
                                "run `tpnb devcluster up` first")
    return path


def _notebook_tools_key() -> str:
    st = _kubectl().stat()
    return _hash(["nbtools", RECIPE_VERSION, rootfs.cache_key(), *NOTEBOOK_DEBS, st.st_size, st.st_mtime_ns])


def _notebook_tools_layer(root: Path, progress: Progress, step: str) -> Layer:
    """curl (with the libraries the base lacks) and kubectl in /usr/local/bin.

    The packages come from this machine's apt (`apt-get download`, the same bookworm archive the
    base was bootstrapped from) and are unpacked with `dpkg-deb -x`: they are a program and shared
    libraries with no maintainer scripts worth running, and the multiarch library directories are
    on the dynamic linker's default path, so no ldconfig is needed.
    """
    tar = cache_dir() / f"nbtools-{_notebook_tools_key()}.tar"
    if tar.exists():
        return Layer.from_cached(tar)
    for old in cache_dir().glob("nbtools-*.tar*"):
        old.unlink(missing_ok=True)
    status = (root / "var" / "lib" / "dpkg" / "status").read_text()
    installed = {ln.split(":", 1)[1].strip() for ln in status.splitlines() if ln.startswith("Package:")}
    progress(step, f"apt-get download {' '.join(NOTEBOOK_DEBS)} and the libraries the base lacks", 0.9)
    deps = subprocess.run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                           "--no-breaks", "--no-replaces", "--no-enhances", *NOTEBOOK_DEBS],
                          capture_output=True, text=True)
    if deps.returncode != 0:
        raise PrerequisiteError("apt-cache cannot resolve the notebook image's packages", deps.stderr.strip()[-500:],
                                "run `apt-get update`")
    wanted = sorted({ln.strip() for ln in deps.stdout.splitlines()
                     if ln and not ln.startswith((" ", "<"))} - installed)
    work = Path(tempfile.mkdtemp(prefix="nbtools-", dir=cache_dir()))
    try:
        got = subprocess.run(["apt-get", "download", *wanted], cwd=work, capture_output=True, text=True)
        if got.returncode != 0:
            raise DevClusterError(f"apt-get download {' '.join(wanted)} failed", got.stderr.strip()[-1500:],
                                  "check the machine's apt sources (`apt-get update`)")
        stage = work / "root"
        for deb in sorted(work.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(stage)], check=True, capture_output=True)
        for junk in ("usr/share/doc", "usr/share/man", "usr/share/lintian"):
            shutil.rmtree(stage / junk, ignore_errors=True)
        for top in ("bin", "sbin", "lib", "lib64"):  # the base is merged-/usr: /lib is a symlink, keep it one
            if (stage / top).is_dir() and not (stage / top).is_symlink():
                shutil.copytree(stage / top, stage / "usr" / top, symlinks=True, dirs_exist_ok=True)
                shutil.rmtree(stage / top)
        with LayerWriter(tar) as w:
            w.add_tree(stage, "")
            w.add_file("usr/local/bin/kubectl", _kubectl(), mode=0o755)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert w.layer is not None
    return w.layer


def _notebook_user_layer(root: Path, key: str) -> Layer:
    """jovyan in /etc/passwd (getpass, sftp and Jupyter want a name), a home and /tmp anyone may write.

    Layer entries are owned by root, so the writable directories are sticky and world-writable, as /tmp
    is; a hub mounts the user's volume on the home anyway.
    """
    tar = cache_dir() / f"nbuser-{key}.tar"
    if tar.exists():
        return Layer.from_cached(tar)
    passwd = (root / "etc" / "passwd").read_text()
    if not passwd.endswith("\n"):
        passwd += "\n"
    passwd += f"jovyan:x:{NOTEBOOK_UID}:{NOTEBOOK_GID}:notebook user:{NOTEBOOK_HOME}:/bin/sh\n"
    with LayerWriter(tar) as w:
        w.add_bytes("etc/passwd", passwd.encode(), mode=0o644)
        w.add_dir("tmp", mode=0o1777)
        w.add_dir("home", mode=0o755)
        w.add_dir(NOTEBOOK_HOME.strip("/"), mode=0o1777)
    assert w.layer is not None
    return w.layer


# ----------------------------------------------------------- scratch images
def _scratch_image(tag: str, module: Path, binaries: dict[str, str], entrypoint: list[str],
                   progress: Progress) -> BuiltImage:
    """A single-layer image of static Go binaries at the filesystem root."""
    short = tag.split("/")[-1].split(":")[0]
    step = f"image {short}"
    src_key = go_module_key(module)
    key = _hash([RECIPE_VERSION, tag, src_key, *sorted(binaries.items()), *entrypoint])
    out = _archive_path(short, tag, key)
    if out.exists():
        progress(step, f"{tag} up to date", 1.0)
        return BuiltImage(tag, out)
    with _lock():
        if out.exists():
            return BuiltImage(tag, out)
        start = time.monotonic()
        bins = _go_build(module, src_key, binaries, progress, step)
        progress(step, "writing the image", 0.95)
        layer_path = cache_dir() / f"layer-{short}-{key}.tar"
        with LayerWriter(layer_path) as w:
            for name in sorted(binaries):
                w.add_file(name, bins / name, mode=0o755)
        assert w.layer is not None
        cfg = image_config([w.layer], entrypoint=entrypoint)
        write_docker_archive(out, tag, [w.layer], cfg)
        layer_path.unlink()  # the archive holds it; nothing else reuses it
        layer_path.with_name(layer_path.name + ".digest").unlink(missing_ok=True)
        _prune(out, short)
        progress(step, f"{tag} built in {time.monotonic() - start:.1f} s", 1.0)
    return BuiltImage(tag, out)


# ------------------------------------------------------------------- Go
def find_go() -> str:
    go = shutil.which("go")
    if go is None and os.access("/usr/local/go/bin/go", os.X_OK):
        go = "/usr/local/go/bin/go"
    if go is None:
        raise PrerequisiteError("the Go toolchain is missing",
                                "the dev cluster's pause, echoserver and CoreDNS images are compiled from source",
                                "install Go 1.23 or newer and put it on PATH")
    return go


def _go_version_stamp(go: str) -> str:
    """Identifies the toolchain cheaply (no subprocess): GOROOT/VERSION, else the binary."""
    real = Path(go).resolve()
    version = real.parent.parent / "VERSION"
    try:
        return version.read_text().splitlines()[0]
    except (OSError, IndexError):
        st = real.stat()
        return f"{real}:{st.st_size}:{st.st_mtime_ns}"


def go_module_key(module: Path) -> str:
    """Hash of a Go module's sources, go.mod/go.sum and the toolchain."""
    files = sorted(p for p in module.rglob("*") if p.is_file() and (
        (p.suffix == ".go" and not p.name.endswith("_test.go")) or p.name in ("go.mod", "go.sum")))
    named = [(str(p.relative_to(module)), p) for p in files]
    return _hash(["go", _go_version_stamp(find_go()), *_hash_named(named)])


def _go_build(module: Path, src_key: str, binaries: dict[str, str], progress: Progress,
              step: str) -> Path:
    """Compile static binaries (CGO off) into a directory cached by `src_key`."""
    out = cache_dir() / f"go-{module.name}-{src_key}"
    missing = {b: pkg for b, pkg in sorted(binaries.items()) if not (out / b).is_file()}
    if not missing:
        return out
    go = find_go()
    for old in cache_dir().glob(f"go-{module.name}-*"):
        if old != out:
            shutil.rmtree(old, ignore_errors=True)  # built from older sources
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CGO_ENABLED": "0", "GOOS": "linux", "GOARCH": "amd64",
           "GOTOOLCHAIN": "local", "GOFLAGS": "-buildvcs=false"}
    env.setdefault("HOME", "/root")
    for i, (name, pkg) in enumerate(missing.items()):
        tmp = out / f".{name}.tmp"
        argv = [go, "build", "-trimpath", "-ldflags=-s -w -buildid=", "-o", str(tmp), pkg]
        frac = 0.05 + 0.85 * i / len(missing)
        progress(step, f"go build {name} (module {module.name}/)", frac)
        _run_streaming(argv, module, env, progress, step, frac, f"go build {name}")
        os.replace(tmp, out / name)
    return out


def _run_streaming(argv: list[str], cwd: Path, env: dict[str, str], progress: Progress,
                   step: str, frac: float, label: str) -> None:
    """Run a tool, turning its output lines into progress and its failure into an error."""
    start = time.monotonic()
    tail: list[str] = []
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-40:]
        progress(step, f"{label} ({int(time.monotonic() - start)} s): {line[:120]}", frac)
    rc = proc.wait()
    if rc != 0:
        hint = "check the output above"
        if any("proxy.golang.org" in t or "dial tcp" in t or "403" in t for t in tail):
            hint = "the Go module proxy could not serve a dependency; check GOPROXY and network access"
        raise DevClusterError(f"{label} failed (exit {rc})", "\n".join(tail)[-2000:], hint)


# ------------------------------------------------------ tpnb image layers
def _deps_layer(root: Path, reqs: Path, key: str, progress: Progress, step: str, kind: str = "deps") -> Layer:
    """Python dependencies for CPython 3.11 in /opt/tpnb/deps, byte-compiled (`kind` names the cache files)."""
    cache = cache_dir()
    tar = cache / f"{kind}-{key}.tar"
    if tar.exists():
        return Layer.from_cached(tar)
    # other recipes' layers stay (worktrees share the cache), the newest few of them
    others = sorted(cache.glob(f"{kind}-*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in others[rootfs.KEEP_OTHER:]:
        old.unlink()
        Path(f"{old}.digest").unlink(missing_ok=True)
    target = root / APP_DIR / "deps"  # inside the rootfs, so its python3 can compile it
    shutil.rmtree(root / APP_DIR, ignore_errors=True)
    try:
        progress(step, f"pip install -r {reqs.name} (CPython 3.11 wheels)", 0.8)
        argv = [sys.executable, "-m", "pip", "install", "--no-compile",
                "--disable-pip-version-check", "--no-warn-conflicts", "--quiet",
                "--target", str(target), *PIP_TARGET_FLAGS, "-r", str(reqs)]
        if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode:
            raise PrerequisiteError("pip is missing from tpnb's Python",
                                    "the image's Python dependencies are fetched with the host pip",
                                    f"{sys.executable} -m ensurepip")
        _run_streaming(argv, root.parent, dict(os.environ), progress, step, 0.8, "pip install")
        shutil.rmtree(target / "bin", ignore_errors=True)  # console scripts for the host python
        progress(step, "byte-compiling the dependencies with the image's python3", 0.85)
        rootfs.chroot_python(root, ["-m", "compileall", "-q", "--invalidation-mode",
                                    "unchecked-hash", f"/{APP_DIR}/deps"])
        progress(step, "writing the dependency layer", 0.9)
        with LayerWriter(tar) as w:
            w.add_dir("opt")
            w.add_dir(APP_DIR)
            w.add_tree(target, f"{APP_DIR}/deps")
    finally:
        shutil.rmtree(root / APP_DIR, ignore_errors=True)
    assert w.layer is not None
    return w.layer


def _app_layer(root: Path, sources: list[tuple[str, Path]], key: str, kind: str = "app") -> Layer:
    """/opt/tpnb/<rel> for every tpnb source file of the image, byte-compiled.

    Compiling with the image's own python3 (3.11) doubles as a check: code
    that only the host's newer Python accepts fails here, at build time, and
    not as a crash-looping pod.
    """
    cache = cache_dir()
    tar = cache / f"{kind}-{key}.tar"
    if tar.exists():
        return Layer.from_cached(tar)
    stage = root / APP_DIR
    shutil.rmtree(stage, ignore_errors=True)
    try:
        for rel, path in sources:
            dest = stage / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            dest.chmod(0o644)
        rootfs.chroot_python(
            root, ["-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash", f"/{APP_DIR}"],
            what="tpnb's cluster code does not compile with the image's Python 3.11",
            hint="cluster/ and the tpnb modules it imports must stay Python 3.11-compatible")
        with LayerWriter(tar) as w:
            w.add_dir("opt")
            w.add_tree(stage, APP_DIR)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    assert w.layer is not None
    return w.layer


# ------------------------------------------------------------- plumbing
def _hash(parts: list[object]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _hash_named(named: list[tuple[str, Path]]) -> list[bytes]:
    """name + content of each file, in name order: a tree's identity."""
    return [rel.encode() + b"\0" + path.read_bytes() for rel, path in sorted(named)]


def _archive_path(short: str, tag: str, key: str) -> Path:
    version = tag.rpartition(":")[2]
    return images_dir() / f"{short}_{version}_{key}.tar"


def _prune(keep: Path, short: str) -> None:
    """Drop older archives of an image."""
    for old in images_dir().glob(f"{short}_*.tar"):
        if old != keep:
            old.unlink(missing_ok=True)


@contextmanager
def _lock() -> Iterator[None]:
    """One builder at a time per state dir (a CLI and a test may both call in)."""
    d = images_dir()
    try:
        (d / "cache").mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise PrerequisiteError(f"cannot write {d}", "the image cache lives in the dev cluster's state dir",
                                "run as root (sudo), or set TPNB_DEVCLUSTER_STATE_DIR to a writable path") from None
    with open(d / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
