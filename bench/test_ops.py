"""Per-op benchmarks: forward and forward+backward of every fastcenter op against the alternatives.

One test per case (bench/cases.py: shapes, variants, byte/FLOP models). The first call is where torch.compile
compiles and Triton compiles its kernels; a competitor that cannot run here (library or API missing, compile or run
failure, out of memory) is skipped with the reason, while fastcenter or eager failing is a failure. The fastcenter
variant is then held against eager PyTorch (a sanity bound: timing a wrong kernel would be meaningless), and one call
under a dispatch mode records whether it reached the fastcenter custom ops. One more call measures peak memory; then
pytest-benchmark times it on CUDA events (bench/measure.py).
"""

import time

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from bench.cases import DRY_RUN_DIMS, SANITY_REL_ERROR, Case, Unavailable, op_cases, op_record, prepare, relative_error
from bench.measure import CLOCK, bench_device, describe, dry_run, peak_memory, sync, time_case

pytestmark = pytest.mark.benchmark(timer=CLOCK)
MUST_RUN = ("fastcenter", "eager")  # their failure is a finding about fastcenter; the others are comparisons


class _Namespaces(TorchDispatchMode):
    """The namespaces of every op that reaches the dispatcher, custom ops included."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(getattr(func, "namespace", None))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", op_cases(), ids=str)
def test_op(case: Case, benchmark, bench_session, l2_flush):
    dims = DRY_RUN_DIMS[case.op] if dry_run() else None
    try:
        prep = prepare(case, bench_device(), dims)
        start = time.perf_counter()
        prep.call()
        sync()
    except Unavailable as exc:
        pytest.skip(str(exc))
    except Exception as exc:  # noqa: BLE001 -- a competitor's failure is its skip reason
        if case.variant in MUST_RUN:
            raise
        pytest.skip(f"{case.variant} could not run here: {describe(exc)}")
    extra = {"first_call_s": time.perf_counter() - start}
    if case.variant == "fastcenter":
        mode = _Namespaces()
        try:
            with mode:
                actual = prep.call()
        except Exception:  # noqa: BLE001 -- a diagnostic, never a reason to fail: "fused" is then unknown
            mode.seen, actual = None, prep.call()
        eager = prepare(Case(case.op, case.shape, case.direction, "eager"), bench_device(), dims)
        err = relative_error(actual, eager.call())
        del eager, actual
        extra.update(fused=None if mode.seen is None else "fastcenter" in mode.seen, rel_err_vs_eager=err)
        bound = SANITY_REL_ERROR[prep.spec.dtype]
        assert err <= bound, f"fastcenter result is {err:.3g} (relative) from eager PyTorch's, over {bound}"
    memory = peak_memory(prep.call, inputs=prep.tensors)
    benchmark.group = f"{case.op} {case.shape} {case.direction}"
    timing = time_case(benchmark, prep.call, flush=l2_flush)
    record = op_record(case, timing, bench_session.peaks, memory, dims=prep.dims, **extra)
    benchmark.extra_info.update(record)
    bench_session.add(record)
