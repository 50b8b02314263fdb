"""gRPC server reflection on every service, listing exactly the services its server serves.

Stock tools then work without the .proto files: `grpcurl -plaintext HOST:PORT list`,
`grpcurl -plaintext -d '{"text": "hi"}' HOST:PORT epserve.v1.Inference/Tokenize`. The names
are learnt as a service's hook registers its servicers (`ServiceNames` stands in for the server
while it does), so no service lists a name twice or one it does not serve.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class ServiceNames:
    """A grpc.aio.Server as `add_XServicer_to_server` sees it, noting each service's name.

    The generated `add_...Servicer_to_server` functions register through
    `add_generic_rpc_handlers` (handlers that know their service name) and
    `add_registered_method_handlers(name, ...)`; everything else goes to the server as is.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server
        self.names: list[str] = []

    def _note(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)

    def add_generic_rpc_handlers(self, handlers) -> None:
        for handler in handlers:
            if hasattr(handler, "service_name"):
                self._note(handler.service_name())
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, handlers) -> None:
        self._note(service_name)
        self._server.add_registered_method_handlers(service_name, handlers)

    def __getattr__(self, name: str):
        return getattr(self._server, name)


def add_reflection(server: grpc.aio.Server, service_names: list[str] | tuple[str, ...]
                   ) -> tuple[str, ...]:
    """Reflection for `service_names`, health and reflection itself; the names listed."""
    names = tuple(dict.fromkeys((*service_names, HEALTH_SERVICE, reflection.SERVICE_NAME)))
    reflection.enable_server_reflection(names, server)
    return names
