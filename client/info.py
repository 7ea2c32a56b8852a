"""KernelInfo: what Describe and List say of a kernel, readable as text and field by field."""

from __future__ import annotations

from typing import Any

from fuseport.wire import _pb

__all__ = ["KernelInfo"]


class KernelInfo:
    """One kernel as the server describes it.

    Every field of the `fuseport.v1.KernelInfo` message reads as an attribute
    (`info.key`, `info.arg_specs`, `info.fused_runs`, ...; service.proto says
    what each means); `proto` is the message itself. `str(info)` is the
    summary `fuseport describe` prints: signature, ops, variants, and each
    ArgSpec with its compile state (and generated source, when asked for).

    `process`: the serving process that answered, as `ExecuteResult.process`
    says it ("" from a server of one process). Run counts, overruns, compile
    states and batching verdicts are that process's own: under `--processes`
    (the default on a GPU) each process counts the calls it served.
    """

    __slots__ = ("proto", "process")

    def __init__(self, proto: _pb.service.KernelInfo, process: str = "") -> None:
        self.proto = proto
        self.process = process

    def __getattr__(self, name: str) -> Any:
        return getattr(self.proto, name)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, KernelInfo):
            return self.proto == other.proto
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, as the message is

    def __repr__(self) -> str:
        return f"KernelInfo(key={self.proto.key}, signature={self.signature!r})"

    @property
    def signature(self) -> str:
        """The kernel's inputs and outputs, e.g. `(x: float32[?,8], alpha: float) -> 1 output(s)`."""
        return signature(self.proto.inputs, self.proto.num_outputs)

    def summary(self) -> str:
        """One line: key, signature, size, runs and alias (what `fuseport list` prints)."""
        p = self.proto
        alias = f"  alias={p.alias}" if p.alias else ""
        return f"{p.key:>20}  {self.signature}  nodes={p.num_nodes} fused={p.fused_runs} fallback={p.fallback_runs}{alias}"

    def __str__(self) -> str:
        p = self.proto
        lines = [f"key:       {p.key}"]
        if p.alias:
            lines.append(f"alias:     {p.alias} (its KServe v2 model name)")
        lines += [f"device:    {p.device}", f"signature: {self.signature}", f"ops:       {', '.join(p.ops)}"]
        if p.random_ops:
            lines.append(f"random:    {', '.join(p.random_ops)} (fused and fallback draw different numbers)")
        own = f" (serving process {self.process}'s own: each process counts its calls)" if self.process else ""
        lines.append(f"runs:      fused={p.fused_runs} fallback={p.fallback_runs}{own}")
        if p.overruns:
            lines.append(
                f"overruns:  {p.overruns} (calls answered at their deadline or --max-call-seconds while the kernel ran on)"
            )
        for v in p.variants:
            own = " (the kernel's own graph)" if v.variant == p.key else ""
            lines.append(f"\nvariant {v.variant}{own}: {signature(v.inputs, p.num_outputs)}")
            lines.append(f"  conditions: {'; '.join(v.conditions) if v.conditions else 'none'}")
            for a in (a for a in p.arg_specs if a.variant == v.variant):
                state = _pb.service.CompileState.Name(a.state).removeprefix("COMPILE_STATE_").lower()
                lines.append(
                    f"  ArgSpec [{a.arg_spec}]: {state}, compiled in {a.compile_seconds:.2f} s, "
                    f"fused={a.fused_runs} fallback={a.fallback_runs}"
                )
                if a.compiled_by:
                    cached = " (loaded from the artifact cache)" if a.from_cache else ""
                    lines.append(f"    compiled by: {a.compiled_by}{cached}")
                if a.error:
                    lines.append(f"    error: {a.error}")
                if a.source:
                    lines += ["    ---- generated source ----", a.source]
            lines += self._batching(v.variant)
        if p.batching_off:
            lines.append(f"\nbatching:  off: {p.batching_off}")
        return "\n".join(lines)

    def _batching(self, variant: int) -> list[str]:
        """A variant's batching verdicts (per call sizes), with the batched graphs' ArgSpecs."""
        p, lines = self.proto, []
        for b in (b for b in p.batching if b.variant == variant):
            if not b.batchable:
                lines.append(f"  batching at [{b.sizes}]: not batched: {b.reason}")
                continue
            how = "one batched graph for every batch size" if b.dynamic else "batches padded to powers of two"
            lines.append(
                f"  batching at [{b.sizes}]: batchable ({how}; batched graph {', '.join(map(str, b.batched_variants))})"
            )
            for a in (a for a in p.arg_specs if a.variant in b.batched_variants):
                state = _pb.service.CompileState.Name(a.state).removeprefix("COMPILE_STATE_").lower()
                error = f", error: {a.error}" if a.error else ""
                lines.append(
                    f"    batched ArgSpec [{a.arg_spec}]: {state}, launches fused={a.fused_runs} "
                    f"fallback={a.fallback_runs}{error}"
                )
        return lines


def signature(inputs: Any, num_outputs: int) -> str:
    """`(name: dtype[shape], ...) -> N output(s)` for a kernel's (or a variant's) inputs."""
    parts = []
    for i in inputs:
        kind = _pb.graph.InputKind.Name(i.kind).removeprefix("INPUT_KIND_").lower()
        if kind == "tensor":
            dtype = _pb.values.DType.Name(i.dtype).removeprefix("DTYPE_").lower()
            shape = ",".join("?" if d < 0 else str(d) for d in i.shape)
            parts.append(f"{i.name}: {dtype}[{shape}]")
        else:
            parts.append(f"{i.name}: {kind}{' (static)' if i.static else ''}")
    return f"({', '.join(parts)}) -> {num_outputs} output(s)"
