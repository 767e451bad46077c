"""A grpcio client (and server) for greeter.Greeter; grpcio and protobuf only, so it can be piped into a pod.

    python3 grpc_calls.py TARGET [NAME]          one call, prints the answer
    python3 grpc_calls.py TARGET --loop SECONDS  calls for SECONDS, then prints one JSON line:
                                                 {"answered": N, "failed": N, "versions": [...], "errors": [...]}
    python3 grpc_calls.py --serve PORT           the cluster's own Greeter ("hello NAME from the cluster")
"""
import json
import sys
import time
from concurrent import futures

import grpc
from google.protobuf.wrappers_pb2 import StringValue

METHOD = "/greeter.Greeter/SayHello"


def call(channel, name):
    say = channel.unary_unary(METHOD, request_serializer=StringValue.SerializeToString,
                              response_deserializer=StringValue.FromString)
    return say(StringValue(value=name), timeout=10, wait_for_ready=True).value


def serve(port):
    def say_hello(request, context):
        return StringValue(value=f"hello {request.value} from the cluster")

    server = grpc.server(futures.ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "greeter.Greeter", {"SayHello": grpc.unary_unary_rpc_method_handler(
            say_hello, request_deserializer=StringValue.FromString,
            response_serializer=StringValue.SerializeToString)}),))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    print(f"serving greeter.Greeter on :{port}", flush=True)
    server.wait_for_termination()


def main(argv):
    if argv[0] == "--serve":
        return serve(int(argv[1]))
    target = argv[0]
    with grpc.insecure_channel(target) as ch:
        if "--loop" not in argv:
            print(call(ch, argv[1] if len(argv) > 1 else "caller"))
            return 0
        until = time.monotonic() + float(argv[argv.index("--loop") + 1])
        answered, failed, versions, errors = 0, 0, [], []
        while time.monotonic() < until:
            try:
                answer = call(ch, "loop")
                answered += 1
                v = answer.rsplit(" ", 1)[-1]
                if v not in versions:
                    versions.append(v)
            except grpc.RpcError as exc:
                failed += 1
                errors.append(f"{exc.code().name}: {exc.details()}"[:200])
            time.sleep(0.02)
        print(json.dumps({"answered": answered, "failed": failed, "versions": versions, "errors": errors[:5]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
