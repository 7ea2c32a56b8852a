"""Reporting the benchmark: the table on stdout, the JSON file, and the optional PNG plot."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from fuseport.bench.stats import Row, fmt_bytes

__all__ = ["fmt_value", "print_table", "write_json", "write_plot"]

log = logging.getLogger(__name__)


def fmt_value(v: float | None, unit: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if unit == "us":
        return f"{v / 1e3:.2f} ms" if v >= 10_000 else f"{v:.0f} us"
    if unit == "ms":
        return f"{v:.3f} ms" if v < 1 else f"{v:.1f} ms" if v >= 100 else f"{v:.2f} ms"
    if unit == "s":
        return f"{v:.2f} s"
    if unit == "x":
        return f"{v:.2f}x"
    if unit == "calls/s":
        return f"{v:,.0f}/s"
    if unit == "calls":
        return f"{v:.0f}"
    return f"{v:.3g} {unit}"


def print_table(result: dict[str, Any], rows: list[Row], notes: list[str]) -> None:
    """The product of `fuseport bench`: one table on stdout, every row with its floor."""
    m = result["machine"]
    s = result["settings"]
    print()
    print(
        f"fuseport bench: server device {s['server_device']} ({m['device_name']}), "
        f"{m['cpu_count']} CPUs, torch {m['torch']}, grpcio {m['grpc']}, python {m['python']}"
    )
    print(
        f"{m['date']}; sections {', '.join(s['sections'])}; payloads {', '.join(fmt_bytes(x) for x in s['sizes'])}"
        f"{'; --quick' if s['quick'] else ''}; wall {result['wall_seconds']:.0f} s"
    )
    headers = ("section", "measurement", "value", "floor", "ratio", "target", "status")
    cells = []
    for r in rows:
        floor = f"{fmt_value(r.floor, r.unit)} {r.floor_name}" if r.floor is not None else ""
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        cells.append((r.section, r.name, fmt_value(r.value, r.unit), floor, ratio, r.target, r.status))
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print()
    print(line)
    print("-" * len(line))
    last = None
    for r, c in zip(rows, cells):
        shown = ("" if c[0] == last else c[0],) + c[1:]
        last = c[0]
        print("  ".join(x.ljust(w) for x, w in zip(shown, widths)).rstrip())
        if r.note:
            print(" " * (widths[0] + 4) + r.note)
    judged = [r for r in rows if r.status in ("PASS", "MISS")]
    print()
    print(
        f"targets: {sum(r.status == 'PASS' for r in judged)} PASS, {sum(r.status == 'MISS' for r in judged)} MISS"
        f", {sum(r.status == 'n/a' for r in rows)} n/a (GPU targets, judged only on a GPU at full sizes)"
    )
    for n in notes:
        print(n)


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON: {type(v).__name__}")


def write_plot(path: Path, result: dict[str, Any]) -> str | None:
    """A PNG of the transport, device and concurrency numbers. Returns why it
    was not written (matplotlib missing, nothing to plot), or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'fuseport[bench]')"
    sections = result["sections"]
    panels = []
    if "transport" in sections:
        panels += ["latency", "throughput"]
    if "device" in sections:
        panels.append("device")
    if "concurrency" in sections:
        panels.append("concurrency")
    if not panels:
        return "no section to plot"
    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        if panel in ("latency", "throughput"):
            points = sections["transport"]["points"]
            sizes = [p["size"] for p in points]
            for method in ("echo", "execute", "fallback"):
                key = "p50_us" if panel == "latency" else "gbps_p50"
                ax.plot(sizes, [p["methods"][method][key] for p in points], marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("payload bytes")
            ax.set_ylabel("p50 latency (us)" if panel == "latency" else "GB/s (payload / p50)")
            ax.set_title("transport: " + panel)
            ax.legend()
        elif panel == "device":
            cases = sections["device"]["cases"]
            names = list(cases)
            bars = [("local_fused_us", "fused"), ("local_fallback_us", "fallback"), ("local_eager_us", "eager"),
                    ("memory_floor_us", "memory floor")]
            width = 0.8 / len(bars)
            for i, (field, label) in enumerate(bars):
                xs = [j + i * width for j in range(len(names))]
                ax.bar(xs, [cases[n].get(field, 0) / 1e3 for n in names], width, label=label)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
            ax.set_ylabel("ms (in-process, median)")
            ax.set_yscale("log")
            ax.set_title(f"device: {sections['device']['local_device']}")
            ax.legend()
        else:
            c = sections["concurrency"]
            for method in ("echo", "execute"):
                ax.plot([r["clients"] for r in c[method]], [r["throughput"] for r in c[method]], marker="o",
                        label=method)
            levels = [r["clients"] for r in c["echo"]]
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(n) for n in levels])
            ax.set_xlabel("client processes")
            ax.set_ylabel("1 KiB calls/s")
            ax.set_title("concurrency")
            ax.legend()
    fig.suptitle(f"fuseport bench, server device {result['settings']['server_device']}"
                 f" ({result['machine']['device_name']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
