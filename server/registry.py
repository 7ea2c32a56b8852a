"""The registry: key -> kernel (its variants: one graph each), persisted in the store directory.

A kernel's key is the content key of the graph it was first registered with.
Its variants are captures of the same function for other stacks (another
rank, dtype, size range or static value); the first variant whose inputs and
conditions accept a stack runs it. Variants are only ever added: one never
replaces one registered before it.

On disk, one file per graph, each written with fsync and rename: the kernel's
own graph is ``<key>.pb``, each further variant ``<key>+<variant key>.pb``
(keys as 16 unsigned hex digits). A ``.tmp-*`` file is what a crash left mid-write:
it is removed at start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from fuseport.server.checks import Planner, with_data_checks
from fuseport.wire import _pb, ops
from fuseport.wire.errors import FuseportError, InvalidGraph, KernelNotFound, ResourceExhausted
from fuseport.wire.graph import Signature, build_module, graph_summary, signature_of
from fuseport.wire.keys import key_for

__all__ = ["Kernel", "Registry", "Variant"]

log = logging.getLogger(__name__)

_BASE = re.compile(r"^([0-9a-f]{16})\.pb$")
_VARIANT = re.compile(r"^([0-9a-f]{16})\+([0-9a-f]{16})\.pb$")


@dataclass(frozen=True)
class Variant:
    """One graph of a kernel: everything about it that does not change after Register."""

    key: int  # the graph's content key
    graph: _pb.graph.Graph
    signature: Signature
    ops: tuple[str, ...]
    module: torch.fx.GraphModule  # the graph as built, on the serving device: what compiles
    fallback: torch.fx.GraphModule  # the same with data checks before index ops: what runs unfused
    planner: Planner
    random_ops: tuple[str, ...]  # ops whose results the two paths draw differently


@dataclass(frozen=True)
class Kernel:
    key: int
    variants: tuple[Variant, ...]  # in the order they are tried

    @property
    def arity(self) -> int:
        return len(self.variants[0].signature.inputs)


def _hex(key: int) -> str:
    # Unsigned hex: file names sort and never start with '-'.
    return f"{key & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def _signed(text: str) -> int:
    return int.from_bytes(int(text, 16).to_bytes(8, "big"), "big", signed=True)


class Registry:
    """Holds kernels in memory and on disk; a kernel or variant is visible only once complete.

    Writes take one lock (registration is rare and idempotent); lookups read a
    dict whose values are replaced whole (Kernel is immutable), which the GIL
    makes atomic.
    """

    def __init__(self, store_dir: Path, device: torch.device, max_variants: int = 64) -> None:
        self.dir = Path(store_dir)
        self.device = device
        self.max_variants = max_variants
        self._kernels: dict[int, Kernel] = {}
        self._lock = threading.Lock()
        self.dir.mkdir(parents=True, exist_ok=True)

    def load(self) -> int:
        """Loads every stored graph; a damaged or misnamed file is logged and skipped."""
        for path in self.dir.glob(".tmp-*"):
            log.warning("removing %s: a write that a crash interrupted", path.name)
            path.unlink(missing_ok=True)
        names = sorted(p.name for p in self.dir.iterdir())
        for name in names:
            m = _BASE.match(name)
            if m and (variant := self._load(name, _signed(m.group(1)))):
                self._kernels[variant.key] = Kernel(variant.key, (variant,))
        for name in names:
            m = _VARIANT.match(name)
            if not m:
                continue
            key = _signed(m.group(1))
            kernel = self._kernels.get(key)
            if kernel is None:
                log.warning("skipping stored variant %s: its kernel %d is not in the store", name, key)
                continue
            variant = self._load(name, _signed(m.group(2)))
            if variant is not None:
                self._kernels[key] = Kernel(key, (*kernel.variants, variant))
        log.info("loaded %d kernels from %s", len(self._kernels), self.dir)
        return len(self._kernels)

    def _load(self, name: str, expected: int) -> Variant | None:
        try:
            graph = _pb.graph.Graph.FromString((self.dir / name).read_bytes())
            variant = self._build(graph)
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the server
            log.warning("skipping stored graph %s: %s", name, e)
            return None
        if variant.key != expected:
            log.warning("skipping stored graph %s: its graph hashes to key %d", name, variant.key)
            return None
        return variant

    def register(self, graph: _pb.graph.Graph, variant_of: int | None = None) -> tuple[int, bool, int]:
        """Returns (kernel key, created, the graph's own key). Registering again does no work."""
        vkey = key_for(graph)
        key = vkey if variant_of is None else variant_of
        kernel = self._kernels.get(key)
        if kernel is not None and any(v.key == vkey for v in kernel.variants):
            return key, False, vkey
        if variant_of is not None and kernel is None:
            raise KernelNotFound(f"no kernel with key {key} to add a variant to; register it first", key)
        variant = self._shared(vkey) or self._build(graph, vkey)
        with self._lock:
            kernel = self._kernels.get(key)  # again: registered while we waited for the lock?
            if kernel is not None and any(v.key == vkey for v in kernel.variants):
                return key, False, vkey
            if kernel is None:
                self._persist(f"{_hex(key)}.pb", graph)
                self._kernels[key] = Kernel(key, (variant,))
            else:
                self._check_variant(kernel, variant)
                self._persist(f"{_hex(key)}+{_hex(vkey)}.pb", graph)
                self._kernels[key] = Kernel(key, (*kernel.variants, variant))
        log.info(
            "registered %s %d (%d nodes, %d inputs, %d conditions)",
            "kernel" if key == vkey else f"a variant of kernel {key}:",
            vkey,
            len(graph.nodes),
            len(graph.inputs),
            len(graph.conditions),
        )
        return key, True, vkey

    def _check_variant(self, kernel: Kernel, variant: Variant) -> None:
        n = len(variant.signature.inputs)
        if n != kernel.arity:
            raise InvalidGraph(
                f"a variant of kernel {kernel.key} must take its {kernel.arity} inputs, this graph takes {n}"
            )
        if len(kernel.variants) >= self.max_variants:
            raise ResourceExhausted(
                f"kernel {kernel.key} has {len(kernel.variants)} variants, the most this server keeps "
                f"(--max-variants); a function whose static inputs take many values makes one per value"
            )

    def _shared(self, vkey: int) -> Variant | None:
        """The same graph already built for another kernel: its modules and plans serve both."""
        for kernel in list(self._kernels.values()):
            for v in kernel.variants:
                if v.key == vkey:
                    return v
        return None

    def get(self, key: int) -> Kernel:
        kernel = self._kernels.get(key)
        if kernel is None:
            raise KernelNotFound(f"no kernel with key {key}; register it first", key)
        return kernel

    def remove(self, key: int) -> Kernel | None:
        with self._lock:
            kernel = self._kernels.pop(key, None)
            paths = [self.dir / f"{_hex(key)}.pb", *self.dir.glob(f"{_hex(key)}+*.pb")]
            removed = False
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed = True
            if removed:
                _fsync_dir(self.dir)
        return kernel

    def kernels(self) -> list[Kernel]:
        return sorted(self._kernels.values(), key=lambda k: k.key)

    def variant_keys(self) -> Iterable[int]:
        return {v.key for k in list(self._kernels.values()) for v in k.variants}

    def _build(self, graph: _pb.graph.Graph, key: int | None = None) -> Variant:
        try:
            signature = signature_of(graph)
            module = build_module(graph, self.device)
            fallback = with_data_checks(module)
        except FuseportError:
            raise
        except Exception as e:  # a graph that passed validation but fx rejects
            raise InvalidGraph(f"graph cannot be built: {e}") from e
        summary = tuple(graph_summary(graph))
        floats = [i for i, s in enumerate(signature.inputs) if s.kind == "float"]
        return Variant(
            key=key_for(graph) if key is None else key,
            graph=graph,
            signature=signature,
            ops=summary,
            module=module,
            fallback=fallback,
            planner=Planner(module, floats, self.device),
            random_ops=tuple(op for op in summary if op in ops.RANDOM_OPS),
        )

    def _persist(self, name: str, graph: _pb.graph.Graph) -> None:
        """Temp file, fsync, rename, fsync the directory: a kill -9 after
        Register returns loses nothing, and a crash mid-write leaves no half file."""
        data = graph.SerializeToString(deterministic=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".pb")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.dir)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
