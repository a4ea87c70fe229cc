"""How a case is timed and its memory counted, and the two ceilings its rates are held against.

Timing: pytest-benchmark's, with CUDA events for its clock. `CLOCK` is the timer the suite gives pytest-benchmark
(`pytest.mark.benchmark(timer=CLOCK)`): it stands still except inside `CLOCK.timed(fn)`, which advances it by the
time CUDA events measured around one call of fn on the GPU (the host clock in a dry run). So every pytest-benchmark
round is one call timed on the device, and pytest-benchmark's statistics are device times: each case is timed once.

Before each round, untimed (pytest-benchmark's `setup`): the L2 is flushed by *reading* a buffer of
max(256 MiB, 4 x L2) bytes (no dirty lines left whose write-back would land in the next timed call), then a spin
kernel keeps the GPU busy for twice the host's time to enqueue one call, so the whole call is queued before its
start event fires: what is timed is the kernels, not an idle GPU waiting for Python. The training step turns both
off (steps run back to back in training, and host overhead is part of its throughput).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

CUDA_SKIP_REASON = (
    "fastcenter benchmarks need an NVIDIA GPU and torch.cuda.is_available() is False here: nothing was measured"
)


def dry_run() -> bool:
    """FASTCENTER_BENCH_DRY_RUN=1: every case once through the whole harness on the CPU at tiny shapes, on the host
    clock: it checks the harness and measures nothing (bench.report refuses its records)."""
    return os.environ.get("FASTCENTER_BENCH_DRY_RUN", "0") == "1"


def on_gpu() -> bool:
    """Whether the cases run on a GPU (CUDA is there and this is not a dry run)."""
    return torch.cuda.is_available() and not dry_run()


def bench_device() -> str:
    return "cpu" if dry_run() else "cuda"


def describe(exc: BaseException) -> str:
    """A one-line reason from an exception, for a skip message."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line[:300]}"


class DeviceClock:
    """pytest-benchmark's timer: seconds of measured device time (see the module docstring)."""

    def __init__(self):
        self.now = 0.0
        self._cycles_per_ms = None

    def __call__(self) -> float:
        return self.now

    def __repr__(self) -> str:  # how pytest-benchmark's JSON names its timer
        return "bench.measure.CLOCK (CUDA events)"

    def timed(self, fn: Callable[[], object]) -> Callable[[], None]:
        if not on_gpu():

            def host():
                start = time.perf_counter()
                fn()
                self.now += time.perf_counter() - start

            return host
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def device():
            start.record()
            fn()
            end.record()
            end.synchronize()
            self.now += start.elapsed_time(end) * 1e-3

        return device

    def lead(self, ms: float) -> None:
        """Keep the GPU busy for about `ms` (the first use calibrates the spin kernel, with a sync)."""
        if ms <= 0 or not on_gpu() or not hasattr(torch.cuda, "_sleep"):
            return
        if self._cycles_per_ms is None:
            torch.cuda._sleep(1000)  # load the spin kernel before timing it
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(2_000_000)
            end.record()
            end.synchronize()
            self._cycles_per_ms = 2_000_000 / max(start.elapsed_time(end), 1e-3)
        torch.cuda._sleep(int(ms * self._cycles_per_ms))


CLOCK = DeviceClock()


def sync() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def timing_summary(seconds: list[float], enqueue_ms: float | None = None) -> dict:
    """What a record keeps of the rounds: every round's time and their statistics, in milliseconds."""
    times = sorted(t * 1e3 for t in seconds)
    q20, _, _, q80 = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return {
        "median_ms": statistics.median(times),
        "q20_ms": q20,
        "q80_ms": q80,
        "min_ms": times[0],
        "mean_ms": statistics.fmean(times),
        "reps": len(times),
        "times_ms": [round(t * 1e3, 6) for t in seconds],
        "host_enqueue_ms": enqueue_ms,
    }


def l2_flush() -> Callable[[], None]:
    """A call that evicts the case's data from the L2 by reading a buffer of max(256 MiB, 4 x L2) bytes."""
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) or 0
    # int32 so the sum is a quick integer reduction; the contents do not matter, only the reads.
    buffer = torch.empty(max(256 << 20, 4 * l2) // 4, dtype=torch.int32, device="cuda")
    return lambda: buffer.sum()


# ---------------------------------------------------------------------------------------------------------
# Memory.
# ---------------------------------------------------------------------------------------------------------


def _storages(obj) -> dict[tuple, int]:
    """{storage key: nbytes} of the distinct storages of the tensors in obj (nested tuples/lists/dicts)."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        return {(obj.device.type, obj.device.index, storage.data_ptr()): storage.nbytes()}
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    return {key: n for item in items for key, n in _storages(item).items()}


def tensor_bytes(obj, exclude=None) -> int:
    """Bytes of the distinct storages of the tensors in obj, leaving out storages shared with `exclude` (views
    into one storage, such as q and k of a packed qkv, count once)."""
    skip = _storages(exclude) if exclude is not None else {}
    return sum(n for key, n in _storages(obj).items() if key not in skip)


@dataclass
class MemoryUse:
    """Peak allocated memory while one call ran. extra_bytes = peak - allocated before - what the call returned
    and still holds (outputs of a forward, gradients of a forward+backward; input storages a returned view shares
    are not counted twice): for a forward+backward, the memory beyond inputs and gradients."""

    peak_bytes: int
    base_bytes: int
    result_bytes: int

    @property
    def extra_bytes(self) -> int:
        return self.peak_bytes - self.base_bytes - self.result_bytes


def peak_memory(fn: Callable[[], object], inputs=None) -> MemoryUse | None:
    """Run fn once and account for its peak memory (CUDA's allocator keeps the statistics; elsewhere None)."""
    if not on_gpu():
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return MemoryUse(torch.cuda.max_memory_allocated(), base, tensor_bytes(result, exclude=inputs))


# ---------------------------------------------------------------------------------------------------------
# The two ceilings, measured (never a datasheet's): a device-to-device copy (bytes read plus bytes written) and a
# bf16 matrix product on random data (zeros flatter the tensor cores).
# ---------------------------------------------------------------------------------------------------------

COPY_BYTES = 1 << 30  # each way: far beyond any L2
MATMUL_SIZE = 8192


def _median_ms(make) -> float:
    """do_bench's median of the call that make() returns (its tensors freed afterwards)."""
    from triton.testing import do_bench

    ms = do_bench(make(), warmup=25, rep=100, return_mode="median")
    torch.cuda.empty_cache()
    return ms


def _copy():
    src = torch.randn(COPY_BYTES // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _matmul():
    a, b, c = (torch.randn(MATMUL_SIZE, MATMUL_SIZE, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return lambda: torch.mm(a, b, out=c)


def measure_device_peaks() -> dict:
    copy_ms, matmul_ms = _median_ms(_copy), _median_ms(_matmul)
    return {
        "copy_gbps": 2 * COPY_BYTES / (copy_ms * 1e-3) / 1e9,
        "copy_bytes_each_way": COPY_BYTES,
        "copy_median_ms": copy_ms,
        "matmul_tflops": 2 * MATMUL_SIZE**3 / (matmul_ms * 1e-3) / 1e12,
        "matmul_shape": [MATMUL_SIZE] * 3,
        "matmul_dtype": "bfloat16",
        "matmul_median_ms": matmul_ms,
    }


def time_case(
    benchmark, call: Callable[[], object], *, flush=None, lead=True, target_ms=100.0, min_rounds=10, max_rounds=500
) -> dict:
    """Time `call` as pytest-benchmark rounds on CLOCK, one call per round, `flush` and the GPU lead before each
    (untimed); the rounds are sized to about `target_ms` of work. Returns the timing summary of the rounds."""
    walls, enqueues = [], []  # host time of three calls: with a sync after each, and to enqueue one
    for _ in range(3):
        start = time.perf_counter()
        call()
        enqueues.append((time.perf_counter() - start) * 1e3)
        sync()
        walls.append((time.perf_counter() - start) * 1e3)
    wall_ms, enqueue_ms = statistics.median(walls), statistics.median(enqueues)
    lead_ms = min(2 * enqueue_ms + 0.02, 5.0) if lead else 0.0

    def setup():
        if flush is not None:
            flush()
        CLOCK.lead(lead_ms)

    # Enough rounds for about target_ms of timed work, within [min_rounds, max_rounds].
    rounds = 2 if dry_run() else int(min(max(target_ms / max(wall_ms, 1e-3), min_rounds), max_rounds))
    benchmark.pedantic(CLOCK.timed(call), setup=setup, rounds=rounds, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: the call ran once, nothing was timed
        pytest.skip("benchmarks are disabled (--benchmark-disable)")
    return timing_summary(list(benchmark.stats.stats.data), enqueue_ms)
