"""pytest hooks of the benchmark suite (bench/conftest.py re-exports them; `-p bench.plugin` loads them alone).

- `pytest_benchmark_update_json` adds a "fastcenter" section to the JSON that `--benchmark-json` writes: the
  environment (device, versions, commit), the measured ceilings, and the cases that were skipped or failed with
  their reasons, so `python -m bench.report` can say what was not measured and why.
- `pytest_runtest_logreport` collects those skips and failures.
- `pytest_terminal_summary` prints our CUDA-event medians at the end of the run (pytest-benchmark's own table
  shows host wall-clock times of synchronised calls, which include launch and sync latency), the CPU
  comparison's summary when it ran (bench/cpu_test.py), and last, why GPU cases were skipped: without a GPU the
  session says so in its summary, not only under -rs.

Also here, used by bench/conftest.py: the run order of the cases and the time budget.

All hooks are optional, so loading this without pytest-benchmark is harmless.
"""

from __future__ import annotations

import os
import time

import pytest

from .cases import parse_case_id

# One benchmark session's shared state, filled by the fixtures in bench/conftest.py and by the hooks below.
SESSION: dict = {
    "environment": None,  # environment.collect_environment()
    "peaks": None,  # environment.measure_device_peaks()
    "skipped": [],  # {"id", "nodeid", "reason"}
    "failed": [],  # {"id", "nodeid", "message"}
    "records": [],  # the extra_info records of the cases that ran, in order
    "cpu": None,  # the CPU comparison's results (bench.cpu.compare), when bench/cpu_test.py ran
    "started": time.time(),
}


def run_priority(nodeid: str) -> int:
    """Most telling cases first, so that a time budget cuts the least informative: the training step, then
    every op at the seed shapes, then the large shapes (sorted stably: each class keeps the declared order)."""
    case = parse_case_id(nodeid)
    if case is None:
        return 3
    if case.op == "train_step":
        return 0
    return 1 if case.shape == "seed" else 2


DEFAULT_BUDGET_S = 450.0


def time_budget_s() -> float:
    """FASTCENTER_BENCH_BUDGET_S (default 450; 0 = none): no case starts after this many seconds, so a run ends,
    and pytest-benchmark writes its JSON, inside a 10-minute command even when compiling or autotuning is slow."""
    return float(os.environ.get("FASTCENTER_BENCH_BUDGET_S", DEFAULT_BUDGET_S))


def budget_skip_reason(elapsed_s: float, budget_s: float) -> str | None:
    if budget_s > 0 and elapsed_s > budget_s:
        return (
            f"time budget used up ({elapsed_s:.0f} s > FASTCENTER_BENCH_BUDGET_S={budget_s:.0f}): "
            "run this case with -k in another command"
        )
    return None


def session_section() -> dict:
    """The "fastcenter" section of the benchmark JSON."""
    return {
        "schema": "fastcenter-bench-session/1",
        "environment": SESSION["environment"],
        "peaks": SESSION["peaks"],
        "skipped": list(SESSION["skipped"]),
        "failed": list(SESSION["failed"]),
        "wall_s": time.time() - SESSION["started"],
    }


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fastcenter"] = session_section()


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_runtest_logreport(report):
    case = parse_case_id(report.nodeid)
    if case is None:
        return
    if report.skipped and report.when in ("setup", "call"):
        SESSION["skipped"].append({"id": case.id, "nodeid": report.nodeid, "reason": _skip_reason(report)})
    elif report.failed:
        lines = [line for line in str(report.longreprtext).splitlines() if line.strip()]
        message = lines[-1] if lines else "failed"
        SESSION["failed"].append({"id": case.id, "nodeid": report.nodeid, "when": report.when, "message": message})


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table: the session ends with what did not run, and why
def pytest_terminal_summary(terminalreporter):
    records = SESSION["records"]
    write = terminalreporter.write_line
    if records:
        terminalreporter.section("fastcenter: CUDA-event medians (python -m bench.report turns the JSON into tables)")
        peaks = SESSION["peaks"]
        if peaks:
            copy, matmul = peaks["copy_gbps"], peaks["matmul_tflops"]
            write(f"measured ceilings: copy {copy:.0f} GB/s, bf16 matmul {matmul:.0f} TFLOP/s")
        for r in records:
            if r["op"] == "train_step":
                rate = f"{r['tokens_per_s']:,.0f} tok/s"
            elif r.get("tflops") is not None and r["bound"] == "compute":
                rate = f"{r['tflops']:.1f} TFLOP/s"
            else:
                rate = f"{r['gbps']:.0f} GB/s"
            write(f"{r['case']:<58} {r['median_ms']:>10.4f} ms  {rate}")
        write(f"benchmark wall time {time.time() - SESSION['started']:.0f} s")
    if SESSION["cpu"] is not None:
        from .cpu import summary_text

        terminalreporter.section("fastcenter: CPU comparison (python -m bench.cpu records it in bench/results/)")
        for line in summary_text(SESSION["cpu"]).splitlines():
            write(line)
    skipped = SESSION["skipped"]
    if skipped:
        terminalreporter.section("fastcenter: GPU cases not run")
        counts: dict[str, int] = {}
        for item in skipped:
            counts[item["reason"]] = counts.get(item["reason"], 0) + 1
        for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            write(f"{n} GPU benchmark case(s) skipped: {reason}")
