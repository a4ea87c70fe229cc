"""Timing and memory measurement for the benchmark cases.

Timing (`measure`) follows triton.testing.do_bench's shape, with a few choices of our own:

- Warm-up is excluded: the first calls (where torch.compile compiles, Triton autotunes, cuBLAS picks an
  algorithm and the allocator grows) run before anything is timed, then enough further calls to cover
  `warmup_ms`, so clocks have ramped up.
- Each rep is bracketed by two CUDA events recorded on the stream; the host synchronises once, after the last
  rep, so no sync sits inside the timed region. The number of reps is chosen from a first estimate so that the
  timed work lasts about `target_ms`, within [min_reps, max_reps].
- Before every rep, outside the timed region, `setup` (e.g. dropping gradients) and `flush` run. `L2Flush`
  *reads* a buffer several times the L2's size: the cache then holds none of the case's data, and, unlike
  zeroing a buffer (do_bench's way), it leaves no dirty lines behind whose write-back would land inside the
  next timed rep.
- Device time, not host time: at small shapes the host can take longer to enqueue a call (Python, autograd,
  dispatch) than the GPU takes to run it, and an idle GPU waiting for launches would be timed as if it were
  the kernels. So before each rep the GPU is also kept busy (`clock.lead`, a spin kernel) for 1.5 times the
  host's measured enqueue time: the whole call is queued before its start event fires. (The training step
  turns this off: there, steps run back to back and host overhead is part of the throughput.) Host-side
  latency is reported separately, by pytest-benchmark's own statistics.
- The result keeps every rep's time and the host enqueue time; the report quotes the median.

The clock is pluggable (`CudaClock` on a GPU, `HostClock` elsewhere), which is how tests/test_bench_harness.py
exercises this logic on a CPU with a fake clock.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


class CudaClock:
    """Timestamps are CUDA events on the current stream; reading them needs one sync, after the last rep."""

    def stamp(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end)

    def sync(self) -> None:
        torch.cuda.synchronize()

    _cycles_per_ms: float | None = None

    def lead(self, ms: float) -> None:
        """Keep the GPU busy for about `ms` (outside any timed region; the first use calibrates, with a sync)."""
        if ms <= 0 or not hasattr(torch.cuda, "_sleep"):
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


class HostClock:
    """perf_counter timestamps, for work that runs synchronously on the host (the CPU, or tests)."""

    def stamp(self) -> float:
        return time.perf_counter()

    def elapsed_ms(self, start: float, end: float) -> float:
        return (end - start) * 1e3

    def sync(self) -> None:
        pass

    def lead(self, ms: float) -> None:
        pass  # nothing runs ahead of the host here


@dataclass
class Timing:
    """Per-rep times of one measurement, in milliseconds, and the host's time to enqueue one call."""

    times_ms: list[float]
    host_enqueue_ms: float | None = None

    @property
    def reps(self) -> int:
        return len(self.times_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times_ms)

    def quantile_ms(self, q: float) -> float:
        """Linear-interpolated quantile (q in [0, 1]) of the rep times."""
        ordered = sorted(self.times_ms)
        pos = q * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    def summary(self) -> dict:
        return {
            "median_ms": self.median_ms,
            "q20_ms": self.quantile_ms(0.2),
            "q80_ms": self.quantile_ms(0.8),
            "min_ms": self.min_ms,
            "mean_ms": self.mean_ms,
            "reps": self.reps,
            "times_ms": [round(t, 6) for t in self.times_ms],
            "host_enqueue_ms": self.host_enqueue_ms,
        }


def measure(
    fn: Callable[[], object],
    *,
    clock,
    setup: Callable[[], None] | None = None,
    flush: Callable[[], None] | None = None,
    warmup_calls: int = 2,
    warmup_ms: float = 25.0,
    target_ms: float = 100.0,
    min_reps: int = 10,
    max_reps: int = 500,
    host_lead: bool = True,
) -> Timing:
    """Time `fn` (see the module docstring). `setup`, `flush` and the GPU lead run before each rep, untimed."""

    def untimed():
        if setup is not None:
            setup()
        if flush is not None:
            flush()

    # 1. First calls: compilation, autotuning, allocator growth. Never timed.
    for _ in range(warmup_calls):
        untimed()
        fn()
    clock.sync()

    # 2. A rough per-call estimate (back to back, no flush), to size the warm-up and the timed loop, and the
    #    host's time to enqueue one call (the GPU still busy with the previous ones), to size the lead.
    start = clock.stamp()
    host_ms = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        host_ms.append((time.perf_counter() - t0) * 1e3)
    end = clock.stamp()
    clock.sync()
    estimate_ms = max(clock.elapsed_ms(start, end) / 3, 1e-4)
    host_enqueue_ms = statistics.median(host_ms)
    lead_ms = min(1.5 * host_enqueue_ms + 0.02, 5.0) if host_lead else 0.0

    # 3. More warm-up, so the GPU clocks are up when timing starts.
    for _ in range(min(int(warmup_ms / estimate_ms), 200)):
        untimed()
        fn()

    # 4. The timed reps: stamps around fn only; one sync at the end (the lead calibrates once, untimed).
    reps = int(min(max(math.ceil(target_ms / estimate_ms), min_reps), max_reps))
    stamps = []
    for _ in range(reps):
        untimed()
        clock.lead(lead_ms)
        begin = clock.stamp()
        fn()
        stamps.append((begin, clock.stamp()))
    clock.sync()
    return Timing([clock.elapsed_ms(b, e) for b, e in stamps], host_enqueue_ms=host_enqueue_ms)


class L2Flush:
    """Evicts the case's data from the L2 by reading a buffer of max(256 MiB, 4 x L2) bytes."""

    def __init__(self, device="cuda"):
        l2 = 0
        if torch.device(device).type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
        self.nbytes = max(256 << 20, 4 * l2)
        # int32 so the sum is a quick integer reduction; uninitialised contents are fine, only the reads matter.
        self.buffer = torch.empty(self.nbytes // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buffer.sum()


# ---------------------------------------------------------------------------------------------------------
# Memory.
# ---------------------------------------------------------------------------------------------------------


def _storages(obj) -> dict[tuple, int]:
    """{storage key: nbytes} of the distinct storages of the tensors in obj (nested tuples/lists/dicts)."""
    found: dict[tuple, int] = {}

    def visit(x):
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            found[(x.device.type, x.device.index, storage.data_ptr())] = storage.nbytes()
        elif isinstance(x, (tuple, list)):
            for item in x:
                visit(item)
        elif isinstance(x, dict):
            for item in x.values():
                visit(item)

    visit(obj)
    return found


def tensor_bytes(obj, exclude=None) -> int:
    """Bytes of the distinct storages of the tensors in obj, leaving out storages shared with `exclude`.

    Storages are counted once however many views point into them (q and k as views of one packed qkv).
    """
    skip = _storages(exclude) if exclude is not None else {}
    return sum(n for key, n in _storages(obj).items() if key not in skip)


@dataclass
class MemoryUse:
    """Peak allocated memory while one call ran, and what of it the call itself added.

    extra_bytes = peak - (allocated before the call) - (bytes of what the call returned and still holds: the
    outputs of a forward, the gradients of a forward+backward; storages of the inputs, which a returned view
    may share, are not counted twice). So for a forward+backward it is the memory "beyond inputs and
    gradients": saved activations, logits, workspaces.
    """

    peak_bytes: int
    base_bytes: int
    result_bytes: int

    @property
    def extra_bytes(self) -> int:
        return self.peak_bytes - self.base_bytes - self.result_bytes


def peak_memory(fn: Callable[[], object], inputs=None, device="cuda") -> MemoryUse | None:
    """Run fn once and account for its peak memory (see MemoryUse); `inputs` were allocated before.

    Only CUDA's allocator keeps the statistics: on another device fn runs and the answer is None."""
    if torch.device(device).type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    use = MemoryUse(peak_bytes=peak, base_bytes=base, result_bytes=tensor_bytes(result, exclude=inputs))
    del result
    return use
