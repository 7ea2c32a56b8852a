"""Device-resident values: handles that later calls take with no transfer, and every way to misuse one."""

from __future__ import annotations

import gc
import secrets
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import fuseport.client.resident
from fuseport.client import (
    Client,
    HandleElsewhere,
    HandleNotFound,
    InvalidArgument,
    InvalidStack,
    RemoteTensor,
    ResourceExhausted,
    SignatureMismatch,
)
from fuseport.client.resident import CLIENT_ID_KEY
from fuseport.wire import _pb, codec
from fuseport.wire.errors import ERROR_METADATA_KEY, error_from_status

from .conftest import ServerProcess, start_server

MiB = 1 << 20
QUOTA = 80 * MiB
BUDGET = 100 * MiB
MAX_HANDLES = 40
# Short, so that the expiry test waits seconds; long enough that a handle used
# right after it is made (without a lease thread renewing it) never expires first.
LEASE = 5
# The server checks tokens, so that handles are bound to the token as well as the client id.
ADMIN, USER, OTHER_USER = (secrets.token_urlsafe(16) for _ in range(3))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Compile mode off (handles are not about compiling), small limits, a short
    lease, and freed host memory handed back at once, so that a free shows in the RSS."""
    tmp = tmp_path_factory.mktemp("resident")
    tokens = tmp / "tokens"
    tokens.write_text(f"{ADMIN} admin\n{USER} user\n{OTHER_USER} user\n")
    s = start_server(
        tmp, None, "--auth-tokens", str(tokens),
        "--compile-mode", "off", "--metrics-port", "0", "--keep-host-memory", "false",
        "--handle-lease-seconds", str(LEASE),
        "--max-resident-bytes-per-client", str(QUOTA), "--max-resident-bytes", str(BUDGET),
        "--max-handles-per-client", str(MAX_HANDLES),
    )  # fmt: skip
    yield s
    s.stop()


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[Client]:
    with user(server) as c:
        yield c


def user(server: ServerProcess, token: str = USER) -> Client:
    return Client(server.target, timeout=60, token=token)


@pytest.fixture(scope="module")
def kernels(server: ServerProcess) -> dict[str, int]:
    x = torch.ones(4)
    with Client(server.target, timeout=60, token=ADMIN) as c:
        return {
            "affine": c.register(lambda t: t * 2 + 1, [x]),
            "square": c.register(lambda t: t * t, [x]),
            "sub": c.register(lambda a, b: a - b, [x, torch.zeros(4)]),
            "split": c.register(lambda t: (t + 1, t.sum()), [x]),
            "head": c.register(lambda t: t[:2], [x]),
            "to_int": c.register(lambda t: (t * 3).to(torch.int64), [x]),
        }


def call(
    server: ServerProcess, method: str, request: bytes, client_id: str | None, token: str = USER
) -> bytes:
    """A KernelService call with exactly the metadata given (no client's own)."""
    metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),)
    if client_id is not None:
        metadata += ((CLIENT_ID_KEY, client_id),)
    with grpc.insecure_channel(server.target) as channel:
        try:
            return channel.unary_unary(f"/fuseport.v1.KernelService/{method}")(  # type: ignore[no-any-return]
                request, timeout=60, metadata=metadata
            )
        except grpc.RpcError as e:
            name = dict(e.trailing_metadata() or ()).get(ERROR_METADATA_KEY)
            raise error_from_status(e.code(), e.details() or "", name) from e


def execute_raw(
    server: ServerProcess, key: int, stack: list, client_id: str | None, keep: bool = False, token: str = USER
) -> list:
    raw = call(
        server, "Execute", codec.encode_execute_request(key, stack, keep_outputs=keep), client_id, token
    )
    return codec.decode_execute_response(raw).stack


def resident(server: ServerProcess, client_id: str | None = None) -> _pb.service.ResidentInfo:
    return _pb.service.ListResponse.FromString(call(server, "List", b"", client_id)).resident


def scrape(server: ServerProcess) -> dict[str, float]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def still_serving(c: Client, kernels: dict[str, int]) -> None:
    assert torch.equal(c.execute(kernels["affine"], [torch.ones(3)])[0], torch.full((3,), 3.0))


# --------------------------------------------------------------------------- positive


def test_chain_of_three_kernels_with_handles_equals_eager(client: Client, kernels: dict[str, int]) -> None:
    x = torch.randn(1000)
    (a,) = client.execute(kernels["affine"], [x], keep=True)
    assert isinstance(a, RemoteTensor)
    assert (a.dtype, a.shape, a.device, a.nbytes) == (torch.float32, torch.Size([1000]), "cpu", 4000)
    (b,) = client.execute(kernels["square"], [a], keep=True)
    (c,) = client.fallback(kernels["sub"], [b, a], keep=True)  # Fallback takes and keeps them too
    expected = (x * 2 + 1) * (x * 2 + 1) - (x * 2 + 1)
    assert torch.equal(c.fetch(), expected)
    # The last step may come back as bytes, from handles in.
    assert torch.equal(client.execute(kernels["sub"], [b, a])[0], expected)
    assert client.renew_lease().handles == 3
    assert client.free([a, b, c]) == 3
    assert client.renew_lease().handles == 0


def test_handles_mixed_with_tensors_and_below_the_inputs(client: Client, kernels: dict[str, int]) -> None:
    x = torch.arange(6.0)
    (h,) = client.execute(kernels["affine"], [x], keep=True)
    # A handle below the kernel's inputs passes through: the same object comes back.
    out = client.execute(kernels["sub"], [h, 7, h, torch.ones(6)])
    assert out[0] is h and out[1] == 7
    assert torch.equal(out[2], x * 2 + 1 - 1)
    # Outputs that are not tensors stay values; tensor outputs become handles.
    top, total = client.execute(kernels["split"], [h], keep=True)
    assert isinstance(top, RemoteTensor) and isinstance(total, RemoteTensor)
    assert torch.equal(top.fetch(), x * 2 + 2) and total.fetch().item() == (x * 2 + 1).sum().item()
    assert [t.fetch().tolist() for t in (h,)] == [(x * 2 + 1).tolist()]
    client.free([h, top, total])


def test_view_of_an_input_is_kept_as_its_own_copy(client: Client, kernels: dict[str, int]) -> None:
    """A kernel that returns its input unchanged: the handle owns its bytes,
    not a view of the request message (which would keep it all alive)."""
    x = torch.arange(1 << 16, dtype=torch.float32)
    (h,) = client.execute(kernels["head"], [x], keep=True)
    assert h.nbytes == 8 and torch.equal(h.fetch(), x[:2])
    h.free()


def test_context_manager_and_fetch_free(client: Client, kernels: dict[str, int]) -> None:
    with client.execute(kernels["affine"], [torch.ones(2)], keep=True)[0] as h:
        assert client.renew_lease().handles == 1
    assert h.freed and client.renew_lease().handles == 0
    (h,) = client.execute(kernels["affine"], [torch.ones(2)], keep=True)
    assert torch.equal(h.fetch(free=True), torch.full((2,), 3.0))
    assert h.freed and client.renew_lease().handles == 0


def test_dropped_remote_tensors_and_closed_clients_free_their_handles(
    server: ServerProcess, kernels: dict[str, int]
) -> None:
    c = user(server)
    kept = c.execute(kernels["affine"], [torch.ones(8)], keep=True)[0]
    dropped = c.execute(kernels["affine"], [torch.ones(8)], keep=True)[0]
    dropped_id = dropped.id
    assert resident(server, c.client_id).caller.handles == 2
    del dropped
    gc.collect()
    deadline = time.monotonic() + 60
    while resident(server, c.client_id).caller.handles != 1:  # the lease thread frees it
        assert time.monotonic() < deadline, "a dropped RemoteTensor was not freed"
        time.sleep(0.05)
    with pytest.raises(HandleNotFound):
        execute_raw(server, kernels["affine"], [codec.Handle(dropped_id)], c.client_id)
    c.close()
    assert resident(server, c.client_id).caller.handles == 0
    with pytest.raises(HandleNotFound, match="closed client"):
        kept.fetch()


def free_handles_calls(server: ServerProcess) -> float:
    """FreeHandles calls the server has finished, by any client."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "fuseport_requests_total" and s.labels.get("method") == "FreeHandles"
    )


def _lease_thread_frees_what_is_dropped(
    server: ServerProcess, c: Client, monkeypatch: pytest.MonkeyPatch, leaving: int
) -> None:
    """Dropped ids no longer wait for a call: the lease thread frees them now; until
    the server holds `leaving` handles of the client."""
    monkeypatch.setattr(fuseport.client.resident, "_CARRY_SECONDS", 0.0)
    c._leases._wake.set()
    deadline = time.monotonic() + 60
    while resident(server, c.client_id).caller.handles != leaving:
        assert time.monotonic() < deadline, "dropped handles were not freed"
        time.sleep(0.05)


def test_a_chain_frees_what_it_drops_with_its_next_call(
    server: ServerProcess, kernels: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """h = execute(k, [h], keep=True)[0] in a loop: each step drops the last step's
    output, and the next call carries its free (ExecuteOptions.free_handles), so a
    chain costs one call a step, not a call and a FreeHandles."""
    # Dropped ids wait for a call as long as the test takes: none goes by the lease thread.
    monkeypatch.setattr(fuseport.client.resident, "_CARRY_SECONDS", 600.0)
    with user(server) as c:
        (h,) = c.execute(kernels["affine"], [torch.ones(8)], keep=True)
        assert c.renew_lease().handles == 1  # and the client learns that calls carry frees
        before = free_handles_calls(server)
        expected = torch.ones(8) * 2 + 1
        for _ in range(6):
            (h,) = c.execute(kernels["affine"], [h], keep=True)  # the last h is dropped here
            expected = expected * 2 + 1
            # The server holds this step's output and the one dropped just now: every
            # earlier one was freed by the call after it.
            assert resident(server, c.client_id).caller.handles == 2
        assert torch.equal(h.fetch(), expected)
        assert free_handles_calls(server) == before
        # A call that fails before it is sent gives its ids back; the lease thread frees them.
        dropped_id = c.execute(kernels["affine"], [h], keep=True)[0].id
        assert resident(server, c.client_id).caller.handles == 2  # h and the output just dropped
        with pytest.raises(InvalidStack):
            c.execute(kernels["affine"], [object()])  # took the dropped id, refused before sending
        assert resident(server, c.client_id).caller.handles == 2
        _lease_thread_frees_what_is_dropped(server, c, monkeypatch, leaving=1)  # h only
        with pytest.raises(HandleNotFound):
            execute_raw(server, kernels["affine"], [codec.Handle(dropped_id)], c.client_id)


def test_a_call_the_server_refuses_unread_gives_back_the_frees_it_carried(
    server: ServerProcess, kernels: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call sent with the frees of dropped RemoteTensors that the server refuses before
    it reads them (its stack does not decode there) hands them back to the lease thread,
    which frees them: they are not lost with the call, and the next call carries none."""
    monkeypatch.setattr(fuseport.client.resident, "_CARRY_SECONDS", 600.0)
    with user(server) as c:
        (h,) = c.execute(kernels["affine"], [torch.ones(8)], keep=True)
        assert c.renew_lease().handles == 1  # the client learns that calls carry frees
        dropped_id = c.execute(kernels["affine"], [h], keep=True)[0].id  # dropped at once
        assert resident(server, c.client_id).caller.handles == 2
        bad = torch.tensor([2, 0, 1, 1], dtype=torch.uint8).view(torch.bool)  # a bool byte of 2
        with pytest.raises(InvalidStack, match="bool tensor"):
            c.execute(kernels["affine"], [bad])
        assert resident(server, c.client_id).caller.handles == 2  # the refused call freed nothing
        assert c._leases._dropped == [dropped_id]  # given back
        _lease_thread_frees_what_is_dropped(server, c, monkeypatch, leaving=1)  # h only


def test_a_call_frees_only_its_callers_live_handles(server: ServerProcess, kernels: dict[str, int]) -> None:
    """free_handles skips ids that are not the caller's live handles (another
    client's, forged, already freed), where FreeHandles refuses them all."""
    with user(server) as mine, user(server) as other:
        (theirs,) = other.execute(kernels["affine"], [torch.ones(4)], keep=True)
        (kept,) = mine.execute(kernels["affine"], [torch.ones(4)], keep=True)
        (gone,) = mine.execute(kernels["affine"], [torch.ones(4)], keep=True)
        request = codec.encode_execute_request(
            kernels["affine"], [torch.ones(2)], free_handles=[theirs.id, "f" * 40, gone.id, gone.id]
        )
        out = codec.decode_execute_response(call(server, "Execute", request, mine.client_id)).stack
        assert torch.equal(out[0], torch.full((2,), 3.0))  # the call itself ran
        assert resident(server, mine.client_id).caller.handles == 1
        assert resident(server, other.client_id).caller.handles == 1
        assert torch.equal(theirs.fetch(), torch.full((4,), 3.0))
        assert torch.equal(kept.fetch(), torch.full((4,), 3.0))
        with pytest.raises(HandleNotFound):
            gone.fetch()


def test_memory_is_returned_after_free(
    client: Client, server: ServerProcess, kernels: dict[str, int]
) -> None:
    x = torch.ones(16 * MiB)  # 64 MiB
    before = scrape(server)
    (h,) = client.execute(kernels["affine"], [x], keep=True)
    del x
    held = scrape(server)
    rss_held = server.rss()
    assert held["fuseport_resident_bytes"] - before["fuseport_resident_bytes"] == 64 * MiB
    assert held["fuseport_resident_handles"] - before["fuseport_resident_handles"] == 1
    info = client.resident()
    assert info.caller.bytes == 64 * MiB and info.budget_bytes == BUDGET
    h.free()
    after = scrape(server)
    assert after["fuseport_resident_bytes"] == before["fuseport_resident_bytes"]
    assert after["fuseport_resident_handles"] == before["fuseport_resident_handles"]
    # The block itself goes back to the OS (server runs with --keep-host-memory false).
    assert rss_held - server.rss() >= 48 * MiB


def test_handles_travel_in_the_codec_and_the_generated_classes() -> None:
    h = codec.Handle("abc.def", torch.bfloat16, (2, 3), "cuda:0", 12, "abc")
    assert codec.decode_stack(codec.encode_stack([h, [h, 1]])) == [h, [h, 1]]
    msg = _pb.values.Stack.FromString(codec.encode_stack([h]))
    assert msg.values[0].handle.id == "abc.def" and list(msg.values[0].handle.shape) == [2, 3]
    assert codec.value_from_proto(msg.values[0]) == h


# --------------------------------------------------------------------------- hostile


def test_forged_id_is_not_found(client: Client, server: ServerProcess, kernels: dict[str, int]) -> None:
    own = resident(server).server
    for forged in (f"{own}.{secrets.token_urlsafe(32)}", "x", own, f"{own}."):
        with pytest.raises(HandleNotFound, match=r"stack\[0\]: no live handle with this id"):
            client.execute(kernels["affine"], [codec.Handle(forged)])
    with pytest.raises(InvalidStack, match="without an id"):
        client.execute(kernels["affine"], [codec.Handle("")])
    with pytest.raises(InvalidStack, match="longer than 256"):
        client.execute(kernels["affine"], [codec.Handle("a" * 257)])
    still_serving(client, kernels)


def test_other_clients_handle_is_indistinguishable_from_a_forged_one(
    client: Client, server: ServerProcess, kernels: dict[str, int]
) -> None:
    (mine,) = client.execute(kernels["affine"], [torch.ones(4)], keep=True)
    forged = f"{mine.server}.{secrets.token_urlsafe(32)}"
    with user(server) as thief:
        errors = []
        for hid in (mine.id, forged):
            with pytest.raises(HandleNotFound) as e:
                thief.execute(kernels["affine"], [codec.Handle(hid)])
            errors.append(str(e.value))
            for method, req in (
                ("FetchHandles", _pb.service.FetchHandlesRequest(ids=[hid])),
                ("FreeHandles", _pb.service.FreeHandlesRequest(ids=[hid])),
            ):
                with pytest.raises(HandleNotFound) as e:
                    call(server, method, req.SerializeToString(), thief.client_id)
                errors.append(str(e.value))
        assert errors[:3] == errors[3:]  # the same answers for a real id and a made-up one
        thief_info = thief.resident()
        assert thief_info.caller.handles == 0 and thief_info.handles >= 1
    # No id at all cannot reach handles either.
    with pytest.raises(InvalidArgument, match="need a client id"):
        execute_raw(server, kernels["affine"], [codec.Handle(mine.id)], None)
    # The owner's handle is untouched by all that.
    assert torch.equal(mine.fetch(), torch.full((4,), 3.0))
    mine.free()


def test_handles_are_bound_to_the_client_id_and_the_token(
    server: ServerProcess, kernels: dict[str, int]
) -> None:
    me = secrets.token_urlsafe(24)
    (h,) = execute_raw(server, kernels["affine"], [torch.ones(2)], me, keep=True)
    assert isinstance(h, codec.Handle) and h.nbytes == 8
    assert torch.equal(execute_raw(server, kernels["affine"], [h], me)[0], torch.full((2,), 7.0))
    with pytest.raises(HandleNotFound):
        execute_raw(server, kernels["affine"], [h], secrets.token_urlsafe(24))
    for bad in ("short", "x" * 129, "has space in it ok?"):
        with pytest.raises(InvalidArgument, match="16 to 128 characters"):
            execute_raw(server, kernels["affine"], [torch.ones(2)], bad, keep=True)
    with pytest.raises(InvalidArgument, match="need a client id"):
        execute_raw(server, kernels["affine"], [torch.ones(2)], None, keep=True)
    # The same client id with another token is another owner (tokens are not shared secrets).
    with pytest.raises(HandleNotFound):
        execute_raw(server, kernels["affine"], [h], me, token=OTHER_USER)
    call(server, "FreeHandles", _pb.service.FreeHandlesRequest(all=True).SerializeToString(), me, OTHER_USER)
    assert resident(server, me).caller.handles == 1
    call(server, "FreeHandles", _pb.service.FreeHandlesRequest(all=True).SerializeToString(), me)
    assert resident(server, me).caller.handles == 0


def test_use_after_free_and_double_free(
    client: Client, server: ServerProcess, kernels: dict[str, int]
) -> None:
    (h, g) = client.execute(kernels["split"], [torch.ones(3)], keep=True)
    hid = h.id
    h.free()
    h.free()  # a second free of the same RemoteTensor does nothing
    with pytest.raises(HandleNotFound, match="was freed"):
        client.execute(kernels["affine"], [h])
    with pytest.raises(HandleNotFound, match="was freed"):
        h.fetch()
    with pytest.raises(HandleNotFound, match="no live handle"):
        client.execute(kernels["affine"], [codec.Handle(hid)])
    # On the wire: freeing a freed id is NOT_FOUND, and all or none: g survives it.
    with pytest.raises(HandleNotFound):
        call(
            server,
            "FreeHandles",
            _pb.service.FreeHandlesRequest(ids=[g.id, hid]).SerializeToString(),
            client.client_id,
        )
    assert g.fetch().item() == 3.0
    g.free()
    still_serving(client, kernels)


def test_handle_of_wrong_dtype_is_a_signature_mismatch(client: Client, kernels: dict[str, int]) -> None:
    (h,) = client.execute(kernels["to_int"], [torch.ones(5)], keep=True)
    assert h.dtype == torch.int64
    with pytest.raises(SignatureMismatch, match=r"stack\[0\].*expected a float32 tensor, got int64"):
        client.execute(kernels["affine"], [h])
    with pytest.raises(SignatureMismatch, match="expected a float32 tensor, got int64"):
        client.execute(kernels["sub"], [torch.ones(5), h])
    assert h.fetch().tolist() == [3] * 5
    h.free()
    still_serving(client, kernels)


def test_remote_tensor_of_another_client_is_refused_locally(
    server: ServerProcess, kernels: dict[str, int]
) -> None:
    with user(server) as a, user(server) as b:
        (h,) = a.execute(kernels["affine"], [torch.ones(2)], keep=True)
        with pytest.raises(HandleNotFound, match="another Client"):
            b.execute(kernels["affine"], [h])


def test_handle_of_another_serving_process_says_so(
    client: Client, server: ServerProcess, kernels: dict[str, int]
) -> None:
    own = resident(server).server
    other = "0123456789ab" if own != "0123456789ab" else "ba9876543210"
    with pytest.raises(HandleElsewhere, match=f"made by serving process '{other}', and this is '{own}'"):
        client.execute(kernels["affine"], [codec.Handle(f"{other}.{secrets.token_urlsafe(32)}")])
    still_serving(client, kernels)


def test_quota_budget_and_handle_count_are_enforced(server: ServerProcess, kernels: dict[str, int]) -> None:
    big = torch.ones(10 * MiB)  # 40 MiB each
    with user(server) as a, user(server) as b:
        held = [
            a.execute(kernels["affine"], [big], keep=True)[0] for _ in range(2)
        ]  # 80 MiB: a's whole quota
        with pytest.raises(
            ResourceExhausted, match=r"over its quota of \d+ bytes \(--max-resident-bytes-per-client\)"
        ):
            a.execute(kernels["affine"], [torch.ones(4)], keep=True)
        # The result is not lost: it can still come back as bytes.
        assert a.execute(kernels["affine"], [held[0]])[0].shape == big.shape
        with pytest.raises(ResourceExhausted, match=r"over its budget of \d+ bytes \(--max-resident-bytes\)"):
            b.execute(kernels["affine"], [big], keep=True)
        assert b.renew_lease().handles == 0  # refused means nothing kept
        a.free(held)
        kept = [b.execute(kernels["affine"], [big], keep=True)[0]]  # room again
        kept += [b.execute(kernels["affine"], [torch.ones(2)], keep=True)[0] for _ in range(MAX_HANDLES - 1)]
        with pytest.raises(ResourceExhausted, match="--max-handles-per-client"):
            b.execute(kernels["affine"], [torch.ones(2)], keep=True)
        b.free(kept)
        still_serving(a, kernels)


def test_fetch_of_several_and_stacks_of_handles(client: Client, kernels: dict[str, int]) -> None:
    hs = [client.execute(kernels["affine"], [torch.full((2,), float(i))], keep=True)[0] for i in range(3)]
    values = client.fetch(hs, free=True)
    assert [v.tolist() for v in values] == [[2 * i + 1.0] * 2 for i in range(3)]
    assert all(h.freed for h in hs) and client.renew_lease().handles == 0


# --------------------------------------------------------------------------- leases


def test_handles_expire_when_their_client_stops_renewing(
    server: ServerProcess, kernels: dict[str, int]
) -> None:
    key = kernels["affine"]
    with user(server) as c:
        (alive,) = c.execute(key, [torch.ones(2)], keep=True)  # renewed by c's lease thread
        silent = secrets.token_urlsafe(24)  # a client that never renews: it died
        (h,) = execute_raw(server, key, [torch.ones(4)], silent, keep=True)
        assert resident(server, silent).caller.handles == 1
        deadline = time.monotonic() + 120
        while resident(server, silent).caller.handles:  # List does not renew
            assert time.monotonic() < deadline, "handles of a silent client never expired"
            time.sleep(0.2)
        with pytest.raises(HandleNotFound, match="no live handle"):
            execute_raw(server, key, [h], silent)
        assert scrape(server)["fuseport_resident_expired_handles_total"] >= 1
        # The renewing client's handle outlived the other's lease.
        assert torch.equal(c.execute(key, [alive])[0], torch.full((2,), 7.0))
        assert c.renew_lease().handles == 1


def test_a_client_closed_during_its_lease_renewal_ends_the_lease_thread_quietly(
    server: ServerProcess, kernels: dict[str, int]
) -> None:
    """close() may land while the lease thread is inside a renewal: grpc then
    raises ValueError ("closed channel") on that thread, which is no error once
    the client is closed (it escaped as an unhandled thread exception)."""
    import threading

    raised: list[BaseException | None] = []
    hook = threading.excepthook
    threading.excepthook = lambda args: raised.append(args.exc_value)
    try:
        c = user(server)
        (kept,) = c.execute(kernels["affine"], [torch.ones(4)], keep=True)  # starts the lease thread
        leases = c._leases
        thread = leases._thread
        assert thread is not None
        real = leases._call
        renewing = threading.Event()

        def close_midway(method: str, body: bytes, timeout: float | None) -> bytes:
            if method == "RenewLease":
                leases.closing()  # what close() does first, then the channel goes
                c.channel.close()
                renewing.set()
            return real(method, body, timeout)

        leases._call = close_midway
        leases._wake.set()  # renew now, not a third of the lease from now
        assert renewing.wait(30)
        thread.join(30)
        assert not thread.is_alive()
    finally:
        threading.excepthook = hook
    assert raised == []


def test_a_chain_on_a_client_of_several_connections_frees_as_it_goes(server: ServerProcess) -> None:
    # With several connections no call carries frees (a free must reach the process that
    # holds its handle): the lease thread sends them at once. It waited 0.1 s for a call to
    # carry them, and a chain reached the handle limit (found by an adversarial probe).
    with Client(server.target, timeout=60, token=USER, connections=2) as c:
        key = c.register(lambda t: t + 1, [torch.zeros(4)])
        h = c.execute(key, [torch.zeros(4)], keep=True)[0]
        for _ in range(3 * MAX_HANDLES):
            h = c.execute(key, [h], keep=True)[0]
        assert torch.equal(h.fetch(), torch.full((4,), 3.0 * MAX_HANDLES + 1))


def test_a_copy_of_a_remote_tensor_is_the_same_handle(server: ServerProcess) -> None:
    import copy

    with user(server) as c:
        key = c.register(lambda t: t * 2, [torch.ones(4)])
        h = c.execute(key, [torch.ones(4)], keep=True)[0]
        for dup in (copy.copy(h), copy.deepcopy(h), copy.deepcopy([h])[0]):
            assert dup is h
        del dup
        gc.collect()  # a dropped copy freed the handle its original still named
        torch.testing.assert_close(c.execute(key, [h])[0], torch.full((4,), 4.0))


def test_a_kept_call_whose_response_is_refused_keeps_nothing(tmp_path_factory: pytest.TempPathFactory) -> None:
    # The outputs were kept before the response was encoded; a response over the message
    # limit (values below the inputs come back in it) failed the call and left them kept.
    # Now the values below count toward the message from the start: refused before running.
    s = start_server(
        tmp_path_factory.mktemp("resident-small-messages"), None,
        "--compile-mode", "off", "--max-message-bytes", str(4 * MiB),
    )  # fmt: skip
    try:
        with Client(s.target, timeout=60) as c:
            key = c.register(lambda t: t + 1, [torch.zeros(4)])
            below = torch.zeros(2 * MiB)  # 8 MiB: sent by shared memory, answered in the message
            with pytest.raises(ResourceExhausted, match="values below the kernel's inputs") as e:
                c.execute(key, [below, torch.zeros(4)], keep=True)
            assert "refused before running" in str(e.value)
            info = c.describe(key)
            assert info.fused_runs + info.fallback_runs == 0  # refused from its sizes: nothing ran
            assert c.resident().caller.handles == 0
            h = c.execute(key, [torch.zeros(4)], keep=True)[0]  # and the server serves on
            assert c.resident().caller.handles == 1 and torch.equal(h.fetch(), torch.ones(4))
    finally:
        s.stop()
