"""The shared protocol.  `from tpnb.proto import pb, rpc` gives the messages and stubs.

In a development checkout the stubs are regenerated when tpnb.proto is newer
than them (grpc_tools present); in an installed package or image they are
shipped pre-generated.
"""
from __future__ import annotations

from . import build as _build

if _build.stale():
    try:
        _build.generate()
    except ImportError as exc:  # pragma: no cover - only without grpc_tools
        raise ImportError(
            "tpnb's gRPC stubs are missing and grpcio-tools is not installed; "
            "run `pip install grpcio-tools && python -m tpnb.proto.build`"
        ) from exc

from . import tpnb_pb2 as pb  # noqa: E402
from . import tpnb_pb2_grpc as rpc  # noqa: E402

__all__ = ["pb", "rpc"]
