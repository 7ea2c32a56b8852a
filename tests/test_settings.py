"""Settings: defaults < FUSEPORT_* environment < flags, one frozen object."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fuseport.cli.commands import _parser
from fuseport.server.settings import Settings


def test_defaults_are_the_embedded_local_server() -> None:
    s = Settings.load(environ={})
    assert (s.host, s.port, s.device) == ("127.0.0.1", 50051, "auto")
    assert s.store_dir.parts[-2:] == ("fuseport", "store")
    assert s.max_message_bytes == 1 << 30 and s.keep_host_memory is True


def test_environment_overrides_defaults_and_flags_override_environment() -> None:
    env = {"FUSEPORT_PORT": "6000", "FUSEPORT_DEVICE": "cpu", "FUSEPORT_GRACE_SECONDS": "2.5",
           "FUSEPORT_STORE_DIR": "/srv/k", "FUSEPORT_KEEP_HOST_MEMORY": "off"}  # fmt: skip
    s = Settings.load({"port": 7000, "host": None}, environ=env)
    assert s.port == 7000 and s.device == "cpu" and s.grace_seconds == 2.5
    assert s.store_dir == Path("/srv/k") and s.keep_host_memory is False and s.host == "127.0.0.1"


def test_metrics_are_off_unless_a_port_is_given_and_0_picks_one() -> None:
    assert Settings.load(environ={}).metrics_port is None
    assert Settings.load(environ={"FUSEPORT_METRICS_PORT": ""}).metrics_port is None
    assert Settings.load(environ={"FUSEPORT_METRICS_PORT": "9090"}).metrics_port == 9090
    args = _parser().parse_args(["serve", "--metrics-port", "0"])
    assert Settings.load({"metrics_port": args.metrics_port}, environ={"FUSEPORT_METRICS_PORT": "9090"}).metrics_port == 0


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FUSEPORT_PORT": "http"}, "FUSEPORT_PORT='http'"),
        ({"FUSEPORT_PORT": "70000"}, "port must be in 0..65535"),
        ({"FUSEPORT_COMPILE_MODE": "fast"}, "compile_mode must be one of"),
        ({"FUSEPORT_MAX_MESSAGE_BYTES": str(2**31)}, "2 GiB"),
        ({"FUSEPORT_KEEP_HOST_MEMORY": "maybe"}, "expected true or false"),
        ({"FUSEPORT_METRICS_PORT": "65536"}, "metrics_port must be in 0..65535"),
    ],
)
def test_bad_values_name_the_variable_or_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Settings.load(environ=env)


def test_every_setting_is_a_serve_flag() -> None:
    args = _parser().parse_args(["serve", "--port", "0", "--keep-host-memory", "false", "--grace-seconds", "1"])
    flags = {k: v for k, v in vars(args).items() if k != "command"}
    assert set(flags) == {f.name for f in dataclasses.fields(Settings) if not f.metadata.get("env_only")}
    s = Settings.load(flags, environ={})
    assert s.port == 0 and s.keep_host_memory is False and s.grace_seconds == 1.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tls_cert": Path("s.crt")}, "tls_cert and tls_key go together"),
        ({"tls_key": Path("s.key")}, "tls_cert and tls_key go together"),
        ({"tls_client_ca": Path("ca.crt")}, "tls_client_ca .* needs the server's own --tls-cert and --tls-key"),
    ],
)
def test_tls_files_that_do_not_make_a_whole_configuration_are_refused(changes: dict[str, Path], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(**changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gpu-box", ""])
def test_a_reachable_host_needs_tls_tokens_or_insecure(host: str) -> None:
    with pytest.raises(ValueError, match="--tls-cert/--tls-key .*--auth-tokens .*--insecure"):
        Settings(host=host)
    for guard in ({"tls_cert": Path("s.crt"), "tls_key": Path("s.key")}, {"auth_tokens": Path("t")},
                  {"insecure": True}):  # fmt: skip
        assert Settings(host=host, **guard).host == host  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LocalHost"])
def test_loopback_hosts_need_no_guard(host: str) -> None:
    assert Settings(host=host).insecure is False


def test_security_settings_come_from_environment_and_flags() -> None:
    env = {"FUSEPORT_HOST": "0.0.0.0", "FUSEPORT_AUTH_TOKENS": "/run/secrets/t", "FUSEPORT_TLS_CERT": "/c",
           "FUSEPORT_TLS_KEY": "/k", "FUSEPORT_TLS_CLIENT_CA": "/ca"}  # fmt: skip
    s = Settings.load(environ=env)
    assert (s.auth_tokens, s.tls_cert, s.tls_key, s.tls_client_ca) == tuple(map(Path, ("/run/secrets/t", "/c", "/k", "/ca")))
    # An empty variable is unset: how the image's default tokens path is switched off.
    with pytest.raises(ValueError, match="--insecure"):
        Settings.load(environ={"FUSEPORT_HOST": "0.0.0.0", "FUSEPORT_AUTH_TOKENS": ""})
    assert Settings.load(environ={"FUSEPORT_HOST": "0.0.0.0", "FUSEPORT_AUTH_TOKENS": "", "FUSEPORT_INSECURE": "1"}).insecure
    args = _parser().parse_args(["serve", "--host", "0.0.0.0", "--insecure"])
    assert args.insecure is True and Settings.load({"host": args.host, "insecure": args.insecure}, environ={}).insecure


def test_fault_injection_is_off_by_default_and_only_an_environment_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert Settings.load(environ={}).fault_injection is False
    assert Settings.load(environ={"FUSEPORT_FAULT_INJECTION": "1"}).fault_injection is True
    with pytest.raises(SystemExit):  # a test-only switch has no flag a copied command line could carry
        _parser().parse_args(["serve", "--fault-injection"])
    assert "unrecognized arguments: --fault-injection" in capsys.readouterr().err
