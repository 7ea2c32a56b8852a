"""Pins who may call a server: TLS, mTLS, tokens with roles, SIGHUP reloads, and the refusal to open a port unguarded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fuseport.cli import commands as cli
from fuseport.client import Client, PermissionDenied, Unauthenticated, Unavailable
from fuseport.server.security import load_tokens
from fuseport.wire.security import channel_credentials
from tests._certs import CA, Pair
from tests.conftest import ServerProcess, start_server

ADMIN = "adm1n-7f3e9c0b5d2a4e61"
USER = "us3r-2b8d6f1a9c4e7035"
WRONG = "wr0ng-0000111122223333"

# Fused compiles are beside the point here and cost seconds of CPU each.
FLAGS = ("--compile-mode", "off")
# A fresh connection per client: gRPC shares subchannels between channels with
# the same target and arguments, and a reload is only seen by a new handshake.
FRESH = [("grpc.use_local_subchannel_pool", 1)]


def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@pytest.fixture(autouse=True)
def _no_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The client reads FUSEPORT_TOKEN when given no token; these tests say which one they send.
    monkeypatch.delenv("FUSEPORT_TOKEN", raising=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    ca = CA(d)
    return {"ca": ca, "server": ca.issue("server", "fuseport server", server=True),
            "client": ca.issue("client", "fuseport client", server=False)}  # fmt: skip


def _tokens(path: Path, *lines: str) -> Path:
    path.write_text("# token role\n\n" + "\n".join(lines) + "\n")
    return path


def _tls_flags(server: Pair) -> tuple[str, ...]:
    return ("--tls-cert", str(server.cert), "--tls-key", str(server.key))


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Any]) -> Iterator[ServerProcess]:
    """TLS and tokens (one admin, one user), logging every request."""
    tmp = tmp_path_factory.mktemp("guarded")
    tokens = _tokens(tmp / "tokens", f"{ADMIN} admin", f"{USER} user   # the CI runners")
    creds = channel_credentials(pki["ca"].cert)
    s = start_server(tmp, None, *FLAGS, *_tls_flags(pki["server"]), "--auth-tokens", str(tokens),
                     "--log-level", "debug", credentials=creds)  # fmt: skip
    yield s
    s.stop()


def _client(server: ServerProcess, ca: CA, token: str | None = "", timeout: float = 30, **kwargs: Any) -> Client:
    """A client on a fresh connection that trusts `ca`; token "" sends none."""
    return Client(server.target, timeout=timeout, tls_ca=ca.cert, token=token, options=FRESH, **kwargs)


@pytest.fixture(scope="module")
def key(guarded: ServerProcess, pki: dict[str, Any]) -> int:
    with _client(guarded, pki["ca"], ADMIN) as c:
        return c.register(_double, [torch.ones(3)])


# ------------------------------------------------------------------------------- TLS


def test_register_and_execute_through_tls(guarded: ServerProcess, pki: dict[str, Any]) -> None:
    with _client(guarded, pki["ca"], ADMIN) as c:
        k = c.register(_double, [torch.ones(2, 2)])
        res = c.execute_detailed(k, ["below", torch.full((2, 2), 3.0)])
    assert res.stack[0] == "below"
    torch.testing.assert_close(res.stack[1], torch.full((2, 2), 6.0))


def test_plaintext_client_is_refused_by_a_tls_server(guarded: ServerProcess, key: int) -> None:
    with Client(guarded.target, timeout=5, token=ADMIN) as c, pytest.raises(Unavailable):
        c.execute(key, [torch.ones(3)])


def test_client_that_does_not_trust_the_servers_ca_is_refused(
    guarded: ServerProcess, key: int, tmp_path: Path
) -> None:
    with _client(guarded, CA(tmp_path, "someone else"), ADMIN) as c, pytest.raises(Unavailable):
        c.list()


# ---------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("token", ["", WRONG, ADMIN[:-1]], ids=["none", "unknown", "prefix-of-admin"])
def test_call_without_a_known_token_is_unauthenticated(
    guarded: ServerProcess, pki: dict[str, Any], key: int, token: str
) -> None:
    with _client(guarded, pki["ca"], token) as c:
        for call in (lambda: c.list(), lambda: c.execute(key, [torch.ones(3)]),
                     lambda: c.register(_double, [torch.ones(5)])):  # fmt: skip
            with pytest.raises(Unauthenticated) as e:
                call()
            assert isinstance(e.value.__cause__, grpc.RpcError)
            assert e.value.__cause__.code() is grpc.StatusCode.UNAUTHENTICATED
            assert token == "" or token not in str(e.value)


def test_streamed_calls_need_a_token_and_a_user_may_make_them(
    guarded: ServerProcess, pki: dict[str, Any], key: int
) -> None:
    with _client(guarded, pki["ca"], USER, stream_above=0) as c:
        res = c.execute_detailed(key, [torch.ones(3)])
        assert res.transport == "stream"
        torch.testing.assert_close(res.stack[0], torch.full((3,), 2.0))
    with _client(guarded, pki["ca"], "", stream_above=0) as c, pytest.raises(Unauthenticated):
        c.fallback(key, [torch.ones(3)])


def test_a_streamed_register_needs_a_token_and_a_users_lands_in_its_own_namespace(
    guarded: ServerProcess, pki: dict[str, Any]
) -> None:
    """RegisterStream is Register: the same token check and the same tenants (server/tenants.py)."""
    weights = torch.randn(1 << 16)  # 256 KiB: streamed in chunks with stream_above=0

    def scaled(x: torch.Tensor) -> torch.Tensor:
        return x * weights[:4]

    with _client(guarded, pki["ca"], "", stream_above=0) as c, pytest.raises(Unauthenticated):
        c.register(scaled, [torch.ones(4)])
    with _client(guarded, pki["ca"], USER, stream_above=0) as c:
        own = c.register(scaled, [torch.ones(4)])
        torch.testing.assert_close(c.fallback(own, [torch.ones(4)])[0], weights[:4])
        assert own in [k.key for k in c.list()]
    with _client(guarded, pki["ca"], ADMIN) as admin:
        assert own not in [k.key for k in admin.list()], "a user's kernel is its own"
    with _client(guarded, pki["ca"], USER) as c:
        assert c.unregister(own) is True


def test_user_runs_shared_kernels_registers_its_own_but_cannot_unregister_shared_ones(
    guarded: ServerProcess, pki: dict[str, Any], key: int
) -> None:
    with _client(guarded, pki["ca"], USER) as c:
        torch.testing.assert_close(c.execute(key, [torch.ones(3)])[0], torch.full((3,), 2.0))
        torch.testing.assert_close(c.fallback(key, [torch.ones(3)])[0], torch.full((3,), 2.0))
        assert c.describe(key).key == key
        assert key in [k.key for k in c.list()]
        # Its own kernel (server/tenants.py): the admin's list does not show it.
        own = c.register(lambda x: x - 7, [torch.ones(7)])
        with pytest.raises(PermissionDenied, match="only an admin unregisters it") as e:
            c.unregister(key)
        assert e.value.__cause__.code() is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[union-attr]
        assert c.unregister(own) is True
    with _client(guarded, pki["ca"], ADMIN) as admin:
        assert key in [k.key for k in admin.list()], "the refused Unregister removed the kernel"


def test_admin_may_call_every_method(guarded: ServerProcess, pki: dict[str, Any]) -> None:
    def triple(x: torch.Tensor) -> torch.Tensor:
        return x * 3

    with _client(guarded, pki["ca"], ADMIN) as c:
        k = c.register(triple, [torch.ones(4)])
        torch.testing.assert_close(c.execute(k, [torch.ones(4)])[0], torch.full((4,), 3.0))
        torch.testing.assert_close(c.fallback(k, [torch.ones(4)])[0], torch.full((4,), 3.0))
        assert c.describe(k).key == k and k in [i.key for i in c.list()]
        assert c.unregister(k) is True


def test_token_from_the_environment(
    guarded: ServerProcess, pki: dict[str, Any], key: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FUSEPORT_TOKEN", USER)
    with _client(guarded, pki["ca"], token=None) as c:
        assert key in [k.key for k in c.list()]
        with pytest.raises(PermissionDenied):
            c.unregister(key)


def test_health_and_reflection_need_no_token(guarded: ServerProcess, pki: dict[str, Any]) -> None:
    with _client(guarded, pki["ca"]) as c:
        assert c.health() == "SERVING"
        assert c.health("fuseport.v1.KernelService") == "SERVING"
        stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
        (resp,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
    names = {s.name for s in resp.list_services_response.service}
    assert {"fuseport.v1.KernelService", "grpc.health.v1.Health"} <= names


def test_cli_reaches_a_tls_server_with_its_ca_and_a_token_from_the_environment(
    guarded: ServerProcess, pki: dict[str, Any], key: int, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSEPORT_")}

    def health(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fuseport.cli", "health", "--target", guarded.target,
                               *args], capture_output=True, text=True, timeout=60, env={**env, **extra})  # fmt: skip

    # The container's HEALTHCHECK: the CA from the environment, and no token.
    ok = health(FUSEPORT_TLS_CA=str(pki["ca"].cert))
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING"), ok.stderr
    plain = health("--timeout", "3")
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr

    # `list` in this process (it imports torch, seconds in a subprocess).
    monkeypatch.setenv("FUSEPORT_TOKEN", USER)
    assert cli.main(["list", "--target", guarded.target, "--tls-ca", str(pki["ca"].cert)]) == 0
    assert str(key) in capsys.readouterr().out
    monkeypatch.setenv("FUSEPORT_TOKEN", WRONG)
    assert cli.main(["list", "--target", guarded.target, "--tls-ca", str(pki["ca"].cert)]) == 1
    err = capsys.readouterr().err
    assert "Unauthenticated" in err and WRONG not in err


@pytest.mark.parametrize(
    ("command", "token", "refused"),
    [
        ("demo", None, "Unauthenticated"),
        # ("demo", USER) is no refusal any more: a user registers the demo's kernel in its own namespace.
        ("describe", None, "Unauthenticated"),
        ("list", WRONG, "Unauthenticated"),
    ],
)
def test_every_command_refused_by_the_server_says_so_in_one_line(
    guarded: ServerProcess, pki: dict[str, Any], key: int, command: str, token: str | None, refused: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSEPORT_")}
    env |= {"FUSEPORT_TLS_CA": str(pki["ca"].cert)} | ({"FUSEPORT_TOKEN": token} if token else {})
    args = {"demo": ["demo", "--timeout", "60"], "describe": ["describe", str(key)], "list": ["list"]}[command]
    proc = subprocess.run([sys.executable, "-m", "fuseport.cli", *args, "--target", guarded.target],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"fuseport {command}: {refused}: "), lines[0]
    assert "$FUSEPORT_TOKEN" in lines[0]  # how the command sends a token
    assert not token or token not in proc.stderr


def test_no_token_reaches_the_server_log(guarded: ServerProcess, pki: dict[str, Any], key: int) -> None:
    for token in (ADMIN, USER, WRONG):
        with _client(guarded, pki["ca"], token) as c:
            try:
                c.execute(key, [torch.ones(3)])
                c.unregister(123)
            except (Unauthenticated, PermissionDenied):
                pass
    log = guarded.log()
    assert "UNAUTHENTICATED" in log and "PERMISSION_DENIED" in log  # refusals are logged ...
    assert "Execute key=" in log  # ... and so is every request (debug) ...
    for token in (ADMIN, USER, WRONG):
        assert token not in log  # ... but never a token


# ------------------------------------------------------------------ mTLS and SIGHUP

KEEP = "k33p-4c5d6e7f8a9b0c1d"  # in the tokens file before and after the reload
OLD = "0ld-1a2b3c4d5e6f7a8b"  # only before
NEW = "n3w-9a8b7c6d5e4f3a2b"  # only after
RENEWED = "renewed.fuseport.test"  # a name only the reloaded certificate carries


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """TLS requiring a client certificate from the CA, and tokens; the files it
    serves are copies that the reload test rewrites (keeping KEEP, the CA and
    127.0.0.1 valid, so the tests around it do not depend on their order)."""
    tmp = tmp_path_factory.mktemp("mtls")
    served = Pair(tmp / "served.crt", tmp / "served.key")
    served.cert.write_bytes(pki["server"].cert.read_bytes())
    served.key.write_bytes(pki["server"].key.read_bytes())
    tokens = _tokens(tmp / "tokens", f"{KEEP} admin", f"{OLD} user")
    client = pki["client"]
    s = start_server(tmp, None, *FLAGS, *_tls_flags(served), "--tls-client-ca", str(pki["ca"].cert),
                     "--auth-tokens", str(tokens),
                     credentials=channel_credentials(pki["ca"].cert, client.cert, client.key))  # fmt: skip
    yield {"server": s, "served": served, "tokens": tokens, "tmp": tmp}
    s.stop()


def _mtls_client(mtls: dict[str, Any], pki: dict[str, Any], token: str = KEEP, **kwargs: Any) -> Client:
    client = pki["client"]
    return _client(mtls["server"], pki["ca"], token, tls_cert=client.cert, tls_key=client.key, **kwargs)


def test_mtls_refuses_a_client_without_a_certificate(mtls: dict[str, Any], pki: dict[str, Any]) -> None:
    with _client(mtls["server"], pki["ca"], KEEP, timeout=5) as c, pytest.raises(Unavailable):
        c.list()


def test_mtls_refuses_a_certificate_from_another_ca(mtls: dict[str, Any], pki: dict[str, Any], tmp_path: Path) -> None:
    stranger = CA(tmp_path, "someone else").issue("client", "stranger", server=False)
    with _client(mtls["server"], pki["ca"], KEEP, timeout=5, tls_cert=stranger.cert, tls_key=stranger.key) as c:
        with pytest.raises(Unavailable):
            c.list()


def test_mtls_serves_a_client_with_a_certificate(mtls: dict[str, Any], pki: dict[str, Any]) -> None:
    with _mtls_client(mtls, pki) as c:
        k = c.register(_double, [torch.ones(3)])
        torch.testing.assert_close(c.fallback(k, [torch.ones(3)])[0], torch.full((3,), 2.0))


def _eventually(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Polls `check` (each call has its own deadline) until it is true."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.05)


def test_sighup_reloads_tokens_and_certificate(mtls: dict[str, Any], pki: dict[str, Any]) -> None:
    s: ServerProcess = mtls["server"]

    def works(token: str, server_name: str | None = None) -> bool:
        with _mtls_client(mtls, pki, token, timeout=3, tls_server_name=server_name) as c:
            try:
                c.list()
                return True
            except (Unauthenticated, Unavailable):
                return False

    assert works(OLD) and not works(NEW) and not works(KEEP, RENEWED)

    _tokens(mtls["tokens"], f"{KEEP} admin", f"{NEW} user")
    renewed = pki["ca"].issue("renewed", "fuseport server", server=True, names=(RENEWED,))
    mtls["served"].cert.write_bytes(renewed.cert.read_bytes())
    mtls["served"].key.write_bytes(renewed.key.read_bytes())
    s.proc.send_signal(signal.SIGHUP)

    _eventually(lambda: works(NEW) and works(KEEP, RENEWED), "the new token and certificate taking effect")
    assert not works(OLD), "the token removed from the file is still accepted"
    assert works(KEEP) and s.proc.poll() is None

    # A broken file at the next reload is logged; what serves stays.
    mtls["tokens"].write_text(f"{NEW} superuser\n")
    s.proc.send_signal(signal.SIGHUP)
    _eventually(lambda: "reload failed" in s.log(), "the failed reload being logged")
    assert works(NEW) and works(KEEP)
    assert "unknown role 'superuser'" in s.log()
    for token in (KEEP, OLD, NEW):
        assert token not in s.log()


# ---------------------------------------------------------------------- safe by default


def _serve(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSEPORT_")}
    return subprocess.run(
        [sys.executable, "-m", "fuseport.cli", "serve", "--port", "0", "--store-dir", str(tmp / "store"),
         "--device", "cpu", *args],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_non_loopback_bind_without_tls_or_tokens_refuses_to_start(tmp_path: Path) -> None:
    proc = _serve(tmp_path, "--host", "0.0.0.0")
    assert proc.returncode == 2
    for flag in ("--tls-cert/--tls-key", "--auth-tokens", "--insecure"):
        assert flag in proc.stderr
    assert not (tmp_path / "store").exists(), "it started something before refusing"


def test_a_missing_tokens_file_is_one_line_naming_it(tmp_path: Path) -> None:
    proc = _serve(tmp_path, "--host", "0.0.0.0", "--auth-tokens", str(tmp_path / "absent"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"fuseport serve: auth_tokens {tmp_path / 'absent'}: No such file or directory"


def test_non_loopback_bind_starts_with_insecure(tmp_path: Path) -> None:
    s = start_server(tmp_path, None, *FLAGS, "--host", "0.0.0.0", "--insecure")
    try:
        with Client(s.target, timeout=30, token="") as c:
            assert c.list() == []
        assert "anyone who connects may register and run graphs" in s.log()
    finally:
        assert s.stop() == 0


# ---------------------------------------------------------------------- the tokens file


def test_tokens_file_reports_a_bad_line_by_number_without_its_content(tmp_path: Path) -> None:
    path = _tokens(tmp_path / "tokens", f"{ADMIN} admin", f"{USER} root")
    with pytest.raises(ValueError, match=r"tokens:4: unknown role 'root'") as e:
        load_tokens(path)
    assert USER not in str(e.value)
    _tokens(path, f"{ADMIN} admin extra")
    with pytest.raises(ValueError, match=r"tokens:3: expected 'TOKEN ROLE', got 3 words") as e:
        load_tokens(path)
    assert ADMIN not in str(e.value)
    _tokens(path, f"{ADMIN} admin", f"{ADMIN} user")
    with pytest.raises(ValueError, match="listed twice"):
        load_tokens(path)
    _tokens(path)
    with pytest.raises(ValueError, match="no tokens"):
        load_tokens(path)
    assert [role for _, role in load_tokens(_tokens(path, f"{ADMIN} admin  # ops", f"{USER} user"))] == ["admin", "user"]
