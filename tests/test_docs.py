"""The documentation stays true: the settings reference is what `Settings` says, the README's
commands are CI's, and every example marked to run (`<!-- fuseport: run -->` before a Python
block, in the README or under docs/) runs against a real server and prints what the page says
it prints (`<!-- fuseport: output -->` before a text block right after it)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import ServerProcess, start_server

ROOT = Path(__file__).resolve().parent.parent
RUN_MARK = "<!-- fuseport: run -->"
OUTPUT_MARK = "<!-- fuseport: output -->"
# What the examples dial; the test dials its own server instead.
EXAMPLE_TARGET = "127.0.0.1:50051"
TEST_COMMAND = 'python -m pytest -m "not gpu" -n 2 --dist loadfile'


@dataclass(frozen=True)
class Example:
    page: str  # relative to the repository
    line: int  # of the marker, 1-based
    code: str
    output: str | None  # what it must print, when the page says

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def _fence(lines: list[str], i: int, lang: str, page: str) -> tuple[str, int]:
    """The body of the fenced block that must open at lines[i], and the index after it."""
    assert i < len(lines) and lines[i].strip() == f"```{lang}", (
        f"{page}:{i + 1}: a marker must be followed by a ```{lang} block, found {lines[i : i + 1]}"
    )
    end = i + 1
    while end < len(lines) and lines[end].strip() != "```":
        end += 1
    assert end < len(lines), f"{page}:{i + 1}: the ```{lang} block never closes"
    return "\n".join(lines[i + 1 : end]) + "\n", end + 1


def collect(path: Path) -> list[Example]:
    page = str(path.relative_to(ROOT))
    lines = path.read_text().splitlines()
    examples = []
    for i, line in enumerate(lines):
        if line.strip() != RUN_MARK:
            continue
        code, after = _fence(lines, i + 1, "python", page)
        output = None
        # The output block follows within a few lines of prose ("It prints:").
        for j in range(after, min(after + 6, len(lines))):
            if lines[j].strip() == OUTPUT_MARK:
                output, _ = _fence(lines, j + 1, "text", page)
                break
            if lines[j].strip() == RUN_MARK or lines[j].startswith("```"):
                break
        examples.append(Example(page, i + 1, code, output))
    return examples


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


EXAMPLES = [example for page in _pages() for example in collect(page)]


def test_the_docs_hold_examples_that_run() -> None:
    # A marker the collector stopped recognising would make the example test pass on nothing.
    pages = {e.page for e in EXAMPLES}
    assert {"README.md", "docs/getting-started.md", "docs/guides/paths.md"} <= pages, pages
    assert sum(e.output is not None for e in EXAMPLES) >= 3


def test_every_marker_in_the_docs_is_collected() -> None:
    # Near misses too (other spacing, indented): an example meant to run must not be skipped silently.
    near = re.compile(r"^\s*<!--\s*fuseport:\s*run\s*-->", re.M)
    marked = sum(len(near.findall(p.read_text())) for p in _pages())
    assert marked == len(EXAMPLES)


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server with the default settings (what the examples describe), on loopback."""
    s = start_server(tmp_path_factory.mktemp("docs"), None)
    yield s
    s.stop()


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_example_runs_against_a_real_server(example: Example, docs_server: ServerProcess) -> None:
    assert EXAMPLE_TARGET in example.code, f"{example}: an example must dial {EXAMPLE_TARGET}"
    code = example.code.replace(EXAMPLE_TARGET, docs_server.target)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(example), "exec"), {"__name__": "__docs_example__"})  # noqa: S102 - our own docs
    if example.output is not None:
        assert printed.getvalue() == example.output, f"{example} printed:\n{printed.getvalue()}"


def _settings_reference():
    spec = importlib.util.spec_from_file_location(
        "settings_reference", ROOT / "scripts" / "settings_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_reference_is_generated_from_settings() -> None:
    reference = _settings_reference()
    assert reference.PAGE.read_text() == reference.render(), (
        "docs/reference/settings.md is stale: run python scripts/settings_reference.py"
    )


def test_settings_reference_names_every_flag_and_variable() -> None:
    from dataclasses import fields

    from fuseport.server.settings import Settings

    text = (ROOT / "docs" / "reference" / "settings.md").read_text()
    for f in fields(Settings):
        assert f"`FUSEPORT_{f.name.upper()}`" in text
        if not f.metadata.get("env_only"):
            assert f"`--{f.name.replace('_', '-')}`" in text


def test_readme_is_a_front_page_with_cis_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert TEST_COMMAND in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(rf"^{re.escape(TEST_COMMAND)}$", ci, re.M), "CI no longer runs the README's test command"
