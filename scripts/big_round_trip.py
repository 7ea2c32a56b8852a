"""One very large call on one path, checked bit-exact, with the serving process's peak memory.

    python scripts/big_round_trip.py PATH [GiB] [--kernel] [--dtype int32]

PATH is `stream` (ExecuteStream: shared memory off) or `shm` (shared memory), against
a CPU `fuseport serve --processes 1 --compile-mode off` this starts. The stack is a
tensor of GiB (3 unless given; random bits) and a small one: by default the kernel runs
on the small one and the large one passes through below it (what a round trip of the
bytes costs); with --kernel the kernel is `x + 0` on the large one itself (its result is
a second tensor of the same size, which the server must hold beside its input: 2x the
payload is that call's floor on a path that assembles its input in server memory).

Prints PASS or FAIL (bit-exact, transport as asked), the wall time, and the server's
memory above what it held before the call: peak RSS (VmHWM, reset before the call
through /proc/PID/clear_refs), and, sampled every 10 ms, the peak of its private memory
(RssAnon) and of the shared memory it had touched (RssShmem: the session's regions,
which the client maps too and which count against --shared-memory-max-bytes), each
as a ratio to the payload. Exits 1 on FAIL or a private peak over 1.5x the payload.

Needs about 4x the payload of free memory (the client's tensor, the regions or the
stream's buffers, the server's): run it alone, `nice`d, on a quiet machine."""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from fuseport.client import Client
from fuseport.wire._local import read_port_file, stop_process, wait_until_serving


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmHWM", "VmRSS", "RssAnon", "RssShmem", "RssFile"):
            out[name] = int(rest.split()[0]) * 1024
    return out


def _tail(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def _identity(big: torch.Tensor) -> torch.Tensor:
    return big + 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("path", choices=["stream", "shm"])
    ap.add_argument("gib", type=float, nargs="?", default=3.0)
    ap.add_argument("--kernel", action="store_true", help="x + 0 on the large tensor itself")
    ap.add_argument("--dtype", default="int32")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    nbytes = int(args.gib * (1 << 30)) // dtype.itemsize * dtype.itemsize
    import subprocess

    with tempfile.TemporaryDirectory(prefix="fuseport-big-") as tmp:
        port_file = Path(tmp) / "port"
        cmd = [
            sys.executable, "-m", "fuseport.cli", "serve", "--host", "127.0.0.1", "--port", "0",
            "--port-file", str(port_file), "--store-dir", str(Path(tmp) / "store"), "--device", "cpu",
            "--processes", "1", "--compile-mode", "off",
            "--shared-memory", "on" if args.path == "shm" else "off",
        ]  # fmt: skip
        with open(Path(tmp) / "server.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            port = read_port_file(proc, port_file, "fuseport serve", 120, lambda: "")
            target = f"127.0.0.1:{port}"
            wait_until_serving(target, 120)
            return _run(args, target, proc.pid, dtype, nbytes)
        finally:
            stop_process(proc, timeout=60)
            if proc.returncode not in (0, None):
                print((Path(tmp) / "server.log").read_text(errors="replace")[-3000:])


def _run(args: argparse.Namespace, target: str, pid: int, dtype: torch.dtype, nbytes: int) -> int:
    c = Client(target, timeout=1800, shared_above=0 if args.path == "shm" else 1 << 62)
    small = torch.arange(8, dtype=torch.float32)
    if args.kernel:
        k = c.register(_identity, [torch.zeros(16, dtype=dtype)])
    else:
        k = c.register(_tail, [torch.ones(4)])
    big = torch.empty(nbytes, dtype=torch.uint8)
    big.view(torch.int64 if nbytes % 8 == 0 else torch.uint8).random_()  # in place: no second copy
    big = big.view(dtype)
    # A warm-up of the same shape of call, small: the session, the kernel, the plan.
    warm = [torch.zeros(64, dtype=dtype)] if args.kernel else [torch.zeros(64, dtype=dtype), small]
    c.execute(k, warm)
    time.sleep(0.5)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status(pid)
    peaks = dict(before)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                now = _status(pid)
            except OSError:
                return
            for name, v in now.items():
                peaks[name] = max(peaks[name], v)
            stop.wait(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stack = [big] if args.kernel else [big, small]
    t0 = time.perf_counter()
    try:
        r = c.execute_detailed(k, stack)
    finally:
        stop.set()
        watcher.join()
    wall = time.perf_counter() - t0
    after = _status(pid)
    exact = torch.equal(r.stack[0], big) and (args.kernel or torch.equal(r.stack[1], small * 2))
    ok = exact and r.transport == args.path
    payload = nbytes

    def ratio(name: str) -> str:
        grown = max(peaks[name], after.get(name, 0)) - before[name]
        return f"{name} +{grown >> 20} MiB ({grown / payload:.2f}x)"

    hwm = after["VmHWM"] - before["VmRSS"]
    private = max(peaks["RssAnon"], after["RssAnon"]) - before["RssAnon"]
    print(
        f"{'PASS' if ok else 'FAIL'} {args.path} {'x + 0 on' if args.kernel else 'passing through'} "
        f"{payload / (1 << 30):.2f} GiB of {args.dtype}: transport {r.transport}, bit-exact {exact}, "
        f"{wall:.1f} s; server peak RSS +{hwm >> 20} MiB ({hwm / payload:.2f}x the payload; VmHWM), "
        f"{ratio('RssAnon')}, {ratio('RssShmem')}",
        flush=True,
    )
    del r
    c.close()
    return 0 if ok and private <= 1.5 * payload else 1


if __name__ == "__main__":
    sys.exit(main())
