"""Kernel namespaces: a `user` token's kernels, aliases and variants are its own; an admin's are shared.

The model. Every kernel lives in one namespace: the shared one (what an admin
registers, and everything on a server without tokens) or the namespace of the
`user` token that registered it. A caller sees its own namespace over the shared
one: a key or alias is looked up in its own first, then in the shared one. So a
user lists, describes, runs, adds variants to and unregisters its own kernels;
it lists, describes and runs shared kernels, but only an admin adds variants to
them or unregisters them (PERMISSION_DENIED); another user's kernels it cannot
reach at all (NOT_FOUND, the same answer as for a key nobody registered).

Keys stay content keys, the same on every replica: two tenants that register the
same graph get the same key, each in its own namespace, each kernel with its own
variants. Variants are what differ between two kernels of one key, and a variant
is only ever added to a kernel of the caller's own namespace (or, by an admin, to
a shared one): one tenant's variant can never be chosen for another tenant's
call. What is shared across namespaces is only what the graph's content fixes:
the built module and compiled kernels of a graph (keyed by the graph's own
content key and ArgSpec), which compute the same thing whoever registered it.

On disk a tenant's namespace is a store of its own, ``<store>/tenants/<id>/``
(`id` a hash of the token's digest: neither the token nor its digest is on
disk), laid out and bounded like the shared store (--max-store-bytes and
--max-store-kernels apply to each namespace). It outlives the token: a token
removed from --auth-tokens leaves its kernels on disk, unreachable until the
same token is listed again.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path

from fuseport.server.registry import Registry

__all__ = ["Tenants", "tenant_dir"]


def tenant_dir(tenant: bytes) -> str:
    """The directory name of a tenant's namespace (from its token's digest)."""
    return hashlib.sha256(b"fuseport-tenant\0" + tenant).hexdigest()[:32]


class Tenants:
    """The shared namespace and each tenant's, made on first use."""

    def __init__(self, shared: Registry, make: Callable[[Path], Registry], *, shared_store: bool) -> None:
        """`make(directory)`: a registry (not yet loaded) for a tenant's namespace.
        `shared_store`: other serving processes may create a tenant's namespace too."""
        self.shared = shared
        self.root = shared.dir / "tenants"
        self._make = make
        self._shared_store = shared_store
        self._own: dict[bytes, Registry] = {}
        self._lock = threading.Lock()
        # The namespaces on disk at start (names only): one process alone makes every
        # one made since, so it needs no stat per call to know a tenant has none.
        self._on_disk = {p.name for p in self.root.iterdir()} if self.root.is_dir() else set()

    def own(self, tenant: bytes, create: bool = False) -> Registry | None:
        """The tenant's own namespace (the shared one for b""): None when it has
        none yet and `create` is False."""
        if not tenant:
            return self.shared
        registry = self._own.get(tenant)
        if registry is not None:
            return registry
        name = tenant_dir(tenant)
        path = self.root / name
        if not create and name not in self._on_disk and (not self._shared_store or not path.is_dir()):
            return None
        with self._lock:
            registry = self._own.get(tenant)
            if registry is None:
                registry = self._make(path)
                registry.load()
                self._own[tenant] = registry
        return registry

    def find(self, tenant: bytes, key: int) -> Registry:
        """The namespace that serves `key` to `tenant`: its own if it has the key, else the shared one."""
        if tenant:
            own = self.own(tenant)
            if own is not None and own.knows(key):
                return own
        return self.shared

    def resolve(self, tenant: bytes, alias: str) -> tuple[Registry, int] | None:
        """The namespace and key an alias names for `tenant` (its own first)."""
        for registry in (self.own(tenant), self.shared) if tenant else (self.shared,):
            if registry is not None and (key := registry.resolve(alias)) is not None:
                return registry, key
        return None

    def visible(self, tenant: bytes) -> list[Registry]:
        """The namespaces `tenant` sees, its own first."""
        own = self.own(tenant) if tenant else None
        return [self.shared] if own is None else [own, self.shared]

    def all(self) -> list[Registry]:
        return [self.shared, *list(self._own.values())]
