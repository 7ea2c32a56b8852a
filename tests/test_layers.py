"""The house's floors: which package may import which, so that no import runs back up.

    fuseport.cli                    the `fuseport` command
      └── fuseport.bench            benchmarks (a server and clients of their own)
            ├── fuseport.server     the server; knows no client
            └── fuseport.client     the library users import; knows no server
                  (both) └── fuseport.wire       shared by client and server
                               └── fuseport.v1, fuseport.kserve   generated stubs

A package imports only its own floor and those below it. The client library
above all must not reach the server, the benchmarks or the CLI: a client-only
install would pull the server's code (and a circle makes either side's change
the other's problem).

Within a package the modules import one another without a circle either
(`test_no_module_imports_itself_round_a_circle`): every import counts, at
module level, inside a function or under TYPE_CHECKING, since a circle hidden
in a function is still one a reader must hold in mind, and it breaks the day
the import moves up. A piece two modules share goes in a module below both.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What each package may import besides itself.
MAY_IMPORT: dict[str, set[str]] = {
    "fuseport.v1": set(),
    "fuseport.kserve": {"fuseport.v1"},
    "fuseport.wire": {"fuseport.v1"},
    "fuseport.server": {"fuseport.wire", "fuseport.v1", "fuseport.kserve"},
    "fuseport.client": {"fuseport.wire", "fuseport.v1"},
    "fuseport.bench": {"fuseport.client", "fuseport.server", "fuseport.wire", "fuseport.v1"},
    "fuseport.cli": {"fuseport.bench", "fuseport.client", "fuseport.server", "fuseport.wire", "fuseport.v1"},
}


def _roots() -> dict[str, Path]:
    """Top-level packages (fuseport.X) and their source folders, as pyproject maps them."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / path for name, path in dirs.items() if name.count(".") == 1}


def _imported(path: Path) -> set[str]:
    """Every absolute module name a file imports, at any depth (inside functions and
    TYPE_CHECKING blocks too: the floors hold for what a reader sees, not only what runs)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules() -> dict[str, Path]:
    """Every module of the installed layout (fuseport.server.core, ...) and its source file."""
    modules: dict[str, Path] = {}
    for name, folder in _roots().items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((name, *parts))] = path
    return modules


def _edges(path: Path, module: str, modules: dict[str, Path]) -> dict[str, int]:
    """The fuseport modules a file imports -> the line of the first such import.

    `from P import name` reads P (its __init__ runs and is asked for `name`), and
    P.name as well where that is a module; `import P.Q` names P.Q. The parent
    packages every import runs first are not counted: every module has them."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        if name in modules and name != module:
            found.setdefault(name, line)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's own package upwards
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            add(source, node.lineno)
            for alias in node.names:
                add(f"{source}.{alias.name}", node.lineno)
    return found


def _circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's), each in import order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _package_of(module: str, packages: set[str]) -> str | None:
    return next((p for p in packages if module == p or module.startswith(p + ".")), None)


def test_every_package_has_a_floor() -> None:
    assert set(_roots()) == set(MAY_IMPORT), "a package in pyproject without a floor here (or one gone)"


def test_the_floors_have_no_circle() -> None:
    # Each package may import only packages of lower floors: a topological order exists.
    placed: list[str] = []
    remaining = dict(MAY_IMPORT)
    while remaining:
        ready = [p for p, deps in remaining.items() if deps <= set(placed)]
        assert ready, f"the allowed imports go round in a circle: {sorted(remaining)}"
        placed += ready
        for p in ready:
            del remaining[p]


def test_no_import_runs_back_up() -> None:
    roots = _roots()
    packages = set(roots)
    wrong: dict[tuple[Path, str], str] = {}  # (file, package it may not import) -> the first such import
    for package, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            for module in sorted(_imported(path)):
                target = _package_of(module, packages)
                if target is not None and target != package and target not in MAY_IMPORT[package]:
                    wrong.setdefault(
                        (path.relative_to(ROOT), target), f"{module} ({package} may not import {target})"
                    )
    assert not wrong, "\n".join(f"{path} imports {what}" for (path, _), what in wrong.items())


def test_no_module_imports_itself_round_a_circle() -> None:
    modules = _modules()
    graph = {m: _edges(path, m, modules) for m, path in modules.items()}
    assert "fuseport.server.core" in graph["fuseport.server.app"]  # the edges are really read
    circles = _circles(graph)
    shown = []
    for component in circles:
        inside = set(component)
        lines = [
            f"  {modules[m].relative_to(ROOT)}:{line} imports {target}"
            for m in component
            for target, line in sorted(graph[m].items())
            if target in inside
        ]
        shown.append(" <-> ".join(component) + "\n" + "\n".join(lines))
    assert not circles, "import circles:\n" + "\n".join(shown)


def test_the_circle_finder_finds_a_circle() -> None:
    # The check above passes on an empty answer, so the finder itself is pinned.
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}, "e": {}}
    assert _circles(graph) == [["a", "b", "c"]]
    assert _circles({"a": {"b": 1}, "b": {}}) == []


def test_the_client_library_loads_nothing_of_the_server_bench_or_cli() -> None:
    # At run time too, through the lazy exports: every module of the client package,
    # and every public name, imported in a fresh interpreter.
    code = (
        "import importlib, pkgutil, sys\n"
        "import fuseport.client as c\n"
        "for m in pkgutil.walk_packages(c.__path__, 'fuseport.client.'):\n"
        "    importlib.import_module(m.name)\n"
        "for name in c.__all__:\n"
        "    getattr(c, name)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('fuseport.'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.split()
    assert "fuseport.client.client" in loaded  # the check ran through the real modules
    above = [m for m in loaded if _package_of(m, {"fuseport.server", "fuseport.bench", "fuseport.cli"})]
    assert not above, f"importing the client library loaded {above}"
