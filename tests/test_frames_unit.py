"""Wire-level shortcuts for tunnel data frames (cluster/forward.py): they must be
byte-for-byte what protobuf would produce and read, or the two ends disagree."""
from __future__ import annotations

import os

import grpc
import pytest

from tpnb.common.forward import DataView, FastTunnelRegistration, decode_frame, encode_data, encode_frame
from tpnb.proto import pb

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 256 * 1024, 1024 * 1024 + 3])
def test_data_frames_match_protobuf(n: int) -> None:
    payload = os.urandom(n)
    raw = encode_data(payload)
    assert raw == pb.TunnelFrame(data=payload).SerializeToString()
    frame = decode_frame(raw)
    assert isinstance(frame, DataView) and frame.WhichOneof("kind") == "data"
    assert bytes(frame.data) == payload
    assert encode_frame(frame) == raw  # a relayed view is framed again identically
    assert pb.TunnelFrame.FromString(raw).data == payload


def test_other_frames_go_through_protobuf() -> None:
    for frame in (pb.TunnelFrame(eof=pb.Empty()), pb.TunnelFrame(error="dial failed"),
                  pb.TunnelFrame(opened=pb.Empty()),
                  pb.TunnelFrame(open=pb.TunnelOpen(session_id="s", dst_port=80, dst_ip=b"\x0a\x00\x00\x01"))):
        raw = encode_frame(frame)
        assert raw == frame.SerializeToString()
        assert decode_frame(raw) == frame
    assert encode_frame(b"\x12\x01x") == b"\x12\x01x"  # pre-encoded bytes pass through


def test_registration_swaps_only_the_tunnel_method() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.generic: list[object] = []
            self.registered: dict[str, object] = {}

        def add_generic_rpc_handlers(self, handlers: object) -> None:
            self.generic.append(handlers)

        def add_registered_method_handlers(self, service: str, handlers: dict[str, object]) -> None:
            self.registered = handlers

    from tpnb.proto import rpc

    rec = Recorder()
    rpc.add_ManagerServicer_to_server(rpc.ManagerServicer(), FastTunnelRegistration(rec))
    tunnel = rec.registered["Tunnel"]
    assert isinstance(tunnel, grpc.RpcMethodHandler)
    assert tunnel.request_deserializer is decode_frame and tunnel.response_serializer is encode_frame
    version = rec.registered["Version"]
    assert version.request_deserializer == pb.Empty.FromString  # type: ignore[attr-defined]
    assert len(rec.generic) == 1
