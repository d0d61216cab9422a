"""Protocol buffers of `cosy grpc`: ``cosyvoice.proto`` (the official CosyVoice runtime's service, wire-compatible)
and ``cosy_status.proto`` (cosy's status call), with their generated ``*_pb2`` / ``*_pb2_grpc`` modules.

The generated modules are committed (scripts/gen-grpc.sh regenerates them) so that running the gateway needs only
the ``grpc`` extra: grpcio, protobuf and grpcio-health-checking.
"""
