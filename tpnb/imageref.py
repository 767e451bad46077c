"""Which cluster image this client expects.

The traffic-manager and traffic-agent run the project's own image.  Its tag
carries a hash of the source files that go into it, so a client built from
changed sources installs (and the dev cluster builds) a matching image, and a
manager running other code is recognised as "different version" and upgraded.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from .version import __version__

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE_REPO = "tpnb.local/tpnb"


#: tpnb's own top-level modules the cluster processes import (the rest of tpnb/ is the client's)
LIGHT_MODULES = ("__init__.py", "version.py", "errors.py", "config.py", "imageref.py")
#: packages whose whole folder goes into the image, with the file suffixes taken from it;
#: one that does not exist (yet) is left out
IMAGE_PACKAGES: dict[str, tuple[str, ...]] = {
    "tpnb.proto": (".py", ".proto", ".pyi"),
    "tpnb.cluster": (".py",),
    "tpnb.common": (".py",),
}


def package_dir(name: str) -> Path | None:
    """Where package `name` lives (its folder may be mapped, e.g. cluster/ for tpnb.cluster); None if absent."""
    spec = importlib.util.find_spec(name)  # locates it without running its __init__
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    return Path(str(spec.origin)).resolve().parent


def image_sources() -> list[tuple[str, Path]]:
    """(path inside /opt/tpnb, source file) for every file of the app layer."""
    pkg = Path(__file__).resolve().parent
    out: list[tuple[str, Path]] = [(f"tpnb/{name}", pkg / name) for name in LIGHT_MODULES]
    for name, suffixes in IMAGE_PACKAGES.items():
        folder = package_dir(name)
        if folder is None:
            continue
        prefix = name.replace(".", "/")
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder)
            if p.suffix in suffixes and p.is_file() and "__pycache__" not in rel.parts:
                out.append((f"{prefix}/{rel.as_posix()}", p))
    return out


def source_hash() -> str:
    h = hashlib.sha256()
    for rel, path in image_sources():
        if rel.endswith("_pb2.py") or rel.endswith("_pb2_grpc.py") or rel.endswith(".pyi"):
            continue  # generated from tpnb.proto, which is hashed
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:10]


def default_image() -> str:
    return f"{IMAGE_REPO}:{__version__}-{source_hash()}"
