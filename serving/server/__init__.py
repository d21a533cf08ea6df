"""The inference server: configuration, start-up and drain (app), worker processes (workers), the gRPC
servicer, the data plane, dynamic batching, the protobuf codec, metrics, the model repository.

Imports only downward, to serving.protocol, serving.devices, serving.runtime and serving.lifetime: never
the command layer (serving.cli) or the client.
"""

from serving.server.app import RunningServer, ServerConfig, start_server

__all__ = ["RunningServer", "ServerConfig", "start_server"]
