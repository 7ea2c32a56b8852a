"""Metrics: a real server's Prometheus endpoint moves by exactly what real calls did; `fuseport stats` reads it."""

from __future__ import annotations

import math
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from fuseport.client import Client, ExecuteResult, KernelNotFound
from fuseport.client.stats import histogram_quantile

from .conftest import ServerProcess

# Runs again in CI's venv at the lowest declared prometheus-client (.ci/lowest.txt).
pytestmark = pytest.mark.compat

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: ServerProcess) -> Samples:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {
        (s[0], frozenset(s[1].items())): float(s[2])
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One series' value; 0 for a series not exported yet (a counter before its first event)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@dataclass
class Compiled:
    """A kernel compiled once for the module, and the server's metrics around that compile."""

    key: int
    x: torch.Tensor
    result: ExecuteResult
    before: Samples
    after: Samples


def double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@pytest.fixture(scope="module")
def compiled(server: ServerProcess) -> Compiled:
    """The one compile of this module, on the session's server (compiles on,
    metrics on): counted exactly, since no other compile runs meanwhile."""
    x = torch.arange(1024, dtype=torch.float32)  # 4 KiB in, 4 KiB out
    # A deadline to end a hang, not to time the compile (CI runs it beside the suite).
    with Client(server.target, timeout=900) as c:
        key = c.register(double, [x])
        before = _no_compile_running(server)
        result = c.execute_detailed(key, [x], wait=True)
        after = scrape(server)
    return Compiled(key, x, result, before, after)


def test_metrics_are_served_on_the_port_the_port_file_names(server: ServerProcess) -> None:
    samples = scrape(server)  # no retry: start_server returned once health said SERVING
    assert server.metrics_port not in (None, 0, server.port)
    assert value(samples, "fuseport_kernel_cache_capacity") == 256
    assert value(samples, "process_resident_memory_bytes") > 10 << 20
    assert f"metrics on http://127.0.0.1:{server.metrics_port}/metrics" in server.log()


def test_a_compile_is_counted_with_its_time_and_its_kernel_cached(compiled: Compiled) -> None:
    before, after = compiled.before, compiled.after
    assert compiled.result.path == "fused"
    assert moved(before, after, "fuseport_compiles_total", outcome="ok") == 1
    assert moved(before, after, "fuseport_compiles_total", outcome="failed") == 0
    assert moved(before, after, "fuseport_compile_seconds_count") == 1
    assert moved(before, after, "fuseport_compile_seconds_sum") > 0
    # One entry more, less any the cache evicted to make room (the session's server is shared).
    cache = "fuseport_kernel_cache_entries"
    assert moved(before, after, cache, state="compiling") == 0
    grown = moved(before, after, cache, state="ready") + moved(before, after, cache, state="failed")
    assert grown + moved(before, after, "fuseport_kernel_cache_evictions_total") == 1
    fused = moved(before, after, "fuseport_requests_total", method="Execute", path="fused", reason="none", code="OK")
    assert fused == 1


def test_calls_move_requests_bytes_and_latency_histograms_by_what_they_did(
    server: ServerProcess, compiled: Compiled
) -> None:
    key, x = compiled.key, compiled.x
    with Client(server.target, timeout=60) as c:
        before = scrape(server)
        other = c.register(lambda t: t - 3, [x])
        registered = scrape(server)
        for _ in range(3):
            c.execute(key, [x])
        for _ in range(2):
            c.fallback(key, [x])
        with pytest.raises(KernelNotFound):
            c.execute(key + 1, [x])
        sent_in = 5 * len(c._execute_request(key, [x], False)) + len(c._execute_request(key + 1, [x], False))
        after = scrape(server)
        assert c.unregister(other)
        gone = scrape(server)

    assert moved(before, registered, "fuseport_registered_kernels") == 1
    assert moved(registered, gone, "fuseport_registered_kernels") == -1
    requests = "fuseport_requests_total"
    assert moved(before, after, requests, method="Register", path="none", reason="none", code="OK") == 1
    assert moved(before, after, requests, method="Execute", path="fused", reason="none", code="OK") == 3
    assert moved(before, after, requests, method="Fallback", path="fallback", reason="requested", code="OK") == 2
    assert moved(before, after, requests, method="Execute", path="none", reason="none", code="NOT_FOUND") == 1

    # Every byte of the requests, counted where they arrived; responses carry 4 KiB each, errors nothing.
    received = moved(before, after, "fuseport_received_bytes_total", method="Execute") + moved(
        before, after, "fuseport_received_bytes_total", method="Fallback"
    )
    assert received == sent_in
    sent = moved(before, after, "fuseport_sent_bytes_total", method="Execute")
    assert 3 * x.nbytes <= sent <= 3 * (x.nbytes + 256)

    duration = "fuseport_request_duration_seconds_count"
    assert moved(before, after, duration, method="Execute", path="fused") == 3
    assert moved(before, after, duration, method="Execute", path="none") == 1
    assert moved(before, after, duration, method="Fallback", path="fallback") == 2
    for stage in ("decode", "queue", "run", "encode"):
        # Only calls that ran have a response with timings.
        assert moved(before, after, "fuseport_request_stage_seconds_count", method="Execute", stage=stage) == 3
        assert moved(before, after, "fuseport_request_stage_seconds_count", method="Fallback", stage=stage) == 2
    # The stages are parts of the whole call.
    stages = sum(
        moved(before, after, "fuseport_request_stage_seconds_sum", method="Fallback", stage=stage)
        for stage in ("decode", "queue", "run", "encode")
    )
    whole = moved(before, after, "fuseport_request_duration_seconds_sum", method="Fallback", path="fallback")
    assert 0 < stages <= whole
    # Cumulative buckets: the +Inf one holds every observation.
    inf = moved(before, after, "fuseport_request_duration_seconds_bucket", method="Fallback", path="fallback", le="+Inf")
    assert inf == 2


def test_stats_summarises_a_servers_metrics(server: ServerProcess, compiled: Compiled) -> None:
    with Client(server.target, timeout=60) as c:
        c.fallback(compiled.key, [compiled.x])
        with pytest.raises(KernelNotFound):
            c.describe(compiled.key + 1)
    samples = scrape(server)
    out = _stats(server.metrics_url)
    assert out.returncode == 0, out.stderr

    def total(name: str, **labels: str) -> float:
        return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)

    executed = total("fuseport_requests_total", method="Execute", code="OK")
    fused = total("fuseport_requests_total", method="Execute", path="fused", code="OK")
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert lines["fused"].startswith(
        f"fused      {fused:.0f} of {executed:.0f} Execute calls ({100 * fused / executed:.1f}%)"
    )
    assert f"Fallback {total('fuseport_requests_total', method='Fallback'):.0f}" in lines["requests"]
    assert f"NOT_FOUND {total('fuseport_requests_total', code='NOT_FOUND'):.0f}" in lines["requests"]
    assert "p50 " in lines["latency"] and "p99 " in lines["latency"]
    ok = total("fuseport_compiles_total", outcome="ok")
    assert ok >= 1 and lines["compiles"].startswith(f"compiles   {ok:.0f} ok, ")
    kernels = total("fuseport_registered_kernels")
    assert kernels >= 1 and lines["kernels"].startswith(f"kernels    {kernels:.0f} registered")
    assert "RSS " in lines["memory"] and " MiB" in lines["memory"]


def test_stats_says_what_it_could_not_read(server: ServerProcess) -> None:
    # The gRPC port speaks HTTP/2 only: not a metrics endpoint.
    out = _stats(f"http://127.0.0.1:{server.port}/metrics")
    assert out.returncode == 1
    assert out.stderr.startswith(f"fuseport stats: cannot read http://127.0.0.1:{server.port}/metrics")
    assert "Traceback" not in out.stderr


def _stats(url: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fuseport.cli", "stats", "--metrics-url", url, "--timeout", "10"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent)


def _no_compile_running(server: ServerProcess, timeout: float = 300) -> Samples:
    """A scrape once no compile that an earlier test started is still running,
    so that the compile counters move by this test's compile alone."""
    deadline = time.monotonic() + timeout
    while (samples := scrape(server)) and value(samples, "fuseport_kernel_cache_entries", state="compiling"):
        assert time.monotonic() < deadline, "an earlier test's compile is still running"
        time.sleep(0.2)
    return samples


@pytest.mark.parametrize(
    ("q", "expected"),
    [(0.25, 0.055), (0.5, 0.11), (0.75, 0.165), (0.95, 0.2), (1.0, 0.2)],
)
def test_quantiles_interpolate_within_the_bucket_like_prometheus(q: float, expected: float) -> None:
    # 10 observations at or below 0.1, 10 in (0.1, 0.2], 2 past the last finite bound:
    # the median (rank 11 of 22) lies a tenth into the second bucket.
    buckets = [(0.1, 10.0), (0.2, 20.0), (math.inf, 22.0)]
    assert histogram_quantile(q, buckets) == pytest.approx(expected)


def test_quantile_of_an_empty_histogram_is_unknown() -> None:
    assert histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
