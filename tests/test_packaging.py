"""Packaging: the Dockerfile runs real CLI commands, lints clean, and the installed distribution is whole."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

from fuseport.cli import commands as cli
from fuseport.client import flags

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DIST = "fuseport"
TYPED_PACKAGES = ("fuseport.client", "fuseport.server", "fuseport.wire", "fuseport.bench", "fuseport.cli")
PROTOS = ("values.proto", "graph.proto", "service.proto")


@dataclass
class Stage:
    """The instructions of a Dockerfile's final stage that these tests read."""

    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck_options: dict[str, str] = field(default_factory=dict)
    healthcheck: list[str] = field(default_factory=list)
    user: str = "root"
    volumes: list[str] = field(default_factory=list)
    exposed: list[str] = field(default_factory=list)
    copy_sources: list[str] = field(default_factory=list)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) pairs, with comments dropped and continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        # Comment lines are removed before parsing, also inside a continued instruction.
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return out


def _command(args: str, env: dict[str, str]) -> list[str]:
    """The argv of an exec-form (JSON) or shell-form command, ${VAR}s expanded from ENV."""
    if args.startswith("["):
        argv = json.loads(args)
    else:
        argv = shlex.split(args)
    return [re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env[m.group(1) or m.group(2)], a) for a in argv]


def _parse_env(args: str) -> dict[str, str]:
    words = shlex.split(args)
    if words and "=" not in words[0]:  # legacy `ENV KEY value with spaces`
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)


def _final_stage() -> Stage:
    stage = Stage()
    for keyword, args in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            stage = Stage()
        elif keyword == "ENV":
            stage.env.update(_parse_env(args))
        elif keyword == "ENTRYPOINT":
            stage.entrypoint = _command(args, stage.env)
            stage.cmd = []  # Docker resets an inherited CMD when ENTRYPOINT is set
        elif keyword == "CMD":
            stage.cmd = _command(args, stage.env)
        elif keyword == "HEALTHCHECK":
            options, sep, command = args.partition("CMD ")
            assert sep, f"HEALTHCHECK without CMD: {args}"
            stage.healthcheck_options = dict(o.lstrip("-").split("=", 1) for o in options.split())
            stage.healthcheck = _command(command.strip(), stage.env)
        elif keyword == "USER":
            stage.user = args
        elif keyword == "VOLUME":
            stage.volumes += json.loads(args) if args.startswith("[") else args.split()
        elif keyword == "EXPOSE":
            stage.exposed += [p.split("/")[0] for p in args.split()]
        elif keyword in ("COPY", "ADD"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            if not any(w.startswith("--from") for w in shlex.split(args)):
                stage.copy_sources += words[:-1]
    return stage


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert m, f"unreadable duration {duration!r}"
    return float(m.group(1)) * units[m.group(2)]


def _cli_args(argv: list[str]) -> object:
    """What `fuseport` would make of argv; fails the test where argparse would exit."""
    assert argv and argv[0] == "fuseport", f"not a fuseport command: {argv}"
    try:
        return cli._parser().parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"`{shlex.join(argv)}` is not a valid fuseport command line (exit {e.code})")


def _is_under(path: str, parent: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(parent))


# --- the Dockerfile -------------------------------------------------------------------


def test_dockerfile_entrypoint_and_cmd_start_fuseport_serve() -> None:
    stage = _final_stage()
    args = _cli_args(stage.entrypoint + stage.cmd)
    assert args.command == "serve"


def test_dockerfile_healthcheck_runs_fuseport_health_within_its_timeout() -> None:
    stage = _final_stage()
    args = _cli_args(stage.healthcheck)
    assert args.command == "health"
    # The RPC must give up before Docker kills the check, or a hung server reads as a
    # check timeout instead of an unhealthy answer.
    check_timeout = _seconds(stage.healthcheck_options.get("timeout", "30s"))
    assert args.timeout < check_timeout


def test_dockerfile_environment_configures_the_server_for_a_container() -> None:
    from fuseport.server.settings import ENV_PREFIX, Settings

    stage = _final_stage()
    ours = {k: v for k, v in stage.env.items() if k.startswith(ENV_PREFIX)}
    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    unknown = set(ours) - known - set(flags.CLIENT_ENV)
    assert not unknown, f"the Dockerfile sets variables fuseport does not read: {sorted(unknown)}"

    settings = Settings.load(environ=ours)
    assert settings.host == "0.0.0.0"
    assert str(settings.port) in stage.exposed
    # The in-container CLI (and so the health check) must reach the port the server binds.
    target = ours.get(flags.TARGET_ENV, "127.0.0.1:50051")
    assert target.rsplit(":", 1)[1] == str(settings.port)
    assert any(_is_under(str(settings.store_dir), v) for v in stage.volumes), (
        f"store_dir {settings.store_dir} is not on a VOLUME {stage.volumes}"
    )
    for cache in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert cache in stage.env, f"{cache} is unset: the default may not be writable"


def test_dockerfile_guards_its_public_port_with_tokens_from_a_mounted_secret() -> None:
    from fuseport.server.settings import ENV_PREFIX, Settings

    stage = _final_stage()
    settings = Settings.load(environ={k: v for k, v in stage.env.items() if k.startswith(ENV_PREFIX)})
    # Bound to every interface, so not open to everyone: tokens from a fixed path a
    # Secret is mounted at (the server refuses to start without the file), and no
    # --insecure that would quietly accept an unguarded port.
    assert settings.auth_tokens is not None and _is_under(str(settings.auth_tokens), "/run/secrets")
    assert settings.insecure is False
    assert not any(_is_under(str(settings.auth_tokens), v) for v in stage.volumes), "tokens on the data volume"
    # The health check is plaintext and tokenless: health stays open, and TLS is off
    # unless the operator turns it on together with FUSEPORT_TLS_CA for the check.
    assert not settings.tls and "FUSEPORT_TOKEN" not in stage.env
    args = _cli_args(stage.healthcheck)
    assert args.tls_ca is None and args.tls_cert is None


def test_dockerfile_runs_as_an_unprivileged_user() -> None:
    user = _final_stage().user.split(":")[0]
    assert user not in ("root", "0")


def test_dockerignore_lets_every_copy_source_into_the_context() -> None:
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]  # fmt: skip
    assert patterns[0] == "*", ".dockerignore is meant to be an allowlist"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = {s.rstrip("/") for s in _final_stage().copy_sources}
    assert sources, "no COPY found in the Dockerfile"
    assert sources <= allowed, f"COPY sources left out of the build context: {sorted(sources - allowed)}"
    assert not allowed & {"tests", ".git", ".venv", "dist", "build"}


def _hadolint() -> str:
    # The venv's scripts folder first: pytest is often run without activating the venv.
    found = shutil.which("hadolint", path=sysconfig.get_path("scripts")) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the test extras (pip install -e '.[test]')")
    return found


def test_dockerfile_passes_hadolint_without_findings() -> None:
    proc = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


# --- the installed distribution -------------------------------------------------------


def _dist() -> importlib.metadata.Distribution:
    # Not importlib.metadata.distribution(): run from the repo root, sys.path starts with
    # the source tree, whose fuseport.egg-info (a build leftover) would be found first.
    path = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    dists = list(importlib.metadata.distributions(name=DIST, path=path))
    assert dists, f"the {DIST} distribution is not installed"
    return dists[0]


def _is_editable(dist: importlib.metadata.Distribution) -> bool:
    direct_url = dist.read_text("direct_url.json")
    return bool(direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"))


def test_distribution_exposes_the_fuseport_console_script() -> None:
    (script,) = [ep for ep in _dist().entry_points if ep.group == "console_scripts"]
    assert (script.name, script.value) == ("fuseport", "fuseport.cli:main")
    assert script.load() is cli.main


def _package_dir(name: str) -> Path:
    # find_spec of a subpackage imports only its parent (the `fuseport` namespace), so
    # packages with optional dependencies need not import here.
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def test_distribution_ships_typing_markers_and_proto_sources() -> None:
    wanted = [f"{p.replace('.', '/')}/py.typed" for p in TYPED_PACKAGES]
    wanted += [f"fuseport/v1/{p}" for p in PROTOS] + ["fuseport/kserve/grpc_service.proto"]
    for rel in wanted:
        package, _, filename = rel.rpartition("/")
        assert (_package_dir(package.replace("/", ".")) / filename).is_file(), f"{rel} is not installed"

    dist = _dist()
    if _is_editable(dist):
        # An editable install reads the source tree, where the files exist whether or not
        # the wheel would carry them: check that the wheel's package data declares them.
        package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
        for package in TYPED_PACKAGES:
            assert "py.typed" in package_data.get(package, []), f"{package} does not ship py.typed"
        for package in ("fuseport.v1", "fuseport.kserve"):
            assert "*.proto" in package_data.get(package, []), f"{package} does not ship its .proto files"
    else:
        files = {str(f) for f in dist.files or []}
        missing = [rel for rel in wanted if rel not in files]
        assert not missing, f"missing from the installed distribution: {missing}"


def test_distribution_installs_only_the_fuseport_namespace() -> None:
    dist = _dist()
    # A top-level `server` or `client` would shadow (or be shadowed by) other projects.
    assert (dist.read_text("top_level.txt") or "fuseport").split() == ["fuseport"]
    if not _is_editable(dist):
        tops = {PurePosixPath(str(f)).parts[0] for f in dist.files or []}
        tops = {t for t in tops if t not in ("..", "__pycache__") and not t.endswith(".dist-info")}
        assert tops == {"fuseport"}, f"installed outside fuseport/: {sorted(tops)}"


@pytest.mark.parametrize("args", [[], ["serve"]], ids=["fuseport", "serve"])
def test_cli_help_exits_zero(args: list[str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSEPORT_")}
    proc = subprocess.run(
        [sys.executable, "-m", "fuseport.cli", *args, "--help"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: fuseport {' '.join(args)}".rstrip()), proc.stdout


def test_every_source_package_is_declared_for_the_wheel() -> None:
    """setuptools ships only the packages pyproject lists: a new subpackage left out
    (server/compile was, at first) installs as a wheel that cannot import its server."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(setuptools["packages"])
    roots = {name: ROOT / path for name, path in setuptools["package-dir"].items()}
    for name, root in roots.items():
        for init in root.rglob("__init__.py"):
            sub = init.parent.relative_to(root).parts
            dotted = ".".join((name, *sub))
            assert dotted in declared, f"{dotted} ({init.parent}) is not in pyproject's packages"
