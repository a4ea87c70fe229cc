"""fastcenter.ops: the public fused ops, drop-in for the eager PyTorch ops they replace.

Every public function here does three things, in this order:

1. validate its arguments, reading only tensor metadata (shapes, dtypes, devices), so no host sync;
2. ask `backend()` -- the one place that decides -- whether the Triton kernels or the reference run;
3. call either a `torch.library` custom op wrapping the kernels, or `fastcenter.reference`.

The registration pattern, followed by every op family: a forward custom op (`fastcenter::<op>_fwd`) that
launches the forward kernel and returns its outputs plus whatever the backward needs; a backward custom op
(`fastcenter::<op>_bwd`); a fake (meta) implementation of each so `torch.compile(fullgraph=True)` can trace
shapes without running anything; and `register_autograd` on the forward op, whose backward calls the
backward op. Kernel modules (`fastcenter.kernels.*`) are imported lazily, so `import fastcenter` works
where Triton is not installed.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import reference

__all__ = [
    "backend",
    "rms_norm",
    "center_rms_norm",
    "rope_cache",
    "rope",
    "swiglu",
    "cross_entropy",
    "linear_cross_entropy",
]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------------------------
# Dispatch: the one place that decides between the Triton kernels and the reference.
# ---------------------------------------------------------------------------------------------------------


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_HAVE_TRITON = _triton_importable()


def backend(*tensors: Tensor | None) -> str:
    """'triton' or 'reference' for an op on these tensors.

    Triton runs when the inputs are CUDA tensors, or anywhere under TRITON_INTERPRET=1 (the kernels then
    execute on the CPU, slowly: that is how the tests exercise them). FASTCENTER_BACKEND=reference forces the
    reference. Reading the environment here is cheap, and torch.compile specialises on it at trace time.
    """
    if os.environ.get("FASTCENTER_BACKEND", "auto").lower() == "reference" or not _HAVE_TRITON:
        return "reference"
    if any(t is not None and t.is_cuda for t in tensors):
        return "triton"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "triton"
    return "reference"


def _checks_enabled() -> bool:
    return os.environ.get("FASTCENTER_CHECKS", "0") == "1"


# ---------------------------------------------------------------------------------------------------------
# Argument checks (metadata only).
# ---------------------------------------------------------------------------------------------------------


def _check_float_tensor(name: str, t, *, min_dim: int = 1) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def _check_same_device(**tensors: Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")


def _check_eps(eps) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


def _rows(t: Tensor, width: int) -> Tensor:
    """A [rows, width] view of `t` with unit stride along the last dim (one explicit copy if needed)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, width)


# ---------------------------------------------------------------------------------------------------------
# Norms: rms_norm and center_rms_norm share one pair of custom ops.
# ---------------------------------------------------------------------------------------------------------

# The fused norm holds a whole row in registers; wider rows take the reference (documented in the README).
MAX_FUSED_NORM_DIM = 16384


@torch.library.custom_op("fastcenter::norm_fwd", mutates_args=())
def _norm_fwd(
    x: Tensor,
    weight: Optional[Tensor],
    center: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """x, residual: [N, D]; center: [D] or an [N, D] (possibly stride-0) view. Returns (normed, hidden, rstd).

    `hidden` is empty when there is neither residual nor center (it would equal x).
    """
    from .kernels import norm

    return norm.norm_forward(x, weight, center, residual, eps)


@_norm_fwd.register_fake
def _(x, weight, center, residual, eps):
    store_hidden = center is not None or residual is not None
    hidden = torch.empty_like(x) if store_hidden else x.new_empty(0)
    return torch.empty_like(x), hidden, x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("fastcenter::norm_bwd", mutates_args=())
def _norm_bwd(
    grad_normed: Tensor,
    grad_hidden: Optional[Tensor],
    hidden: Tensor,
    weight: Optional[Tensor],
    rstd: Tensor,
    center_is_vector: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad of hidden in total, grad of weight, float32 grad of a [D] centre = -column sums).

    Custom ops cannot return None: an absent weight or centre gives an empty tensor in its place.
    """
    from .kernels import norm

    return norm.norm_backward(grad_normed, grad_hidden, hidden, weight, rstd, center_is_vector)


@_norm_bwd.register_fake
def _(grad_normed, grad_hidden, hidden, weight, rstd, center_is_vector):
    D = hidden.shape[-1]
    grad_weight = hidden.new_empty(0) if weight is None else torch.empty_like(weight)
    grad_center = hidden.new_empty(D if center_is_vector else 0, dtype=torch.float32)
    return torch.empty_like(hidden), grad_weight, grad_center


def _norm_setup_context(ctx, inputs, output):
    x, weight, center, residual, eps = inputs
    normed, hidden, rstd = output
    stored = hidden if hidden.numel() > 0 else x  # without residual/centre, hidden is x itself
    ctx.save_for_backward(stored, weight, rstd)
    ctx.center_is_vector = center is not None and center.dim() == 1
    ctx.center_dtype = None if center is None else center.dtype
    ctx.has_residual = residual is not None
    # Unused outputs (often `hidden`) then arrive as None instead of a tensor of zeros to add.
    ctx.set_materialize_grads(False)


def _norm_backward(ctx, grad_normed, grad_hidden, grad_rstd):
    hidden, weight, rstd = ctx.saved_tensors
    if grad_normed is None:
        grad_normed = torch.zeros_like(hidden)
    if grad_hidden is not None and grad_hidden.numel() == 0:
        grad_hidden = None
    grad_h, grad_weight, grad_center_vec = _norm_bwd(
        grad_normed, grad_hidden, hidden, weight, rstd, ctx.center_is_vector
    )
    grad_center = None
    if ctx.center_dtype is not None:
        grad_center = grad_center_vec if ctx.center_is_vector else -grad_h
        grad_center = grad_center.to(ctx.center_dtype)
    grad_residual = grad_h if ctx.has_residual else None
    if weight is None:
        grad_weight = None
    return grad_h, grad_weight, grad_center, grad_residual, None


_norm_fwd.register_autograd(_norm_backward, setup_context=_norm_setup_context)


def _fused_norm(input: Tensor, weight, center, residual, eps: float) -> tuple[Tensor, Tensor]:
    """Reshape to rows, run the custom op, reshape back. Returns (normed, hidden-or-input)."""
    D = input.shape[-1]
    x2d = _rows(input, D)
    r2d = None if residual is None else _rows(residual, D)
    c = None
    if center is not None:
        if center.dim() >= 1 and center.shape[-1] == D and center.numel() == D:
            c = center.reshape(D)  # one [D] vector: the kernel reduces its gradient with the weight's
        else:  # a broadcast or per-token centre: a stride-0 view where it can be, one copy where not
            c = center.expand(input.shape).reshape(-1, D)
    normed, hidden, _ = _norm_fwd(x2d, weight, c, r2d, float(eps))
    normed = normed.view(input.shape)
    hidden = input if hidden.numel() == 0 else hidden.view(input.shape)
    return normed, hidden


def _check_norm_weight(weight, width: int) -> None:
    if weight is None:
        return
    _check_float_tensor("weight", weight)
    if tuple(weight.shape) != (width,):
        raise ValueError(f"weight must have shape ({width},) to match the last dim of input, got {tuple(weight.shape)}")


def rms_norm(input: Tensor, normalized_shape, weight: Tensor | None = None, eps: float | None = None) -> Tensor:
    """Drop-in for `torch.nn.functional.rms_norm`; fused when normalising over the last dim only."""
    _check_float_tensor("input", input)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if not isinstance(normalized_shape, (tuple, list, torch.Size)) or not all(
        isinstance(s, int) for s in normalized_shape
    ):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")
    normalized_shape = tuple(normalized_shape)
    if len(normalized_shape) == 0 or tuple(input.shape[-len(normalized_shape) :]) != normalized_shape:
        raise ValueError(
            f"normalized_shape {normalized_shape} must match the trailing dims of input {tuple(input.shape)}"
        )
    if weight is not None:
        _check_float_tensor("weight", weight)
        if tuple(weight.shape) != normalized_shape:
            raise ValueError(f"weight must have shape {normalized_shape}, got {tuple(weight.shape)}")
    _check_same_device(input=input, weight=weight)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    _check_eps(eps)
    fusable = len(normalized_shape) == 1 and normalized_shape[0] <= MAX_FUSED_NORM_DIM and input.numel() > 0
    if not fusable or backend(input, weight) == "reference":
        return reference.rms_norm(input, normalized_shape, weight, eps)
    return _fused_norm(input, weight, None, None, eps)[0]


def center_rms_norm(
    input: Tensor,
    weight: Tensor | None,
    *,
    center: Tensor | None = None,
    residual: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Fused (residual add) + centering + RMSNorm over the last dim. Returns (normed, hidden).

    hidden = input (+ residual) (- center); normed = hidden * rsqrt(mean(hidden**2, -1) + eps) * weight.
    `center` broadcasts to `input`: a [D] vector or a per-token tensor. Outputs are in input's dtype; residual,
    center and weight may be any float dtype (read and computed in float32).
    """
    _check_float_tensor("input", input)
    D = input.shape[-1]
    _check_norm_weight(weight, D)
    if residual is not None:
        _check_float_tensor("residual", residual)
        if residual.shape != input.shape:
            raise ValueError(f"residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
    if center is not None:
        _check_float_tensor("center", center)
        try:
            torch.broadcast_shapes(center.shape, input.shape)
        except RuntimeError:
            raise ValueError(
                f"center must broadcast to input's shape {tuple(input.shape)}, got {tuple(center.shape)}"
            ) from None
        if center.dim() > input.dim() or torch.broadcast_shapes(center.shape, input.shape) != input.shape:
            raise ValueError(
                f"center must broadcast to input's shape {tuple(input.shape)} without enlarging it, "
                f"got {tuple(center.shape)}"
            )
    _check_same_device(input=input, weight=weight, center=center, residual=residual)
    _check_eps(eps)
    if D > MAX_FUSED_NORM_DIM or input.numel() == 0 or backend(input, weight, center, residual) == "reference":
        return reference.center_rms_norm(input, weight, center=center, residual=residual, eps=eps)
    return _fused_norm(input, weight, center, residual, eps)


# ---------------------------------------------------------------------------------------------------------
# RoPE (kernels: fastcenter.kernels.rope). Until the kernels land, the reference runs.
# ---------------------------------------------------------------------------------------------------------


def rope_cache(seq_len: int, head_dim: int, base: float = 10000.0, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin tables [seq_len, head_dim // 2] in float32 for `rope`."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    if not isinstance(base, (int, float)) or isinstance(base, bool) or not base > 1:
        raise ValueError(f"base must be a float > 1, got {base!r}")
    return reference.rope_cache(seq_len, head_dim, float(base), device)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q [B, T, Hq, Dh] and k [B, T, Hk, Dh] (strided views welcome) in one launch."""
    return reference.rope(q, k, cos, sin, interleaved=interleaved)


# ---------------------------------------------------------------------------------------------------------
# SwiGLU (kernels: fastcenter.kernels.swiglu). Until the kernels land, the reference runs.
# ---------------------------------------------------------------------------------------------------------


def swiglu(gate: Tensor, up: Tensor | None = None) -> Tensor:
    """silu(gate) * up; with up=None, `gate` is the packed [..., 2H] projection [gate | up]."""
    return reference.swiglu(gate, up)


# ---------------------------------------------------------------------------------------------------------
# Cross-entropy (kernels: fastcenter.kernels.cross_entropy). Until the kernels land, the reference runs.
# ---------------------------------------------------------------------------------------------------------


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> Tensor:
    """Fused softmax cross-entropy of logits [N, V]; drop-in for `F.cross_entropy` (+ z_loss, softcap)."""
    return reference.cross_entropy(
        input,
        target,
        weight,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """cross_entropy(input @ linear_weight.T + linear_bias, target, ...) without the full [N, V] logits."""
    return reference.linear_cross_entropy(
        input,
        linear_weight,
        target,
        linear_bias=linear_bias,
        weight=weight,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        chunk_size=chunk_size,
    )
