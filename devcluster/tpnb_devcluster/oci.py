"""A small writer for image layers and docker-archive image tarballs.

The dev cluster has no Docker engine and no registry, so its images are
assembled here: each layer is a plain tar written with `tarfile`, and an image
is a docker-archive (`manifest.json` + config + layers), the format `docker
save` writes and `ctr images import` (containerd 1.6 included) reads, keeping
the tag from `RepoTags`.

Layers are deterministic (sorted entries, mtime 0, root ownership), so the
same inputs give the same digests and an unchanged image imports as a no-op.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from tpnb.errors import DevClusterError

_CHUNK = 1 << 20
#: paths whose contents never belong in a layer (kernel and runtime filesystems)
PSEUDO_DIRS = ("dev", "proc", "sys")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed (layers can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Layer:
    """An uncompressed layer tar and its digest (= its diff ID)."""

    path: Path
    digest: str  # "sha256:<hex>"
    size: int

    @classmethod
    def from_tar(cls, path: Path) -> Layer:
        return cls(path=path, digest="sha256:" + sha256_file(path), size=path.stat().st_size)

    @property
    def _digest_file(self) -> Path:
        return self.path.with_name(self.path.name + ".digest")

    def save_digest(self) -> None:
        """Remember the digest next to the tar, so a cached layer is never re-hashed."""
        self._digest_file.write_text(f"{self.digest} {self.size}\n")

    @classmethod
    def from_cached(cls, path: Path) -> Layer:
        """A cached layer: digest from its sidecar file when the size still matches."""
        side = path.with_name(path.name + ".digest")
        try:
            digest, size = side.read_text().split()
            if int(size) == path.stat().st_size and digest.startswith("sha256:"):
                return cls(path=path, digest=digest, size=int(size))
        except (OSError, ValueError):
            pass
        layer = cls.from_tar(path)
        layer.save_digest()
        return layer


class LayerWriter:
    """Writes one deterministic layer tar.

    Entries are owned by root with mtime 0 and no user/group names, so a layer's
    digest depends on file contents and modes only.  Parent directories are
    added automatically (mode 0755) unless added explicitly first.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(path.name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.GNU_FORMAT)
        self._seen: set[str] = set()
        #: the finished layer, once closed
        self.layer: Layer | None = None

    # ------------------------------------------------------------ context use
    def __enter__(self) -> LayerWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)

    def close(self) -> Layer:
        self._tar.close()
        os.replace(self._tmp, self.path)
        layer = Layer.from_tar(self.path)
        layer.save_digest()
        self.layer = layer
        return layer

    # ----------------------------------------------------------------- entries
    @staticmethod
    def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self._seen:
                self.add_dir(d)

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        name = name.strip("/")
        if name in self._seen:
            return
        self._parents(name)
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE
        info.mode = mode
        self._tar.addfile(self._normalise(info))
        self._seen.add(name)

    def add_bytes(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self._parents(name)
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = mode
        self._tar.addfile(self._normalise(info), io.BytesIO(data))
        self._seen.add(name)

    def add_file(self, name: str, src: Path, mode: int | None = None) -> None:
        """Copy a host file into the layer (mode from the source unless given)."""
        name = name.strip("/")
        self._parents(name)
        st = src.stat()
        info = tarfile.TarInfo(name)
        info.size = st.st_size
        info.mode = stat.S_IMODE(st.st_mode) if mode is None else mode
        with open(src, "rb") as f:
            self._tar.addfile(self._normalise(info), f)
        self._seen.add(name)

    def add_tree(
        self,
        root: Path,
        prefix: str = "",
        skip: Callable[[str], bool] | None = None,
    ) -> None:
        """Add everything under `root` as `prefix/...`, in sorted order.

        Keeps modes, symlinks and hard links (within this tree); skips device
        nodes, sockets and FIFOs, and the contents of /dev, /proc and /sys.
        `skip(relpath)` returning True drops a path (and, for a directory, all
        below it).
        """
        prefix = prefix.strip("/")
        for rel in _walk_sorted(root, skip):
            src = root / rel if rel else root
            name = f"{prefix}/{rel}".strip("/") if rel else prefix
            if not name:
                continue  # the root itself when there is no prefix
            info = self._tar.gettarinfo(str(src), arcname=name)
            if info is None or not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
                continue  # sockets, devices, FIFOs
            self._parents(name)
            self._normalise(info)
            if info.isreg():
                with open(src, "rb") as f:
                    self._tar.addfile(info, f)
            else:
                self._tar.addfile(info)
            self._seen.add(name)


def _walk_sorted(root: Path, skip: Callable[[str], bool] | None, rel: str = "") -> Iterator[str]:
    """Relative paths under root in sorted depth-first order ('' is the root).

    The top-level /dev, /proc and /sys are listed but never descended into.
    """
    if not rel:
        yield ""
    d = root / rel if rel else root
    try:
        names = sorted(os.listdir(d))
    except OSError as exc:
        raise DevClusterError(f"cannot read {d}", str(exc)) from None
    for n in names:
        child = f"{rel}/{n}" if rel else n
        if skip is not None and skip(child):
            continue
        yield child
        if not rel and n in PSEUDO_DIRS:
            continue
        p = root / child
        if p.is_dir() and not p.is_symlink():
            yield from _walk_sorted(root, skip, child)


# ------------------------------------------------------------------- images
def image_config(
    layers: list[Layer],
    entrypoint: list[str],
    cmd: list[str] | None = None,
    env: dict[str, str] | None = None,
    workdir: str = "/",
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An OCI/Docker image config for linux/amd64 with a fixed creation time."""
    env_list = [f"{k}={v}" for k, v in (env or {}).items()]
    if not any(e.startswith("PATH=") for e in env_list):
        env_list.insert(0, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    cfg: dict[str, Any] = {"Env": env_list, "Entrypoint": entrypoint, "WorkingDir": workdir}
    if cmd:
        cfg["Cmd"] = cmd
    if labels:
        cfg["Labels"] = dict(sorted(labels.items()))
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "tpnb devcluster"}
                    for _ in layers],
    }


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_docker_archive(out: Path, tag: str, layers: list[Layer], config: dict[str, Any]) -> str:
    """Write a docker-archive tarball for one tagged image; returns the image ID.

    Layout (as `docker save`): `<config hex>.json`, `<layer hex>/layer.tar`,
    `manifest.json` and `repositories`.  Written to a temporary name and
    renamed, so a reader never sees a half-written archive.
    """
    if config["rootfs"]["diff_ids"] != [layer.digest for layer in layers]:
        raise DevClusterError("image config does not match its layers", f"building {tag}")
    cfg_bytes = _canonical(config)
    cfg_hex = hashlib.sha256(cfg_bytes).hexdigest()
    repo, _, version = tag.rpartition(":")
    if not repo or "/" in version:
        raise DevClusterError(f"image tag {tag!r} has no version", hint="use name:version")
    layer_names = [f"{layer.digest.split(':', 1)[1]}/layer.tar" for layer in layers]
    manifest = [{"Config": f"{cfg_hex}.json", "RepoTags": [tag], "Layers": layer_names}]
    last_layer = layer_names[-1].split("/")[0] if layer_names else ""
    repositories = {repo: {version: last_layer}}

    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tf:
        def add(name: str, data: bytes) -> None:
            info = LayerWriter._normalise(tarfile.TarInfo(name))
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))

        add(f"{cfg_hex}.json", cfg_bytes)
        written: set[str] = set()
        for layer, name in zip(layers, layer_names):
            if name in written:
                continue  # an identical layer twice: one copy is enough
            written.add(name)
            d = LayerWriter._normalise(tarfile.TarInfo(name.split("/")[0]))
            d.type, d.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(d)
            info = LayerWriter._normalise(tarfile.TarInfo(name))
            info.size, info.mode = layer.size, 0o644
            with open(layer.path, "rb") as f:
                tf.addfile(info, f)
        add("manifest.json", _canonical(manifest))
        add("repositories", _canonical(repositories))
    os.replace(tmp, out)
    return "sha256:" + cfg_hex


def read_docker_archive(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(manifest.json, config) of an archive: for tests and `tpnb` diagnostics."""
    with tarfile.open(path) as tf:
        mf = tf.extractfile("manifest.json")
        assert mf is not None
        manifest = json.load(mf)
        cf = tf.extractfile(manifest[0]["Config"])
        assert cf is not None
        config = json.load(cf)
    return manifest, config
