"""What the server's log says around a compile, as an operator reads it: torch's is_fx_tracing
advice stays out of it, and a compile whose kernel was unregistered meanwhile is discarded, not
reported as installed. The server runs the in-process compiler: its kernels are torch.compile's,
whose first fused call is where torch emitted the warning."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fuseport.client import Client
from fuseport.server.core import Core
from fuseport.server.executor import State
from fuseport.server.settings import Settings
from fuseport.wire import _pb
from fuseport.wire._tracing import TRACE_LOCK
from fuseport.wire.capture import capture

from .conftest import ServerProcess, start_server


@pytest.fixture(scope="module")
def inprocess_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(tmp_path_factory.mktemp("compile-log"), None, "--compiler", "inprocess")
    yield s
    s.stop()


def test_first_fused_call_keeps_torchs_is_fx_tracing_warning_out_of_the_log(
    inprocess_server: ServerProcess,
) -> None:
    with Client(inprocess_server.target, timeout=300) as c:
        key = c.register(lambda x: torch.sin(x) * 2 + 1, [torch.randn(8)])
        x = torch.randn(8)
        res = c.execute_detailed(key, [x], wait=True)
    assert res.path == "fused", (res.reason, res.detail)
    torch.testing.assert_close(res.stack[0], torch.sin(x) * 2 + 1)
    log = inprocess_server.log()
    # The executor asked is_fx_tracing() before this fused call: where torch logs its advice.
    assert f"kernel {key}: compiled in" in log
    assert "is_fx_tracing" not in log, log[-3000:]


def test_a_compile_whose_kernel_was_unregistered_meanwhile_is_discarded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # In process, so that the test can hold the compile where it is: the in-process compiler
    # takes TRACE_LOCK for its trace, and the test holds it until the kernel is unregistered.
    core = Core(Settings(device="cpu", store_dir=tmp_path, compiler="inprocess"))
    try:
        key, _, _ = core.register(capture(lambda x: torch.cos(x) - 3, [torch.randn(8)]))
        x = torch.randn(8)
        caplog.set_level(logging.INFO, logger="fuseport.server.executor")
        with TRACE_LOCK:
            res = core.execute(key, [x])  # no wait: the compile starts and waits for the lock
            assert res.reason == _pb.service.FALLBACK_REASON_COMPILING
            torch.testing.assert_close(res.stack[0], torch.cos(x) - 3)
            (entry,) = core.executor.entries(key)
            assert core.unregister(key)
        assert entry.done.wait(300), "the compile did not end"
        assert entry.state is State.FAILED and "unregistered" in entry.error, (entry.state, entry.error)
        assert entry.compiled is None
        said = [r.getMessage() for r in caplog.records if str(key) in r.getMessage()]
        assert any("discarded" in m for m in said), said
        assert not any("compiled in" in m for m in said), said
    finally:
        core.close()
