"""Kernel keys: the canonical bytes of a graph and the int64 key derived from them.

The key is part of the wire contract, so that a client in any language can
compute it. The rule:

1. Take a copy of the Graph message.
2. Rename every value in order of definition: graph input number i is
   ``"i<i>"`` (``i0``, ``i1``, ...; its ``GraphInput.name`` is set to that
   too); then, node by node and within a node in the order of
   ``Node.outputs``, every non-empty result name becomes ``"v<k>"``, k counting
   the non-empty names from 0 (``v0``, ``v1``, ...). ``""`` (an unused result)
   stays ``""`` and does not advance k. Every ``Argument.ref`` (in node
   arguments, keyword arguments, lists at any depth and ``Graph.outputs``) is
   replaced by the new name of the value it names; a ref must name a graph
   input or a result of an earlier node.
3. Sort each node's ``kwargs`` by name, comparing the UTF-8 bytes of the
   names (names are unique within a node).
4. Clear ``Tensor.alignment`` of every constant (filler that readers ignore)
   and replace every ``Device`` argument by an empty ``Device`` message
   (devices are rewritten to the executing device, so they carry no meaning).
5. Serialise with deterministic protobuf serialisation
   (``SerializeToString(deterministic=True)``): these are the canonical bytes.
6. key = the first 8 bytes of SHA-256(``b"fuseport.v1.Graph\\0"`` + canonical
   bytes), read as a little-endian signed 64-bit integer.

Graphs that differ only in value names, input names, keyword order, alignment
filler or devices share one key; any other difference (an op, a constant, a
shape pattern, a static value) gives another.
"""

from __future__ import annotations

import hashlib
import re

from fuseport.wire import _pb
from fuseport.wire.errors import InvalidAlias, InvalidGraph

__all__ = ["ALIAS_PATTERN", "KEY_DOMAIN", "canonical_bytes", "canonicalize", "check_alias", "is_alias", "key_for"]

# A kernel's alias (RegisterRequest.alias): a letter first, so that no alias reads
# as a key in decimal (both name a KServe model); a set that is safe in a file
# name, a URL path and a log line.
ALIAS_PATTERN = r"[A-Za-z][A-Za-z0-9_.\-]{0,63}"
_ALIAS = re.compile(ALIAS_PATTERN)


def is_alias(name: str) -> bool:
    """Whether `name` is a well-formed alias."""
    return _ALIAS.fullmatch(name) is not None


def check_alias(alias: str) -> str:
    """`alias` if it is well formed, else InvalidAlias (showing at most its start)."""
    if not is_alias(alias):
        shown = repr(alias[:40] + ("..." if len(alias) > 40 else ""))
        raise InvalidAlias(
            f"alias {shown} ({len(alias)} characters) is not 1 to 64 characters of a letter "
            "followed by letters, digits, '_', '.' or '-'"
        )
    return alias


# Prefixed to the canonical bytes so that a key can never equal the hash of
# some other kind of message that happens to share the bytes.
KEY_DOMAIN = b"fuseport.v1.Graph\0"


def canonicalize(graph: _pb.graph.Graph) -> _pb.graph.Graph:
    """The canonical form of a graph (steps 1-4 of the rule); `graph` is not changed.

    Raises InvalidGraph for a ref to a value not yet defined, or a name defined twice.
    """
    out = _pb.graph.Graph()
    out.CopyFrom(graph)
    names: dict[str, str] = {}

    def define(old: str, new: str, where: str) -> None:
        if old in names:
            raise InvalidGraph(f"{where}: value {old!r} is defined twice")
        names[old] = new

    for i, inp in enumerate(out.inputs):
        if inp.name:
            define(inp.name, f"i{i}", f"inputs[{i}]")
        inp.name = f"i{i}"

    def rename(arg: _pb.graph.Argument, where: str) -> None:
        kind = arg.WhichOneof("kind")
        if kind == "ref":
            if arg.ref not in names:
                raise InvalidGraph(f"{where}: ref to undefined value {arg.ref!r}")
            arg.ref = names[arg.ref]
        elif kind == "list_value":
            for j, item in enumerate(arg.list_value.items):
                rename(item, f"{where}[{j}]")
        elif kind == "device":
            arg.device.Clear()

    k = 0
    for n, node in enumerate(out.nodes):
        where = f"nodes[{n}] ({node.op})"
        for j, arg in enumerate(node.args):
            rename(arg, f"{where} args[{j}]")
        for kw in node.kwargs:
            rename(kw.value, f"{where} kwarg {kw.name!r}")
        kwargs = sorted(node.kwargs, key=lambda kw: kw.name.encode())
        for a, b in zip(kwargs, kwargs[1:]):
            if a.name == b.name:
                raise InvalidGraph(f"{where}: keyword argument {a.name!r} given twice")
        # Copies first: clearing the repeated field invalidates references into it.
        sorted_kwargs = [_pb.graph.KeywordArgument(name=kw.name, value=kw.value) for kw in kwargs]
        del node.kwargs[:]
        node.kwargs.extend(sorted_kwargs)
        renamed = []
        for name in node.outputs:
            if name:
                define(name, f"v{k}", where)
                renamed.append(f"v{k}")
                k += 1
            else:
                renamed.append("")
        node.outputs[:] = renamed
    for j, arg in enumerate(out.outputs):
        rename(arg, f"outputs[{j}]")
    for c in out.constants:
        c.ClearField("alignment")
    return out


def canonical_bytes(graph: _pb.graph.Graph) -> bytes:
    """The canonical bytes of a graph (the rule in this module's docstring)."""
    return canonicalize(graph).SerializeToString(deterministic=True)


def key_for(graph: _pb.graph.Graph) -> int:
    """The int64 key of a graph: the same on every machine, in every process."""
    digest = hashlib.sha256(KEY_DOMAIN + canonical_bytes(graph)).digest()
    return int.from_bytes(digest[:8], "little", signed=True)
