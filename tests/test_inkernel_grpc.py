"""gRPC servicers served in the kernel (tpnb.inkernel.serve_grpc): a real grpc.aio server on the in-kernel
loop thread and real grpcio clients, 127.0.0.1 only."""
from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf.wrappers_pb2 import StringValue

from tpnb import inkernel
from tpnb.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "notebooks"))
import greeter_grpc  # noqa: E402  (the notebook's Greeter service module)

pytestmark = pytest.mark.unit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def port():
    p = free_port()
    yield p
    inkernel.stop(p, grace=0)


def greeter(tag: str, delay: float = 0.0, is_async: bool = False):
    if is_async:
        class AsyncGreeter(greeter_grpc.GreeterServicer):
            async def SayHello(self, request, context):  # noqa: N802
                if request.value == "fail":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no such name")
                await asyncio.sleep(delay)
                return StringValue(value=f"hello {request.value} from {tag}")
        return AsyncGreeter()

    class Greeter(greeter_grpc.GreeterServicer):
        def SayHello(self, request, context):  # noqa: N802
            if request.value == "fail":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no such name")
            time.sleep(delay)
            return StringValue(value=f"hello {request.value} from {tag}")
    return Greeter()


def say(ch: grpc.Channel, name: str) -> str:
    return greeter_grpc.GreeterStub(ch).SayHello(StringValue(value=name), timeout=10).value


def test_registrations_follow_the_generated_convention() -> None:
    g = greeter("x")
    assert inkernel.grpc_registrations(g) == [(g, greeter_grpc.add_GreeterServicer_to_server)]
    assert inkernel.grpc_registrations((g, greeter_grpc.add_GreeterServicer_to_server))
    assert inkernel.grpc_registrations(lambda environ, start_response: []) == []  # a WSGI app
    assert inkernel.grpc_registrations(object()) == []


@pytest.mark.parametrize("is_async", [False, True])
def test_servicer_answers_records_and_status(port, is_async) -> None:
    srv = inkernel.serve_grpc(greeter("v1", is_async=is_async), port, name="greeter")
    assert srv.kind == "grpc" and srv.app_version == 1
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        assert say(ch, "ann") == "hello ann from v1"
        with pytest.raises(grpc.RpcError) as err:
            say(ch, "fail")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err2:
            ch.unary_unary("/greeter.Greeter/Nope")(b"", timeout=5)
        assert err2.value.code() == grpc.StatusCode.UNIMPLEMENTED
    deadline = time.monotonic() + 5
    while len(inkernel.requests_log("greeter")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    recs = inkernel.requests_log("greeter")
    assert [(r["type"], r["path"], r["grpc_status"], r["status"]) for r in recs] == [
        ("grpc", "/greeter.Greeter/SayHello", "OK", 200),
        ("grpc", "/greeter.Greeter/SayHello", "INVALID_ARGUMENT", 400)]
    assert recs[1]["error"] and "no such name" in recs[1]["error"]
    assert srv.summary()["requests"] == 2 and srv.summary()["4xx"] == 1


def test_swap_under_load_fails_no_call(port) -> None:
    inkernel.serve_grpc(greeter("v1", delay=0.01), port)
    stop = threading.Event()
    results: list[str] = []
    errors: list[str] = []

    def caller() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            while not stop.is_set():
                try:
                    results.append(say(ch, "x").rsplit(" ", 1)[-1])
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code()}: {exc.details()}")

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    for v in ("v2", "v3"):
        srv = inkernel.serve_grpc(greeter(v, delay=0.01, is_async=v == "v3"), port)
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors[:5]
    assert {"v1", "v2", "v3"} <= set(results) and results[-1] == "v3", set(results)
    assert srv.app_version == 3


def test_inflight_call_finishes_on_its_servicer(port) -> None:
    inkernel.serve_grpc(greeter("slow-v1", delay=1.0), port)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        fut = greeter_grpc.GreeterStub(ch).SayHello.future(StringValue(value="a"), timeout=10)
        time.sleep(0.3)
        inkernel.serve_grpc(greeter("v2"), port)
        assert say(ch, "b") == "hello b from v2"
        assert fut.result().value == "hello a from slow-v1"


def test_busy_port_and_mixed_kinds_are_clear_errors(port) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        with pytest.raises(ConfigError, match="already in use"):
            inkernel.serve_grpc(greeter("v1"), port)
    inkernel.serve_grpc(greeter("v1"), port)
    with pytest.raises(ConfigError, match="serves a gRPC servicer"):
        inkernel.serve(lambda e, s: [], port)
    with pytest.raises(ConfigError, match="not a gRPC servicer"):
        inkernel.serve_grpc(object(), port)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:  # the failed swap left v1 serving
        assert say(ch, "c") == "hello c from v1"
    # and the other way round: a web app holds the port, a servicer is refused, the app keeps serving
    assert inkernel.stop(port, grace=0)

    def web(environ, start_response):  # noqa: ANN001, ANN202
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"web"]

    inkernel.serve(web, port)
    with pytest.raises(ConfigError, match="serves a web app"):
        inkernel.serve_grpc(greeter("v1"), port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        assert r.read() == b"web"


def test_stop_closes_the_port(port) -> None:
    inkernel.serve_grpc(greeter("v1"), port)
    assert inkernel.stop(port, grace=0)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
