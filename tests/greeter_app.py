"""greeter.Greeter with streaming methods, server and client; grpcio and protobuf only.

The HTTP/2 intercept tests run it as the cluster's app (piped into the tpnb image's python3 with
`-c`, as notebooks/grpc_calls.py is), as each laptop's servicer (`tpnb intercept ... -- python3
greeter_app.py --serve PORT TAG`), and as the client in a pod.  Same service and messages as
notebooks/greeter_grpc.py (protobuf's StringValue, so no generated module), plus three streaming
methods: every answer names the server that gave it ("... from TAG").

    python3 greeter_app.py --serve PORT TAG
    python3 greeter_app.py --check TARGET HEADER WANT[,WANT...]   one JSON line (see check())
"""
import json
import sys
import threading
import time
from concurrent import futures

import grpc
from google.protobuf.wrappers_pb2 import StringValue

SERVICE = "greeter.Greeter"
_S = dict(request_deserializer=StringValue.FromString, response_serializer=StringValue.SerializeToString)
_C = dict(request_serializer=StringValue.SerializeToString, response_deserializer=StringValue.FromString)


class Servicer:
    """Unary, server-, client- and bidi-streaming; `cancelled` counts calls their client cancelled."""

    def __init__(self, tag):
        self.tag = tag
        self.cancelled = 0
        self._lock = threading.Lock()

    def _watch(self, context):
        def gone():
            if not context.is_active() and context.code() is None:
                with self._lock:
                    self.cancelled += 1
        context.add_callback(gone)

    def SayHello(self, request, context):  # noqa: N802 - gRPC method names
        if request.value == "fail":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no such name (from {self.tag})")
        return StringValue(value=f"hello {request.value} from {self.tag}")

    def SayHellos(self, request, context):  # noqa: N802 - server streaming: "NAME*N" -> N answers
        self._watch(context)
        name, _, n = request.value.partition("*")
        for i in range(int(n or 1)):
            if not context.is_active():
                return
            yield StringValue(value=f"hello {name} #{i} from {self.tag}")

    def Collect(self, request_iterator, context):  # noqa: N802 - client streaming: sizes and count
        count = size = 0
        for msg in request_iterator:
            count += 1
            size += len(msg.value)
        context.set_trailing_metadata((("x-count", str(count)),))
        return StringValue(value=f"{count} messages, {size} bytes to {self.tag}")

    def Chat(self, request_iterator, context):  # noqa: N802 - bidi: one answer per message, at once
        self._watch(context)
        for msg in request_iterator:
            yield StringValue(value=f"{msg.value} from {self.tag}")


def add_to_server(servicer, server):
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "SayHello": grpc.unary_unary_rpc_method_handler(servicer.SayHello, **_S),
        "SayHellos": grpc.unary_stream_rpc_method_handler(servicer.SayHellos, **_S),
        "Collect": grpc.stream_unary_rpc_method_handler(servicer.Collect, **_S),
        "Chat": grpc.stream_stream_rpc_method_handler(servicer.Chat, **_S),
    }),))


def serve(port, tag, host="0.0.0.0", options=()):
    """A started grpc.server (and its servicer) on host:port."""
    servicer = Servicer(tag)
    server = grpc.server(futures.ThreadPoolExecutor(32),
                         options=[("grpc.max_receive_message_length", 16 << 20), *options])
    add_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, servicer, bound


class Stub:
    def __init__(self, channel):
        self.SayHello = channel.unary_unary(f"/{SERVICE}/SayHello", **_C)
        self.SayHellos = channel.unary_stream(f"/{SERVICE}/SayHellos", **_C)
        self.Collect = channel.stream_unary(f"/{SERVICE}/Collect", **_C)
        self.Chat = channel.stream_stream(f"/{SERVICE}/Chat", **_C)


def check(target, header, wants, calls=300):
    """Everything the tests ask through one channel (ONE HTTP/2 connection): for each value in
    `wants` ("" = no header; "NAME=TAG" expects answers from TAG), unary, streaming both ways and
    bidi calls; then `calls` unary calls mixing them, all in flight at once.  One dict of results."""
    plan = []
    for w in wants:
        value, _, tag = w.partition("=")
        plan.append(((((header, value),) if value else ()), tag))
    out = {"bad": [], "n": 0, "streams": {}}
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 16 << 20)]) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        stub = Stub(ch)
        for md, tag in plan:
            name = md[0][1] if md else "none"
            got = {
                "unary": stub.SayHello(StringValue(value=name), metadata=md, timeout=20).value,
                "server": [m.value for m in stub.SayHellos(StringValue(value=f"{name}*5"), metadata=md, timeout=20)],
                "client": stub.Collect(iter([StringValue(value="x" * 65536)] * 64), metadata=md, timeout=60).value,
                "bidi": [m.value for m in stub.Chat(iter([StringValue(value=f"{name}-{i}") for i in range(20)]),
                                                     metadata=md, timeout=20)],
            }
            try:
                stub.SayHello(StringValue(value="fail"), metadata=md, timeout=20)
                got["error"] = "no error"
            except grpc.RpcError as exc:
                got["error"] = f"{exc.code().name}: {exc.details()}"
            out["streams"][name] = got
        t0 = time.monotonic()
        futs = []
        for i in range(calls):
            md, tag = plan[i % len(plan)]
            futs.append((tag, i, stub.SayHello.future(StringValue(value=f"c{i}"), metadata=md, timeout=60)))
        for tag, i, fut in futs:
            try:
                text = fut.result().value
            except grpc.RpcError as exc:
                text = f"{exc.code().name}: {exc.details()}"
            out["n"] += 1
            if text != f"hello c{i} from {tag}":
                out["bad"].append([tag, text[:120]])
        out["seconds"] = round(time.monotonic() - t0, 3)
    out["nbad"] = len(out["bad"])
    out["bad"] = out["bad"][:5]
    return out


def main(argv):
    if argv[0] == "--serve":
        server, _, _ = serve(int(argv[1]), argv[2])
        print(f"serving {SERVICE} on :{argv[1]} as {argv[2]}", flush=True)
        server.wait_for_termination()
        return 0
    if argv[0] == "--check":
        print(json.dumps(check(argv[1], argv[2], argv[3].split(","))), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
