"""The gRPC adapters: each servicer translates between its protocol's messages and the core, nothing else.

    plumbing.py   one call's life for every servicer: deadline, worker threads or
                  the event loop, the metrics observer, error to status, trailing metadata
    service.py    fuseport.v1.KernelService (unary and streamed Execute/Fallback, ...)
    kserve.py     the KServe v2 / Triton inference protocol, on the same core
    gate.py       in front of both: tokens, roles, drain, calls in flight

Named `rpc`, not `grpc`, so that `import grpc` in here is the library.
"""
