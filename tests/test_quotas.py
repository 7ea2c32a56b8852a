"""Quotas per identity (issue 20, finding 4): a client id is the caller's own choice, so made-up ids buy nothing.

With tokens, device-resident values and shared-memory sessions count against the
token, whatever client ids it sends. Without tokens, shared-memory sessions count
against the peer process once connected (SO_PEERCRED) and against the client id
while their ticket is pending; pending tickets and idle sessions expire.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from fuseport.client import Client, ResourceExhausted
from fuseport.client.resident import CLIENT_ID_KEY
from fuseport.wire import _pb, codec, shm
from fuseport.wire.errors import ERROR_METADATA_KEY, error_from_status

from .conftest import ServerProcess, start_server

MiB = 1 << 20
ADMIN, USER, OTHER = (secrets.token_urlsafe(16) for _ in range(3))
PER_CLIENT = 4 * MiB
PER_TOKEN = 10 * MiB
SERVICE = "/fuseport.v1.KernelService/"


def _made_up_id() -> str:
    return secrets.token_urlsafe(18)


def _call(server: ServerProcess, method: str, request: bytes, client_id: str, token: str | None) -> bytes:
    """One KernelService call with exactly this metadata (no client's own)."""
    metadata: tuple[tuple[str, str], ...] = ((CLIENT_ID_KEY, client_id),)
    if token is not None:
        metadata += (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(server.target) as channel:
        try:
            return channel.unary_unary(SERVICE + method)(request, timeout=60, metadata=metadata)  # type: ignore[no-any-return]
        except grpc.RpcError as e:
            name = dict(e.trailing_metadata() or ()).get(ERROR_METADATA_KEY)
            raise error_from_status(e.code(), e.details() or "", name) from e


def _open(
    server: ServerProcess, client_id: str, token: str | None = None
) -> _pb.service.OpenSharedMemoryResponse:
    return _pb.service.OpenSharedMemoryResponse.FromString(
        _call(server, "OpenSharedMemory", b"", client_id, token)
    )


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("quotas")
    tokens = tmp / "tokens"
    tokens.write_text(f"{ADMIN} admin\n{USER} user\n{OTHER} user\n")
    s = start_server(
        tmp, None, "--auth-tokens", str(tokens), "--compile-mode", "off",
        "--max-resident-bytes-per-client", str(PER_CLIENT), "--max-resident-bytes-per-token", str(PER_TOKEN),
        "--shared-memory-sessions", "4", "--shared-memory-sessions-per-identity", "2",
    )  # fmt: skip
    yield s
    s.stop()


def test_made_up_client_ids_of_one_token_share_its_quota(guarded: ServerProcess) -> None:
    """The probe kept 480 MB with 60 made-up ids under a 10 MB per-client quota."""
    with Client(guarded.target, timeout=60, token=ADMIN) as admin:
        key = admin.register(lambda t: t * 2, [torch.ones(4)])
    mib = torch.ones(MiB // 4)  # 1 MiB of float32: each result kept is 1 MiB
    request = codec.encode_execute_request(key, [mib], keep_outputs=True)
    kept, refused = 0, []
    for _ in range(60):
        try:
            _call(guarded, "Execute", request, _made_up_id(), USER)
            kept += 1
        except ResourceExhausted as e:
            refused.append(str(e))
    assert kept == PER_TOKEN // MiB, (kept, refused[:1])
    assert all("--max-resident-bytes-per-token" in r for r in refused), refused[:1]
    listed = _pb.service.ListResponse.FromString(_call(guarded, "List", b"", _made_up_id(), ADMIN))
    assert listed.resident.bytes == kept * MiB <= PER_TOKEN
    # Another token's quota is its own: the first token's ids took nothing of it.
    with Client(guarded.target, timeout=60, token=OTHER, shared_memory=False) as other:
        handles = [other.execute(key, [mib], keep=True)[0] for _ in range(PER_CLIENT // MiB)]
        torch.testing.assert_close(other.fetch(handles[:1])[0], mib * 2)
        other.free(handles)


def test_one_tokens_shared_memory_sessions_cannot_deny_another_token(guarded: ServerProcess) -> None:
    """256 pending tickets from one caller once left no session for anyone else on that process."""
    mine = [_open(guarded, _made_up_id(), USER) for _ in range(2)]
    with pytest.raises(
        ResourceExhausted, match=r"this token holds 2 .*--shared-memory-sessions-per-identity"
    ):
        _open(guarded, _made_up_id(), USER)
    theirs = _open(guarded, _made_up_id(), OTHER)  # the other token still gets one
    # Connected sessions count the same as pending tickets: the first token's stay at 2.
    sock = shm.connect(mine[0].socket, 10)
    try:
        shm.send_packet(sock, shm.Packet(shm.HELLO, text=mine[0].ticket))
        reply = shm.recv_packet(sock)
        assert reply is not None and reply.kind == shm.OK
        with pytest.raises(ResourceExhausted, match="--shared-memory-sessions-per-identity"):
            _open(guarded, _made_up_id(), USER)
    finally:
        sock.close()
    assert theirs.ticket and theirs.ticket not in {m.ticket for m in mine}


# --------------------------------------------------------------------------- without tokens

TICKET_SECONDS = 4.0
IDLE_SECONDS = 4.0


@pytest.fixture(scope="module")
def anonymous(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(
        tmp_path_factory.mktemp("anonymous"), None, "--compile-mode", "off",
        "--max-resident-bytes", str(PER_TOKEN), "--max-resident-bytes-per-client", str(PER_CLIENT),
        "--shared-memory-sessions-per-identity", "2",
        "--shared-memory-ticket-seconds", str(TICKET_SECONDS), "--shared-memory-idle-seconds", str(IDLE_SECONDS),
    )  # fmt: skip
    yield s
    s.stop()


def test_without_tokens_made_up_client_ids_get_no_more_than_the_server_wide_budget(
    anonymous: ServerProcess,
) -> None:
    """Anonymous callers cannot be told apart over TCP: what their ids hold together is the budget."""
    with Client(anonymous.target, timeout=60) as c:
        key = c.register(lambda t: t + 1, [torch.ones(4)])
    request = codec.encode_execute_request(key, [torch.ones(MiB // 4)], keep_outputs=True)
    kept = 0
    for _ in range(60):
        try:
            _call(anonymous, "Execute", request, _made_up_id(), None)
            kept += 1
        except ResourceExhausted as e:
            assert "--max-resident-bytes" in str(e)
    assert kept == PER_TOKEN // MiB


def test_pending_tickets_count_against_their_client_and_expire(anonymous: ServerProcess) -> None:
    me = _made_up_id()
    with grpc.insecure_channel(anonymous.target) as channel:
        open_ = channel.unary_unary(SERVICE + "OpenSharedMemory")
        md = ((CLIENT_ID_KEY, me),)
        open_(b"", metadata=md, timeout=10)
        open_(b"", metadata=md, timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            open_(b"", metadata=md, timeout=10)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--shared-memory-sessions-per-identity" in (refused.value.details() or "")
        # Never presented: void after --shared-memory-ticket-seconds, and no longer counted.
        deadline = time.monotonic() + 60
        while True:
            try:
                open_(b"", metadata=md, timeout=10)
                break
            except grpc.RpcError as e:
                assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, e
            time.sleep(0.2)


def test_without_tokens_connected_sessions_count_against_the_peer_process(anonymous: ServerProcess) -> None:
    """Made-up client ids get tickets, but this process connects no more than its share."""
    opened = [_open(anonymous, _made_up_id()) for _ in range(3)]
    socks = [shm.connect(o.socket, 10) for o in opened]
    try:
        replies = []
        for sock, o in zip(socks, opened):
            shm.send_packet(sock, shm.Packet(shm.HELLO, text=o.ticket))
            replies.append(shm.recv_packet(sock))
        assert [r.kind for r in replies if r is not None] == [shm.OK, shm.OK, shm.ERROR], replies
        assert replies[2] is not None and "--shared-memory-sessions-per-identity" in replies[2].text
    finally:
        for sock in socks:
            sock.close()


def test_an_idle_session_is_ended(anonymous: ServerProcess) -> None:
    o = _open(anonymous, _made_up_id())
    sock = shm.connect(o.socket, 10)
    try:
        shm.send_packet(sock, shm.Packet(shm.HELLO, text=o.ticket))
        reply = shm.recv_packet(sock)
        assert reply is not None and reply.kind == shm.OK
        sock.settimeout(60)
        assert shm.recv_packet(sock) is None  # the server hung up: end of stream
    finally:
        sock.close()
    assert "(--shared-memory-idle-seconds)" in anonymous.log()
