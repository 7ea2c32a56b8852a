"""What legacy CUDA IPC does on this machine, measured before fuseport relies on it.

    python3 scripts/cuda_ipc_probe.py        # on the GPU machine, fuseport importable

Each scenario runs in a process of its own (an importer), which starts an
exporter process of its own, so a scenario that breaks its CUDA context breaks
nothing else. Prints one line per finding; docs/guides/paths.md and docs/perf.md quote them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from fuseport.wire import cuda_ipc

N = 64 << 20  # float32 elements: 256 MiB


def exporter() -> None:
    drv = cuda_ipc.driver()
    assert drv is not None, cuda_ipc.why_not()
    held: list[torch.Tensor] = []

    def export(t: torch.Tensor) -> dict:
        # Not torch's _share_cuda_(): it parks a shared block in torch's IPC limbo, so
        # a later free would not reach the driver and the scenarios below would lie.
        e = drv.export(t)
        return {"handle": e.handle.hex(), "offset": e.offset, "allocation": e.allocation_bytes,
                "uuid": e.device_uuid.hex(), "ptr": t.data_ptr(), "nbytes": t.numel() * t.element_size()}

    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "make":
            full = torch.arange(N + 1000, device="cuda", dtype=torch.float32)
            torch.cuda.synchronize()
            held[:] = [full]
            out = export(full[1000:])  # a view: offset 4000 bytes into the allocation
        elif cmd == "free":
            held.clear()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # cudaFree of the segment
            out = {"freed": True}
        elif cmd == "again":  # same size again: a new allocation, maybe at the same address
            full = torch.arange(N + 1000, device="cuda", dtype=torch.float32) * 2
            torch.cuda.synchronize()
            held[:] = [full]
            out = export(full[1000:])
        elif cmd == "exit":
            os._exit(0)
        else:
            out = {"error": cmd}
        print(json.dumps(out), flush=True)


class Peer:
    def __init__(self) -> None:
        self.p = subprocess.Popen([sys.executable, __file__, "exporter"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)

    def ask(self, cmd: str) -> dict:
        assert self.p.stdin and self.p.stdout
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        if cmd == "exit":
            self.p.wait(30)
            return {}
        return json.loads(self.p.stdout.readline())


def report(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def usable() -> bool:
    try:
        return torch.ones(4, device="cuda").sum().item() == 4.0
    except Exception as e:  # noqa: BLE001 - the finding is the error
        report(after="context", error=repr(e)[:300])
        return False


def importer(scenario: str) -> None:
    drv = cuda_ipc.driver()
    assert drv is not None, cuda_ipc.why_not()
    torch.ones(1, device="cuda")
    peer = Peer()
    e = peer.ask("make")
    ordinal = next(i for i in range(torch.cuda.device_count()) if drv.uuid(i) == bytes.fromhex(e["uuid"]))
    if scenario == "basics":
        t0 = time.perf_counter()
        ptr, size = drv.open(ordinal, bytes.fromhex(e["handle"]))
        first = time.perf_counter() - t0
        view = cuda_ipc.as_bytes(ptr + e["offset"], e["nbytes"], ordinal).view(torch.float32)
        ok = bool(torch.equal(view[:1000].cpu(), torch.arange(1000, 2000, dtype=torch.float32)))
        report(scenario=scenario, mapped=size, allocation=e["allocation"], offset=e["offset"], values_ok=ok,
               same_pointer_as_exporter=ptr + e["offset"] == e["ptr"], first_open_us=first * 1e6)
        # A second open of the same handle in this context: one more reference, same pointer.
        ptr2, _ = drv.open(ordinal, bytes.fromhex(e["handle"]))
        report(second_open_same_pointer=ptr2 == ptr)
        drv.close(ordinal, ptr2)
        drv.close(ordinal, ptr)
        for mib in (16, 256):
            dst = torch.empty(mib << 20, dtype=torch.uint8, device="cuda")
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                p, _ = drv.open(ordinal, bytes.fromhex(e["handle"]))
                dst.copy_(cuda_ipc.as_bytes(p, mib << 20, ordinal))
                torch.cuda.current_stream().synchronize()
                drv.close(ordinal, p)
                times.append(time.perf_counter() - t0)
            times.sort()
            report(open_copy_close_mib=mib, p50_us=times[len(times) // 2] * 1e6, min_us=times[0] * 1e6)
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            p, _ = drv.open(ordinal, bytes.fromhex(e["handle"]))
            drv.close(ordinal, p)
            times.append(time.perf_counter() - t0)
        times.sort()
        report(open_close_p50_us=times[100] * 1e6, min_us=times[0] * 1e6)
        export_times = []
        src = torch.empty(1 << 20, device="cuda")
        for _ in range(200):
            t0 = time.perf_counter()
            drv.export(src)
            export_times.append(time.perf_counter() - t0)
        export_times.sort()
        report(export_p50_us=export_times[100] * 1e6)
        for bad in (b"\0" * 64, os.urandom(64), bytes.fromhex(e["handle"])[:32] + os.urandom(32)):
            try:
                p, _ = drv.open(ordinal, bad)
                report(bad_handle="opened!", ptr=p)
            except cuda_ipc.CudaError as err:
                report(bad_handle=str(err))
        try:
            drv.open(ordinal, drv.export(src).handle)
            report(own_handle="opened")
        except cuda_ipc.CudaError as err:
            report(own_handle=str(err))
        report(context_usable=usable())
    elif scenario == "again":
        again = peer.ask("free") and peer.ask("again")
        report(scenario=scenario, same_handle=again["handle"] == e["handle"], same_address=again["ptr"] == e["ptr"])
        try:
            p, _ = drv.open(ordinal, bytes.fromhex(e["handle"]))
            v = cuda_ipc.as_bytes(p + e["offset"], 4000, ordinal).view(torch.float32)
            report(stale_handle="opened", first=v[:3].tolist())
        except cuda_ipc.CudaError as err:
            report(stale_handle=str(err))
        report(context_usable=usable())
    elif scenario in ("freed", "exited"):
        p, size = drv.open(ordinal, bytes.fromhex(e["handle"]))
        peer.ask("free") if scenario == "freed" else peer.ask("exit")
        time.sleep(0.5)
        try:
            v = cuda_ipc.as_bytes(p, size, ordinal)
            got = v.view(torch.float32)[1000:1003].tolist()
            v.fill_(7)  # a write, too
            torch.cuda.synchronize()
            report(scenario=scenario, read_after=got, write_after="ok")
        except Exception as err:  # noqa: BLE001
            report(scenario=scenario, read_after=repr(err)[:300])
        report(context_usable=usable())
        try:
            drv.close(ordinal, p)
            report(close_after="ok")
        except Exception as err:  # noqa: BLE001
            report(close_after=repr(err)[:300])
        report(context_usable_after_close=usable())
    if peer.p.poll() is None:
        peer.ask("exit")


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    report(device=props.name, torch=torch.__version__, cuda=torch.version.cuda)
    for scenario in ("basics", "again", "freed", "exited"):
        r = subprocess.run([sys.executable, __file__, "importer", scenario], capture_output=True, text=True,
                           timeout=120)
        print(r.stdout, end="")
        if r.returncode:
            report(scenario=scenario, exit=r.returncode, stderr=r.stderr[-800:])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "exporter":
        exporter()
    elif len(sys.argv) > 1 and sys.argv[1] == "importer":
        importer(sys.argv[2])
    else:
        main()
