"""Per-op benchmarks: forward and forward+backward of every fastcenter op against the alternatives.

One test per case (see bench/cases.py for the shapes, variants and byte/FLOP models). For each case:

1. the `prepared` fixture builds the inputs (seeded, identical across variants) and makes the first call, which
   is where torch.compile compiles and Triton autotunes. A competitor that cannot run here (library missing,
   API missing, compile or run failure, out of memory) is skipped with the reason; fastcenter and eager failing
   is a real failure;
2. for fastcenter: one call under a dispatch mode records whether it really reached the fastcenter custom ops
   (or fell back to the reference), and its result is held against eager PyTorch's (a sanity bound: timing a wrong
   kernel would be meaningless);
3. `measure` times it with CUDA events (median of many reps, warm-up excluded, L2 flushed before every rep), and
   one more call measures its peak memory;
4. the record goes into pytest-benchmark's extra_info; pytest-benchmark's own stats then time a few
   synchronised calls on the host clock (the latency a Python caller sees, launch overhead included).

With FASTCENTER_BENCH_DRY_RUN=1 the same steps run on the CPU at tiny shapes (bench.environment.dry_run).
"""

import time

import pytest

from bench.cases import (
    DRY_RUN_DIMS,
    SANITY_REL_ERROR,
    Case,
    Unavailable,
    all_op_cases,
    op_record,
    prepare,
    relative_error,
)
from bench.environment import bench_device, describe, dry_run
from bench.plugin import SESSION
from bench.timing import CudaClock, HostClock, measure, peak_memory

DRY_RUN = dry_run()
DEVICE = bench_device()
CLOCK = HostClock() if DRY_RUN else CudaClock()
MEASURE = {"target_ms": 1.0, "warmup_ms": 0.0, "max_reps": 3} if DRY_RUN else {}

# The variants whose failure is a finding about fastcenter (fail the test); the others are comparisons, and a
# comparison that cannot run on this machine is skipped with its reason.
MUST_RUN = ("fastcenter", "eager")


def dims_for(case: Case) -> dict | None:
    return DRY_RUN_DIMS[case.op] if DRY_RUN else None


@pytest.fixture
def prepared(case: Case, within_budget, device_peaks, l2_flush):
    try:
        prep = prepare(case, DEVICE, dims=dims_for(case))
    except Unavailable as exc:
        pytest.skip(str(exc))
    start = time.perf_counter()
    try:
        prep.call()
        CLOCK.sync()
    except Exception as exc:  # noqa: BLE001 -- any failure of a competitor is reported as a skip reason
        if case.variant in MUST_RUN:
            raise
        pytest.skip(f"{case.variant} could not run here: {describe(exc)}")
    prep.first_call_s = time.perf_counter() - start
    yield prep


def reaches_fastcenter_ops(call) -> bool | None:
    """Whether one call dispatches a fastcenter:: custom op (False: it ran the reference); None if unknown.

    A dispatch mode sees every op that reaches the dispatcher, custom ops included, at no profiler cost."""
    try:
        from torch.utils._python_dispatch import TorchDispatchMode

        class Namespaces(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.seen = set()

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.seen.add(getattr(func, "namespace", None))
                return func(*args, **(kwargs or {}))

        with Namespaces() as mode:
            call()
            CLOCK.sync()
        return "fastcenter" in mode.seen
    except Exception:  # noqa: BLE001 -- a diagnostic here, never a reason to fail
        return None


def error_against_eager(prep) -> float:
    """Relative error of the fastcenter result (outputs or gradients) against eager PyTorch's, same inputs."""
    case = prep.case
    eager = prepare(Case(case.op, case.shape, case.direction, "eager"), DEVICE, dims=dims_for(case))
    expected = eager.call()
    actual = prep.call()
    err = relative_error(actual, expected)
    del eager, expected, actual
    return err


def host_timing(benchmark, call, flush, median_ms: float) -> None:
    """pytest-benchmark's own stats: wall time of one call plus a sync, the L2 flushed before each round."""

    def synced():
        call()
        CLOCK.sync()

    def setup():
        flush()
        CLOCK.sync()

    rounds = 2 if DRY_RUN else (10 if median_ms < 20 else 3)
    benchmark.pedantic(synced, setup=setup, rounds=rounds, warmup_rounds=1)


@pytest.mark.parametrize("case", all_op_cases(), ids=str)
def test_op(case: Case, prepared, benchmark, device_peaks, l2_flush):
    extra = {"first_call_s": prepared.first_call_s}
    if case.variant == "fastcenter":
        extra["fused"] = reaches_fastcenter_ops(prepared.call)
        err = error_against_eager(prepared)
        extra["rel_err_vs_eager"] = err
        bound = SANITY_REL_ERROR[prepared.spec.dtype]
        assert err <= bound, f"fastcenter result is {err:.3g} (relative) from eager PyTorch's, over {bound}"

    timing = measure(prepared.call, clock=CLOCK, flush=l2_flush, **MEASURE)
    memory = peak_memory(prepared.call, inputs=prepared.inputs.tensors, device=DEVICE)
    record = op_record(case, timing.summary(), device_peaks, memory, dims=dims_for(case), **extra)

    benchmark.group = f"{case.op} {case.shape} {case.direction}"
    benchmark.extra_info.update(record)
    SESSION["records"].append(record)
    host_timing(benchmark, prepared.call, l2_flush, timing.median_ms)
