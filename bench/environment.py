"""What the benchmark suite needs to run, what it ran on, and the two ceilings it measures there.

The ceilings are measured, never taken from a datasheet: a large device-to-device copy (bandwidth counts the
bytes read plus the bytes written) and a large bf16 matrix product on random data (zeros flatter the tensor
cores). Every "% of peak" in the report is relative to these two numbers from the same session.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import platform
import subprocess
import sys

import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

CUDA_SKIP_REASON = (
    "fastcenter benchmarks need an NVIDIA GPU and torch.cuda.is_available() is False here: nothing was measured"
)
BENCHMARK_PLUGIN_SKIP_REASON = (
    "fastcenter benchmarks need pytest-benchmark (pip install -e '.[dev]'): nothing was measured"
)


def dry_run() -> bool:
    """FASTCENTER_BENCH_DRY_RUN=1: run every case once through the whole harness on the CPU, at tiny shapes, with
    a host clock and no memory figures. It checks the harness, measures nothing, and bench.report refuses its
    JSON. (The fused ops then run their reference on the CPU, or the interpreted kernels under TRITON_INTERPRET=1.)
    """
    return os.environ.get("FASTCENTER_BENCH_DRY_RUN", "0") == "1"


CPU_ON_GPU_SKIP_REASON = (
    "the CPU comparison (bench/cpu_test.py) is for machines without a GPU; FASTCENTER_BENCH_CPU=1 runs it here too"
)


def skip_reason() -> str | None:
    """Why the GPU cases cannot run here, or None when they can."""
    if importlib.util.find_spec("pytest_benchmark") is None:
        return BENCHMARK_PLUGIN_SKIP_REASON
    if not torch.cuda.is_available() and not dry_run():
        return CUDA_SKIP_REASON
    return None


def cpu_skip_reason() -> str | None:
    """Why the CPU comparison (bench/cpu_test.py) does not run here, or None when it does: it runs where the GPU
    cases cannot (no CUDA), in a dry run (tiny), and anywhere with FASTCENTER_BENCH_CPU=1."""
    if importlib.util.find_spec("pytest_benchmark") is None:
        return BENCHMARK_PLUGIN_SKIP_REASON
    if torch.cuda.is_available() and not dry_run() and os.environ.get("FASTCENTER_BENCH_CPU", "0") != "1":
        return CPU_ON_GPU_SKIP_REASON
    return None


def bench_device() -> str:
    """Where the cases run: the GPU, or the CPU in a dry run."""
    return "cpu" if dry_run() else "cuda"


def describe(exc: BaseException) -> str:
    """A one-line reason from an exception, for a skip message."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line[:300]}"


# ---------------------------------------------------------------------------------------------------------
# The environment of a run.
# ---------------------------------------------------------------------------------------------------------


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict:
    """Commit and dirtiness of the checkout, plus a hash of the sources that a result depends on.

    The device machines receive a copy of the working tree that may lack `.git`; then the commit comes from
    FASTCENTER_GIT_COMMIT if set (e.g. `FASTCENTER_GIT_COMMIT=$(git rev-parse HEAD)` where git works), and the
    source hash still ties the numbers to the exact code that produced them.
    """
    commit = os.environ.get("FASTCENTER_GIT_COMMIT") or _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "commit": commit or "unknown",
        "dirty": None if status is None else bool(status),
        "source_sha256": source_hash(),
    }


def source_hash() -> str:
    """sha256 over the package, kernels, bench code and train.py (paths and contents, in sorted order)."""
    files = []
    for folder in ("fastcenter", "kernels", "bench"):
        files += [p for p in (REPO_ROOT / folder).rglob("*.py") if "results" not in p.parts]
    if (REPO_ROOT / "train.py").is_file():
        files.append(REPO_ROOT / "train.py")
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(REPO_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 -- any failure means "not installed" for our purposes
        return None


def collect_environment() -> dict:
    """Device, software versions and commit: everything a reader needs to judge or reproduce a number."""
    info: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "cuda": torch.version.cuda,
        "pytest_benchmark": _package_version("pytest-benchmark"),
        "liger_kernel": _package_version("liger-kernel"),
        "platform": platform.platform(),
        "git": git_info(),
        "dry_run": dry_run(),
    }
    if torch.cuda.is_available() and not dry_run():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["device"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_bytes": props.total_memory,
            "l2_cache_bytes": getattr(props, "L2_cache_size", None),
        }
        smi = _run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem", "--format=csv,noheader"])
        if smi:
            info["device"]["nvidia_smi"] = smi.splitlines()[0]
    else:
        info["device"] = {"name": "cpu (dry run)" if dry_run() else "cpu (no CUDA)"}
    info["argv"] = " ".join(sys.argv)
    return info


# ---------------------------------------------------------------------------------------------------------
# The two ceilings.
# ---------------------------------------------------------------------------------------------------------

COPY_BYTES = 1 << 30  # 1 GiB each way: far beyond any L2
MATMUL_SIZE = 8192  # 8192^3 bf16: large enough to reach the tensor cores' sustained rate


def measure_device_peaks() -> dict:
    """Copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s), measured here and now."""
    from .timing import CudaClock, measure

    clock = CudaClock()
    src = torch.randn(COPY_BYTES // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), clock=clock, target_ms=100.0)
    del src, dst

    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    mm = measure(lambda: torch.mm(a, b, out=c), clock=clock, target_ms=100.0)
    del a, b, c
    torch.cuda.empty_cache()

    copy_gbps = 2 * COPY_BYTES / (copy.median_ms * 1e-3) / 1e9
    matmul_tflops = 2 * MATMUL_SIZE**3 / (mm.median_ms * 1e-3) / 1e12
    return {
        "copy_gbps": copy_gbps,
        "copy_bytes_each_way": COPY_BYTES,
        "copy_median_ms": copy.median_ms,
        "matmul_tflops": matmul_tflops,
        "matmul_shape": [MATMUL_SIZE, MATMUL_SIZE, MATMUL_SIZE],
        "matmul_dtype": "bfloat16",
        "matmul_median_ms": mm.median_ms,
    }
