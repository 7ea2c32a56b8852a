"""`fuseport stats`: a short human summary of a server's Prometheus metrics (`--metrics-port`).

Reads the metrics docs/guides/metrics.md lists, nothing else; imports
neither torch nor grpc, so it answers in a fraction of a second.
"""

from __future__ import annotations

import math
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["DEFAULT_METRICS_URL", "histogram_quantile", "scrape", "summarize"]

# The port deploy/k8s and the docs use; the server has none unless --metrics-port is given.
DEFAULT_METRICS_URL = "http://127.0.0.1:9090/metrics"

_RUNS = ("Execute", "Fallback")


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def scrape(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - the user's URL
        return resp.read().decode("utf-8")


def parse(text: str) -> list[Sample]:
    from prometheus_client.parser import text_string_to_metric_families

    # Samples by their own names: family names differ across prometheus_client
    # versions (a counter's family drops `_total` in the OpenMetrics era).
    return [
        Sample(s[0], dict(s[1]), float(s[2]))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The q-quantile estimated from cumulative (upper bound, count) buckets the
    way Prometheus' histogram_quantile does: linear within the bucket that holds
    the rank. Past the largest finite bound it answers that bound. None without
    observations."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] == 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in ordered:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f} us"
    if value < 1:
        return f"{value * 1e3:.2f} ms"
    return f"{value:.2f} s"


def _bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _counts(parts: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in sorted(parts.items(), key=lambda kv: (-kv[1], kv[0])) if v)


def summarize(text: str) -> str:
    """The summary `fuseport stats` prints. ValueError if there are no fuseport metrics."""
    samples = parse(text)
    if not any(s.name.startswith("fuseport_") for s in samples):
        raise ValueError("no fuseport metrics there (is it a fuseport server's --metrics-port?)")

    def total(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

    by_method: dict[str, float] = defaultdict(float)
    errors: dict[str, float] = defaultdict(float)
    reasons: dict[str, float] = defaultdict(float)
    for s in samples:
        if s.name != "fuseport_requests_total":
            continue
        by_method[s.labels["method"]] += s.value
        if s.labels["code"] != "OK":
            errors[s.labels["code"]] += s.value
        elif s.labels["path"] == "fallback" and s.labels["method"] == "Execute":
            reasons[s.labels["reason"]] += s.value
    lines = []
    requests = sum(by_method.values())
    line = f"requests   {requests:.0f}"
    if requests:
        line += f": {_counts(by_method)}; errors {sum(errors.values()):.0f}"
        line += f" ({_counts(errors)})" if errors else ""
    lines.append(line)

    executed = total("fuseport_requests_total", method="Execute", code="OK")
    fused = total("fuseport_requests_total", method="Execute", path="fused", code="OK")
    if executed:
        line = f"fused      {fused:.0f} of {executed:.0f} Execute calls ({100 * fused / executed:.1f}%)"
        lines.append(line + (f"; fallback reasons: {_counts(reasons)}" if reasons else ""))
    else:
        lines.append("fused      no Execute calls yet")

    buckets: dict[float, float] = defaultdict(float)
    for s in samples:
        if s.name == "fuseport_request_duration_seconds_bucket" and s.labels.get("method") in _RUNS:
            buckets[float(s.labels["le"])] += s.value
    p50, p99 = (histogram_quantile(q, buckets.items()) for q in (0.5, 0.99))
    if p50 is None:
        lines.append("latency    no Execute or Fallback calls yet")
    else:
        lines.append(
            f"latency    p50 {_seconds(p50)}, p99 {_seconds(p99)} "
            "(Execute and Fallback, server side, estimated from histogram buckets)"
        )

    ok, failed = (
        total("fuseport_compiles_total", outcome="ok"),
        total("fuseport_compiles_total", outcome="failed"),
    )
    lines.append(
        f"compiles   {ok:.0f} ok, {failed:.0f} failed, {total('fuseport_compile_seconds_sum'):.1f} s in all"
    )

    # Under a supervisor (--processes N) every series carries process="INDEX". What
    # a sum means differs: counters (requests, compiles, bytes) add up over the
    # processes; the kernels registered are one store that every process reports,
    # so they are not added; caches, memory and devices are each process's own,
    # and are shown process by process.
    processes = sorted({s.labels["process"] for s in samples if "process" in s.labels}, key=int)

    def most(name: str) -> float:
        return max((s.value for s in samples if s.name == name), default=0.0)

    kernels = f"kernels    {most('fuseport_registered_kernels'):.0f} registered "
    variants = f"{most('fuseport_registered_variants'):.0f} variants"
    if not processes:
        lines.append(f"{kernels}({variants}); {_cache(samples)}")
        lines.append(f"memory     {_memory(samples)}")
    else:
        lines.append(f"{kernels}({variants}; one store, shared by {len(processes)} processes)")
        for process in processes:
            mine = [s for s in samples if s.labels.get("process") == process]
            lines.append(f"process {process:<2} {_cache(mine)}; {_memory(mine)}")
    lines.append(
        f"traffic    {_bytes(total('fuseport_received_bytes_total'))} received, "
        f"{_bytes(total('fuseport_sent_bytes_total'))} sent"
    )
    if processes:
        states = {s.labels["state"]: s.value for s in samples if s.name == "fuseport_processes"}
        lines.append(f"processes  {_counts(states) or 'none serving'}")
    return "\n".join(lines)


def _cache(samples: list[Sample]) -> str:
    """One process's compiled-kernel cache."""
    states = {s.labels["state"]: s.value for s in samples if s.name == "fuseport_kernel_cache_entries"}
    capacity = sum(s.value for s in samples if s.name == "fuseport_kernel_cache_capacity")
    evicted = sum(s.value for s in samples if s.name == "fuseport_kernel_cache_evictions_total")
    return (
        f"compiled-kernel cache {sum(states.values()):.0f} of {capacity:.0f} "
        f"({_counts(states) or 'empty'}), {evicted:.0f} evicted"
    )


def _memory(samples: list[Sample]) -> str:
    """One process's memory: its RSS and its devices'."""
    rss = [s.value for s in samples if s.name == "process_resident_memory_bytes"]
    memory = [f"RSS {_bytes(rss[0])}" if rss else "RSS unknown (not Linux)"]
    devices: dict[str, dict[str, float]] = defaultdict(dict)
    for s in samples:
        if s.name == "fuseport_device_memory_bytes":
            devices[s.labels["device"]][s.labels["kind"]] = s.value
    for name, kinds in sorted(devices.items()):
        memory.append(
            f"{name} {_bytes(kinds.get('allocated', 0))} allocated, {_bytes(kinds.get('reserved', 0))} "
            f"reserved of {_bytes(kinds.get('total', 0))}"
        )
    return ", ".join(memory)
