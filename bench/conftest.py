"""The benchmark session: what it skips where, the fixtures of the cases, and what it writes.

Without CUDA every GPU case is marked skipped at collection with one reason, so no GPU code runs and the session
ends by saying why; the CPU comparison (bench/test_compare_plain.py) runs there instead, and is skipped where a GPU
is (unless FASTCENTER_BENCH_CPU=1). FASTCENTER_BENCH_DRY_RUN=1 runs the GPU cases on the CPU at tiny shapes.

What a session gathers (environment, measured ceilings, records, skips and failures) lives on one `BenchSession`,
a plugin object registered per session: it adds a "fastcenter" section to the JSON that `--benchmark-json` writes,
rewrites FASTCENTER_BENCH_PARTIAL=PATH (the same JSON shape) atomically after every case, so that a session killed
at any moment keeps what it measured, and prints the medians, the CPU comparison and the skip reasons at its end.
"""

from __future__ import annotations

import datetime
import gc
import importlib.util
import json
import os
import pathlib
import sys
import time

import pytest
import torch

from fastcenter.environment import collect as collect_environment
from fastcenter.files import atomic_write_text

from .cases import describe_ops, parse_case_id
from .compare_plain import summary_text
from .measure import CUDA_SKIP_REASON, dry_run, l2_flush, measure_device_peaks, on_gpu

PLUGIN_SKIP_REASON = "fastcenter benchmarks need pytest-benchmark (pip install -e '.[dev]'): nothing was measured"
CPU_ON_GPU_SKIP_REASON = (
    "the CPU comparison (bench/test_compare_plain.py) is for machines without a GPU; FASTCENTER_BENCH_CPU=1 runs it "
    "here too"
)
SESSION_SCHEMA = "fastcenter-bench-session/1"
BENCH_DIR = pathlib.Path(__file__).resolve().parent


def skip_reason(cpu_comparison: bool = False) -> str | None:
    """Why the GPU cases (or the CPU comparison, which runs where they cannot and in a dry run) cannot run here,
    or None when they can."""
    if importlib.util.find_spec("pytest_benchmark") is None:
        return PLUGIN_SKIP_REASON
    if cpu_comparison:
        return CPU_ON_GPU_SKIP_REASON if on_gpu() and os.environ.get("FASTCENTER_BENCH_CPU", "0") != "1" else None
    return CUDA_SKIP_REASON if not on_gpu() and not dry_run() else None


class BenchSession:
    """One session's findings (see the module docstring); its methods named pytest_* are its hooks."""

    def __init__(self):
        self.started = time.time()
        self.datetime = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.environment: dict | None = None
        self.peaks: dict | None = None
        self.records: list[dict] = []
        self.skipped: list[dict] = []  # {"id", "nodeid", "reason"}
        self.failed: list[dict] = []  # {"id", "nodeid", "when", "message"}
        self.cpu: dict | None = None  # the CPU comparison's results, when it ran
        self.partial = os.environ.get("FASTCENTER_BENCH_PARTIAL")

    def ensure_environment(self) -> None:
        if self.environment is None:
            self.environment = {**collect_environment(), "dry_run": dry_run(), "argv": " ".join(sys.argv)}
            if dry_run():
                self.environment["device"] = {"name": "cpu (dry run)"}

    def section(self) -> dict:
        self.ensure_environment()
        return {
            "schema": SESSION_SCHEMA,
            "environment": self.environment,
            "peaks": self.peaks,
            "ops": describe_ops(),
            "skipped": self.skipped,
            "failed": self.failed,
            "wall_s": time.time() - self.started,
        }

    def add(self, record: dict) -> None:
        self.records.append(record)
        self.write_partial()

    def write_partial(self) -> None:
        if self.partial:
            data = {"datetime": self.datetime, "benchmarks": [{"extra_info": r} for r in self.records]}
            atomic_write_text(self.partial, json.dumps({**data, "fastcenter": self.section()}, indent=1) + "\n")

    @pytest.hookimpl(optionalhook=True)
    def pytest_benchmark_update_json(self, config, benchmarks, output_json):
        output_json["fastcenter"] = self.section()

    def pytest_runtest_logreport(self, report):
        case = parse_case_id(report.nodeid)
        if case is None:
            return
        if report.skipped and report.when in ("setup", "call"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skipped.append({"id": case.id, "nodeid": report.nodeid, "reason": reason.removeprefix("Skipped: ")})
        elif report.failed:
            lines = [line for line in str(report.longreprtext).splitlines() if line.strip()]
            message = lines[-1] if lines else "failed"
            self.failed.append({"id": case.id, "nodeid": report.nodeid, "when": report.when, "message": message})
        else:
            return
        self.write_partial()

    @pytest.hookimpl(trylast=True)  # after pytest-benchmark's table: the session ends with what did not run, and why
    def pytest_terminal_summary(self, terminalreporter):
        write = terminalreporter.write_line
        if self.records:
            terminalreporter.section(
                "fastcenter: CUDA-event medians (python -m bench.report turns the JSON into tables)"
            )
            if self.peaks:
                write(
                    f"measured ceilings: copy {self.peaks['copy_gbps']:.0f} GB/s, bf16 matmul "
                    f"{self.peaks['matmul_tflops']:.0f} TFLOP/s"
                )
            for r in self.records:
                if r.get("tokens_per_s") is not None:
                    rate = f"{r['tokens_per_s']:,.0f} tok/s"
                elif r.get("tflops") is not None and r["bound"] == "compute":
                    rate = f"{r['tflops']:.1f} TFLOP/s"
                else:
                    rate = f"{r.get('gbps', 0):.0f} GB/s"
                write(f"{r['case']:<58} {r['median_ms']:>10.4f} ms  {rate}")
        if self.cpu is not None:
            terminalreporter.section("fastcenter: CPU comparison (python -m bench.compare_plain files it)")
            for line in summary_text(self.cpu).splitlines():
                write(line)
        if self.skipped:
            terminalreporter.section("fastcenter: GPU cases not run")
            counts: dict[str, int] = {}
            for item in self.skipped:
                counts[item["reason"]] = counts.get(item["reason"], 0) + 1
            for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
                write(f"{n} GPU benchmark case(s) skipped: {reason}")


def pytest_configure(config):
    if not config.pluginmanager.has_plugin("fastcenter_bench"):
        config.pluginmanager.register(BenchSession(), "fastcenter_bench")


def pytest_collection_modifyitems(config, items):
    gpu, cpu = skip_reason(), skip_reason(cpu_comparison=True)
    for item in items:
        if BENCH_DIR not in pathlib.Path(item.path).resolve().parents:
            continue
        reason = cpu if item.path.name == "test_compare_plain.py" else gpu
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_report_header(config):
    reason = skip_reason()
    if reason is not None:
        return f"fastcenter bench: {reason}" + (
            "; the CPU comparison runs instead" if skip_reason(cpu_comparison=True) is None else ""
        )
    if dry_run():
        return "fastcenter bench: DRY RUN on the CPU (FASTCENTER_BENCH_DRY_RUN=1): checks the harness, measures nothing"
    return f"fastcenter bench: {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"


@pytest.fixture(scope="session")
def bench_session(request) -> BenchSession:
    """The session's BenchSession, its environment collected and (on a GPU) its two ceilings measured."""
    session = request.config.pluginmanager.get_plugin("fastcenter_bench")
    session.ensure_environment()
    if session.peaks is None and on_gpu():
        session.peaks = measure_device_peaks()
    return session


@pytest.fixture(scope="session", name="l2_flush")
def _l2_flush():
    return l2_flush() if on_gpu() else None


@pytest.fixture(autouse=True)
def _release_memory(request):
    """Each case starts from an empty caching allocator: no fragmentation carried over, fair peak memory. Compiled
    graphs and models hold reference cycles: those cases also get a garbage collection (up to a second each)."""
    yield
    case = parse_case_id(request.node.nodeid)
    if case is not None and ("compile" in case.variant or case.op == "train_step"):
        gc.collect()
    if on_gpu():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
