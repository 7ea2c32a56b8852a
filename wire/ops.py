"""The op allowlist: every op a graph may name, and the one way to turn a name into a callable.

A graph names ops as strings: ``"aten::add.Tensor"`` (namespace, op, overload;
the default overload is written ``.default``) or ``"sym::mul"`` (integer
arithmetic on sizes). The server calls `resolve` for every node, and `resolve`
looks a name up in `ALLOWED_OPS` *before* it touches torch, so a client string
can only ever reach an op listed here.

The list is static on purpose: it does not change when the server's torch
does, so a graph accepted by one server is accepted by every server with the
same fuseport version. It is made of

* `CORE_ATEN_OPS`: every overload in ``torch.ops.aten`` tagged
  ``torch.Tag.core`` in torch 2.13, less those whose schema mutates an
  argument (``aten::resize_.default``, ``aten::atan2.out`` and
  ``aten::_native_batch_norm_legit.default``): a graph runs on tensors that may
  alias a received message or the kernel's constants, so nothing may write
  in place. Generated once with::

      for full in torch._C._dispatch_get_all_op_names():
          ns, _, rest = full.partition("::")
          if ns != "aten":
              continue
          name, _, overload = rest.partition(".")
          op = getattr(getattr(torch.ops.aten, name), overload or "default")
          if torch.Tag.core in op.tags and not op._schema.is_mutable:
              ...  # f"aten::{name}.{overload or 'default'}"

* `CAPTURE_OPS`: ops that capture (torch.export, then the core ATen
  decompositions) produces for supported code although they are not tagged
  core. Empty as of torch 2.13: everything the capture cases of
  tests/test_graph.py produce (``aten::view.default``,
  ``aten::native_layer_norm.default``, ``aten::_softmax.default``,
  ``aten::split_with_sizes.default``, ``aten::sym_size.int``, ...) is tagged
  core, ``operator.getitem`` is folded into node outputs, and capture
  decomposes further any op outside this list that torch can decompose
  (``aten::linalg_vector_norm.default``, from ``F.normalize``).
* `SYM_OPS`: integer arithmetic on sizes (``x.shape[0] // 2``), mapped to
  Python's operator functions by a fixed table.

An op listed here but missing from the installed torch (the servers may run an
older torch than the clients) is reported as such by `resolve`, not as an op
outside the allowlist.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch

from fuseport.wire.errors import InvalidGraph, OpNotAllowed

__all__ = [
    "ALLOWED_OPS",
    "CAPTURE_OPS",
    "CORE_ATEN_OPS",
    "RANDOM_OPS",
    "REMOVED_OPS",
    "SYM_OPS",
    "is_allowed",
    "op_name",
    "resolve",
]

logger = logging.getLogger(__name__)

# fmt: off
CORE_ATEN_OPS: tuple[str, ...] = (
    "aten::_adaptive_avg_pool2d.default",
    "aten::_adaptive_avg_pool2d_backward.default",
    "aten::_adaptive_avg_pool3d.default",
    "aten::_cdist_forward.default",
    "aten::_embedding_bag.default",
    "aten::_fft_c2r.default",
    "aten::_fft_r2c.default",
    "aten::_local_scalar_dense.default",
    "aten::_log_softmax.default",
    "aten::_native_batch_norm_legit.no_stats",
    "aten::_native_batch_norm_legit_no_training.default",
    "aten::_pdist_forward.default",
    "aten::_softmax.default",
    "aten::_to_copy.default",
    "aten::abs.default",
    "aten::acos.default",
    "aten::acosh.default",
    "aten::adaptive_avg_pool1d.default",
    "aten::add.Scalar",
    "aten::add.Tensor",
    "aten::addmm.default",
    "aten::alias.default",
    "aten::amax.default",
    "aten::amin.default",
    "aten::any.default",
    "aten::any.dim",
    "aten::any.dims",
    "aten::arange.start_step",
    "aten::argmax.default",
    "aten::argmin.default",
    "aten::as_strided.default",
    "aten::asin.default",
    "aten::asinh.default",
    "aten::atan.default",
    "aten::atan2.default",
    "aten::atanh.default",
    "aten::avg_pool1d.default",
    "aten::avg_pool2d.default",
    "aten::avg_pool2d_backward.default",
    "aten::avg_pool3d.default",
    "aten::bitwise_and.Scalar",
    "aten::bitwise_and.Tensor",
    "aten::bitwise_not.default",
    "aten::bitwise_or.Scalar",
    "aten::bitwise_or.Tensor",
    "aten::bitwise_xor.Scalar",
    "aten::bitwise_xor.Tensor",
    "aten::bmm.default",
    "aten::cat.default",
    "aten::ceil.default",
    "aten::clamp.Tensor",
    "aten::clamp.default",
    "aten::clone.default",
    "aten::col2im.default",
    "aten::constant_pad_nd.default",
    "aten::convolution.default",
    "aten::convolution_backward.default",
    "aten::copy.default",
    "aten::cos.default",
    "aten::cosh.default",
    "aten::cumsum.default",
    "aten::diagonal.default",
    "aten::div.Scalar",
    "aten::div.Scalar_mode",
    "aten::div.Tensor",
    "aten::div.Tensor_mode",
    "aten::elu.default",
    "aten::embedding.default",
    "aten::embedding_dense_backward.default",
    "aten::empty.memory_format",
    "aten::empty_strided.default",
    "aten::eq.Scalar",
    "aten::eq.Tensor",
    "aten::erf.default",
    "aten::exp.default",
    "aten::expand.default",
    "aten::expm1.default",
    "aten::fill.Scalar",
    "aten::flip.default",
    "aten::floor.default",
    "aten::fmod.Scalar",
    "aten::fmod.Tensor",
    "aten::full.default",
    "aten::full_like.default",
    "aten::gather.default",
    "aten::ge.Scalar",
    "aten::ge.Tensor",
    "aten::gelu.default",
    "aten::grid_sampler_2d.default",
    "aten::gt.Scalar",
    "aten::gt.Tensor",
    "aten::hardtanh.default",
    "aten::index.Tensor",
    "aten::index_put.default",
    "aten::index_select.default",
    "aten::isinf.default",
    "aten::isnan.default",
    "aten::le.Scalar",
    "aten::le.Tensor",
    "aten::leaky_relu.default",
    "aten::log.default",
    "aten::log10.default",
    "aten::log1p.default",
    "aten::log2.default",
    "aten::logical_and.default",
    "aten::logical_not.default",
    "aten::logical_or.default",
    "aten::logical_xor.default",
    "aten::lt.Scalar",
    "aten::lt.Tensor",
    "aten::masked_scatter.default",
    "aten::max.dim",
    "aten::max_pool2d_with_indices.default",
    "aten::max_pool2d_with_indices_backward.default",
    "aten::max_pool3d_with_indices.default",
    "aten::maximum.default",
    "aten::mean.default",
    "aten::mean.dim",
    "aten::min.dim",
    "aten::minimum.default",
    "aten::mm.default",
    "aten::mul.Scalar",
    "aten::mul.Tensor",
    "aten::native_dropout.default",
    "aten::native_group_norm.default",
    "aten::native_group_norm_backward.default",
    "aten::native_layer_norm.default",
    "aten::native_layer_norm_backward.default",
    "aten::ne.Scalar",
    "aten::ne.Tensor",
    "aten::neg.default",
    "aten::nonzero.default",
    "aten::permute.default",
    "aten::pow.Scalar",
    "aten::pow.Tensor_Scalar",
    "aten::pow.Tensor_Tensor",
    "aten::prod.default",
    "aten::prod.dim_int",
    "aten::rand.default",
    "aten::randn.default",
    "aten::randperm.default",
    "aten::reciprocal.default",
    "aten::reflection_pad1d.default",
    "aten::reflection_pad2d.default",
    "aten::reflection_pad3d.default",
    "aten::relu.default",
    "aten::remainder.Scalar",
    "aten::remainder.Tensor",
    "aten::repeat.default",
    "aten::replication_pad2d.default",
    "aten::replication_pad3d.default",
    "aten::round.default",
    "aten::rsqrt.default",
    "aten::scalar_tensor.default",
    "aten::scatter.src",
    "aten::scatter.value",
    "aten::scatter_add.default",
    "aten::scatter_reduce.two",
    "aten::select.int",
    "aten::select_scatter.default",
    "aten::sigmoid.default",
    "aten::sign.default",
    "aten::sin.default",
    "aten::sinh.default",
    "aten::slice.Tensor",
    "aten::slice_scatter.default",
    "aten::sort.default",
    "aten::split_with_sizes.default",
    "aten::sqrt.default",
    "aten::squeeze.dim",
    "aten::squeeze.dims",
    "aten::sub.Scalar",
    "aten::sub.Tensor",
    "aten::sum.dim_IntList",
    "aten::sym_is_contiguous.default",
    "aten::sym_numel.default",
    "aten::sym_size.int",
    "aten::sym_storage_offset.default",
    "aten::sym_stride.int",
    "aten::tan.default",
    "aten::tanh.default",
    "aten::topk.default",
    "aten::trunc.default",
    "aten::unsqueeze.default",
    "aten::upsample_bilinear2d.vec",
    "aten::upsample_nearest2d.vec",
    "aten::var.correction",
    "aten::var.dim",
    "aten::view.default",
    "aten::where.self",
)
# fmt: on

# Non-core ops that capture produces; see the module docstring for why it is empty.
CAPTURE_OPS: tuple[str, ...] = ()

SYM_OPS: Mapping[str, Callable[..., Any]] = MappingProxyType(
    {
        "sym::add": operator.add,
        "sym::floordiv": operator.floordiv,
        "sym::max": torch.sym_max,
        "sym::min": torch.sym_min,
        "sym::mod": operator.mod,
        "sym::mul": operator.mul,
        "sym::neg": operator.neg,
        "sym::sub": operator.sub,
    }
)

_BACKWARD = (
    "a training kernel: its index and statistics arguments come from its own forward "
    "pass in autograd, so it does not check them (max_pool2d_with_indices_backward "
    "segfaulted the server on an index of 1 << 40; embedding_dense_backward read past "
    "its weights). Capturing an inference function never produces it."
)

# Core ops a graph may not name, and why (docs/allowlist.md lists them).
REMOVED_OPS: Mapping[str, str] = MappingProxyType(
    {
        "aten::_adaptive_avg_pool2d_backward.default": _BACKWARD,
        "aten::avg_pool2d_backward.default": _BACKWARD,
        "aten::convolution_backward.default": _BACKWARD,
        "aten::embedding_dense_backward.default": _BACKWARD,
        "aten::max_pool2d_with_indices_backward.default": _BACKWARD,
        "aten::native_group_norm_backward.default": _BACKWARD,
        "aten::native_layer_norm_backward.default": _BACKWARD,
        "aten::_embedding_bag.default": (
            "its offsets are read without a bounds check on CUDA, and their validity "
            "(sorted, within the indices) is data the server would have to scan; "
            "F.embedding_bag is not produced by capture of common models"
        ),
    }
)

ALLOWED_OPS: frozenset[str] = (
    frozenset(CORE_ATEN_OPS) - frozenset(REMOVED_OPS) | frozenset(CAPTURE_OPS) | frozenset(SYM_OPS)
)

# Ops whose results are random: the fused and the unfused path draw different
# numbers from different generators, so their results differ by design.
# Describe lists them for a kernel that uses them.
RANDOM_OPS: frozenset[str] = frozenset(
    {"aten::native_dropout.default", "aten::rand.default", "aten::randn.default", "aten::randperm.default"}
)


def is_allowed(name: str) -> bool:
    """Whether a graph may name this op."""
    return name in ALLOWED_OPS


def op_name(op: torch._ops.OpOverload) -> str:
    """The wire name of an op overload: ``"aten::add.Tensor"``, ``"aten::gelu.default"``."""
    return f"{op.namespace}::{op._opname}.{op._overloadname}"


def resolve(name: str) -> Callable[..., Any]:
    """The callable for an allowlisted op name.

    Raises OpNotAllowed (naming the op) for anything outside `ALLOWED_OPS`, and
    InvalidGraph for an allowlisted op this torch does not have.
    """
    if not isinstance(name, str) or name not in ALLOWED_OPS:
        raise OpNotAllowed(f"op {name!r} is not in the allowlist")
    return _resolve_allowed(name)


@functools.cache  # only allowlisted names get here, so the cache is bounded
def _resolve_allowed(name: str) -> Callable[..., Any]:
    if name in SYM_OPS:
        return SYM_OPS[name]
    namespace, _, rest = name.partition("::")
    opname, _, overload = rest.partition(".")
    op: object = None
    if namespace == "aten":  # the only namespace the table holds besides sym
        try:
            op = getattr(getattr(torch.ops.aten, opname), overload)
        except (AttributeError, RuntimeError):
            op = None
    if not isinstance(op, torch._ops.OpOverload):
        logger.warning("allowlisted op %s is missing from torch %s", name, torch.__version__)
        raise InvalidGraph(
            f"op {name!r} is allowed, but this server's torch {torch.__version__} does not have it"
        )
    return op
