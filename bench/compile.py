"""Compile every Triton kernel specialization the ops launch, for real GPUs, on a machine without one.

    python -m bench.compile                       # every launch plan, sm_80 sm_86 sm_89 sm_90
    python -m bench.compile --arch 80,90 --plans ci --json out.json

Triton's compiler is an ordinary program: given a target it lowers a kernel to PTX and runs ptxas (shipped in
the triton wheel) to a cubin, with no GPU in sight. What needs a GPU is the *driver*: it names the target, loads
the cubin and launches it. `CompileOnlyDriver` is a Triton driver that reports a CUDA target of our choice and
launches nothing, so the kernel launchers of `fastcenter.kernels`, called on "meta" tensors (shapes, strides
and dtypes, no memory), go through exactly the specialisation a real launch would (argument dtypes, pointer
alignment, integer divisibility, the constexprs the launcher picks) and through Triton's full pipeline to a
cubin. Each cubin is then read with `cuobjdump` (also in the wheel): registers, stack, local memory, shared
memory, and the local-memory instructions (LDL/STL: register spills) in its SASS.

What is compiled ("plans", below): the launches of one training step of the default model (N = 16 x 512
tokens, dim 256, 4 heads of 64, MLP hidden 1024, V = 50257, under bf16 autocast: float32 residual stream, bf16 branch
outputs, float32 master weights), the benchmark shapes of bench/cases.py, and the widest rows the ops accept
(MAX_FUSED_NORM_DIM), in bfloat16, float16 and float32, with the option flags that change the code (residual,
centre, weight; softcap, label smoothing; interleaved, inverse; packed or not). The "ci" selection keeps the
worst cases of each kernel (widest rows, every flag on) and the default model's own launches.

With TRITON_CACHE_DIR set, the cubins land in that Triton cache as a real launch's would: run under the GPU
machine's Python and Triton (the cache keys hash Triton's own build: bench/first_contact.py checks it), for its
target (`--arch 90`), the folder carried to the machine saves the JIT time of every launch it holds.

Exit status 0 when everything compiled, fits the target (shared memory, threads x registers) and spills no
register; 1 otherwise. Checked with Triton 3.2 (the oldest pyproject.toml allows) and 3.9; the driver
interface differs between versions, and `CompileOnlyDriver` implements what both call.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

if __name__ == "__main__":
    # The kernels must be compiled, not interpreted: Triton reads this when it is imported (its own library
    # functions) and when the kernel modules are (the plans import them).
    os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402

from fastcenter.data import GPT2_VOCAB_SIZE  # noqa: E402
from fastcenter.environment import collect as collect_environment  # noqa: E402
from fastcenter.environment import triton_build  # noqa: E402

from .compare_plain import machine_record  # noqa: E402


# ---------------------------------------------------------------------------------------------------------
# The GPUs we claim, and what a launch on each may use.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    capability: int
    example: str  # a GPU of this architecture, whose SM count the launchers see
    multiprocessors: int
    max_shared: int  # bytes of shared memory a block may opt in to (CUDA programming guide, per compute capability)
    registers_per_sm: int = 65536
    max_threads: int = 1024


ARCHS = {
    80: Arch(80, "A100", 108, 166912),
    86: Arch(86, "A40", 84, 101376),
    89: Arch(89, "L4", 58, 101376),
    90: Arch(90, "H100 SXM", 132, 232448),
}


# ---------------------------------------------------------------------------------------------------------
# The compile-only driver.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Compiled:
    """One kernel specialisation compiled for one architecture, and what its cubin uses."""

    arch: int
    kernel: str
    plan: str
    num_warps: int
    constexprs: dict
    signature: str
    shared: int  # bytes, Triton's metadata (what the launch would request)
    registers: int = -1
    stack: int = -1
    local: int = -1
    spill_instructions: int = -1  # LDL/STL in the SASS
    error: str = ""
    fits: bool = True  # shared memory and threads x registers within the architecture's limits
    cubin: bytes = field(default=b"", repr=False)

    @property
    def ok(self) -> bool:
        return not self.error and self.fits and self.spill_instructions == 0

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("cubin")
        return d


def _tool(name: str) -> str:
    """A CUDA binary tool: $TRITON_<NAME>_PATH, else the one in the triton wheel, else the PATH."""
    override = os.environ.get(f"TRITON_{name.upper()}_PATH")
    if override:
        return override
    import triton.backends.nvidia as nvidia

    bundled = os.path.join(os.path.dirname(nvidia.__file__), "bin", name)
    if os.path.exists(bundled):
        return bundled
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: not in the triton wheel, not on PATH")
    return found


def _constexprs(src) -> dict:
    """The constexpr arguments of a Triton ASTSource, by name (keyed by name in 3.2, by argument path later)."""
    names = src.fn.arg_names
    out = {}
    for key, value in src.constants.items():
        if isinstance(key, tuple) and len(key) == 1:
            key = names[key[0]]
        elif isinstance(key, int):
            key = names[key]
        if isinstance(key, str):
            out[key] = value
    return out


class _NoLaunch:
    """The launcher Triton builds for a compiled kernel: called with the grid and the arguments; does nothing."""

    def __init__(self, src, metadata):
        self.src, self.metadata = src, metadata

    def __call__(self, *args, **kwargs):
        return None


_LOADED = object()  # the stand-in for a loaded module and function handle


class _Utils:
    """driver.utils: device properties, and `load_binary`, the point where Triton hands over the cubin."""

    def __init__(self, driver: "CompileOnlyDriver"):
        self.driver = driver
        # 3.2-3.4 expect (module, function, n_regs, n_spills) back; later versions add n_max_threads.
        source = inspect.getsource(triton.compiler.compiler.CompiledKernel._init_handles)
        self.returns_max_threads = "n_max_threads" in source

    def get_device_properties(self, device):
        arch = self.driver.arch
        return {
            "max_shared_mem": arch.max_shared,
            "multiprocessor_count": arch.multiprocessors,
            "max_num_regs": arch.registers_per_sm,
            "warpSize": 32,
            "sm_clock_rate": 0,
            "mem_clock_rate": 0,
            "mem_bus_width": 0,
        }

    def load_binary(self, name, cubin, shared, device):
        self.driver.loaded(name, cubin)
        # A module that is not None: Triton loads a kernel once, and would otherwise try again at every launch.
        handles = (_LOADED, _LOADED, 0, 0)
        return handles + (self.driver.arch.max_threads,) if self.returns_max_threads else handles

    def unload_module(self, module):
        pass


class CompileOnlyDriver(DriverBase):
    """A Triton driver for a CUDA GPU that is not there: it names the target, compiles, and launches nothing.

    The interface differs between Triton versions; this implements the union of what 3.2 to 3.9 call: the
    target, the "current device" (one per architecture: Triton caches compiled kernels per device, so each
    architecture gets its own cache), a stream, `utils` (device properties, `load_binary`) and `launcher_cls`.
    """

    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        self.utils = _Utils(self)
        self.launcher_cls = self._launcher
        self.plan = ""
        self.records: list[Compiled] = []
        self._pending: _NoLaunch | None = None

    @classmethod
    def is_active(cls):
        return False  # never picked by Triton's own driver discovery; only set_active installs it

    def get_current_target(self):
        return GPUTarget("cuda", self.arch.capability, 32)

    def get_current_device(self):
        return self.arch.capability

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("the compile-only driver cannot time anything")

    def get_empty_cache_for_benchmark(self):
        raise RuntimeError("the compile-only driver cannot time anything")

    def clear_cache(self, cache):
        pass

    def map_python_to_cpp_type(self, ty: str) -> str:
        return "void*" if ty.startswith("*") else ty

    def _launcher(self, src, metadata):
        launcher = _NoLaunch(src, metadata)
        self._pending = launcher
        src_fn = getattr(src, "fn", None)
        signature = getattr(src, "signature", {})
        self.records.append(
            Compiled(
                arch=self.arch.capability,
                kernel=getattr(src_fn, "__name__", metadata.name),
                plan=self.plan,
                num_warps=metadata.num_warps,
                constexprs=_constexprs(src) if src_fn is not None else {},
                signature=",".join(str(v) for v in signature.values()),
                shared=metadata.shared,
            )
        )
        return launcher

    def loaded(self, name: str, cubin: bytes) -> None:
        self.records[-1].cubin = cubin


# ---------------------------------------------------------------------------------------------------------
# Reading a cubin.
# ---------------------------------------------------------------------------------------------------------

_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SPILL = re.compile(r"\b(LDL|STL)(\.\w+)*\b")


def analyse(record: Compiled, arch: Arch) -> None:
    """Fill in registers, stack, local memory and spill instructions from the cubin, and whether it fits.

    The SASS (a disassembly: most of this function's time) is read only for a cubin with a stack frame or local
    memory: without either there is no local memory for an LDL/STL to address, so it spills nothing."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(record.cubin)
        f.flush()

        def cuobjdump(option: str) -> str:
            return subprocess.run(
                [_tool("cuobjdump"), option, f.name], capture_output=True, text=True, check=True
            ).stdout

        usage = cuobjdump("-res-usage")
        match = _RES_USAGE.search(usage)
        if match is None:
            record.error = f"cuobjdump -res-usage gave no resource line: {usage[:200]!r}"
            return
        record.registers, record.stack, _, record.local = (int(g) for g in match.groups())
        sass = cuobjdump("-sass") if record.stack or record.local else ""
    record.spill_instructions = sum(1 for line in sass.splitlines() if _SPILL.search(line))
    threads = record.num_warps * 32
    allocated = -(-record.registers // 8) * 8  # registers are allocated per thread in units of 8
    record.fits = record.shared <= arch.max_shared and threads * allocated <= arch.registers_per_sm


# ---------------------------------------------------------------------------------------------------------
# Launch plans: calls of the kernel launchers, on meta tensors, as the ops make them.
# ---------------------------------------------------------------------------------------------------------

WARM_MANIFEST = "fastcenter-warm.json"  # written into TRITON_CACHE_DIR, read by bench.first_contact
DEFAULT = dict(tokens=16 * 512, batch=16, seq=512, dim=256, heads=4, head_dim=64, hidden=1024, vocab=GPT2_VOCAB_SIZE)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Plan:
    label: str
    launch: Callable[[], None]
    ci: bool = False  # part of the "ci" selection


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _norm_plans() -> list[Plan]:
    from fastcenter.kernels import norm
    from fastcenter.ops import MAX_FUSED_NORM_DIM

    plans = []

    def add(
        label, n, d, x_dtype, other_dtype, *, residual, center, weight, out_dtype=None, weight_offset=0.0, ci=False
    ):
        def launch():
            x = _meta(n, d, dtype=x_dtype)
            r = _meta(n, d, dtype=other_dtype) if residual else None
            c = {"none": None, "vector": _meta(d, dtype=other_dtype), "token": _meta(n, d, dtype=other_dtype)}[center]
            w = _meta(d, dtype=other_dtype) if weight else None
            normed, hidden, rstd = norm.norm_forward(x, w, c, r, 1e-6, out_dtype, weight_offset)
            stored = hidden if hidden.numel() else x
            grad_hidden = torch.empty_like(x) if (residual or center != "none") else None
            # With a residual the kernel also stores the residual's own gradient, in its dtype (ops/norm.py).
            residual_grad_dtype = other_dtype if residual else None
            dy = torch.empty_like(normed)
            norm.norm_backward(dy, grad_hidden, stored, w, rstd, center == "vector", residual_grad_dtype, weight_offset)

        plans.append(Plan(label, launch, ci))

    n, d = DEFAULT["tokens"], DEFAULT["dim"]
    # The default model under bf16 autocast: a float32 stream, bf16 branch outputs added as the residual, float32
    # weights, `normed` written (and its gradient read) in bf16 for the next linear; the first norm has neither
    # residual nor centre.
    add("model: first norm (fp32 stream)", n, d, torch.float32, torch.float32, residual=False, center="none",
        weight=True, out_dtype=torch.bfloat16, ci=True)  # fmt: skip
    add("model: norm + bf16 residual", n, d, torch.float32, torch.bfloat16, residual=True, center="none",
        weight=True, out_dtype=torch.bfloat16, ci=True)  # fmt: skip
    for name, dtype in DTYPES.items():
        for width, ci in ((256, False), (4096, False), (8192, False), (MAX_FUSED_NORM_DIM, True)):
            rows = n if width <= 4096 else 512
            add(f"rms_norm {name} D={width}", rows, width, dtype, dtype, residual=False, center="none", weight=True)
            add(f"center_rms_norm {name} D={width} residual+centre", rows, width, dtype, dtype, residual=True,
                center="vector", weight=True, ci=ci and name != "fp16")  # fmt: skip
            add(f"center_rms_norm {name} D={width} per-token centre", rows, width, dtype, dtype, residual=True,
                center="token", weight=True)  # fmt: skip
        add(f"rms_norm {name} D=256 no weight", n, 256, dtype, dtype, residual=False, center="none", weight=False)
        # Gemma's (1 + weight): Gemma 2 2B's width, and the widest row with every flag (the split backward)
        add(f"rms_norm {name} D=2304 weight offset", n, 2304, dtype, dtype, residual=False, center="none",
            weight=True, weight_offset=1.0)  # fmt: skip
        add(f"center_rms_norm {name} D={MAX_FUSED_NORM_DIM} residual+centre, weight offset", 512, MAX_FUSED_NORM_DIM,
            dtype, dtype, residual=True, center="vector", weight=True, weight_offset=1.0, ci=name == "bf16")  # fmt: skip
    return plans


def _rope_plans() -> list[Plan]:
    from fastcenter.kernels import rope

    plans = []

    def add(label, batch, seq, heads, head_dim, dtype, *, interleaved, ci=False):
        def launch():
            qkv = _meta(batch, seq, 3, heads, head_dim, dtype=dtype)  # the model's packed projection
            cos, sin = _meta(seq, head_dim // 2), _meta(seq, head_dim // 2)
            q_out, k_out = rope.rope_rotate(qkv[:, :, 0], qkv[:, :, 1], cos, sin, interleaved, False)
            rope.rope_rotate(q_out, k_out, cos, sin, interleaved, True)  # the backward

        plans.append(Plan(label, launch, ci))

    s = DEFAULT
    add("model: rope bf16", s["batch"], s["seq"], s["heads"], s["head_dim"], torch.bfloat16, interleaved=False,
        ci=True)  # fmt: skip
    for name, dtype in DTYPES.items():
        for interleaved in (False, True):
            kind = "interleaved" if interleaved else "half-split"
            add(f"rope {name} default {kind}", s["batch"], s["seq"], s["heads"], s["head_dim"], dtype,
                interleaved=interleaved)  # fmt: skip
            add(f"rope {name} 8x4096x32x128 {kind}", 8, 4096, 32, 128, dtype, interleaved=interleaved,
                ci=name == "fp32" and interleaved)  # fmt: skip
    return plans


def _swiglu_plans() -> list[Plan]:
    from fastcenter.kernels import swiglu

    plans = []

    def add(label, n, h, dtype, *, packed, activation="silu", ci=False):
        def launch():
            if packed:
                gate, up = _meta(n, 2 * h, dtype=dtype), None
            else:
                gate, up = _meta(n, h, dtype=dtype), _meta(n, h, dtype=dtype)
            out = swiglu.swiglu_forward(gate, up, activation)
            swiglu.swiglu_backward(torch.empty_like(out), gate, up, activation)

        plans.append(Plan(label, launch, ci))

    add("model: swiglu bf16 packed", DEFAULT["tokens"], DEFAULT["hidden"], torch.bfloat16, packed=True, ci=True)
    for name, dtype in DTYPES.items():
        add(f"swiglu {name} default packed", DEFAULT["tokens"], DEFAULT["hidden"], dtype, packed=True)
        add(f"swiglu {name} 65536x4096 packed", 65536, 4096, dtype, packed=True, ci=name == "fp32")
        add(f"swiglu {name} 8192x1000 two tensors", 8192, 1000, dtype, packed=False)
        # GeGLU: the same kernels with the GELU activations (tanh: Gemma's gate and up projections, two tensors)
        for activation in ("gelu_tanh", "gelu"):
            add(f"geglu {activation} {name} 8192x1000 two tensors", 8192, 1000, dtype, packed=False,
                activation=activation)  # fmt: skip
            add(f"geglu {activation} {name} 65536x4096 packed", 65536, 4096, dtype, packed=True,
                activation=activation, ci=name == "fp32")  # fmt: skip
    return plans


CE_OPTIONS = {
    "plain": dict(label_smoothing=0.0, z_loss=0.0, softcap=None),
    "softcap": dict(label_smoothing=0.0, z_loss=1e-4, softcap=30.0),
    "smoothing": dict(label_smoothing=0.1, z_loss=0.0, softcap=None),
    "everything": dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0),
}


def _cross_entropy_plans() -> list[Plan]:
    from fastcenter.kernels import cross_entropy as ce

    plans = []
    n, dim, vocab = DEFAULT["tokens"], DEFAULT["dim"], DEFAULT["vocab"]

    def add_ce(label, dtype, options, reduction, ci=False):
        def launch():
            logits, target = _meta(n, vocab, dtype=dtype), _meta(n, dtype=torch.int64)
            loss, lse = ce.cross_entropy_forward(logits, target, reduction=reduction, ignore_index=-100, **options)
            ce.cross_entropy_backward(
                torch.empty_like(loss), logits, target, lse, reduction=reduction, ignore_index=-100, **options
            )

        plans.append(Plan(label, launch, ci))

    def add_lce(label, x_dtype, w_dtype, d, options, reduction, ci=False):
        def launch():
            x, w, target = _meta(n, d, dtype=x_dtype), _meta(vocab, d, dtype=w_dtype), _meta(n, dtype=torch.int64)
            common = dict(ignore_index=-100, chunk_size=None, **options)
            needs = dict(need_grad_input=True, need_grad_weight=True, need_grad_bias=False)
            loss, lse, *_ = ce.linear_cross_entropy_forward(x, w, None, target, reduction=reduction, **common, **needs)
            if reduction == "none":
                ce.linear_cross_entropy_backward(torch.empty_like(loss), x, w, None, target, lse, **common, **needs)

        plans.append(Plan(label, launch, ci))

    def add_dw(label, dtype, d, ci=False):
        """The weight gradient's Triton GEMM ("triton" accumulation mode: a torch that refuses cuBLAS's in-place
        float32 output), on one chunk of the default size: the first chunk (=) and the others (+=)."""

        def launch():
            chunk = ce.default_chunk_size(n, vocab, dtype)
            grad_logits = ce._chunk_buffer(chunk, vocab, dtype, "meta")
            acc, x_c = _meta(vocab, d), _meta(chunk, d, dtype=dtype)
            for first in (True, False):
                ce.add_matmul_triton(acc, grad_logits.t(), x_c, first=first, a_width=grad_logits.stride(0))

        plans.append(Plan(label, launch, ci))

    add_lce("model: linear_cross_entropy bf16 x, fp32 weight", torch.bfloat16, torch.float32, dim, CE_OPTIONS["plain"],
            "mean", ci=True)  # fmt: skip
    add_dw("model: linear_cross_entropy dW triton GEMM bf16", torch.bfloat16, dim, ci=True)
    add_dw("linear_cross_entropy dW triton GEMM fp16", torch.float16, dim)
    add_dw("linear_cross_entropy dW triton GEMM bf16 D=2048", torch.bfloat16, 2048)
    for name, dtype in DTYPES.items():
        for option_name, options in CE_OPTIONS.items():
            worst = option_name == "everything" and name != "fp16"
            add_ce(f"cross_entropy {name} {option_name}", dtype, options, "mean", ci=worst)
            add_lce(f"linear_cross_entropy {name} {option_name}", dtype, dtype, dim, options, "mean")
            add_lce(f"linear_cross_entropy {name} {option_name} none", dtype, dtype, dim, options, "none", ci=worst)
        add_lce(f"linear_cross_entropy {name} D=2048", dtype, dtype, 2048, CE_OPTIONS["plain"], "mean")
    return plans


def all_plans() -> list[Plan]:
    return _norm_plans() + _rope_plans() + _swiglu_plans() + _cross_entropy_plans()


# ---------------------------------------------------------------------------------------------------------
# Running the plans.
# ---------------------------------------------------------------------------------------------------------


def _check_compiled_not_interpreted() -> None:
    from fastcenter.kernels import norm

    if not isinstance(norm._norm_fwd_kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError(
            "Triton and the kernels were imported under TRITON_INTERPRET=1 (interpreted, not compiled): run this "
            "tool as its own process, `python -m bench.compile`"
        )


def compile_plans(plans: list[Plan], archs: list[Arch], log=print) -> list[Compiled]:
    """Launch every plan under a compile-only driver per architecture; return one record per compiled kernel."""
    from triton.runtime import driver as driver_config

    _check_compiled_not_interpreted()
    records: list[Compiled] = []
    for arch in archs:
        driver = CompileOnlyDriver(arch)
        # Left active afterwards: resetting would make Triton look for a real GPU driver (none here).
        driver_config.set_active(driver)
        started = time.perf_counter()
        for plan in plans:
            driver.plan = plan.label
            before = len(driver.records)
            try:
                plan.launch()
            except Exception as exc:  # noqa: BLE001 -- a compile error is a result to report, not a crash
                lines = str(exc).strip().splitlines()
                message = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
                if len(driver.records) > before and not driver.records[-1].cubin:
                    driver.records[-1].error = message  # e.g. OutOfResources for this kernel
                else:
                    driver.records.append(Compiled(arch.capability, "?", plan.label, 0, {}, "", 0, error=message))
        for record in driver.records:
            if record.cubin and not record.error:
                analyse(record, arch)
        records.extend(driver.records)
        log(f"sm_{arch.capability}: {len(driver.records)} kernels compiled in {time.perf_counter() - started:.1f} s")
    return records


# ---------------------------------------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------------------------------------

_SHOWN_CONSTEXPRS = ("BLOCK_M", "BLOCK_D", "BLOCK_T", "BLOCK_H", "BLOCK_HALF", "BLOCK_N", "BLOCK_V")


def _blocks(record: Compiled) -> str:
    return " ".join(f"{k}={v}" for k, v in record.constexprs.items() if k in _SHOWN_CONSTEXPRS)


def table(records: list[Compiled]) -> str:
    """A markdown table, one row per compiled kernel."""
    lines = [
        "| arch | kernel | launch (plan) | blocks | warps | regs | spills (LDL/STL) | stack B | smem B | ok |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        status = "ok" if r.ok else (r.error or ("spills" if r.spill_instructions else "does not fit"))
        lines.append(
            f"| sm_{r.arch} | {r.kernel} | {r.plan} | {_blocks(r)} | {r.num_warps} | {r.registers} | "
            f"{r.spill_instructions} | {r.stack} | {r.shared} | {status} |"
        )
    return "\n".join(lines)


def summary(records: list[Compiled]) -> str:
    bad = [r for r in records if not r.ok]
    worst = max((r for r in records if r.registers >= 0), key=lambda r: r.registers, default=None)
    text = f"{len(records)} kernel specialisations, {len(bad)} not ok"
    if worst is not None:
        text += f"; most registers: {worst.registers} ({worst.kernel}, {worst.plan}, sm_{worst.arch})"
    return text


def versions() -> dict:
    return {"triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,86,89,90", help="compute capabilities, comma separated")
    parser.add_argument("--plans", choices=("all", "ci"), default="all", help="every launch plan, or the CI subset")
    parser.add_argument("--only", default="", help="keep the plans whose label contains this text")
    parser.add_argument("--json", help="also write the records (and versions) to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="print the summary and the rows that are not ok only")
    parser.add_argument("--dump", metavar="DIR", help="also write every cubin there (cuobjdump -sass FILE reads it)")
    args = parser.parse_args(argv)

    try:
        archs = [ARCHS[int(a)] for a in args.arch.split(",")]
    except (KeyError, ValueError):
        parser.error(f"--arch: choose from {','.join(map(str, ARCHS))}, got {args.arch!r}")
    plans = [p for p in all_plans() if (args.plans == "all" or p.ci) and args.only in p.label]
    if not plans:
        parser.error(f"no plan matches --only {args.only!r}")
    print(
        f"compiling {len(plans)} launch plans for {', '.join(f'sm_{a.capability}' for a in archs)} "
        f"(triton {triton.__version__}, torch {torch.__version__})",
        flush=True,
    )
    records = compile_plans(plans, archs, log=lambda line: print(line, flush=True))
    shown = [r for r in records if not r.ok] if args.quiet else records
    if shown:
        print(table(shown))
    print(summary(records))
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        for i, r in enumerate(records):
            if r.cubin:
                with open(os.path.join(args.dump, f"{i:04d}-sm_{r.arch}-{r.kernel}.cubin"), "wb") as f:
                    f.write(r.cubin)
    cache = os.environ.get("TRITON_CACHE_DIR")
    if cache:  # the compiled kernels are in Triton's cache there: say what warmed it, for bench.first_contact
        warmed = {
            "triton": triton.__version__,
            "python": sys.version.split()[0],
            "triton_build": triton_build(),
            "archs": [a.capability for a in archs],
            "kernels": len(records),
        }
        with open(os.path.join(cache, WARM_MANIFEST), "w") as f:
            json.dump(warmed, f, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            archs_json = {a.capability: dataclasses.asdict(a) for a in archs}
            env = collect_environment()
            run = {
                "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": machine_record(env, torch.get_num_threads()),
                **env,
                "argv": " ".join(sys.argv),
            }
            json.dump(
                {"versions": versions(), "run": run, "archs": archs_json, "records": [r.to_json() for r in records]},
                f,
                indent=1,
            )
    return 0 if all(r.ok for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
