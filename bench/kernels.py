"""The kernels the benchmark registers: an identity-like copy, a pointwise chain, a softmax, an MLP."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DeviceCase", "device_cases", "fresh_kernel", "identity", "pointwise_chain", "row_softmax"]


def identity(x: torch.Tensor) -> torch.Tensor:
    # `x + 0`, not `x`: Inductor emits a real copy kernel for it, so the fused
    # path allocates and writes an output of the payload's size as any kernel
    # would, and the comparison with the echo includes that cost.
    return x + 0


def pointwise_chain(x: torch.Tensor) -> torch.Tensor:
    """Eight pointwise ops: eager runs eight kernels (eight round trips through
    memory), a fused kernel reads x once and writes once."""
    y = x * 1.5
    y = y + 0.25
    y = torch.sin(y)
    y = y * x
    y = torch.sigmoid(y)
    y = y - 0.5
    y = torch.tanh(y)
    return y * 2.0


def row_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


class MLP(torch.nn.Module):
    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


@dataclass
class DeviceCase:
    """One kernel of the device section: what to capture, on what, and its
    memory traffic (bytes a perfect kernel reads and writes once)."""

    name: str
    description: str
    fn: Callable[..., Any]
    example: list[Any]  # small inputs for capture (dims kept symbolic)
    make_input: Callable[[], torch.Tensor]  # the measured input, on the host
    elements: int
    min_bytes: int  # input + output bytes: the memory floor's numerator
    floor_target: bool = False  # the memory-floor and 5x targets apply
    memory_bound: bool = True  # False: compute-bound, a memory floor says nothing


def device_cases(on_gpu: bool, quick: bool) -> list[DeviceCase]:
    """The issue's sizes on a GPU (64M elements, MLP batch 4096); smaller on a
    CPU so that a default run stays under five minutes on two cores; with
    `quick`, the pointwise chain alone, tiny."""
    if quick:
        n, rows, cols, batch, d, hidden = 1 << 16, 256, 256, 64, 32, 64
    elif on_gpu:
        n, rows, cols, batch, d, hidden = 64 << 20, 8192, 8192, 4096, 1024, 4096
    else:
        n, rows, cols, batch, d, hidden = 4 << 20, 2048, 2048, 4096, 256, 1024
    torch.manual_seed(0)
    mlp = MLP(d, hidden).eval()
    cases = [
        DeviceCase(
            "pointwise",
            f"8-op pointwise chain, {n / (1 << 20):g}M float32",
            pointwise_chain,
            [torch.randn(64)],
            lambda: torch.randn(n),
            n,
            2 * 4 * n,
            floor_target=True,
        ),
        DeviceCase(
            "softmax",
            f"softmax over rows, {rows}x{cols} float32",
            row_softmax,
            [torch.randn(8, 16)],
            lambda: torch.randn(rows, cols),
            rows * cols,
            2 * 4 * rows * cols,
        ),
        DeviceCase(
            "mlp",
            f"Linear({d},{hidden})-GELU-Linear({hidden},{d}), batch {batch}",
            mlp,
            [torch.randn(8, d)],
            lambda: torch.randn(batch, d),
            batch * d,
            2 * 4 * batch * d + 4 * (2 * d * hidden + hidden + d),
            memory_bound=False,
        ),
    ]
    # --quick exists for tests: one kernel shows the section works, and each
    # more costs two CPU compiles (server and in-process) of seconds each.
    return cases[:1] if quick else cases


def fresh_kernel() -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """A kernel no server (and no Inductor cache) has seen: its constant is random,
    so the graph, its key and the generated source are all new."""
    c = round(random.uniform(1.0, 2.0), 12)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x * c) + torch.cos(x - c) * c

    return fn, c
