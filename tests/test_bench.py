"""`fuseport bench --quick` end to end, and the pieces of the bench that need no server."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fuseport.bench.run import DEFAULT_SECTIONS, _check_gpus
from fuseport.bench.stats import Row, parse_size, percentile


def _numbers(obj: Any, path: str = "") -> list[tuple[str, float]]:
    """Every number in a JSON tree, with where it is."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [(path, float(obj))]
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in _numbers(v, f"{path}.{k}")]
    if isinstance(obj, list):
        return [n for i, v in enumerate(obj) for n in _numbers(v, f"{path}[{i}]")]
    return []


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fuseport.cli", "bench", "--quick", "--device", "cpu",
         "--json", str(out), "--no-plot"],
        capture_output=True, text=True, timeout=300, cwd=tmp,
    )  # fmt: skip
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "measurement" in proc.stdout and "status" in proc.stdout, proc.stdout  # the table was printed
    return json.loads(out.read_text())  # type: ignore[no-any-return]


@pytest.mark.slow  # a minute of CPU: the whole quick bench; CI keeps to 15 minutes
def test_quick_bench_writes_every_section_with_positive_numbers(quick_results: dict[str, Any]) -> None:
    assert quick_results["errors"] == {}
    assert set(quick_results["sections"]) == set(DEFAULT_SECTIONS)
    for name, section in quick_results["sections"].items():
        assert section["rows"], f"section {name} has no rows"
        for row in section["rows"]:
            assert math.isfinite(row["value"]) and row["value"] > 0, row
            if row["floor"] is not None:
                assert math.isfinite(row["floor"]) and row["floor"] > 0, row
                assert row["ratio"] > 0, row
            assert row["status"] in ("PASS", "MISS", "info", "n/a"), row
    for path, value in _numbers(quick_results["sections"]):
        assert math.isfinite(value), path
    machine = quick_results["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"] and machine["grpc"]


@pytest.mark.slow  # a minute of CPU: the whole quick bench; CI keeps to 15 minutes
def test_quick_bench_execute_rows_ran_the_fused_kernel(quick_results: dict[str, Any]) -> None:
    points = quick_results["sections"]["transport"]["points"]
    assert [p["size"] for p in points] == [1024, 64 << 10]
    for p in points:
        n = p["iterations"]
        assert p["methods"]["execute"]["paths"] == {"fused": n}
        assert p["methods"]["fallback"]["paths"] == {"fallback/requested": n}
        assert p["methods"]["echo"]["p50_us"] > 0
        # Each server's CPU per call (small sizes): both burn some for their calls.
        cpu = p["server_cpu_us_per_call"]
        assert cpu["fuseport"] > 0 and cpu["echo"] > 0, cpu
    for name, case in quick_results["sections"]["device"]["cases"].items():
        assert set(case["execute"]["paths"]) == {"fused"}, name
        assert set(case["fallback"]["paths"]) == {"fallback/requested"}, name
        assert case["max_abs_diff"]["server_fused"] < 1e-3, name
    conc = quick_results["sections"]["concurrency"]
    assert all(set(r["paths"]) == {"fused"} for r in conc["execute"])
    compile_ = quick_results["sections"]["compile"]
    assert compile_["during_compile"]["n"] > 0
    assert compile_["during_compile_wrong"] == []
    assert compile_["compile_s_server"] > 0


@pytest.mark.slow  # a minute of CPU: the whole quick bench; CI keeps to 15 minutes
def test_quick_bench_judges_the_issue_targets(quick_results: dict[str, Any]) -> None:
    judged = {r["name"]: r for r in quick_results["rows"] if r["target"]}
    assert judged["Execute 1 KiB p50"]["target"] == "<= 1.3x"
    assert judged["Execute 1 KiB p50"]["status"] in ("PASS", "MISS")
    assert judged["server overhead, 1 KiB Execute"]["status"] in ("PASS", "MISS")
    assert judged["Execute 1 KiB on a resident value p50"]["target"] == "<= 1.5x"
    # GPU targets are not judged on a CPU server.
    assert judged["pointwise: fused vs memory floor"]["status"] == "n/a"
    assert judged["p99 of requests during compile"]["status"] in ("PASS", "MISS")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1K", 1024), ("64KiB", 64 << 10), ("16M", 16 << 20), ("256MB", 256 << 20), ("4096", 4096), ("1g", 1 << 30)],
)
def test_parse_size_reads_binary_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "0", "-1K", "12 parsecs"])
def test_parse_size_rejects_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_row_judges_ratio_targets_and_absolute_targets() -> None:
    assert Row("t", "lat", 13.0, "us", "echo", 10.0, target="<= 1.3x").judge().status == "PASS"
    assert Row("t", "lat", 14.0, "us", "echo", 10.0, target="<= 1.3x").judge().status == "MISS"
    assert Row("t", "bw", 0.79, "GB/s", "echo", 1.0, target=">= 0.8x").judge().status == "MISS"
    assert Row("t", "overhead", 99.0, "us", target="<= 100 us").judge().status == "PASS"
    assert Row("t", "floor", 2.0, "ms", "f", 1.0, target="<= 1.15x (GPU)").judge(gpu_only=True, on_gpu=False).status == "n/a"
    assert Row("t", "info", 1.0, "ms").judge().status == "info"


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile(list(range(101)), 99) == 99


def test_bench_rejects_an_unknown_section(tmp_path: Path) -> None:
    from fuseport.bench.run import main

    assert main(["--sections", "transport,warp-drive", "--json", str(tmp_path / "x.json")]) == 2


def test_the_gpus_section_refuses_fewer_than_two_devices_before_starting_anything(tmp_path: Path) -> None:
    """On this machine `--device all` is the CPU alone: a clear refusal (status 2), not a silent pass."""
    proc = subprocess.run(
        [sys.executable, "-m", "fuseport.cli", "bench", "--sections", "gpus", "--device", "all",
         "--json", str(tmp_path / "r.json"), "--no-plot"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "gpus section compares one device with several" in proc.stderr, proc.stderr
    assert "at least two GPUs" in proc.stderr
    assert not (tmp_path / "r.json").exists()
    for device in ("cuda:0", "cpu"):
        with pytest.raises(ValueError, match="names 1"):
            _check_gpus(device, None)
    with pytest.raises(ValueError, match="cannot run against a --target"):
        _check_gpus("cuda:0,cuda:1", "10.0.0.1:50051")
    _check_gpus("cuda:0,cuda:1", None)  # two devices: fine (checked when its servers start)


@pytest.mark.slow  # three server processes and two client processes: a minute of CPU
def test_the_gpus_section_runs_on_two_cpu_processes_as_a_smoke_check(tmp_path: Path) -> None:
    out = tmp_path / "gpus.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fuseport.cli", "bench", "--quick", "--sections", "gpus", "--device", "cpu,cpu",
         "--server-env", "FUSEPORT_COMPILE_MODE=off", "--json", str(out), "--no-plot"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    results = json.loads(out.read_text())
    gpus = results["sections"]["gpus"]
    assert results["errors"] == {}
    assert gpus["devices"] == ["cpu", "cpu"] and gpus["processes"] == 2
    assert sorted(gpus["clients_per_process"].values()) == [1, 1]  # spread over both processes
    assert set(gpus["max_abs_diff"]) == {"one", "all"}  # each server's result checked against eager's
    assert all(d < 1e-4 for d in gpus["max_abs_diff"].values()), gpus["max_abs_diff"]
    for side in ("one", "all"):
        assert all(r["calls"] > 0 and r["paths"] == {"fallback/disabled": r["calls"]} for r in gpus[side])
    (judged,) = [r for r in gpus["rows"] if r["target"]]
    assert judged["target"] == ">= 1.8x" and judged["status"] == "n/a"  # a GPU target, on the CPU
    assert judged["ratio"] == pytest.approx(gpus["ratio"])
