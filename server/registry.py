"""The registry: key -> kernel spec, persisted in the store directory."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from fuseport.wire import _pb
from fuseport.wire.errors import FuseportError, InvalidGraph, KernelNotFound
from fuseport.wire.graph import Signature, build_module, graph_summary, signature_of
from fuseport.wire.keys import key_for

__all__ = ["KernelSpec", "Registry"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelSpec:
    """Everything about one registered graph that does not change after Register."""

    key: int
    graph: _pb.graph.Graph
    signature: Signature
    ops: tuple[str, ...]
    fallback: torch.fx.GraphModule  # the unfused graph on the serving device


def _file_name(key: int) -> str:
    # Unsigned hex: file names sort and never start with '-'.
    return f"{key & 0xFFFF_FFFF_FFFF_FFFF:016x}.pb"


class Registry:
    """Holds specs in memory and on disk; a spec is visible only once complete.

    Writes take one lock (registration is rare and idempotent); lookups read a
    dict that is only ever replaced key by key, which the GIL makes atomic.
    """

    def __init__(self, store_dir: Path, device: torch.device) -> None:
        self.dir = Path(store_dir)
        self.device = device
        self._specs: dict[int, KernelSpec] = {}
        self._lock = threading.Lock()
        self.dir.mkdir(parents=True, exist_ok=True)

    def load(self) -> int:
        """Loads every stored graph; a damaged file is logged and skipped."""
        for path in sorted(self.dir.glob("*.pb")):
            try:
                graph = _pb.graph.Graph.FromString(path.read_bytes())
                spec = self._build(graph)
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the server
                log.warning("skipping stored kernel %s: %s", path.name, e)
                continue
            if path.name != _file_name(spec.key):
                log.warning("skipping stored kernel %s: its graph hashes to key %d", path.name, spec.key)
                continue
            self._specs[spec.key] = spec
        log.info("loaded %d kernels from %s", len(self._specs), self.dir)
        return len(self._specs)

    def register(self, graph: _pb.graph.Graph) -> tuple[int, bool]:
        """Returns (key, created). The same graph registered again does no work."""
        key = key_for(graph)
        if key in self._specs:
            return key, False
        with self._lock:
            if key in self._specs:  # registered while we waited for the lock
                return key, False
            spec = self._build(graph, key)
            self._persist(key, graph)
            self._specs[key] = spec
        log.info("registered kernel %d (%d nodes, %d inputs)", key, len(graph.nodes), len(graph.inputs))
        return key, True

    def get(self, key: int) -> KernelSpec:
        spec = self._specs.get(key)
        if spec is None:
            raise KernelNotFound(f"no kernel with key {key}; register it first", key)
        return spec

    def remove(self, key: int) -> bool:
        with self._lock:
            spec = self._specs.pop(key, None)
            path = self.dir / _file_name(key)
            if path.exists():
                path.unlink()
                _fsync_dir(self.dir)
        return spec is not None

    def specs(self) -> list[KernelSpec]:
        return sorted(self._specs.values(), key=lambda s: s.key)

    def _build(self, graph: _pb.graph.Graph, key: int | None = None) -> KernelSpec:
        try:
            fallback = build_module(graph, self.device)
        except FuseportError:
            raise
        except Exception as e:  # a graph that passed validation but fx rejects
            raise InvalidGraph(f"graph cannot be built: {e}") from e
        return KernelSpec(
            key=key_for(graph) if key is None else key,
            graph=graph,
            signature=signature_of(graph),
            ops=tuple(graph_summary(graph)),
            fallback=fallback,
        )

    def _persist(self, key: int, graph: _pb.graph.Graph) -> None:
        """Temp file, fsync, rename, fsync the directory: a kill -9 after
        Register returns loses nothing, and a crash mid-write leaves no half file."""
        data = graph.SerializeToString(deterministic=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".pb")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / _file_name(key))
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

