"""Inductor's standalone artifacts in the serving process: compiled by the worker, loaded and called with no Dynamo.

The compile itself runs in the compile worker (worker.py drives it, build.py
is what it runs: Inductor compiles the graph traced at symbolic sizes and saves
an artifact with no guards). Here, `StandaloneCompiler` sends the worker its
jobs, keeps what it saved in the artifact cache, and `load` turns an
artifact's bytes back into a callable: Dynamo is never involved, on either side.

What Inductor assumed about sizes while it compiled travels back as size
conditions in the graph IR's own `SizeExpr` form; the serving process
evaluates them itself before every fused call (the same evaluator as a
graph's capture conditions), so a stack outside them never reaches the
kernel.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fuseport.server._files import is_disk_full
from fuseport.server.artifacts import ArtifactCache, ArtifactError, device_capability
from fuseport.server.compile.interface import Compiled, CompileFailed, Compiler, Job, LoadRefused, short_error
from fuseport.server.compile.torch_config import CACHE_TAG, prepare_inductor
from fuseport.server.compile.worker import CompileCrashed, CompileTimedOut, CompileWorker

if TYPE_CHECKING:
    from fuseport.server.devices import Placement

__all__ = ["StandaloneCompiler", "load"]

log = logging.getLogger(__name__)


def load(data: bytes, meta: dict[str, Any]) -> tuple[Callable[[Sequence[Any]], Sequence[Any]], Any]:
    """In the serving process: (call, conditions) for an artifact's checked bytes.
    `call(args)` takes the graph's inputs in order and returns its outputs."""
    import torch
    from torch._inductor import CompiledArtifact

    from fuseport.wire import _pb
    from fuseport.wire.sizes import compile_conditions

    takes = [int(i) for i in meta["takes"]]
    outputs = int(meta["outputs"])
    conditions = compile_conditions(_pb.graph.Graph.FromString(base64.b64decode(meta["conditions"])))
    # From the checked bytes, through a private file of our own: the file in
    # the cache could be replaced between the check and a load by name.
    fd, path = tempfile.mkstemp(suffix=".bin", prefix="fuseport-load-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        started = time.perf_counter()
        artifact = CompiledArtifact.load(path=path, format="binary")
        log.debug("artifact loaded in %.1f ms", (time.perf_counter() - started) * 1e3)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    del torch

    def call(args: Sequence[Any]) -> Sequence[Any]:
        results = artifact(*[args[i] for i in takes])
        if len(results) != outputs:
            raise RuntimeError(f"the artifact returned {len(results)} values where the graph has {outputs}")
        return results

    return call, conditions


class StandaloneCompiler(Compiler):
    """Compiles in the worker process into the artifact cache; loads from it."""

    name = "inductor standalone (compile worker)"

    def __init__(
        self,
        placement: Placement,
        mode: str,
        artifacts: ArtifactCache,
        timeout: float,
        budget: float = 0.0,
        threads: int = 1,
    ) -> None:
        """`budget`: --max-call-seconds, which bounds the worker's test runs at the caller's sizes;
        `threads`: Inductor's compile processes in the worker (--compile-threads)."""
        self.placement = placement
        self.mode = mode
        self.artifacts = artifacts
        self.budget = budget
        self._capability = device_capability(placement.device)
        self._worker = CompileWorker(timeout, threads)
        self._worker.start()

    def _name(self, job: Job) -> str:
        return self.artifacts.key(
            {
                "variant": job.variant.key,
                # Everything but the device's name: its capability stands for it.
                "inputs": [
                    item if isinstance(item, str) else [str(x) for x in item] for item in job.arg_spec.inputs
                ],
                # The device's capability, and its index: Inductor's CUDA code names it.
                "device": self._device_fields(),
                "mode": self.mode,
                # Which ops Inductor leaves to ATen, and our binding of its kernels.
                "kernels": CACHE_TAG,
            }
        )

    def _device_fields(self) -> list[Any]:
        return [self._capability, self.placement.device.index]

    def load(self, job: Job) -> Compiled | None:
        # The artifact's C++ kernels get their Python bindings here, at load: ours
        # (torch_config), the same as the worker compiled with.
        prepare_inductor()
        name = self._name(job)
        try:
            artifact = self.artifacts.load(name)
            if artifact is None:
                return None
            call, conditions = load(artifact.data, artifact.meta)
        except Exception as e:  # noqa: BLE001 - a bad artifact is compiled again, never fatal
            # A full disk (the loader's private copy in the temp directory) says
            # nothing against the artifact: it stays for when there is room.
            if not isinstance(e, ArtifactError) and not is_disk_full(e):
                self.artifacts.remove(name)
            raise LoadRefused(f"artifact {name} refused: {short_error(e)}") from e
        source = str(artifact.meta.get("source", ""))
        return Compiled(call, self.name, source, from_cache=True, conditions=conditions)

    def compile(self, job: Job, sample: list[Any], receive: Callable[[], None]) -> Compiled:
        import torch

        if self.mode == "reduce-overhead":
            # CUDA graphs are replayed by torch.compile's runtime; an artifact is called.
            raise CompileFailed("compile mode reduce-overhead (CUDA graphs)", retry_in_process=True)

        from fuseport.wire import dtypes

        inputs: list[dict[str, Any]] = []
        for value, item in zip(sample, job.arg_spec.inputs):
            if isinstance(value, torch.Tensor):
                inputs.append(
                    {
                        "kind": "tensor",
                        "dtype": dtypes.code_for(value.dtype),
                        "shape": list(value.shape),
                        "order": list(item[2]),
                    }
                )
            else:
                kind = "bool" if isinstance(value, bool) else "int" if isinstance(value, int) else "float"
                inputs.append({"kind": kind, "value": value})
        name = self._name(job)
        try:
            tmp = self.artifacts.temp_path()
        except OSError as e:
            # No room in the cache (not even for an empty file: inodes, a quota):
            # compiled in process, the kernel is served all the same, uncached.
            raise CompileFailed(f"the artifact cache cannot be written: {e}", retry_in_process=True) from e
        header = {
            "device": str(self.placement.device), "path": str(tmp), "mode": self.mode, "inputs": inputs,
            "budget": self.budget,
        }  # fmt: skip
        try:
            try:
                reply = self._worker.compile(header, job.variant.serialized())
            except (CompileCrashed, CompileTimedOut) as e:
                raise CompileFailed(str(e)) from e
            if reply.get("refused"):
                # The error stands on both paths: this ArgSpec runs unfused (and fails there).
                raise CompileFailed(f"the unfused graph refuses these inputs: {reply['refused']}")
            if not reply.get("ok"):
                error = str(reply.get("error", "unknown error"))[:300]
                raise CompileFailed(f"the compile worker cannot compile it: {error}", retry_in_process=True)
            meta = {
                "kernel": job.kernel,
                "variant": job.variant.key,
                "arg_spec": str(job.arg_spec),
                "device": self._device_fields(),
                **{k: reply[k] for k in ("takes", "outputs", "conditions", "source")},
            }
            data = tmp.read_bytes()
            try:
                self.artifacts.commit(name, tmp, meta)
            except OSError as e:
                # A full disk, most likely: the cache is only a cache. The artifact
                # is compiled and in memory, so it serves this process all the same;
                # other processes and a restart compile it again (commit left no file).
                log.warning("artifact %s for [%s] not cached, served from memory: %s", name, job.arg_spec, e)
            prepare_inductor()
            call, conditions = load(data, meta)
        finally:
            tmp.unlink(missing_ok=True)
        return Compiled(call, self.name, meta["source"], conditions=conditions)

    def warm_up(self) -> None:
        # A process's first load pays once for much (seconds on the CPU machine:
        # Inductor's imports, hashing torch's sources for its cache key, a compiler
        # version check in a subprocess): paid here, at start, by loading the most
        # recently used artifact, if there is one, so that a restarted server's
        # first call of a known ArgSpec loads in milliseconds.
        start = time.perf_counter()
        from torch._inductor import CompiledArtifact  # noqa: F401
        from torch._inductor.codecache import torch_key

        prepare_inductor()
        torch_key()
        entries = self.artifacts.entries()
        if entries:
            name = entries[-1][1]
            try:
                # Left in place if damaged: the call that needs it refuses it (and counts that).
                artifact = self.artifacts.load(name, remove_damaged=False)
                if artifact is not None and artifact.meta.get("device") == self._device_fields():
                    load(artifact.data, artifact.meta)
            except Exception as e:  # noqa: BLE001 - a bad artifact is refused when a call needs it
                log.debug("warm-up load of %s failed: %s", name, short_error(e))
        log.info("artifact loader ready in %.1f s", time.perf_counter() - start)

    def close(self) -> None:
        self._worker.stop()
