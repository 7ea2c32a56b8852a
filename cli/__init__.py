"""The `fuseport` command: the floor above the library (client), the server and the benchmarks.

    fuseport serve | health | list | describe | stats | demo | cache | bench

`python -m fuseport.cli ...` runs the same command.
"""

from __future__ import annotations

from fuseport.cli.commands import main

__all__ = ["main"]
