"""Where a measurement was made: the device, the software versions, the commit, the CPU and the platform.

One collector for every record the project writes (the benchmarks, the compile check, the CPU comparison, the
centering study), so that records made on different machines compare field by field.

A machine that received a copy of the working tree without `.git` (the GPU lease) has no commit to read: set
FASTCENTER_GIT_COMMIT to it there. The source hash ties a record to the exact code either way.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import platform
import subprocess
from importlib import metadata

import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def cpu_name() -> str | None:
    """The CPU's model name (Linux's /proc/cpuinfo, else platform.processor()), or None."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_hash() -> str:
    """sha256 (16 hex digits) over the package, the kernels, the benchmarks and train.py: paths and contents."""
    files = [p for folder in ("fastcenter", "kernels", "bench") for p in (REPO_ROOT / folder).rglob("*.py")]
    files += [REPO_ROOT / "train.py"] if (REPO_ROOT / "train.py").is_file() else []
    digest = hashlib.sha256()
    for path in sorted(p for p in files if "results" not in p.parts):
        digest.update(str(path.relative_to(REPO_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def git_info() -> dict:
    """The commit (FASTCENTER_GIT_COMMIT where there is no .git), whether the tree differs from it, the source hash."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": os.environ.get("FASTCENTER_GIT_COMMIT") or _git("rev-parse", "HEAD") or "unknown",
        "dirty": None if status is None else bool(status),
        "source_sha256": source_hash(),
    }


def device_info() -> dict:
    """The CUDA device's properties, or {"name": "cpu"}."""
    if not torch.cuda.is_available():
        return {"name": "cpu"}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_bytes": props.total_memory,
        "l2_cache_bytes": getattr(props, "L2_cache_size", None),
    }


def _memory_bytes() -> int | None:
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def collect() -> dict:
    """Everything a reader needs to judge or reproduce a number, as one flat dict (the device and git nested)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "numpy": package_version("numpy"),
        "transformers": package_version("transformers"),
        "liger_kernel": package_version("liger-kernel"),
        "pytest_benchmark": package_version("pytest-benchmark"),
        "device": device_info(),
        "git": git_info(),
    }


def triton_build() -> str | None:
    """sha256 (16 hex digits) of the part of Triton's cache keys that names Triton itself (its version, sources and
    compiled library): only machines with the same value can share Triton's on-disk cache."""
    try:
        from triton.runtime.cache import triton_key
    except ImportError:
        try:
            from triton.compiler.compiler import triton_key  # Triton 3.2
        except ImportError:
            return None
    return hashlib.sha256(triton_key().encode()).hexdigest()[:16]
