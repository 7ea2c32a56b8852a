"""The compiled-artifact cache: Inductor's standalone artifacts on disk, keyed by what they were compiled for.

One artifact per (graph variant, ArgSpec, device capability, compile mode,
torch and fuseport versions); its name is the SHA-256 of those, so a different
torch or GPU never finds another's files. Each artifact is two files in the
cache directory:

- ``<name>.bin``: the artifact as `CompiledArtifact.save(format="binary")`
  writes it (Inductor's generated code and compiled kernels);
- ``<name>.json``: what it was compiled for, its size and SHA-256, and what
  the serving process needs to call it (which inputs it takes, the size
  conditions it holds under, its source for Describe). It is renamed into
  place last: an artifact without it does not exist.

Both are written to ``.tmp-*`` files and renamed, so a reader never sees half
a file; a load reads the package once, checks its size and hash against the
JSON and hands those same bytes to the loader, so a truncated or corrupted
file is refused (and recompiled), never loaded. The files are code that this
process will run: the directory is made 0700, and a directory or file that
another user owns or that others may write is refused outright.

The cache is bounded in bytes: after each new artifact the least recently used
ones (the JSON's mtime, touched on every load) are removed until it fits.
Deleting the directory while servers run is safe: they keep the kernels they
loaded and compile again what they do not find.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fuseport.server._files import write_atomically

__all__ = ["Artifact", "ArtifactCache", "ArtifactError", "device_capability"]

log = logging.getLogger(__name__)

# Bumped whenever what a key means changes (how ArgSpecs map to dynamic dims,
# how scalars are bound, the file format): old artifacts are then never found.
ARTIFACT_FORMAT = "fuseport-standalone-1"


class ArtifactError(Exception):
    """An artifact on disk that must not be loaded (damaged, or not safely ours)."""


def _fuseport_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fuseport")
    except PackageNotFoundError:  # a source tree without an install
        return "0+unknown"


def device_capability(device: torch.device) -> str:
    """What compiled code depends on, beyond torch's version: the GPU's
    architecture, or the CPU's instruction set (AVX2 code must not run on a
    CPU without it)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda sm_{major}{minor} {torch.cuda.get_device_name(index)} cuda {torch.version.cuda}"
    return f"{device.type} {platform.machine()} {torch.backends.cpu.get_cpu_capability()}"


@dataclass(frozen=True)
class Artifact:
    name: str  # the hex digest that names its files
    data: bytes  # the package, checked against its recorded size and hash
    meta: dict[str, Any]


class ArtifactCache:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # evictions of this process, one at a time
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._check_owned(self.dir, directory=True)
        for path in self.dir.glob(".tmp-*"):
            # What a crash left mid-write, or another process is writing now: a
            # writer renames within seconds, so only old ones are removed.
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < _now() - 3600:
                    path.unlink()

    @staticmethod
    def key(fields: dict[str, Any]) -> str:
        """The artifact name for what it is compiled for (versions added here)."""
        full = {
            **fields,
            "format": ARTIFACT_FORMAT,
            "torch": torch.__version__,
            "fuseport": _fuseport_version(),
        }
        return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()

    def paths(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.bin", self.dir / f"{name}.json"

    def temp_path(self) -> Path:
        """A fresh path in the cache directory for a compile to write its package to."""
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".bin")
        os.close(fd)
        return Path(tmp)

    def load(self, name: str, *, remove_damaged: bool = True) -> Artifact | None:
        """The artifact, checked; None if there is none. Raises ArtifactError for
        one that exists but must not be used (its files are then removed, unless
        `remove_damaged` is false: a look that must leave the verdict to a real load)."""
        package, meta_path = self.paths(name)
        try:
            meta_raw = meta_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            self._check_owned(meta_path)
            self._check_owned(package)
            meta = json.loads(meta_raw)
            data = package.read_bytes()
            if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise ArtifactError(
                    f"{package.name} is {len(data)} bytes with another hash than the {meta['size']} recorded: "
                    "damaged or truncated"
                )
        except (OSError, ValueError, KeyError, TypeError) as e:
            if remove_damaged:
                self.remove(name)
            raise ArtifactError(f"artifact {name} is unreadable: {e}") from e
        except ArtifactError:
            if remove_damaged:
                self.remove(name)
            raise
        with contextlib.suppress(OSError):
            os.utime(meta_path)  # used now: eviction goes oldest-used first
        return Artifact(name, data, meta)

    def commit(self, name: str, tmp: Path, meta: dict[str, Any]) -> int:
        """Moves a compiled package (at `tmp`, in this directory) into place with
        its JSON, then evicts past the bound. Returns the package's size. Raises
        OSError (a full disk among others) with neither file left in place: the
        artifact is then not cached, and the caller serves it all the same."""
        package, meta_path = self.paths(name)
        digest = hashlib.sha256()
        size = 0
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, package)
        record = json.dumps({**meta, "size": size, "sha256": digest.hexdigest()}, sort_keys=True).encode()
        try:
            write_atomically(meta_path, record)
        except BaseException:
            # No JSON (a full disk, most likely): the package is no artifact, and
            # nothing else would ever remove it (eviction counts JSON files). Unless
            # another process committed the same artifact meanwhile: then it is theirs.
            if not meta_path.exists():
                with contextlib.suppress(OSError):
                    package.unlink()
            raise
        self.evict()
        return size

    def remove(self, name: str) -> None:
        for path in self.paths(name):
            with contextlib.suppress(OSError):
                path.unlink()

    def entries(self) -> list[tuple[float, str, int]]:
        """(last used, name, bytes) of every artifact, oldest-used first."""
        out = []
        for meta_path in self.dir.glob("*.json"):
            name = meta_path.stem
            try:
                used = meta_path.stat().st_mtime
                size = (self.dir / f"{name}.bin").stat().st_size
            except OSError:
                continue  # removed meanwhile, or half of a pair
            out.append((used, name, size))
        return sorted(out)

    def evict(self) -> list[str]:
        """Removes the least recently used artifacts until the cache fits its bound."""
        removed = []
        with self._lock:
            entries = self.entries()
            total = sum(size for _, _, size in entries)
            for _, name, size in entries:
                if total <= self.max_bytes:
                    break
                log.info(
                    "artifact cache: evicting %s (%d bytes) to stay within %d bytes",
                    name,
                    size,
                    self.max_bytes,
                )
                self.remove(name)
                removed.append(name)
                total -= size
        return removed

    def clear(self) -> int:
        """Removes every artifact (and leftover temporary file); returns how many artifacts."""
        count = 0
        for path in list(self.dir.iterdir()):
            if path.suffix in (".bin", ".json") or path.name.startswith(".tmp-"):
                count += path.suffix == ".json"
                with contextlib.suppress(OSError):
                    path.unlink()
        return count

    @staticmethod
    def _check_owned(path: Path, directory: bool = False) -> None:
        """Only load code that this user wrote and nobody else can change."""
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            raise ArtifactError(f"{path} is a symbolic link; the artifact cache takes none")
        if st.st_uid != os.getuid():
            raise ArtifactError(f"{path} belongs to uid {st.st_uid}, not this process's {os.getuid()}")
        if st.st_mode & 0o022:
            kind = "directory" if directory else "file"
            raise ArtifactError(f"{kind} {path} is writable by others (mode {stat.S_IMODE(st.st_mode):o})")


def _now() -> float:
    import time

    return time.time()
