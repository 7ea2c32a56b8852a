"""In the compile worker: one (variant, ArgSpec) compiled into an Inductor standalone artifact (`compile_job`).

`compile_job` rebuilds the variant's graph, traces it on fake tensors whose
sizes are symbolic (every dim the ArgSpec calls "n"; dims of size 0 and 1 and
the values of floats, bools and ints 0 and 1 are part of the ArgSpec, so they
are constants here), and compiles the trace with
`torch._inductor.standalone_compile`. The artifact it saves holds Inductor's
code and no guards. What Inductor assumed about sizes (the ShapeEnv's guards,
such as "this reduction is at most 4096 long") goes back to the serving
process as size conditions, which standalone.py's `load` compiles.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

__all__ = ["EagerRefuses", "compile_job"]

log = logging.getLogger(__name__)

# Describe shows at most this much of an artifact's generated code.
_MAX_SOURCE = 1 << 20


def compile_job(header: dict[str, Any], graph_bytes: bytes) -> dict[str, Any]:
    """In the worker: compiles one (variant, ArgSpec) and saves it at header["path"].
    Returns the reply's fields: the positions the artifact takes, its conditions, its source."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from fuseport.wire import _pb, dtypes
    from fuseport.wire.capture import SizeConditions
    from fuseport.wire.graph import build_module, signature_of

    device = torch.device(header["device"])
    graph = _pb.graph.Graph.FromString(graph_bytes)
    # Validated again: the worker trusts no bytes it is given.
    module = build_module(graph, device)
    signature = signature_of(graph)
    mode = FakeTensorMode(shape_env=ShapeEnv())
    env = mode.shape_env
    sizes = SizeConditions()
    values: list[Any] = []  # what the module is called with: constants and fakes
    takes: list[int] = []  # positions of the fakes: what the artifact takes
    for i, (item, decl) in enumerate(zip(header["inputs"], signature.inputs, strict=True)):
        kind = item["kind"]
        if kind == "tensor":
            dtype = dtypes.dtype_for(int(item["dtype"]))
            dims: list[Any] = []
            for d, n in enumerate(item["shape"]):
                n = int(n)
                if n in (0, 1):  # in the ArgSpec: the kernel is compiled for it
                    dims.append(n)
                    continue
                src = _dim_source(i, d)
                symbol = env.create_symbol(n, src, dynamic_dim=DimDynamic.DYNAMIC, positive=True)
                sizes.bind(symbol, _pb.graph.SizeExpr(dim=_pb.graph.SizeRef(input=i, dim=d)))
                dims.append(env.create_symintnode(symbol, hint=n, source=src))
            with mode:
                # Fake: no memory of the caller's sizes is taken here. Laid out in
                # the ArgSpec's dim order, so the strides Inductor compiles for are
                # the ones such inputs have.
                fake = torch.empty_strided(dims, _strides(dims, item["order"]), dtype=dtype, device=device)
            values.append(fake)
            takes.append(i)
        elif kind == "int" and not decl.static and int(item["value"]) not in (0, 1):
            value = int(item["value"])
            # Not size-like: an int input may be negative (0 and 1 are in the ArgSpec).
            symbol = env.create_symbol(value, _input_source(i), dynamic_dim=DimDynamic.DYNAMIC, positive=None)
            sizes.bind(symbol, _pb.graph.SizeExpr(scalar=i))
            values.append(env.create_symintnode(symbol, hint=value, source=_input_source(i)))
            takes.append(i)
        else:
            # Floats, bools, static inputs and ints 0 and 1 are in the ArgSpec: constants here.
            values.append(decl.static_value if decl.static else _constant(kind, item["value"]))

    def traced(*dynamic: Any) -> Any:
        args = list(values)
        for pos, value in zip(takes, dynamic):
            args[pos] = value
        return module(*args)

    fakes = [values[i] for i in takes]
    with mode:
        gm = make_fx(traced, tracing_mode="real")(*fakes)
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    results = output.args[0] if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    for node in results:
        if not isinstance(node, torch.fx.Node) or not isinstance(node.meta.get("val"), torch.Tensor):
            raise ValueError("an output is not a tensor (standalone artifacts return tensors only)")
        # standalone_compile(dynamic_shapes="from_graph") finds the fake mode here.
        node.meta["example_value"] = node.meta["val"]
    options: dict[str, Any] = {}
    if header.get("mode", "default").startswith("max-autotune"):
        # The mode's options, less CUDA graphs (an artifact is called, not replayed).
        options = dict(torch._inductor.list_mode_options("max-autotune-no-cudagraphs"))
    sources: list[str] = []
    from torch._inductor.graph import GraphLowering

    # Inductor's caches key a graph without its size hints, and a load looks an
    # artifact up in the process's shared Inductor cache with size guards skipped:
    # two compiles of one (variant, ArgSpec) at other sizes (a recompile after an
    # eviction, another process) would share a key, and a load could run the other
    # one's code under this one's conditions. A tag unique to this compile makes
    # every artifact's key its own; the C++ kernels' cache (by source) stays shared.
    tag = torch.compiler.config.cache_key_tag
    torch.compiler.config.cache_key_tag = f"{tag}:{os.path.basename(header['path'])}"
    try:
        with mock.patch.object(GraphLowering, "save_output_code", sources.append):
            artifact = torch._inductor.standalone_compile(
                gm, fakes, dynamic_shapes="from_graph", options=options
            )
    finally:
        torch.compiler.config.cache_key_tag = tag
    # Saved before the test runs: one cut short at the budget (below) leaves it in place.
    artifact.save(path=header["path"], format="binary")
    # The test runs are a call's work at the caller's sizes: no longer than
    # --max-call-seconds lets a call run. Past it they are given up (the artifact is
    # kept untested, as where the graph cannot run on zeros) and, since a kernel is
    # not interrupted, this worker is replaced ("retire") to stop the one still running.
    budget = float(header.get("budget") or 0.0)

    def test_runs() -> None:
        zeros = _check_eager_accepts(module, header["inputs"], values, takes, device, budget)
        if zeros is not None:
            # And the artifact itself, once, on the same zeros, as the serving process will
            # call it: code that fails at run time for the very sizes it was compiled for
            # (a stride past int64 from a hostile step) fails here, in this process.
            artifact(*[zeros[i] for i in takes])

    finished = _within(test_runs, budget)
    # Everything Inductor assumed of the sizes, as conditions the server checks;
    # less "dim >= 2" of a tensor's dims, which the ArgSpec ("n") already says.
    implied = {
        _pb.graph.SizeExpr(
            op=_pb.graph.SizeOp(kind=_pb.graph.SIZE_OP_LE, args=[_pb.graph.SizeExpr(int_value=2), ref])
        ).SerializeToString(deterministic=True)
        for ref in sizes.bound.values()
        if ref.WhichOneof("kind") == "dim"
    }
    kept = [c for c in sizes.conditions(env) if c.SerializeToString(deterministic=True) not in implied]
    conditions = _pb.graph.Graph(inputs=graph.inputs, conditions=kept)
    return {
        "takes": takes,
        "outputs": len(results),
        "conditions": base64.b64encode(conditions.SerializeToString(deterministic=True)).decode(),
        "source": "\n\n".join(sources)[:_MAX_SOURCE],
        "retire": not finished,
    }


# Beyond the budget, for the unfused test run to reach its next op and stop there.
_STOP_SLACK_SECONDS = 0.5


def _within(fn: Callable[[], None], budget: float) -> bool:
    """Runs `fn` (0: no limit); False if it still runs `budget` (and a little) later,
    on the thread it was given, which nothing stops but the process's end. What it
    raises in time is raised here."""
    if not budget:
        fn()
        return True
    raised: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - raised again on the worker's thread
            raised.append(e)

    thread = threading.Thread(target=run, name="fuseport-test-run", daemon=True)
    thread.start()
    thread.join(budget + _STOP_SLACK_SECONDS)
    if thread.is_alive():
        log.warning(
            "the test runs on zeros of the request's sizes passed --max-call-seconds (%g s); given up, "
            "the artifact is kept untested and this worker is replaced",
            budget,
        )
        return False
    if raised:
        raise raised[0]
    return True


class EagerRefuses(Exception):
    """The unfused graph refuses this ArgSpec itself (not its values)."""


def _check_eager_accepts(
    module: Any, inputs: list[dict[str, Any]], values: list[Any], takes: list[int], device: Any, budget: float = 0.0
) -> list[Any] | None:
    """Inductor computes where eager refuses the ArgSpec itself (a bitwise op on
    floats, softmax on ints: the CPU kernels refuse what the meta kernels
    accept): bits, not an answer. So the unfused graph runs once here, on zeros
    of the request's sizes (this process's memory, not the serving one's: real
    memory of the request's size, bounded by the --max-call-bytes the call
    passed), with its data checks: a value a check refuses says nothing of the
    ArgSpec; and for no longer than `budget` (--max-call-seconds), stopping
    between two ops as a call does: then no verdict, and no test run.
    Returns the arguments it ran with, None where a data check refused them
    (zeros as divisors: the fused kernel, which has no such checks, must not
    run on them: SIGFPE)."""
    import torch

    from fuseport.server.checks import DataError, OutOfTime, time_limits, with_data_checks
    from fuseport.wire import dtypes

    args = list(values)
    for i in takes:
        item = inputs[i]
        if item["kind"] != "tensor":
            args[i] = int(item["value"])
            continue
        shape, order = item["shape"], item["order"]
        zeros = torch.zeros(
            [shape[d] for d in order], dtype=dtypes.dtype_for(int(item["dtype"])), device=device
        )
        args[i] = zeros.permute(_inverse(order))
    try:
        with torch.no_grad(), time_limits(None, time.monotonic() + budget if budget else None):
            with_data_checks(module)(*args)
    except DataError:
        return None
    except OutOfTime:
        log.warning(
            "the unfused graph on zeros of the request's sizes passed --max-call-seconds (%g s) and was "
            "stopped between two ops; no test run",
            budget,
        )
        return None
    except Exception as e:  # noqa: BLE001 - only a refusal of the dtypes says something of the ArgSpec
        text = str(e).strip().splitlines()
        if isinstance(e, NotImplementedError) or "not implemented for" in str(e):
            raise EagerRefuses(f"{type(e).__name__}: {text[0] if text else ''}"[:300]) from e
        # Anything else (out of memory, a value zeros cannot take: cholesky of a
        # zero matrix) says nothing of the ArgSpec: no verdict, and no test run.
        log.info("the unfused graph did not run on zeros (%s); no test run", type(e).__name__)
        return None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # this process's memory, given back to the serving ones
    return args


def _inverse(order: Sequence[int]) -> list[int]:
    out = [0] * len(order)
    for pos, d in enumerate(order):
        out[d] = pos
    return out


def _input_source(i: int) -> Any:
    from torch._dynamo.source import LocalSource

    return LocalSource(f"input{i}")


def _dim_source(i: int, d: int) -> Any:
    from torch._dynamo.source import LocalSource, TensorProperty, TensorPropertySource

    return TensorPropertySource(LocalSource(f"input{i}"), TensorProperty.SIZE, d)


def _strides(dims: Sequence[Any], order: Sequence[int]) -> list[Any] | None:
    """Dense strides for `dims` laid out in `order` (outermost dim first)."""
    strides: list[Any] = [1] * len(dims)
    step: Any = 1
    for d in reversed(order):
        strides[d] = step
        step = step * dims[d]
    return strides


def _constant(kind: str, value: Any) -> Any:
    return {"float": float, "bool": bool, "int": int}[kind](value)
