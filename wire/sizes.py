"""Size conditions (Graph.conditions): validate them, evaluate them on a stack, show them to people.

A condition is a `SizeExpr` tree over the sizes of tensor inputs and the
values of int inputs (see graph.proto). Capture writes them from what
torch.export proved; the server evaluates every one on every stack before it
runs the graph, so a stack outside them is refused instead of being computed
by a graph that may not apply to it.

Everything here trusts nothing in the message: node counts, depth, references
and arities are checked when the graph is registered, and evaluation stops any
intermediate value beyond 2**128 (nested products could otherwise build
integers of gigabytes), which counts as the condition failing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

from fuseport.wire import _pb
from fuseport.wire.errors import InvalidGraph

__all__ = ["MAX_SIZE_NODES", "Condition", "SizeOverflow", "compile_conditions", "render"]

# All conditions of one graph together; export's guards for real models number
# in the tens, each a handful of nodes.
MAX_SIZE_NODES = 4096
_MAX_DEPTH = 32
_LIMIT = 1 << 128

_Op = _pb.graph.SizeOpKind
Evaluator = Callable[[Sequence[Any]], int]


class SizeOverflow(ArithmeticError):
    """An intermediate value left the range evaluation allows (or a zero divisor)."""


@dataclass(frozen=True)
class Condition:
    """One compiled condition: `holds(args)` on the graph's inputs (tensors and
    Python numbers, in Graph.inputs order, already checked for kind and rank)."""

    text: str
    expr: _pb.graph.SizeExpr
    evaluate: Evaluator

    def holds(self, args: Sequence[Any]) -> bool:
        try:
            return self.evaluate(args) != 0
        except SizeOverflow:
            return False

    def values(self, args: Sequence[Any], names: Sequence[str]) -> str:
        """What the condition reads from these args: ``x.shape[0] = 2, n = 5``."""
        seen: dict[str, Any] = {}
        todo = [self.expr]
        while todo:
            e = todo.pop(0)
            kind = e.WhichOneof("kind")
            if kind == "dim":
                seen.setdefault(f"{_name(names, e.dim.input)}.shape[{e.dim.dim}]", args[e.dim.input].shape[e.dim.dim])
            elif kind == "scalar":
                seen.setdefault(_name(names, e.scalar), args[e.scalar])
            elif kind == "op":
                todo.extend(e.op.args)
        return ", ".join(f"{k} = {v}" for k, v in seen.items())


def _bounded(v: int) -> int:
    if -_LIMIT < v < _LIMIT:
        return v
    raise SizeOverflow("size arithmetic out of range")


def _floordiv(a: int, b: int) -> int:
    if b == 0:
        raise SizeOverflow("division by zero")
    return a // b


def _mod(a: int, b: int) -> int:
    if b == 0:
        raise SizeOverflow("modulo by zero")
    return a % b


# kind -> (arity: exact n, or -2 for "at least 2"; how to combine the values)
_NARY = -2
_OPS: dict[int, tuple[int, Callable[[list[int]], int]]] = {
    _Op.SIZE_OP_ADD: (_NARY, lambda v: _bounded(sum(v))),
    _Op.SIZE_OP_MUL: (_NARY, lambda v: reduce(lambda a, b: _bounded(a * b), v)),
    _Op.SIZE_OP_FLOORDIV: (2, lambda v: _floordiv(v[0], v[1])),
    _Op.SIZE_OP_MOD: (2, lambda v: _mod(v[0], v[1])),
    _Op.SIZE_OP_MIN: (_NARY, min),
    _Op.SIZE_OP_MAX: (_NARY, max),
    _Op.SIZE_OP_EQ: (2, lambda v: int(v[0] == v[1])),
    _Op.SIZE_OP_NE: (2, lambda v: int(v[0] != v[1])),
    _Op.SIZE_OP_LT: (2, lambda v: int(v[0] < v[1])),
    _Op.SIZE_OP_LE: (2, lambda v: int(v[0] <= v[1])),
    _Op.SIZE_OP_AND: (_NARY, lambda v: int(all(v))),
    _Op.SIZE_OP_OR: (_NARY, lambda v: int(any(v))),
    _Op.SIZE_OP_NOT: (1, lambda v: int(not v[0])),
}


class _Compiler:
    def __init__(self, inputs: Sequence[_pb.graph.GraphInput]) -> None:
        self.inputs = inputs
        self.nodes = 0

    def compile(self, e: _pb.graph.SizeExpr, where: str, depth: int = 0) -> Evaluator:
        self.nodes += 1
        if self.nodes > MAX_SIZE_NODES:
            raise InvalidGraph(f"conditions: more than {MAX_SIZE_NODES} nodes in all")
        if depth > _MAX_DEPTH:
            raise InvalidGraph(f"{where}: nested over {_MAX_DEPTH} deep")
        kind = e.WhichOneof("kind")
        if kind == "int_value":
            value = e.int_value
            return lambda args: value
        if kind == "dim":
            i, d = e.dim.input, e.dim.dim
            if i >= len(self.inputs) or self.inputs[i].kind != _pb.graph.INPUT_KIND_TENSOR:
                raise InvalidGraph(f"{where}: dim reference to input {i}, which is not a tensor input")
            if d >= len(self.inputs[i].shape):
                raise InvalidGraph(f"{where}: dim {d} of input {i}, which has rank {len(self.inputs[i].shape)}")
            return lambda args: args[i].shape[d]
        if kind == "scalar":
            i = e.scalar
            if i >= len(self.inputs) or self.inputs[i].kind != _pb.graph.INPUT_KIND_INT:
                raise InvalidGraph(f"{where}: scalar reference to input {i}, which is not an int input")
            return lambda args: args[i]
        if kind == "op":
            spec = _OPS.get(e.op.kind)
            if spec is None:
                raise InvalidGraph(f"{where}: unknown size op {e.op.kind}")
            arity, combine = spec
            n = len(e.op.args)
            if (arity == _NARY and n < 2) or (arity != _NARY and n != arity):
                need = "at least 2" if arity == _NARY else str(arity)
                raise InvalidGraph(f"{where}: {_Op.Name(e.op.kind)} takes {need} arguments, got {n}")
            parts = [self.compile(a, f"{where}.args[{j}]", depth + 1) for j, a in enumerate(e.op.args)]
            return lambda args: combine([p(args) for p in parts])
        raise InvalidGraph(f"{where}: empty size expression")


def compile_conditions(graph: _pb.graph.Graph) -> tuple[Condition, ...]:
    """Validates and compiles a graph's conditions; raises InvalidGraph naming the bad one."""
    compiler = _Compiler(graph.inputs)
    names = [inp.name for inp in graph.inputs]
    out = []
    for j, expr in enumerate(graph.conditions):
        fn = compiler.compile(expr, f"conditions[{j}]")
        out.append(Condition(render(expr, names), expr, fn))
    return tuple(out)


# --------------------------------------------------------------------------- text

# Binding strength, for parentheses: comparisons < + < * // %.
_INFIX: dict[int, tuple[str, int]] = {
    _Op.SIZE_OP_OR: ("or", 1),
    _Op.SIZE_OP_AND: ("and", 2),
    _Op.SIZE_OP_EQ: ("==", 4),
    _Op.SIZE_OP_NE: ("!=", 4),
    _Op.SIZE_OP_LT: ("<", 4),
    _Op.SIZE_OP_LE: ("<=", 4),
    _Op.SIZE_OP_ADD: ("+", 5),
    _Op.SIZE_OP_MUL: ("*", 6),
    _Op.SIZE_OP_FLOORDIV: ("//", 6),
    _Op.SIZE_OP_MOD: ("%", 6),
}
# A comparison with the constant on the left reads better the other way round.
_FLIPPED = {"<": ">", "<=": ">="}


def render(e: _pb.graph.SizeExpr, names: Sequence[str]) -> str:
    """A condition as people write it: ``x.shape[0] >= 4``, ``y.shape[0] == x.shape[0] // 2``."""
    return _render(e, names)[0]


def _name(names: Sequence[str], i: int) -> str:
    return names[i] if i < len(names) and names[i] else f"input{i}"


def _render(e: _pb.graph.SizeExpr, names: Sequence[str]) -> tuple[str, int]:
    kind = e.WhichOneof("kind")
    if kind == "int_value":
        return str(e.int_value), 9 if e.int_value >= 0 else 7
    if kind == "dim":
        return f"{_name(names, e.dim.input)}.shape[{e.dim.dim}]", 9
    if kind == "scalar":
        return _name(names, e.scalar), 9
    if kind != "op":
        return "?", 9
    op, args = e.op.kind, list(e.op.args)
    parts = [_render(a, names) for a in args]
    if op == _Op.SIZE_OP_NOT and parts:
        return f"not {_wrap(parts[0], 3)}", 3
    if op in (_Op.SIZE_OP_MIN, _Op.SIZE_OP_MAX):
        fn = "min" if op == _Op.SIZE_OP_MIN else "max"
        return f"{fn}({', '.join(p for p, _ in parts)})", 9
    if op not in _INFIX or not parts:
        return "?", 9
    symbol, strength = _INFIX[op]
    if symbol in _FLIPPED and len(args) == 2 and args[0].WhichOneof("kind") == "int_value":
        if args[1].WhichOneof("kind") != "int_value":
            return f"{_wrap(parts[1], strength + 1)} {_FLIPPED[symbol]} {_wrap(parts[0], strength + 1)}", strength
    if op == _Op.SIZE_OP_ADD:
        # x + -1 reads as x - 1.
        text = _wrap(parts[0], strength)
        for a, p in zip(args[1:], parts[1:]):
            if a.WhichOneof("kind") == "int_value" and a.int_value < 0:
                text += f" - {-a.int_value}"
            else:
                text += f" + {_wrap(p, strength + 1)}"
        return text, strength
    if op == _Op.SIZE_OP_MUL and args[0].WhichOneof("kind") == "int_value" and args[0].int_value == -1:
        rest = " * ".join(_wrap(p, strength + 1) for p in parts[1:])
        return f"-{rest}" if len(parts) == 2 and parts[1][1] == 9 else f"-({rest})", 7
    # Comparisons do not chain; everything else is left-associative.
    right = strength + 1
    return f" {symbol} ".join([_wrap(parts[0], strength), *(_wrap(p, right) for p in parts[1:])]), strength


def _wrap(part: tuple[str, int], strength: int) -> str:
    text, own = part
    return f"({text})" if own < strength else text

