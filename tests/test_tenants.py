"""Tenants see their own (issue 20): a `user` token's kernels, aliases, variants and handles are its own.

Keys are content keys, so two tenants that register the same graph get the same
key: each gets a kernel of its own under it, with its own variants, and one
tenant's variant is never chosen for another's call (server/tenants.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import torch

from fuseport.client import (
    Client,
    HandleNotFound,
    KernelNotFound,
    NoMatchingVariant,
    PermissionDenied,
)

from .conftest import ServerProcess, start_server

ADMIN, ALICE, BOB = (secrets.token_urlsafe(16) for _ in range(3))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("tenants")
    tokens = tmp / "tokens"
    tokens.write_text(f"{ADMIN} admin\n{ALICE} user\n{BOB} user\n")
    s = start_server(tmp, None, "--auth-tokens", str(tokens), "--compile-mode", "off")
    yield s
    s.stop()


def _as(server: ServerProcess, token: str) -> Client:
    # A fresh client per check: a client that registered a function captures a
    # variant by itself when no variant covers a stack, which would hide what the server chose.
    return Client(server.target, timeout=60, token=token)


def double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def triple(x: torch.Tensor) -> torch.Tensor:
    return x * 3


def minus_one(x: torch.Tensor) -> torch.Tensor:
    return x - 1


def test_one_tenants_variant_never_changes_another_tenants_results(server: ServerProcess) -> None:
    vector, square = torch.ones(4), torch.ones(2, 2)
    with _as(server, ADMIN) as admin:
        shared = admin.register(double, [vector])
    with _as(server, ALICE) as alice:
        own = alice.register(double, [vector])
        assert own == shared, "the same graph has the same content key in every namespace"
        # Alice's kernel under that key takes her variant: another function, for rank 2.
        assert alice.register(triple, [square], variant_of=own) == own
    with _as(server, ALICE) as alice:
        torch.testing.assert_close(alice.execute(own, [square])[0], square * 3)
        torch.testing.assert_close(alice.execute(own, [vector])[0], vector * 2)
        assert len(alice.describe(own).variants) == 2
    for token in (BOB, ADMIN):
        with _as(server, token) as other:
            # Alice's variant is not theirs: the shared kernel has one variant, for rank 1.
            with pytest.raises(NoMatchingVariant):
                other.execute(shared, [square])
            with pytest.raises(NoMatchingVariant):
                other.fallback(shared, [square])
            torch.testing.assert_close(other.execute(shared, [vector])[0], vector * 2)
            assert len(other.describe(shared).variants) == 1
    with _as(server, BOB) as bob:
        # Nor may Bob add one to the shared kernel: only an admin changes what everyone runs.
        with pytest.raises(PermissionDenied, match="shared"):
            bob.register(triple, [square], variant_of=shared)
        with pytest.raises(PermissionDenied, match="shared"):
            bob.unregister(shared)
    with _as(server, ADMIN) as admin:
        with pytest.raises(NoMatchingVariant):
            admin.execute(shared, [square])


def test_a_tenant_cannot_see_or_reach_anothers_kernels_aliases_or_handles(server: ServerProcess) -> None:
    x = torch.arange(4.0)
    with _as(server, ALICE) as alice:
        private = alice.register(minus_one, [x], alias="alices-kernel")
        torch.testing.assert_close(alice.execute(private, [x])[0], x - 1)
        listed = {k.key: k.alias for k in alice.list()}
        assert listed.get(private) == "alices-kernel"
        (handle,) = alice.execute(private, [x], keep=True)
        for token in (BOB, ADMIN):
            with _as(server, token) as other:
                assert private not in {k.key for k in other.list()}
                assert "alices-kernel" not in {k.alias for k in other.list()}
                with pytest.raises(KernelNotFound):
                    other.describe(private)
                with pytest.raises(KernelNotFound):
                    other.execute(private, [x])
                with pytest.raises(KernelNotFound):
                    other.fallback(private, [x])
                with pytest.raises(KernelNotFound):
                    other.register(double, [x], variant_of=private)
                assert other.unregister(private) is False
                with pytest.raises(HandleNotFound):
                    other.fetch([handle])
        # Bob registering the same graph under the same alias gets a kernel of his own ...
        with _as(server, BOB) as bob:
            assert bob.register(minus_one, [x], alias="alices-kernel") == private
            assert bob.unregister(private) is True
        # ... and removing his takes nothing from Alice.
        torch.testing.assert_close(alice.fetch([handle])[0], x - 1)
        torch.testing.assert_close(alice.execute(private, [x])[0], x - 1)
        assert {k.key: k.alias for k in alice.list()}.get(private) == "alices-kernel"
        assert alice.unregister(private) is True
        with pytest.raises(KernelNotFound):
            alice.execute(private, [x])
