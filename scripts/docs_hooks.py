"""MkDocs hook (mkdocs.yml `hooks:`): gives mkdocstrings the source folders under their installed
names. pyproject maps fuseport.client to client/, fuseport.wire to wire/, ...: there is no
fuseport/ folder to read, and mkdocstrings reads code without importing it. The links are made
from pyproject's own package-dir table, so a new package needs nothing here."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
API_TREE = ROOT / ".cache" / "docs-api"  # mkdocs.yml: mkdocstrings' `paths`


def lay_out_api_tree() -> None:
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for name, folder in package_dir.items():
        link = API_TREE.joinpath(*name.split("."))
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            if link.resolve() == (ROOT / folder).resolve():
                continue
            link.unlink()
        link.symlink_to(ROOT / folder, target_is_directory=True)


def on_startup(command: str, dirty: bool, **kwargs: Any) -> None:
    lay_out_api_tree()
