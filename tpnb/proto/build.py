"""Generate the gRPC stubs from tpnb.proto.

Stubs are build products, never committed: `python -m tpnb.proto.build` (run
by the installer) writes tpnb_pb2.py, tpnb_pb2_grpc.py and tpnb_pb2.pyi next
to the .proto.  Generation uses grpc_tools, a development dependency.
"""
from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO = PROTO_DIR / "tpnb.proto"
OUTPUTS = [PROTO_DIR / "tpnb_pb2.py", PROTO_DIR / "tpnb_pb2_grpc.py", PROTO_DIR / "tpnb_pb2.pyi"]


def stale() -> bool:
    """True when a stub is missing or older than the .proto."""
    src = PROTO.stat().st_mtime
    return any(not p.exists() or p.stat().st_mtime < src for p in OUTPUTS)


def generate() -> None:
    from grpc_tools import protoc  # type: ignore[import-untyped]
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    root = PROTO_DIR.parent.parent  # so generated imports read `from tpnb.proto import ...`
    rc = protoc.main([
        "protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={root}",
        f"--pyi_out={root}",
        f"--grpc_python_out={root}",
        str(PROTO.relative_to(root)),
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit status {rc}")


if __name__ == "__main__":
    generate()
    print("generated:", ", ".join(p.name for p in OUTPUTS), file=sys.stderr)
