"""Section 5, device-resident values: a chain of three kernels with handles against shipping the data each call.

Three pointwise kernels run one after the other on a 64M-element float32
tensor (256 MiB; --quick: 64K elements), three ways, each timed end to end from
this client:

* shipped: every call sends its input and gets its output back as bytes (the
  floor this section is compared with);
* resident: the input is already on the server's device (a handle), each call
  keeps its output there, the intermediates are freed (the issue's target:
  >= 20x faster than shipped, on the GPU box);
* resident, upload and fetch included: the input goes up once and the result
  comes back once, the two calls in between move no bytes.

And one kernel on a resident input, fused Execute against Fallback, both
keeping their output (the issue's target: >= 5x on the GPU box, where the
transfer no longer hides the fused kernel's speed).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fuseport.bench.context import Context
from fuseport.bench.kernels import identity, pointwise_chain
from fuseport.bench.stats import Row, Section, fmt_bytes, summary, time_host

__all__ = ["run"]

log = logging.getLogger(__name__)

ELEMENTS = 64 << 20
QUICK_ELEMENTS = 64 << 10


def scale(x: torch.Tensor) -> torch.Tensor:
    return x * 1.5 + 0.25


def gate(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def run(ctx: Context) -> Section:
    o = ctx.options
    c = ctx.client
    n = QUICK_ELEMENTS if o.quick else ELEMENTS
    iterations = o.iterations or 3
    small = torch.randn(1024)
    keys = [c.register(fn, [small]) for fn in (scale, gate, pointwise_chain)]
    upload = c.register(identity, [small])  # puts a copy of its input on the device
    for key in (*keys, upload):  # sizes are not part of the ArgSpec: compiled once, for every size
        res = c.execute_detailed(key, [small], wait=True, timeout=o.timeout)
        if res.path != "fused":
            log.warning("kernel %d runs %s (%s: %s)", key, res.path, res.reason, res.detail)
    x = torch.randn(n)
    expected = x
    for fn in (scale, gate, pointwise_chain):
        expected = fn(expected)

    def shipped() -> torch.Tensor:
        y = x
        for key in keys:
            (y,) = c.execute(key, [y], timeout=o.timeout)
        return y

    def chain(h: Any) -> Any:
        kept = []
        for key in keys:
            (h,) = c.execute(key, [h], keep=True, timeout=o.timeout)
            kept.append(h)
        c.free(kept[:-1])
        return kept[-1]

    (resident_x,) = c.execute(upload, [x], keep=True, timeout=o.timeout)

    def resident() -> None:
        chain(resident_x).free()

    def with_transfers() -> torch.Tensor:
        (h,) = c.execute(keys[0], [x], keep=True, timeout=o.timeout)
        for key in keys[1:]:
            (g,) = c.execute(key, [h], keep=True, timeout=o.timeout)
            h.free()
            h = g
        return h.fetch(free=True)

    # Right before anything is timed: each way computes what eager does.
    for name, fn in (("shipped", shipped), ("with transfers", with_transfers)):
        got = fn()
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise AssertionError(f"resident chain ({name}) differs from eager")
    check = chain(resident_x)
    if not torch.allclose(check.fetch(free=True), expected, rtol=1e-4, atol=1e-5):
        raise AssertionError("resident chain differs from eager")

    times = {
        "shipped": time_host(shipped, iterations, 1),
        "resident": time_host(resident, iterations, 1),
        "with_transfers": time_host(with_transfers, iterations, 1),
    }
    # One kernel on the resident input, fused against unfused, both keeping their output.
    key = keys[2]
    paths = {}
    for name, runner in (("execute", c.execute_detailed), ("fallback", c.fallback_detailed)):
        paths[name] = runner(key, [resident_x], keep=True, timeout=o.timeout).path

        def once(runner: Any = runner) -> None:
            runner(key, [resident_x], keep=True, timeout=o.timeout).stack[0].free()

        times[f"one_{name}"] = time_host(once, iterations, 1)
    resident_x.free()

    med = {k: summary(v)["p50_us"] for k, v in times.items()}
    on_gpu = ctx.on_gpu and not o.quick
    size = fmt_bytes(n * 4)
    rows = [
        Row("resident", f"3-kernel chain {size}, handles", med["resident"] / 1e3, "ms",
            "shipping the data each call", med["shipped"] / 1e3, target="<= 0.05x (20x faster, GPU)",
            note=f"{med['shipped'] / med['resident']:.1f}x faster").judge(gpu_only=True, on_gpu=on_gpu),
        Row("resident", f"3-kernel chain {size}, upload + fetch once", med["with_transfers"] / 1e3, "ms",
            "shipping the data each call", med["shipped"] / 1e3,
            note=f"{med['shipped'] / med['with_transfers']:.1f}x faster"),
        Row("resident", f"resident input {size}: Execute vs Fallback", med["one_execute"] / 1e3, "ms",
            "Fallback, same resident input", med["one_fallback"] / 1e3, target="<= 0.2x (5x faster, GPU)",
            note=f"{med['one_fallback'] / med['one_execute']:.1f}x faster; paths {paths['execute']}/"
                 f"{paths['fallback']}").judge(gpu_only=True, on_gpu=on_gpu),
    ]  # fmt: skip
    data = {
        "elements": n,
        "iterations": iterations,
        "paths": paths,
        **{k: summary(v) for k, v in times.items()},
    }
    return Section("resident", rows, data)
