"""Every benchmarked op: its shapes, its inputs, the variants it is compared with, and its cost model.

A case is one (op, shape, direction, variant), with the id "<op>-<shape>-<direction>-<variant>". Directions:
"fwd" (forward only, under no_grad, as in inference) and "fwdbwd" (forward, then torch.autograd.grad with a fixed
random grad_output, so nothing accumulates between calls). Variants:

    fastcenter   fastcenter.ops, the fused Triton kernels
    eager        plain PyTorch doing the same float32 math (fastcenter.reference, or the two-op formulation)
    torch        PyTorch's native op in the input dtype, where one exists (F.rms_norm, F.cross_entropy on bf16)
    compile      torch.compile(eager) (static shapes, default mode)
    torch_lce_*  torch.nn.functional.linear_cross_entropy with chunking options, where this PyTorch has it
    liger        Liger-Kernel's fused linear cross-entropy, when it is installed

Inputs are drawn from a generator seeded per (op, shape): every variant of a case sees the same data.

The byte model of each op counts what an ideal implementation must move through device memory: every input read
once and every output written once, per pass (the backward reads again what it needs, reads the grad_outputs and
writes the gradients). Achieved GB/s = bytes / median time. linear_cross_entropy is compute-bound: 2*N*D*V FLOPs
per GEMM (one forward; grad input and grad weight backward), against the measured bf16 matmul rate.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch._dynamo
import torch.nn.functional as F

from fastcenter import ops, reference
from fastcenter.data import GPT2_VOCAB_SIZE as V

from .measure import dry_run

DIRECTIONS = ("fwd", "fwdbwd")
EPS = 1e-6
RECORD_SCHEMA = "fastcenter-bench/1"


class Unavailable(Exception):
    """A variant that cannot run here (library not installed, API missing): the case is skipped with this."""


@dataclass(frozen=True)
class Case:
    op: str
    shape: str
    direction: str
    variant: str

    def __post_init__(self):
        for part in (self.op, self.shape, self.direction, self.variant):
            if not part or "-" in part or "[" in part or "]" in part:
                raise ValueError(f"case id parts may not be empty or contain '-', '[' or ']': {part!r}")

    @property
    def id(self) -> str:
        return f"{self.op}-{self.shape}-{self.direction}-{self.variant}"

    def __str__(self) -> str:
        return self.id


def parse_case_id(text: str) -> Case | None:
    """The Case of an id or of a pytest node id ("bench/test_ops.py::test_op[<id>]"); None if it is neither."""
    if "[" in text and text.endswith("]"):
        text = text[text.index("[") + 1 : -1]
    parts = text.split("-")
    return Case(*parts) if len(parts) == 4 and all(parts) else None


def case_seed(op: str, shape: str) -> int:
    return zlib.crc32(f"{op}/{shape}".encode())


def _randn(shape, gen, scale=1.0, shift=0.0, dtype=torch.bfloat16):
    return (torch.randn(shape, generator=gen, device=gen.device) * scale + shift).to(dtype)


def compiled(fn: Callable) -> Callable:
    """torch.compile of an eager function, from a clean Dynamo cache so that its compile time is this case's."""
    torch._dynamo.reset()
    # The dry run traces through Dynamo and AOTAutograd but skips Inductor's C++ build (no toolchain promised).
    return torch.compile(fn, dynamic=False, backend="aot_eager" if dry_run() else "inductor")


@dataclass
class OpSpec:
    """One op: shapes (label -> dims), inputs, the forward of each variant (`compile` is torch.compile of `eager`),
    and its cost model."""

    name: str
    shapes: dict[str, dict[str, int]]
    inputs: Callable[[dict, torch.Generator], dict]  # (dims, gen) -> {name: tensor}, the differentiable first
    differentiable: tuple[str, ...]
    variants: dict[str, Callable[[dict], Callable]]  # variant -> (dims -> forward(**tensors) -> tuple of outputs)
    bytes_moved: Callable[[dict, int, str], int]  # (dims, bytes per element, direction) -> bytes
    notes: str
    flops: Callable[[dict, str], int] | None = None
    bound: str = "memory"  # which ceiling "% of peak" refers to: copy bandwidth, or "compute": the matmul rate
    dtype: torch.dtype = torch.bfloat16

    @property
    def variant_names(self) -> tuple[str, ...]:
        return (*self.variants, "compile")  # compile last: the slowest to prepare

    def build(self, variant: str, dims: dict) -> Callable:
        return compiled(self.variants["eager"](dims)) if variant == "compile" else self.variants[variant](dims)

    def cases(self, shape: str) -> list[Case]:
        return (
            [Case(self.name, shape, d, v) for d in DIRECTIONS for v in self.variant_names]
            if shape in self.shapes
            else []
        )


def _passes(fwd: int, bwd: int, direction: str) -> int:
    return fwd if direction == "fwd" else fwd + bwd


# rms_norm: y = x * rsqrt(mean(x^2) + eps) * w over the last dim.


def rms_norm_bytes(dims: dict, e: int, direction: str) -> int:
    """fwd: read x, write y (2*N*D*e), read w (D*e). bwd: read x and dy, write dx (3*N*D*e), read w, write dw
    (2*D*e). e = bytes per element."""
    N, D = dims["N"], dims["D"]
    return _passes(2 * N * D * e + D * e, 3 * N * D * e + 2 * D * e, direction)


RMS_NORM = OpSpec(
    name="rms_norm",
    shapes={"default": {"N": 8192, "D": 256}, "large": {"N": 65536, "D": 4096}},
    inputs=lambda d, g: {"x": _randn((d["N"], d["D"]), g), "weight": _randn((d["D"],), g, 0.1, 1.0)},
    differentiable=("x", "weight"),
    variants={
        "fastcenter": lambda d: lambda x, weight: (ops.rms_norm(x, (d["D"],), weight, EPS),),
        "eager": lambda d: lambda x, weight: (reference.rms_norm(x, (d["D"],), weight, EPS),),
        "torch": lambda d: lambda x, weight: (F.rms_norm(x, (d["D"],), weight, EPS),),
    },
    bytes_moved=rms_norm_bytes,
    notes="x [N, D] bf16, weight [D] bf16, eps 1e-6. eager = fastcenter.reference (float32 math); torch = F.rms_norm.",
)


# center_rms_norm as the model uses it: hidden = x + residual - center; normed = rmsnorm(hidden) * w, with a [D]
# centre that needs no gradient (the "adaptive" mode's running mean).


def center_rms_norm_bytes(dims: dict, e: int, direction: str) -> int:
    """fwd: read x, residual; write normed, hidden (4*N*D*e); read centre, w (2*D*e). bwd: read grad_normed,
    grad_hidden, hidden; write one gradient, which input and residual share (4*N*D*e); read w, write dw (2*D*e).
    e = bytes per element."""
    N, D = dims["N"], dims["D"]
    return _passes(4 * N * D * e + 2 * D * e, 4 * N * D * e + 2 * D * e, direction)


def _native_center_rms_norm(d):
    def forward(x, residual, weight, center):  # what one writes with native ops: add and subtract in bf16
        hidden = x + residual - center
        return F.rms_norm(hidden, (d["D"],), weight, EPS), hidden

    return forward


CENTER_RMS_NORM = OpSpec(
    name="center_rms_norm",
    shapes={"default": {"N": 8192, "D": 256}, "large": {"N": 65536, "D": 4096}},
    inputs=lambda d, g: {
        "x": _randn((d["N"], d["D"]), g),
        "residual": _randn((d["N"], d["D"]), g),
        "weight": _randn((d["D"],), g, 0.1, 1.0),
        "center": _randn((d["D"],), g, 0.1),
    },
    differentiable=("x", "residual", "weight"),
    variants={
        "fastcenter": lambda d: (
            lambda x, residual, weight, center: ops.center_rms_norm(
                x, weight, center=center, residual=residual, eps=EPS
            )
        ),
        "eager": lambda d: (
            lambda x, residual, weight, center: reference.center_rms_norm(
                x, weight, center=center, residual=residual, eps=EPS
            )
        ),
        "torch": _native_center_rms_norm,
    },
    bytes_moved=center_rms_norm_bytes,
    notes="x, residual [N, D] bf16, centre [D] (no grad), weight [D]; outputs (normed, hidden), both with a "
    "grad_output. torch = x + residual - center in bf16, then F.rms_norm.",
)


# rope: q, k [B, T, H, Dh] rotated by position, as strided views of one packed qkv projection.


def rope_bytes(dims: dict, e: int, direction: str) -> int:
    """fwd: read q, k; write q_out, k_out (4*B*T*H*Dh*e); read the cos and sin tables (float32 [T, Dh/2] each).
    bwd: the same with gradients (read dq_out, dk_out; write dq, dk; read the tables). e = bytes per element."""
    B, T, H, Dh = dims["B"], dims["T"], dims["H"], dims["Dh"]
    one_pass = 4 * B * T * H * Dh * e + 2 * T * (Dh // 2) * 4
    return _passes(one_pass, one_pass, direction)


def _rope_inputs(d, g):
    qkv = _randn((d["B"], d["T"], 3, d["H"], d["Dh"]), g)  # the model's packed projection, viewed per head
    cos, sin = ops.rope_cache(d["T"], d["Dh"], device=g.device)
    return {"q": qkv[:, :, 0], "k": qkv[:, :, 1], "cos": cos, "sin": sin}


ROPE = OpSpec(
    name="rope",
    shapes={"default": {"B": 16, "T": 512, "H": 4, "Dh": 64}, "large": {"B": 8, "T": 4096, "H": 32, "Dh": 128}},
    inputs=_rope_inputs,
    differentiable=("q", "k"),
    variants={
        "fastcenter": lambda d: lambda q, k, cos, sin: ops.rope(q, k, cos, sin),
        "eager": lambda d: lambda q, k, cos, sin: reference.rope(q, k, cos, sin),
    },
    bytes_moved=rope_bytes,
    notes="q, k: [B, T, H, Dh] bf16 strided views of a packed [B, T, 3, H, Dh] projection; half-split pairs; "
    "cos/sin float32 [T, Dh/2].",
)


# swiglu: silu(gate) * up from the packed [N, 2H] projection.


def swiglu_bytes(dims: dict, e: int, direction: str) -> int:
    """fwd: read the packed [N, 2H] input, write [N, H] (3*N*H*e). bwd: read the packed input and the [N, H]
    grad_output, write the packed [N, 2H] gradient (5*N*H*e). e = bytes per element."""
    N, H = dims["N"], dims["H"]
    return _passes(3 * N * H * e, 5 * N * H * e, direction)


def _native_swiglu(d):
    def forward(packed):
        gate, up = packed.chunk(2, dim=-1)
        return (F.silu(gate) * up,)

    return forward


SWIGLU = OpSpec(
    name="swiglu",
    shapes={"default": {"N": 8192, "H": 1024}, "large": {"N": 65536, "H": 4096}},
    inputs=lambda d, g: {"packed": _randn((d["N"], 2 * d["H"]), g)},
    differentiable=("packed",),
    variants={
        "fastcenter": lambda d: lambda packed: (ops.swiglu(packed),),
        "eager": lambda d: lambda packed: (reference.swiglu(packed),),
        "torch": _native_swiglu,
    },
    bytes_moved=swiglu_bytes,
    notes="packed [N, 2H] bf16 -> [N, H]. eager = fastcenter.reference (float32 math); torch = F.silu(gate) * up "
    "in bf16.",
)


# cross_entropy on given logits [N, V].


def cross_entropy_bytes(dims: dict, e: int, direction: str) -> int:
    """fwd: read logits (N*V*e) and int64 targets (8*N), write the float32 loss (4 bytes). bwd: read logits,
    targets and the loss's grad_output (4), write grad logits (N*V*e). e = bytes per element."""
    N, V = dims["N"], dims["V"]
    return _passes(N * V * e + 8 * N + 4, 2 * N * V * e + 8 * N + 4, direction)


def _targets(d, g):
    return torch.randint(0, d["V"], (d["N"],), generator=g, device=g.device)


CROSS_ENTROPY = OpSpec(
    name="cross_entropy",
    shapes={"default": {"N": 8192, "V": V}},
    inputs=lambda d, g: {"logits": _randn((d["N"], d["V"]), g, 2.0), "target": _targets(d, g)},
    differentiable=("logits",),
    variants={
        "fastcenter": lambda d: lambda logits, target: (ops.cross_entropy(logits, target),),
        # autocast's way: float32 math on upcast logits
        "eager": lambda d: lambda logits, target: (F.cross_entropy(logits.float(), target),),
        "torch": lambda d: lambda logits, target: (F.cross_entropy(logits, target),),
    },
    bytes_moved=cross_entropy_bytes,
    notes="logits [N, V] bf16, mean reduction. eager = F.cross_entropy(logits.float()) (autocast's way); "
    "torch = F.cross_entropy on the bf16 logits.",
)


# linear_cross_entropy: cross_entropy(x @ W^T, target) without the full logits.


def linear_cross_entropy_flops(dims: dict, direction: str) -> int:
    """2*N*D*V per GEMM: logits forward; grad input and grad weight backward (recomputing logits is extra)."""
    gemm = 2 * dims["N"] * dims["D"] * dims["V"]
    return gemm if direction == "fwd" else 3 * gemm


def linear_cross_entropy_bytes(dims: dict, e: int, direction: str) -> int:
    """fwd: read x [N, D], W [V, D] and int64 targets, write the float32 loss: (N*D + V*D)*e + 8*N + 4 bytes.
    bwd: read x, W, targets and the loss's grad_output, write dx and dW (in the inputs' dtype)."""
    N, D, V = dims["N"], dims["D"], dims["V"]
    return _passes((N * D + V * D) * e + 8 * N + 4, 2 * (N * D + V * D) * e + 8 * N + 4, direction)


def _torch_linear_cross_entropy(**option_fields) -> Callable:
    def build(d):
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy with chunking options")
        options = torch.nn.LinearCrossEntropyOptions(**option_fields)
        return lambda x, weight, target: (F.linear_cross_entropy(x, weight, target, options=options),)

    return build


def _liger_linear_cross_entropy(d) -> Callable:
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # noqa: BLE001 -- ImportError, or a broken install: either way, not comparable
        raise Unavailable(f"Liger-Kernel is not importable here ({type(exc).__name__}: {exc})") from None
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda x, weight, target: (loss(weight, x, target),)  # Liger takes the weight first


LINEAR_CROSS_ENTROPY = OpSpec(
    name="linear_cross_entropy",
    shapes={"default": {"N": 8192, "D": 256, "V": V}, "large": {"N": 8192, "D": 2048, "V": V}},
    inputs=lambda d, g: {
        "x": _randn((d["N"], d["D"]), g),
        "weight": _randn((d["V"], d["D"]), g, 0.02),
        "target": _targets(d, g),
    },
    differentiable=("x", "weight"),
    variants={
        "fastcenter": lambda d: lambda x, weight, target: (ops.linear_cross_entropy(x, weight, target),),
        # bf16 GEMM, float32 loss: what autocast does with F.linear + F.cross_entropy
        "eager": lambda d: lambda x, weight, target: (F.cross_entropy(F.linear(x, weight).float(), target),),
        "torch_lce_chunked": _torch_linear_cross_entropy(),
        "torch_lce_accurate": _torch_linear_cross_entropy(acc_policy="accurate"),
        "liger": _liger_linear_cross_entropy,
    },
    bytes_moved=linear_cross_entropy_bytes,
    flops=linear_cross_entropy_flops,
    bound="compute",
    notes="x [N, D] bf16, W [V, D] bf16, mean loss. eager = F.cross_entropy(F.linear(x, W).float()) (autocast's "
    "way); torch_lce_chunked = F.linear_cross_entropy(options=LinearCrossEntropyOptions()) (auto policy), "
    "torch_lce_accurate = the same with acc_policy='accurate'; liger = LigerFusedLinearCrossEntropyLoss.",
)

# In the order the cases run (the losses first: they matter most), and the report shows them.
OP_SPECS: dict[str, OpSpec] = {
    s.name: s for s in (LINEAR_CROSS_ENTROPY, CROSS_ENTROPY, RMS_NORM, CENTER_RMS_NORM, ROPE, SWIGLU)
}
# Tiny, awkward dims for the dry run (FASTCENTER_BENCH_DRY_RUN=1): the harness, not the numbers.
DRY_RUN_DIMS = {
    "rms_norm": {"N": 5, "D": 24},
    "center_rms_norm": {"N": 5, "D": 24},
    "rope": {"B": 2, "T": 3, "H": 2, "Dh": 8},
    "swiglu": {"N": 5, "H": 12},
    "cross_entropy": {"N": 5, "V": 37},
    "linear_cross_entropy": {"N": 5, "D": 16, "V": 37},
}
TRAIN_VARIANTS = ("fused", "eager", "eager_compile", "fused_compile")


def describe_ops() -> dict:
    """The op table as a results file keeps it: bench.report renders its sections from this, not from here."""
    ops = {
        name: {
            "shapes": spec.shapes,
            "variants": list(spec.variant_names),
            "bound": spec.bound,
            "notes": spec.notes,
            "bytes_model": " ".join(spec.bytes_moved.__doc__.split()),
        }
        for name, spec in OP_SPECS.items()
    }
    return {**ops, "train_step": {"shapes": {"default": {}}, "variants": list(TRAIN_VARIANTS)}}


def op_cases() -> list[Case]:
    """Every op case, the default shapes first: a run cut short has measured the most telling ones."""
    return [case for shape in ("default", "large") for spec in OP_SPECS.values() for case in spec.cases(shape)]


def train_cases() -> list[Case]:
    return [Case("train_step", "default", "step", variant) for variant in TRAIN_VARIANTS]


@dataclass
class Prepared:
    """What the runner times: `call()` runs one forward (fwd) or forward+backward (fwdbwd) of the case and returns
    the outputs or the gradients."""

    case: Case
    spec: OpSpec
    dims: dict
    tensors: dict
    call: Callable[[], tuple]


def prepare(case: Case, device="cuda", dims: dict | None = None) -> Prepared:
    """Inputs and the call for a case, at the op's dims for its shape or at `dims` (tiny ones on a CPU). Raises
    Unavailable for a variant that cannot run here."""
    spec = OP_SPECS[case.op]
    dims = spec.shapes[case.shape] if dims is None else dims
    gen = torch.Generator(device=device).manual_seed(case_seed(case.op, case.shape))
    backward = case.direction == "fwdbwd"
    tensors = {
        name: t.detach().requires_grad_(backward and name in spec.differentiable)
        for name, t in spec.inputs(dims, gen).items()
    }
    forward = spec.build(case.variant, dims)
    if not backward:

        def call():
            with torch.no_grad():
                return tuple(forward(**tensors))

        return Prepared(case, spec, dims, tensors, call)
    wrt = tuple(tensors[name] for name in spec.differentiable)
    grad_outputs: list = []  # made from the first call's outputs, then reused: fixed across calls and variants

    def call():
        outputs = tuple(forward(**tensors))
        if not grad_outputs:
            gen.manual_seed(case_seed(case.op, case.shape) + 1)
            for out in outputs:  # a scalar's in [0.5, 1.5): never all ones
                g = torch.rand((), generator=gen, device=device) + 0.5 if out.dim() == 0 else None
                g = torch.randn(out.shape, generator=gen, device=device) if g is None else g
                grad_outputs.append(g.to(out.dtype))
        return torch.autograd.grad(outputs, wrt, grad_outputs)

    return Prepared(case, spec, dims, tensors, call)


def relative_error(actual, expected) -> float:
    """max over paired tensors of ||a - e|| / ||e|| in float64 (0/0 counts as 0; a NaN anywhere as inf)."""
    worst = 0.0
    for a, e in zip(actual, expected, strict=True):
        a, e = a.detach().double(), e.detach().double()
        num, den = torch.linalg.vector_norm(a - e).item(), torch.linalg.vector_norm(e).item()
        if not (math.isfinite(num) and math.isfinite(den)):
            return math.inf
        worst = max(worst, 0.0 if num == 0 else (num / den if den > 0 else math.inf))
    return worst


# A sanity bound, not a precision test (tests/ hold those): a fused result further than this from eager PyTorch at
# the benchmark shape means the benchmark would be timing a wrong kernel.
SANITY_REL_ERROR = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-3}


def base_record(case: Case, timing: dict, bound: str) -> dict:
    """What every benchmark record starts with: the schema, the case's identity, what bounds it, its timing."""
    fields = {"op": case.op, "shape": case.shape, "direction": case.direction, "variant": case.variant}
    return {"schema": RECORD_SCHEMA, "case": case.id, **fields, "bound": bound, **timing, "dry_run": dry_run()}


def op_record(case: Case, timing: dict, peaks: dict | None, memory=None, dims=None, **extra) -> dict:
    """The flat, JSON-ready record of one op case: identity, timing, cost model, rates, memory."""
    spec = OP_SPECS[case.op]
    dims = spec.shapes[case.shape] if dims is None else dims
    seconds = timing["median_ms"] * 1e-3
    nbytes = spec.bytes_moved(dims, torch.empty((), dtype=spec.dtype).element_size(), case.direction)
    flops = spec.flops(dims, case.direction) if spec.flops else None
    record = {
        **base_record(case, timing, spec.bound),
        "dims": dict(dims),
        "dtype": str(spec.dtype).removeprefix("torch."),
        "bytes": nbytes,
        "gbps": nbytes / seconds / 1e9,
        "flops": flops,
        "tflops": None if flops is None else flops / seconds / 1e12,
        "pct_of_copy_bw": None,
        "pct_of_matmul": None,
    }
    if peaks:
        record["pct_of_copy_bw"] = 100.0 * record["gbps"] / peaks["copy_gbps"]
        if flops is not None:
            record["pct_of_matmul"] = 100.0 * record["tflops"] / peaks["matmul_tflops"]
    if memory is not None:
        record["mem_peak_bytes"] = memory.peak_bytes - memory.base_bytes  # new memory at the peak
        record["mem_extra_bytes"] = memory.extra_bytes
    return {**record, **extra}


def train_record(case: Case, timing: dict, *, tokens_per_step: int, flops_per_token: int | None, peaks, **extra):
    tokens_per_s = tokens_per_step / (timing["median_ms"] * 1e-3)
    tflops = None if flops_per_token is None else flops_per_token * tokens_per_s / 1e12
    record = {
        **base_record(case, timing, "compute"),
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "tflops": tflops,
        "pct_of_matmul": 100.0 * tflops / peaks["matmul_tflops"] if peaks and tflops is not None else None,
    }
    return {**record, **extra}
