"""End-to-end behaviour of Execute/Fallback through the real client and server.

Ports the legacy TorchScript fuser's own tests (broadcasting, transposed inputs,
cat, chunk, scalars, where, half types, clamp with NaN/inf, small constants)
to the service, and pins the stack semantics and the fused/fallback contract.
"""

from __future__ import annotations

import math

import pytest
import torch

from fuseport.client import Client


def _check(actual: object, expected: object, **tol: float) -> None:
    torch.testing.assert_close(actual, expected, equal_nan=True, **tol)


def _fused(client: Client, key: int, stack: list) -> list:
    """Runs the fused kernel (waiting for its compile) and insists it ran fused."""
    res = client.execute_detailed(key, stack, wait=True)
    assert res.path == "fused", (res.reason, res.detail)
    return res.stack


def _both(client: Client, fn, example: list, fresh: list, **tol: float) -> None:
    """Registers `fn`, runs fresh inputs fused and unfused, compares both with eager."""
    key = client.register(fn, example)
    expected = fn(*fresh)
    expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]
    fused = _fused(client, key, fresh)
    unfused = client.fallback(key, fresh)
    assert len(fused) == len(unfused) == len(expected)
    for a, b, e in zip(fused, unfused, expected):
        _check(a, e, **tol)
        _check(b, e, **tol)


# ---------------------------------------------------------------- legacy fuser behaviours


def test_execute_broadcasts_4x4_with_4_and_4(client: Client) -> None:
    def f(x, y, z):
        return x * y + z

    _both(client, f, [torch.randn(4, 4), torch.randn(4), torch.randn(4)],
          [torch.randn(4, 4), torch.randn(4), torch.randn(4)])  # fmt: skip


def test_contiguous_and_transposed_inputs_agree_through_different_arg_specs(client: Client) -> None:
    def f(x, y):
        return torch.sigmoid(x) * torch.tanh(y) + x

    key = client.register(f, [torch.randn(4, 6), torch.randn(4, 6)])
    x, y = torch.randn(4, 6), torch.randn(6, 4)
    contiguous = _fused(client, key, [x, y.T.contiguous()])[0]
    transposed = _fused(client, key, [x, y.T])[0]
    _check(contiguous, f(x, y.T))
    _check(transposed, f(x, y.T))
    specs = {a.arg_spec for a in client.describe(key).arg_specs}
    assert len(specs) == 2, specs


def test_execute_handles_zero_element_tensors(client: Client) -> None:
    def f(x, y):
        return x * 2 + y

    _both(client, f, [torch.randn(3, 4), torch.randn(3, 4)], [torch.randn(0, 4), torch.randn(0, 4)])


def test_cat_of_2x4_and_1x4_branches_gives_3x4(client: Client) -> None:
    def f(x, y):
        return torch.cat([x * 2, torch.relu(y)], dim=0)

    key = client.register(f, [torch.randn(2, 4), torch.randn(1, 4)])
    x, y = torch.randn(2, 4), torch.randn(1, 4)
    out = _fused(client, key, [x, y])
    assert out[0].shape == (3, 4)
    _check(out[0], f(x, y))


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_chunk_along_dims_gives_each_chunk(client: Client, dim: int) -> None:
    def f(x):
        a, b = torch.chunk(x * 3, 2, dim=dim)
        return a + 1, b - 1

    _both(client, f, [torch.randn(4, 6, 8)], [torch.randn(4, 6, 8)])


def test_float_scalar_input_is_not_a_constant(client: Client) -> None:
    def f(x, alpha):
        return x * alpha + 1

    key = client.register(f, [torch.randn(8), 0.5])
    x = torch.randn(8)
    for alpha in (2.25, -1.5, 0.5):
        _check(_fused(client, key, [x, alpha])[0], f(x, alpha))
        _check(client.fallback(key, [x, alpha])[0], f(x, alpha))


def test_where_with_bool_mask_gives_float64(client: Client) -> None:
    def f(mask, x, y):
        return torch.where(mask, x, y) * 2

    mask = torch.rand(16) > 0.5
    x, y = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    key = client.register(f, [torch.rand(16) > 0.5, torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)])
    out = _fused(client, key, [mask, x, y])[0]
    assert out.dtype == torch.float64
    _check(out, f(mask, x, y), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_match_float32_reference(client: Client, dtype: torch.dtype) -> None:
    def f(x, y):
        return torch.exp(x) * y - x

    x32, y32 = torch.randn(64), torch.randn(64)
    key = client.register(f, [x32.to(dtype), y32.to(dtype)])
    out = _fused(client, key, [x32.to(dtype), y32.to(dtype)])[0]
    assert out.dtype == dtype
    reference = f(x32.to(dtype).float(), y32.to(dtype).float())
    _check(out.float(), reference, rtol=2e-2, atol=2e-2)


def test_clamp_min_max_with_nan_inf_and_none_bounds_equal_eager(client: Client) -> None:
    def f(x, y):
        return (
            torch.clamp(x, min=-0.5, max=0.5),
            torch.clamp(x, min=float("-inf"), max=float("inf")),
            torch.clamp(x, min=None, max=0.0),
            torch.clamp(x, min=float("nan")),
            torch.minimum(x, y),
            torch.maximum(x, y),
        )

    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3, -2.0, 2.0, 0.0, -0.0])
    y = torch.tensor([0.0, float("nan"), 1.0, float("inf"), -float("inf"), 2.5, -0.0, 0.0])
    key = client.register(f, [torch.randn(8), torch.randn(8)])
    for got, want in zip(_fused(client, key, [x, y]), f(x, y)):
        _check(got, want, rtol=0, atol=0)
    for got, want in zip(client.fallback(key, [x, y]), f(x, y)):
        _check(got, want, rtol=0, atol=0)


def test_small_constant_keeps_its_precision(client: Client) -> None:
    def f(x):
        return x * 1e-8 + 1e-8

    x = torch.randn(32, dtype=torch.float64)
    key = client.register(f, [torch.randn(32, dtype=torch.float64)])
    assert torch.equal(client.fallback(key, [x])[0], f(x))
    _check(_fused(client, key, [x])[0], f(x), rtol=1e-15, atol=0)


# ---------------------------------------------------------------- stack semantics


def test_values_below_the_inputs_come_back_untouched(client: Client) -> None:
    def f(x):
        return x + 1, x * 2

    key = client.register(f, [torch.randn(3)])
    below = [
        torch.arange(6, dtype=torch.int32).reshape(2, 3),
        7,
        -2.5,
        True,
        "text",
        None,
        [1, [torch.ones(2, dtype=torch.bfloat16), None]],
    ]
    x = torch.randn(3)
    out = client.execute(key, [*below, x])
    assert len(out) == len(below) + 2
    assert torch.equal(out[0], below[0]) and out[0].dtype == torch.int32
    assert out[1:6] == below[1:6]
    assert out[6][0] == 1 and torch.equal(out[6][1][0], below[6][1][0]) and out[6][1][1] is None
    _check(out[-2], x + 1)
    _check(out[-1], x * 2)


def test_same_graph_gets_same_key(client: Client) -> None:
    def f(x):
        return torch.sin(x) + 1

    assert client.register(f, [torch.randn(4)]) == client.register(f, [torch.randn(4)])


def test_first_request_for_new_arg_spec_is_answered_by_fallback(client: Client) -> None:
    def f(x):
        return torch.cos(x) * 3 - 2

    key = client.register(f, [torch.randn(5)])  # a graph of its own: nothing compiled yet
    x = torch.randn(7)
    first = client.execute_detailed(key, [x])
    assert first.path == "fallback"
    assert first.reason == "compiling"
    _check(first.stack[0], f(x))
    states = [a.state for a in client.describe(key).arg_specs]
    assert states, "the compile should have been started"


def test_execute_reports_timings_and_describe_shows_source(client: Client) -> None:
    def f(x):
        return torch.relu(x) * 0.5

    key = client.register(f, [torch.randn(16)])
    res = client.execute_detailed(key, [torch.randn(16)], wait=True)
    assert res.path == "fused" and res.reason == ""
    assert res.timings.run_us > 0 and res.timings.total_us >= res.timings.run_us
    info = client.describe(key, include_source=True)
    ready = [a for a in info.arg_specs if a.source]
    assert ready, "a ready ArgSpec should carry its generated source"
    assert "def call" in ready[0].source or "kernel" in ready[0].source
    assert ready[0].compile_seconds > 0
    assert info.fused_runs >= 1


def test_integer_scalar_stays_an_input(client: Client) -> None:
    def f(x, n):
        return x + n

    key = client.register(f, [torch.arange(4), 3])
    x = torch.arange(4)
    assert torch.equal(_fused(client, key, [x, 10])[0], x + 10)


def test_reductions_matmul_and_module_with_weights(client: Client) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16)).eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        _both(client, model, [torch.randn(3, 8)], [x], rtol=1e-4, atol=1e-4)

    def g(a, b):
        return (a @ b).softmax(dim=-1), a.sum(dim=1), a.amax(dim=0)

    _both(client, g, [torch.randn(4, 6), torch.randn(6, 3)], [torch.randn(4, 6), torch.randn(6, 3)],
          rtol=1e-5, atol=1e-5)  # fmt: skip


def test_async_client_runs_the_same_calls(server) -> None:
    import asyncio

    from fuseport.client import AsyncClient

    def f(x, y):
        return x - y

    async def main() -> None:
        async with AsyncClient(server.target, timeout=120) as c:
            key = await c.register(f, [torch.randn(3), torch.randn(3)])
            x, y = torch.randn(3), torch.randn(3)
            res = await c.execute_detailed(key, ["keep", x, y], wait=True)
            assert res.path == "fused" and res.stack[0] == "keep"
            _check(res.stack[1], x - y)
            _check((await c.fallback(key, [x, y]))[0], x - y)
            assert key in [k.key for k in await c.list()]
            assert (await c.describe(key)).key == key
            assert await c.health() == "SERVING"

    asyncio.run(main())


def test_math_sanity_of_helpers() -> None:
    # Guards the comparison helper itself: NaNs must compare equal, values not.
    _check(torch.tensor([math.nan]), torch.tensor([math.nan]))
    with pytest.raises(AssertionError):
        _check(torch.tensor([1.0]), torch.tensor([2.0]))
