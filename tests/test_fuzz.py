"""A fuzz corpus over every RPC, sent raw to a real server: random bytes, truncations and
mutations of valid requests (a graph among them). Whatever a request holds, the answer is
OK or a typed error, never INTERNAL or UNKNOWN, and the server is SERVING after each batch.

Hypothesis draws derandomized examples: every run sends the same corpus, so a failure
here reproduces, and the suite never flakes on a lucky draw.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuseport.client import Client, capture
from fuseport.wire import _pb, codec

from .conftest import ServerProcess, start_server

METHODS = ("Register", "Execute", "Fallback", "Describe", "List", "Unregister")
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FUZZ = settings(
    max_examples=60, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict[str, bytes]]]:
    """A server with one kernel, and one valid request per method."""
    server = start_server(tmp_path_factory.mktemp("fuzz"), None, "--compile-mode", "off")
    graph = capture(lambda x, y: (x * y + 1).relu().sum(-1), [torch.randn(3, 4), torch.randn(4)])
    with Client(server.target) as c:
        key = c.register(graph)
    valid = {
        "Register": _pb.service.RegisterRequest(graph=graph).SerializeToString(),
        "Execute": codec.encode_execute_request(key, [torch.randn(2, 4), torch.randn(4)]),
        "Fallback": codec.encode_execute_request(key, [1.5, torch.randn(5, 4), torch.randn(4)]),
        "Describe": _pb.service.DescribeRequest(key=key, include_source=True).SerializeToString(),
        "List": b"",
        "Unregister": _pb.service.UnregisterRequest(key=key ^ 1).SerializeToString(),  # not the kernel
    }
    yield server, valid
    server.stop()


def _call(server: ServerProcess, method: str, request: bytes) -> grpc.StatusCode:
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary(f"/fuseport.v1.KernelService/{method}")
        try:
            call(request, timeout=60)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def _check(server: ServerProcess, method: str, request: bytes) -> None:
    code = _call(server, method, request)
    assert code not in BAD, f"{method} answered {code.name} to {request[:64]!r}... ({len(request)} bytes)"


@st.composite
def _mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(("flip", "set", "insert", "delete")))
        if not data and kind != "insert":
            kind = "insert"
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.sampled_from((0x00, 0x7F, 0x80, 0xFF, 0x08, 0x10, 0x12, 0x1A)))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=9))
        else:
            del data[at : at + draw(st.integers(1, 9))]
    return bytes(data)


@pytest.mark.parametrize("method", METHODS)
def test_random_truncated_and_mutated_requests_never_get_internal(
    fuzzed: tuple[ServerProcess, dict[str, bytes]], method: str
) -> None:
    server, valid = fuzzed
    assert _call(server, method, valid[method]) == grpc.StatusCode.OK, "the valid request itself"

    @FUZZ
    @given(data=st.data())
    def corpus(data: st.DataObject) -> None:
        request = data.draw(
            st.one_of(
                st.binary(max_size=256),
                st.integers(0, len(valid[method])).map(lambda n: valid[method][:n]),
                _mutated(valid[method]),
            )
        )
        _check(server, method, request)

    corpus()
    with Client(server.target) as c:
        assert c.health() == "SERVING"
    assert "Traceback" not in server.log(), server.log()[-3000:]
