"""User-facing errors across the daemon's gRPC boundary.

The daemon aborts an RPC with the error's class name, what, why and hint in
the status details (JSON); the client turns it back into the same exception
class.  So the CLI, the magics and the widgets all show the same words.
"""
from __future__ import annotations

import json

import grpc

from tpnb import errors

_CODES: dict[type[errors.TpnbError], grpc.StatusCode] = {
    errors.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.PrerequisiteError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ClusterError: grpc.StatusCode.UNAVAILABLE,
    errors.NotConnected: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DaemonError: grpc.StatusCode.INTERNAL,
    errors.InterceptError: grpc.StatusCode.FAILED_PRECONDITION,
}


def encode(err: errors.TpnbError) -> tuple[grpc.StatusCode, str]:
    code = grpc.StatusCode.UNKNOWN
    for cls in type(err).__mro__:
        if cls in _CODES:
            code = _CODES[cls]
            break
    details = json.dumps({"type": type(err).__name__, "what": err.what, "why": err.why, "hint": err.hint})
    return code, details


def decode(code: grpc.StatusCode, details: str | None) -> errors.TpnbError:
    try:
        data = json.loads(details or "")
        cls = getattr(errors, data["type"])
        if isinstance(cls, type) and issubclass(cls, errors.TpnbError):
            return cls(data.get("what", ""), data.get("why", ""), data.get("hint", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    if code == grpc.StatusCode.UNAVAILABLE:
        return errors.DaemonError("the tpnb daemon is not reachable", details or "",
                                  "run `tpnb connect` to start it; see ~/.cache/tpnb/logs/daemon.log")
    return errors.DaemonError("the tpnb daemon failed", details or code.name,
                              "see ~/.cache/tpnb/logs/connector.log and daemon.log")
