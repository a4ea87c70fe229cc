"""Fixtures of the benchmark suite, and the skips that cover the part of it that cannot run here.

Without CUDA (or without pytest-benchmark) every GPU case is marked skipped at collection time with one reason
(bench.environment.skip_reason), so `pytest bench/` runs no GPU code there: the test modules import cleanly on a
CPU, and no GPU fixture below is ever set up. What does run there is the CPU comparison (bench/cpu_test.py,
`train.py --fused` on the CPU against a plain-PyTorch GPT), which is skipped in turn where a GPU is available
(bench.environment.cpu_skip_reason). The session ends by saying why each part was skipped (bench.plugin).
"""

from __future__ import annotations

import gc
import pathlib
import time

import pytest
import torch

from .cases import parse_case_id
from .environment import collect_environment, cpu_skip_reason, dry_run, measure_device_peaks, skip_reason
from .plugin import (  # noqa: F401 -- the hooks are re-exported so pytest registers them for this directory
    SESSION,
    budget_skip_reason,
    pytest_benchmark_update_json,
    pytest_runtest_logreport,
    pytest_terminal_summary,
    run_priority,
    time_budget_s,
)
from .timing import L2Flush

BENCH_DIR = pathlib.Path(__file__).resolve().parent


def _in_bench(item) -> bool:
    return BENCH_DIR in pathlib.Path(str(item.fspath)).resolve().parents


def _is_cpu_comparison(item) -> bool:
    return pathlib.Path(str(item.fspath)).name == "cpu_test.py"


def pytest_collection_modifyitems(config, items):
    reasons = {True: cpu_skip_reason(), False: skip_reason()}  # keyed by "is the CPU comparison"
    for item in items:
        reason = reasons[_is_cpu_comparison(item)] if _in_bench(item) else None
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
    if reasons[False] is not None:
        return
    bench_items = [item for item in items if _in_bench(item)]
    if bench_items:  # a stable sort: within a priority class, the declared order stays
        others = [item for item in items if not _in_bench(item)]
        items[:] = others + sorted(bench_items, key=lambda item: run_priority(item.nodeid))


@pytest.fixture
def within_budget():
    reason = budget_skip_reason(time.time() - SESSION["started"], time_budget_s())
    if reason is not None:
        pytest.skip(reason)


def pytest_report_header(config):
    reason = skip_reason()
    if reason is not None:
        if cpu_skip_reason() is None:
            return f"fastcenter bench: {reason}; the CPU comparison (bench/cpu_test.py) runs instead"
        return f"fastcenter bench: {reason}"
    if dry_run():
        return "fastcenter bench: DRY RUN on the CPU (FASTCENTER_BENCH_DRY_RUN=1): checks the harness, measures nothing"
    return f"fastcenter bench: {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"


@pytest.fixture(scope="session")
def device_peaks() -> dict | None:
    """Environment and the two measured ceilings, once per session (recorded into the benchmark JSON).
    None in a dry run: no ceiling is measured on the CPU."""
    if SESSION["environment"] is None:
        SESSION["environment"] = collect_environment()
    if SESSION["peaks"] is None and not dry_run():
        SESSION["peaks"] = measure_device_peaks()
    return SESSION["peaks"]


@pytest.fixture(scope="session")
def l2_flush():
    return (lambda: None) if dry_run() else L2Flush("cuda")


@pytest.fixture(autouse=True)
def _release_memory(request):
    """Each case starts from an empty caching allocator: no fragmentation carried over, fair peak memory.

    Tensors of a finished case are freed by reference counting; compiled graphs and models hold reference
    cycles, so those cases also get a garbage collection (which costs up to a second with Dynamo loaded)."""
    yield
    case = parse_case_id(request.node.nodeid)
    if case is not None and (case.op == "train_step" or "compile" in case.variant):
        gc.collect()
    if torch.cuda.is_available() and not dry_run():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
