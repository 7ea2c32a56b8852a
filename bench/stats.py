"""Shared pieces of the benchmark: result rows, percentiles, timers and payload sizes."""

from __future__ import annotations

import contextlib
import gc
import math
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "Row",
    "Section",
    "fmt_bytes",
    "gbps",
    "no_gc",
    "parse_size",
    "percentile",
    "summary",
    "time_host",
    "time_interleaved",
]


@dataclass
class Row:
    """One line of the table: a measured value, the floor it is compared to, and
    the verdict against the issue's target (if the row has one).

    `ratio` is always value / floor; `target` is "<= r" or ">= r" on that
    ratio, or on the value itself when `floor` is None (an absolute target).
    """

    section: str
    name: str
    value: float
    unit: str
    floor_name: str = ""
    floor: float | None = None
    target: str = ""
    status: str = "info"  # PASS, MISS, info, or "n/a" (a GPU target on a CPU or --quick run)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.floor is None or self.floor == 0:
            return None
        return self.value / self.floor

    def judge(self, gpu_only: bool = False, on_gpu: bool = True) -> Row:
        """Sets `status` from `target` (a no-op for rows without one)."""
        if not self.target:
            self.status = "info"
            return self
        if gpu_only and not on_gpu:
            self.status = "n/a"
            return self
        m = re.match(r"(<=|>=)\s*([0-9.]+)", self.target)
        if m is None:
            raise ValueError(f"bad target {self.target!r}")
        op, bound = m.group(1), float(m.group(2))
        measured = self.value if self.floor is None else self.ratio
        if measured is None or math.isnan(measured):
            self.status = "MISS"
        else:
            self.status = "PASS" if (measured <= bound if op == "<=" else measured >= bound) else "MISS"
        return self

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio"] = self.ratio
        return out


@dataclass
class Section:
    """What one section measured: its rows for the table, and everything else for the JSON."""

    name: str
    rows: list[Row]
    data: dict[str, Any]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated, as numpy's default does."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(values_us: Sequence[float]) -> dict[str, float]:
    """p50/p99/mean/min/max of latencies in microseconds."""
    if not values_us:
        return {"n": 0}
    return {
        "n": len(values_us),
        "p50_us": percentile(values_us, 50),
        "p99_us": percentile(values_us, 99),
        "mean_us": statistics.fmean(values_us),
        "min_us": min(values_us),
        "max_us": max(values_us),
    }


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else math.nan


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Timed loops run without the cyclic GC, so its pauses land between
    measurements rather than in one method's p99 and not the other's."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def time_host(fn: Callable[[], Any], iterations: int, warmup: int, sync: Callable[[], None] | None = None) -> list[float]:
    """Wall-clock microseconds of `fn()` (then `sync()`), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    out = []
    with no_gc():
        for _ in range(iterations):
            t0 = time.perf_counter_ns()
            fn()
            if sync:
                sync()
            out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def time_interleaved(fns: dict[str, Callable[[], Any]], iterations: int, warmup: int) -> dict[str, list[float]]:
    """Wall-clock microseconds of each of `fns`, one call of each in turn per iteration
    (the order turning each time): rows whose ratio is the result see the same moments of
    a noisy machine, where one block after the other would each see its own."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    with no_gc():
        for i in range(iterations):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                t0 = time.perf_counter_ns()
                fns[name]()
                out[name].append((time.perf_counter_ns() - t0) / 1000)
    return out


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgG]?)(?:i?[bB])?\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """'1K', '64KiB', '16M', '256MB', '4096' -> bytes (binary units: K = 1024)."""
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"not a size: {text!r} (use e.g. 1K, 64K, 16M, 256M)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return n


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{int(n)} B"
