"""Every benchmarked op: its shapes, its inputs, the variants it is compared with, and its cost model.

A case is one (op, shape, direction, variant). Directions: "fwd" (forward only, under no_grad, as in
inference) and "fwdbwd" (forward, then backward through torch.autograd.grad with a fixed random grad_output,
so nothing accumulates between reps and no zeroing is needed). Variants:

    fastcenter   fastcenter.ops, the fused Triton kernels
    eager        plain PyTorch doing the same float32 math (fastcenter.reference, or the two-op formulation)
    torch        PyTorch's native op in the input dtype, where one exists (F.rms_norm, F.cross_entropy on bf16)
    compile      torch.compile(eager) (static shapes, default mode)
    torch_lce_*  torch.nn.functional.linear_cross_entropy with chunking options, where this PyTorch has it
    liger        Liger-Kernel's fused linear cross-entropy, when it is installed

Inputs are seeded per (op, shape), so every variant of a case sees the same data and the same grad_output.

The byte model of each op counts what an ideal implementation must move through device memory: every input
read once and every output written once, per pass (forward and backward are separate calls, so the backward
reads again what it needs; it also reads the grad_outputs and writes the gradients). Achieved GB/s = bytes /
median time; "% of peak" divides by the copy bandwidth measured in the same session. linear_cross_entropy is
compute-bound: it is measured in TFLOP/s against the measured bf16 matmul rate, with 2*N*D*V FLOPs per GEMM
(one GEMM forward; two more backward: grad input and grad weight).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch._dynamo
import torch.nn.functional as F

from fastcenter import ops, reference

from .environment import dry_run

DIRECTIONS = ("fwd", "fwdbwd")
NORM_EPS = 1e-6


class Unavailable(Exception):
    """A variant that cannot run here (library not installed, API missing): the case is skipped with this."""


# ---------------------------------------------------------------------------------------------------------
# Case ids: "<op>-<shape>-<direction>-<variant>"; op, shape and variant names use underscores, never dashes.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    op: str
    shape: str
    direction: str
    variant: str

    @property
    def id(self) -> str:
        return case_id(self.op, self.shape, self.direction, self.variant)

    def __str__(self) -> str:
        return self.id


def case_id(op: str, shape: str, direction: str, variant: str) -> str:
    for part in (op, shape, direction, variant):
        if "-" in part or "[" in part or "]" in part:
            raise ValueError(f"case id parts may not contain '-', '[' or ']': {part!r}")
    return f"{op}-{shape}-{direction}-{variant}"


def parse_case_id(text: str) -> Case | None:
    """The Case of an id or of a pytest node id ("bench/test_ops.py::test_op[<id>]"); None if it is neither."""
    if "[" in text and text.endswith("]"):
        text = text[text.index("[") + 1 : -1]
    parts = text.split("-")
    if len(parts) != 4 or not all(parts):
        return None
    return Case(*parts)


# ---------------------------------------------------------------------------------------------------------
# Helpers for inputs and variants.
# ---------------------------------------------------------------------------------------------------------


def case_seed(op: str, shape: str) -> int:
    """A fixed seed per (op, shape): all variants of a case see identical inputs."""
    return zlib.crc32(f"{op}/{shape}".encode())


def _randn(shape, dtype, device, gen, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=gen, device=device) * scale + shift).to(dtype)


def _leaf(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """t as a leaf (keeping its strides: views stay views) that requires grad if asked."""
    return t.detach().requires_grad_(requires_grad)


def compiled(fn: Callable) -> Callable:
    """torch.compile of an eager function, from a clean Dynamo cache so its compile time is this case's."""
    torch._dynamo.reset()
    if dry_run():  # on the CPU: trace through Dynamo and AOTAutograd, skip Inductor's C++ build
        return torch.compile(fn, dynamic=False, backend="aot_eager")
    return torch.compile(fn, dynamic=False)


@dataclass
class Inputs:
    """Keyword arguments of every variant's forward, and the names of those the backward differentiates."""

    tensors: dict[str, torch.Tensor]
    differentiable: tuple[str, ...]


@dataclass
class OpSpec:
    """One op family: shapes (label -> dims), variants, inputs, forwards, and the cost model."""

    name: str
    shapes: dict[str, dict[str, int]]
    variants: tuple[str, ...]
    bound: str  # "memory" or "compute": which ceiling "% of peak" refers to
    make_inputs: Callable[..., Inputs]  # (dims, dtype, device, generator, requires_grad) -> Inputs
    build: Callable[[str, dict], Callable]  # (variant, dims) -> forward(**tensors) -> tuple of outputs
    bytes_moved: Callable[[dict, int, str], int]  # (dims, element bytes, direction) -> bytes
    flops: Callable[[dict, str], int] | None = None  # (dims, direction) -> FLOPs
    dtype: torch.dtype = torch.bfloat16
    notes: str = ""
    shape_text: Callable[[dict], str] = field(default=lambda dims: " x ".join(f"{k}={v}" for k, v in dims.items()))

    def cases(self) -> list[Case]:
        return [
            Case(self.name, shape, direction, variant)
            for shape in self.shapes
            for direction in DIRECTIONS
            for variant in self.variants
        ]


# ---------------------------------------------------------------------------------------------------------
# rms_norm: y = x * rsqrt(mean(x^2) + eps) * w over the last dim.
# ---------------------------------------------------------------------------------------------------------


def rms_norm_bytes(dims: dict, elt: int, direction: str) -> int:
    """fwd: read x, write y (2*N*D*e), read w (D*e). bwd: read x and dy, write dx (3*N*D*e), read w, write dw
    (2*D*e). e = bytes per element."""
    N, D = dims["N"], dims["D"]
    fwd = 2 * N * D * elt + D * elt
    bwd = 3 * N * D * elt + 2 * D * elt
    return fwd if direction == "fwd" else fwd + bwd


def _rms_norm_inputs(dims, dtype, device, gen, requires_grad) -> Inputs:
    N, D = dims["N"], dims["D"]
    x = _randn((N, D), dtype, device, gen)
    weight = _randn((D,), dtype, device, gen, scale=0.1, shift=1.0)
    return Inputs({"x": _leaf(x, requires_grad), "weight": _leaf(weight, requires_grad)}, ("x", "weight"))


def _rms_norm_build(variant: str, dims: dict) -> Callable:
    D = dims["D"]

    def eager(x, weight):
        return (reference.rms_norm(x, (D,), weight, NORM_EPS),)

    if variant == "fastcenter":
        return lambda x, weight: (ops.rms_norm(x, (D,), weight, NORM_EPS),)
    if variant == "eager":
        return eager
    if variant == "torch":
        return lambda x, weight: (F.rms_norm(x, (D,), weight, NORM_EPS),)
    if variant == "compile":
        return compiled(eager)
    raise KeyError(variant)


RMS_NORM = OpSpec(
    name="rms_norm",
    shapes={"seed": {"N": 8192, "D": 256}, "large": {"N": 65536, "D": 4096}},
    variants=("fastcenter", "eager", "torch", "compile"),
    bound="memory",
    make_inputs=_rms_norm_inputs,
    build=_rms_norm_build,
    bytes_moved=rms_norm_bytes,
    notes="x [N, D] bf16, weight [D] bf16, eps 1e-6. eager = fastcenter.reference (float32 math); "
    "torch = F.rms_norm.",
)


# ---------------------------------------------------------------------------------------------------------
# center_rms_norm, as the model uses it: hidden = x + residual - center; normed = rmsnorm(hidden) * w.
# The centre is a [D] vector that needs no gradient (the recommended "adaptive" mode's running mean).
# ---------------------------------------------------------------------------------------------------------


def center_rms_norm_bytes(dims: dict, elt: int, direction: str) -> int:
    """fwd: read x, residual; write normed, hidden (4*N*D*e); read centre, w (2*D*e).
    bwd: read grad_normed, grad_hidden, hidden; write one gradient, which input and residual share (4*N*D*e);
    read w, write dw (2*D*e). e = bytes per element."""
    N, D = dims["N"], dims["D"]
    fwd = 4 * N * D * elt + 2 * D * elt
    bwd = 4 * N * D * elt + 2 * D * elt
    return fwd if direction == "fwd" else fwd + bwd


def _center_rms_norm_inputs(dims, dtype, device, gen, requires_grad) -> Inputs:
    N, D = dims["N"], dims["D"]
    x = _randn((N, D), dtype, device, gen)
    residual = _randn((N, D), dtype, device, gen)
    center = _randn((D,), dtype, device, gen, scale=0.1)
    weight = _randn((D,), dtype, device, gen, scale=0.1, shift=1.0)
    tensors = {
        "x": _leaf(x, requires_grad),
        "residual": _leaf(residual, requires_grad),
        "center": center,
        "weight": _leaf(weight, requires_grad),
    }
    return Inputs(tensors, ("x", "residual", "weight"))


def _center_rms_norm_build(variant: str, dims: dict) -> Callable:
    D = dims["D"]

    def eager(x, residual, center, weight):
        return reference.center_rms_norm(x, weight, center=center, residual=residual, eps=NORM_EPS)

    if variant == "fastcenter":
        return lambda x, residual, center, weight: ops.center_rms_norm(
            x, weight, center=center, residual=residual, eps=NORM_EPS
        )
    if variant == "eager":
        return eager
    if variant == "torch":  # what one writes with native ops: the add and subtract in bf16, then F.rms_norm

        def native(x, residual, center, weight):
            hidden = x + residual - center
            return F.rms_norm(hidden, (D,), weight, NORM_EPS), hidden

        return native
    if variant == "compile":
        return compiled(eager)
    raise KeyError(variant)


CENTER_RMS_NORM = OpSpec(
    name="center_rms_norm",
    shapes={"seed": {"N": 8192, "D": 256}, "large": {"N": 65536, "D": 4096}},
    variants=("fastcenter", "eager", "torch", "compile"),
    bound="memory",
    make_inputs=_center_rms_norm_inputs,
    build=_center_rms_norm_build,
    bytes_moved=center_rms_norm_bytes,
    notes="x, residual [N, D] bf16, centre [D] (no grad), weight [D]; outputs (normed, hidden), both with a "
    "grad_output. torch = x + residual - center in bf16, then F.rms_norm.",
)


# ---------------------------------------------------------------------------------------------------------
# rope: q [B, T, H, Dh] and k rotated by position, as strided views of one packed qkv projection.
# ---------------------------------------------------------------------------------------------------------


def rope_bytes(dims: dict, elt: int, direction: str) -> int:
    """fwd: read q, k; write q_out, k_out (4*B*T*H*Dh*e); read the cos and sin tables (float32 [T, Dh/2] each).
    bwd: the same with gradients (read dq_out, dk_out; write dq, dk; read the tables). e = bytes per element."""
    B, T, H, Dh = dims["B"], dims["T"], dims["H"], dims["Dh"]
    qk = 2 * B * T * H * Dh  # q and k elements (as many heads for k as for q here)
    tables = 2 * T * (Dh // 2) * 4
    one_pass = 2 * qk * elt + tables
    return one_pass if direction == "fwd" else 2 * one_pass


def _rope_inputs(dims, dtype, device, gen, requires_grad) -> Inputs:
    B, T, H, Dh = dims["B"], dims["T"], dims["H"], dims["Dh"]
    qkv = _randn((B, T, 3, H, Dh), dtype, device, gen)  # the model's packed projection, viewed per head
    cos, sin = ops.rope_cache(T, Dh, device=device)
    tensors = {
        "q": _leaf(qkv[:, :, 0], requires_grad),
        "k": _leaf(qkv[:, :, 1], requires_grad),
        "cos": cos,
        "sin": sin,
    }
    return Inputs(tensors, ("q", "k"))


def _rope_build(variant: str, dims: dict) -> Callable:
    def eager(q, k, cos, sin):
        return reference.rope(q, k, cos, sin)

    if variant == "fastcenter":
        return lambda q, k, cos, sin: ops.rope(q, k, cos, sin)
    if variant == "eager":
        return eager
    if variant == "compile":
        return compiled(eager)
    raise KeyError(variant)


ROPE = OpSpec(
    name="rope",
    shapes={"seed": {"B": 16, "T": 512, "H": 4, "Dh": 64}, "large": {"B": 8, "T": 4096, "H": 32, "Dh": 128}},
    variants=("fastcenter", "eager", "compile"),
    bound="memory",
    make_inputs=_rope_inputs,
    build=_rope_build,
    bytes_moved=rope_bytes,
    notes="q, k: [B, T, H, Dh] bf16 strided views of a packed [B, T, 3, H, Dh] projection; half-split pairs; "
    "cos/sin float32 [T, Dh/2].",
)


# ---------------------------------------------------------------------------------------------------------
# swiglu: silu(gate) * up from the packed [N, 2H] projection.
# ---------------------------------------------------------------------------------------------------------


def swiglu_bytes(dims: dict, elt: int, direction: str) -> int:
    """fwd: read the packed [N, 2H] input, write [N, H] (3*N*H*e).
    bwd: read the packed input and the [N, H] grad_output, write the packed [N, 2H] gradient (5*N*H*e).
    e = bytes per element."""
    N, H = dims["N"], dims["H"]
    fwd = 3 * N * H * elt
    bwd = 5 * N * H * elt
    return fwd if direction == "fwd" else fwd + bwd


def _swiglu_inputs(dims, dtype, device, gen, requires_grad) -> Inputs:
    N, H = dims["N"], dims["H"]
    packed = _randn((N, 2 * H), dtype, device, gen)
    return Inputs({"packed": _leaf(packed, requires_grad)}, ("packed",))


def _swiglu_build(variant: str, dims: dict) -> Callable:
    def eager(packed):
        return (reference.swiglu(packed),)

    if variant == "fastcenter":
        return lambda packed: (ops.swiglu(packed),)
    if variant == "eager":
        return eager
    if variant == "torch":

        def native(packed):
            gate, up = packed.chunk(2, dim=-1)
            return (F.silu(gate) * up,)

        return native
    if variant == "compile":
        return compiled(eager)
    raise KeyError(variant)


SWIGLU = OpSpec(
    name="swiglu",
    shapes={"seed": {"N": 8192, "H": 1024}, "large": {"N": 65536, "H": 4096}},
    variants=("fastcenter", "eager", "torch", "compile"),
    bound="memory",
    make_inputs=_swiglu_inputs,
    build=_swiglu_build,
    bytes_moved=swiglu_bytes,
    notes="packed [N, 2H] bf16 -> [N, H]. eager = fastcenter.reference (float32 math); torch = F.silu(gate) * up "
    "in bf16.",
)


# ---------------------------------------------------------------------------------------------------------
# cross_entropy on given logits [N, V].
# ---------------------------------------------------------------------------------------------------------


def cross_entropy_bytes(dims: dict, elt: int, direction: str) -> int:
    """fwd: read logits (N*V*e) and int64 targets (8*N), write the float32 loss (4 bytes).
    bwd: read logits, targets and the loss's grad_output (4), write grad logits (N*V*e). e = bytes per element."""
    N, V = dims["N"], dims["V"]
    fwd = N * V * elt + 8 * N + 4
    bwd = 2 * N * V * elt + 8 * N + 4
    return fwd if direction == "fwd" else fwd + bwd


def _cross_entropy_inputs(dims, dtype, device, gen, requires_grad) -> Inputs:
    N, V = dims["N"], dims["V"]
    logits = _randn((N, V), dtype, device, gen, scale=2.0)
    target = torch.randint(0, V, (N,), generator=gen, device=device)
    return Inputs({"logits": _leaf(logits, requires_grad), "target": target}, ("logits",))


def _cross_entropy_build(variant: str, dims: dict) -> Callable:
    def eager(logits, target):  # what autocast does with F.cross_entropy: float32 math on upcast logits
        return (F.cross_entropy(logits.float(), target),)

    if variant == "fastcenter":
        return lambda logits, target: (ops.cross_entropy(logits, target),)
    if variant == "eager":
        return eager
    if variant == "torch":
        return lambda logits, target: (F.cross_entropy(logits, target),)
    if variant == "compile":
        return compiled(eager)
    raise KeyError(variant)


CROSS_ENTROPY = OpSpec(
    name="cross_entropy",
    shapes={"seed": {"N": 8192, "V": 50257}},
    variants=("fastcenter", "eager", "torch", "compile"),
    bound="memory",
    make_inputs=_cross_entropy_inputs,
    build=_cross_entropy_build,
    bytes_moved=cross_entropy_bytes,
    notes="logits [N, V] bf16, mean reduction. eager = F.cross_entropy(logits.float()) (autocast's way); "
    "torch = F.cross_entropy on the bf16 logits.",
)


# ---------------------------------------------------------------------------------------------------------
# linear_cross_entropy: cross_entropy(x @ W^T, target) without the full logits.
# ---------------------------------------------------------------------------------------------------------


def linear_cross_entropy_flops(dims: dict, direction: str) -> int:
    """2*N*D*V per GEMM: logits forward; grad input and grad weight backward (recomputing logits is extra)."""
    gemm = 2 * dims["N"] * dims["D"] * dims["V"]
    return gemm if direction == "fwd" else 3 * gemm


def linear_cross_entropy_bytes(dims: dict, elt: int, direction: str) -> int:
    """fwd: read x [N, D], W [V, D] and int64 targets, write the float32 loss: (N*D + V*D)*e + 8*N + 4 bytes.
    bwd: read x, W, targets and the loss's grad_output, write dx and dW (in the inputs' dtype)."""
    N, D, V = dims["N"], dims["D"], dims["V"]
    fwd = (N * D + V * D) * elt + 8 * N + 4
    bwd = 2 * (N * D + V * D) * elt + 8 * N + 4
    return fwd if direction == "fwd" else fwd + bwd


def _linear_cross_entropy_inputs(dims, dtype, device, gen, requires_grad) -> Inputs:
    N, D, V = dims["N"], dims["D"], dims["V"]
    x = _randn((N, D), dtype, device, gen)
    weight = _randn((V, D), dtype, device, gen, scale=0.02)
    target = torch.randint(0, V, (N,), generator=gen, device=device)
    tensors = {"x": _leaf(x, requires_grad), "weight": _leaf(weight, requires_grad), "target": target}
    return Inputs(tensors, ("x", "weight"))


def _torch_linear_cross_entropy(**option_fields) -> Callable:
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        raise Unavailable(
            f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy with chunking options"
        )
    options = torch.nn.LinearCrossEntropyOptions(**option_fields)
    return lambda x, weight, target: (F.linear_cross_entropy(x, weight, target, options=options),)


def _liger_linear_cross_entropy() -> Callable:
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # noqa: BLE001 -- ImportError, or a broken install: either way, not comparable
        raise Unavailable(f"Liger-Kernel is not importable here ({type(exc).__name__}: {exc})") from None
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda x, weight, target: (loss(weight, x, target),)  # Liger takes the weight first


def _linear_cross_entropy_build(variant: str, dims: dict) -> Callable:
    def eager(x, weight, target):  # bf16 GEMM, float32 loss: what autocast does with F.linear + F.cross_entropy
        return (F.cross_entropy(F.linear(x, weight).float(), target),)

    if variant == "fastcenter":
        return lambda x, weight, target: (ops.linear_cross_entropy(x, weight, target),)
    if variant == "eager":
        return eager
    if variant == "compile":
        return compiled(eager)
    if variant == "torch_lce_chunked":
        return _torch_linear_cross_entropy()
    if variant == "torch_lce_accurate":
        return _torch_linear_cross_entropy(acc_policy="accurate")
    if variant == "liger":
        return _liger_linear_cross_entropy()
    raise KeyError(variant)


LINEAR_CROSS_ENTROPY = OpSpec(
    name="linear_cross_entropy",
    shapes={"seed": {"N": 8192, "D": 256, "V": 50257}, "large": {"N": 8192, "D": 2048, "V": 50257}},
    variants=("fastcenter", "eager", "compile", "torch_lce_chunked", "torch_lce_accurate", "liger"),
    bound="compute",
    make_inputs=_linear_cross_entropy_inputs,
    build=_linear_cross_entropy_build,
    bytes_moved=linear_cross_entropy_bytes,
    flops=linear_cross_entropy_flops,
    notes="x [N, D] bf16, W [V, D] bf16, mean loss. eager = F.cross_entropy(F.linear(x, W).float()) (autocast's "
    "way); torch_lce_chunked = F.linear_cross_entropy(options=LinearCrossEntropyOptions()) (auto policy), "
    "torch_lce_accurate = the same with acc_policy='accurate'; liger = LigerFusedLinearCrossEntropyLoss.",
)


# Tiny, awkward dims for the dry run (FASTCENTER_BENCH_DRY_RUN=1): the harness, not the numbers.
DRY_RUN_DIMS = {
    "rms_norm": {"N": 5, "D": 24},
    "center_rms_norm": {"N": 5, "D": 24},
    "rope": {"B": 2, "T": 3, "H": 2, "Dh": 8},
    "swiglu": {"N": 5, "H": 12},
    "cross_entropy": {"N": 5, "V": 37},
    "linear_cross_entropy": {"N": 5, "D": 16, "V": 37},
}

OP_SPECS: dict[str, OpSpec] = {
    spec.name: spec for spec in (RMS_NORM, CENTER_RMS_NORM, ROPE, SWIGLU, CROSS_ENTROPY, LINEAR_CROSS_ENTROPY)
}


def all_op_cases() -> list[Case]:
    return [case for spec in OP_SPECS.values() for case in spec.cases()]


# ---------------------------------------------------------------------------------------------------------
# The training step (bench/test_train_step.py).
# ---------------------------------------------------------------------------------------------------------

TRAIN_BATCH, TRAIN_SEQ_LEN = 16, 512
TRAIN_VARIANTS = ("fused", "eager", "eager_compile", "fused_compile")


def train_cases() -> list[Case]:
    return [Case("train_step", "seed", "step", variant) for variant in TRAIN_VARIANTS]


# ---------------------------------------------------------------------------------------------------------
# Turning one case into a call (shared by every op; the GPU runner in test_ops.py drives it).
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PreparedCase:
    """What the runner times: `call()` runs one forward (fwd) or forward+backward (fwdbwd) and returns the
    outputs or the gradients."""

    case: Case
    spec: OpSpec
    inputs: Inputs
    call: Callable[[], tuple]


def _grad_outputs(outputs: tuple, seed: int) -> tuple:
    """A fixed random grad_output per output (seeded: identical across variants), scalars in [0.5, 1.5)."""
    gen = torch.Generator(device=outputs[0].device).manual_seed(seed)
    grads = []
    for out in outputs:
        if out.dim() == 0:
            g = torch.rand((), generator=gen, device=out.device) + 0.5
        else:
            g = torch.randn(out.shape, generator=gen, device=out.device)
        grads.append(g.to(out.dtype))
    return tuple(grads)


def prepare(case: Case, device="cuda", dims: dict | None = None) -> PreparedCase:
    """Inputs and the call for a case (at the spec's dims for its shape, or at `dims`: small ones for tests on
    the CPU). Raises Unavailable for a variant that cannot run here."""
    spec = OP_SPECS[case.op]
    dims = spec.shapes[case.shape] if dims is None else dims
    gen = torch.Generator(device=device).manual_seed(case_seed(case.op, case.shape))
    backward = case.direction == "fwdbwd"
    inputs = spec.make_inputs(dims, spec.dtype, device, gen, backward)
    forward = spec.build(case.variant, dims)
    tensors = inputs.tensors

    if not backward:

        def call():
            with torch.no_grad():
                return tuple(forward(**tensors))

    else:
        wrt = tuple(tensors[name] for name in inputs.differentiable)
        grad_outputs: list = []  # made from the first call's outputs, then reused: fixed across reps

        def call():
            outputs = tuple(forward(**tensors))
            if not grad_outputs:
                grad_outputs.extend(_grad_outputs(outputs, case_seed(case.op, case.shape) + 1))
            return torch.autograd.grad(outputs, wrt, grad_outputs)

    return PreparedCase(case, spec, inputs, call)


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


# A sanity bound, not a precision test (tests/ hold those): a fused result further than this from eager
# PyTorch at the benchmark shape means the benchmark would be timing a wrong kernel.
SANITY_REL_ERROR = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-3}


# ---------------------------------------------------------------------------------------------------------
# Records: what goes into pytest-benchmark's extra_info and from there into the report.
# ---------------------------------------------------------------------------------------------------------

RECORD_SCHEMA = "fastcenter-bench/1"


def base_record(case: Case, timing: dict, bound: str) -> dict:
    """What every benchmark record starts with: the schema, the case's identity, what bounds it, its timing."""
    return {
        "schema": RECORD_SCHEMA,
        "case": case.id,
        "op": case.op,
        "shape": case.shape,
        "direction": case.direction,
        "variant": case.variant,
        "bound": bound,
        **timing,
    }


def op_record(case: Case, timing: dict, peaks: dict | None, memory=None, dims=None, **extra) -> dict:
    """The flat, JSON-ready record of one op case: identity, timing, cost model, rates, memory.

    `dims` defaults to the spec's for the case's shape (the dry run passes its tiny ones)."""
    spec = OP_SPECS[case.op]
    dims = spec.shapes[case.shape] if dims is None else dims
    elt = torch.empty((), dtype=spec.dtype).element_size()
    seconds = timing["median_ms"] * 1e-3
    nbytes = spec.bytes_moved(dims, elt, case.direction)
    flops = spec.flops(dims, case.direction) if spec.flops else None
    record = {
        **base_record(case, timing, spec.bound),
        "dims": dict(dims),
        "dtype": str(spec.dtype).replace("torch.", ""),
        "bytes": nbytes,
        "gbps": nbytes / seconds / 1e9,
        "flops": flops,
        "tflops": None if flops is None else flops / seconds / 1e12,
    }
    record["pct_of_copy_bw"] = None
    record["pct_of_matmul"] = None
    if peaks:
        record["pct_of_copy_bw"] = 100.0 * record["gbps"] / peaks["copy_gbps"]
        if flops is not None:
            record["pct_of_matmul"] = 100.0 * record["tflops"] / peaks["matmul_tflops"]
    if memory is not None:
        record["mem_peak_bytes"] = memory.peak_bytes - memory.base_bytes  # new memory at the peak
        record["mem_extra_bytes"] = memory.extra_bytes
    record["dry_run"] = dry_run()
    record.update(extra)
    return record


def train_record(case: Case, timing: dict, *, tokens_per_step: int, flops_per_token: int | None, peaks, **extra):
    seconds = timing["median_ms"] * 1e-3
    tokens_per_s = tokens_per_step / seconds
    record = {
        **base_record(case, timing, "compute"),
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "tflops": None if flops_per_token is None else flops_per_token * tokens_per_s / 1e12,
    }
    record["pct_of_matmul"] = None
    if peaks and record["tflops"] is not None:
        record["pct_of_matmul"] = 100.0 * record["tflops"] / peaks["matmul_tflops"]
    record["dry_run"] = dry_run()
    record.update(extra)
    return record
