"""Generated protobuf and gRPC modules of the KServe v2 inference protocol (package `inference`); imported by the server only."""
