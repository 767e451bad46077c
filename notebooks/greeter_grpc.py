"""greeter.Greeter: what `python -m grpc_tools.protoc --grpc_python_out` writes for

    service Greeter { rpc SayHello (google.protobuf.StringValue) returns (google.protobuf.StringValue); }

written out by hand (the messages are protobuf's well-known StringValue, so no generated _pb2 module
is needed and the same code runs in the cluster's image).  The notebook's cell subclasses
`GreeterServicer`; `%%tp intercept` finds `add_GreeterServicer_to_server` next to it.
"""
import grpc
from google.protobuf.wrappers_pb2 import StringValue

SERVICE = "greeter.Greeter"


class GreeterStub:
    def __init__(self, channel: grpc.Channel) -> None:
        self.SayHello = channel.unary_unary(f"/{SERVICE}/SayHello", request_serializer=StringValue.SerializeToString,
                                            response_deserializer=StringValue.FromString)


class GreeterServicer:
    def SayHello(self, request, context):  # noqa: N802 - gRPC method names
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("Method not implemented!")
        raise NotImplementedError("Method not implemented!")


def add_GreeterServicer_to_server(servicer, server) -> None:  # noqa: N802 - the generated name
    rpc_method_handlers = {
        "SayHello": grpc.unary_unary_rpc_method_handler(servicer.SayHello,
                                                        request_deserializer=StringValue.FromString,
                                                        response_serializer=StringValue.SerializeToString),
    }
    generic_handler = grpc.method_handlers_generic_handler(SERVICE, rpc_method_handlers)
    server.add_generic_rpc_handlers((generic_handler,))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE, rpc_method_handlers)
