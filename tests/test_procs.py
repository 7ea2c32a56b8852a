"""`fuseport serve --processes N`: a supervisor and share-nothing serving processes on one port.

Every test talks to a real supervisor and its real serving processes (compile
mode off: compiling is not what is tested). Which process answered a call is
the "fuseport-process" trailing metadata ("INDEX PID"); a connection stays on
the process that accepted it, so each `_Conn` (a channel with its own
subchannel pool, hence its own TCP connection) talks to one process until it dies.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fuseport.client import Client, capture
from fuseport.server.app import PROCESS_METADATA_KEY
from fuseport.server.registry import Registry
from fuseport.server.settings import Settings
from fuseport.server.supervisor import _Signals, plan_processes
from fuseport.wire import _pb, codec, shm
from fuseport.wire.errors import KernelNotFound

from .conftest import ServerProcess, start_server
from .test_metrics import _stats, scrape, value

_METHOD = "/fuseport.v1.KernelService/{}"


def _add_one(x):
    return x + 1


def _times_three(x):
    return x * 3


class _Conn:
    """One connection to the shared port: raw calls, and the pid of the process that answered."""

    def __init__(self, target: str, token: str | None = None) -> None:
        self.channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None

    def call(self, method: str, request: bytes, timeout: float = 60) -> tuple[bytes, int]:
        response, call = self.channel.unary_unary(_METHOD.format(method)).with_call(
            request, timeout=timeout, metadata=self.metadata, wait_for_ready=True
        )
        process = dict(call.trailing_metadata())[PROCESS_METADATA_KEY]
        return response, int(process.split()[1])

    def pid(self) -> int:
        return self.call("List", _pb.service.ListRequest().SerializeToString())[1]

    def register(self, graph: _pb.graph.Graph) -> int:
        raw, _ = self.call("Register", _pb.service.RegisterRequest(graph=graph).SerializeToString())
        return _pb.service.RegisterResponse.FromString(raw).key

    def execute(self, key: int, stack: list[object]) -> tuple[list[object], int]:
        raw, pid = self.call("Execute", codec.encode_execute_request(key, stack))
        return codec.decode_execute_response(raw).stack, pid

    def unregister(self, key: int) -> bool:
        raw, _ = self.call("Unregister", _pb.service.UnregisterRequest(key=key).SerializeToString())
        return _pb.service.UnregisterResponse.FromString(raw).removed

    def close(self) -> None:
        self.channel.close()


def _children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def _conns_on(target: str, pids: set[int], token: str | None = None, within: float = 120.0) -> dict[int, _Conn]:
    """A connection to each process of `pids`: new connections until each pid has answered one
    (the kernel spreads connections over the listening processes by a hash of their addresses).
    Until a deadline, not a number of tries: the server is ready when one process serves, and
    on a loaded machine the other may start listening seconds later (200 tries in a row were
    all answered by the first)."""
    found: dict[int, _Conn] = {}
    deadline = time.monotonic() + within
    tries = 0
    while time.monotonic() < deadline:
        tries += 1
        conn = _Conn(target, token)
        pid = conn.pid()
        if pid in pids and pid not in found:
            found[pid] = conn
            if len(found) == len(pids):
                return found
        else:
            conn.close()
    raise AssertionError(f"{tries} connections reached only {sorted(found)} of {sorted(pids)}")


@pytest.fixture(scope="module")
def graphs() -> dict[str, _pb.graph.Graph]:
    return {
        "add_one": capture(_add_one, [torch.randn(8)]),
        "times_three": capture(_times_three, [torch.randn(8)]),
    }


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"device": "cpu"}, (1, ["cpu"])),
        ({"device": "auto"}, (1, ["auto"])),
        ({"device": "cuda:0, cuda:1"}, (2, ["cuda:0", "cuda:1"])),
        ({"device": "cuda:0,cuda:1", "processes": 4}, (4, ["cuda:0", "cuda:1"])),
        ({"device": "cpu", "processes": 3}, (3, ["cpu"])),
    ],
)
def test_processes_default_to_one_per_device_served(flags: dict[str, object], expected: object) -> None:
    # 4 cores: one process per GPU, as on the CPU.
    assert plan_processes(Settings.load(flags, environ={}), cores=4) == expected


@pytest.mark.parametrize(
    ("device", "cores", "expected"),
    [
        ("cuda", 16, 4),  # the H100/H200 machines: 16 cores per GPU
        ("cuda", 64, 4),  # at most PROCESSES_PER_GPU_MAX per GPU
        ("cuda:0", 8, 2),
        ("cuda", 5, 1),
        ("cuda", 1, 1),
        ("cuda:0,cuda:1", 32, 8),  # each GPU's share of the cores
        ("cuda:0,cuda:1", 12, 2),
        ("cpu", 64, 1),  # CPU processes would share the same cores: one
    ],
)
def test_the_default_on_gpus_is_processes_by_cores_per_device(device: str, cores: int, expected: int) -> None:
    processes, devices = plan_processes(Settings.load({"device": device}, environ={}), cores=cores)
    assert processes == expected
    assert processes % len(devices) == 0  # every device gets the same number


def test_usable_cores_is_within_what_the_os_reports() -> None:
    import os

    from fuseport.server.supervisor import usable_cores

    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


def test_a_device_list_that_names_no_device_is_refused() -> None:
    with pytest.raises(ValueError, match="names no device"):
        plan_processes(Settings.load({"device": " , "}, environ={}))
    with pytest.raises(ValueError, match="processes must be >= 0"):
        Settings.load({"processes": -1}, environ={})


# ---------------------------------------------------------------------- the shared store, in process


def _shared(store: Path) -> tuple[Registry, list[int]]:
    """A registry on a shared store, and the keys of the kernels it dropped because another removed them."""
    registry = Registry(store, torch.device("cpu"), shared=True)
    dropped: list[int] = []
    registry.on_removed = lambda kernel: dropped.append(kernel.key)
    registry.load()
    return registry, dropped


def test_a_shared_store_finds_what_another_process_registered_and_drops_what_it_removed(
    tmp_path: Path, graphs: dict[str, _pb.graph.Graph]
) -> None:
    one, _ = _shared(tmp_path)
    two, dropped = _shared(tmp_path)  # indexed before anything was registered
    key, created, _ = one.register(graphs["add_one"])
    assert created
    assert two.get(key).key == key  # a miss looks in the store
    assert key in {k for k, _ in two.kernels()}
    assert one.remove(key) is not None
    with pytest.raises(KernelNotFound):
        two.get(key)  # its built copy is stale: dropped, not served
    assert dropped == [key]
    assert key not in {k for k, _ in two.kernels()}
    # Its stale copy is not written back by a lookup; Register (anywhere) brings it back.
    assert not (tmp_path / f"{key & (2**64 - 1):016x}.pb").exists()
    assert two.register(graphs["add_one"])[:2] == (key, True)
    assert one.get(key).key == key


def test_a_shared_store_rebuilds_a_kernel_registered_again_elsewhere_and_finds_new_variants(
    tmp_path: Path, graphs: dict[str, _pb.graph.Graph]
) -> None:
    one, _ = _shared(tmp_path)
    two, dropped = _shared(tmp_path)
    key = one.register(graphs["add_one"])[0]
    rank2 = capture(_add_one, [torch.randn(2, 3)])
    variant = one.register(rank2, variant_of=key)[2]
    assert [v.key for v in two.get(key).variants] == [key, variant]
    # Removed and registered again through the first: the second rebuilds it (one variant now).
    one.remove(key)
    one.register(graphs["add_one"])
    assert [v.key for v in two.get(key).variants] == [key]
    assert dropped == [key]
    # A variant added through the first is found when the second is asked to look.
    one.register(rank2, variant_of=key)
    assert [v.key for v in two.refresh(key).variants] == [key, variant]  # type: ignore[union-attr]


# ---------------------------------------------------------------------- a real supervisor


@pytest.fixture(scope="module")
def supervisor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(
        tmp_path_factory.mktemp("procs"),
        None,
        "--processes",
        "2",
        "--compile-mode",
        "off",
        "--metrics-port",
        "0",
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def two(supervisor: ServerProcess) -> Iterator[tuple[_Conn, _Conn]]:
    """A connection to each of the two serving processes."""
    conns = _conns_on(supervisor.target, _children(supervisor.proc.pid))
    yield tuple(conns.values())  # type: ignore[misc]
    for c in conns.values():
        c.close()


def test_every_serving_process_is_a_child_of_the_supervisor_and_shares_its_port(
    supervisor: ServerProcess, two: tuple[_Conn, _Conn]
) -> None:
    a, b = two
    assert {a.pid(), b.pid()} == _children(supervisor.proc.pid)
    assert len({a.pid(), b.pid()}) == 2


def test_a_kernel_registered_through_one_process_runs_on_the_other(
    two: tuple[_Conn, _Conn], graphs: dict[str, _pb.graph.Graph]
) -> None:
    a, b = two
    key = a.register(graphs["add_one"])
    x = torch.randn(8)
    stack, pid = b.execute(key, ["below", x])
    assert pid == b.pid() != a.pid()
    assert stack[0] == "below"
    torch.testing.assert_close(stack[1], x + 1)
    listed, _ = b.call("List", _pb.service.ListRequest().SerializeToString())
    assert key in {k.key for k in _pb.service.ListResponse.FromString(listed).kernels}


def test_an_alias_registered_through_one_process_names_the_kernel_on_the_other(
    two: tuple[_Conn, _Conn], graphs: dict[str, _pb.graph.Graph]
) -> None:
    """KServe calls a kernel by its alias, on whichever process its connection reached:
    an alias set through one process resolves on the other (from the store's alias file),
    and the result is the kernel's."""
    from fuseport.kserve import grpc_service_pb2 as kpb

    a, b = two
    raw, _ = a.call(
        "Register", _pb.service.RegisterRequest(graph=graphs["add_one"], alias="add-one").SerializeToString()
    )
    key = _pb.service.RegisterResponse.FromString(raw).key
    x = torch.randn(8)
    req = kpb.ModelInferRequest(model_name="add-one")
    req.inputs.add(name="x", datatype="FP32", shape=[8])
    req.raw_input_contents.append(x.numpy().tobytes())
    infer = b.channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=kpb.ModelInferRequest.SerializeToString,
        response_deserializer=kpb.ModelInferResponse.FromString,
    )
    resp, call = infer.with_call(req, timeout=60)
    assert int(dict(call.trailing_metadata())[PROCESS_METADATA_KEY].split()[1]) == b.pid() != a.pid()
    got = torch.frombuffer(bytearray(resp.raw_output_contents[0]), dtype=torch.float32)
    torch.testing.assert_close(got, x + 1)
    # Unregistered through the first process, the name is gone on the second too; given
    # to another kernel, it names that one there.
    a.call("Unregister", _pb.service.UnregisterRequest(key=key).SerializeToString())
    with pytest.raises(grpc.RpcError) as e:
        infer(req, timeout=60)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    a.call("Register", _pb.service.RegisterRequest(graph=graphs["times_three"], alias="add-one").SerializeToString())
    resp = infer(req, timeout=60)
    got = torch.frombuffer(bytearray(resp.raw_output_contents[0]), dtype=torch.float32)
    torch.testing.assert_close(got, x * 3)


def test_an_unregister_through_one_process_is_seen_by_the_other_and_not_undone(
    two: tuple[_Conn, _Conn], graphs: dict[str, _pb.graph.Graph]
) -> None:
    a, b = two
    key = a.register(graphs["times_three"])
    x = torch.randn(8)
    for conn in (a, b):  # both have built it
        torch.testing.assert_close(conn.execute(key, [x])[0][0], x * 3)
    assert b.unregister(key)
    for conn in (a, b):
        with pytest.raises(grpc.RpcError) as e:
            conn.execute(key, [x])
        assert e.value.code() is grpc.StatusCode.NOT_FOUND, e.value.details()
        listed, _ = conn.call("List", _pb.service.ListRequest().SerializeToString())
        assert key not in {k.key for k in _pb.service.ListResponse.FromString(listed).kernels}
    # Registered again through the other one: every process serves it again.
    assert a.register(graphs["times_three"]) == key
    for conn in (b, a):
        torch.testing.assert_close(conn.execute(key, [x])[0][0], x * 3)


def test_a_shared_memory_session_belongs_to_the_process_that_opened_it(
    supervisor: ServerProcess, two: tuple[_Conn, _Conn], graphs: dict[str, _pb.graph.Graph]
) -> None:
    """Each serving process has its own socket and sessions; a session named
    through the other process is FAILED_PRECONDITION (the client then uses the
    network), never another process's memory."""
    a, b = two
    key = a.register(graphs["add_one"])
    who = (("fuseport-client-id", "procs-shm-client-0123456789"),)

    def call(conn: _Conn, method: str, request: bytes) -> bytes:
        return conn.channel.unary_unary(_METHOD.format(method))(request, metadata=who, timeout=60)  # type: ignore[no-any-return]

    opened = _pb.service.OpenSharedMemoryResponse.FromString(call(a, "OpenSharedMemory", b""))
    sock = shm.connect(opened.socket, 10)
    try:
        shm.send_packet(sock, shm.Packet(shm.HELLO, text=opened.ticket))
        assert shm.recv_packet(sock).kind == shm.OK  # type: ignore[union-attr]
        region, fd = shm.create_region(1, 1 << 20, "test")
        x = torch.randn(8)
        region.bytes[:32].view(torch.float32).copy_(x)
        shm.send_packet(sock, shm.Packet(shm.REGION, 0, 1, 1 << 20, fd=fd))
        assert shm.recv_packet(sock).kind == shm.OK  # type: ignore[union-attr]
        request = codec.encode_execute_request(
            key, [codec.Shared(1, 0, torch.float32, (8,), 32)], shm_session=opened.session
        )
        with pytest.raises(grpc.RpcError) as e:
            call(b, "Execute", request)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not open on this serving process" in e.value.details()
        (out,) = codec.decode_execute_response(call(a, "Execute", request)).stack
        torch.testing.assert_close(out, x + 1)
    finally:
        sock.close()
    with Client(supervisor.target) as c:  # the client's own session, wherever its channel went
        y = torch.randn(1 << 16)
        r = c.execute_detailed(key, [y])
        assert r.transport == "shm"
        torch.testing.assert_close(r.stack[0], y + 1)


def test_metrics_show_every_process_labelled_and_stats_sums_them(
    supervisor: ServerProcess, two: tuple[_Conn, _Conn]
) -> None:
    for conn in two:
        conn.pid()
    samples = scrape(supervisor)
    assert value(samples, "fuseport_processes", state="serving") == 2
    per_process = [
        value(
            samples,
            "fuseport_requests_total",
            method="List",
            path="none",
            reason="none",
            code="OK",
            process=p,
        )
        for p in ("0", "1")
    ]
    assert all(n >= 1 for n in per_process), per_process
    memory = {
        dict(labels).get("process") for name, labels in samples if name == "process_resident_memory_bytes"
    }
    assert memory == {"0", "1"}
    out = _stats(supervisor.metrics_url)
    assert out.returncode == 0, out.stderr
    total = sum(v for (name, _), v in samples.items() if name == "fuseport_requests_total")
    assert f"requests   {total:.0f}" in out.stdout, out.stdout  # summed over the processes


def test_stats_adds_up_counters_but_not_the_shared_store_and_shows_each_process_apart(
    supervisor: ServerProcess, two: tuple[_Conn, _Conn], graphs: dict[str, _pb.graph.Graph]
) -> None:
    a, b = two
    key = a.register(graphs["add_one"])
    b.execute(key, [torch.randn(8)])  # both processes hold the kernel now
    listed, _ = b.call("List", _pb.service.ListRequest().SerializeToString())
    kernels = len(_pb.service.ListResponse.FromString(listed).kernels)
    samples = scrape(supervisor)
    gauges = [value(samples, "fuseport_registered_kernels", process=p) for p in ("0", "1")]
    assert gauges == [kernels, kernels]  # each process reports the one store: a sum would say twice as many
    out = _stats(supervisor.metrics_url)
    assert out.returncode == 0, out.stderr
    lines = {" ".join(line.split()[:2]): line for line in out.stdout.splitlines()[1:]}
    assert lines[f"kernels {kernels}"].endswith("; one store, shared by 2 processes)"), out.stdout
    for p in ("0", "1"):  # each process's own cache and memory, not the last one's or the first's
        line = lines[f"process {p}"]
        assert "compiled-kernel cache" in line and "RSS " in line, out.stdout
    assert "processes  serving 2" in out.stdout


def test_an_execute_result_names_the_serving_process_that_answered(
    supervisor: ServerProcess, graphs: dict[str, _pb.graph.Graph]
) -> None:
    with Client(supervisor.target, timeout=60) as c:
        key = c.register(graphs["add_one"])
        r = c.execute_detailed(key, [torch.randn(8)])
    index, pid = r.process.split()
    assert index in ("0", "1") and int(pid) in _children(supervisor.proc.pid)


# ---------------------------------------------------------------------- one client, several connections


def _spread_client(target: str, tries: int = 30) -> Client:
    """A Client(connections=4) whose connections reach both processes. The kernel picks a
    process for each connection by a hash of its addresses, so 1 in 8 such clients has all
    four on one process: a new client then (30 in a row: 1 in 8**30). Idle calls take the
    connections in turn, so four in a row use each once."""
    for _ in range(tries):
        c = Client(target, timeout=60, connections=4)
        if len({c.execute_detailed(_probe_key(c), [torch.zeros(1)]).process for _ in range(4)}) == 2:
            return c
        c.close()
    raise AssertionError(
        f"{tries} clients of 4 connections each reached one process only: one connection each?"
    )


def _probe_key(c: Client) -> int:
    return c.register(_add_one, [torch.randn(8)])


def test_describe_and_list_name_the_serving_process_whose_counts_they_give(supervisor: ServerProcess) -> None:
    """Each serving process counts the calls it served: a Describe or List says whose
    counts it gives (its `process`, as ExecuteResult.process), sync and async alike."""
    import asyncio

    from fuseport.client import AsyncClient

    with Client(supervisor.target, timeout=60) as c:  # one connection: one process for all its calls
        key = c.register(_add_one, [torch.randn(8)])  # the module's other tests run it too
        before = c.describe(key)
        ran = c.execute_detailed(key, [torch.randn(8)])
        info = c.describe(key)
        listed = {k.key: k for k in c.list()}
    assert ran.process and before.process == info.process == listed[key].process == ran.process
    assert info.fused_runs + info.fallback_runs == before.fused_runs + before.fallback_runs + 1
    assert f"serving process {ran.process}'s own" in str(info)

    async def main() -> tuple[str, str, int]:
        async with AsyncClient(supervisor.target, timeout=60) as a:
            b = await a.describe(key)
            r = await a.execute_detailed(key, [torch.randn(8)])
            d = await a.describe(key)
            assert b.process == r.process
            return r.process, d.process, d.fused_runs + d.fallback_runs - b.fused_runs - b.fallback_runs

    ran_async, described, runs = asyncio.run(main())
    assert described == ran_async and int(described.split()[1]) in _children(supervisor.proc.pid)
    assert runs == 1


def test_connections_must_be_a_positive_int() -> None:
    from fuseport.client import AsyncClient

    for bad in (0, -1):
        for cls in (Client, AsyncClient):
            with pytest.raises(
                ValueError, match=f"connections={bad}: a client needs at least one connection"
            ):
                cls("127.0.0.1:1", connections=bad)
    with pytest.raises(TypeError, match="connections=2.5: expected an int"):
        Client("127.0.0.1:1", connections=2.5)  # type: ignore[arg-type]


def test_one_connection_keeps_every_call_of_every_thread_on_one_process(supervisor: ServerProcess) -> None:
    with Client(supervisor.target, timeout=60) as c:
        key = _probe_key(c)
        answered: set[str] = set()

        def caller() -> None:
            for _ in range(5):
                x = torch.randn(8)
                r = c.execute_detailed(key, [x])
                torch.testing.assert_close(r.stack[0], x + 1)
                answered.add(r.process)

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(answered) == 1, answered


def test_a_client_with_several_connections_spreads_its_threads_over_the_processes(
    supervisor: ServerProcess,
) -> None:
    with _spread_client(supervisor.target) as c:
        key = _probe_key(c)
        # A connection stays on its process, and idle calls take the connections in turn.
        rounds = [[c.execute_detailed(key, [torch.zeros(1)]).process for _ in range(4)] for _ in range(3)]
        assert rounds[0] == rounds[1] == rounds[2], rounds
        answered: collections.Counter[str] = collections.Counter()
        wrong: list[str] = []
        lock = threading.Lock()

        def caller() -> None:
            for _ in range(10):
                x = torch.randn(8)
                r = c.execute_detailed(key, [x])
                if not torch.equal(r.stack[0], x + 1):
                    wrong.append(r.process)
                with lock:
                    answered[r.process] += 1

        threads = [threading.Thread(target=caller) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not wrong
        assert sum(answered.values()) == 80
        pids = {int(p.split()[1]) for p in answered}
        assert pids == _children(supervisor.proc.pid), answered
        assert all(conn.inflight == 0 for conn in c._pool.all)


def test_a_handle_made_on_one_connection_is_used_by_every_thread_on_its_own_process(
    supervisor: ServerProcess,
) -> None:
    with _spread_client(supervisor.target) as c:
        key = _probe_key(c)
        xs = [torch.randn(8) for _ in range(4)]
        made = [c.execute_detailed(key, [x], keep=True) for x in xs]  # one per connection, in turn
        handles = [r.stack[0] for r in made]
        assert len({r.process for r in made}) == 2  # on both processes
        failures: list[str] = []

        def user(n: int) -> None:
            try:
                for i in range(8):
                    j = (n + i) % 4
                    r = c.execute_detailed(key, [handles[j]], keep=i % 2 == 1)
                    assert r.process == made[j].process, (j, r.process, made[j].process)
                    out = r.stack[0]
                    if i % 2:  # a handle made from a handle: on the same process, fetched from here
                        assert out.server == handles[j].server
                        out = out.fetch(free=True)
                    torch.testing.assert_close(out, xs[j] + 2)
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                failures.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=user, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures[:3]
        # Handle methods split by process and joined in the caller's order.
        assert c.renew_lease().handles == 4
        for got, x in zip(c.fetch(handles), xs, strict=True):
            torch.testing.assert_close(got, x + 1)
        assert c.free(handles[:3]) == 3
        assert c.renew_lease().handles == 1
    # close() freed the last one through its own process: nothing of this client is left.
    for conn in _conns_on(supervisor.target, _children(supervisor.proc.pid)).values():
        raw, _ = conn.call("List", _pb.service.ListRequest().SerializeToString())
        assert _pb.service.ListResponse.FromString(raw).resident.clients == 0
        conn.close()


def test_shared_memory_works_from_several_threads_with_a_session_per_connection(
    supervisor: ServerProcess,
) -> None:
    with _spread_client(supervisor.target) as c:
        key = _probe_key(c)
        failures: list[str] = []
        processes: set[str] = set()

        def caller() -> None:
            try:
                for _ in range(4):
                    x = torch.randn(1 << 16)  # 256 KiB: through shared memory
                    r = c.execute_detailed(key, [x])
                    assert r.transport == "shm", r.transport
                    torch.testing.assert_close(r.stack[0], x + 1)
                    processes.add(r.process)
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                failures.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=caller) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures[:3]
        assert len(processes) == 2
        sessions = [conn.shared for conn in c._pool.all if conn.shared is not None]
        assert len(sessions) >= 2 and len({s.id for s in sessions}) == len(sessions)


def test_an_async_client_spreads_over_connections_and_keeps_handles_home(supervisor: ServerProcess) -> None:
    import asyncio

    from fuseport.client import AsyncClient

    async def main() -> tuple[set[str], list[str]]:
        async with AsyncClient(supervisor.target, timeout=60, connections=4) as c:
            key = await c.register(_add_one, [torch.randn(8)])
            xs = [torch.randn(8) for _ in range(8)]
            made = [await c.execute_detailed(key, [x], keep=True) for x in xs]  # in turn: 2 per connection
            rs = await asyncio.gather(
                *(c.execute_detailed(key, [r.stack[0]]) for r in made for _ in range(3))
            )
            for i, r in enumerate(rs):
                assert r.process == made[i // 3].process
                torch.testing.assert_close(r.stack[0], xs[i // 3] + 2)
            for got, x in zip(await c.fetch([r.stack[0] for r in made]), xs, strict=True):
                torch.testing.assert_close(got, x + 1)
            seen = {r.process for r in made}
            assert [r.process for r in made[:4]] == [r.process for r in made[4:]]
            return seen, [r.process for r in made]

    seen, _ = asyncio.run(main())
    assert {int(p.split()[1]) for p in seen} <= _children(supervisor.proc.pid)


def test_a_killed_process_is_restarted_while_the_other_serves_every_call(
    supervisor: ServerProcess, two: tuple[_Conn, _Conn], graphs: dict[str, _pb.graph.Graph]
) -> None:
    a, b = two
    victim = a.pid()
    key = b.register(graphs["add_one"])
    x = torch.randn(8)
    failures: list[str] = []
    answered: collections.Counter[int] = collections.Counter()
    stop = threading.Event()

    def caller() -> None:
        # The real client: it retries UNAVAILABLE (a connection the kill reset) on a new connection.
        with Client(supervisor.target, timeout=60, options=[("grpc.use_local_subchannel_pool", 1)]) as c:
            while not stop.is_set():
                try:
                    torch.testing.assert_close(c.execute(key, [x])[0], x + 1)
                except Exception as e:  # noqa: BLE001 - every failure is reported below
                    failures.append(f"{type(e).__name__}: {e}")
                with lock:
                    answered[0] += 1

    lock = threading.Lock()
    threads = [threading.Thread(target=caller, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        os.kill(victim, signal.SIGKILL)
        # Calls on the connection to the killed process fail UNAVAILABLE (this raw channel
        # does not retry): one or more, as gRPC notices the connection is gone ("Connection
        # reset", then "Broken pipe" under load); the channel's next connection reaches the
        # other process.
        deadline = time.monotonic() + 60
        while True:
            try:
                stack, pid = a.execute(key, [x])
                break
            except grpc.RpcError as e:
                assert e.code() is grpc.StatusCode.UNAVAILABLE, e.details()
                assert time.monotonic() < deadline, "the raw channel never reached the other process"
                stop.wait(0.05)
        assert pid != victim
        torch.testing.assert_close(stack[0], x + 1)
        # The supervisor starts a new process in its place; it serves the same store.
        deadline = time.monotonic() + 120
        while len(new := _children(supervisor.proc.pid) - {victim, b.pid()}) != 1:
            assert time.monotonic() < deadline, f"no new process: {supervisor.log()[-2000:]}"
            stop.wait(0.1)
        (replacement,) = new
        while f"serving (pid {replacement})" not in supervisor.log():  # once it has started
            assert time.monotonic() < deadline, f"it never served: {supervisor.log()[-2000:]}"
            stop.wait(0.1)
        conn = _conns_on(supervisor.target, {replacement})[replacement]
        torch.testing.assert_close(conn.execute(key, [x])[0][0], x + 1)
        conn.close()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert answered[0] > 0
    assert not failures, failures[:5]
    assert "process 0 died (signal 9)" in supervisor.log() or "process 1 died (signal 9)" in supervisor.log()


def test_the_supervisor_reads_a_burst_of_signals_and_restores_the_handlers() -> None:
    """Every serving process ending at once is a SIGCHLD each, close together. The supervisor
    once set a threading.Event in its handlers and deadlocked on the Event's lock when one
    handler ran inside another (CI: a supervisor that never exited after its processes had).
    Its handlers now add to a set, a pipe wakes its loop; a burst ends in the SIGTERM that follows it."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGCHLD)

    def send() -> None:
        for _ in range(2000):
            os.kill(os.getpid(), signal.SIGCHLD)
        os.kill(os.getpid(), signal.SIGTERM)

    got: set[int] = set()
    with _Signals(hup=False) as signals:
        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + 60
        while signal.SIGTERM not in got:
            assert time.monotonic() < deadline, f"no SIGTERM read; read {got}"
            got |= signals.wait(1.0)
        sender.join()
    assert signal.SIGCHLD in got
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGCHLD)) == before


def test_health_is_serving_while_a_process_serves(supervisor: ServerProcess) -> None:
    for _ in range(4):  # new connections: whichever process takes one answers
        with grpc.insecure_channel(supervisor.target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_sigterm_drains_every_process_and_no_call_is_cancelled(
    supervisor: ServerProcess, graphs: dict[str, _pb.graph.Graph]
) -> None:
    """Last in this module: it stops the module's supervisor."""
    pids = _children(supervisor.proc.pid)
    conns = _conns_on(supervisor.target, pids)
    key = next(iter(conns.values())).register(graphs["add_one"])
    request = codec.encode_execute_request(key, [torch.randn(8)])
    codes: collections.Counter[grpc.StatusCode] = collections.Counter()
    per_pid: collections.Counter[int] = collections.Counter()
    lock = threading.Condition()
    exited = threading.Event()

    def caller(conn: _Conn) -> None:
        call = conn.channel.unary_unary(_METHOD.format("Execute"))  # no retries: the status as sent
        while True:
            last = exited.is_set()
            try:
                _, c = call.with_call(request, timeout=30)
                code = grpc.StatusCode.OK
                pid = int(dict(c.trailing_metadata())[PROCESS_METADATA_KEY].split()[1])
            except grpc.RpcError as e:
                code, pid = e.code(), 0
            with lock:
                codes[code] += 1
                per_pid[pid] += 1
                lock.notify_all()
            if last:
                return

    threads = [
        threading.Thread(target=caller, args=(c,), daemon=True) for c in conns.values() for _ in range(2)
    ]
    for t in threads:
        t.start()
    try:
        with lock:
            assert lock.wait_for(lambda: all(per_pid[p] >= 50 for p in pids), timeout=120), dict(per_pid)
        returncode = supervisor.stop()
    finally:
        exited.set()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    assert returncode == 0, supervisor.log()[-3000:]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, dict(codes)
    assert codes[grpc.StatusCode.UNAVAILABLE] >= len(threads)  # each caller's last call found it gone
    log = supervisor.log()
    assert log.count("exiting with status 0") == 3  # both processes and the supervisor


def test_sighup_reaches_every_serving_process_and_sigterm_ends_them_all(tmp_path: Path) -> None:
    """The supervisor forwards SIGHUP (each process rereads the tokens file) and SIGTERM."""
    tokens = tmp_path / "tokens"
    tokens.write_text("old-token admin\n")
    s = start_server(tmp_path, None, "--processes", "2", "--compile-mode", "off", "--auth-tokens", str(tokens))
    try:
        conns = _conns_on(s.target, _children(s.proc.pid), token="old-token")  # one pinned to each process
        tokens.write_text("new-token admin\n")
        s.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        for pid, conn in conns.items():
            while True:
                try:
                    conn.pid()
                except grpc.RpcError as e:
                    assert e.code() is grpc.StatusCode.UNAUTHENTICATED, e.details()
                    break
                assert time.monotonic() < deadline, f"process {pid} still takes the old token"
                time.sleep(0.05)
            conn.metadata = (("authorization", "Bearer new-token"),)
            assert conn.pid() == pid
            conn.close()
        assert s.stop() == 0, s.log()[-3000:]
        assert s.log().count("exiting with status 0") == 3  # both processes and the supervisor
    finally:
        s.stop(signal.SIGKILL)


@pytest.mark.slow  # a second supervisor: two more processes importing torch
def test_a_process_that_keeps_dying_is_given_up_loudly_while_the_other_serves(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("secret-token admin\n")
    s = start_server(
        tmp_path,
        None,
        "--processes",
        "2",
        "--compile-mode",
        "off",
        "--restart-limit",
        "2",
        "--auth-tokens",
        str(tokens),
    )
    try:
        pids = _children(s.proc.pid)
        victim, survivor = sorted(pids)
        # The tokens file goes away: a restarted process cannot start (it reads the file first).
        tokens.unlink()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while "not restarting it" not in s.log():
            assert time.monotonic() < deadline, s.log()[-3000:]
            assert s.proc.poll() is None, s.log()[-3000:]
            time.sleep(0.1)
        log = s.log()
        assert log.count("restarting it in") == 2
        assert "restarting it in 0.5 s" in log and "restarting it in 1.0 s" in log  # backoff doubles
        assert "died (status 2) 3 times in a row" in log
        assert _children(s.proc.pid) == {survivor}
        with Client(s.target, timeout=60, token="secret-token") as c:
            assert c.health() == "SERVING"
            assert c.list() == []
        assert s.stop() == 0
    finally:
        s.stop(signal.SIGKILL)


@pytest.mark.gpu
def test_device_all_spreads_the_processes_over_the_gpus(
    tmp_path: Path, graphs: dict[str, _pb.graph.Graph]
) -> None:
    """Process i owns device i % (number of GPUs) and says so in Describe; a kernel runs on each."""
    gpus = torch.cuda.device_count()
    assert gpus >= 1, "the gpu tests need a CUDA device (run them with scripts/gpu_check.sh)"
    processes = max(2, gpus)
    s = start_server(
        tmp_path, None, "--device", "all", "--processes", str(processes), "--compile-mode", "off"
    )
    try:
        conns = _conns_on(s.target, _children(s.proc.pid))
        assert len(conns) == processes
        key = next(iter(conns.values())).register(graphs["add_one"])
        x = torch.randn(8)
        for conn in conns.values():
            raw, call = conn.channel.unary_unary(_METHOD.format("Describe")).with_call(
                _pb.service.DescribeRequest(key=key).SerializeToString(), timeout=60
            )
            index = int(dict(call.trailing_metadata())[PROCESS_METADATA_KEY].split()[0])
            assert _pb.service.DescribeResponse.FromString(raw).kernel.device == f"cuda:{index % gpus}"
            torch.testing.assert_close(conn.execute(key, [x])[0][0], x + 1)
        assert s.stop() == 0
    finally:
        s.stop(signal.SIGKILL)
