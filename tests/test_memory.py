"""Host memory kept for reuse is bounded: after a 960 MiB output the server's resident
memory is back within --keep-host-memory-bytes of where it was."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fuseport.client import Client

from .conftest import start_server

BUDGET = 256 << 20
ROW = 1024  # float32s: 4 KiB a row



def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.expand(n, ROW) * 1.0


def test_memory_after_a_960_mib_output_returns_to_within_the_reuse_budget(tmp_path: Path) -> None:
    server = start_server(tmp_path, None, "--compile-mode", "off", "--keep-host-memory-bytes", str(BUDGET))
    try:
        with Client(server.target, timeout=120) as c:
            x = torch.randn(1, ROW)
            key = c.register(_rows, [x, 8])
            for _ in range(2):  # warm: the paths of a call and their buffers exist
                assert c.execute(key, [x, 16 << 10])[0].shape == (16 << 10, ROW)  # 64 MiB
            before = server.rss()
            out = c.execute(key, [x, 240 << 10])[0]  # 960 MiB
            assert out.shape == (240 << 10, ROW) and torch.equal(out[-1], x[0])
            del out
            # The server hands the memory back once the call is over: wait for that,
            # with a deadline (what is measured is where RSS ends up, not how fast).
            deadline = time.monotonic() + 30
            while (grown := server.rss() - before) > BUDGET + (32 << 20) and time.monotonic() < deadline:
                time.sleep(0.1)
        assert grown <= BUDGET + (32 << 20), f"the server kept {grown >> 20} MiB more after the call"
    finally:
        server.stop()
