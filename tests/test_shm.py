"""Shared memory for co-located clients: round trips, fallbacks, and hostile clients.

Every test talks to a real `fuseport serve` on loopback (which is on this host:
the shared-memory path is open to the client). The hostile ones speak the
socket protocol of service.proto ("Shared memory") by hand, with wire.shm's
packet functions, the way a client in any language would."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import mmap
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from fuseport.client import AsyncClient, Client, ExecuteResult, FuseportError, RemoteTensor
from fuseport.wire import _pb, codec, shm
from fuseport.wire.errors import ERROR_METADATA_KEY, DeadlineExceeded

from .conftest import ServerProcess, start_server

SERVICE = "/fuseport.v1.KernelService/"
MAX_BYTES = 64 << 20  # the server's --shared-memory-max-bytes here
BIG = 1 << 16  # elements: 256 KiB of float32, at the client's threshold (a stack of two is over it)


def _mix(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return a * 2 + b, (a - b).abs()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(
        tmp_path_factory.mktemp("shm"), None,
        "--compile-mode", "off", "--shared-memory-max-bytes", str(MAX_BYTES), "--metrics-port", "0",
    )  # fmt: skip
    yield s
    s.stop()


@pytest.fixture(scope="module")
def key(server: ServerProcess) -> int:
    with Client(server.target) as c:
        return c.register(_mix, [torch.ones(4), torch.ones(4)])


def _mappings(pid: int) -> list[str]:
    """The server's mappings of fuseport memfds (what shared memory holds there)."""
    return [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "memfd:fuseport" in line]


def _memfds(pid: int) -> list[str]:
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("/memfd:"):
            out.append(target)
    return out


def still_serves(server: ServerProcess, key: int) -> None:
    a, b = torch.randn(BIG), torch.randn(BIG)
    with Client(server.target) as c:
        r = c.execute_detailed(key, [a, b])
    assert r.transport == "shm"
    assert torch.equal(r.stack[0], a * 2 + b) and torch.equal(r.stack[1], (a - b).abs())


# --------------------------------------------------------------------------- round trips


def test_a_large_stack_travels_through_shared_memory_and_comes_back_right(server: ServerProcess, key: int) -> None:
    a, b = torch.randn(BIG), torch.randn(BIG)
    with Client(server.target) as c:
        r = c.execute_detailed(key, [7, a, b])
        small = c.execute_detailed(key, [a[:8], b[:8]])
    assert r.transport == "shm"
    assert r.stack[0] == 7  # values below the kernel's inputs come back untouched
    assert torch.equal(r.stack[1], a * 2 + b) and torch.equal(r.stack[2], (a - b).abs())
    assert small.transport == "unary"  # under the threshold: one message is as quick
    assert torch.equal(small.stack[0], a[:8] * 2 + b[:8])


def _until_true(check: Any, what: str, seconds: float = 10.0) -> None:
    """Waits for a condition another process brings about (the server handling a packet)."""
    end = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < end, what
        time.sleep(0.01)


def test_a_tensor_from_client_empty_is_named_in_place_and_freed_with_its_last_tensor(
    server: ServerProcess, key: int
) -> None:
    """Client.empty's tensors lie in regions of their own, handed over when made: a call
    names their bytes (no input region, no copy), contiguous views of them too; what
    the caller writes there between calls is what the next call reads; a strided view
    is copied as any tensor is. When the last tensor over a region dies, the server
    unmaps it. Without shared memory, empty() is an ordinary tensor."""
    pid = server.proc.pid
    with Client(server.target) as c:
        x, y = c.empty(BIG), c.empty((BIG,), dtype=torch.float32)
        assert (x.shape, y.shape, x.dtype) == ((BIG,), (BIG,), torch.float32)
        session = c._pool.first.shared
        assert session is not None and session._owned  # both regions handed over
        assert sum("fuseport-tensor" in m for m in _mappings(pid)) == 2
        for seed in (1, 2):
            x.copy_(torch.randn(BIG, generator=torch.Generator().manual_seed(seed)))
            y.copy_(x * 3)
            r = c.execute_detailed(key, [x, y])
            assert r.transport == "shm"
            assert torch.equal(r.stack[0], x * 2 + y) and torch.equal(r.stack[1], (x - y).abs())
        part = x[16 : BIG - 16]
        r = c.execute_detailed(key, [part, y[16 : BIG - 16]])
        assert torch.equal(r.stack[0], part * 2 + y[16 : BIG - 16])
        assert session._inputs == {}  # nothing was copied into an input region
        strided = x[::2]
        r = c.execute_detailed(key, [strided, strided])
        assert torch.equal(r.stack[0], strided * 3)
        assert session._inputs  # that one was
        del x, y, part, strided, r
        _until_true(lambda: not any("fuseport-tensor" in m for m in _mappings(pid)), "the server unmapped them")
        assert not session._owned
    with Client(server.target, shared_memory=False) as c:
        z = c.empty(2, 3, dtype=torch.int64)
        assert z.shape == (2, 3) and c._pool.first.shared is None
        with pytest.raises(ValueError, match="negative dimension"):
            c.empty(-1, 4)
        with pytest.raises(FuseportError, match="cannot travel on the wire"):
            c.empty(3, dtype=torch.quint8)

    async def run() -> ExecuteResult:
        async with AsyncClient(server.target) as ac:
            a = await ac.empty(BIG)
            a.fill_(2.0)
            return await ac.execute_detailed(key, [a, a])

    r = asyncio.run(run())
    assert r.transport == "shm" and torch.equal(r.stack[0], torch.full((BIG,), 6.0))
    still_serves(server, key)


def test_a_client_empty_region_leaves_the_clients_table_before_its_memory_is_unmapped(
    server: ServerProcess, key: int
) -> None:
    """Else memory mapped later at the same address (another tensor) would be taken for
    the dead region's and named to the server: a wrong result (an adversarial probe got
    one in 60 s of threads). Also: threads making tensors at once stay within the count."""
    from fuseport.client import shm as client_shm

    seen: list[bool] = []
    real = client_shm._owned_gone

    def spy(session_ref: Any, region: int, mapping: Any) -> None:
        session = session_ref()
        start, _size = session._owned[region]
        maps = Path("/proc/self/maps").read_text().splitlines()
        seen.append(any(int(a, 16) <= start < int(b, 16) for a, b in (m.split()[0].split("-") for m in maps)))
        real(session_ref, region, mapping)

    client_shm._owned_gone = spy  # type: ignore[assignment]
    try:
        with Client(server.target) as c:
            for _ in range(3):
                x = c.empty(BIG)
                del x
            made: list[torch.Tensor] = []

            def make() -> None:
                made.extend(c.empty(16) for _ in range(10))

            threads = [threading.Thread(target=make) for _ in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            session = c._pool.first.shared
            assert session is not None and len(session._owned) == shm.MAX_REGIONS - 8 < len(made)
            assert c.execute_detailed(key, [torch.randn(BIG), torch.randn(BIG)]).transport == "shm"
    finally:
        client_shm._owned_gone = real  # type: ignore[assignment]
    assert seen[:3] == [True, True, True]


def test_client_empty_past_the_servers_region_count_gives_ordinary_tensors_and_other_sessions_copy(
    server: ServerProcess, key: int
) -> None:
    """Past the 128 regions a session may hand over, less the slots' input regions,
    empty() makes ordinary tensors, and calls still go through shared memory; a tensor of one client's session passed by another
    client is copied into that one's input region; both give the right results."""
    with Client(server.target) as c, Client(server.target) as other:
        made = [c.empty(BIG // 64) for _ in range(140)]
        session = c._pool.first.shared
        assert session is not None
        in_shm = [t for t in made if any(s <= t.data_ptr() < s + n for s, n in session._owned.values())]
        assert len(in_shm) == shm.MAX_REGIONS - 8  # the rest ordinary: the slots' regions still fit
        for t in (made[0], made[-1]):
            t.fill_(1.5)
        a = torch.cat([made[0], made[-1]] * 32)  # a plain tensor beside them
        for client in (c, other):
            r = client.execute_detailed(key, [made[0].repeat(64), a])
            assert r.transport == "shm" and torch.equal(r.stack[0], torch.full((BIG,), 4.5))
        x = c.empty(BIG)
        x.fill_(2.0)
        r = other.execute_detailed(key, [x, x])
        assert torch.equal(r.stack[0], torch.full((BIG,), 6.0))
        assert other._pool.first.shared is not None and other._pool.first.shared._inputs  # copied there
    still_serves(server, key)


def _pick(x: torch.Tensor, i: torch.Tensor, e: torch.Tensor, flag: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    return x.flip(0), i & flag, e + n, flag.logical_not()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64])
def test_dtypes_lists_scalars_views_and_empty_tensors_round_trip(server: ServerProcess, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(BIG * 2, generator=g).to(dtype)
    view = base[::2]  # not contiguous: the client copies it in as it is laid out logically
    ints = torch.randint(0, 1 << 40, (BIG,), generator=g)
    flag = torch.randint(0, 2, (BIG,), generator=g).bool()
    empty = torch.empty(0, 5)
    below = [view * 3, [ints, empty], None]  # under the inputs: comes back untouched
    with Client(server.target) as c:
        k = c.register(_pick, [view, ints, empty, flag, 3])
        r = c.execute_detailed(k, [below, view, ints, empty, flag, 3])
    assert r.transport == "shm"
    want = [below, *_pick(view, ints, empty, flag, 3)]
    assert len(r.stack) == len(want)

    def same(got: Any, exp: Any) -> None:
        if isinstance(exp, torch.Tensor):
            assert got.dtype == exp.dtype and got.shape == exp.shape and torch.equal(got, exp)
        elif isinstance(exp, list):
            assert isinstance(got, list) and len(got) == len(exp)
            for a, b in zip(got, exp):
                same(a, b)
        else:
            assert got == exp

    same(r.stack, want)


def _double(z: torch.Tensor) -> torch.Tensor:
    return z * 2


def test_lazy_conjugate_and_negative_views_travel_as_their_values(server: ServerProcess) -> None:
    """A conjugate (or negative) view's memory holds the numbers before the
    conjugation: such an input is sent as its value, not its bytes."""
    z = torch.complex(torch.randn(BIG), torch.randn(BIG))
    assert z.conj().is_conj() and torch._neg_view(z).is_neg()
    with Client(server.target) as c:
        k = c.register(_double, [torch.ones(4, dtype=torch.complex64)])
        for view in (z.conj(), torch._neg_view(z)):
            r = c.fallback_detailed(k, [view])
            assert r.transport == "shm"
            assert torch.equal(r.stack[0], (view * 2).resolve_conj().resolve_neg())


def test_concurrent_calls_of_one_client_each_get_their_own_results(server: ServerProcess, key: int) -> None:
    """Eight threads share one client (and its session's slots): a call that read
    another's region would show as a wrong result."""
    errors: list[str] = []
    with Client(server.target) as c:

        def work(seed: int) -> None:
            g = torch.Generator().manual_seed(seed)
            for _ in range(6):
                n = BIG + int(torch.randint(0, BIG, (1,), generator=g))  # sizes vary: regions grow
                a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
                r = c.execute_detailed(key, [a, b])
                if r.transport != "shm" or not torch.equal(r.stack[0], a * 2 + b):
                    errors.append(f"thread {seed}: transport {r.transport}, right {torch.equal(r.stack[0], a * 2 + b)}")

        threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_past_the_sessions_budget_results_come_as_bytes_and_larger_stacks_over_the_network(
    server: ServerProcess, key: int
) -> None:
    half = MAX_BYTES // 2 // 4  # float32 elements of half the budget
    a, b = torch.randn(half // 2), torch.randn(half // 2)  # inputs: a quarter each
    with Client(server.target) as c:
        r = c.execute_detailed(key, [a, b])  # inputs fit, inputs + results do not
        assert r.transport == "shm" and torch.equal(r.stack[0], a * 2 + b)
        big = torch.randn(half + 16)
        r = c.execute_detailed(key, [big, big])  # over the budget on its own
        assert r.transport == "stream" and torch.equal(r.stack[0], big * 3)
        r = c.execute_detailed(key, [a[:BIG], b[:BIG]])  # and the session still serves
        assert r.transport == "shm" and torch.equal(r.stack[0], a[:BIG] * 2 + b[:BIG])


def test_a_client_whose_session_was_lost_uses_the_network_once_then_a_new_session(
    server: ServerProcess, key: int
) -> None:
    a, b = torch.randn(BIG), torch.randn(BIG)
    with Client(server.target) as c:
        assert c.execute_detailed(key, [a, b]).transport == "shm"
        lost = c._shared
        assert lost is not None
        held = len(_mappings(server.proc.pid))
        lost._sock.close()  # as if the connection broke: the server ends the session
        deadline = time.monotonic() + 30
        while len(_mappings(server.proc.pid)) >= held and time.monotonic() < deadline:
            time.sleep(0.02)  # until the server has unmapped it (then it answers "not open")
        transports = [c.execute_detailed(key, [a, b]).transport for _ in range(3)]
        assert c._shared is not lost
    assert transports == ["unary", "shm", "shm"]


def _slow(x: torch.Tensor) -> torch.Tensor:
    for _ in range(12):
        x = torch.tanh(x @ x)
    return x


def test_a_call_that_times_out_gives_up_its_session_since_the_server_may_still_write_its_slot(
    server: ServerProcess, key: int
) -> None:
    """A call whose deadline passed may still run on the server, which then writes
    its results into the slot's output region: a later call given that slot could
    read them as its own. The client gives the whole session up instead."""
    a, b, x = torch.randn(BIG), torch.randn(BIG), torch.randn(1024, 1024) / 32
    with Client(server.target) as c:
        slow = c.register(_slow, [torch.randn(8, 8)])
        assert c.execute_detailed(key, [a, b]).transport == "shm"
        first = c._shared
        assert first is not None
        with pytest.raises(DeadlineExceeded):
            c.execute_detailed(slow, [x], timeout=0.05)
        assert first.closed and c._shared is not first
        r = c.execute_detailed(key, [a, b])
        assert r.transport == "shm" and c._shared is not first
        assert torch.equal(r.stack[0], a * 2 + b)


def test_an_async_call_cancelled_mid_call_gives_up_its_session_too(server: ServerProcess, key: int) -> None:
    a, b, x = torch.randn(BIG), torch.randn(BIG), torch.randn(1024, 1024) / 32

    async def run() -> tuple[Any, Any, Any]:
        async with AsyncClient(server.target) as c:
            slow = await c.register(_slow, [torch.randn(8, 8)])
            assert (await c.execute_detailed(key, [a, b])).transport == "shm"
            first = c._shared
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(c.execute_detailed(slow, [x]), 0.05)
            assert first is not None and first.closed and c._shared is not first
            r = await c.execute_detailed(key, [a, b])
            return first, c._shared, r

    first, now, r = asyncio.run(run())
    assert now is not first
    assert r.transport == "shm" and torch.equal(r.stack[0], a * 2 + b)


def _gauges(server: ServerProcess) -> tuple[float, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=30).read().decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return samples["fuseport_shared_memory_sessions"], samples["fuseport_shared_memory_bytes"]


def _until(server: ServerProcess, want: tuple[float, float]) -> tuple[float, float]:
    deadline = time.monotonic() + 30
    while (got := _gauges(server)) != want and time.monotonic() < deadline:
        time.sleep(0.05)  # a closed client's session ends when the server reads its EOF
    return got


def test_metrics_count_sessions_and_mapped_bytes(server: ServerProcess, key: int) -> None:
    assert _until(server, (0, 0)) == (0, 0)
    with Client(server.target) as c:
        assert c.execute_detailed(key, [torch.randn(BIG), torch.randn(BIG)]).transport == "shm"
        sessions, mapped = _gauges(server)
        assert sessions == 1
        assert mapped == (1 << 20) + (1 << 20)  # a 1 MiB input region and a 1 MiB output region
        assert server.metric("fuseport_shared_memory_locked_bytes") == 0  # page-locked for a GPU only
        assert server.metric("fuseport_shared_memory_device_output_bytes") == 0  # results on a GPU only
    assert _until(server, (0, 0)) == (0, 0)


def test_all_sessions_together_map_at_most_four_budgets(server: ServerProcess, key: int) -> None:
    """Sparse memfds cost their client nothing; the pages the server faults in are
    the server's. So besides each session's budget there is one for all of them."""
    assert _until(server, (0, 0)) == (0, 0)
    sessions = []
    try:
        for i in range(5):
            r = RawSession(server, client_id=f"budget-client-{i:02d}-0123456789")
            sessions.append(r)
            assert r.hello().kind == shm.OK  # type: ignore[union-attr]
            size = (60 << 20) if i < 4 else (32 << 20)
            fd, _m = _sealed(size)
            reply = r.hand_over(fd, 1, size)
            os.close(fd)
            if i < 4:
                assert reply is not None and reply.kind == shm.OK, reply
        assert reply is not None and reply.kind == shm.ERROR and "all sessions" in reply.text, reply
    finally:
        for r in sessions:
            r.close()
    assert _until(server, (0, 0)) == (0, 0)
    still_serves(server, key)


def test_a_client_with_shared_memory_off_uses_the_network(server: ServerProcess, key: int) -> None:
    a, b = torch.randn(BIG), torch.randn(BIG)
    with Client(server.target, shared_memory=False) as c:
        r = c.execute_detailed(key, [a, b])
    assert r.transport == "unary"
    assert torch.equal(r.stack[0], a * 2 + b)


def test_kept_outputs_stay_on_the_server_while_inputs_come_through_shared_memory(
    server: ServerProcess, key: int
) -> None:
    a, b = torch.randn(BIG), torch.randn(BIG)
    with Client(server.target) as c:
        r = c.execute_detailed(key, [a, b], keep=True)
        assert r.transport == "shm"
        total, diff = r.stack
        again = c.execute_detailed(key, [total, b])  # a RemoteTensor and a shared tensor in one stack
        assert again.transport == "shm"
        assert torch.equal(again.stack[0], (a * 2 + b) * 2 + b)
        assert torch.equal(diff.fetch(), (a - b).abs())


# --------------------------------------------------------------------------- a client by hand


class RawSession:
    """A session opened and driven by hand (what another language's client does)."""

    def __init__(self, server: ServerProcess, client_id: str = "raw-client-0123456789") -> None:
        self.channel = grpc.insecure_channel(server.target)
        self.metadata = (("fuseport-client-id", client_id),)
        raw = self.channel.unary_unary(SERVICE + "OpenSharedMemory")(b"", metadata=self.metadata, timeout=10)
        self.opened = _pb.service.OpenSharedMemoryResponse.FromString(raw)
        self.sock = shm.connect(self.opened.socket, 10)

    def hello(self, ticket: str | None = None) -> shm.Packet | None:
        shm.send_packet(self.sock, shm.Packet(shm.HELLO, text=self.opened.ticket if ticket is None else ticket))
        return shm.recv_packet(self.sock)

    def hand_over(self, fd: int, ident: int, size: int) -> shm.Packet | None:
        shm.send_packet(self.sock, shm.Packet(shm.REGION, 0, ident, size, fd=fd))
        return shm.recv_packet(self.sock)

    def execute(self, stack: list[Any], slot: int = 0, session: str | None = None) -> tuple[grpc.StatusCode, str, str]:
        request = codec.encode_execute_request(
            self.key, stack, shm_session=self.opened.session if session is None else session, shm_slot=slot
        )
        try:
            raw = self.channel.unary_unary(SERVICE + "Execute")(request, metadata=self.metadata, timeout=30)
        except grpc.RpcError as e:
            kind = dict(e.trailing_metadata() or ()).get(ERROR_METADATA_KEY, "")
            return e.code(), kind, e.details()
        self.response = codec.decode_execute_response(raw)
        return grpc.StatusCode.OK, "", ""

    def close(self) -> None:
        self.sock.close()
        self.channel.close()


@pytest.fixture()
def raw(server: ServerProcess, key: int) -> Iterator[RawSession]:
    r = RawSession(server)
    r.key = key  # type: ignore[attr-defined]
    yield r
    r.close()


def _sealed(size: int, fill: bytes = b"") -> tuple[int, mmap.mmap]:
    fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    m = mmap.mmap(fd, size)
    m[: len(fill)] = fill
    return fd, m


def test_a_hand_made_session_runs_a_call_and_gets_its_outputs_in_the_servers_region(raw: RawSession) -> None:
    assert raw.hello().kind == shm.OK  # type: ignore[union-attr]
    a, b = torch.arange(6, dtype=torch.float32), torch.full((6,), 0.5)
    fd, m = _sealed(1 << 20, a.numpy().tobytes() + bytes(40) + b.numpy().tobytes())
    assert raw.hand_over(fd, 5, 1 << 20).kind == shm.OK  # type: ignore[union-attr]
    stack = [codec.Shared(5, 0, torch.float32, (6,), 24), codec.Shared(5, 64, torch.float32, (6,), 24)]
    assert raw.execute(stack, slot=3)[0] == grpc.StatusCode.OK
    out = shm.recv_packet(raw.sock)  # the slot's output region, sent before the response
    assert out is not None and out.kind == shm.OUTPUT and out.slot == 3 and out.fd is not None
    region = shm.map_region(out.fd, out.id, out.size, 1 << 30)
    refs = raw.response.stack
    assert all(isinstance(v, codec.Shared) and v.region == out.id for v in refs)
    got = [region.view(v.offset, v.nbytes, "out").view(v.dtype).view(v.shape) for v in refs]
    assert torch.equal(got[0], a * 2 + b) and torch.equal(got[1], (a - b).abs())
    # The client rewrites its region after the call: the results are in the server's region.
    m[:24] = bytes(24)
    assert raw.execute(stack)[0] == grpc.StatusCode.OK
    assert torch.equal(raw.response.stack[0], b)  # 0 * 2 + b: this call read the new bytes


def _sized(fd: int, size: int = 1 << 20) -> int:
    os.ftruncate(fd, size)
    return fd


def _regular_file() -> int:
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    return _sized(fd)


@pytest.mark.parametrize(
    "make, size, why",
    [
        (lambda: _sized(os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)), 1 << 20, "not sealed against shrinking"),
        (lambda: _sized(os.memfd_create("cannot-seal", 0)), 1 << 20, "not sealed against shrinking"),
        (_regular_file, 1 << 20, "not sealed against shrinking|not a memfd that takes seals"),
        (lambda: os.pipe()[0], 1 << 20, "not a memory file"),
        (lambda: _sealed(1 << 20)[0], 2 << 20, "announced as 2097152 bytes, the memfd holds 1048576"),
        (lambda: _sealed(MAX_BYTES + (1 << 20))[0], MAX_BYTES + (1 << 20), "not within 1.."),
    ],
    ids=["unsealed", "cannot-seal", "regular-file", "pipe", "size-lie", "over-budget"],
)
def test_a_region_the_server_cannot_map_safely_is_refused_and_the_session_goes_on(
    server: ServerProcess, key: int, raw: RawSession, make: Any, size: int, why: str
) -> None:
    assert raw.hello().kind == shm.OK  # type: ignore[union-attr]
    fd = make()
    reply = raw.hand_over(fd, 9, size)
    os.close(fd)
    assert reply is not None and reply.kind == shm.ERROR and reply.id == 9
    assert re.search(why, reply.text), reply.text
    good, _m = _sealed(1 << 20)
    assert raw.hand_over(good, 10, 1 << 20).kind == shm.OK  # type: ignore[union-attr]
    still_serves(server, key)


def test_a_wrong_ticket_or_a_broken_packet_ends_only_that_connection(server: ServerProcess, key: int) -> None:
    r = RawSession(server)
    try:
        reply = r.hello("0" * 64)
        assert reply is not None and reply.kind == shm.ERROR and "ticket" in reply.text
        assert shm.recv_packet(r.sock) is None  # closed
    finally:
        r.close()
    r = RawSession(server)
    try:
        r.sock.sendall(b"not a packet at all, nothing like one")
        assert shm.recv_packet(r.sock) is None
    finally:
        r.close()
    r = RawSession(server)
    try:
        assert r.hello().kind == shm.OK  # type: ignore[union-attr]
        assert r.hello() is None  # a ticket is good once; a second HELLO is a client's mistake
    finally:
        r.close()
    still_serves(server, key)


def test_descriptors_sent_past_the_one_a_packet_may_carry_do_not_leak(server: ServerProcess, key: int) -> None:
    before = len(_memfds(server.proc.pid))
    r = RawSession(server)
    try:
        assert r.hello().kind == shm.OK  # type: ignore[union-attr]
        fds = [_sealed(1 << 20)[0] for _ in range(8)]
        socket.send_fds(r.sock, [shm._HEADER.pack(b"FPSM", shm.REGION, 0, 4, 1 << 20)], fds)
        assert shm.recv_packet(r.sock) is None  # the server drops such a connection
        for fd in fds:
            os.close(fd)
    finally:
        r.close()
    deadline = time.monotonic() + 30
    while len(_memfds(server.proc.pid)) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_memfds(server.proc.pid)) <= before
    still_serves(server, key)


def test_shared_tensors_that_lie_are_invalid_argument_naming_what_is_wrong(raw: RawSession) -> None:
    assert raw.hello().kind == shm.OK  # type: ignore[union-attr]
    fd, m = _sealed(1 << 20, bytes([0, 1, 2, 1]))
    assert raw.hand_over(fd, 1, 1 << 20).kind == shm.OK  # type: ignore[union-attr]
    f32 = torch.float32
    cases = [
        ([codec.Shared(1, (1 << 20) - 8, f32, (4,), 16), codec.Shared(1, 0, f32, (4,), 16)], "outside"),
        ([codec.Shared(2, 0, f32, (4,), 16), codec.Shared(1, 0, f32, (4,), 16)], "was not handed over"),
        ([codec.Shared(1, 2, f32, (4,), 16), codec.Shared(1, 0, f32, (4,), 16)], "not a multiple"),
        ([codec.Shared(1, 0, f32, (1 << 40, 1 << 40), 0), codec.Shared(1, 0, f32, (4,), 16)], "too large"),
        ([codec.Shared(1, 0, f32, (-4,), 0), codec.Shared(1, 0, f32, (4,), 16)], "negative"),
        ([codec.Shared(1, 0, torch.bool, (4,), 4), codec.Shared(1, 0, f32, (4,), 16)], "other than 0 and 1"),
    ]
    for stack, why in cases:
        code, kind, details = raw.execute(stack)
        assert (code, kind) == (grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack"), (why, code, details)
        assert why in details
    ok = [codec.Shared(1, 0, f32, (4,), 16), codec.Shared(1, 0, f32, (4,), 16)]
    code, kind, details = raw.execute(ok, slot=65)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "slot 65" in details
    assert raw.execute(ok)[0] == grpc.StatusCode.OK


def test_a_cpu_server_offers_no_cuda_ipc_and_refuses_cuda_handles_naming_why(raw: RawSession) -> None:
    """CUDA IPC is for a CUDA server; here its SharedTensors are refused, each
    for what is wrong with it, and the session and the server go on."""
    assert list(raw.opened.cuda_devices) == []
    assert raw.hello().kind == shm.OK  # type: ignore[union-attr]
    fd, m = _sealed(1 << 20)
    assert raw.hand_over(fd, 1, 1 << 20).kind == shm.OK  # type: ignore[union-attr]
    f32, handle, uuid = torch.float32, os.urandom(64), os.urandom(16)
    host = codec.Shared(1, 0, f32, (4,), 16)
    cases = [
        (codec.Shared(0, 0, f32, (4,), 16, handle, uuid), "offers no CUDA IPC"),
        (codec.Shared(0, 0, f32, (4,), 16, handle[:10], uuid), "64-byte cuda_handle"),
        (codec.Shared(0, 0, f32, (4,), 16, handle, b""), "16-byte cuda_device"),
        (codec.Shared(1, 0, f32, (4,), 16, handle, uuid), "not both"),
    ]
    for value, why in cases:
        code, kind, details = raw.execute([value, host])
        assert (code, kind) == (grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack"), (why, code, details)
        assert why in details, details
    assert raw.execute([host, host])[0] == grpc.StatusCode.OK


def test_a_cpu_server_offers_no_device_results_and_refuses_a_request_naming_a_device_region(
    raw: RawSession,
) -> None:
    """Results stay in host memory on a CPU server (no `cuda_outputs`; a call asking for
    them on the device gets them in the host region); a request naming a device output
    region, which only a response does, is InvalidStack; the session goes on."""
    assert raw.opened.cuda_outputs is False
    assert raw.hello().kind == shm.OK  # type: ignore[union-attr]
    fd, _m = _sealed(1 << 20)
    assert raw.hand_over(fd, 1, 1 << 20).kind == shm.OK  # type: ignore[union-attr]
    f32 = torch.float32
    host = codec.Shared(1, 0, f32, (4,), 16)
    code, kind, details = raw.execute([codec.Shared(1, 0, f32, (4,), 16, b"", os.urandom(16)), host])
    assert (code, kind) == (grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack"), details
    assert "names a device output region" in details
    request = codec.encode_execute_request(
        raw.key, [host, host], shm_session=raw.opened.session, shm_slot=1, shm_cuda_outputs=True  # type: ignore[attr-defined]
    )
    got = codec.decode_execute_response(
        raw.channel.unary_unary(SERVICE + "Execute")(request, metadata=raw.metadata, timeout=30)
    )
    assert got.stack and all(isinstance(v, codec.Shared) and not v.cuda_device for v in got.stack)


def test_results_on_is_checked_before_anything_is_sent_and_cpu_means_host_memory(
    server: ServerProcess, key: int
) -> None:
    x = torch.randn(1 << 18)
    want = _mix(x, x * 2)
    bad = [
        (dict(results_on="meta"), "host memory (None, 'cpu') or a CUDA device"),
        (dict(results_on="not a device"), "is not a device"),
        (dict(results_on="cuda:99"), "CUDA device"),
        (dict(results_on="cuda", keep=True), "kept results stay on the server"),
    ]
    with Client(server.target) as c:
        for kwargs, why in bad:
            with pytest.raises(ValueError, match=re.escape(why)):
                c.execute(key, [x, x * 2], **kwargs)  # type: ignore[arg-type]
        for results_on in ("cpu", torch.device("cpu"), None):
            r = c.execute_detailed(key, [x, x * 2], results_on=results_on)
            assert r.transport == "shm" and all(t.device.type == "cpu" for t in r.stack)
            assert all(torch.equal(a, b) for a, b in zip(r.stack, want))

    async def run() -> list[Any]:
        async with AsyncClient(server.target) as ac:
            with pytest.raises(ValueError, match="kept results"):
                await ac.execute(key, [x, x * 2], keep=True, results_on="cuda")
            return await ac.execute(key, [x, x * 2], results_on="cpu")

    assert all(torch.equal(a, b) for a, b in zip(asyncio.run(run()), want))
    still_serves(server, key)


def test_a_session_is_usable_only_by_its_client_on_its_server(server: ServerProcess, raw: RawSession) -> None:
    assert raw.hello().kind == shm.OK  # type: ignore[union-attr]
    fd, _m = _sealed(1 << 20)
    assert raw.hand_over(fd, 1, 1 << 20).kind == shm.OK  # type: ignore[union-attr]
    stack = [codec.Shared(1, 0, torch.float32, (4,), 16)] * 2
    other = RawSession(server, client_id="another-client-0123456789")
    other.key = raw.key  # type: ignore[attr-defined]
    try:
        for who, session in ((other, raw.opened.session), (raw, "0" * 32)):
            code, kind, details = who.execute(stack, session=session)
            assert (code, kind) == (grpc.StatusCode.FAILED_PRECONDITION, "SharedMemoryUnavailable"), details
            assert "not open on this serving process" in details
    finally:
        other.close()
    assert raw.execute(stack)[0] == grpc.StatusCode.OK


def test_open_shared_memory_needs_a_client_id(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary(SERVICE + "OpenSharedMemory")(b"", timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fuseport-client-id" in e.value.details()


# --------------------------------------------------------------------------- a client that dies

_DYING_CLIENT = r"""
import sys, time, torch
from fuseport.client import AsyncClient, Client, ExecuteResult, FuseportError, RemoteTensor
c = Client(sys.argv[1])
a = torch.randn(2 << 20)
for _ in range(3):
    r = c.execute_detailed(int(sys.argv[2]), [a, a])
    assert r.transport == "shm", r.transport
print("ready", flush=True)
time.sleep(600)
"""


def test_a_killed_clients_regions_are_unmapped_and_closed_at_once(server: ServerProcess, key: int) -> None:
    pid = server.proc.pid
    # Only the dying client's regions: the module's server may still hold the session of
    # an earlier test's client that this process has not yet collected (CI saw one).
    before = set(_mappings(pid))
    inputs_before = sum("fuseport-in" in fd for fd in _memfds(pid))
    proc = subprocess.Popen([sys.executable, "-c", _DYING_CLIENT, server.target, str(key)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        held = set(_mappings(pid)) - before
        assert held, "the server maps the client's regions while its session is open"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # No lease to wait for: the connection closed with the process.
    deadline = time.monotonic() + 30
    while set(_mappings(pid)) & held and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(_mappings(pid)) & held, "a dead client's regions are still mapped"
    assert sum("fuseport-in" in fd for fd in _memfds(pid)) <= inputs_before  # and their descriptors closed
    still_serves(server, key)


# --------------------------------------------------------------------------- on the GPU box


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_memory_to_a_cuda_server_matches_eager_on_the_device(
    cuda_server: ServerProcess, dtype: torch.dtype
) -> None:
    """The server copies each input from the client's region straight to its
    device and each result from there into its region; a client holding CUDA
    tensors hands them over by CUDA IPC handle instead (copied on the device)."""
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(1 << 20, generator=g).to(dtype), torch.randn(1 << 20, generator=g).to(dtype)
    want = [t.cpu() for t in _mix(a.cuda(), b.cuda())]
    with Client(cuda_server.target, timeout=300) as c:
        k = c.register(_mix, [a, b])
        for inputs, transport in (([a, b], "shm"), ([a.cuda(), b.cuda()], "cuda_ipc")):
            r = c.fallback_detailed(k, inputs)
            assert r.transport == transport
            assert all(torch.equal(x, y) for x, y in zip(r.stack, want))


@pytest.mark.gpu
def test_a_cuda_servers_regions_are_page_locked_while_mapped_and_unlocked_when_the_session_ends(
    tmp_path: Path,
) -> None:
    """Within --shared-memory-page-lock-bytes (a quarter of host memory by default),
    the client's input regions and the server's output regions are registered with the
    GPU's driver as they are mapped, and unregistered when the session drops them. Results stay right call after call,
    through the same regions and through a fresh one."""
    s = start_server(tmp_path, None, "--device", "cuda", "--processes", "1", "--metrics-port", "0",
                     "--compile-mode", "off")  # fmt: skip
    try:
        g = torch.Generator().manual_seed(5)
        x = torch.randn(4 << 20, generator=g)  # 16 MiB
        with Client(s.target, timeout=300) as c:
            k = c.register(lambda x: x * 2.0 + 1.0, [torch.ones(4)])
            want = (x.cuda() * 2.0 + 1.0).cpu()
            kept = []
            for i in range(4):
                r = c.execute_detailed(k, [x])
                assert r.transport == "shm"
                assert torch.equal(r.stack[0], want), f"call {i}"
                kept.append(r)  # results alive: the next call writes a fresh output region
            locked = s.metric("fuseport_shared_memory_locked_bytes")
            mapped = s.metric("fuseport_shared_memory_bytes")
            assert locked == mapped >= 2 * x.nbytes, (locked, mapped)
            del kept, r
        deadline = time.monotonic() + 30
        while s.metric("fuseport_shared_memory_locked_bytes") and time.monotonic() < deadline:
            time.sleep(0.05)  # a closed client's session ends when the server reads its EOF
        assert s.metric("fuseport_shared_memory_locked_bytes") == 0
        assert s.metric("fuseport_shared_memory_bytes") == 0
    finally:
        s.stop()


@pytest.mark.gpu
def test_regions_past_the_page_lock_bound_are_used_unlocked_and_results_stay_right(tmp_path: Path) -> None:
    s = start_server(tmp_path, None, "--device", "cuda", "--processes", "1", "--metrics-port", "0",
                     "--compile-mode", "off", "--shared-memory-page-lock-bytes", str(24 << 20))  # fmt: skip
    try:
        x = torch.randn(4 << 20)  # 16 MiB: its input region fits the bound, the output region does not
        with Client(s.target, timeout=300) as c:
            k = c.register(lambda x: x - 1.0, [torch.ones(4)])
            for _ in range(3):
                r = c.execute_detailed(k, [x])
                assert r.transport == "shm" and torch.equal(r.stack[0], x - 1.0)
            assert 0 < s.metric("fuseport_shared_memory_locked_bytes") <= 24 << 20  # the input region's
            assert s.metric("fuseport_shared_memory_bytes") >= 2 * x.nbytes
    finally:
        s.stop()


def _cuda_inputs(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of CUDA inputs as users hold them: whole tensors, a slice deep inside a
    larger allocation (an offset), a transposed view (not contiguous), and a CPU
    tensor beside a CUDA one."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    big = torch.randn(3 << 20, device="cuda", generator=g)
    m = torch.randn(1024, 512, device="cuda", generator=g)
    return [
        (big[: 1 << 20].clone(), big[1 << 20 : 2 << 20].clone()),
        (big[(1 << 20) + 3 : (2 << 20) + 3], big[2 << 20 :]),
        (m.t(), m.t() * 3),
        (big[: 1 << 20].cpu(), big[1 << 20 : 2 << 20]),
    ]


@pytest.mark.gpu
def test_cuda_tensors_of_a_client_on_the_gpu_host_travel_by_cuda_ipc_and_match_eager(
    cuda_server: ServerProcess,
) -> None:
    with Client(cuda_server.target, timeout=300) as c:
        k = c.register(_mix, [torch.ones(4), torch.ones(4)])
        for a, b in _cuda_inputs(5):
            want = [t.cpu() for t in _mix(a.cuda(), b.cuda())]
            r = c.fallback_detailed(k, [a, b])
            assert r.transport == "cuda_ipc"
            assert all(torch.equal(x, y) for x, y in zip(r.stack, want))
        # Threads of one client, each with its own CUDA tensors, each get their own results.
        pairs = _cuda_inputs(6) * 3
        wants = [[t.cpu() for t in _mix(a.cuda(), b.cuda())] for a, b in pairs]
        got: list[Any] = [None] * len(pairs)

        def one(i: int) -> None:
            got[i] = c.fallback_detailed(k, list(pairs[i]))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(pairs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r, want in zip(got, wants):
            assert r.transport == "cuda_ipc"
            assert all(torch.equal(x, y) for x, y in zip(r.stack, want))


@pytest.mark.gpu
def test_cuda_ipc_handles_that_lie_are_invalid_argument_and_the_server_keeps_serving(
    cuda_server: ServerProcess,
) -> None:
    """A hand-written client names CUDA memory it does not have, or more than it has:
    each call is refused naming what is wrong, nothing faults the server's device."""
    from fuseport.wire import cuda_ipc

    drv = cuda_ipc.driver()
    assert drv is not None, cuda_ipc.why_not()
    with Client(cuda_server.target) as c:
        key = c.register(_mix, [torch.ones(4), torch.ones(4)])
    raw = RawSession(cuda_server)
    raw.key = key  # type: ignore[attr-defined]
    try:
        assert raw.opened.cuda_devices, "a CUDA server offers CUDA IPC"
        assert raw.hello().kind == shm.OK  # type: ignore[union-attr]
        x = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
        torch.cuda.synchronize()
        e = drv.export(x)
        assert e.device_uuid in raw.opened.cuda_devices
        # 256 KiB named at a time: the results come back as bytes, within the
        # 4 MiB a plain grpc channel receives.
        f32, n = torch.float32, 1 << 16

        def ref(offset: int = e.offset, count: int = n, handle: bytes = e.handle, uuid: bytes = e.device_uuid) -> Any:
            return codec.Shared(0, offset, f32, (count,), count * 4, handle, uuid)

        bad = (grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack")
        unopened = (grpc.StatusCode.FAILED_PRECONDITION, "CudaIpcUnavailable")  # a real client resends by host
        cases = [
            (ref(handle=os.urandom(64)), unopened, "cannot open its CUDA IPC handle"),
            (ref(handle=bytes(64)), unopened, "cannot open its CUDA IPC handle"),
            (ref(offset=e.allocation_bytes), bad, "outside"),
            (ref(count=e.allocation_bytes // 4 + 1), bad, "outside"),
            (ref(offset=e.offset + e.allocation_bytes - 4 * n + 4), bad, "outside"),
            (ref(uuid=os.urandom(16)), bad, "not the device this server offered"),
        ]
        for value, want, why in cases:
            code, kind, details = raw.execute([value, ref()])
            assert (code, kind) == want, (why, code, details)
            assert why in details, details
        # The same session, the honest reference: the server's device is fine.
        assert raw.execute([ref(), ref()])[0] == grpc.StatusCode.OK
        assert torch.equal(raw.response.stack[0], (x[:n] * 3).cpu())
    finally:
        raw.close()
    with Client(cuda_server.target) as c:
        a = torch.randn(1 << 18, device="cuda")
        r = c.fallback_detailed(key, [a, a])
        assert r.transport == "cuda_ipc" and torch.equal(r.stack[0], (a * 3).cpu())


@pytest.mark.gpu
def test_a_handle_the_server_cannot_open_sends_the_call_through_host_memory(
    cuda_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where CUDA IPC cannot cross between the two processes (another PID or IPC
    namespace), the server cannot open the handles: the call is resent through the
    session's regions, and so are the session's later calls. Simulated here by
    exporting handles of nothing (the server's answer is the same)."""
    from fuseport.wire import cuda_ipc

    real = cuda_ipc.Driver.export

    def unopenable(self: Any, t: torch.Tensor) -> Any:
        e = real(self, t)
        return cuda_ipc.Export(os.urandom(64), e.offset, e.allocation_bytes, e.device_uuid)

    monkeypatch.setattr(cuda_ipc.Driver, "export", unopenable)
    a, b = torch.randn(1 << 18, device="cuda"), torch.randn(1 << 18, device="cuda")
    want = [t.cpu() for t in _mix(a, b)]
    with Client(cuda_server.target, timeout=300) as c:
        k = c.register(_mix, [torch.ones(4), torch.ones(4)])
        for _ in range(2):
            r = c.fallback_detailed(k, [a, b])
            assert r.transport == "shm"
            assert all(torch.equal(x, y) for x, y in zip(r.stack, want))


@pytest.mark.gpu
def test_a_server_in_the_clients_own_process_takes_cuda_tensors_through_host_memory(tmp_path: Path) -> None:
    """CUDA refuses to open a process's own handles: a client whose server runs in
    its own process (create_server) does not try."""
    import asyncio

    from fuseport.server import Settings, create_server

    a, b = torch.randn(1 << 18, device="cuda"), torch.randn(1 << 18, device="cuda")
    want = [t.cpu() for t in _mix(a, b)]

    def call(port: int) -> Any:
        with Client(f"127.0.0.1:{port}", timeout=300) as c:
            k = c.register(_mix, [torch.ones(4), torch.ones(4)])
            return c.fallback_detailed(k, [a, b])

    async def run() -> Any:
        settings = Settings(host="127.0.0.1", port=0, store_dir=tmp_path, device="cuda", compile_mode="off")
        server, port = await create_server(settings)
        await server.start()
        try:
            return await asyncio.to_thread(call, port)
        finally:
            await server.stop(0)

    r = asyncio.run(run())
    assert r.transport == "shm"
    assert all(torch.equal(x, y) for x, y in zip(r.stack, want))


@pytest.mark.gpu
def test_with_cuda_ipc_off_cuda_tensors_go_through_host_memory(tmp_path: Path) -> None:
    s = start_server(tmp_path, None, "--device", "cuda", "--compile-mode", "off", "--cuda-ipc", "off")
    try:
        with Client(s.target, timeout=300) as c:
            k = c.register(_mix, [torch.ones(4), torch.ones(4)])
            a, b = torch.randn(1 << 18, device="cuda"), torch.randn(1 << 18, device="cuda")
            r = c.fallback_detailed(k, [a, b])
            assert r.transport == "shm"
            assert all(torch.equal(x, y.cpu()) for x, y in zip(r.stack, _mix(a, b)))
    finally:
        s.stop()


def _grow(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return x.repeat(n), x * 3


@pytest.mark.gpu
def test_results_asked_for_on_the_servers_gpu_come_device_to_device_and_match_eager(
    cuda_server: ServerProcess,
) -> None:
    """results_on="cuda": from CUDA inputs (by handle) and from host inputs (through the
    input region) alike, the results come from the slot's device region as tensors of
    the client's own on its GPU; a region outgrown is replaced; values below the inputs
    stay as they are; results stay right after later calls and after the client closes;
    threads of one client each get their own."""
    with Client(cuda_server.target, timeout=300) as c:
        k = c.register(_mix, [torch.ones(4), torch.ones(4)])
        kept: list[tuple[list[Any], list[torch.Tensor]]] = []
        for a, b in _cuda_inputs(7):
            want = list(_mix(a.cuda(), b.cuda()))
            r = c.fallback_detailed(k, ["below", 5, a, b], results_on="cuda")
            assert r.transport == "cuda_ipc"
            assert r.stack[:2] == ["below", 5]
            assert all(t.is_cuda and torch.equal(t, w) for t, w in zip(r.stack[2:], want))
            kept.append((r.stack[2:], [w.clone() for w in want]))
        host = torch.randn(1 << 20)
        r = c.fallback_detailed(k, [host, host * 2], results_on="cuda:0")
        assert r.transport == "cuda_ipc" and all(t.is_cuda for t in r.stack)
        assert all(torch.equal(t, w) for t, w in zip(r.stack, _mix(host.cuda(), host.cuda() * 2)))
        g = c.register(_grow, [torch.ones(4), 2])
        for n in (1, 4, 16, 2):  # results of 2 to 17 MiB: the slot's region grows, then is reused
            x = torch.randn(1 << 18, device="cuda")
            r = c.fallback_detailed(g, [x, n], results_on="cuda")
            assert r.transport == "cuda_ipc"
            assert all(torch.equal(t, w) for t, w in zip(r.stack, _grow(x, n)))
        pairs = _cuda_inputs(8) * 3
        got: list[Any] = [None] * len(pairs)

        def one(i: int) -> None:
            got[i] = c.fallback_detailed(k, list(pairs[i]), results_on="cuda")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(pairs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r, (a, b) in zip(got, pairs):
            assert r.transport == "cuda_ipc"
            assert all(torch.equal(t, w) for t, w in zip(r.stack, _mix(a.cuda(), b.cuda())))
    for results, want in kept:  # copies of the client's own: later calls and the close changed nothing
        assert all(torch.equal(t, w) for t, w in zip(results, want))


@pytest.mark.gpu
def test_device_results_where_they_cannot_come_device_to_device_come_through_host_memory_onto_the_gpu(
    tmp_path: Path,
) -> None:
    """A new device region is zeroed, and counted while its session lives; past the
    session's budget, from a server with --cuda-ipc off, and from an AsyncClient:
    results_on="cuda" always gives tensors on the GPU, right."""
    # One serving process: with several (the default on a many-core GPU machine) the
    # supervisor serves the metrics, each labelled with its process.
    budget = start_server(tmp_path / "b", None, "--device", "cuda", "--compile-mode", "off", "--processes", "1",
                          "--shared-memory-max-bytes", str(12 << 20), "--metrics-port", "0")  # fmt: skip
    off = start_server(tmp_path / "o", None, "--device", "cuda", "--compile-mode", "off", "--cuda-ipc", "off")
    try:
        with Client(budget.target, timeout=300, shared_above=0) as c:
            k = c.register(_mix, [torch.ones(4), torch.ones(4)])
            small = torch.randn(1000, device="cuda")
            r = c.fallback_detailed(k, [small, small], results_on="cuda")
            assert r.transport == "cuda_ipc"
            session = c._pool.first.shared
            assert session is not None
            (region,) = [m for m in session._devices.values() if not isinstance(m, str)]
            seen = region.tensor()
            # A fresh region is zeroed before the client gets it: past the results, nothing of anyone's.
            assert seen.numel() >= 2 << 20 and not seen[8064:].any().item()
            del seen, region
            assert budget.metric("fuseport_shared_memory_device_output_bytes") == 2 << 20  # the H100's granule
        end = time.monotonic() + 10  # the server ends the session when the client's socket closes
        while budget.metric("fuseport_shared_memory_device_output_bytes") and time.monotonic() < end:
            time.sleep(0.05)
        assert budget.metric("fuseport_shared_memory_device_output_bytes") == 0
        a, b = torch.randn(1 << 20), torch.randn(1 << 20)  # 8 MiB in, 8 MiB out
        want = _mix(a.cuda(), b.cuda())
        for s, transport in ((budget, "shm"), (off, "shm")):
            with Client(s.target, timeout=300) as c:
                k = c.register(_mix, [torch.ones(4), torch.ones(4)])
                r = c.fallback_detailed(k, [a, b], results_on="cuda")
                assert r.transport == transport
                assert all(t.is_cuda and torch.equal(t, w) for t, w in zip(r.stack, want))

        async def run() -> ExecuteResult:
            async with AsyncClient(off.target, timeout=300) as ac:
                k = await ac.register(_mix, [torch.ones(4), torch.ones(4)])
                return await ac.fallback_detailed(k, [a.cuda(), b.cuda()], results_on="cuda")

        r = asyncio.run(run())
        assert all(t.is_cuda and torch.equal(t, w) for t, w in zip(r.stack, want))
    finally:
        budget.stop()
        off.stop()


@pytest.mark.gpu
def test_an_async_clients_results_come_device_to_device_too(cuda_server: ServerProcess) -> None:
    async def run() -> list[ExecuteResult]:
        async with AsyncClient(cuda_server.target, timeout=300) as ac:
            k = await ac.register(_mix, [torch.ones(4), torch.ones(4)])
            return list(await asyncio.gather(*(ac.fallback_detailed(k, [a, b], results_on="cuda")
                                               for a, b in _cuda_inputs(9))))  # fmt: skip

    for r, (a, b) in zip(asyncio.run(run()), _cuda_inputs(9)):
        assert r.transport == "cuda_ipc"
        assert all(t.is_cuda and torch.equal(t, w) for t, w in zip(r.stack, _mix(a.cuda(), b.cuda())))


# --------------------------------------------------------------------------- AsyncClient


def test_an_async_clients_large_stack_travels_through_shared_memory_and_comes_back_right(
    server: ServerProcess, key: int
) -> None:
    a, b = torch.randn(BIG), torch.randn(BIG)

    async def main() -> tuple[ExecuteResult, ExecuteResult]:
        async with AsyncClient(server.target) as c:
            return await c.execute_detailed(key, [7, a, b]), await c.execute_detailed(key, [a[:8], b[:8]])

    r, small = asyncio.run(main())
    assert r.transport == "shm"
    assert r.stack[0] == 7
    assert torch.equal(r.stack[1], a * 2 + b) and torch.equal(r.stack[2], (a - b).abs())
    assert small.transport == "unary"
    assert torch.equal(small.stack[0], a[:8] * 2 + b[:8])


def test_concurrent_coroutines_of_one_async_client_each_get_their_own_results(
    server: ServerProcess, key: int
) -> None:
    """More coroutines than the session has slots, sizes varying (regions grow): a
    call that read another's region would show as a wrong result; one that kept
    a slot would leave the session short of slots."""

    async def work(c: AsyncClient, seed: int) -> list[str]:
        g = torch.Generator().manual_seed(seed)
        errors = []
        for _ in range(3):
            n = BIG + int(torch.randint(0, BIG, (1,), generator=g))
            a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
            r = await c.execute_detailed(key, [a, b])
            if r.transport != "shm" or not torch.equal(r.stack[0], a * 2 + b):
                right = torch.equal(r.stack[0], a * 2 + b)
                errors.append(f"coroutine {seed}: transport {r.transport}, right {right}")
        return errors

    async def main() -> tuple[list[list[str]], int, int]:
        async with AsyncClient(server.target) as c:
            errors = await asyncio.gather(*(work(c, i) for i in range(12)))
            session = c._shared
            assert session is not None
            return errors, len(session._free), session.slots

    errors, free, slots = asyncio.run(main())
    assert errors == [[]] * 12
    assert free == slots


def test_a_cancelled_async_call_gives_its_slot_back(server: ServerProcess, key: int) -> None:
    a, b = torch.randn(BIG), torch.randn(BIG)

    async def main() -> tuple[int, int, list[str]]:
        async with AsyncClient(server.target) as c:
            assert (await c.execute_detailed(key, [a, b])).transport == "shm"
            session = c._shared
            assert session is not None
            # Cancelled at each of its awaits in turn: the slot wait, the copy in,
            # the call, the copy out.
            for steps in range(1, 12):
                task = asyncio.ensure_future(c.execute_detailed(key, [a, b]))
                for _ in range(steps):
                    await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # Every slot is usable again (a slot given back late, once its copy
            # thread ended, is given back before these get theirs).
            calls = asyncio.gather(*(c.execute_detailed(key, [a, b]) for _ in range(session.slots + 2)))
            rs = await asyncio.wait_for(calls, 120)  # a slot never given back would hang them
            return len(session._free), session.slots, [r.transport for r in rs if r.transport != "shm"]

    free, slots, others = asyncio.run(main())
    assert free == slots
    assert others == []


def test_an_async_call_cancelled_while_its_session_opens_leaves_that_session_to_the_client(
    server: ServerProcess, key: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's connect runs in a thread that a cancelled call cannot stop:
    the session it opens is the client's, used by the next call (not a second
    session, nor one left open and unused)."""
    from fuseport.client import shm as client_shm

    real = client_shm.SharedSession.__init__
    made: list[Any] = []
    entered, release = threading.Event(), threading.Event()

    def held_open(self: Any, *args: Any) -> None:
        made.append(self)
        entered.set()
        release.wait(30)  # until the call that opens it has been cancelled
        real(self, *args)

    monkeypatch.setattr(client_shm.SharedSession, "__init__", held_open)
    a, b = torch.randn(BIG), torch.randn(BIG)

    async def main() -> str:
        async with AsyncClient(server.target) as c:
            task = asyncio.ensure_future(c.execute_detailed(key, [a, b]))
            assert await asyncio.to_thread(entered.wait, 30)
            task.cancel()
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            r = await c.execute_detailed(key, [a, b])
            assert torch.equal(r.stack[0], a * 2 + b)
            assert len(made) == 1 and c._shared is made[0]
            return r.transport

    assert asyncio.run(main()) == "shm"


def test_an_async_client_whose_session_was_lost_uses_the_network_once_then_a_new_session(
    server: ServerProcess, key: int
) -> None:
    a, b = torch.randn(BIG), torch.randn(BIG)

    async def main() -> list[str]:
        async with AsyncClient(server.target) as c:
            assert (await c.execute_detailed(key, [a, b])).transport == "shm"
            lost = c._shared
            assert lost is not None
            held = len(_mappings(server.proc.pid))
            lost._sock.close()  # as if the connection broke: the server ends the session
            deadline = time.monotonic() + 30
            while len(_mappings(server.proc.pid)) >= held and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # until the server has unmapped it
            transports = []
            for _ in range(3):
                r = await c.execute_detailed(key, [a, b])
                assert torch.equal(r.stack[0], a * 2 + b)
                transports.append(r.transport)
            assert c._shared is not lost
            return transports

    assert asyncio.run(main()) == ["unary", "shm", "shm"]


def test_an_async_client_with_shared_memory_off_uses_the_network(server: ServerProcess, key: int) -> None:
    a, b = torch.randn(BIG), torch.randn(BIG)

    async def main() -> ExecuteResult:
        async with AsyncClient(server.target, shared_memory=False) as c:
            r = await c.execute_detailed(key, [a, b])
            assert c._shared is None
            return r

    r = asyncio.run(main())
    assert r.transport == "unary"
    assert torch.equal(r.stack[0], a * 2 + b)


def test_an_async_clients_kept_outputs_stay_on_the_server_while_inputs_come_through_shared_memory(
    server: ServerProcess, key: int
) -> None:
    a, b = torch.randn(BIG), torch.randn(BIG)

    async def main() -> None:
        async with AsyncClient(server.target) as c:
            r = await c.execute_detailed(key, [a, b], keep=True)
            assert r.transport == "shm"
            total, diff = r.stack
            assert isinstance(total, RemoteTensor)
            again = await c.execute_detailed(key, [total, b])
            assert again.transport == "shm"
            assert torch.equal(again.stack[0], (a * 2 + b) * 2 + b)
            (got,) = await c.fetch([diff])
            assert torch.equal(got, (a - b).abs())

    asyncio.run(main())


def test_an_async_clients_session_is_closed_with_the_client(server: ServerProcess, key: int) -> None:
    async def main() -> Any:
        async with AsyncClient(server.target) as c:
            assert (await c.execute_detailed(key, [torch.randn(BIG), torch.randn(BIG)])).transport == "shm"
            session = c._shared
        return session

    session = asyncio.run(main())
    assert session is not None and session.closed
    assert _until(server, (0, 0)) == (0, 0)


def test_an_async_clients_copies_and_socket_waits_run_off_the_loop(server: ServerProcess, key: int) -> None:
    """The session's blocking parts (its copies in, the waits on its socket, for the
    output regions too) run in threads: the loop's own thread is never the one that
    blocks. (Results are tensors over the regions: making them copies nothing.)"""
    a, b = torch.randn(BIG), torch.randn(BIG)
    threads: dict[str, set[int]] = {"write": set(), "wait_outputs": set(), "_wait": set()}

    async def main() -> tuple[int, list[str]]:
        async with AsyncClient(server.target) as c:
            assert (await c.execute_detailed(key, [a, b])).transport == "shm"
            session = c._shared
            assert session is not None
            for name in threads:
                real = getattr(session, name)

                def spy(*args: Any, _real: Any = real, _name: str = name) -> Any:
                    threads[_name].add(threading.get_ident())
                    return _real(*args)

                setattr(session, name, spy)
            bigger = torch.randn(4 * BIG)  # a larger input region: the session waits for the server's OK
            rs = await asyncio.gather(c.execute_detailed(key, [a, b]), c.execute_detailed(key, [bigger, bigger]))
            assert torch.equal(rs[1].stack[0], bigger * 3)
            return threading.get_ident(), [r.transport for r in rs]

    loop_thread, transports = asyncio.run(main())
    assert transports == ["shm", "shm"]
    assert threads["write"] and threads["wait_outputs"] and threads["_wait"]
    assert loop_thread not in threads["write"] | threads["wait_outputs"] | threads["_wait"]


@pytest.mark.gpu
def test_an_async_clients_cuda_tensors_travel_by_cuda_ipc_or_through_host_memory_when_refused(
    cuda_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AsyncClient: CUDA inputs go by CUDA IPC handle and match eager, coroutines of
    one client each get their own results; a handle the server cannot open (as in
    test_a_handle_the_server_cannot_open_sends_the_call_through_host_memory) sends
    the call through host memory."""
    from fuseport.wire import cuda_ipc

    pairs = _cuda_inputs(7) * 2
    wants = [[t.cpu() for t in _mix(a.cuda(), b.cuda())] for a, b in pairs]

    async def main(c: AsyncClient, k: int) -> list[ExecuteResult]:
        return await asyncio.gather(*(c.fallback_detailed(k, list(p)) for p in pairs))

    async def both() -> tuple[list[ExecuteResult], list[ExecuteResult]]:
        async with AsyncClient(cuda_server.target, timeout=300) as c:
            k = await c.register(_mix, [torch.ones(4), torch.ones(4)])
            by_ipc = await main(c, k)
        real = cuda_ipc.Driver.export

        def unopenable(self: Any, t: torch.Tensor) -> Any:
            e = real(self, t)
            return cuda_ipc.Export(os.urandom(64), e.offset, e.allocation_bytes, e.device_uuid)

        monkeypatch.setattr(cuda_ipc.Driver, "export", unopenable)
        async with AsyncClient(cuda_server.target, timeout=300) as c:
            k = await c.register(_mix, [torch.ones(4), torch.ones(4)])
            by_host = [await c.fallback_detailed(k, list(pairs[0]))] + await main(c, k)
        return by_ipc, by_host

    by_ipc, by_host = asyncio.run(both())
    for r, want in zip(by_ipc, wants):
        assert r.transport == "cuda_ipc"
        assert all(torch.equal(x, y) for x, y in zip(r.stack, want))
    for r, want in zip(by_host, [wants[0], *wants]):
        assert r.transport == "shm"
        assert all(torch.equal(x, y) for x, y in zip(r.stack, want))


# --------------------------------------------------------------------------- results over the output region


def _in_output_region(t: torch.Tensor) -> bool:
    """Whether a tensor's memory lies in a mapping of one of the server's output memfds."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        if "memfd:fuseport-out" in line:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start <= ptr and ptr + t.nbytes <= end:
                return True
    return False


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_results_are_tensors_over_the_output_region_kept_unchanged_by_later_calls(
    server: ServerProcess, key: int, kind: str
) -> None:
    """No copy on the client: the tensors view the region. One the caller keeps is never
    written again (the slot's next call gets a new region); once a result is gone, its
    region is written again (its pages warm)."""
    inputs = [(torch.randn(BIG), torch.randn(BIG)) for _ in range(4)]

    async def on_async() -> list[Any]:
        async with AsyncClient(server.target, shared_above=0) as c:
            return await _keep_then_drop(lambda s: c.execute(key, s), inputs)

    async def on_sync() -> list[Any]:
        with Client(server.target, shared_above=0) as c:
            return await _keep_then_drop(lambda s: _done(c.execute(key, s)), inputs)

    kept = asyncio.run(on_async() if kind == "async" else on_sync())
    a, b = inputs[0]
    assert _in_output_region(kept[0]) and _in_output_region(kept[1])
    assert torch.equal(kept[0], a * 2 + b) and torch.equal(kept[1], (a - b).abs())


async def _done(value: Any) -> Any:
    return value


async def _keep_then_drop(run: Any, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Any]:
    """The first result, kept through the other calls, whose results are dropped at once:
    those reuse one region (the same memory each call), never the kept one's."""
    kept = await run(list(inputs[0]))
    ptrs = []
    for a, b in inputs[1:]:
        out = await run([a, b])
        assert _in_output_region(out[0]) and torch.equal(out[0], a * 2 + b)
        ptrs.append(out[0].data_ptr())
        del out
    assert kept[0].data_ptr() not in ptrs
    assert len(set(ptrs)) == 1
    return kept  # type: ignore[no-any-return]


def test_result_tensors_outlive_the_client_and_a_lost_session(server: ServerProcess, key: int) -> None:
    a, b = torch.randn(BIG), torch.randn(BIG)
    with Client(server.target, shared_above=0) as c:
        lost = c.execute(key, [a, b])
        assert c._shared is not None and _in_output_region(lost[0])
        held = len(_mappings(server.proc.pid))
        c._shared._sock.close()  # as if the server had gone: it ends the session and unmaps it all
        deadline = time.monotonic() + 30
        while len(_mappings(server.proc.pid)) >= held and time.monotonic() < deadline:
            time.sleep(0.02)
        transports = [c.execute_detailed(key, [b, a]).transport for _ in range(2)]
        closed = c.execute(key, [b, a])
        assert transports == ["unary", "shm"] and _in_output_region(closed[0])
    # The client is closed and its sessions ended; the tensors hold their mappings themselves.
    assert torch.equal(lost[0], a * 2 + b) and torch.equal(lost[1], (a - b).abs())
    assert torch.equal(closed[0], b * 2 + a)


def test_a_kept_results_region_counts_until_its_last_tensor_dies_then_serves_again(
    server: ServerProcess, key: int
) -> None:
    assert _until(server, (0, 0)) == (0, 0)
    a, b = torch.randn(BIG), torch.randn(BIG)
    with Client(server.target, shared_above=0) as c:
        kept = c.execute(key, [a, b])
        view = kept[1][10:20]  # a view keeps the region as the tensor does
        second = c.execute(key, [b, a])  # a new output region; the kept one is retired, still counted
        assert _gauges(server) == (1, 3 << 20)  # the input region and two output regions
        del kept
        assert torch.equal(view, (a - b).abs()[10:20])
        del view  # the last one: the region is handed back to the server
        ptrs = set()
        for _ in range(4):  # each result kept until the next call returns: the two regions alternate
            second = c.execute(key, [a, b])
            assert torch.equal(second[0], a * 2 + b)
            ptrs.add(second[0].data_ptr())
        assert len(ptrs) == 2 and _gauges(server) == (1, 3 << 20)
    assert _until(server, (0, 0)) == (0, 0)


_FORKED_RESULTS = r"""
import os, sys, torch
torch.set_num_threads(1)  # torch's thread pool does not survive a fork
from fuseport.client import Client
c = Client(sys.argv[1], shared_above=0)
key = int(sys.argv[2])
a, b = torch.randn(%(big)d), torch.randn(%(big)d)
r = c.execute(key, [a, b])
want = r[0].clone()
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.read(go_r, 1)  # the parent's later calls are done
    os._exit(0 if torch.equal(r[0], want) else 3)
del r  # the parent's own tensors over the region are gone; the child's copy is not
for _ in range(3):
    z = torch.randn(%(big)d)
    out = c.execute(key, [z, z])
    assert torch.equal(out[0], z * 3)
    del out
os.write(go_w, b"x")
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), flush=True)
"""


def test_result_tensors_a_forked_child_holds_stay_unchanged_after_the_parents_calls(
    server: ServerProcess, key: int
) -> None:
    """The child's tensors share the region with the parent (MAP_SHARED): a region lent at
    the fork is never written again, even once the parent's own tensors over it are gone."""
    env = os.environ | {"GRPC_ENABLE_FORK_SUPPORT": "1", "GRPC_POLL_STRATEGY": "poll"}
    out = subprocess.run(
        [sys.executable, "-c", _FORKED_RESULTS % {"big": BIG}, server.target, str(key)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0"], out.stderr[-2000:]


# --------------------------------------------------------------------------- inputs read in place


def _aten_module(n: int, body: Any) -> torch.fx.GraphModule:
    """An fx graph of `n` inputs whose nodes call the aten ops `body(graph, inputs)` does."""
    g = torch.fx.Graph()
    xs = [g.placeholder(f"x{i}") for i in range(n)]
    g.output(body(g, xs))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def _planned(module: torch.fx.GraphModule, args: list[Any]) -> Any:
    from fuseport.server.checks import Planner

    return Planner(module, [], torch.device("cpu")).plan(args)


def test_inputs_a_check_reads_are_copied_out_of_the_region_and_the_rest_are_read_in_place() -> None:
    """The server runs kernels on the client's region itself, except for what decides
    whether they may run: an index a check reads must be the index the kernel reads."""
    from fuseport.server.core import _own_inputs

    aten = torch.ops.aten
    region = torch.zeros(1 << 12, dtype=torch.uint8)
    w = region[:64].view(torch.float32).view(8, 2)
    i = region[64:80].view(torch.int64)
    x = region[128:160].view(torch.float32)
    views = {id(t): t for t in (w, i, x)}

    def in_place(t: torch.Tensor) -> bool:
        return t.data_ptr() == views[id(t)].data_ptr() if id(t) in views else False

    # index_select(w, 0, i) + x: the index is copied, the table and the addend stay.
    picked = _aten_module(3, lambda g, xs: g.call_function(
        aten.add.Tensor, (g.call_function(aten.index_select.default, (xs[0], 0, xs[1])), xs[2])
    ))  # fmt: skip
    args = [w, i, x[:4].view(2, 2)]
    views[id(args[2])] = args[2]
    plan = _planned(picked, args)
    assert plan.error is None and plan.input_checks
    owned = _own_inputs(plan, args, views, keep=False)
    assert [in_place(a) for a in owned] == [True, False, True]
    assert torch.equal(owned[1], i) and owned[1].data_ptr() != i.data_ptr()
    # Results kept on the server may be views of an input, and later calls check them: all copied.
    assert not any(in_place(a) for a in _own_inputs(plan, args, views, keep=True))

    # The index is computed (i + 0, a value that may view the input): every input is copied.
    computed = _aten_module(2, lambda g, xs: g.call_function(
        aten.index_select.default, (xs[0], 0, g.call_function(aten.add.Scalar, (xs[1], 0)))
    ))  # fmt: skip
    plan = _planned(computed, [w, i])
    assert plan.checks_computed
    assert not any(in_place(a) for a in _own_inputs(plan, [w, i], views, keep=False))

    # Sizes that depend on the data (nonzero reads values to size its result): copied.
    sized = _aten_module(1, lambda g, xs: g.call_function(aten.nonzero.default, (xs[0],)))
    plan = _planned(sized, [x])
    assert plan.output_bytes is None
    assert not any(in_place(a) for a in _own_inputs(plan, [x], views, keep=False))

    # Nothing checked: every input stays in the region (no pass over its bytes).
    plain = _aten_module(2, lambda g, xs: g.call_function(aten.mul.Tensor, (xs[0], xs[1])))
    plan = _planned(plain, [x, x])
    assert all(in_place(a) for a in _own_inputs(plan, [x, x], views, keep=False))


def _pick_rows(w: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    return torch.index_select(w, 0, i) * 2


def test_an_index_the_client_rewrites_during_calls_is_checked_as_the_kernel_reads_it(
    server: ServerProcess,
) -> None:
    """A client flips its index between valid and far out of range while its calls run:
    each call answers the rows of a valid index or refuses an out-of-range one, and the
    server keeps serving (a check of one value and a kernel reading another would read
    far outside the table)."""
    with Client(server.target) as c:
        key = c.register(_pick_rows, [torch.ones(4, 2), torch.zeros(1, dtype=torch.int64)])
    r = RawSession(server)
    try:
        assert r.hello().kind == shm.OK  # type: ignore[union-attr]
        w = torch.arange(8, dtype=torch.float32).view(4, 2)
        fd, m = _sealed(1 << 20, w.numpy().tobytes())
        assert r.hand_over(fd, 1, 1 << 20).kind == shm.OK  # type: ignore[union-attr]
        r.key = key  # type: ignore[attr-defined]
        stack = [codec.Shared(1, 0, torch.float32, (4, 2), 32), codec.Shared(1, 64, torch.int64, (1,), 8)]
        good, bad = (2).to_bytes(8, "little"), (1 << 40).to_bytes(8, "little")
        stop = threading.Event()

        def flip() -> None:
            while not stop.is_set():
                m[64:72] = good
                m[64:72] = bad

        flipper = threading.Thread(target=flip, daemon=True)
        flipper.start()
        answers = set()
        try:
            for _ in range(60):
                code, kind, details = r.execute(stack, slot=1)
                if code == grpc.StatusCode.OK:
                    out = r.response.stack[0]
                    assert isinstance(out, codec.Shared) and out.shape == (1, 2)
                    answers.add("rows")
                else:
                    refused = (grpc.StatusCode.INVALID_ARGUMENT, "ExecutionFailed")
                    assert (code, kind) == refused, (code, details)
                    assert "out of range" in details
                    answers.add("refused")
        finally:
            stop.set()
            flipper.join()
        assert answers  # every call answered, one way or the other
        m[64:72] = good
        assert r.execute(stack)[0] == grpc.StatusCode.OK
        assert torch.equal(r.response.stack[0], w[2:3] * 2)
    finally:
        r.close()


def _plus0(x: torch.Tensor) -> torch.Tensor:
    return x + 0


def _status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_a_large_call_through_shared_memory_holds_only_its_result_in_server_memory(tmp_path: Path) -> None:
    """96 MiB in, 96 MiB out: at its peak the server's own memory (beside the session's
    regions, which the client maps too and which count against its budget) holds the
    kernel's result alone, its input read in the client's region, where a copy of the
    input made it 2x the payload (issue 21: <= 1.5x)."""
    s = start_server(
        tmp_path, None, "--compile-mode", "off", "--processes", "1", "--shared-memory-max-bytes", str(1 << 30)
    )
    try:
        with Client(s.target, timeout=120, shared_above=0) as c:
            k = c.register(_plus0, [torch.zeros(16, dtype=torch.int32)])
            assert c.execute(k, [torch.arange(8, dtype=torch.int32)])[0].tolist() == list(range(8))
            x = torch.randint(-(2**31), 2**31 - 1, ((96 << 20) // 4,), dtype=torch.int32)
            pid = s.proc.pid
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM from here
            base, shared = _status_bytes(pid, "VmRSS"), _status_bytes(pid, "RssShmem")
            r = c.execute_detailed(k, [x])
            # The regions stay mapped and touched: what they added is in RssShmem now.
            regions = _status_bytes(pid, "RssShmem") - shared
            grown = _status_bytes(pid, "VmHWM") - base - regions
            assert r.transport == "shm" and torch.equal(r.stack[0], x)
        assert regions > 1.9 * x.nbytes  # the input region and the output region, both touched
        assert grown <= 1.5 * x.nbytes, f"the server grew by {grown >> 20} MiB for a {x.nbytes >> 20} MiB call"
    finally:
        s.stop()


def test_a_region_handed_back_before_its_call_retired_it_is_not_lost(server: ServerProcess) -> None:
    # The client retires its slot's output region when it sends a call that asks for a
    # fresh one; if that call fails on the server (or has not placed its results yet) when
    # the last result over the region dies, the client's SPARE found it still the slot's.
    # The server dropped the SPARE and retired the region later for good: each such call
    # left an output region counted against the session's budget until it ended (found by
    # an adversarial probe: 12 MiB grew to 40 MiB).
    with Client(server.target) as c:
        key = c.register(lambda x, y: x + y, [torch.randn(4, 8), torch.randn(4, 8)])
        x = torch.randn(1024, 256)  # 1 MiB: by shared memory
        bad = torch.randn(1023, 256)  # the server refuses the call (its sizes differ)
        r = c.execute(key, [x, x])[0]
        del r
        gc.collect()
        c.execute(key, [x, x])
        _, before = _gauges(server)
        for _ in range(6):
            r = c.execute(key, [x, x])[0]  # a result over the slot's region, kept
            with pytest.raises(FuseportError):
                c.execute(key, [x, bad])  # retires that region on the client
            del r
            gc.collect()  # its last tensor dies: SPARE
        assert torch.equal(c.execute(key, [x, x])[0], x + x)
        _, after = _gauges(server)
        assert after - before <= 2 * (1 << 20), (before, after)


def test_a_page_locked_region_is_unregistered_off_the_collecting_thread_before_it_is_unmapped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The page lock's bookkeeping with the CUDA driver replaced by a recorder (no GPU
    here; the gpu tests run the real one): a region collected as part of a cycle, by a
    collection that happens while this thread holds the SharedMemory's lock (as any
    allocation under it may trigger), is queued, not unregistered there (that deadlocked);
    the unregistering thread finds its mapping still open; a region past the bound is
    not locked."""
    from fuseport.server.shm import SharedMemory
    from fuseport.wire import cuda_ipc

    events: list[tuple[str, int, bool]] = []
    mappings: dict[int, Any] = {}  # weak: the test itself must not keep a mapping alive

    class Recorder:
        def host_register(self, ordinal: int, ptr: int, nbytes: int) -> None:
            events.append(("register", nbytes, True))

        def host_unregister(self, ordinal: int, ptr: int) -> None:
            mapping = mappings[ptr]()
            events.append(("unregister", ptr, mapping is not None and not mapping.closed))

    monkeypatch.setattr(cuda_ipc, "driver", lambda: Recorder())
    shared = SharedMemory(True, 1 << 30, page_lock=torch.device("cuda", 0), page_lock_bytes=3 << 20)
    region, fd = shm.create_region(1, 2 << 20, "test-lock")
    os.close(fd)
    over, fd = shm.create_region(2, 2 << 20, "test-over")
    os.close(fd)
    mappings[region.bytes.data_ptr()] = weakref.ref(region.mapping)
    shared._lock_pages(region)
    shared._lock_pages(over)  # 2 + 2 MiB: past the 3 MiB bound
    assert events == [("register", 2 << 20, True)] and shared.locked_bytes == 2 << 20
    cycle: list[Any] = [region]
    cycle.append(cycle)
    del region, cycle, over

    def collect() -> None:
        with shared._lock:
            gc.collect()  # the finalizer runs here, under the lock

    collecting = threading.Thread(target=collect, daemon=True)
    collecting.start()
    collecting.join(10)
    assert not collecting.is_alive(), "the finalizer waited for the lock its own thread holds"
    deadline = time.monotonic() + 10
    while shared.locked_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert shared.locked_bytes == 0
    assert events[1:] == [("unregister", next(iter(mappings)), True)]


class _StandInMemory:
    """A stand-in for cuda_ipc.DeviceMemory: a memfd mapped here (an export is its
    descriptor, an import maps it, as the driver does with device memory). Fresh
    memory is not zeroed: it is filled with 0xAB."""

    def __init__(self, size: int, fds: list[int], fd: int | None = None) -> None:
        self.size, self.ordinal = size, 0
        self.fd = os.dup(fd) if fd is not None else os.memfd_create("stand-in-device", os.MFD_CLOEXEC)
        fds.append(self.fd)
        if fd is None:
            os.ftruncate(self.fd, size)
        self.bytes = torch.frombuffer(mmap.mmap(self.fd, size), dtype=torch.uint8)
        if fd is None:
            self.bytes.fill_(0xAB)

    def tensor(self) -> torch.Tensor:
        return self.bytes

    def export_fd(self) -> int:
        return os.dup(self.fd)


class _StandInDriver:
    """A stand-in for cuda_ipc.Driver (no GPU here; the gpu tests run the real one)."""

    def __init__(self) -> None:
        self.fail = False  # import_fd raises, as for a descriptor the driver cannot map
        self.fds: list[int] = []
        self._uuid = os.urandom(16)

    def allocate(self, ordinal: int, size: int) -> _StandInMemory:
        return _StandInMemory(size, self.fds)

    def import_fd(self, ordinal: int, fd: int, size: int) -> _StandInMemory:
        from fuseport.wire import cuda_ipc

        if self.fail:
            raise cuda_ipc.CudaError("cuMemImportFromShareableHandle", 1, "CUDA_ERROR_INVALID_VALUE")
        return _StandInMemory(size, self.fds, fd)

    def uuid(self, ordinal: int) -> bytes:
        return self._uuid

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)  # the mappings keep their memory


def test_device_output_regions_bookkeeping_with_a_stand_in_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Results on the client's GPU, the server's side, with the CUDA driver replaced by a
    stand-in whose allocations are host memory (no GPU here; the gpu tests run the real
    one): each slot gets a zeroed region, sent once (CUDA_OUTPUT with a descriptor) and
    reused until outgrown; calls on many slots at once, from threads, neither hang nor
    leave the count of device bytes off; past the process's cap the results go through
    the host region; the session's end takes the count back to 0."""
    from fuseport.server.resident import Owner
    from fuseport.server.shm import SharedMemory
    from fuseport.wire import cuda_ipc

    driver = _StandInDriver()
    monkeypatch.setattr(cuda_ipc, "driver", lambda: driver)
    shared = SharedMemory(True, 64 << 20)
    shared.start()
    uuid = driver.uuid(0)
    shared.cuda_devices, shared.cuda_outputs = [uuid], True
    shared._granularity, shared._device_output_cap = 1 << 20, 6 << 20
    owner = Owner(b"client", True)
    address, ticket, sid = shared.open(owner)
    sock = shm.connect(address, 10)
    try:
        shm.send_packet(sock, shm.Packet(shm.HELLO, text=ticket))
        assert shm.recv_packet(sock).kind == shm.OK  # type: ignore[union-attr]
        x = torch.arange(1000, dtype=torch.float32)
        out = shared.place(owner, sid, 1, [7, x, x * 2], cuda=True)
        assert out[0] == 7 and all(v.cuda_device == uuid for v in out[1:])
        region = shared._sessions[sid].devices[1][1]
        assert torch.equal(region.bytes[:4000].view(torch.float32), x)
        assert not region.bytes[8064:].any()  # zeroed before it was handed over
        p = shm.recv_packet(sock)
        assert p is not None and (p.kind, p.slot, p.size) == (shm.CUDA_OUTPUT, 1, 1 << 20) and p.fd is not None
        os.close(p.fd)
        again = shared.place(owner, sid, 1, [x], cuda=True)
        assert again[0].region == out[1].region  # reused: nothing sent
        errors: list[BaseException] = []

        def calls(slot: int) -> None:
            try:
                for n in (1 << 18, 1 << 19, 1 << 18):  # 1, 2, 1 MiB of float32: grows once
                    (v,) = shared.place(owner, sid, slot, [torch.ones(n)], cuda=True)
                    assert isinstance(v, codec.Shared)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=calls, args=(slot,), daemon=True) for slot in range(2, 10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a call hung"
        assert not errors, errors
        session = shared._sessions[sid]
        held = sum(m.size for _, m in session.devices.values())
        assert shared.device_output_bytes == held <= 6 << 20
        placed = [shared.place(owner, sid, slot, [torch.ones(1 << 20)], cuda=True)[0] for slot in range(2, 10)]
        assert any(not v.cuda_device for v in placed)  # 4 MiB each: past the cap, the host region
        shared._end(session, "test")
        assert shared.device_output_bytes == 0 and not session.devices
    finally:
        sock.close()
        shared.close()
        driver.close()


def test_results_on_the_device_reach_the_client_with_a_stand_in_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sides of results on the client's GPU in one process, with the CUDA driver
    replaced by a stand-in whose allocations are memfds (an export is the descriptor, an
    import maps it: what the driver does with device memory): the client maps each
    region it is sent, copies the results out (copies: the slot's next call changes
    nothing of them), lets a region go when its slot gets a larger one, and a region it
    cannot map is CudaIpcUnavailable naming it (the client then runs the call again
    through host memory: see Client._shared_flow)."""
    from fuseport.client.shm import SharedSession
    from fuseport.server.resident import Owner
    from fuseport.server.shm import SharedMemory
    from fuseport.wire import cuda_ipc
    from fuseport.wire.errors import CudaIpcUnavailable

    driver = _StandInDriver()
    monkeypatch.setattr(cuda_ipc, "driver", lambda: driver)
    uuid = driver.uuid(0)
    shared = SharedMemory(True, 64 << 20)
    shared.start()
    shared.cuda_devices, shared.cuda_outputs = [uuid], True
    shared._granularity, shared._device_output_cap = 1 << 20, 16 << 20
    owner = Owner(b"client", True)
    address, ticket, sid = shared.open(owner)
    opened = _pb.service.OpenSharedMemoryResponse(
        socket=address, ticket=ticket, session=sid, max_bytes=64 << 20, max_slots=8, fresh_outputs=True,
        cuda_devices=[uuid], cuda_outputs=True,
    )  # fmt: skip
    session = SharedSession(opened, 10)
    try:
        session.cuda_devices, session.cuda_outputs = frozenset([uuid]), True  # in this process it would not try
        assert session.device_results(torch.device("cuda", 0))
        x = torch.arange(1000, dtype=torch.float32)
        first = session.read(shared.place(owner, sid, 1, [7, x, x * 2], cuda=True))
        assert first[0] == 7 and torch.equal(first[1], x) and torch.equal(first[2], x * 2)
        second = session.read(shared.place(owner, sid, 1, [x + 1], cuda=True))
        assert torch.equal(second[0], x + 1) and torch.equal(first[1], x)  # the first call's results: copies
        big = torch.ones(1 << 19)  # 2 MiB: the slot's 1 MiB region is outgrown
        assert torch.equal(session.read(shared.place(owner, sid, 1, [big], cuda=True))[0], big)
        assert len(session._devices) == 1 and session._slot_devices[1] in session._devices
        driver.fail = True
        with pytest.raises(CudaIpcUnavailable, match="cannot map the server's device output region"):
            session.read(shared.place(owner, sid, 2, [x], cuda=True))
    finally:
        session.close()
        shared.close()
        driver.close()


def test_a_split_copy_is_exact_at_every_size_and_in_a_forked_child(
    server: ServerProcess, key: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's copies into its input region from SPLIT_FROM go in pieces over
    threads of its own (wire.shm.copy_into(split=True)): byte for byte at sizes that
    do not divide, across dtypes, from threads at once, and in a child forked after the
    parent used them (the parent's threads are not there: it must not wait for them)."""
    splits: list[int] = []
    split_memmove = shm._split_memmove
    monkeypatch.setattr(shm, "_split_memmove", lambda d, s, n: (splits.append(n), split_memmove(d, s, n)))
    with Client(server.target, shared_above=0) as c:  # the client's own copies go this way
        x, y = torch.randn((5 << 20) // 4 + 3), torch.randn((5 << 20) // 4 + 3)
        r = c.execute_detailed(key, [x, y])
        assert r.transport == "shm"
        assert all(torch.equal(a, b) for a, b in zip(r.stack, _mix(x, y)))
    assert splits.count(x.numel() * 4) == 2
    monkeypatch.undo()
    sources = [torch.frombuffer(bytearray(os.urandom((9 << 20) + i)), dtype=torch.uint8) for i in range(6)]
    outs = [torch.zeros_like(t) for t in sources]
    threads = [threading.Thread(target=shm.copy_into, args=(o, t, True)) for o, t in zip(outs, sources)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(o, t) for o, t in zip(outs, sources))
    for n in (1, shm.SPLIT_FROM - 1, shm.SPLIT_FROM, shm.SPLIT_FROM + 3, (17 << 20) + 5, (65 << 20) + 1):
        src = torch.frombuffer(bytearray(os.urandom(n)), dtype=torch.uint8)
        dst = torch.frombuffer(bytearray(n), dtype=torch.uint8)
        shm.copy_into(dst, src, split=True)
        assert torch.equal(dst, src), n
    x = torch.randn(3 << 20)
    region = torch.zeros(x.numel() * 4, dtype=torch.uint8)
    shm.copy_into(region, x, split=True)
    assert torch.equal(region.view(torch.float32), x)
    pid = os.fork()
    if pid == 0:  # the child: no torch op that may start a thread pool, only the copy
        code = 1
        try:
            raw = bytearray(os.urandom(9 << 20))
            out = bytearray(len(raw))
            shm.copy_into(torch.frombuffer(out, dtype=torch.uint8), torch.frombuffer(raw, dtype=torch.uint8),
                          split=True)  # fmt: skip
            code = 0 if out == raw else 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's split copy did not finish in 60 s")
    assert os.waitstatus_to_exitcode(done[1]) == 0
