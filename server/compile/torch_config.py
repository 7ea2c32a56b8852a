"""The torch/Inductor settings that every process which compiles or calls compiled code needs.

Imported by the serving process (for torch.compile in process) and by the
compile worker alike; nothing here imports the executor, so neither side
pulls in the other.
"""

from __future__ import annotations

import logging
import threading

import torch

__all__ = ["CACHE_TAG", "EAGER_KERNELS", "configure_compiler", "prepare_inductor", "set_compile_threads"]

log = logging.getLogger(__name__)

# Ops whose Inductor lowering computes something else than the ATen kernel
# does, found by tests/test_ops.py's differential runs (torch 2.13, CPU):
# float remainder and fmod through a / b overflow for tiny divisors (1 % 1e-45
# gave -inf, eager 0) and disagree on infinities (1 % inf: nan, eager 1); the
# rounding modes of div disagree on zero and infinite divisors. Inductor calls
# the ATen kernel for these instead (the rest of the graph still fuses).
EAGER_KERNELS = (
    "div.Tensor_mode", "div.Scalar_mode", "remainder.Tensor", "remainder.Scalar", "fmod.Tensor", "fmod.Scalar",
    # acosh(x) as log(x + sqrt(x*x - 1)) is inf past 1e19 (eager: 89.4 at 1e38);
    # the sampler's decomposition reads NaN coordinates as 0.
    "acosh.default", "grid_sampler_2d.default",
)  # fmt: skip
# Part of the key of Inductor's on-disk cache: code compiled before these
# rules (by an older fuseport, or by plain torch) is never reused.
CACHE_TAG = "fuseport-kernels-4"
_prepared = False
_prepare_lock = threading.Lock()
# Inductor's compile processes (--compile-threads), for every thread of this process
# (configure_compiler applies it): Inductor's settings are per thread, and each entry
# into its Dynamo backend on a thread whose setting is over 1 starts its pool.
_compile_threads = 1


def set_compile_threads(threads: int) -> None:
    """The process's --compile-threads, applied by configure_compiler on each thread."""
    global _compile_threads
    _compile_threads = threads

# How Inductor's generated Python binding calls a C++ kernel (CPU): the
# arguments are read from their Python objects first, with the GIL, then the
# kernel runs without it. Inductor's own binding ("kernel({}); Py_RETURN_NONE;")
# holds the GIL for the whole kernel: one large CPU call then froze every other
# thread of the serving process, the event loop, health and signals included
# (issue 20: 9.6 s without a health answer). The kernel itself is extern "C"
# code over raw pointers: it touches no Python object.
_CALL_WITHOUT_GIL = (
    "{{ auto fuseport_args = std::make_tuple({}); "
    "struct FuseportNoGil {{ PyThreadState* state; FuseportNoGil() : state(PyEval_SaveThread()) {{}} "
    "~FuseportNoGil() {{ PyEval_RestoreThread(state); }} }} fuseport_no_gil; "
    "std::apply(kernel, fuseport_args); }} Py_RETURN_NONE;"
)


def prepare_inductor() -> None:
    """Once per process: Inductor's lowering table and code templates are global."""
    global _prepared
    if _prepared:
        return
    with _prepare_lock:  # the compile thread's warm-up and a request's first load may race here
        if not _prepared:
            _prepare()
            _prepared = True


def _prepare() -> None:
    from torch._inductor import codecache, decomposition, lowering

    for name in EAGER_KERNELS:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(torch.ops.aten, packet), overload)
        decomposition.decompositions.pop(op, None)
        lowering.make_fallback(op, warn=False, override_decomp=True)
    bindings = codecache.CppPythonBindingsCodeCache
    if bindings.call_entry_function == "kernel({}); Py_RETURN_NONE;" and not bindings.extra_parse_arg:
        bindings.call_entry_function = _CALL_WITHOUT_GIL
        bindings.extra_parse_arg = "#include <tuple>\n"
    else:  # another torch: its template is not the one this replaces
        log.warning("Inductor's C++ binding template is not the known one; CPU kernels keep the GIL")


def configure_compiler() -> None:
    """Dynamo's settings for this thread (and asyncio task). torch's config
    values set by assignment live in ContextVars: a setting made on one thread
    is not seen by another, so every thread that compiles or calls a compiled
    kernel (where a guard failure recompiles) runs this first; it costs two reads
    (about 4 us) when the settings are already in place."""
    import torch._inductor.config as inductor_config

    if torch._dynamo.config.specialize_float and inductor_config.compile_threads == _compile_threads:
        return
    # Inductor's own default is a pool of min(32, cores) processes, each importing torch
    # and Triton as it starts (fuseport's earlier min(8, cores // 2) kept 1.3-2 cores of the
    # H100 machine busy after a server started: docs/perf.md).
    inductor_config.compile_threads = _compile_threads
    # A guard failure past the recompile limit must raise, not silently run
    # eager code that we would report as FUSED.
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    # Equal sizes in the first call must not become an equality guard (duck
    # shaping): a (4, 4) input would otherwise recompile for (4, 8).
    import torch.fx.experimental._config as fx_config

    fx_config.use_duck_shape = False
    # A float input compiled as a symbolic value can be silently baked in at
    # the value of the first call (clamp(x * a, max=a) keeps the first a:
    # pytorch/pytorch#194976, #197889; torch 2.11-2.14 on CPU and CUDA). So
    # floats are compiled as constants, guarded, and the ArgSpec holds the
    # value: each value compiles in the background like any new ArgSpec.
    torch._dynamo.config.specialize_float = True
    if hasattr(torch.compiler.config, "cache_key_tag"):
        torch.compiler.config.cache_key_tag = CACHE_TAG
