"""What the launchers need to know about the device they launch on, and their integer arithmetic (shared by the
kernel families)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _cuda_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of the GPU a launch on `device` runs on; 1 under the CPU interpreter.

    CPU tensors mean the interpreter, which runs programs one after another: one "SM" keeps grids small.
    "meta" tensors mean the compile-only check (`python -m bench.compile`), whose Triton driver stands in for a
    GPU that is not there: it is asked, so the launch arguments are those of that GPU.
    """
    if device.type == "cuda":
        return _cuda_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        return 1
    from triton.runtime import driver

    active = driver.active
    return active.utils.get_device_properties(active.get_current_device())["multiprocessor_count"]


# 64 K 32-bit registers per SM, and per thread block, on every GPU we target (sm_80 to sm_90); 255 per thread.
REGISTERS_PER_SM = 65536


def max_registers(num_warps: int, resident_programs: int = 1) -> int:
    """`maxnreg` for a launch whose programs of `num_warps` warps should fit `resident_programs` to an SM: the
    most registers per thread that allows (a multiple of 8, at most 255).

    Why a launch states it: without a limit, recent ptxas (12.8+, the one in Triton 3.9's wheel) picks the
    register count of the highest occupancy it sees fit and spills a value or two to reach it; with the limit
    the kernel's own residency asks for, it uses what the code needs up to there. Without it, the norm forward
    with one row of 4096 or more columns per program and the cross-entropy kernel spill a few registers; with
    it, none (`python -m bench.compile` checks every launch plan; bench/results/compile/ holds its records).
    Only those launches state it: elsewhere ptxas's own choice spills nothing, and stating the ceiling there
    would only raise register counts and lower occupancy. The interpreter ignores it.
    """
    return min(255, REGISTERS_PER_SM // (resident_programs * 32 * num_warps) // 8 * 8)


# The launchers' integer helpers. triton.cdiv and triton.next_power_of_2 are constexpr functions in recent Triton
# (3.9), callable from host code at about ten times the cost of the arithmetic itself; a launch calls several.


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()
