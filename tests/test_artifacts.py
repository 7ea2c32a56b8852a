"""Compiles outside the serving process: the artifact cache, warm restart, a crashed or hung compile worker.

One real compile in the worker per module (tens of seconds on 2 cores) is shared
by the tests that need one: the restart tests start further servers on the
same store and artifact cache. Compiles are counted by the server's own
`fuseport_compiles_total` (every compile, in the worker or in-process, ends in
exactly one) and loads by `fuseport_artifact_loads_total`.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from fuseport.client import Client
from fuseport.server.artifacts import ArtifactCache, ArtifactError
from fuseport.server.compile.standalone import StandaloneCompiler
from fuseport.server.compile.worker import FAULT_ENV
from fuseport.wire.capture import capture

from .conftest import ServerProcess, start_server

# The default strategy: compiled in the worker, cached, loaded.
STANDALONE = StandaloneCompiler.name


def scrape(server: ServerProcess) -> dict[tuple[str, str], float]:
    """(name, outcome label) -> value, for the two counters these tests read."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, s.labels.get("outcome", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in ("fuseport_compiles_total", "fuseport_artifact_loads_total")
    }


def compiles(server: ServerProcess) -> float:
    m = scrape(server)
    return m.get(("fuseport_compiles_total", "ok"), 0.0) + m.get(("fuseport_compiles_total", "failed"), 0.0)


def scale_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * 3 + y).relu()


@dataclass
class Compiled:
    tmp: Path
    store: Path
    key: int
    stack: list[torch.Tensor]
    expected: torch.Tensor


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compiled]:
    """A kernel compiled once (in the compile worker, by default) into the module's
    store; the server that compiled it is stopped before the tests run."""
    tmp = tmp_path_factory.mktemp("artifacts")
    server = start_server(tmp / "first", tmp / "store", "--metrics-port", "0")
    try:
        x, y = torch.randn(6, 5), torch.randn(6, 5)
        with Client(server.target, timeout=300) as c:
            key = c.register(scale_add, [x, y])
            r = c.execute_detailed(key, [x, y], wait=True)
            assert r.path == "fused", (r.reason, r.detail, server.log())
            arg_spec = c.describe(key).arg_specs[0]
            assert arg_spec.compiled_by == STANDALONE
            assert not arg_spec.from_cache
        assert compiles(server) == 1
    finally:
        server.stop()
    yield Compiled(tmp, tmp / "store", key, [x, y], scale_add(x, y))


def artifact_files(store: Path) -> list[Path]:
    return sorted((store / "artifacts").glob("*.bin"))


def test_restarted_server_runs_a_known_arg_spec_fused_without_compiling(compiled: Compiled) -> None:
    server = start_server(compiled.tmp / "restart", compiled.store, "--metrics-port", "0")
    try:
        with Client(server.target, timeout=60) as c:
            # Other sizes, same ArgSpec: the artifact has dynamic dims.
            x, y = torch.randn(9, 3), torch.randn(9, 3)
            r = c.execute_detailed(compiled.key, [x, y])  # no wait: fused on the first call
            assert r.path == "fused", (r.reason, r.detail)
            torch.testing.assert_close(r.stack[0], scale_add(x, y))
            info = c.describe(compiled.key, include_source=True).arg_specs[0]
            assert info.from_cache and info.compiled_by == STANDALONE
            assert 'extern "C"' in info.source  # Inductor's generated C++ kernel
        assert compiles(server) == 0
        assert scrape(server)[("fuseport_artifact_loads_total", "ok")] == 1
    finally:
        server.stop()


def test_cache_dir_and_files_are_private(compiled: Compiled) -> None:
    directory = compiled.store / "artifacts"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_truncated_artifact_is_refused_and_compiled_again(compiled: Compiled) -> None:
    (package,) = artifact_files(compiled.store)
    good = package.read_bytes()
    package.write_bytes(good[: len(good) // 2])
    server = start_server(compiled.tmp / "corrupt", compiled.store, "--metrics-port", "0")
    try:
        with Client(server.target, timeout=300) as c:
            first = c.execute_detailed(compiled.key, compiled.stack)
            assert first.path == "fallback" and first.reason == "compiling"
            torch.testing.assert_close(first.stack[0], compiled.expected)
            r = c.execute_detailed(compiled.key, compiled.stack, wait=True)
            assert r.path == "fused", (r.reason, r.detail)
            torch.testing.assert_close(r.stack[0], compiled.expected)
        m = scrape(server)
        assert m[("fuseport_artifact_loads_total", "refused")] == 1
        assert m[("fuseport_compiles_total", "ok")] == 1
        assert "damaged or truncated" in server.log()
    finally:
        server.stop()
    (package,) = artifact_files(compiled.store)
    # The recompiled artifact replaced the damaged one, and passes the checks
    assert ArtifactCache(compiled.store / "artifacts", 1 << 30).load(package.stem) is not None


def test_artifact_writable_by_others_is_never_loaded(compiled: Compiled, tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache", 1 << 30)
    src = compiled.store / "artifacts"
    name = artifact_files(compiled.store)[0].stem
    for suffix in (".bin", ".json"):
        (cache.dir / f"{name}{suffix}").write_bytes((src / f"{name}{suffix}").read_bytes())
    assert cache.load(name) is not None
    os.chmod(cache.dir / f"{name}.bin", 0o666)
    with pytest.raises(ArtifactError, match="writable by others"):
        cache.load(name)
    assert not (cache.dir / f"{name}.bin").exists()  # refused and removed: compiled again


def test_cache_evicts_least_recently_used_past_its_bound(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache", max_bytes=2500)
    names = []
    for i in range(3):
        tmp = cache.temp_path()
        tmp.write_bytes(bytes([i]) * 1000)
        name = cache.key({"i": i})
        cache.commit(name, tmp, {"i": i})
        names.append(name)
        # mtimes are the use order; make them distinct on coarse clocks
        os.utime(cache.paths(name)[1], (time.time() - 100 + i * 10,) * 2)
    # 3000 bytes committed under a 2500 bound: the first went when the third came
    assert [n for _, n, _ in cache.entries()] == names[1:]
    assert cache.load(names[1]) is not None  # used now: the newest
    tmp = cache.temp_path()
    tmp.write_bytes(b"x" * 1000)
    cache.commit(cache.key({"i": 3}), tmp, {})
    remaining = {n for _, n, _ in cache.entries()}
    assert names[1] in remaining and names[2] not in remaining


def test_commit_on_a_full_cache_leaves_no_file_and_the_next_commit_works(tmp_path: Path) -> None:
    # A full disk without mounting anything: a child process with RLIMIT_FSIZE at 16
    # bytes, so every write that grows a file past that fails with EFBIG, the way
    # ENOSPC or EDQUOT would (Python ignores SIGXFSZ). The package is written here,
    # before the child runs: like the compile worker's, it is already on disk and
    # commit only renames it; the JSON record is what no longer fits. A child, so
    # that the limit never touches pytest's own files.
    cache = ArtifactCache(tmp_path / "cache", max_bytes=1 << 20)
    tmp = cache.temp_path()
    tmp.write_bytes(b"a compiled package")
    name = cache.key({"full": 1})
    child = f"""
import errno, resource
from pathlib import Path
from fuseport.server.artifacts import ArtifactCache
resource.setrlimit(resource.RLIMIT_FSIZE, (16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    ArtifactCache(Path({str(cache.dir)!r}), 1 << 20).commit({name!r}, Path({str(tmp)!r}), {{"k": 1}})
except OSError as e:
    raise SystemExit(0 if e.errno == errno.EFBIG else 2)
raise SystemExit(1)
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert out.returncode == 0, out
    # Not cached, and nothing half there: no package without its JSON, no temp file.
    assert sorted(p.name for p in cache.dir.iterdir()) == []
    assert cache.load(name) is None
    tmp = cache.temp_path()
    tmp.write_bytes(b"a compiled package")
    cache.commit(name, tmp, {"k": 1})  # room again: cached
    assert cache.load(name) is not None


def test_cache_clear_command_empties_the_cache(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "store" / "artifacts", max_bytes=1 << 20)
    tmp = cache.temp_path()
    tmp.write_bytes(b"package")
    cache.commit(cache.key({"a": 1}), tmp, {})
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSEPORT_")}
    cmd = [sys.executable, "-m", "fuseport.cli", "cache"]
    out = subprocess.run(
        [*cmd, "info", "--store-dir", str(tmp_path / "store")], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and "1 artifacts, 7 bytes" in out.stdout, out
    out = subprocess.run(
        [*cmd, "clear", "--store-dir", str(tmp_path / "store")], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and "removed 1 artifacts" in out.stdout, out
    assert cache.entries() == []


@pytest.mark.parametrize(
    ("fault", "flags", "error"),
    [
        ("crash", (), "compile worker died during this compile (killed by signal 9)"),
        ("hang", ("--compile-timeout-seconds", "3"), "passed its 3 s timeout"),
    ],
)
def test_compile_worker_fault_fails_only_that_arg_spec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, flags: tuple[str, ...], error: str
) -> None:
    # Test-only fault injection, read by the worker process (not a setting:
    # start_server passes it through, as it drops FUSEPORT_* variables).
    monkeypatch.setenv(FAULT_ENV, fault)
    server = start_server(tmp_path, None, "--metrics-port", "0", *flags)
    try:
        with Client(server.target, timeout=300) as c:
            key = c.register(scale_add, [torch.randn(4, 4), torch.randn(4, 4)])
            for shape in ((4, 4), (4, 1)):  # two ArgSpecs: the second runs on a replaced worker
                x, y = torch.randn(*shape), torch.randn(*shape)
                r = c.execute_detailed(key, [x, y], wait=True)
                assert r.path == "fallback" and r.reason == "compile_failed", r
                assert error in r.detail
                torch.testing.assert_close(r.stack[0], scale_add(x, y))
            states = [a.state for a in c.describe(key).arg_specs]
            assert len(states) == 2
        m = scrape(server)
        assert m[("fuseport_compiles_total", "failed")] == 2
        assert server.log().count("compile worker") >= 2  # started, then replaced
        assert server.proc.poll() is None
    finally:
        server.stop()


def reduce_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    return (x * 2).sum(-1, keepdim=True).repeat(1, n)


def test_sizes_outside_what_the_compiler_assumed_run_unfused_and_right(tmp_path: Path) -> None:
    """Inductor compiles a row reduction for rows of at most 4096 on CPU (a guard it
    records in its ShapeEnv). The artifact carries that as a size condition the
    server checks: a longer row runs the fallback (right), never the kernel."""
    server = start_server(tmp_path, None, "--metrics-port", "0")
    try:
        with Client(server.target, timeout=300) as c:
            x = torch.randn(3, 40)
            key = c.register(reduce_rows, [x, 3])
            r = c.execute_detailed(key, [x, 3], wait=True)
            assert r.path == "fused", (r.reason, r.detail, server.log())
            torch.testing.assert_close(r.stack[0], reduce_rows(x, 3))
            # Other sizes and another int: the same artifact, no compile.
            x = torch.randn(5, 70)
            r = c.execute_detailed(key, [x, 7])
            assert r.path == "fused", (r.reason, r.detail)
            torch.testing.assert_close(r.stack[0], reduce_rows(x, 7))
            info = c.describe(key).arg_specs
            assert len(info) == 1 and info[0].compiled_by == STANDALONE, info
            long = torch.randn(2, 5000)
            r = c.execute_detailed(key, [long, 2])
            torch.testing.assert_close(r.stack[0], reduce_rows(long, 2))
            if r.path == "fallback":  # the guard this torch records
                assert r.reason == "unsupported" and "compiled for sizes where" in r.detail, r
        assert compiles(server) == 1
    finally:
        server.stop()


def reshape_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.reshape(k, -1) + 1


def test_an_equality_the_compile_assumed_is_checked_before_the_kernel_runs(tmp_path: Path) -> None:
    """Compiled at x (8, 3), k = 8, the kernel assumes k == x.shape[0] (the ShapeEnv
    made the two symbols one). A call with k = 4 or k = 12 has the same ArgSpec and a
    valid plan; the kernel would read k rows of x's width. It must run unfused, right.
    The graph comes without capture's conditions (capture says k == x.shape[0] too),
    as a client may send it: the compile's own conditions are all that stands here."""
    server = start_server(tmp_path, None, "--metrics-port", "0")
    try:
        with Client(server.target, timeout=300) as c:
            x = torch.randn(8, 3)
            graph = capture(reshape_rows, [x, 8])
            assert graph.conditions
            del graph.conditions[:]
            key = c.register(graph)
            r = c.execute_detailed(key, [x, 8], wait=True)
            assert r.path == "fused", (r.reason, r.detail, server.log())
            torch.testing.assert_close(r.stack[0], reshape_rows(x, 8))
            for k in (4, 12, 6):
                y = torch.randn(8, 3)
                r = c.execute_detailed(key, [y, k])
                torch.testing.assert_close(r.stack[0], reshape_rows(y, k))
                assert r.path == "fallback" and r.reason == "unsupported", (k, r.path, r.reason, r.detail)
            y = torch.randn(5, 7)  # k == x.shape[0] again: the same kernel, fused
            r = c.execute_detailed(key, [y, 5])
            assert r.path == "fused", (r.reason, r.detail)
            torch.testing.assert_close(r.stack[0], reshape_rows(y, 5))
    finally:
        server.stop()


@pytest.mark.gpu
def test_artifact_on_cuda_is_loaded_after_restart_without_compiling(tmp_path: Path) -> None:
    """The default strategy on CUDA: compiled in the worker, fused, and after a
    restart loaded (not compiled) and fused from the first call, at other sizes."""
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (run them with scripts/gpu_check.sh)")
    x, y = torch.randn(64, 33), torch.randn(64, 33)
    flags = ("--device", "cuda", "--metrics-port", "0")
    server = start_server(tmp_path / "a", tmp_path / "store", *flags)
    try:
        with Client(server.target, timeout=300) as c:
            key = c.register(scale_add, [x, y])
            r = c.execute_detailed(key, [x, y], wait=True)
            assert r.path == "fused", (r.reason, r.detail, server.log())
            torch.testing.assert_close(r.stack[0], scale_add(x, y))
            assert c.describe(key).arg_specs[0].compiled_by == STANDALONE
    finally:
        server.stop()
    server = start_server(tmp_path / "b", tmp_path / "store", *flags)
    try:
        with Client(server.target, timeout=60) as c:
            r = c.execute_detailed(key, [x[:7], y[:7]])
            assert r.path == "fused", (r.reason, r.detail)
            torch.testing.assert_close(r.stack[0], scale_add(x[:7], y[:7]))
            assert c.describe(key).arg_specs[0].from_cache
        assert compiles(server) == 0
    finally:
        server.stop()


@pytest.mark.gpu
def test_inprocess_compiler_on_cuda_still_fuses(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (run them with scripts/gpu_check.sh)")
    x, y = torch.randn(64, 33), torch.randn(64, 33)
    server = start_server(tmp_path / "a", tmp_path / "store", "--device", "cuda", "--compiler", "inprocess")
    try:
        with Client(server.target, timeout=300) as c:
            key = c.register(scale_add, [x, y])
            r = c.execute_detailed(key, [x, y], wait=True)
            assert r.path == "fused", (r.reason, r.detail)
            torch.testing.assert_close(r.stack[0], scale_add(x, y))
            assert c.describe(key).arg_specs[0].compiled_by.startswith("torch.compile")
    finally:
        server.stop()


def _pool_after_a_compile(tmp: Path, *flags: str) -> tuple[set[int], str]:
    """Inductor pool processes in a server's tree once a kernel has compiled, and its log."""
    from fuseport.bench.procs import roles, tree

    server = start_server(tmp, None, "--processes", "1", *flags)
    try:
        with Client(server.target, timeout=600) as c:
            dev = "cuda" if "cuda" in flags else "cpu"
            x = torch.randn(6, 5)
            key = c.register(lambda t: (t * 5 + 1).sin(), [x])
            r = c.execute_detailed(key, [x.to(dev)], wait=True)
            assert r.path == "fused", (r.reason, r.detail)
            torch.testing.assert_close(r.stack[0].cpu(), (x * 5 + 1).sin())
        pool = {pid for pid in tree(server.proc.pid) if set(roles([pid]).values()) == {"inductor pool"}}
        return pool, server.log()
    finally:
        server.stop()


def test_the_compile_worker_starts_no_inductor_pool_unless_told(tmp_path: Path) -> None:
    """By default the compile worker compiles a graph's kernels one after the other, with
    no Inductor pool (--compile-threads 1), and it is told what the flag says. (This torch
    starts no pool on the CPU whatever the setting: the gpu test below sees one start.)"""
    pool, log = _pool_after_a_compile(tmp_path / "default")
    assert not pool
    assert "Inductor compile threads: 1)" in log
    _, log = _pool_after_a_compile(tmp_path / "three", "--compile-threads", "3")
    assert "Inductor compile threads: 3)" in log


@pytest.mark.gpu
def test_on_cuda_the_compile_worker_starts_an_inductor_pool_only_when_told(tmp_path: Path) -> None:
    """Inductor's pool (a process per thread, each importing torch and Triton) kept 1.3-2
    cores of the H100 machine busy after a server's first compile (docs/perf.md)."""
    pool, _ = _pool_after_a_compile(tmp_path / "default", "--device", "cuda")
    assert not pool
    pool, _ = _pool_after_a_compile(tmp_path / "three", "--device", "cuda", "--compile-threads", "3")
    assert pool
