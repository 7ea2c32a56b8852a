"""The store: bounded (graph size, bytes, kernels: RESOURCE_EXHAUSTED naming the flag, the
server keeps serving) and read lazily (start reads no graph; a kernel is built on first use).
And the memory one call may use (--max-call-bytes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fuseport.client import Client, capture
from fuseport.wire.errors import KernelNotFound, ResourceExhausted

from .conftest import start_server


class Scaled(torch.nn.Module):
    """A kernel whose graph carries `n` float32 constants."""

    def __init__(self, n: int, seed: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(seed)), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w[:1] + self.w.sum()



def test_graph_store_bytes_kernel_count_and_call_memory_are_bounded(tmp_path: Path) -> None:
    x = torch.randn(3)
    small = [Scaled(4, seed) for seed in range(3)]
    graphs = [capture(m, [x]) for m in small]  # the same size: only the constants' values differ
    variant = capture(small[0], [torch.randn(2, 3)])  # another rank of the first
    larger = capture(Scaled(64, 7), [x])  # 240 bytes more constants than a small one
    big = capture(Scaled(8192, 9), [x])  # 32 KiB of constants
    room = graphs[0].ByteSize() + variant.ByteSize() + graphs[1].ByteSize() + 64
    server = start_server(
        tmp_path, None, "--compile-mode", "off", "--max-graph-bytes", "16384",
        "--max-store-bytes", str(room), "--max-store-kernels", "2", "--max-call-bytes", str(1 << 20),
    )  # fmt: skip
    try:
        # The network path: its refusal comes from the call's plan. (Through shared
        # memory the declared sizes are refused first: tests/test_shm_hostile.py.)
        with Client(server.target, timeout=60, shared_memory=False) as c:
            with pytest.raises(ResourceExhausted, match=r"this server takes graphs of at most 16384 bytes \(--max-graph-bytes\)"):
                c.register(big)
            k0 = c.register(graphs[0])
            assert c.register(variant, variant_of=k0) == k0  # a variant is no new kernel
            k1 = c.register(graphs[1])
            with pytest.raises(ResourceExhausted, match=r"holds 2 kernels.*--max-store-kernels"):
                c.register(graphs[2])
            torch.testing.assert_close(c.execute(k0, [torch.ones(2, 3)])[0], small[0](torch.ones(2, 3)))
            assert c.unregister(k1)
            # A kernel slot is free again, and the bytes of one small graph, no more.
            with pytest.raises(ResourceExhausted, match=r"--max-store-bytes"):
                c.register(larger)
            k2 = c.register(graphs[2])
            torch.testing.assert_close(c.execute(k2, [x])[0], small[2](x))
            # 1.2 MB in and 1.2 MB out: over what one call may use, refused before it runs.
            with pytest.raises(ResourceExhausted, match=r"needs at least \d+ bytes.*--max-call-bytes"):
                c.fallback(k2, [torch.randn(300_000)])
            torch.testing.assert_close(c.fallback(k2, [x])[0], small[2](x))
            assert sorted(k.key for k in c.list()) == sorted([k0, k2])
        assert "Traceback" not in server.log()
    finally:
        server.stop()


def test_start_reads_no_graph_and_builds_a_kernel_on_first_use(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = start_server(tmp_path / "a", store, "--compile-mode", "off")
    x = torch.randn(5)
    modules = [Scaled(4 << 20, seed) for seed in range(3)]  # 16 MiB of constants each
    try:
        rss_empty = first.rss()  # a server on an empty store, just started
        with Client(first.target, timeout=120) as c:
            keys = [c.register(m, [x]) for m in modules]
    finally:
        first.stop()
    damaged = store / f"{keys[2] & (2**64 - 1):016x}.pb"
    damaged.write_bytes(b"\x0a\xff not a graph")

    second = start_server(tmp_path / "b", store, "--compile-mode", "off")
    try:
        # Built at start, the three graphs would hold 48 MiB of constants twice (message and module).
        grown = second.rss() - rss_empty
        assert grown < 32 << 20, f"a server on a 48 MiB store started {grown >> 20} MiB larger"
        assert "indexed 3 kernels" in second.log() and "built kernel" not in second.log()
        assert "skipping stored graph" not in second.log()  # the damaged file is not even read yet
        with Client(second.target, timeout=120) as c:
            torch.testing.assert_close(c.execute(keys[0], [x])[0], modules[0](x))
            assert f"built kernel {keys[0]} from the store" in second.log()
            assert f"built kernel {keys[1]}" not in second.log()
            # List reads what is not built (and builds nothing); the damaged one is left out.
            listed = {k.key: k for k in c.list()}
            assert sorted(listed) == sorted(keys[:2]) and listed[keys[1]].inputs[0].name == "x"
            assert f"built kernel {keys[1]}" not in second.log()
            with pytest.raises(KernelNotFound):
                c.execute(keys[2], [x])
            assert "skipping stored graph" in second.log()
            torch.testing.assert_close(c.execute(keys[1], [x])[0], modules[1](x))
    finally:
        second.stop()


def test_register_on_a_full_store_is_resource_exhausted_and_a_retry_after_freeing_space_works(
    tmp_path: Path,
) -> None:
    # A full disk, made honestly without mounting anything (the test runs as root in CI,
    # where a read-only or tiny filesystem would need a mount): the serving process's
    # RLIMIT_FSIZE, lowered from outside with prlimit(2). The kernel then refuses, with
    # EFBIG, every write that would grow a file of that process past the limit: the
    # store's writer meets the same OSError path as ENOSPC or EDQUOT, and the server's
    # code is untouched. (Python ignores SIGXFSZ, so the write fails instead of the
    # process dying.) Raising the limit again is "freeing space". The server's log is a
    # file it writes too: it stays far under the limit in this test.
    resource = pytest.importorskip("resource")
    x = torch.randn(3)
    big = Scaled(64 << 10, 1)  # 256 KiB of constants
    small = Scaled(4, 2)
    server = start_server(tmp_path, None, "--compile-mode", "off")
    try:
        _, hard = resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (128 << 10, hard))
        with Client(server.target, timeout=60) as c:
            with pytest.raises(ResourceExhausted) as info:
                c.register(big, [x])
            message = str(info.value)
            assert str(server.store_dir) in message and "--store-dir" in message and "free" in message
            # Nothing partial: no temp file, no graph, no kernel; the server keeps serving.
            assert sorted(p.name for p in server.store_dir.iterdir()) == []
            assert c.list() == []
            k_small = c.register(small, [x])  # a graph that fits is registered
            torch.testing.assert_close(c.execute(k_small, [x])[0], small(x))
            # Space freed: the same Register now works, and the kernel is whole.
            resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))
            k_big = c.register(big, [x])
            torch.testing.assert_close(c.execute(k_big, [x])[0], big(x))
            assert sorted(k.key for k in c.list()) == sorted([k_small, k_big])
        assert "internal error" not in server.log().lower()
    finally:
        server.stop()
