"""Where an Execute's time goes through each transport, with the server's own
timings: unary, stream and shared memory at a few sizes (on CUDA also from a CUDA
tensor, by CUDA IPC handle), on a server this starts.
Usage: python scripts/profile_shm.py [cpu|cuda] [sizes in MiB, e.g. 1,16,256]"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from fuseport.bench.context import fuseport_server
from fuseport.client import Client


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    sizes = [int(s) << 20 for s in (sys.argv[2] if len(sys.argv) > 2 else "1,16,256").split(",")]
    with fuseport_server(device) as (target, _pid):
        clients = {
            "unary": Client(target, timeout=300, stream_above=None, shared_memory=False),
            "stream": Client(target, timeout=300, stream_above=0, shared_memory=False),
            "shm": Client(target, timeout=300, shared_above=0),
        }
        key = clients["unary"].register(lambda x: x + 0, [torch.zeros(16, dtype=torch.uint8)])
        for size in sizes:
            x = torch.full((size,), 7, dtype=torch.uint8)
            runs = [(name, c, x) for name, c in clients.items()]
            if device == "cuda":  # the client's tensor on the GPU: by CUDA IPC handle
                runs.append(("cuda", clients["shm"], x.cuda()))
            for name, c, x in runs:
                c.execute(key, [x], wait=True)
                rows = []
                for _ in range(5 if size > 64 << 20 else 12):
                    t0 = time.perf_counter()
                    r = c.execute_detailed(key, [x])
                    rows.append((time.perf_counter() - t0, r.timings, r.transport, r.path))
                med = statistics.median(t for t, *_ in rows)
                t = min(rows, key=lambda row: abs(row[0] - med))[1]
                print(
                    f"{size >> 20:>4} MiB {name:>6} ({rows[0][2]}, {rows[0][3]}): {med * 1e3:8.2f} ms; server "
                    f"decode {t.decode_us / 1e3:.2f} queue {t.queue_us / 1e3:.2f} run {t.run_us / 1e3:.2f} "
                    f"encode {t.encode_us / 1e3:.2f} ms",
                    flush=True,
                )
        for c in clients.values():
            c.close()


if __name__ == "__main__":
    main()
