"""Device faults stay local: one serving process's device fails, the others keep serving.

The server's checks exist to keep any graph from failing the device, so the
fault is injected on purpose: a server started with FUSEPORT_FAULT_INJECTION=1
breaks its device when a call carries the metadata FAULT_METADATA (on CUDA a
real device-side assert, which poisons that process's context; on the CPU the
error type such an assert raises). Either way the same path runs as for a real
failure: the call that caused it fails with INTERNAL (not retried: it could take
the next process down too), the process drains and exits with EXIT_DEVICE_FAILED,
the supervisor starts a fresh one, and the clients' calls meanwhile succeed
(refused with UNAVAILABLE, they are retried on the other process).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from fuseport.client import Client, capture
from fuseport.server.app import EXIT_DEVICE_FAILED, FAULT_METADATA, PROCESS_METADATA_KEY
from fuseport.server.core import Core
from fuseport.server.settings import Settings
from fuseport.wire import _pb, codec
from fuseport.wire.errors import ERROR_METADATA_KEY, InternalError, Unavailable

from .conftest import ServerProcess, start_server
from .test_procs import _METHOD, _children, _Conn, _conns_on

# The target: capacity back within this long after a device fault. Judged
# on the GPU machine; on the 2-core CI machine, where a fresh process's torch import
# and its first call's lazy imports took 20-38 s under the test's load, the test
# waits up to WAIT_SECONDS and reports the time (docs/perf.md) without judging it.
CAPACITY_BACK_SECONDS = 30.0
WAIT_SECONDS = 180.0
CLIENTS = 4


def _affine(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def _faulty_supervisor(tmp: Path, device: str) -> ServerProcess:
    # Log level warning: compile mode off logs every call's fallback at info, which
    # on two cores slowed the replacement's start by seconds.
    return start_server(
        tmp, None, "--processes", "2", "--device", device, "--compile-mode", "off", "--log-level", "warning",
        env={"FUSEPORT_FAULT_INJECTION": "1"},
    )  # fmt: skip


def _conn_on(target: str, pid: int, deadline: float, log: Callable[[], str]) -> _Conn:
    """A connection to process `pid`, which may still be starting: new connections (the
    kernel spreads them over the processes listening) until it answers one."""
    while True:
        conn = _Conn(target)
        if conn.pid() == pid:
            return conn
        conn.close()
        assert time.monotonic() < deadline, f"process {pid} never answered: {log()[-3000:]}"
        time.sleep(0.05)  # a poll interval, not a readiness wait: the answer above is the condition


def _process_id(conn: _Conn) -> str:
    """The serving process's own random id (ListResponse.resident.server), as a Client sees it too."""
    raw, _ = conn.call("List", _pb.service.ListRequest().SerializeToString())
    return _pb.service.ListResponse.FromString(raw).resident.server


def _clients_on(target: str, ids: dict[str, int], each: int) -> list[Client]:
    """`each` real clients (each with a connection of its own) on every process of `ids`."""
    found: dict[str, list[Client]] = {i: [] for i in ids}
    for _ in range(400):
        c = Client(target, timeout=60, options=[("grpc.use_local_subchannel_pool", 1)])
        reached = found.get(c.resident().server)
        if reached is not None and len(reached) < each:
            reached.append(c)
            if all(len(v) == each for v in found.values()):
                return [c for v in found.values() for c in v]
        else:
            c.close()
    raise AssertionError(f"400 connections did not give {each} clients on each process: {found}")


def _a_device_fault_stays_in_its_process(s: ServerProcess) -> float:
    """The test body, on whatever device the supervisor `s` serves: returns the
    seconds from the fault to both processes serving again."""
    graph = capture(_affine, [torch.randn(64)])
    pids = _children(s.proc.pid)
    conns = _conns_on(s.target, pids)
    victim, survivor = sorted(pids)
    key = conns[survivor].register(graph)
    x = torch.randn(64)
    for conn in conns.values():  # both serve it before the fault
        torch.testing.assert_close(conn.execute(key, [x])[0][0], _affine(x))

    ids = {_process_id(conns[p]): p for p in pids}
    clients = _clients_on(s.target, ids, CLIENTS // 2)  # two on the process that fails
    failures: list[str] = []
    answered = [0] * len(clients)
    progress = threading.Condition()
    stop = threading.Event()

    def caller(i: int, c: Client) -> None:
        gen = torch.Generator().manual_seed(i)
        while not stop.is_set():
            x = torch.randn(64, generator=gen)
            try:
                out = c.execute(key, ["below", x])
                assert out[0] == "below", out
                torch.testing.assert_close(out[1], _affine(x))
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                failures.append(f"client {i}: {type(e).__name__}: {e}")
            with progress:
                answered[i] += 1
                progress.notify_all()

    def each_answered(more: int) -> None:
        with progress:
            goal = [n + more for n in answered]
            ok = progress.wait_for(
                lambda: all(n >= g for n, g in zip(answered, goal, strict=True)), timeout=120
            )
        assert ok, f"the clients stalled: {answered} of {goal}; {failures[:3]}; {s.log()[-3000:]}"

    threads = [threading.Thread(target=caller, args=(i, c), daemon=True) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    try:
        each_answered(5)
        # Other metadata values mean nothing, even here.
        request = codec.encode_execute_request(key, [x])
        execute = conns[victim].channel.unary_unary(
            _METHOD.format("Execute")
        )  # no retries: the status as sent
        raw, _ = execute.with_call(request, timeout=60, metadata=(("fuseport-inject-fault", "cuda"),))
        torch.testing.assert_close(codec.decode_execute_response(raw).stack[0], _affine(x))

        with pytest.raises(grpc.RpcError) as e:
            execute.with_call(request, timeout=60, metadata=(FAULT_METADATA,))
        faulted = time.monotonic()
        # The call that broke the device fails, and is not retried: a retry could break the next one.
        assert e.value.code() is grpc.StatusCode.INTERNAL, e.value.details()
        assert "device-side assert" in e.value.details() and "not retried" in e.value.details(), (
            e.value.details()
        )
        trailing = dict(e.value.trailing_metadata())
        assert trailing[ERROR_METADATA_KEY] == "InternalError"
        index, pid = trailing[PROCESS_METADATA_KEY].split()
        assert int(pid) == victim

        # The other process serves on, while the victim drains and exits.
        stack, pid = conns[survivor].execute(key, [x])
        assert pid == survivor
        torch.testing.assert_close(stack[0], _affine(x))
        deadline = faulted + WAIT_SECONDS
        while f"process {index} died (status {EXIT_DEVICE_FAILED})" not in s.log():
            assert time.monotonic() < deadline, f"the failed process did not exit: {s.log()[-3000:]}"
            stop.wait(0.05)
        # The supervisor starts a fresh one in its place, serving the same store.
        while len(new := _children(s.proc.pid) - {victim, survivor}) != 1:
            assert time.monotonic() < deadline, f"no new process: {s.log()[-3000:]}"
            stop.wait(0.05)
        (replacement,) = new
        conn = _conn_on(s.target, replacement, deadline, s.log)
        stack, pid = conn.execute(key, [x])
        back = time.monotonic() - faulted
        conn.close()
        assert pid == replacement
        torch.testing.assert_close(stack[0], _affine(x))
        each_answered(5)  # and every client goes on
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        for c in clients:
            c.close()
    assert not failures, failures[:5]
    assert victim not in _children(s.proc.pid)
    print(f"device fault: both processes serve again {back:.1f} s after it")  # shown with -s
    return back


def test_the_call_that_failed_the_device_gets_internal_and_every_later_one_unavailable(
    tmp_path: Path,
) -> None:
    """In process, on the CPU: the core's side of a device failure, call by call."""
    env = {"FUSEPORT_FAULT_INJECTION": "1"}
    core = Core(Settings.load({"store_dir": tmp_path, "device": "cpu", "compile_mode": "off"}, environ=env))
    told: list[bool] = []
    core.on_device_failure = lambda: told.append(True)
    try:
        key = core.register(capture(_affine, [torch.randn(4)]))[0]
        x = torch.randn(4)
        torch.testing.assert_close(core.execute(key, [x]).stack[0], _affine(x))
        with pytest.raises(
            InternalError, match="may have caused the failure: CUDA error: device-side assert"
        ):
            core.inject_device_fault()
        for _ in range(2):  # refused before running: the client retries it elsewhere
            with pytest.raises(
                Unavailable, match="failed .another call's fault. and the process is restarting"
            ):
                core.execute(key, [x])
        assert told == [True]  # the server is told once, and drains
    finally:
        core.close()
    off = Core(Settings.load({"store_dir": tmp_path, "device": "cpu", "compile_mode": "off"}, environ={}))
    try:
        with pytest.raises(RuntimeError, match="fault injection is off"):
            off.inject_device_fault()
        torch.testing.assert_close(off.execute(key, [x]).stack[0], _affine(x))
    finally:
        off.close()


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = _faulty_supervisor(tmp_path_factory.mktemp("faults"), "cpu")
    yield s
    s.stop()


def test_a_device_fault_fails_only_its_call_and_the_process_is_replaced_while_the_other_serves(
    faulty: ServerProcess, record_property: Callable[[str, object], None]
) -> None:
    back = _a_device_fault_stays_in_its_process(faulty)
    record_property("capacity_back_seconds", round(back, 1))
    # The wait above ends at WAIT_SECONDS; on the CPU the time is reported, not judged.
    assert back < WAIT_SECONDS, f"capacity back in {back:.1f} s"
    assert "FUSEPORT_FAULT_INJECTION is on: FOR TESTS ONLY" in faulty.log()


def test_a_server_without_fault_injection_ignores_the_metadata(server: ServerProcess) -> None:
    """The session's server (started without FUSEPORT_FAULT_INJECTION): the call runs as any other."""
    graph = capture(_affine, [torch.randn(64)])
    conn = _Conn(server.target)
    try:
        with Client(server.target, timeout=60) as c:
            key = c.register(graph)
        x = torch.randn(64)
        execute = conn.channel.unary_unary(_METHOD.format("Execute"))
        for _ in range(2):
            raw = execute(codec.encode_execute_request(key, [x]), timeout=60, metadata=(FAULT_METADATA,))
            torch.testing.assert_close(codec.decode_execute_response(raw).stack[0], _affine(x))
    finally:
        conn.close()
    assert server.proc.poll() is None
    assert "injecting a device fault" not in server.log()
    assert "FUSEPORT_FAULT_INJECTION is on" not in server.log()


@pytest.mark.gpu
def test_a_device_side_assert_on_the_gpu_stays_in_its_process(tmp_path: Path) -> None:
    """A real device-side assert in one of two processes on the GPU: only the call that
    caused it fails, the other process serves on, capacity is back within 30 s."""
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device (run them with scripts/gpu_check.sh)"
    s = _faulty_supervisor(tmp_path, "cuda")
    try:
        back = _a_device_fault_stays_in_its_process(s)
        assert back <= CAPACITY_BACK_SECONDS, (
            f"capacity back in {back:.1f} s, over {CAPACITY_BACK_SECONDS:.0f} s"
        )
        assert "device-side assert triggered" in s.log()
        assert s.stop() == 0
    finally:
        s.stop()
