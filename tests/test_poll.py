"""The serving loop's busy poll (--busy-poll-us, server/rpc/poll.py): it polls after
a call while calls come close together, stops while they come far apart, and burns
nothing at rest. What it saves is measured in scripts/call_stages.py (docs/perf.md)."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fuseport.bench.procs import serving_cpu_us
from fuseport.client import Client
from fuseport.server.rpc.poll import BusyPoll
from fuseport.server.settings import Settings

from .conftest import ServerProcess, start_server


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def idle_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop never run: a poll's turns are queued on it, not taken."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _gap(poll: BusyPoll, clock: Clock, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
    """One call after `seconds` of rest."""
    clock.now += seconds
    poll.begin()
    poll.end(loop)


def test_the_window_closes_while_calls_come_further_apart_than_its_limit(
    idle_loop: asyncio.AbstractEventLoop,
) -> None:
    clock = Clock()
    poll = BusyPoll(2000, clock)
    _gap(poll, clock, idle_loop, 0)
    windows = []
    for _ in range(8):
        _gap(poll, clock, idle_loop, 0.005)  # 5 ms apart: past 2 ms, a poll would only burn
        windows.append(poll.window)
    assert windows[0] == pytest.approx(0.001)
    assert windows == sorted(windows, reverse=True)
    assert poll.window == 0.0, windows
    assert poll.caught == 0


def test_the_window_grows_back_until_it_catches_calls_that_come_close_together(
    idle_loop: asyncio.AbstractEventLoop,
) -> None:
    clock = Clock()
    poll = BusyPoll(2000, clock)
    poll.window = 0.0
    _gap(poll, clock, idle_loop, 0)
    for _ in range(10):
        _gap(poll, clock, idle_loop, 0.0007)
    assert 0.0007 <= poll.window <= 0.002
    caught = poll.caught
    for _ in range(5):
        _gap(poll, clock, idle_loop, 0.0007)
    assert poll.caught == caught + 5


def test_a_poll_stops_at_its_window_or_when_a_call_arrives() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        poll = BusyPoll(2000)
        poll.begin()
        poll.end(loop)
        assert poll.spinning
        while poll.spinning:
            await asyncio.sleep(0.001)
        # Its window ran out with no call: a miss, counted as it ends; at most the window
        # polled (its first turn came after end(), and each turn checks the time).
        assert poll.missed == 1 and poll.caught == 0
        assert 0 < poll.polled

        poll.begin()
        poll.end(loop)  # polling again, for at most 2 ms
        poll.begin()  # a call: its own time is not polling, and the poll stops at its next turn
        polled = poll.polled
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not poll.spinning
        assert poll.polled == polled
        poll.end(loop)

    asyncio.run(main())


def test_no_poll_when_it_is_off_or_after_a_call_that_used_a_worker() -> None:
    async def main() -> None:
        poll = BusyPoll(0)
        poll.begin()
        poll.end(asyncio.get_running_loop())
        assert not poll.spinning
        poll = BusyPoll(2000)
        poll.begin()
        poll.end(asyncio.get_running_loop(), ran_on_loop=False)
        assert not poll.spinning
        poll.begin()  # no gap to learn from
        assert poll.window == 0.002 and poll.caught == 0

    asyncio.run(main())


def test_a_poll_keeps_the_gpu_warm_every_so_often_and_a_warm_that_fails_stops_only_itself() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        clock = Clock()
        warmed: list[float] = []
        poll = BusyPoll(2000, clock, warm=lambda: warmed.append(clock.now) is None, warm_every_us=200)
        poll.begin()
        poll.end(loop)
        for _ in range(30):  # 30 turns 50 us apart: 1.5 ms of polling
            clock.now += 50e-6
            await asyncio.sleep(0)
        # Not at once (the call that just ended kept the device busy), then every 200 us.
        assert len(warmed) == 7 and poll.warmed == 7, warmed
        assert all(b - a == pytest.approx(200e-6) for a, b in zip(warmed, warmed[1:]))
        assert warmed[0] - 100.0 == pytest.approx(200e-6)
        poll.begin()
        poll.end(loop)

        def broken() -> bool:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        poll.warm = broken
        for _ in range(10):
            clock.now += 50e-6
            await asyncio.sleep(0)
        assert poll.warm is None and poll.spinning  # it polls on without warming
        clock.now += 0.01
        await asyncio.sleep(0)
        assert not poll.spinning

    asyncio.run(main())
    # Nothing to call without an interval; bounded.
    assert BusyPoll(2000, warm=lambda: True).warm is None
    assert BusyPoll(2000, warm=None, warm_every_us=200).warm_every == 0  # a CPU server: no metric either
    assert Settings().busy_poll_gpu_us == 200
    with pytest.raises(ValueError, match="busy_poll_gpu_us"):
        Settings(busy_poll_gpu_us=-1)


def test_busy_poll_us_is_bounded() -> None:
    with pytest.raises(ValueError, match="busy_poll_us"):
        Settings(busy_poll_us=-1)
    with pytest.raises(ValueError, match="busy_poll_us"):
        Settings(busy_poll_us=2_000_000)


@pytest.fixture(scope="module")
def polling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One serving process (its loop is the one measured), default busy poll, metrics on."""
    s = start_server(tmp_path_factory.mktemp("poll"), None, "--processes", "1", "--metrics-port", "0")
    yield s
    s.stop()


def _metrics(server: ServerProcess) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=30) as resp:  # noqa: S310 - loopback
        return str(resp.read().decode())


def test_a_server_polls_between_calls_back_to_back_and_burns_nothing_at_rest(polling: ServerProcess) -> None:
    with Client(polling.target) as c:
        key = c.register(lambda x: x * 2.0 + 1.0, [torch.zeros(256)])
        x = torch.randn(256)
        for _ in range(200):
            assert torch.equal(c.execute(key, [x])[0], x * 2.0 + 1.0)
    # Back to back over loopback, the next call comes well within 2 ms, nearly always.
    caught = polling.metric('fuseport_busy_poll_calls_total{outcome="caught"}')
    assert caught > 0
    assert polling.metric("fuseport_busy_poll_seconds_total") > 0
    assert 0 < polling.metric("fuseport_busy_poll_window_seconds") <= 0.002
    assert "fuseport_busy_poll_gpu_kernels" not in _metrics(polling)  # a CPU server has no GPU to keep warm
    # A call through shared memory runs on a worker: the loop polls after none of them
    # (the first may be caught by the poll after the last small call).
    with Client(polling.target, shared_above=0) as c:
        key = c.register(lambda x: x * 2.0 + 1.0, [torch.zeros(256)])
        for _ in range(20):
            r = c.execute_detailed(key, [x])
            assert r.transport == "shm" and torch.equal(r.stack[0], x * 2.0 + 1.0)
    assert polling.metric('fuseport_busy_poll_calls_total{outcome="caught"}') <= caught + 2
    # At rest, no call in flight: a loop that went on polling would use the whole second.
    before = serving_cpu_us(polling.proc.pid)
    time.sleep(1.0)
    assert serving_cpu_us(polling.proc.pid) - before < 300_000


def test_a_server_told_not_to_poll_has_no_poll_metrics(tmp_path: Path) -> None:
    s = start_server(
        tmp_path, None, "--processes", "1", "--metrics-port", "0", env={"FUSEPORT_BUSY_POLL_US": "0"}
    )
    try:
        with Client(s.target) as c:
            key = c.register(lambda x: x + 1, [torch.zeros(4)])
            for _ in range(20):
                c.execute(key, [torch.zeros(4)])
        assert "fuseport_busy_poll" not in _metrics(s)
    finally:
        s.stop()


def test_an_embedded_server_does_not_poll_unless_told(tmp_path: Path) -> None:
    """In a program's own process the polling loop would contend for the GIL with the
    program's threads (its caller among them): create_server's default is no poll."""
    from fuseport.server import create_server

    async def polls(**kw: int) -> float:
        settings = Settings(
            host="127.0.0.1", port=0, store_dir=tmp_path, device="cpu", compile_mode="off", **kw
        )
        server, _ = await create_server(settings)
        await server.start()
        try:
            return server.plumbing.poll.max
        finally:
            await server.stop(0)

    assert asyncio.run(polls()) == 0
    assert asyncio.run(polls(busy_poll_us=500)) == pytest.approx(0.0005)


@pytest.mark.gpu
def test_a_cuda_servers_poll_keeps_the_gpu_warm_by_default_and_results_stay_right(tmp_path: Path) -> None:
    s = start_server(tmp_path, None, "--device", "cuda", "--processes", "1", "--metrics-port", "0")
    try:
        with Client(s.target) as c:
            key = c.register(lambda x: x * 2.0 + 1.0, [torch.zeros(256)])
            x = torch.randn(256)
            c.execute(key, [x], wait=True, timeout=600)
            for i in range(300):
                y = x + i
                assert torch.equal(c.execute(key, [y])[0], y * 2.0 + 1.0)
                if i % 50 == 0:
                    time.sleep(0.0015)  # a gap the poll spans: it warms the GPU meanwhile
        assert s.metric("fuseport_busy_poll_gpu_kernels_total") > 0
    finally:
        s.stop()
