"""Sample calls for every aten op of the allowlist, valid and hostile, for tests that run one op per graph.

`calls(op, seed)` gives a deterministic list of `Call`s: valid ones that eager torch
accepts on CPU (chosen to be meaningful: in-range indices, matching channels,
sizes >= 2 where the op allows) and, where the op takes something a client
controls (ints, sizes, strides, dims, indices, scalars, reduce modes), hostile
ones built to break it. Every tensor here is small; a hostile call may still ask
the op for a huge result, which is its point.

Results that cannot be compared between two runs: the ops in
`fuseport.wire.ops.RANDOM_OPS` and ``aten::empty*`` (uninitialised memory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Call", "calls", "covered_ops"]

# The tables below are laid out by hand, several calls a line, so that each op reads as one block.
# fmt: off

BIG = 1 << 40
HUGE = 2**62
NAN = float("nan")
INF = float("inf")
I64_MIN = -(2**63)
I64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Call:
    op: str  # "aten::gather.default"
    args: tuple[Any, ...]  # positional arguments, as the op's schema takes them
    kwargs: dict[str, Any]  # keyword arguments by schema name (may be empty)
    hostile: bool  # False: eager torch accepts it; True: built to break the op
    outputs: int = 1  # how many results the op returns (1 for a single tensor or a number)


class _B:
    """Builds one op's calls, drawing every tensor from one seeded generator in call order."""

    def __init__(self, op: str, seed: int) -> None:
        self.op = op
        self.g = torch.Generator().manual_seed(seed)

    def ok(self, *args: Any, outs: int = 1, **kwargs: Any) -> Call:
        return Call(self.op, args, kwargs, False, outs)

    def bad(self, *args: Any, outs: int = 1, **kwargs: Any) -> Call:
        return Call(self.op, args, kwargs, True, outs)

    # Tensor makers. Shapes are passed as separate ints.
    def f(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=self.g, dtype=dtype)

    def u(self, lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.g) * (hi - lo) + lo

    def pos(self, *shape: int) -> torch.Tensor:
        return self.u(0.25, 3.0, *shape)

    def i(self, hi: int, *shape: int, lo: int = 0, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.randint(lo, hi, shape, generator=self.g, dtype=dtype)

    def perm(self, *shape: int) -> torch.Tensor:
        """Distinct int64 values, so that sort/max/min indices have no ties to break differently."""
        return torch.randperm(int(torch.tensor(shape).prod()), generator=self.g).reshape(shape)

    def distinct(self, size: int, *shape: int, dim: int = -1) -> torch.Tensor:
        """In-range indices, distinct along dim: a non-accumulating scatter with duplicates is unordered."""
        full = list(shape)
        full[dim] = size
        return torch.rand(full, generator=self.g).argsort(dim=dim).narrow(dim, 0, shape[dim]).clone()

    def mask(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.g) > 0.5

    def c(self, *shape: int) -> torch.Tensor:
        return torch.complex(self.f(*shape), self.f(*shape))

    @staticmethod
    def full(value: Any, *shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.full(shape, value, dtype=dtype)

    @staticmethod
    def special(n: int = 10) -> torch.Tensor:
        """Float values that break careless kernels: NaN, infinities, signed zero, extremes, a subnormal."""
        return torch.tensor([NAN, INF, -INF, 0.0, -0.0, 3.4e38, -3.4e38, 1e-45, 1.0, -1.0][:n])

    @staticmethod
    def extremes() -> torch.Tensor:
        return torch.tensor([I64_MIN, I64_MAX, 0, -1, 1, BIG], dtype=torch.int64)

    def bad_index(self, size: int, *shape: int) -> list[torch.Tensor]:
        """Index tensors no kernel may trust: far out of range both ways, -1, exactly the size, float."""
        out = [self.full(v, *shape) for v in (BIG, -BIG, -1, size)]
        return [*out, self.i(size, *shape).to(torch.float32)]


_Builder = Callable[[_B], list[Call]]
_TABLE: dict[str, _Builder] = {}


def _add(table: dict[str, _Builder]) -> None:
    for name, fn in table.items():
        full = name if "." in name else f"{name}.default"
        _TABLE[f"aten::{full}"] = fn


# --- unary float pointwise --------------------------------------------------
# The domain keeps valid results finite, so fused and unfused results compare without NaN noise.
_DOMAIN: dict[str, Callable[[_B, int, int], torch.Tensor]] = {
    "any": lambda b, m, n: b.f(m, n),
    "unit": lambda b, m, n: b.u(-0.9, 0.9, m, n),
    "ge1": lambda b, m, n: b.u(1.0, 4.0, m, n),
    "pos": lambda b, m, n: b.pos(m, n),
}
_UNARY: dict[str, str] = {
    "abs": "any", "acos": "unit", "acosh": "ge1", "asin": "unit", "asinh": "any", "atan": "any",
    "atanh": "unit", "ceil": "any", "cos": "any", "cosh": "any", "erf": "any", "exp": "any",
    "expm1": "any", "floor": "any", "log": "pos", "log10": "pos", "log1p": "pos", "log2": "pos",
    "neg": "any", "reciprocal": "pos", "relu": "any", "round": "any", "rsqrt": "pos", "sigmoid": "any",
    "sign": "any", "sin": "any", "sinh": "any", "sqrt": "pos", "tan": "unit", "tanh": "any",
    "trunc": "any", "isinf": "any", "isnan": "any", "logical_not": "any", "alias": "any",
}


def _unary(domain: str) -> _Builder:
    make = _DOMAIN[domain]

    def build(b: _B) -> list[Call]:
        return [
            b.ok(make(b, 3, 4)),
            b.ok(make(b, 5, 3).t()),
            b.ok(make(b, 2, 3).to(torch.float64)),
            # Edge shapes and values: empty, rank-0, NaN/inf, int64 extremes (abs/neg overflow), bool.
            b.bad(b.f(0, 3)),
            b.bad(b.f()),
            b.bad(b.special()),
            b.bad(b.extremes()),
            b.bad(b.mask(2, 3)),
        ]

    return build


_add({name: _unary(domain) for name, domain in _UNARY.items()})

_add({
    "bitwise_not": lambda b: [
        b.ok(b.i(100, 3, 4, lo=-100)), b.ok(b.mask(3, 4)), b.ok(b.i(50, 4, 3, dtype=torch.int32).t()),
        b.bad(b.f(3, 4)), b.bad(b.extremes()), b.bad(b.i(5, 0, 3)),
    ],
    "gelu": lambda b: [
        b.ok(b.f(3, 4)), b.ok(b.f(3, 4), approximate="tanh"),
        b.bad(b.f(3, 4), approximate="bogus"), b.bad(b.special(), approximate="tanh"),
    ],
    "elu": lambda b: [
        b.ok(b.f(3, 4)), b.ok(b.f(3, 4), 0.5, 1.5, 2.0),
        b.bad(b.f(3, 4), NAN, INF, -INF), b.bad(b.special(), 1e38, 1e38, 1e38),
    ],
    "leaky_relu": lambda b: [
        b.ok(b.f(3, 4)), b.ok(b.f(4, 3).t(), 0.2),
        b.bad(b.f(3, 4), NAN), b.bad(b.f(3, 4), -INF), b.bad(b.i(5, 3, 4), HUGE),
    ],
    "hardtanh": lambda b: [
        b.ok(b.f(3, 4)), b.ok(b.f(3, 4), -0.5, 2.0),
        b.bad(b.f(3, 4), 1.0, -1.0), b.bad(b.f(3, 4), NAN, NAN), b.bad(b.i(9, 3, 4), -HUGE, HUGE),
    ],
    "fill.Scalar": lambda b: [
        b.ok(b.f(3, 4), 2.5), b.ok(b.i(9, 3, 4), 7), b.ok(b.mask(3, 4), True),
        b.bad(b.f(3, 4), NAN), b.bad(b.i(9, 3, 4), HUGE), b.bad(b.i(9, 3, 4, dtype=torch.int8), 1000),
        b.bad(b.i(9, 3, 4), NAN), b.bad(b.f(0, 4), 1.0),
    ],
    "clone": lambda b: [
        b.ok(b.f(3, 4)), b.ok(b.f(4, 3).t(), memory_format=torch.contiguous_format),
        b.ok(b.f(2, 3, 4, 4), memory_format=torch.channels_last),
        b.ok(b.f(2, 3, 4, 4), memory_format=torch.preserve_format),
        b.bad(b.f(3, 4), memory_format=torch.channels_last),
        b.bad(b.f(2, 3, 4, 4), memory_format=torch.channels_last_3d),
    ],
    "_to_copy": lambda b: [
        b.ok(b.f(3, 4), dtype=torch.float64), b.ok(b.f(4, 3).t(), dtype=torch.int32),
        b.ok(b.i(9, 3, 4), dtype=torch.bool), b.ok(b.f(3, 4), device=torch.device("cpu")),
        b.ok(b.f(2, 3, 4, 4), memory_format=torch.channels_last),
        # NaN/inf/out-of-range floats to ints is undefined behaviour in C++: fused and unfused may differ.
        b.bad(b.special(), dtype=torch.int64), b.bad(b.special(), dtype=torch.int8),
        b.bad(b.extremes(), dtype=torch.float16),
        b.bad(b.f(3, 4), layout=torch.sparse_coo), b.bad(b.f(3, 4), memory_format=torch.channels_last),
    ],
})

# --- binary pointwise, Tensor and Scalar overloads ----------------------------
# Value: (lhs domain, rhs domain, whether int64 tensors are a valid input).
_BINARY_T: dict[str, tuple[str, str, bool]] = {
    "add.Tensor": ("any", "any", True), "sub.Tensor": ("any", "any", True),
    "mul.Tensor": ("any", "any", True),
    "div.Tensor": ("any", "pos", True), "atan2": ("any", "any", False), "maximum": ("any", "any", True),
    "minimum": ("any", "any", True), "fmod.Tensor": ("any", "pos", True),
    "remainder.Tensor": ("any", "pos", True), "pow.Tensor_Tensor": ("pos", "any", False),
    "eq.Tensor": ("any", "any", True), "ne.Tensor": ("any", "any", True), "lt.Tensor": ("any", "any", True),
    "le.Tensor": ("any", "any", True), "gt.Tensor": ("any", "any", True), "ge.Tensor": ("any", "any", True),
    "logical_and": ("any", "any", True), "logical_or": ("any", "any", True),
    "logical_xor": ("any", "any", True),
}
_INT_DIVIDES = {"fmod.Tensor", "remainder.Tensor", "fmod.Scalar", "remainder.Scalar"}


def _binary_tensor(lhs: str, rhs: str, ints: bool) -> _Builder:
    mk_l, mk_r = _DOMAIN[lhs], _DOMAIN[rhs]

    def build(b: _B) -> list[Call]:
        out = [
            b.ok(mk_l(b, 3, 4), mk_r(b, 3, 4)),
            b.ok(mk_l(b, 3, 4), mk_r(b, 1, 4)[0]),
            b.ok(mk_l(b, 4, 3).t(), mk_r(b, 3, 1)),
            b.bad(mk_l(b, 3, 4), mk_r(b, 5, 1)[:, 0]),
            b.bad(mk_l(b, 0, 4), mk_r(b, 1, 4)[0]),
            b.bad(b.f(), b.f()),
            b.bad(b.special(), b.special().flip(0)),
        ]
        if ints:
            out.append(b.ok(b.i(20, 3, 4, lo=-20), b.i(9, 3, 4, lo=1)))
            out.append(b.bad(b.extremes(), b.full(-1, 6)))
        if b.op.split("::")[1] in _INT_DIVIDES:
            # C++ integer division by zero and INT64_MIN / -1 are undefined (SIGFPE on x86).
            out.append(b.bad(b.i(9, 3, 4), b.full(0, 3, 4)))
            out.append(b.bad(b.full(I64_MIN, 3), b.full(-1, 3)))
        if b.op.endswith(("add.Tensor", "sub.Tensor")):
            out += [
                b.ok(b.f(3, 4), b.f(3, 4), alpha=2.5),
                b.bad(b.f(3, 4), b.f(3, 4), alpha=NAN),
                b.bad(b.i(9, 3, 4), b.i(9, 3, 4), alpha=2.5),
                b.bad(b.i(9, 3, 4), b.i(9, 3, 4), alpha=HUGE),
                b.bad(b.mask(3, 4), b.mask(3, 4)),
            ]
        return out

    return build


_add({name: _binary_tensor(*spec) for name, spec in _BINARY_T.items()})


def _div_mode(b: _B) -> list[Call]:
    return [
        b.ok(b.f(3, 4), b.pos(3, 4), rounding_mode=None),
        b.ok(b.f(3, 4), b.pos(4), rounding_mode="trunc"),
        b.ok(b.i(50, 3, 4, lo=-50), b.i(7, 3, 4, lo=1), rounding_mode="floor"),
        b.bad(b.f(3, 4), b.pos(3, 4), rounding_mode="bogus"),
        b.bad(b.i(9, 3, 4), b.full(0, 3, 4), rounding_mode="floor"),
        b.bad(b.i(9, 3, 4), b.full(0, 3, 4), rounding_mode="trunc"),
        b.bad(b.full(I64_MIN, 3), b.full(-1, 3), rounding_mode="floor"),
        b.bad(b.full(I64_MIN, 3), b.full(-1, 3), rounding_mode="trunc"),  # eager torch 2.13: SIGFPE
        b.bad(b.special(), b.special().flip(0), rounding_mode="floor"),
    ]


def _bitwise_tensor(b: _B) -> list[Call]:
    return [
        b.ok(b.i(64, 3, 4, lo=-64), b.i(64, 3, 4)), b.ok(b.mask(3, 4), b.mask(4)),
        b.ok(b.i(64, 4, 3, dtype=torch.int32).t(), b.i(64, 3, 4)),
        b.bad(b.f(3, 4), b.f(3, 4)), b.bad(b.i(5, 3, 4), b.i(5, 5)), b.bad(b.extremes(), b.extremes()),
    ]


def _where(b: _B) -> list[Call]:
    return [
        b.ok(b.mask(3, 4), b.f(3, 4), b.f(3, 4)), b.ok(b.mask(4), b.f(3, 4), b.f(1, 4)),
        b.ok(b.mask(3, 4), b.i(9, 3, 4), b.f(3, 4)),
        b.bad(b.f(3, 4), b.f(3, 4), b.f(3, 4)), b.bad(b.mask(3, 4), b.f(5, 4), b.f(3, 4)),
        b.bad(b.mask(0, 4), b.f(4), b.f()),
    ]


_add({
    "div.Tensor_mode": _div_mode,
    "bitwise_and.Tensor": _bitwise_tensor, "bitwise_or.Tensor": _bitwise_tensor,
    "bitwise_xor.Tensor": _bitwise_tensor, "where.self": _where,
    "clamp.Tensor": lambda b: [
        b.ok(b.f(3, 4), b.u(-1, 0, 3, 4), b.u(0, 1, 4)), b.ok(b.f(3, 4), None, b.f(1, 4)),
        b.ok(b.f(3, 4), b.f()),
        b.bad(b.f(3, 4), None, None), b.bad(b.f(3, 4), b.f(5, 4), None), b.bad(b.f(3, 4), b.special(4)),
    ],
    "clamp": lambda b: [
        b.ok(b.f(3, 4), -0.5, 0.5), b.ok(b.f(3, 4), None, 0.5), b.ok(b.i(20, 3, 4, lo=-20), -3),
        b.bad(b.f(3, 4), None, None), b.bad(b.f(3, 4), NAN, NAN), b.bad(b.f(3, 4), 1.0, -1.0),
        b.bad(b.i(9, 3, 4), -HUGE, HUGE),
    ],
    "pow.Scalar": lambda b: [
        b.ok(2.0, b.f(3, 4)), b.ok(3, b.i(5, 3, 4)),
        b.bad(0, b.full(-1, 3, 4)), b.bad(NAN, b.f(3, 4)), b.bad(2, b.full(HUGE, 3)),
        b.bad(-INF, b.special()),
    ],
})

_SCALAR_OPS = (
    "add.Scalar", "sub.Scalar", "mul.Scalar", "div.Scalar", "fmod.Scalar", "remainder.Scalar",
    "pow.Tensor_Scalar", "eq.Scalar", "ne.Scalar", "lt.Scalar", "le.Scalar", "gt.Scalar", "ge.Scalar",
)


def _binary_scalar(b: _B) -> list[Call]:
    name = b.op.split("::")[1]
    lhs = b.pos(3, 4) if name.startswith("pow") else b.f(3, 4)
    out = [
        b.ok(lhs, 2.5), b.ok(b.i(20, 3, 4, lo=1), 3), b.ok(b.f(4, 3).t(), -1.5),
        b.bad(b.f(3, 4), NAN), b.bad(b.f(3, 4), INF), b.bad(b.i(9, 3, 4), HUGE), b.bad(b.extremes(), -1),
        b.bad(b.f(0, 3), 1.0), b.bad(b.special(), 0.0),
    ]
    if name in _INT_DIVIDES:
        out.append(b.bad(b.i(9, 3, 4), 0))
    if name.startswith("pow"):
        out.append(b.bad(b.i(9, 3, 4), -1))
    if name in ("add.Scalar", "sub.Scalar"):
        out += [b.ok(b.f(3, 4), 1.5, 2.0), b.bad(b.i(9, 3, 4), 1, 2.5), b.bad(b.f(3, 4), 1.0, NAN)]
    return out


def _bitwise_scalar(b: _B) -> list[Call]:
    return [
        b.ok(b.i(64, 3, 4, lo=-64), 5), b.ok(b.mask(3, 4), True), b.ok(b.i(64, 3, 4), -1),
        b.bad(b.f(3, 4), 3), b.bad(b.i(9, 3, 4), 2.5), b.bad(b.i(9, 3, 4, dtype=torch.int8), HUGE),
    ]


def _div_scalar_mode(b: _B) -> list[Call]:
    return [
        b.ok(b.f(3, 4), 2.0, rounding_mode="floor"), b.ok(b.i(50, 3, 4, lo=-50), 3, rounding_mode="trunc"),
        b.ok(b.f(3, 4), 0.5, rounding_mode=None),
        b.bad(b.i(9, 3, 4), 0, rounding_mode="floor"), b.bad(b.i(9, 3, 4), 0, rounding_mode="trunc"),
        # Eager torch 2.13 dies of SIGFPE on the trunc one.
        b.bad(b.full(I64_MIN, 3), -1, rounding_mode="floor"),
        b.bad(b.full(I64_MIN, 3), -1, rounding_mode="trunc"),
        b.bad(b.f(3, 4), 2.0, rounding_mode="bogus"),
        b.bad(b.f(3, 4), NAN, rounding_mode="floor"),
    ]


_add({name: _binary_scalar for name in _SCALAR_OPS})
_add({
    "bitwise_and.Scalar": _bitwise_scalar, "bitwise_or.Scalar": _bitwise_scalar,
    "bitwise_xor.Scalar": _bitwise_scalar, "div.Scalar_mode": _div_scalar_mode,
})

# --- reductions ---------------------------------------------------------------
# x is (2, 3, 4) so that each dim has a distinct size and a wrong dim shows.
_add({
    "amax": lambda b: [
        b.ok(b.f(2, 3, 4), [1]), b.ok(b.f(2, 3, 4), [0, 2], True), b.ok(b.f(2, 3, 4)),
        b.bad(b.f(2, 3, 4), [5]), b.bad(b.f(2, 3, 4), [-7]), b.bad(b.f(2, 3, 4), [0, 0]),
        b.bad(b.f(0, 3), [0]), b.bad(b.f(), [0]),
    ],
    "amin": lambda b: [
        b.ok(b.f(2, 3, 4), [1]), b.ok(b.f(2, 3, 4), [0, 2], True), b.ok(b.f(2, 3, 4)),
        b.bad(b.f(2, 3, 4), [5]), b.bad(b.f(2, 3, 4), [-7]), b.bad(b.f(2, 3, 4), [0, 0]),
        b.bad(b.f(0, 3), [0]), b.bad(b.f(), [0]),
    ],
    "any": lambda b: [b.ok(b.mask(2, 3, 4)), b.ok(b.f(3, 4)), b.bad(b.f(0, 3)), b.bad(b.special())],
    "any.dim": lambda b: [
        b.ok(b.mask(2, 3, 4), 1), b.ok(b.f(2, 3, 4), -1, True),
        b.bad(b.mask(2, 3, 4), 5), b.bad(b.mask(2, 3, 4), -7), b.bad(b.mask(0, 3), 0),
    ],
    "any.dims": lambda b: [
        b.ok(b.mask(2, 3, 4), [0, 2]), b.ok(b.mask(2, 3, 4), None), b.ok(b.i(3, 2, 3, 4), [1], True),
        b.bad(b.mask(2, 3, 4), [5]), b.bad(b.mask(2, 3, 4), [0, 0]), b.bad(b.mask(0, 3), [0]),
    ],
    "argmax": lambda b: [
        b.ok(b.f(2, 3, 4)), b.ok(b.f(2, 3, 4), 1), b.ok(b.f(2, 3, 4), -1, True),
        b.bad(b.f(2, 3, 4), 5), b.bad(b.f(2, 3, 4), -7), b.bad(b.f(0, 3)), b.bad(b.f(0, 3), 0),
        b.bad(b.special()),
    ],
    "argmin": lambda b: [
        b.ok(b.f(2, 3, 4)), b.ok(b.f(2, 3, 4), 1), b.ok(b.f(2, 3, 4), -1, True),
        b.bad(b.f(2, 3, 4), 5), b.bad(b.f(2, 3, 4), -7), b.bad(b.f(0, 3)), b.bad(b.f(0, 3), 0),
        b.bad(b.special()),
    ],
    "mean": lambda b: [
        b.ok(b.f(2, 3, 4)), b.ok(b.f(3, 4), dtype=torch.float64),
        b.bad(b.i(9, 3, 4)), b.bad(b.f(3, 4), dtype=torch.int64), b.bad(b.f(0, 3)),
    ],
    "mean.dim": lambda b: [
        b.ok(b.f(2, 3, 4), [1]), b.ok(b.f(2, 3, 4), None, True), b.ok(b.f(2, 3, 4), [0, -1]),
        b.bad(b.f(2, 3, 4), [5]), b.bad(b.f(2, 3, 4), [0, 0]), b.bad(b.i(9, 3, 4), [0]),
        b.bad(b.f(2, 3, 4), [1], dtype=torch.int32),
    ],
    "prod": lambda b: [
        b.ok(b.u(0.5, 1.5, 3, 4)), b.ok(b.i(4, 2, 3, lo=1)), b.ok(b.f(3, 4), dtype=torch.float64),
        b.bad(b.full(BIG, 4)), b.bad(b.f(0, 3)), b.bad(b.special()),
    ],
    "prod.dim_int": lambda b: [
        b.ok(b.f(2, 3, 4), 1), b.ok(b.f(2, 3, 4), -1, True), b.ok(b.i(4, 3, 4, lo=1), 0),
        b.bad(b.f(2, 3, 4), 5), b.bad(b.f(2, 3, 4), -7), b.bad(b.full(BIG, 2, 4), 1),
    ],
    "sum.dim_IntList": lambda b: [
        b.ok(b.f(2, 3, 4), [1]), b.ok(b.f(2, 3, 4), None), b.ok(b.f(2, 3, 4), [0, 2], True),
        b.ok(b.i(9, 3, 4), [0], dtype=torch.float64), b.ok(b.f(4, 3).t(), [1]),
        b.bad(b.f(2, 3, 4), [5]), b.bad(b.f(2, 3, 4), [-7]), b.bad(b.f(2, 3, 4), [0, 0]),
        b.bad(b.full(I64_MAX, 4), [0]), b.bad(b.f(0, 3), [1]),
    ],
    "var.correction": lambda b: [
        b.ok(b.f(2, 3, 4)), b.ok(b.f(2, 3, 4), [1]), b.ok(b.f(2, 3, 4), [0, 2], correction=0, keepdim=True),
        b.bad(b.f(2, 3, 4), [1], correction=NAN), b.bad(b.f(2, 3, 4), [1], correction=BIG),
        b.bad(b.f(2, 3, 4), [1], correction=-HUGE), b.bad(b.f(2, 3, 4), [5]), b.bad(b.f(0, 3), [0]),
    ],
    "var.dim": lambda b: [
        b.ok(b.f(2, 3, 4), [1]), b.ok(b.f(2, 3, 4), [0, 2], False, True), b.ok(b.f(2, 3, 4), None),
        b.bad(b.f(2, 3, 4), [5]), b.bad(b.f(2, 3, 4), [0, 0]), b.bad(b.f(1, 3), [0]),
        b.bad(b.i(9, 3, 4), [0]),
    ],
    "max.dim": lambda b: [
        b.ok(b.f(2, 3, 4), 1, outs=2), b.ok(b.f(2, 3, 4), -1, True, outs=2), b.ok(b.perm(3, 4), 0, outs=2),
        b.bad(b.f(2, 3, 4), 5, outs=2), b.bad(b.f(2, 3, 4), -7, outs=2), b.bad(b.f(0, 3), 0, outs=2),
        b.bad(b.special(), 0, outs=2),
    ],
    "min.dim": lambda b: [
        b.ok(b.f(2, 3, 4), 1, outs=2), b.ok(b.f(2, 3, 4), -1, True, outs=2), b.ok(b.perm(3, 4), 0, outs=2),
        b.bad(b.f(2, 3, 4), 5, outs=2), b.bad(b.f(2, 3, 4), -7, outs=2), b.bad(b.f(0, 3), 0, outs=2),
        b.bad(b.special(), 0, outs=2),
    ],
    "cumsum": lambda b: [
        b.ok(b.f(2, 3, 4), 1), b.ok(b.f(2, 3, 4), 0, dtype=torch.float64), b.ok(b.i(9, 3, 4), -1),
        b.bad(b.f(2, 3, 4), 5), b.bad(b.f(2, 3, 4), -7), b.bad(b.full(I64_MAX, 4), 0),
    ],
    "_softmax": lambda b: [
        b.ok(b.f(2, 3, 4), 1, False), b.ok(b.f(2, 3, 4), -1, False),
        b.bad(b.f(2, 3, 4), 5, False), b.bad(b.f(2, 3, 4), 1, True), b.bad(b.special(), 0, False),
        b.bad(b.i(9, 3, 4), 1, False),
    ],
    "_log_softmax": lambda b: [
        b.ok(b.f(2, 3, 4), 1, False), b.ok(b.f(2, 3, 4), -1, False),
        b.bad(b.f(2, 3, 4), 5, False), b.bad(b.f(2, 3, 4), 1, True), b.bad(b.special(), 0, False),
        b.bad(b.i(9, 3, 4), 1, False),
    ],
    "sort": lambda b: [
        b.ok(b.f(2, 3, 4), outs=2), b.ok(b.f(2, 3, 4), 1, True, outs=2), b.ok(b.perm(3, 4), 0, outs=2),
        b.bad(b.f(2, 3, 4), 5, outs=2), b.bad(b.f(2, 3, 4), -7, outs=2), b.bad(b.special(), outs=2),
    ],
    "topk": lambda b: [
        b.ok(b.f(2, 3, 4), 2, outs=2), b.ok(b.f(2, 3, 4), 2, 1, False, True, outs=2),
        b.ok(b.f(2, 3, 4), 4, -1, True, False, outs=2),
        b.bad(b.f(2, 3, 4), 5, outs=2), b.bad(b.f(2, 3, 4), -1, outs=2), b.bad(b.f(2, 3, 4), BIG, outs=2),
        b.bad(b.f(2, 3, 4), 1, 5, outs=2), b.bad(b.f(0, 3), 1, 0, outs=2), b.bad(b.special(), 3, outs=2),
    ],
})

# --- views and reshapes -------------------------------------------------------
_add({
    "as_strided": lambda b: [
        b.ok(b.f(2, 3, 4), [3, 4], [4, 1]), b.ok(b.f(2, 3, 4), [2, 2], [1, 2], 1),
        b.ok(b.f(2, 3, 4), [4, 3], [1, 4]), b.ok(b.f(12), [3, 3], [3, 1], 3),
        # Raw strides and offsets must be checked against the storage, never trusted.
        b.bad(b.f(2, 3, 4), [BIG], [1]), b.bad(b.f(2, 3, 4), [2, 2], [HUGE, 1]),
        b.bad(b.f(2, 3, 4), [-1], [1]), b.bad(b.f(2, 3, 4), [2], [-1]),
        b.bad(b.f(2, 3, 4), [2, 2], [1, 1], BIG), b.bad(b.f(2, 3, 4), [2, 2], [1, 1], -1),
        b.bad(b.f(2, 3, 4), [2, 2], [100, 1]), b.bad(b.f(2, 3, 4), [2**32, 2**32], [0, 0]),
        b.bad(b.f(2, 3, 4), [HUGE, 4], [4, 1]), b.bad(b.f(0, 3), [1], [1]),
    ],
    "diagonal": lambda b: [
        b.ok(b.f(4, 4)), b.ok(b.f(3, 5), 1), b.ok(b.f(2, 3, 4), 0, 1, 2), b.ok(b.f(2, 3, 4), -1, 0, 2),
        b.bad(b.f(4, 4), BIG), b.bad(b.f(4, 4), -BIG), b.bad(b.f(4, 4), 0, 1, 1),
        b.bad(b.f(4, 4), 0, 0, 5), b.bad(b.f(4, 4), 0, -7, 0),
    ],
    "expand": lambda b: [
        b.ok(b.f(1, 4), [3, 4]), b.ok(b.f(3, 1), [2, 3, 5]), b.ok(b.f(3, 1), [-1, 4]),
        b.ok(b.f(3, 1), [2, 3, 4], implicit=True),
        # A stride-0 view costs nothing; the result asks for 2**40 elements when it is materialised.
        b.bad(b.f(1, 4), [BIG, 4]), b.bad(b.f(1, 1), [HUGE, HUGE]), b.bad(b.f(3, 1), [-1, -1, 4]),
        b.bad(b.f(3, 4), [4]), b.bad(b.f(3, 4), [5, 4]), b.bad(b.f(1, 4), [-2, 4]),
        b.bad(b.f(0, 4), [2**32, 2**32, 0, 4]),
    ],
    "permute": lambda b: [
        b.ok(b.f(2, 3, 4), [2, 0, 1]), b.ok(b.f(2, 3, 4), [-1, 0, 1]), b.ok(b.f(4, 3).t(), [1, 0]),
        b.bad(b.f(2, 3, 4), [0, 0, 1]), b.bad(b.f(2, 3, 4), [0, 1]), b.bad(b.f(2, 3, 4), [5, 0, 1]),
        b.bad(b.f(2, 3, 4), [-7, 0, 1]), b.bad(b.f(), [0]),
    ],
    "select.int": lambda b: [
        b.ok(b.f(2, 3, 4), 1, 2), b.ok(b.f(2, 3, 4), -1, -1), b.ok(b.f(2, 3, 4), 0, 1),
        b.bad(b.f(2, 3, 4), 1, 3), b.bad(b.f(2, 3, 4), 1, -4), b.bad(b.f(2, 3, 4), 1, BIG),
        b.bad(b.f(2, 3, 4), 1, -BIG), b.bad(b.f(2, 3, 4), 5, 0), b.bad(b.f(), 0, 0), b.bad(b.f(0, 3), 0, 0),
    ],
    "slice.Tensor": lambda b: [
        b.ok(b.f(2, 3, 4), 1, 0, 2), b.ok(b.f(2, 3, 4), 2, 1, None, 2), b.ok(b.f(2, 3, 4)),
        b.ok(b.f(2, 3, 4), 2, -3, -1), b.ok(b.f(2, 3, 4), 0, None, 1 << 20),
        b.bad(b.f(2, 3, 4), 1, 0, 2, 0), b.bad(b.f(2, 3, 4), 1, 0, 2, -1), b.bad(b.f(2, 3, 4), 1, 0, 3, HUGE),
        b.bad(b.f(2, 3, 4), 1, -HUGE, HUGE), b.bad(b.f(2, 3, 4), 1, HUGE, -HUGE), b.bad(b.f(2, 3, 4), 5),
        b.bad(b.f(2, 3, 4), -7, 0, 1), b.bad(b.f(), 0, 0, 1),
    ],
    "split_with_sizes": lambda b: [
        b.ok(b.f(2, 3, 4), [1, 2], 1, outs=2), b.ok(b.f(2, 3, 4), [1, 1, 2], 2, outs=3),
        b.ok(b.f(2, 3, 4), [2], outs=1), b.ok(b.f(2, 3, 4), [0, 3], -2, outs=2),
        b.bad(b.f(2, 3, 4), [1, 1], 1, outs=2), b.bad(b.f(2, 3, 4), [-1, 4], 1, outs=2),
        b.bad(b.f(2, 3, 4), [BIG, 3 - BIG], 1, outs=2), b.bad(b.f(2, 3, 4), [HUGE, 3 - HUGE], 1, outs=2),
        b.bad(b.f(2, 3, 4), [3], 5, outs=1), b.bad(b.f(2, 3, 4), [], 1, outs=0),
    ],
    "squeeze.dim": lambda b: [
        b.ok(b.f(2, 1, 3), 1), b.ok(b.f(2, 3, 4), 0), b.ok(b.f(2, 3, 1), -1),
        b.bad(b.f(2, 1, 3), 5), b.bad(b.f(2, 1, 3), -7), b.bad(b.f(), 0),
    ],
    "squeeze.dims": lambda b: [
        b.ok(b.f(2, 1, 3, 1), [1, 3]), b.ok(b.f(2, 1, 3), [0]), b.ok(b.f(2, 1, 3), []),
        b.bad(b.f(2, 1, 3), [5]), b.bad(b.f(2, 1, 3), [1, 1]), b.bad(b.f(2, 1, 3), [-7]),
    ],
    "unsqueeze": lambda b: [
        b.ok(b.f(2, 3, 4), 0), b.ok(b.f(2, 3, 4), -1), b.ok(b.f(2, 3, 4), 3), b.ok(b.f(), 0),
        b.bad(b.f(2, 3, 4), 5), b.bad(b.f(2, 3, 4), -7), b.bad(b.f(2, 3, 4), BIG),
    ],
    "view": lambda b: [
        b.ok(b.f(2, 3, 4), [6, 4]), b.ok(b.f(2, 3, 4), [-1]), b.ok(b.f(2, 3, 4), [2, -1, 2]),
        b.ok(b.f(4, 3).t(), [3, 4]),
        b.bad(b.f(4, 3).t(), [12]), b.bad(b.f(2, 3, 4), [BIG]), b.bad(b.f(2, 3, 4), [-1, -1]),
        b.bad(b.f(2, 3, 4), [5, 5]), b.bad(b.f(2, 3, 4), [0, -1]), b.bad(b.f(0), [2**32, 2**32]),
        b.bad(b.f(0), [HUGE, 4, 0]), b.bad(b.f(2, 3, 4), [-2, -12]),
    ],
    "flip": lambda b: [
        b.ok(b.f(2, 3, 4), [0]), b.ok(b.f(2, 3, 4), [0, 2]), b.ok(b.f(4, 3).t(), [-1]),
        b.bad(b.f(2, 3, 4), [5]), b.bad(b.f(2, 3, 4), [0, 0]), b.bad(b.f(2, 3, 4), [-7]),
    ],
    "repeat": lambda b: [
        b.ok(b.f(2, 3, 4), [1, 2, 1]), b.ok(b.f(3, 4), [2, 1, 3]), b.ok(b.f(3, 4), [0, 1]),
        b.bad(b.f(2, 3, 4), [BIG, 1, 1]), b.bad(b.f(2, 3, 4), [-1, 1, 1]), b.bad(b.f(2, 3, 4), [2]),
        b.bad(b.f(1), [2**32, 2**32]), b.bad(b.f(0), [HUGE, HUGE]),
    ],
    "cat": lambda b: [
        b.ok([b.f(2, 3), b.f(1, 3)]), b.ok([b.f(2, 3), b.f(2, 4), b.f(3, 2).t()], 1),
        b.ok([b.f(2, 3), b.i(9, 2, 3)], -1), b.ok([b.f(2, 3), b.f(0)]),
        b.bad([b.f(2, 3), b.f(2, 4)]), b.bad([b.f(2, 3), b.f(2, 3)], 5), b.bad([]),
        b.bad([b.f(), b.f()]), b.bad([b.f(2, 3), b.f(2, 3, 1)]),
    ],
    "constant_pad_nd": lambda b: [
        b.ok(b.f(2, 3, 4), [1, 1]), b.ok(b.f(2, 3, 4), [1, 2, 0, 1], 3.5), b.ok(b.f(2, 3, 4), [-1, -1]),
        b.ok(b.i(9, 3, 4), [2, 0], 7),
        b.bad(b.f(2, 3, 4), [BIG, 0]), b.bad(b.f(2, 3, 4), [HUGE, HUGE]), b.bad(b.f(2, 3, 4), [-5, 0]),
        b.bad(b.f(2, 3, 4), [1]), b.bad(b.f(2, 3, 4), [1] * 8), b.bad(b.f(2, 3, 4), [1, 1], NAN),
        b.bad(b.i(9, 3, 4), [1, 1], HUGE),
    ],
    "copy": lambda b: [
        b.ok(b.f(2, 3, 4), b.f(2, 3, 4)), b.ok(b.f(2, 3, 4), b.f(4)), b.ok(b.f(3, 4), b.i(9, 4, 3).t()),
        b.bad(b.f(2, 3, 4), b.f(5)), b.bad(b.f(2, 3, 4), b.f(0)), b.bad(b.i(9, 2, 3), b.special(3)),
    ],
})

# --- indexing and scatter -----------------------------------------------------
# self is (4, 5); valid indices are drawn in range, hostile ones come from bad_index.


def _gather(b: _B) -> list[Call]:
    x = b.f(4, 5)
    return [
        b.ok(x, 1, b.i(5, 4, 3)), b.ok(x, 0, b.i(4, 2, 5)), b.ok(b.f(5, 4).t(), -1, b.i(5, 2, 2)),
        *(b.bad(x, 1, idx) for idx in b.bad_index(5, 4, 3)),
        b.bad(x, 5, b.i(5, 4, 3)), b.bad(x, 1, b.i(5, 6, 3)), b.bad(x, 1, b.i(5, 0, 3)), b.bad(x, 1, b.i(5)),
    ]


def _index(b: _B) -> list[Call]:
    x = b.f(4, 5)
    return [
        b.ok(x, [b.i(4, 3)]), b.ok(x, [None, b.i(5, 2, 2)]), b.ok(x, [b.mask(4, 5)]),
        b.ok(x, [b.i(4, 3), b.i(5, 3)]), b.ok(x, [b.i(4, 2, 1), b.i(5, 3)]),
        *(b.bad(x, [idx]) for idx in b.bad_index(4, 3)),
        *(b.bad(x, [None, idx]) for idx in b.bad_index(5, 2)),
        b.bad(x, [b.i(4, 3), b.i(5, 3), b.i(5, 3)]), b.bad(x, [b.mask(3, 5)]), b.bad(x, []),
        b.bad(x, [b.i(4, 3), b.i(5, 2)]), b.bad(b.f(), [b.i(1, 1)]),
    ]


def _index_put(b: _B) -> list[Call]:
    x = b.f(4, 5)
    return [
        b.ok(x, [b.distinct(4, 3)], b.f(3, 5)), b.ok(x, [b.i(4, 6), b.i(5, 6)], b.f(6), True),
        b.ok(x, [b.mask(4, 5)], b.f()), b.ok(x, [None, b.distinct(5, 2)], b.f(4, 2), False),
        *(b.bad(x, [idx], b.f(3, 5)) for idx in b.bad_index(4, 3)),
        *(b.bad(x, [idx], b.f(3, 5), True) for idx in b.bad_index(4, 3)),
        b.bad(x, [b.i(4, 3)], b.f(2, 5)), b.bad(x, [b.i(4, 3)], b.special(5)),
    ]


def _index_select(b: _B) -> list[Call]:
    x = b.f(4, 5)
    return [
        b.ok(x, 0, b.i(4, 3)), b.ok(x, 1, b.i(5, 6)), b.ok(x, -1, b.i(5)),
        *(b.bad(x, 0, idx) for idx in b.bad_index(4, 3)),
        b.bad(x, 0, b.i(4, 2, 2)), b.bad(x, 5, b.i(4, 3)), b.bad(x, 0, b.i(4, 0)),
    ]


def _scatter(kind: str) -> _Builder:
    def build(b: _B) -> list[Call]:
        def tail(src: torch.Tensor) -> tuple[Any, ...]:
            if kind == "value":
                return (1.5,)
            return (src, "sum") if kind == "reduce" else (src,)

        x = b.f(4, 5)
        out = [
            b.ok(x, 1, b.distinct(5, 4, 3), *tail(b.f(4, 3))),
            b.ok(x, 0, b.distinct(4, 2, 5, dim=0), *tail(b.f(2, 5))),
            b.ok(x, -1, b.distinct(5, 2, 2), *tail(b.f(3, 3))),
            *(b.bad(x, 1, idx, *tail(b.f(4, 3))) for idx in b.bad_index(5, 4, 3)),
            b.bad(x, 5, b.i(5, 4, 3), *tail(b.f(4, 3))), b.bad(x, 1, b.i(5, 6, 3), *tail(b.f(6, 3))),
        ]
        if kind == "value":
            out += [b.bad(x, 1, b.i(5, 4, 3), NAN), b.bad(b.i(9, 4, 5), 1, b.i(5, 4, 3), HUGE)]
        else:
            out.append(b.bad(x, 1, b.i(5, 4, 3), *tail(b.f(2, 2))))
        if kind == "reduce":
            out += [
                b.ok(x, 1, b.distinct(5, 4, 3), b.f(4, 3), mode, include_self=False)
                for mode in ("prod", "mean", "amax", "amin")
            ]
            out += [b.bad(x, 1, b.i(5, 4, 3), b.f(4, 3), "bogus"), b.bad(x, 1, b.i(5, 4, 3), b.f(4, 3), "")]
        return out

    return build


_add({
    "gather": _gather, "index.Tensor": _index, "index_put": _index_put, "index_select": _index_select,
    "scatter.src": _scatter("src"), "scatter.value": _scatter("value"), "scatter_add": _scatter("add"),
    "scatter_reduce.two": _scatter("reduce"),
    "select_scatter": lambda b: [
        b.ok(b.f(4, 5), b.f(5), 0, 2), b.ok(b.f(4, 5), b.f(4), 1, -1), b.ok(b.f(2, 3, 4), b.f(2, 4), 1, 0),
        b.bad(b.f(4, 5), b.f(5), 0, 4), b.bad(b.f(4, 5), b.f(5), 0, BIG), b.bad(b.f(4, 5), b.f(5), 0, -BIG),
        b.bad(b.f(4, 5), b.f(5), 0, -5), b.bad(b.f(4, 5), b.f(3), 0, 1), b.bad(b.f(4, 5), b.f(5), 5, 0),
    ],
    "slice_scatter": lambda b: [
        b.ok(b.f(4, 5), b.f(2, 5), 0, 1, 3), b.ok(b.f(4, 5), b.f(4, 3), 1, 0, 5, 2),
        b.ok(b.f(4, 5), b.f(4, 5)),
        b.bad(b.f(4, 5), b.f(2, 5), 0, 1, 3, 0), b.bad(b.f(4, 5), b.f(2, 5), 0, 1, 3, -1),
        b.bad(b.f(4, 5), b.f(0, 5), 0, BIG, HUGE), b.bad(b.f(4, 5), b.f(3, 5), 0, 1, 3),
        b.bad(b.f(4, 5), b.f(1, 5), 0, 0, 4, HUGE), b.bad(b.f(4, 5), b.f(2, 5), 5, 1, 3),
    ],
    "masked_scatter": lambda b: [
        b.ok(b.f(4, 5), b.mask(4, 5), b.f(20)), b.ok(b.f(4, 5), b.mask(5), b.f(4, 5)),
        b.ok(b.f(4, 5), b.mask(4, 5), b.f(5, 6)),
        b.bad(b.f(4, 5), torch.ones(4, 5, dtype=torch.bool), b.f(2)), b.bad(b.f(4, 5), b.f(4, 5), b.f(20)),
        b.bad(b.f(4, 5), b.mask(3, 5), b.f(20)), b.bad(b.f(0, 5), b.mask(0, 5), b.f(0)),
    ],
    "embedding": lambda b: [
        b.ok(b.f(10, 4), b.i(10, 2, 3)), b.ok(b.f(10, 4), b.i(10, 5), 0), b.ok(b.f(10, 4), b.i(10)),
        *(b.bad(b.f(10, 4), idx) for idx in b.bad_index(10, 2, 3)),
        b.bad(b.f(10, 4), b.i(10, 5), BIG), b.bad(b.f(10), b.i(10, 5)), b.bad(b.f(0, 4), b.i(1, 3)),
    ],
    "nonzero": lambda b: [
        b.ok(b.f(3, 4) > 0), b.ok(b.i(3, 2, 3, 4)), b.ok(b.f(4, 3).t()),
        b.bad(b.f(0, 3)), b.bad(b.f()), b.bad(b.special()),
    ],
})

# --- pooling, upsampling, sampling --------------------------------------------
# x4 is (2, 3, 6, 6), x5 is (2, 2, 4, 4, 4), x3 is (2, 3, 8).
_add({
    "_adaptive_avg_pool2d": lambda b: [
        b.ok(b.f(2, 3, 6, 6), [3, 3]), b.ok(b.f(2, 3, 6, 6), [4, 2]), b.ok(b.f(3, 6, 6), [2, 5]),
        b.bad(b.f(2, 3, 6, 6), [BIG, 1]), b.bad(b.f(2, 3, 6, 6), [0, 0]), b.bad(b.f(2, 3, 6, 6), [-1, -1]),
        b.bad(b.f(2, 3, 0, 6), [2, 2]), b.bad(b.f(6, 6), [2, 2]),
    ],
    "_adaptive_avg_pool3d": lambda b: [
        b.ok(b.f(2, 2, 4, 4, 4), [2, 2, 2]), b.ok(b.f(2, 2, 4, 4, 4), [3, 1, 2]),
        b.bad(b.f(2, 2, 4, 4, 4), [BIG, 1, 1]), b.bad(b.f(2, 2, 4, 4, 4), [0, 0, 0]),
        b.bad(b.f(2, 2, 4, 4, 4), [-1, 2, 2]), b.bad(b.f(2, 2, 0, 4, 4), [2, 2, 2]),
    ],
    "adaptive_avg_pool1d": lambda b: [
        b.ok(b.f(2, 3, 8), [4]), b.ok(b.f(2, 3, 8), [3]), b.ok(b.f(3, 8), [5]),
        b.bad(b.f(2, 3, 8), [BIG]), b.bad(b.f(2, 3, 8), [0]), b.bad(b.f(2, 3, 8), [-1]),
        b.bad(b.f(2, 3, 0), [2]),
    ],
    "avg_pool1d": lambda b: [
        b.ok(b.f(2, 3, 8), [2]), b.ok(b.f(2, 3, 8), [3], [2], [1], True, False),
        b.bad(b.f(2, 3, 8), [0]), b.bad(b.f(2, 3, 8), [2], [0]), b.bad(b.f(2, 3, 8), [2], [1], [2]),
        b.bad(b.f(2, 3, 8), [BIG]), b.bad(b.f(2, 3, 8), [2], [HUGE]), b.bad(b.f(2, 3, 8), [-1]),
    ],
    "avg_pool2d": lambda b: [
        b.ok(b.f(2, 3, 6, 6), [2, 2]), b.ok(b.f(2, 3, 6, 6), [3, 3], [2, 2], [1, 1], True, False),
        b.ok(b.f(2, 3, 6, 6), [3, 2], [1, 2], [0, 1], False, True, 3),
        b.bad(b.f(2, 3, 6, 6), [2, 2], [2, 2], [0, 0], False, True, 0),
        b.bad(b.f(2, 3, 6, 6), [0, 0]), b.bad(b.f(2, 3, 6, 6), [2, 2], [0, 1]),
        b.bad(b.f(2, 3, 6, 6), [BIG, BIG]), b.bad(b.f(2, 3, 6, 6), [2, 2], [1, 1], [BIG, BIG]),
        b.bad(b.f(2, 3, 6, 6), [2, 2], [1, 1], [2, 2]), b.bad(b.f(2, 3, 6, 6), [-2, 2]),
    ],
    "avg_pool3d": lambda b: [
        b.ok(b.f(2, 2, 4, 4, 4), [2, 2, 2]), b.ok(b.f(2, 2, 4, 4, 4), [3, 3, 3], [2, 2, 2], [1, 1, 1], True),
        b.ok(b.f(2, 2, 4, 4, 4), [2, 2, 2], [1, 1, 1], [0, 0, 0], False, False, 5),
        b.bad(b.f(2, 2, 4, 4, 4), [2, 2, 2], [2, 2, 2], [0, 0, 0], False, True, 0),
        b.bad(b.f(2, 2, 4, 4, 4), [0, 0, 0]), b.bad(b.f(2, 2, 4, 4, 4), [2, 2, 2], [0, 0, 0]),
        b.bad(b.f(2, 2, 4, 4, 4), [BIG, 1, 1]), b.bad(b.f(2, 2, 4, 4, 4), [2, 2, 2], [1, 1, 1], [HUGE] * 3),
    ],
    "max_pool2d_with_indices": lambda b: [
        b.ok(b.f(2, 3, 6, 6), [2, 2], outs=2),
        b.ok(b.f(2, 3, 6, 6), [3, 3], [2, 2], [1, 1], [1, 1], True, outs=2),
        b.ok(b.f(2, 3, 6, 6), [2, 2], [1, 1], [0, 0], [2, 2], outs=2),
        b.bad(b.f(2, 3, 6, 6), [2, 2], [1, 1], [0, 0], [0, 0], outs=2),
        b.bad(b.f(2, 3, 6, 6), [2, 2], [0, 0], outs=2), b.bad(b.f(2, 3, 6, 6), [BIG, BIG], outs=2),
        b.bad(b.f(2, 3, 6, 6), [2, 2], [1, 1], [2, 2], outs=2), b.bad(b.f(2, 3, 6, 6), [0, 0], outs=2),
        b.bad(b.f(2, 3, 6, 6), [2, 2], [1, 1], [0, 0], [HUGE, HUGE], outs=2),
        b.bad(b.special().reshape(1, 1, 2, 5), [2, 2], [1, 1], outs=2),
    ],
    "max_pool3d_with_indices": lambda b: [
        b.ok(b.f(2, 2, 4, 4, 4), [2, 2, 2], outs=2),
        b.ok(b.f(2, 2, 4, 4, 4), [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1], True, outs=2),
        b.bad(b.f(2, 2, 4, 4, 4), [2, 2, 2], [1, 1, 1], [0, 0, 0], [0, 0, 0], outs=2),
        b.bad(b.f(2, 2, 4, 4, 4), [2, 2, 2], [0, 0, 0], outs=2),
        b.bad(b.f(2, 2, 4, 4, 4), [BIG, 1, 1], outs=2), b.bad(b.f(2, 2, 4, 4, 4), [0, 0, 0], outs=2),
    ],
    "upsample_bilinear2d.vec": lambda b: [
        b.ok(b.f(2, 3, 6, 6), [8, 8], False, None), b.ok(b.f(2, 3, 6, 6), None, True, [1.5, 2.0]),
        b.ok(b.f(2, 3, 6, 6), [3, 4], True, None),
        b.bad(b.f(2, 3, 6, 6), [1 << 20, 1 << 20], False, None), b.bad(b.f(2, 3, 6, 6), [0, 0], False, None),
        b.bad(b.f(2, 3, 6, 6), [-1, -1], False, None), b.bad(b.f(2, 3, 6, 6), None, False, [NAN, NAN]),
        b.bad(b.f(2, 3, 6, 6), None, False, [INF, INF]), b.bad(b.f(2, 3, 6, 6), None, False, [-1.0, -1.0]),
        b.bad(b.f(2, 3, 6, 6), None, False, [1e10, 1e10]), b.bad(b.f(2, 3, 6, 6), None, False, None),
    ],
    "upsample_nearest2d.vec": lambda b: [
        b.ok(b.f(2, 3, 6, 6), [12, 12], None), b.ok(b.f(2, 3, 6, 6), None, [2.0, 0.5]),
        b.ok(b.f(2, 3, 6, 6), [5, 7], None),
        b.bad(b.f(2, 3, 6, 6), [1 << 20, 1 << 20], None), b.bad(b.f(2, 3, 6, 6), [0, 0], None),
        b.bad(b.f(2, 3, 6, 6), [-1, -1], None), b.bad(b.f(2, 3, 6, 6), None, [NAN, NAN]),
        b.bad(b.f(2, 3, 6, 6), None, [INF, INF]), b.bad(b.f(2, 3, 6, 6), None, [1e10, 1e10]),
        b.bad(b.f(2, 3, 6, 6), None, None),
    ],
    "grid_sampler_2d": lambda b: [
        b.ok(b.f(2, 3, 6, 6), b.u(-1, 1, 2, 4, 4, 2), 0, 0, False),
        b.ok(b.f(2, 3, 6, 6), b.u(-1.2, 1.2, 2, 3, 5, 2), 1, 1, True),
        b.ok(b.f(2, 3, 6, 6), b.u(-1.2, 1.2, 2, 4, 4, 2), 2, 2, False),
        # Grid coordinates become memory offsets: NaN/inf/1e30 convert to ints undefinedly. Eager torch
        # 2.13 accepts any interpolation/padding mode int and then returns uninitialised memory.
        b.bad(b.f(2, 3, 6, 6), b.special(8).reshape(2, 2, 1, 2), 0, 0, False),
        b.bad(b.f(2, 3, 6, 6), b.special(8).reshape(2, 2, 1, 2), 1, 2, True),
        b.bad(b.f(2, 3, 6, 6), b.special(8).reshape(2, 2, 1, 2), 2, 1, False),
        b.bad(b.f(2, 3, 6, 6), b.full(1e30, 2, 2, 2, 2, dtype=torch.float32), 1, 0, False),
        b.bad(b.f(2, 3, 6, 6), b.u(-1, 1, 2, 4, 4, 2), 7, 0, False),
        b.bad(b.f(2, 3, 6, 6), b.u(-1, 1, 2, 4, 4, 2), 0, 9, False),
        b.bad(b.f(2, 3, 6, 6), b.u(-1, 1, 2, 4, 4, 2), -1, -1, True),
        b.bad(b.f(2, 3, 6, 6), b.u(-1, 1, 2, 4, 4, 2), BIG, 0, False),
        b.bad(b.f(2, 3, 6, 6), b.u(-1, 1, 3, 4, 4, 2), 0, 0, False),
        b.bad(b.f(2, 3, 6, 6), b.u(-1, 1, 2, 4, 4, 3), 0, 0, False),
    ],
    # (N, C*kh*kw, L) with L = number of kernel positions in output_size.
    "col2im": lambda b: [
        b.ok(b.f(1, 8, 9), [4, 4], [2, 2], [1, 1], [0, 0], [1, 1]),
        b.ok(b.f(2, 12, 4), [4, 4], [2, 2], [1, 1], [0, 0], [2, 2]),
        b.ok(b.f(8, 9), [4, 4], [2, 2], [1, 1], [0, 0], [1, 1]),
        b.bad(b.f(1, 8, 9), [BIG, BIG], [2, 2], [1, 1], [0, 0], [1, 1]),
        b.bad(b.f(1, 8, 9), [4, 4], [0, 0], [1, 1], [0, 0], [1, 1]),
        b.bad(b.f(1, 8, 9), [4, 4], [2, 2], [1, 1], [0, 0], [0, 0]),
        b.bad(b.f(1, 8, 9), [4, 4], [2, 2], [0, 0], [0, 0], [1, 1]),
        b.bad(b.f(1, 8, 7), [4, 4], [2, 2], [1, 1], [0, 0], [1, 1]),
        b.bad(b.f(1, 8, 9), [4, 4], [2, 2], [1, 1], [-1, -1], [1, 1]),
        b.bad(b.f(1, 8, 9), [4, 4], [2, 2], [1, 1], [HUGE, HUGE], [1, 1]),
    ],
})

# --- padding ------------------------------------------------------------------


def _pad(dims: int, reflect: bool) -> _Builder:
    def build(b: _B) -> list[Call]:
        shape = {1: (2, 3, 5), 2: (2, 3, 5, 5), 3: (1, 2, 4, 4, 4)}[dims]
        n = 2 * dims
        out = [
            b.ok(b.f(*shape), [1, 2] * dims), b.ok(b.f(*shape), [2, 0] * dims),
            b.ok(b.f(*shape[1:]), [1] * n),
            b.bad(b.f(*shape), [BIG] * n), b.bad(b.f(*shape), [HUGE, 0] * dims), b.bad(b.f(*shape), [-7] * n),
            b.bad(b.f(*shape), [1] * (n - 1)), b.bad(b.f(*shape[:1], *[0] * (len(shape) - 1)), [1] * n),
        ]
        if reflect:
            out.append(b.bad(b.f(*shape), [shape[-1]] * n))
        return out

    return build


_add({
    "reflection_pad1d": _pad(1, True), "reflection_pad2d": _pad(2, True), "reflection_pad3d": _pad(3, True),
    "replication_pad2d": _pad(2, False), "replication_pad3d": _pad(3, False),
})

# --- normalization and dropout ------------------------------------------------
_add({
    "native_layer_norm": lambda b: [
        b.ok(b.f(2, 3, 4), [4], b.f(4), b.f(4), 1e-5, outs=3),
        b.ok(b.f(2, 3, 4), [3, 4], None, None, 1e-5, outs=3),
        b.ok(b.f(4, 3).t(), [4], b.f(4), None, 1e-3, outs=3),
        b.bad(b.f(2, 3, 4), [5], None, None, 1e-5, outs=3),
        b.bad(b.f(2, 3, 4), [BIG], None, None, 1e-5, outs=3),
        b.bad(b.f(2, 3, 4), [], None, None, 1e-5, outs=3),
        b.bad(b.f(2, 3, 4), [4], b.f(4), b.f(4), NAN, outs=3),
        b.bad(b.f(2, 3, 4), [4], None, None, -1.0, outs=3),
        b.bad(b.f(2, 3, 4), [4], b.f(3), None, 1e-5, outs=3),
        b.bad(b.f(0, 4), [4], None, None, 1e-5, outs=3), b.bad(b.f(2, 3, 4), [-1], None, None, 1e-5, outs=3),
        b.bad(b.f(2, 3, 4), [4], None, b.f(1), 1e-5, outs=3),
    ],
    # The shape is passed twice (input and N, C, HxW): the ints must not be trusted over the tensor.
    "native_group_norm": lambda b: [
        b.ok(b.f(2, 4, 3, 3), b.f(4), b.f(4), 2, 4, 9, 2, 1e-5, outs=3),
        b.ok(b.f(2, 4, 3, 3), None, None, 2, 4, 9, 4, 1e-5, outs=3),
        b.ok(b.f(2, 6, 5), b.f(6), None, 2, 6, 5, 3, 1e-5, outs=3),
        b.bad(b.f(2, 4, 3, 3), None, None, BIG, 4, 9, 2, 1e-5, outs=3),
        b.bad(b.f(2, 4, 3, 3), None, None, 2, 4, BIG, 2, 1e-5, outs=3),
        b.bad(b.f(2, 4, 3, 3), None, None, 2, 4, 9, 0, 1e-5, outs=3),
        b.bad(b.f(2, 4, 3, 3), None, None, 2, 4, 9, 3, 1e-5, outs=3),
        b.bad(b.f(2, 4, 3, 3), None, None, 2, 8, 9, 2, 1e-5, outs=3),
        b.bad(b.f(2, 4, 3, 3), None, None, 2, 4, 9, -2, 1e-5, outs=3),
        b.bad(b.f(2, 4, 3, 3), None, None, -2, -4, 9, 2, 1e-5, outs=3),
        b.bad(b.f(2, 4, 3, 3), b.f(2), None, 2, 4, 9, 2, 1e-5, outs=3),
        b.bad(b.f(2, 4, 3, 3), None, b.f(1), 2, 4, 9, 2, 1e-5, outs=3),
        b.bad(b.f(2, 4, 3, 3), None, None, 2, 4, 9, 2, NAN, outs=3),
    ],
    "_native_batch_norm_legit.no_stats": lambda b: [
        b.ok(b.f(2, 3, 4, 4), b.f(3), b.f(3), True, 0.1, 1e-5, outs=3),
        b.ok(b.f(2, 3, 5), None, None, True, 0.1, 1e-5, outs=3),
        # Eager torch 2.13 segfaults here: training=False with no running stats.
        b.bad(b.f(2, 3, 4, 4), b.f(3), b.f(3), False, 0.1, 1e-5, outs=3),
        b.bad(b.f(2, 3, 4, 4), b.f(5), b.f(3), True, 0.1, 1e-5, outs=3),
        # Eager torch 2.13 does not check weight/bias length and reads past them.
        b.bad(b.f(2, 8, 2, 2), b.f(1), b.f(1), True, 0.1, 1e-5, outs=3),
        b.bad(b.f(2, 3, 4, 4), b.f(3), b.f(3), True, NAN, NAN, outs=3),
        b.bad(b.f(1, 3, 1, 1), None, None, True, 0.1, 1e-5, outs=3),
        b.bad(b.f(0, 3, 2, 2), None, None, True, 0.1, 1e-5, outs=3),
    ],
    "_native_batch_norm_legit_no_training": lambda b: [
        b.ok(b.f(2, 3, 4, 4), b.f(3), b.f(3), b.f(3), b.pos(3), 0.1, 1e-5, outs=3),
        b.ok(b.f(2, 3, 5), None, None, b.f(3), b.pos(3), 0.1, 1e-5, outs=3),
        b.bad(b.f(2, 3, 4, 4), None, None, b.f(3), -b.pos(3), 0.1, 1e-5, outs=3),
        b.bad(b.f(2, 3, 4, 4), None, None, b.f(5), b.pos(3), 0.1, 1e-5, outs=3),
        b.bad(b.f(2, 3, 4, 4), None, None, b.f(3), b.pos(3), NAN, NAN, outs=3),
        # Eager torch 2.13 does not check these lengths and reads past the short tensors.
        b.bad(b.f(2, 3, 4, 4), None, None, b.f(3), b.pos(2), 0.1, 1e-5, outs=3),
        b.bad(b.f(2, 8, 2, 2), None, None, b.f(1), b.pos(8), 0.1, 1e-5, outs=3),
        b.bad(b.f(2, 8, 2, 2), b.f(1), b.f(1), b.f(8), b.pos(8), 0.1, 1e-5, outs=3),
        b.bad(b.f(3), None, None, b.f(3), b.pos(3), 0.1, 1e-5, outs=3),
    ],
    "native_dropout": lambda b: [
        b.ok(b.f(3, 4), 0.0, True, outs=2), b.ok(b.f(3, 4), 0.5, False, outs=2),
        b.ok(b.f(3, 4), 0.3, True, outs=2), b.ok(b.f(3, 4), 0.5, None, outs=2),
        b.bad(b.f(3, 4), NAN, True, outs=2), b.bad(b.f(3, 4), -1.0, True, outs=2),
        b.bad(b.f(3, 4), 2.0, True, outs=2), b.bad(b.f(3, 4), 1.0, True, outs=2),
        b.bad(b.f(0, 4), 0.5, True, outs=2), b.bad(b.i(9, 3, 4), 0.5, True, outs=2),
    ],
})

# --- convolution and matmul ---------------------------------------------------


def _conv(b: _B) -> list[Call]:
    x, w = b.f(2, 4, 6, 6), b.f(6, 2, 3, 3)
    return [
        b.ok(x, w, b.f(6), [1, 1], [1, 1], [1, 1], False, [0, 0], 2),
        b.ok(b.f(2, 3, 8), b.f(4, 3, 3), None, [2], [0], [1], False, [0], 1),
        b.ok(b.f(1, 2, 4, 4, 4), b.f(3, 2, 2, 2, 2), b.f(3), [1] * 3, [0] * 3, [1] * 3, False, [0] * 3, 1),
        b.ok(b.f(1, 4, 3, 3), b.f(4, 2, 3, 3), b.f(2), [2, 2], [1, 1], [1, 1], True, [1, 1], 1),
        b.ok(x, b.f(4, 1, 3, 3), None, [1, 2], [0, 1], [2, 1], False, [0, 0], 4),
        b.bad(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 0),
        b.bad(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 3),
        b.bad(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], -2),
        b.bad(x, w, None, [0, 0], [1, 1], [1, 1], False, [0, 0], 2),
        b.bad(x, w, None, [1, 1], [-1, -1], [1, 1], False, [0, 0], 2),
        b.bad(x, w, None, [1, 1], [1, 1], [0, 0], False, [0, 0], 2),
        b.bad(x, w, None, [1, 1], [BIG, BIG], [1, 1], False, [0, 0], 2),
        b.bad(x, w, None, [HUGE, HUGE], [0, 0], [1, 1], False, [0, 0], 2),
        b.bad(x, w, None, [1, 1], [0, 0], [HUGE, HUGE], False, [0, 0], 2),
        b.bad(b.f(1, 4, 3, 3), b.f(4, 2, 3, 3), None, [2, 2], [1, 1], [1, 1], True, [5, 5], 1),
        b.bad(b.f(1, 4, 3, 3), b.f(4, 2, 3, 3), None, [2, 2], [1, 1], [1, 1], True, [BIG, BIG], 1),
        b.bad(x, b.f(6, 3, 3, 3), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 2),
        b.bad(x, b.f(6, 2, 3), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 2),
        b.bad(x, w, b.f(4), [1, 1], [1, 1], [1, 1], False, [0, 0], 2),
        b.bad(x, w, None, [1], [1], [1], False, [0], 2),
        b.bad(b.f(0, 4, 6, 6), w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 2),
    ]


_add({
    "convolution": _conv,
    "mm": lambda b: [
        b.ok(b.f(3, 4), b.f(4, 5)), b.ok(b.f(4, 3).t(), b.f(4, 5)), b.ok(b.f(3, 4), b.f(5, 4).t()),
        b.ok(b.f(3, 4, dtype=torch.float64), b.f(4, 2, dtype=torch.float64)),
        b.bad(b.f(3, 4), b.f(5, 2)), b.bad(b.f(3, 0), b.f(0, 5)), b.bad(b.i(9, 3, 4), b.f(4, 5)),
        b.bad(b.f(2, 3, 4), b.f(4, 5)), b.bad(b.full(I64_MAX, 2, 2), b.full(2, 2, 2)),
    ],
    "bmm": lambda b: [
        b.ok(b.f(2, 3, 4), b.f(2, 4, 5)), b.ok(b.f(2, 4, 3).transpose(1, 2), b.f(2, 4, 5)),
        b.bad(b.f(2, 3, 4), b.f(3, 4, 5)), b.bad(b.f(2, 3, 4), b.f(2, 5, 5)),
        b.bad(b.f(0, 3, 4), b.f(0, 4, 5)),
        b.bad(b.f(3, 4), b.f(4, 5)),
    ],
    "addmm": lambda b: [
        b.ok(b.f(5), b.f(3, 4), b.f(4, 5)), b.ok(b.f(3, 5), b.f(3, 4), b.f(4, 5), beta=0.5, alpha=2.0),
        b.ok(b.f(1, 5), b.f(4, 3).t(), b.f(4, 5), beta=0),
        b.bad(b.f(5), b.f(3, 4), b.f(4, 5), beta=NAN, alpha=INF), b.bad(b.f(5), b.f(3, 4), b.f(5, 5)),
        b.bad(b.f(4), b.f(3, 4), b.f(4, 5)), b.bad(b.special(5), b.f(3, 4), b.f(4, 5), beta=0),
    ],
    "_cdist_forward": lambda b: [
        b.ok(b.f(2, 5, 3), b.f(2, 4, 3), 2.0, None), b.ok(b.f(5, 3), b.f(4, 3), 1.0, 0),
        b.ok(b.f(5, 3), b.f(4, 3), INF, None), b.ok(b.f(5, 3), b.f(4, 3), 2.0, 1),
        b.ok(b.f(5, 3), b.f(4, 3), 0.5, 2),
        b.bad(b.f(5, 3), b.f(4, 3), -1.0, None), b.bad(b.f(5, 3), b.f(4, 3), NAN, None),
        b.bad(b.f(5, 3), b.f(4, 3), 2.0, 7), b.bad(b.f(5, 3), b.f(4, 2), 2.0, None),
        b.bad(b.f(0, 3), b.f(4, 3), 2.0, None), b.bad(b.f(5), b.f(4), 2.0, None),
    ],
    "_pdist_forward": lambda b: [
        b.ok(b.f(5, 3)), b.ok(b.f(5, 3), 1.0), b.ok(b.f(4, 2), INF),
        b.bad(b.f(5, 3), -1.0), b.bad(b.f(5, 3), NAN), b.bad(b.f(5), 2.0), b.bad(b.f(1, 3), 2.0),
        b.bad(b.f(0, 3), 2.0),
    ],
})

# --- fft ----------------------------------------------------------------------
# normalization: 0 none, 1 by 1/sqrt(n), 2 by 1/n.
_add({
    "_fft_r2c": lambda b: [
        b.ok(b.f(4, 8), [1], 0, True), b.ok(b.f(4, 8), [0, 1], 2, False), b.ok(b.f(2, 3, 4), [2], 1, True),
        b.bad(b.f(4, 8), [5], 0, True), b.bad(b.f(4, 8), [0, 0], 0, True), b.bad(b.f(4, 8), [1], 7, True),
        b.bad(b.f(4, 8), [1], -1, True), b.bad(b.f(4, 0), [1], 0, True), b.bad(b.c(4, 8), [1], 0, True),
        # Eager torch 2.13 does not check dim here: [5] returns a misshapen result, [BIG] segfaults.
        b.bad(b.f(4, 8), [BIG], 0, True), b.bad(b.f(4, 8), [-BIG], 0, True), b.bad(b.f(4, 8), [-7], 0, True),
    ],
    "_fft_c2r": lambda b: [
        b.ok(b.c(4, 5), [1], 0, 8), b.ok(b.c(4, 5), [0, 1], 2, 9), b.ok(b.c(2, 3, 3), [2], 1, 4),
        b.bad(b.c(4, 5), [1], 0, BIG), b.bad(b.c(4, 5), [1], 0, 0), b.bad(b.c(4, 5), [1], 0, -1),
        b.bad(b.c(4, 5), [5], 0, 8), b.bad(b.c(4, 5), [1], 9, 8), b.bad(b.f(4, 5), [1], 0, 8),
        b.bad(b.c(4, 5), [0, 0], 0, 8), b.bad(b.c(4, 5), [BIG], 0, 8), b.bad(b.c(4, 5), [-BIG], 0, 8),
    ],
})

# --- random and factory ops ---------------------------------------------------
_add({
    "rand": lambda b: [
        b.ok([3, 4]), b.ok([2, 3], dtype=torch.float64), b.ok([5], device=torch.device("cpu")),
        b.bad([BIG]), b.bad([-1]), b.bad([3], dtype=torch.int64), b.bad([2**32, 2**32]),
        b.bad([HUGE, HUGE, 0]), b.bad([3], layout=torch.sparse_coo),
    ],
    "randn": lambda b: [
        b.ok([3, 4]), b.ok([2, 3], dtype=torch.float64), b.ok([5], device=torch.device("cpu")),
        b.bad([BIG]), b.bad([-1]), b.bad([3], dtype=torch.int64), b.bad([2**32, 2**32]),
        b.bad([HUGE, HUGE, 0]),
    ],
    "randperm": lambda b: [
        b.ok(10), b.ok(5, dtype=torch.int32), b.ok(6, dtype=torch.float32),
        b.bad(BIG), b.bad(-1), b.bad(300, dtype=torch.int8), b.bad(5000, dtype=torch.float16),
        b.bad(3, dtype=torch.bool),
    ],
    "arange.start_step": lambda b: [
        b.ok(0, 10, 1), b.ok(0.0, 1.0, 0.25), b.ok(10, 0, -2), b.ok(0, 6, 2, dtype=torch.float64),
        b.bad(0, HUGE, 1), b.bad(0, 10, 0), b.bad(0, INF, 1), b.bad(0, NAN, 1), b.bad(0, 10, -1),
        b.bad(0.0, 1.0, 1e-300), b.bad(0, 300, 1, dtype=torch.int8), b.bad(-HUGE, HUGE, 1),
    ],
    "empty.memory_format": lambda b: [
        b.ok([3, 4]), b.ok([2, 3, 4, 5], memory_format=torch.channels_last), b.ok([0, 3], dtype=torch.int32),
        b.bad([HUGE]), b.bad([-1]), b.bad([2**32, 2**32]), b.bad([3, 4], memory_format=torch.channels_last),
        b.bad([BIG, BIG, 0]),
    ],
    "empty_strided": lambda b: [
        b.ok([3, 4], [4, 1]), b.ok([3, 4], [1, 3]), b.ok([2, 3], [0, 1], dtype=torch.float64),
        b.bad([3, 4], [HUGE, 1]), b.bad([BIG], [1]), b.bad([3, 4], [-1, 1]), b.bad([3], [1, 1]),
        b.bad([2**32, 2], [2**32, 1]),
    ],
    "full": lambda b: [
        b.ok([3, 4], 1.5), b.ok([2, 3], 7, dtype=torch.int32), b.ok([2], True),
        b.bad([BIG], 0.0), b.bad([-1], 0.0), b.bad([2], NAN, dtype=torch.int64),
        b.bad([2], HUGE, dtype=torch.int8), b.bad([2**32, 2**32], 1.0), b.bad([2], INF, dtype=torch.int32),
    ],
    "full_like": lambda b: [
        b.ok(b.f(3, 4), 2.0), b.ok(b.f(3, 4), 3, dtype=torch.int64),
        b.ok(b.f(2, 3, 4, 4), 1.0, memory_format=torch.channels_last),
        b.bad(b.f(3, 4), NAN, dtype=torch.int64), b.bad(b.i(9, 3, 4), HUGE, dtype=torch.int8),
        b.bad(b.f(0, 4), 1.0), b.bad(b.f(3, 4), 1.0, memory_format=torch.channels_last),
    ],
    "scalar_tensor": lambda b: [
        b.ok(3.5), b.ok(2, dtype=torch.int64), b.ok(True, dtype=torch.bool),
        b.bad(NAN, dtype=torch.int64), b.bad(HUGE, dtype=torch.int8), b.bad(INF),
        b.bad(INF, dtype=torch.int32),
    ],
})

# --- sizes, strides and scalars -----------------------------------------------


def _dim_query(b: _B) -> list[Call]:
    return [
        b.ok(b.f(2, 3, 4), 1), b.ok(b.f(2, 3, 4), -1), b.ok(b.f(4, 3).t(), 0),
        b.bad(b.f(2, 3, 4), 5), b.bad(b.f(2, 3, 4), -7), b.bad(b.f(), 0), b.bad(b.f(2, 3, 4), BIG),
    ]


_add({
    "sym_size.int": _dim_query, "sym_stride.int": _dim_query,
    "sym_numel": lambda b: [b.ok(b.f(2, 3, 4)), b.ok(b.f()), b.bad(b.f(0, 3))],
    "sym_storage_offset": lambda b: [b.ok(b.f(2, 3, 4)), b.ok(b.f(4, 3).t()), b.bad(b.f(0, 3))],
    "sym_is_contiguous": lambda b: [
        b.ok(b.f(2, 3, 4)), b.ok(b.f(4, 3).t()), b.ok(b.f(2, 3, 4, 4), torch.channels_last),
        b.ok(b.f(2, 3, 4, 4, 4), torch.channels_last_3d),
        b.bad(b.f(3, 4), torch.channels_last), b.bad(b.f(3, 4), torch.preserve_format), b.bad(b.f(0, 3)),
    ],
    "_local_scalar_dense": lambda b: [
        b.ok(b.f(1)), b.ok(b.i(9, 1)), b.ok(b.mask(1)), b.ok(b.f()), b.ok(b.f(1, 1, dtype=torch.float64)),
        b.bad(b.f(3)), b.bad(b.f(0)), b.bad(b.special(1)), b.bad(b.full(I64_MIN, 1)),
    ],
})

# fmt: on


def calls(op: str, seed: int = 0) -> list[Call]:
    """At least one valid call and, where the op takes something an attacker controls, hostile ones."""
    try:
        build = _TABLE[op]
    except KeyError:
        raise KeyError(f"no sample calls for {op!r}") from None
    return build(_B(op, seed))


def covered_ops() -> frozenset[str]:
    """Every op calls() knows; equals the aten:: part of ALLOWED_OPS."""
    return frozenset(_TABLE)
