"""No caller can stop the server for the others (issue 20): heavy work never runs where health and other calls wait.

Each test runs one heavy call as a `user` token would, and meanwhile polls gRPC
health every 50 ms with a 1 s deadline from another connection: a server whose
event loop (or GIL) the call held misses those polls. The kernel is the probe's
`x.expand(n, len(x)).sum()`: a few bytes of input, seconds of work.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fuseport.client import Client, DeadlineExceeded, ResourceExhausted, capture
from fuseport.server import supervisor
from fuseport.server.app import EXIT_RUNAWAY_KERNEL
from fuseport.wire import codec

from .conftest import ServerProcess, start_server
from .test_faults import _conn_on
from .test_procs import _children, _conns_on
from .test_stream import Stalled, _double

ADMIN = "adm1n-5c1d8e2f7a9b3046"
USER = "us3r-9e4a7c2d1f6b8053"
USER2 = "us3r-2b7d4f9a6c1e8035"
# --max-stream-buffer-bytes of the module server; a token's share is half of it.
STREAM_BUFFER = 64 << 20
# zeros(1024) expanded to (n, 1024): 32 Gi elements to read, seconds on a core even fused.
HEAVY_N = 1 << 25
# A quarter of it: far past a 0.3 s deadline and the module server's 0.5 s grace
# after it (fused: 3.5 s on the 2-core CI machine), and over in a few seconds.
OVERRUN_N = 1 << 23


def heavy(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.expand(n, x.shape[0]).sum()


def chain(x: torch.Tensor, n: int) -> torch.Tensor:
    # Three intermediates of n * len(x) floats alive together: the plan's peak.
    a = x.expand(n, x.shape[0]) + 1
    b = a * 2
    g = b * 3
    return (a + b + g).sum()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact cache for the module's servers: a kernel compiled by one is loaded by the others."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, artifacts: Path) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("isolation")
    tokens = tmp / "tokens"
    tokens.write_text(f"{ADMIN} admin\n{USER} user\n{USER2} user\n")
    # A short grace, and no --max-call-seconds: one serving process does not retire for
    # its callers' deadlines (the tests below that retire a server start their own).
    s = start_server(
        tmp, None, "--auth-tokens", str(tokens), "--max-call-bytes", str(1 << 30), "--artifact-dir", str(artifacts),
        "--overrun-grace-seconds", "0.5", "--metrics-port", "0", "--max-stream-buffer-bytes", str(STREAM_BUFFER),
    )  # fmt: skip
    yield s
    s.stop()


def _polls_during(
    server: ServerProcess, fn: Callable[[], Any], token: str | None = USER
) -> tuple[Any, list[float], float]:
    """Runs `fn` on a thread while polling health: (its result, every poll's latency, its duration)."""
    done = threading.Event()
    result: dict[str, Any] = {}

    def call() -> None:
        start = time.perf_counter()
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the test's thread
            result["error"] = e
        finally:
            result["seconds"] = time.perf_counter() - start
            done.set()

    latencies: list[float] = []
    with Client(server.target, timeout=1.0, token=token) as poller:
        assert poller.health(timeout=10) == "SERVING"  # the connection is up before the clock starts
        worker = threading.Thread(target=call)
        worker.start()
        while not done.wait(0.05):
            start = time.perf_counter()
            status = poller.health(timeout=1.0)  # raises DeadlineExceeded past 1 s
            latencies.append(time.perf_counter() - start)
            assert status == "SERVING"
        worker.join()
    if "error" in result:
        raise result["error"]
    return result["value"], latencies, result["seconds"]


def _small_calls_beside(
    server: ServerProcess, heavy: Callable[[], Any], small: Callable[[int], Any]
) -> tuple[list[Any], list[Any], list[float], float]:
    """`heavy()` on a thread and, once it runs, `small(n)` for n in 2, 3 and 5, while
    health is polled (_polls_during): (heavy's result, none if it raised; the small
    calls' results; every poll's latency; how long it all took)."""
    done: list[Any] = []

    def both() -> list[Any]:
        heavy_call = threading.Thread(target=lambda: done.append(heavy()))
        heavy_call.start()
        time.sleep(0.2)  # the heavy call is running by now
        results = [small(n) for n in (2, 3, 5)]
        heavy_call.join()
        return results

    results, latencies, seconds = _polls_during(server, both)
    return done, results, latencies, seconds


def _register(server: ServerProcess, fn: Callable[..., Any]) -> int:
    with Client(server.target, timeout=300, token=ADMIN) as admin:
        return admin.register(fn, [torch.zeros(1024), 4])


def test_a_heavy_fused_call_from_a_user_token_leaves_health_and_other_calls_answered(
    server: ServerProcess,
) -> None:
    key = _register(server, heavy)
    x = torch.zeros(1024)
    with (
        Client(server.target, timeout=300, token=USER) as user,
        Client(server.target, timeout=30, token=USER) as other,
    ):
        # Compiled at a row of 8 * 1024: a kernel compiled at 4 * 1024 may be a persistent
        # reduction that Inductor assumes stays <= 4096 long (a condition: the heavy call
        # would then run unfused, rightly, and show nothing about the fused path).
        warm = user.execute_detailed(key, [x, 8], wait=True)
        assert warm.path == "fused", (warm.reason, warm.detail)
        # Another caller's small calls go on meanwhile, each within its 30 s.
        others, small, latencies, seconds = _small_calls_beside(
            server, lambda: user.execute_detailed(key, [x, HEAVY_N]), lambda n: other.execute(key, [x, n])[0].item()
        )
    (r,) = others
    assert r.path == "fused", (r.reason, r.detail)
    assert r.stack[0].item() == 0.0 and small == [0.0, 0.0, 0.0]
    assert seconds > 0.5, f"the heavy call took {seconds:.2f} s: too quick to show anything"
    assert len(latencies) >= 3 and max(latencies) < 1.0, latencies


def test_a_heavy_fallback_after_light_ones_runs_off_the_event_loop(server: ServerProcess) -> None:
    """The inline path once trusted the kernel's last run time: a light call, then
    the same kernel with a huge int, ran the heavy one on the event loop."""
    key = _register(server, heavy)
    x = torch.zeros(1024)
    with Client(server.target, timeout=300, token=USER) as user:
        for _ in range(3):
            assert user.fallback(key, [x, 2])[0].item() == 0.0
        out, latencies, seconds = _polls_during(server, lambda: user.fallback(key, [x, HEAVY_N]))
    assert out[0].item() == 0.0
    assert seconds > 0.5, f"the heavy call took {seconds:.2f} s: too quick to show anything"
    assert len(latencies) >= 3 and max(latencies) < 1.0, latencies


def test_max_call_bytes_counts_the_intermediates_alive_together(server: ServerProcess) -> None:
    """Inputs and result are a few bytes; the graph holds four (n, 1024) float
    tensors at once (a, b, g and a + b): 4 GiB at n = 2**18, over the 1 GiB budget."""
    with Client(server.target, timeout=300, token=ADMIN) as admin:
        key = admin.register(chain, [torch.zeros(1024), 4])
    with Client(server.target, timeout=60, token=USER) as user:
        assert user.fallback(key, [torch.zeros(1024), 4])[0].item() == (1 + 2 + 6) * 4 * 1024
        with pytest.raises(ResourceExhausted, match=r"--max-call-bytes.*|at most \d+ allocated at once"):
            user.execute(key, [torch.zeros(1024), 1 << 18])
        assert user.health() == "SERVING"


def steps(x: torch.Tensor, n: int) -> torch.Tensor:
    # Twenty ops over an (n, len(x)) tensor: each quick, all of them together not.
    y = x.expand(n, x.shape[0]) + 1
    for _ in range(20):
        y = (y * 1.5).sin()
    return y.sum()


def test_a_call_past_its_time_stops_between_ops(tmp_path_factory: pytest.TempPathFactory) -> None:
    """--max-call-seconds and the caller's deadline stop the unfused graph at its
    next op: RESOURCE_EXHAUSTED naming the flag, DEADLINE_EXCEEDED; the work ends
    there, it does not go on for a caller that left."""
    tmp = tmp_path_factory.mktemp("budget")
    # A budget the small call below keeps even on a loaded machine (its first run
    # on a fresh server took over 0.3 s at a load of 6 on 2 cores), and a heavy
    # call that takes several times the budget (40 passes over 512 MiB).
    s = start_server(tmp, None, "--max-call-seconds", "1.5", "--compile-mode", "off")
    try:
        x = torch.zeros(1024)
        with Client(s.target, timeout=120) as c:
            key = c.register(steps, [x, 4])
            assert c.fallback(key, [x, 4])[0].item() == pytest.approx(steps(x, 4).item())
            with pytest.raises(
                ResourceExhausted, match=r"past the 1\.5 s one call may take \(--max-call-seconds\)"
            ):
                c.fallback(key, [x, 1 << 17])
            assert c.health() == "SERVING"
    finally:
        s.stop()
    s = start_server(tmp / "deadline", None, "--compile-mode", "off")
    try:
        with Client(s.target, timeout=120) as c:
            key = c.register(steps, [x, 4])
            with pytest.raises(DeadlineExceeded):
                c.fallback(key, [x, 1 << 17], timeout=0.3)
            # The server saw the deadline pass between two ops and stopped there.
            stopped = f"kernel {key}: stopped between two ops, the deadline passed"
            for _ in range(600):  # a minute at most: the whole graph takes seconds
                if stopped in s.log():
                    break
                time.sleep(0.1)
            assert stopped in s.log(), s.log()[-2000:]
    finally:
        s.stop()


def _wait_for(condition: Callable[[], bool], what: str, log: Callable[[], str], seconds: float = 300) -> None:
    """Polls `condition` (a state the server reaches on its own) until it holds; fails after `seconds`."""
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, f"{what}: not within {seconds:g} s; {log()[-3000:]}"
        time.sleep(0.1)  # a poll interval, not a readiness wait: the condition is the check


def _metric(server: ServerProcess, name: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=30) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"no {name} in the metrics"
    return float(found.group(1))


def test_a_call_past_its_deadline_is_answered_and_what_its_kernel_keeps_is_dropped(
    server: ServerProcess,
) -> None:
    """The caller leaves at its deadline; its fused kernel runs on (it cannot be
    interrupted) and, when it ends, its results are dropped: no handle is kept for a
    caller that never heard of it, the overrun is counted, later calls are served.
    It runs past the grace too, yet a single serving process does not retire for a
    caller's own deadline (only for --max-call-seconds, or under a supervisor)."""
    key = _register(server, heavy)
    x = torch.zeros(1024)
    with Client(server.target, timeout=300, token=USER) as user:
        assert user.execute_detailed(key, [x, 8], wait=True).path == "fused"
        before = user.describe(key)
        with pytest.raises(DeadlineExceeded):
            user.execute(key, [x, OVERRUN_N], keep=True, timeout=0.3)
        ended = f"kernel {key}: its run ended"
        _wait_for(lambda: ended in server.log(), "the overrunning kernel's end", server.log)
        assert "does not retire for a caller's deadline" in server.log(), server.log()[-3000:]
        after = user.describe(key)
        assert after.fused_runs == before.fused_runs + 1  # it did run, fused, to its end
        assert after.overruns == before.overruns + 1
        assert "overruns:" in str(after)
        assert user.resident().caller.handles == 0, "a handle was kept for a call already answered"
        assert _metric(server, 'fuseport_call_overruns_total{limit="deadline"}') >= 1
        assert _metric(server, "fuseport_runaway_kernels_total") == 0
        # The same caller's next call, kept, is served as any: nothing of the dropped run is in its way.
        (handle,) = user.execute(key, [x, 2], keep=True)
        assert user.resident().caller.handles == 1
        assert handle.fetch().item() == 0.0
    assert user_health(server) == "SERVING"


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_streams_still_arriving_hold_at_most_their_budget_together_and_per_token(
    server: ServerProcess,
) -> None:
    """A stream's header reserves the stack it declares (the server allocates it
    whole) until the stack is complete: streams that stall hold it. Together they
    hold at most --max-stream-buffer-bytes, one token's at most its share (half);
    a header past either is RESOURCE_EXHAUSTED naming the flag, and other tokens'
    streams, whole streams within what is left and unary calls are served."""
    with Client(server.target, timeout=300, token=ADMIN) as admin:
        key = admin.register(_double, [torch.ones(4)])
    held = "fuseport_stream_buffer_bytes"
    assert _metric(server, "fuseport_stream_buffer_limit_bytes") == STREAM_BUFFER

    def holding(n: int) -> None:
        _wait_for(lambda: _metric(server, held) == n, f"{held} == {n}", server.log, 60)

    stalls: list[Stalled] = []

    def stall(token: str, nbytes: int) -> Stalled:
        stalls.append(Stalled(server, nbytes, key, _bearer(token)))
        return stalls[-1]

    try:
        holding(0)
        stall(USER, 24 << 20)
        holding(24 << 20)
        code, details = stall(USER, 16 << 20).outcome(timeout=60)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "--max-stream-buffer-bytes-per-token" in details, details
        assert "refused before allocating" in details, details
        stall(ADMIN, 24 << 20)  # another token: a share of its own
        holding(48 << 20)
        code, details = stall(USER2, 24 << 20).outcome(timeout=60)  # its share is free, the budget is not
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "(--max-stream-buffer-bytes)" in details, details
        assert f"of the {STREAM_BUFFER} bytes" in details, details
        x = torch.randn(2 << 20)  # 8 MiB: within what is left
        with Client(server.target, timeout=60, token=USER2, stream_above=0, shared_memory=False) as user2:
            r = user2.execute_detailed(key, [x])
            assert r.transport == "stream" and torch.equal(r.stack[0], x * 2 + 1)
        with Client(server.target, timeout=60, token=USER) as user:
            assert torch.equal(user.execute(key, [torch.ones(4)])[0], torch.full((4,), 3.0))
        assert _metric(server, held) == 48 << 20  # the whole stream gave its bytes back
    finally:
        for s in stalls:
            s.close()
    holding(0)  # cancelled: what the stalled streams held is given back


def user_health(server: ServerProcess) -> str:
    with Client(server.target, timeout=10, token=USER) as c:
        return c.health()


PAST_BUDGET = r"past the 0\.5 s one call may take \(--max-call-seconds\)"


def test_past_max_call_seconds_the_caller_is_answered_on_time_the_compile_is_bounded_and_a_runaway_retires_the_server(
    tmp_path_factory: pytest.TempPathFactory, artifacts: Path
) -> None:
    """One serving process, --max-call-seconds 0.5:

    - a new ArgSpec at a size past the budget: its call stops between ops, and its
      compile, in the worker, runs the caller's sizes no longer than the budget either;
    - a fused kernel past the budget: its caller hears RESOURCE_EXHAUSTED naming the
      flag within the budget plus a second (its own deadline), health answering
      meanwhile; the kernel still runs a grace (1 s) later, so the server retires:
      drains and exits with EXIT_RUNAWAY_KERNEL, for the container to restart it."""
    tmp = tmp_path_factory.mktemp("runaway")
    flags = ("--max-call-seconds", "0.5", "--overrun-grace-seconds", "1", "--artifact-dir", str(artifacts))
    s = start_server(tmp, None, *flags)
    try:
        x = torch.zeros(1024)
        with Client(s.target, timeout=300) as c:
            key = c.register(heavy, [x, 4])
            # The compile is waited for outside the budget: only the run counts.
            assert c.execute_detailed(key, [x, 8], wait=True).path == "fused"

            many = c.register(steps, [x, 4])
            with pytest.raises(ResourceExhausted, match=PAST_BUDGET):
                c.execute(many, [x, 1 << 15])  # its first call: compiled at these sizes
            _wait_for(
                lambda: all(a.state != 1 for a in c.describe(many).arg_specs),  # COMPILE_STATE_COMPILING
                "the compile of steps",
                s.log,
            )
            bounded = r"compile-worker .*passed --max-call-seconds \(0\.5 s\)"
            assert re.search(bounded, s.log()), s.log()[-3000:]
            (spec,) = c.describe(many).arg_specs
            assert spec.state == 2, spec.error  # COMPILE_STATE_READY: the artifact is kept, untested
            assert c.execute(many, [x, 4])[0].item() == pytest.approx(steps(x, 4).item())

            def overrun() -> None:
                with pytest.raises(ResourceExhausted, match=PAST_BUDGET):
                    c.execute(key, [x, HEAVY_N], timeout=1.5)  # answered later: DEADLINE_EXCEEDED

            _, latencies, _ = _polls_during(s, overrun, token=None)
            assert latencies and max(latencies) < 1.0, latencies
        assert s.proc.wait(timeout=120) == EXIT_RUNAWAY_KERNEL, s.log()[-3000:]
        log = s.log()
        assert "this serving process retires" in log and "exiting with status 4" in log, log[-3000:]
    finally:
        s.stop()


def test_with_two_processes_a_runaway_kernel_retires_its_process_alone_which_is_replaced(
    tmp_path_factory: pytest.TempPathFactory, artifacts: Path
) -> None:
    """--processes 2: a fused kernel runs on past its caller's deadline (0.5 s) and the
    grace (1 s); its process answers health meanwhile, then retires (exit status 4)
    and the supervisor starts a fresh one, while the other process serves throughout."""
    assert supervisor._EXIT_RUNAWAY_KERNEL == EXIT_RUNAWAY_KERNEL
    s = start_server(
        tmp_path_factory.mktemp("runaway-procs"), None, "--processes", "2", "--overrun-grace-seconds", "1",
        "--artifact-dir", str(artifacts), "--log-level", "warning",
    )  # fmt: skip
    try:
        x = torch.zeros(1024)
        pids = _children(s.proc.pid)
        conns = _conns_on(s.target, pids)
        victim, survivor = sorted(pids)
        key = conns[survivor].register(capture(heavy, [x, 4]))
        warm = codec.encode_execute_request(key, [x, 8], wait_for_compile=True)
        for pid, conn in conns.items():
            raw, answered = conn.call("Execute", warm, timeout=300)
            assert answered == pid and codec.decode_execute_response(raw).path == 1  # PATH_FUSED

        with pytest.raises(grpc.RpcError) as e:
            conns[victim].call("Execute", codec.encode_execute_request(key, [x, HEAVY_N]), timeout=0.5)
        assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        # Until it retires, the victim answers health within 1 s (the kernel holds no lock
        # of the serving process) and the survivor serves calls.
        health = health_pb2_grpc.HealthStub(conns[victim].channel)
        retiring = "this serving process retires"
        while retiring not in s.log():
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
            except grpc.RpcError:
                # It may retire (and go) between the look at its log and this call.
                if retiring in s.log():
                    break
                raise
            assert status == health_pb2.HealthCheckResponse.SERVING or retiring in s.log()
            stack, pid = conns[survivor].execute(key, [x, 3])
            assert pid == survivor and stack[0].item() == 0.0
        retired = re.compile(r"process \d retired \(status 4\)")
        _wait_for(lambda: retired.search(s.log()) is not None, "the retirement", s.log)
        _wait_for(lambda: len(_children(s.proc.pid) - {victim, survivor}) == 1, "a fresh process", s.log)
        assert victim not in _children(s.proc.pid) and survivor in _children(s.proc.pid)
        (fresh,) = _children(s.proc.pid) - {survivor}
        conn = _conn_on(s.target, fresh, time.monotonic() + 300, s.log)
        stack, pid = conn.execute(key, [x, 5])
        assert pid == fresh and stack[0].item() == 0.0
        stack, pid = conns[survivor].execute(key, [x, 5])
        assert pid == survivor
        conn.close()
    finally:
        for c in conns.values():
            c.close()
        assert s.stop() == 0


OTHER = "0th3r-4b7e2a9c6d1f8350"


def _tokens(tmp: Path) -> Path:
    tokens = tmp / "tokens"
    tokens.write_text(f"{ADMIN} admin\n{USER} user\n{OTHER} user\n")
    return tokens


def _more(x: torch.Tensor) -> torch.Tensor:
    return x + 2


def test_one_callers_long_calls_leave_a_worker_for_another_callers_call(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """--workers 2: a `user` token's two calls without a deadline, each minutes of one
    op (two clients, two made-up client ids: still one caller), hold one worker, the
    second waiting for its own; another token's call that needs a worker takes the
    other at once, however long the first caller's calls run.

    Every method takes its worker through the same share, not only those that run
    kernels (a caller's Registers of large graphs took every worker): the first
    caller's Register waits for its own worker too, while the other's is served. And
    one caller may have at most --max-waiting-calls-per-identity calls waiting (each
    holds its request): one more is RESOURCE_EXHAUSTED at once."""
    tmp = tmp_path_factory.mktemp("fairshare")
    s = start_server(
        tmp, None, "--auth-tokens", str(_tokens(tmp)), "--workers", "2", "--compile-mode", "off",
        "--metrics-port", "0", "--grace-seconds", "1", "--max-waiting-calls-per-identity", "2",
    )  # fmt: skip
    x = torch.zeros(1024)
    errors: list[BaseException] = []

    def hog() -> None:
        try:
            with Client(s.target, timeout=None, token=USER) as c:
                c.fallback(key, [x, 1 << 33])  # no deadline: minutes, ended by the server's stop
        except BaseException as e:  # noqa: BLE001 - any end will do; the server is stopped under it
            errors.append(e)

    def registers() -> None:
        try:
            with Client(s.target, timeout=None, token=USER) as c:
                c.register(_more, [x])  # waits for the worker the caller's long calls hold
        except BaseException as e:  # noqa: BLE001 - ended by the server's stop, as the long calls
            errors.append(e)

    hogs = [threading.Thread(target=hog) for _ in range(2)] + [threading.Thread(target=registers)]
    try:
        key = _register(s, heavy)
        for t in hogs[:2]:
            t.start()
        _wait_for(
            lambda: (
                _metric(s, "fuseport_worker_calls_running") + _metric(s, "fuseport_worker_calls_waiting") == 2
            ),
            "both long calls at a worker or waiting for one",
            s.log,
        )
        with Client(s.target, timeout=120, token=OTHER) as other:
            # 4 MiB to read: not light, so it needs a worker.
            assert other.fallback(key, [x, 1024])[0].item() == 0.0
        # The first caller still holds one worker and waits for no other: at most --workers - 1.
        assert _metric(s, "fuseport_worker_calls_running") == 1
        assert _metric(s, "fuseport_worker_calls_waiting") == 1
        # Not even with a Register (no kernel runs): it waits for the caller's own worker...
        hogs[2].start()
        _wait_for(
            lambda: _metric(s, "fuseport_worker_calls_waiting") == 2, "the Register waiting too", s.log, 60
        )
        # ...while the other caller's is served at once.
        with Client(s.target, timeout=120, token=OTHER) as other:
            more = other.register(_more, [x])
            assert torch.equal(other.execute(more, [torch.ones(4)])[0], torch.full((4,), 3.0))
            assert key in {k.key for k in other.list()}
        assert _metric(s, "fuseport_worker_calls_running") == 1
        # Two calls waiting are the most this caller may have: a third is refused at once.
        with Client(s.target, timeout=120, token=USER) as user:
            with pytest.raises(ResourceExhausted, match=r"2 calls waiting.*--max-waiting-calls-per-identity"):
                user.list()
        assert _metric(s, "fuseport_worker_calls_waiting") == 2
    finally:
        s.stop()
        for t in hogs:
            if t.ident is not None:
                t.join(timeout=120)
    assert len(errors) == 3, errors  # no waiting call finished: the server stopped under them


def test_a_caller_whose_kernel_retired_the_server_is_refused_its_calls_after_its_restart(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """--max-call-seconds 0.5: a `user` token's one-op Fallback runs on past it and the
    grace, so the process retires. Restarted on the same store, the server refuses that
    token's calls (RESOURCE_EXHAUSTED naming --runaway-penalty-seconds), light ones too
    (a token is one caller), while another token's same call is served."""
    tmp = tmp_path_factory.mktemp("penalty")
    flags = (
        "--auth-tokens", str(_tokens(tmp)), "--max-call-seconds", "0.5", "--overrun-grace-seconds", "1",
        "--compile-mode", "off", "--grace-seconds", "1",
    )  # fmt: skip
    s = start_server(tmp, None, *flags)
    try:
        key = _register(s, heavy)
        x = torch.zeros(1024)
        with Client(s.target, timeout=120, token=USER) as user:
            with pytest.raises(ResourceExhausted, match=PAST_BUDGET):
                user.fallback(key, [x, 1 << 29])  # one op of a minute or more: it cannot stop between ops
        assert s.proc.wait(timeout=120) == EXIT_RUNAWAY_KERNEL, s.log()[-3000:]
    finally:
        s.stop()
    s = start_server(tmp / "again", s.store_dir, *flags)
    try:
        with (
            Client(s.target, timeout=120, token=USER) as user,
            Client(s.target, timeout=120, token=OTHER) as other,
        ):
            with pytest.raises(ResourceExhausted, match=r"refused for \d+ s more.*--runaway-penalty-seconds"):
                user.fallback(key, [x, 1024])
            assert other.fallback(key, [x, 1024])[0].item() == 0.0
            # Light ones too: a plan may take for light what is not (the re-probe's pooling kernel).
            with pytest.raises(ResourceExhausted, match=r"refused for \d+ s more"):
                user.fallback(key, [x, 2])
            assert other.fallback(key, [x, 2])[0].item() == 0.0
    finally:
        s.stop()


def test_a_pooling_window_makes_a_call_heavy_whatever_bytes_it_touches() -> None:
    """The re-probe of issue 20: avg_pool2d of a 360x360 constant with a 360 window touches
    1 MiB and adds 1.7e10 numbers (10 s of a core), and the plan took it for light, so it ran
    on the event loop and froze health. Ops whose work their bytes do not bound are never light."""
    from fuseport.server.calls import light_work
    from fuseport.server.checks import Planner

    aten = torch.ops.aten
    g = torch.fx.Graph()
    w, y = g.placeholder("w"), g.placeholder("y")
    pooled = g.call_function(aten.avg_pool2d.default, (w, [360, 360], [1, 1], [180, 180]))
    g.output((pooled, g.call_function(aten.add.Tensor, (y, 0))))
    module = torch.fx.GraphModule(torch.nn.Module(), g)
    plan = Planner(module, [], torch.device("cpu")).plan([torch.zeros(1, 1, 360, 360), torch.ones(1)])
    assert plan.error is None and plan.work_bytes is not None and plan.work_bytes <= 2 << 20
    assert plan.unbounded_work == "aten::avg_pool2d.default"
    assert not light_work(plan)
    # The same bytes through pointwise ops only are light.
    g = torch.fx.Graph()
    w = g.placeholder("w")
    g.output(g.call_function(aten.add.Tensor, (w, 1)))
    plan = Planner(torch.fx.GraphModule(torch.nn.Module(), g), [], torch.device("cpu")).plan([torch.zeros(360, 360)])
    assert plan.unbounded_work == "" and light_work(plan)


def test_every_op_of_unbounded_work_is_on_the_allowlist() -> None:
    from fuseport.server.checks import UNBOUNDED_WORK_OPS
    from fuseport.wire import ops

    assert sorted(o for o in UNBOUNDED_WORK_OPS if not ops.is_allowed(o)) == []


def test_work_holding_a_cuda_device_is_counted_across_threads_and_released_on_error() -> None:
    """Placement.holding counts what may keep a CUDA device busy (heavy calls, an in-process
    compile's run on a caller's inputs), from any thread; Core.light sends every call to a
    worker while any runs. The counting touches no device, so it is checked here; what it is
    for, on a device, by the gpu test below. On the CPU a kernel holds only its own thread."""
    from fuseport.server.devices import Placement

    cuda = Placement(torch.device("cuda", 0))
    entered, release = threading.Barrier(5), threading.Event()

    def hold() -> None:
        with cuda.holding():
            entered.wait(timeout=30)
            release.wait(timeout=30)

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for t in threads:
        t.start()
    entered.wait(timeout=30)
    assert cuda.held and cuda._holding == 4
    release.set()
    for t in threads:
        t.join(timeout=30)
    assert not cuda.held
    with pytest.raises(RuntimeError), cuda.holding():
        assert cuda.held
        raise RuntimeError("a kernel failed")
    assert not cuda.held
    cpu = Placement(torch.device("cpu"))
    with cpu.holding():
        assert not cpu.held


@pytest.mark.gpu
def test_a_heavy_call_on_cuda_leaves_health_and_another_callers_calls_answered(tmp_path: Path) -> None:
    """On CUDA a heavy kernel holds the device, not the event loop: while a `user`
    token's Fallback of seconds runs, health answers every poll within 1 s and another
    token's small calls (light: otherwise run on the loop) are answered, each right.
    One serving process, so that both callers and health reach the one whose loop a
    small kernel queued behind the heavy one would hold (see Core.light)."""
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device (run them with scripts/gpu_check.sh)"
    s = start_server(
        tmp_path, None, "--device", "cuda", "--processes", "1", "--auth-tokens", str(_tokens(tmp_path))
    )
    try:
        key = _register(s, heavy)
        x = torch.zeros(1024)
        with (
            Client(s.target, timeout=300, token=USER) as user,
            Client(s.target, timeout=60, token=OTHER) as other,
        ):
            assert other.execute_detailed(key, [x, 8], wait=True).path == "fused"
            # Sized on this device: doubled until a call takes long enough to time, then ~3 s.
            n, took = 1 << 20, 0.0
            while took < 0.3 and n < 1 << 36:
                n *= 2
                start = time.perf_counter()
                assert user.fallback(key, [x, n])[0].item() == 0.0
                took = time.perf_counter() - start
            n = int(n * 3 / took)
            heavy_result, small, latencies, seconds = _small_calls_beside(
                s, lambda: user.fallback(key, [x, n])[0].item(), lambda k: other.execute(key, [x, k])[0].item()
            )
    finally:
        s.stop()
    assert heavy_result == [0.0] and small == [0.0, 0.0, 0.0]
    assert seconds > 1.0, f"the heavy call took {seconds:.2f} s: too quick to show anything"
    assert len(latencies) >= 3 and max(latencies) < 1.0, latencies


def test_a_call_cancelled_while_it_waits_for_a_worker_gives_its_place_back_even_if_one_frees_meanwhile() -> None:
    """A cancelled call's waiter is cancelled at once, its handler runs a step later: a
    place freed in between (another call's worker ending) went to the cancelled waiter
    and never came back, so a caller lost --workers-per-identity places for good (an
    adversarial probe: 2 of 8 places held, nothing in flight, after cancelled calls)."""
    import asyncio

    from fuseport.server.rpc.share import WorkerShare

    async def main() -> tuple[int, int, int]:
        share = WorkerShare(workers=1, per_identity=1)
        await share.acquire(b"a", None)  # the one place, held
        waiting = asyncio.ensure_future(share.acquire(b"b", None))
        await asyncio.sleep(0)  # b waits for it
        assert share.waiting == 1
        waiting.cancel()
        share.release(b"a")  # a's worker ends before b's handler has seen its cancel
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await share.acquire(b"c", None)  # and the place is there for the next caller
        return share.running, share.waiting, share.held(b"b")

    assert asyncio.run(main()) == (1, 0, 0)
