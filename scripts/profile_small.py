"""Where the server's time goes on a small Execute, in process (no gRPC): decode,
each step of Core.execute, encode. Usage: python scripts/profile_small.py [cpu|cuda]"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import tempfile
import time

import torch

from fuseport.server.core import Core
from fuseport.server.executor import _Run
from fuseport.server.settings import Settings
from fuseport.wire import _pb, codec
from fuseport.wire.capture import capture


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        # FUSEPORT_CUDA_STAGING_BYTES: the small-tensor staging's size, as the server reads it (0: off).
        staging = int(os.environ.get("FUSEPORT_CUDA_STAGING_BYTES", 0))
        core = Core(Settings(device=device, store_dir=tmp, cuda_staging_bytes=staging))
        key, _, _ = core.register(capture(lambda x: x + 0, [torch.zeros(256)]))
        x = torch.randn(256)
        request = codec.encode_execute_request(key, [x])
        req = codec.decode_execute_request(request)
        core.execute(key, req.stack, wait=True)
        n = 2000

        def timeit(label, fn):
            for _ in range(50):
                fn()
            start = time.perf_counter_ns()
            for _ in range(n):
                fn()
            print(f"{label:>28}: {(time.perf_counter_ns() - start) / n / 1000:8.1f} us")

        timeit("decode", lambda: codec.decode_execute_request(request))
        timeit("core.execute", lambda: core.execute(key, req.stack))
        # As between real calls: the device idled meanwhile (the sleep is subtracted).
        nap = 500e-6
        timeit("core.execute after a nap", lambda: (time.sleep(nap), core.execute(key, req.stack)))
        timeit("  the nap alone", lambda: time.sleep(nap))
        res = core.execute(key, req.stack)
        t = _pb.service.Timings()
        timeit("encode", lambda: codec.encode_execute_response(res.stack, res.path, 0, "", t, clock=time.perf_counter_ns))
        variant = core.registry.get(key).variants[0]
        args = core.placement.to_device(req.stack)
        timeit("plan (cached)", lambda: variant.planner.plan(req.stack))
        entry = core.executor._entry(_Run(key, variant), args)
        timeit("to_device", lambda: core.placement.to_device(req.stack))
        timeit("fused fn only", lambda: entry.compiled.call(args))
        timeit("fallback gm only", lambda: variant.fallback(*args))
        timeit("executor.run", lambda: core.executor.run(key, variant, args, fused=True))
        out = entry.compiled.call(args)

        def back():
            with core.placement.request_scope():
                core.placement.to_host(list(out))
                core.placement.synchronize()

        timeit("scope+to_host+sync", back)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            r = codec.decode_execute_request(request)
            res = core.execute(key, r.stack)
            codec.encode_execute_response(res.stack, res.path, 0, "", t, clock=time.perf_counter_ns)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        core.close()


if __name__ == "__main__":
    main()
