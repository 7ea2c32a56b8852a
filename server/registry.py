"""The registry: key -> kernel (its variants: one graph each), persisted in the store directory.

A kernel's key is the content key of the graph it was first registered with.
Its variants are captures of the same function for other stacks (another
rank, dtype, size range or static value); the first variant whose inputs and
conditions accept a stack runs it. Variants are only ever added: one never
replaces one registered before it.

On disk, one file per graph, each written with fsync and rename: the kernel's
own graph is ``<key>.pb``, each further variant ``<key>+<variant key>.pb``
(keys as 16 unsigned hex digits). A kernel's alias is the name of an empty file,
``<key>=<alias>.alias``, so that start still reads only the directory. A
``.tmp-*`` file is what a crash left mid-write: it is removed at start.

Start reads only the directory (an index of names and sizes), so start time and
memory do not grow with the store: a kernel's graphs are read and built on its
first use. List reads each graph not yet in use without building it, and keeps
nothing. Quotas, each refused with RESOURCE_EXHAUSTED naming its flag before
anything is built or written: the largest graph, the store's bytes, and its
kernels (variants count towards the bytes only). A filesystem that is full (or
a quota or file size limit reached) is RESOURCE_EXHAUSTED too, naming the
directory: the write leaves no file and the index is changed only after it, so
the same Register succeeds once there is room.

A store shared by several serving processes (`fuseport serve --processes N`,
``shared=True``) is the one truth; each process's index is a cache of it. A key
this process does not know is looked up on disk before it is NOT_FOUND (another
process registered it); a built kernel is checked against its file on every
lookup (one stat): gone means another process unregistered it, another inode
means it was unregistered and registered again (its variants may differ), and
either way this process drops what it built. A variant another process added
is picked up when a stack matches none of the variants known here (`refresh`).
List and Register rescan the directory first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fuseport.server._files import is_disk_full, write_atomically
from fuseport.server.checks import Planner, with_data_checks
from fuseport.server.intake import Intake, refuse_if_only_fails, serialized
from fuseport.wire import _pb, ops
from fuseport.wire.codec import Buffer
from fuseport.wire.errors import (
    FuseportError,
    InvalidAlias,
    InvalidGraph,
    KernelNotFound,
    KeyMismatch,
    ResourceExhausted,
)
from fuseport.wire.graph import Signature, build_module, graph_summary, signature_of
from fuseport.wire.keys import ALIAS_PATTERN, check_alias, is_alias, key_for

__all__ = ["Kernel", "Quotas", "Registry", "Summary", "Variant"]

log = logging.getLogger(__name__)

_BASE = re.compile(r"^([0-9a-f]{16})\.pb$")
_VARIANT = re.compile(r"^([0-9a-f]{16})\+([0-9a-f]{16})\.pb$")
_ALIAS_FILE = re.compile(rf"^([0-9a-f]{{16}})=({ALIAS_PATTERN})\.alias$")


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
    # The constants' data, when `graph` is a skeleton without it (server/intake.py):
    # the module's constants alias these bytes, so the graph's own copy need not stay.
    datas: Sequence[Buffer] | None = None

    def serialized(self) -> bytes:
        """The whole graph, serialised (what a compile worker builds from)."""
        return b"".join(serialized(self.graph, self.datas))


@dataclass(frozen=True)
class Summary:
    """What List shows of a stored graph, read without building it."""

    key: int
    graph: _pb.graph.Graph
    signature: Signature
    ops: tuple[str, ...]
    random_ops: tuple[str, ...]


@dataclass(frozen=True)
class Kernel:
    key: int
    variants: tuple[Variant, ...]  # in the order they are tried

    @property
    def arity(self) -> int:
        return len(self.variants[0].signature.inputs)


@dataclass(frozen=True)
class Quotas:
    max_variants: int = 64
    max_graph_bytes: int = 512 << 20
    max_store_bytes: int = 16 << 30
    max_store_kernels: int = 10_000


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

    def __init__(
        self,
        store_dir: Path,
        device: torch.device,
        quotas: Quotas = Quotas(),
        *,
        shared: bool = False,
        capacity: int | None = None,
    ) -> None:
        """`capacity`: the device's memory in bytes; a graph registered that needs
        more at every example size, or fails at every one, is refused (None: not planned at Register)."""
        self.dir = Path(store_dir)
        self.device = device
        self.capacity = capacity
        self.quotas = quotas
        self.shared = shared  # other processes write the same store (see the module's doc)
        # Called with a kernel this process dropped because another process removed it.
        self.on_removed: Callable[[Kernel], None] | None = None
        # Shared store: a built kernel's base file as it was when built, (inode, mtime).
        self._identity: dict[int, tuple[int, int]] = {}
        self._kernels: dict[int, Kernel] = {}  # built: in use since start, or registered since
        # Stored and not built yet: key -> its files, [(name, variant key)], its own first.
        self._stored: dict[int, list[tuple[str, int]]] = {}
        self._sizes: dict[str, int] = {}  # every file in the store -> its size
        # Kernel aliases, both ways; changed under the lock, each dict entry set whole.
        self._aliases: dict[str, int] = {}
        self._alias_of: dict[int, str] = {}
        self._lock = threading.Lock()  # writes, and the first build of a stored kernel
        self.dir.mkdir(parents=True, exist_ok=True)

    def load(self) -> int:
        """Indexes the store (names and sizes; nothing is read). Returns the number of kernels."""
        for path in self.dir.glob(".tmp-*"):
            log.warning("removing %s: a write that a crash interrupted", path.name)
            path.unlink(missing_ok=True)
        names = sorted(p.name for p in self.dir.iterdir())
        for name in names:
            if m := _BASE.match(name):
                key = _signed(m.group(1))
                self._stored[key] = [(name, key)]
                self._sizes[name] = (self.dir / name).stat().st_size
        for name in names:
            if not (m := _VARIANT.match(name)):
                continue
            key = _signed(m.group(1))
            if key not in self._stored:
                log.warning("skipping stored variant %s: its kernel %d is not in the store", name, key)
                continue
            self._stored[key].append((name, _signed(m.group(2))))
            self._sizes[name] = (self.dir / name).stat().st_size
        for name in names:
            if not (m := _ALIAS_FILE.match(name)):
                continue
            key, alias = _signed(m.group(1)), m.group(2)
            if key not in self._stored or key in self._alias_of or alias in self._aliases:
                log.warning("skipping alias file %s: no such kernel, or a second alias of it or for the name", name)
                continue
            self._aliases[alias], self._alias_of[key] = key, alias
        log.info("indexed %d kernels (%d bytes) in %s", len(self._stored), sum(self._sizes.values()), self.dir)
        return len(self._stored)

    def _built(self, key: int) -> Kernel | None:
        """The kernel, built now from the store if this is its first use; None if unknown."""
        kernel = self._kernels.get(key)
        if kernel is not None:
            return kernel if not self.shared else self._current(kernel)
        if key not in self._stored:
            # Built by another thread since the line above? It sets _kernels before it
            # takes the key out of _stored, so this second look cannot miss it.
            kernel = self._kernels.get(key)
            if kernel is not None or not self.shared or not self._index_key(key):
                return kernel
        with self._lock:
            files = self._stored.get(key)
            if files is None:  # built (or removed) while we waited
                return self._kernels.get(key)
            identity = self._stat(key) if self.shared else None
            variants = [v for name, vkey in files if (v := self._load(name, vkey)) is not None]
            if not variants or variants[0].key != key:
                del self._stored[key]  # its own graph is damaged: the kernel is not served
                return None
            kernel = Kernel(key, tuple(variants))
            self._kernels[key] = kernel
            if identity is not None:
                self._identity[key] = identity
            del self._stored[key]
        log.info("built kernel %d from the store (%d variants)", key, len(variants))
        return kernel

    # ------------------------------------------------------------------ shared store

    def _stat(self, key: int) -> tuple[int, int] | None:
        try:
            st = os.stat(self.dir / f"{_hex(key)}.pb")
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def _current(self, kernel: Kernel) -> Kernel | None:
        """`kernel` if its file is still the one it was built from; else what the store holds now."""
        identity = self._stat(kernel.key)
        if identity is not None and identity == self._identity.get(kernel.key):
            return kernel
        self._drop(kernel.key)
        if identity is None:
            log.info("kernel %d was unregistered by another process", kernel.key)
            return None
        log.info("kernel %d was registered again by another process: rebuilding it", kernel.key)
        return self._built(kernel.key)

    def _drop(self, key: int) -> None:
        with self._lock:
            kernel = self._kernels.pop(key, None)
            self._identity.pop(key, None)
            self._stored.pop(key, None)
            for name in [n for n in self._sizes if n.startswith(_hex(key))]:
                del self._sizes[name]
        if kernel is not None and self.on_removed is not None:
            self.on_removed(kernel)

    def _files_of(self, key: int, names: Iterable[str]) -> list[tuple[str, int]]:
        """The stored files of `key` among `names`: its own graph first, then its variants by name."""
        out = [(f"{_hex(key)}.pb", key)]
        for name in sorted(names):
            m = _VARIANT.match(name)
            if m and m.group(1) == _hex(key):
                out.append((name, _signed(m.group(2))))
        return out

    def _index_key(self, key: int) -> bool:
        """Indexes `key` from the store if another process registered it; True if it is there."""
        if self._stat(key) is None:
            return False
        names = [p.name for p in self.dir.glob(f"{_hex(key)}*.pb")]
        with self._lock:
            if key in self._kernels or key in self._stored:
                return True
            self._stored[key] = files = self._files_of(key, names)
            for name, _ in files:
                with contextlib.suppress(FileNotFoundError):
                    self._sizes[name] = (self.dir / name).stat().st_size
        return True

    def refresh(self, key: int) -> Kernel | None:
        """A shared store: the kernel with the variants other processes added since it was built
        (a stack that none of this process's variants covers asks). Otherwise, the kernel as is."""
        kernel = self._built(key)
        if kernel is None or not self.shared:
            return kernel
        known = {v.key for v in kernel.variants}
        names = [p.name for p in self.dir.glob(f"{_hex(key)}+*.pb")]
        new = [(name, vkey) for name, vkey in self._files_of(key, names)[1:] if vkey not in known]
        if not new:
            return kernel
        added = [v for name, vkey in new if (v := self._load(name, vkey)) is not None]
        with self._lock:
            kernel = self._kernels.get(key)
            if kernel is None:
                return None
            have = {v.key for v in kernel.variants}
            kernel = Kernel(key, (*kernel.variants, *(v for v in added if v.key not in have)))
            self._kernels[key] = kernel
            for name, _ in new:
                with contextlib.suppress(FileNotFoundError):
                    self._sizes[name] = (self.dir / name).stat().st_size
        log.info("kernel %d: %d variants added by another process", key, len(added))
        return kernel

    def sync(self) -> None:
        """A shared store: the index made to match the directory (kernels others registered or removed)."""
        if not self.shared:
            return
        names = {n for n in os.listdir(self.dir) if not n.startswith(".")}
        gone = [k for k in list(self._kernels) if f"{_hex(k)}.pb" not in names]
        for key in gone:
            self._drop(key)
        with self._lock:
            for key in [k for k in self._stored if f"{_hex(k)}.pb" not in names]:
                del self._stored[key]
            for name in [n for n in self._sizes if n not in names]:
                del self._sizes[name]
            for name in names:
                m = _BASE.match(name)
                if m is None:
                    continue
                key = _signed(m.group(1))
                if key in self._kernels or key in self._stored:
                    continue
                self._stored[key] = files = self._files_of(key, names)
                for fname, _ in files:
                    with contextlib.suppress(FileNotFoundError):
                        self._sizes[fname] = (self.dir / fname).stat().st_size

    def _read(self, name: str) -> _pb.graph.Graph:
        return _pb.graph.Graph.FromString((self.dir / name).read_bytes())

    def _load(self, name: str, expected: int) -> Variant | None:
        try:
            graph = self._read(name)
            intake = Intake.of(graph)  # no copies of its constants but the module's (server/intake.py)
            variant = self._build(graph, intake.key, intake)
            del graph, intake  # the file's parsed message: the module keeps what it needs
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the server
            log.warning("skipping stored graph %s: %s", name, e)
            return None
        if variant.key != expected:
            log.warning("skipping stored graph %s: its graph hashes to key %d", name, variant.key)
            return None
        return variant

    def register(
        self,
        graph: _pb.graph.Graph,
        variant_of: int | None = None,
        alias: str | None = None,
        datas: Sequence[Buffer] | None = None,
    ) -> tuple[int, bool, int]:
        """Returns (kernel key, created, the graph's own key). Registering again does no work.

        `datas`: the constants' data, one per constant, when `graph` carries none
        (codec.decode_register_request: views of the request, which the built module's
        constants then alias, so the graph costs no copy of them).

        `alias` names the kernel besides its key (InvalidAlias when malformed, when it
        names another kernel, or when the kernel has another one): checked before
        anything is built or written, and stored once the graph is."""
        if alias is not None:
            check_alias(alias)
        intake = Intake.of(graph, datas)  # the key and size without copying the constants (server/intake.py)
        if alias is not None:
            self._check_alias(variant_of if variant_of is not None else intake.key, alias)
        key, created, vkey = self._register(graph, variant_of, intake)
        if alias is not None and self._alias_of.get(key) != alias:
            with self._lock:
                self._check_alias(key, alias)  # again: taken while we registered?
                if not self.has(key):  # unregistered meanwhile: no alias file for a kernel that is gone
                    raise KernelNotFound(f"kernel {key} was unregistered while its alias was being set", key)
                with self._room(f"the alias file of kernel {key} (its graph is stored)"):
                    _touch(self.dir, f"{_hex(key)}={alias}.alias")
                self._aliases[alias], self._alias_of[key] = key, alias
            log.info("kernel %d has the alias %r", key, alias)
        return key, created, vkey

    def _check_alias(self, key: int, alias: str) -> None:
        owner = self._aliases.get(alias)
        if owner is not None and owner != key:
            raise InvalidAlias(f"alias {alias!r} names kernel {owner}; unregister it first or choose another")
        current = self._alias_of.get(key)
        if current is not None and current != alias:
            raise InvalidAlias(f"kernel {key} has the alias {current!r}; a kernel has one alias")

    def set_batching(self, key: int, enabled: bool) -> bool:
        """Stores whether kernel `key`'s calls may be batched (an empty marker file,
        ``<key>.nobatch``, while they may not: a restart and every process sharing
        the store read it). Returns whether that changed anything."""
        marker = self.dir / f"{_hex(key)}.nobatch"
        if enabled == (not marker.exists()):
            return False
        with self._lock:
            if not self.has(key):
                raise KernelNotFound(f"kernel {key} was unregistered while its batching was being set", key)
            if enabled:
                marker.unlink(missing_ok=True)
                _fsync_dir(self.dir)
            else:
                with self._room(f"the batching marker of kernel {key}"):
                    _touch(self.dir, marker.name)
        log.info("kernel %d: batching %s", key, "allowed" if enabled else "off (registered with batching=False)")
        return True

    def batching_enabled(self, key: int) -> bool:
        """False when kernel `key` was registered with batching=False (read from the store:
        asked once per proof, not per call)."""
        return not (self.dir / f"{_hex(key)}.nobatch").exists()

    def alias_of(self, key: int) -> str | None:
        return self._alias_of.get(key)

    def resolve(self, alias: str) -> int | None:
        """The key an alias names, or None. In a shared store, an alias this process
        has not seen is looked for among the store's alias files (another serving
        process may have registered it: each client connection goes to one process)."""
        key = self._aliases.get(alias)
        if not self.shared or not is_alias(alias):
            return key
        if key is not None:
            if (self.dir / f"{_hex(key)}={alias}.alias").exists():
                return key
            with self._lock:  # unregistered elsewhere (and maybe given to another kernel)
                if self._aliases.get(alias) == key:
                    del self._aliases[alias]
                    self._alias_of.pop(key, None)
        suffix = f"={alias}.alias"
        for name in os.listdir(self.dir):
            if name.endswith(suffix) and (m := _ALIAS_FILE.match(name)) and m.group(2) == alias:
                found = _signed(m.group(1))
                if not self.knows(found):
                    return None
                with self._lock:
                    if alias not in self._aliases and found not in self._alias_of:
                        self._aliases[alias], self._alias_of[found] = found, alias
                return self._aliases.get(alias)
        return None

    def _register(
        self, graph: _pb.graph.Graph, variant_of: int | None, intake: Intake
    ) -> tuple[int, bool, int]:
        size = intake.size
        if size > self.quotas.max_graph_bytes:
            raise ResourceExhausted(
                f"the graph is {size} bytes (constants included); this server takes graphs of at most "
                f"{self.quotas.max_graph_bytes} bytes (--max-graph-bytes)"
            )
        vkey = intake.key
        key = vkey if variant_of is None else variant_of
        self.sync()  # a shared store: quotas count what every process registered
        kernel = self._built(key)
        if kernel is not None and any(v.key == vkey for v in kernel.variants):
            return key, False, vkey
        if variant_of is not None and kernel is None:
            raise KernelNotFound(f"no kernel with key {key} to add a variant to; register it first", key)
        self._check_quotas(kernel is None, size)
        variant = self._shared(vkey)
        if variant is None:
            variant = self._build(graph, vkey, intake)
            if self.capacity is not None:
                # Once, at Register (a stored graph was checked when it was registered).
                refuse_if_only_fails(variant.planner, variant.signature, self.capacity, self.device)
        with self._lock:
            kernel = self._kernels.get(key)  # again: registered while we waited for the lock?
            if kernel is not None and any(v.key == vkey for v in kernel.variants):
                return key, False, vkey
            self._check_quotas(kernel is None, size)
            if kernel is None:
                self._persist(f"{_hex(key)}.pb", intake)
                self._kernels[key] = Kernel(key, (variant,))
                if self.shared and (identity := self._stat(key)) is not None:
                    self._identity[key] = identity
            else:
                self._check_variant(kernel, variant)
                self._persist(f"{_hex(key)}+{_hex(vkey)}.pb", intake)
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

    def adopt(self, key: int, graphs: Sequence[_pb.graph.Graph], alias: str | None = None) -> int:
        """Registers the graphs a call carries for kernel `key` (see ExecuteRequest.graphs):
        the first must hash to `key` (KeyMismatch otherwise), the others are added as its
        variants, each exactly as Register would. Refused before anything is hashed or
        built when there are more graphs than a kernel may have variants or one is over
        --max-graph-bytes. `alias` is registered with the first graph, as Register
        would. Returns how many graphs were new here."""
        if len(graphs) > self.quotas.max_variants:
            raise ResourceExhausted(
                f"the call carries {len(graphs)} graphs for kernel {key}; a kernel has at most "
                f"{self.quotas.max_variants} variants here (--max-variants)"
            )
        for i, graph in enumerate(graphs):
            size = graph.ByteSize()
            if size > self.quotas.max_graph_bytes:
                raise ResourceExhausted(
                    f"graphs[{i}] is {size} bytes (constants included); this server takes graphs of at most "
                    f"{self.quotas.max_graph_bytes} bytes (--max-graph-bytes)"
                )
        own = key_for(graphs[0])
        if own != key:
            raise KeyMismatch(
                f"graphs[0] hashes to key {own}, not {key}: the first graph a call carries must be "
                "the kernel's own graph, whose content key is the key called"
            )
        created = 0
        for i, graph in enumerate(graphs):
            try:
                created += self.register(graph, None if i == 0 else key, alias if i == 0 else None)[1]
            except FuseportError as e:
                raise type(e)(f"graphs[{i}]: {e}") from None
        return created

    def _check_quotas(self, new_kernel: bool, size: int) -> None:
        count = len(self._kernels) + len(self._stored)
        if new_kernel and count >= self.quotas.max_store_kernels:
            raise ResourceExhausted(
                f"the store holds {count} kernels, the most this server keeps (--max-store-kernels); "
                "unregister some first"
            )
        used = sum(self._sizes.values())
        if used + size > self.quotas.max_store_bytes:
            raise ResourceExhausted(
                f"the store holds {used} bytes and this graph is {size}: over the {self.quotas.max_store_bytes} "
                "bytes this server keeps (--max-store-bytes); unregister some first"
            )

    def _check_variant(self, kernel: Kernel, variant: Variant) -> None:
        n = len(variant.signature.inputs)
        if n != kernel.arity:
            raise InvalidGraph(
                f"a variant of kernel {kernel.key} must take its {kernel.arity} inputs, this graph takes {n}"
            )
        if len(kernel.variants) >= self.quotas.max_variants:
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

    def has(self, key: int) -> bool:
        """Whether the key is registered (built or stored), without building it."""
        # _stored first: a build sets _kernels before it takes the key out of _stored.
        return key in self._stored or key in self._kernels

    def knows(self, key: int) -> bool:
        """`has`, and in a shared store also a key another process registered since (one stat)."""
        return self.has(key) or (self.shared and self._index_key(key))

    def peek(self, key: int) -> Kernel | None:
        """The kernel if it is built already; None otherwise (building reads the
        store: the caller on the event loop hands the call to a worker instead)."""
        kernel = self._kernels.get(key)
        if kernel is None or not self.shared:
            return kernel
        # A shared store: still the file it was built from? (A stat; a change means rebuilding.)
        identity = self._stat(key)
        return kernel if identity is not None and identity == self._identity.get(key) else None

    def get(self, key: int) -> Kernel:
        kernel = self._built(key)
        if kernel is None:
            raise KernelNotFound(f"no kernel with key {key}; register it first", key)
        return kernel

    def remove(self, key: int) -> Kernel | None:
        """Removes the kernel; returns it (as built, or as a Kernel of no variants if it was
        never used), or None if there was none."""
        if self.shared:
            self._index_key(key)  # registered by another process: removed here all the same
        with self._lock:
            kernel = self._kernels.pop(key, None)
            self._identity.pop(key, None)
            stored = self._stored.pop(key, None)
            alias = self._alias_of.pop(key, None)
            if alias is not None:
                self._aliases.pop(alias, None)
            if kernel is None and stored is not None:
                kernel = Kernel(key, ())
            paths = [self.dir / f"{_hex(key)}.pb", self.dir / f"{_hex(key)}.nobatch", *self.dir.glob(f"{_hex(key)}+*.pb"), *self.dir.glob(f"{_hex(key)}=*.alias")]
            removed = False
            for path in paths:
                self._sizes.pop(path.name, None)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed = True
            if removed:
                _fsync_dir(self.dir)
        return kernel

    def kernels(self) -> list[tuple[int, tuple[Variant | Summary, ...]]]:
        """Every kernel, by key, with its graphs: as built, or for a kernel not used since
        start, summaries of its stored graphs (read now and kept by nobody)."""
        self.sync()
        out = [(k.key, k.variants) for k in list(self._kernels.values())]
        for key, files in list(self._stored.items()):
            try:
                out.append((key, tuple(self._summary(self._read(name), vkey) for name, vkey in files)))
            except Exception as e:  # noqa: BLE001 - a damaged file is reported, and refused on use
                log.warning("listing kernel %d: %s", key, e)
        return sorted(out, key=lambda entry: entry[0])

    def counts(self) -> tuple[int, int]:
        """(kernels, variants), built or stored, without reading a file: for metrics."""
        built, stored = list(self._kernels.values()), list(self._stored.values())
        return len(built) + len(stored), sum(len(k.variants) for k in built) + sum(len(f) for f in stored)

    def variant_keys(self) -> Iterable[int]:
        built = {v.key for k in list(self._kernels.values()) for v in k.variants}
        return built | {vkey for files in list(self._stored.values()) for _, vkey in files}

    @staticmethod
    def _summary(graph: _pb.graph.Graph, key: int) -> Summary:
        ops_used = tuple(graph_summary(graph))
        return Summary(
            key=key,
            graph=graph,
            signature=signature_of(graph),
            ops=ops_used,
            random_ops=tuple(op for op in ops_used if op in ops.RANDOM_OPS),
        )

    def build_variant(self, graph: _pb.graph.Graph) -> Variant:
        """A graph built as a variant on this registry's device, neither stored nor
        registered: the server's own derived graphs (a batched kernel, server/batching.py)."""
        return self._build(graph)

    def _build(self, graph: _pb.graph.Graph, key: int | None = None, intake: Intake | None = None) -> Variant:
        datas = None if intake is None else intake.datas
        try:
            signature = signature_of(graph)
            module = build_module(graph, self.device, datas)
            fallback = with_data_checks(module)
        except FuseportError:
            raise
        except Exception as e:  # a graph that passed validation but fx rejects
            raise InvalidGraph(f"graph cannot be built: {e}") from e
        summary = tuple(graph_summary(graph))
        floats = [i for i, s in enumerate(signature.inputs) if s.kind == "float"]
        return Variant(
            key=key_for(graph) if key is None else key,
            graph=graph if intake is None else intake.skeleton(),
            datas=datas,
            signature=signature,
            ops=summary,
            module=module,
            fallback=fallback,
            planner=Planner(module, floats, self.device),
            random_ops=tuple(op for op in summary if op in ops.RANDOM_OPS),
        )

    def _persist(self, name: str, intake: Intake) -> None:
        """Temp file, fsync, rename, fsync the directory: a kill -9 after
        Register returns loses nothing, and a crash mid-write leaves no half file.
        The caller records the kernel only after this returns. Written in pieces,
        the constants from the bytes the module holds: no serialised copy."""
        with self._room(f"a graph of {intake.size} bytes"):
            write_atomically(self.dir / name, intake.serialized())
        self._sizes[name] = (self.dir / name).stat().st_size
        _fsync_dir(self.dir)

    @contextlib.contextmanager
    def _room(self, what: str) -> Iterator[None]:
        """A write that finds no room (a full filesystem, a quota, a file size
        limit) is the operator's to fix, not a server fault: RESOURCE_EXHAUSTED
        naming the directory, not INTERNAL. write_atomically has removed its
        temporary file, and nothing in memory was changed yet."""
        try:
            yield
        except OSError as e:
            if not is_disk_full(e):
                raise
            log.warning("store %s has no room for %s: %s", self.dir, what, e)
            raise ResourceExhausted(
                f"the store directory {self.dir} has no room for {what} ({e.strerror}): free space there "
                "(or raise its quota or the server's file size limit), or serve with another --store-dir; "
                "the same call succeeds once there is room"
            ) from e


def _touch(directory: Path, name: str) -> None:
    """An empty file whose name is what it records, durable like a graph: creating
    it is atomic (it exists or not), so it needs no rename."""
    fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.fsync(fd)
    except BaseException:
        # Not durable: no file, or a restart would find an alias that Register refused.
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(directory / name)
        raise
    os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
