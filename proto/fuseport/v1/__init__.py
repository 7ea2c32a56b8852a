"""Generated protobuf and gRPC modules for fuseport.v1 (see the .proto files here)."""
