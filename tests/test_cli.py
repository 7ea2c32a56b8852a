"""The `fuseport` command against a real server: health, list, describe, demo."""

from __future__ import annotations

import itertools
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fuseport.cli import commands as cli
from fuseport.client import Client
from fuseport.server.settings import Settings

from .conftest import ServerProcess


def fuseport(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fuseport.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_health_exits_zero_when_serving_and_one_when_unreachable(server: ServerProcess) -> None:
    ok = fuseport("health", "--target", server.target)
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING"
    down = fuseport("health", "--target", "127.0.0.1:1", "--timeout", "2")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_health_check_does_not_import_torch(server: ServerProcess) -> None:
    code = (
        "import sys; from fuseport.cli import main; "
        f"rc = main(['health', '--target', '{server.target}']); "
        "print(rc, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split()[-2:] == ["0", "False"], out.stderr


def test_list_and_describe_show_the_kernel_and_its_source(server: ServerProcess, client: Client) -> None:
    def f(x):
        return torch.log1p(x.abs()) * 3

    key = client.register(f, [torch.randn(8)])
    client.execute(key, [torch.randn(8)], wait=True)
    listed = fuseport("list", "--target", server.target)
    assert listed.returncode == 0 and str(key) in listed.stdout and "x: float32[?]" in listed.stdout
    described = fuseport("describe", str(key), "--target", server.target)
    assert described.returncode == 0
    assert "ready" in described.stdout and "generated source" in described.stdout
    assert "aten::log1p.default" in described.stdout
    assert "conditions: x.shape[0] >= 2" in described.stdout
    missing = fuseport("describe", "42", "--target", server.target)
    assert missing.returncode == 1 and "KernelNotFound" in missing.stderr


def test_demo_against_a_server_says_what_it_timed_and_suggests_a_command_that_works(
    server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = fuseport("demo", "--target", server.target)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "results match eager PyTorch" in demo.stdout
    assert "(run includes waiting for the compile)" in demo.stdout
    assert "again, the kernel ready" in demo.stdout
    suggested = re.search(r"`fuseport (describe -?\d+ --target \S+)` shows it all", demo.stdout)
    assert suggested, demo.stdout
    described = fuseport(*suggested.group(1).split())
    assert described.returncode == 0 and "generated source" in described.stdout, described.stderr

    # With a server of its own (gone when the demo ends) it suggests starting one that stays,
    # at the address `fuseport serve` binds by default, and both commands parse.
    assert cli._run_demo(server.target, 120, own_server=True) == 0
    out = capsys.readouterr().out
    assert "this demo's server stops now" in out
    commands = re.search(r"^\s+fuseport (demo .+) && fuseport (describe .+)$", out, re.M)
    assert commands, out
    for command in commands.groups():
        args = cli._parser().parse_args(command.split())
        assert args.target == Settings().address


# ---------------------------------------------------------------- what a user sees when it goes wrong


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The command's error output, checked to be one line and no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("processes", ["1", "2"])  # 2: the supervisor binds both ports
@pytest.mark.parametrize("which", ["--port", "--metrics-port"])
def test_serve_on_a_port_in_use_says_so_in_one_line_before_starting_anything(
    which: str, processes: str, busy_port: int, tmp_path: Path
) -> None:
    ports = {"--port": "0", "--metrics-port": "0", which: str(busy_port)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSEPORT_")}
    proc = subprocess.run(
        [sys.executable, "-m", "fuseport.cli", "serve", "--host", "127.0.0.1", *itertools.chain(*ports.items()),
         "--store-dir", str(tmp_path / "store"), "--device", "cpu", "--processes", processes],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line_error(proc)
    assert line.startswith("fuseport serve: ") and str(busy_port) in line and which in line, line
    assert "warmed up" not in proc.stdout + proc.stderr


def test_describe_reads_as_the_cli_prints_it_and_keeps_the_fields(client: Client) -> None:
    def g(x, y):
        return (x * y).relu()

    key = client.register(g, [torch.randn(4), torch.randn(4)])
    info = client.describe(key)
    assert info.key == key and info.proto.key == key and len(info.arg_specs) == len(info.proto.arg_specs)
    text = str(info)
    assert (
        text.startswith(f"key:       {key}\n")
        and "signature: (x: float32[?], y: float32[?]) -> 1 output(s)" in text
    )
    assert "aten::relu.default" in text
    (listed,) = [k for k in client.list() if k.key == key]
    assert listed.signature == info.signature and str(key) in listed.summary()
