"""A server's process tree and its CPU time, read from /proc (Linux): which of its
processes and threads burn the CPU a call costs. Elsewhere every reading is empty."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

__all__ = ["roles", "serving_cpu_us", "thread_cpu_us", "tree"]

# Parts of a server's tree that serve calls (the others: a compile worker, Inductor's
# pool of compile processes, multiprocessing's resource tracker, whose CPU is a
# compile's, not a call's).
_SERVING = ("server", "serving")


def tree(pid: int) -> list[int]:
    """pid and its descendants (a supervisor's serving and compile processes)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((d / "stat").read_text().rpartition(")")[2].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def _role(pid: int) -> str:
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    if "--child" in cmd:
        return "serving " + cmd.split("--child", 1)[1].split()[0]
    if "resource_tracker" in cmd:
        return "resource tracker"
    if "multiprocessing.spawn" in cmd or "multiprocessing.forkserver" in cmd:
        return "compile worker"
    # Its script (torch/_inductor/compile_worker/__main__.py), not any path naming it: a
    # store directory under a test's temporary directory may hold those words.
    if "_inductor/compile_worker" in cmd or "_inductor.compile_worker" in cmd:
        return "inductor pool"
    if "serve" in cmd:
        return "server"
    return f"pid {pid}"


def roles(pids: list[int]) -> dict[int, str]:
    """Each thread's process by its part in the tree (from its command line), so that CPU
    spent outside the serving process that answers (a compile worker, Inductor's pool,
    the other serving processes) shows where it is."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            role = _role(pid)
            for task in Path(f"/proc/{pid}/task").iterdir():
                out[int(task.name)] = role
    return out


def thread_cpu_us(pids: list[int]) -> dict[int, tuple[str, float]]:
    """Each thread's name and CPU time so far (us): which of the server's threads
    burns the CPU (OpenMP's spinning workers are not Python threads; py-spy misses them)."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    comm = (task / "comm").read_text().strip()
                    f = (task / "stat").read_text().rpartition(")")[2].split()
                    out[int(task.name)] = (comm, (int(f[11]) + int(f[12])) * 1e6 / os.sysconf("SC_CLK_TCK"))
    return out


def serving_cpu_us(pid: int) -> float:
    """CPU time so far (us) of the processes of `pid`'s tree that serve calls: `pid`
    itself and, under a supervisor, its serving processes; not a compile's. From each
    process's CPU clock (nanoseconds, threads that ended included: /proc/PID/stat counts
    10 ms ticks, too coarse for a few dozen calls, and summing live threads would lose
    an ended thread's whole life)."""
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            if p != pid and not _role(p).startswith(_SERVING):
                continue
            total += _process_cpu_us(p)
    return total


def _process_cpu_us(pid: int) -> float:
    # Linux's CPU clock of a whole process: MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED).
    try:
        return time.clock_gettime_ns((~pid << 3) | 2) / 1000
    except OSError:  # a kernel that refuses it: /proc's ticks
        f = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(f[11]) + int(f[12])) * 1e6 / os.sysconf("SC_CLK_TCK")
