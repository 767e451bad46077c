"""Which cluster image this client expects.

The traffic-manager and traffic-agent run the project's own image.  Its tag
carries a hash of the source files that go into it, so a client built from
changed sources installs (and the dev cluster builds) a matching image, and a
manager running other code is recognised as "different version" and upgraded.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .version import __version__

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE_REPO = "tpnb.local/tpnb"


def image_sources() -> list[tuple[str, Path]]:
    """(path inside /opt/tpnb, source file) for every file of the app layer."""
    pkg = Path(__file__).resolve().parent
    out: list[tuple[str, Path]] = []
    for name in ("__init__.py", "version.py", "errors.py", "config.py", "imageref.py"):
        out.append((f"tpnb/{name}", pkg / name))
    for p in sorted((pkg / "proto").iterdir()):
        if p.suffix in (".py", ".proto", ".pyi") and p.is_file():
            out.append((f"tpnb/proto/{p.name}", p))
    import tpnb.cluster as cluster_pkg

    cdir = Path(cluster_pkg.__file__).resolve().parent
    for p in sorted(cdir.rglob("*.py")):
        out.append((f"tpnb/cluster/{p.relative_to(cdir)}", p))
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
