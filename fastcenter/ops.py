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


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # bool is an int subclass, never a valid size


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_eps(eps) -> None:
    if not _is_real(eps) or not eps >= 0:
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
# RoPE (kernels: fastcenter.kernels.rope). One custom op rotates q and k together; its backward is the
# same op rotating the output gradients by the negative angle (so it is differentiable again).
# ---------------------------------------------------------------------------------------------------------


def rope_cache(seq_len: int, head_dim: int, base: float = 10000.0, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin tables [seq_len, head_dim // 2] in float32 for `rope`."""
    if not _is_int(seq_len) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if not _is_int(head_dim) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    if not _is_real(base) or not base > 1:
        raise ValueError(f"base must be a float > 1, got {base!r}")
    return reference.rope_cache(seq_len, head_dim, float(base), device)


@torch.library.custom_op("fastcenter::rope_rotate", mutates_args=())
def _rope_rotate(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor]:
    """q [B, T, Hq, Dh], k [B, T, Hk, Dh] (any strides) rotated by cos/sin [>= T, Dh/2], or by the negative
    angle when `inverse`. Returns new contiguous tensors."""
    from .kernels import rope as rope_kernels

    return rope_kernels.rope_rotate(q, k, cos, sin, interleaved, inverse)


@_rope_rotate.register_fake
def _(q, k, cos, sin, interleaved, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_setup_context(ctx, inputs, output):
    _, _, cos, sin, interleaved, inverse = inputs
    ctx.save_for_backward(cos, sin)  # the tables only: a rotation needs nothing of q and k to be undone
    ctx.interleaved = interleaved
    ctx.inverse = inverse


def _rope_backward(ctx, grad_q_out, grad_k_out):
    cos, sin = ctx.saved_tensors
    grad_q, grad_k = _rope_rotate(grad_q_out, grad_k_out, cos, sin, ctx.interleaved, not ctx.inverse)
    return grad_q, grad_k, None, None, None, None


_rope_rotate.register_autograd(_rope_backward, setup_context=_rope_setup_context)


def _check_rope_args(q, k, cos, sin, interleaved) -> None:
    _check_float_tensor("q", q)
    _check_float_tensor("k", k)
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, T, H, Dh], got {tuple(t.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    B, T, _, head_dim = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, T, head_dim):
        raise ValueError(
            f"k must match q in batch, sequence length and head dim (k: [B, T, Hk, Dh]); "
            f"got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"the head dim (last dim of q and k) must be a positive even number, got {head_dim}")
    for name, table in (("cos", cos), ("sin", sin)):
        if not isinstance(table, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(table).__name__}")
        if table.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (from rope_cache), got {table.dtype}")
        if table.dim() != 2 or table.shape[0] < T or table.shape[1] != head_dim // 2:
            raise ValueError(
                f"{name} must have shape [T_cache >= {T}, {head_dim // 2}] (positions x head_dim / 2), "
                f"got {tuple(table.shape)}"
            )
        # The tables are constants here: rope does not differentiate with respect to them, so refuse rather
        # than silently give a learned table no gradient.
        if table.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad, but rope gives no gradient to cos/sin: pass {name}.detach()")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    _check_same_device(q=q, k=k, cos=cos, sin=sin)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q [B, T, Hq, Dh] and k [B, T, Hk, Dh] in one launch. Returns (q_out, k_out).

    q and k may be strided views (e.g. of a packed qkv projection) and need not have the same head count;
    they are read in place and never modified. cos, sin: float32 [T_cache >= T, Dh/2] from `rope_cache`; the
    first T rows are used (slice them, `cos[start:]`, to start at a later position). The default pairs
    (i, i + Dh/2) (GPT-NeoX / Llama-HF); `interleaved=True` pairs (2i, 2i + 1) (GPT-J). Outputs are new
    contiguous tensors in q's dtype. Gradients flow to q and k; cos and sin must not require grad.
    """
    _check_rope_args(q, k, cos, sin, interleaved)
    if q.numel() == 0 or k.numel() == 0 or backend(q, k, cos, sin) == "reference":
        return reference.rope(q, k, cos, sin, interleaved=interleaved)
    return _rope_rotate(q, k, cos, sin, interleaved, False)


# ---------------------------------------------------------------------------------------------------------
# SwiGLU (kernels: fastcenter.kernels.swiglu). The backward recomputes the sigmoid from the saved inputs;
# for the packed [..., 2H] form its gradient is one [N, 2H] tensor written by the kernel.
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastcenter::swiglu_fwd", mutates_args=())
def _swiglu_fwd(gate: Tensor, up: Optional[Tensor]) -> Tensor:
    """gate, up: [N, H] rows with unit column stride; with up None, gate is the packed [N, 2H]. Returns [N, H]."""
    from .kernels import swiglu as swiglu_kernels

    return swiglu_kernels.swiglu_forward(gate, up)


@_swiglu_fwd.register_fake
def _(gate, up):
    width = gate.shape[1] if up is not None else gate.shape[1] // 2
    return gate.new_empty(gate.shape[0], width)


@torch.library.custom_op("fastcenter::swiglu_bwd", mutates_args=())
def _swiglu_bwd(grad_out: Tensor, gate: Tensor, up: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(grad of gate, grad of up); for the packed form (grad of the [N, 2H] input, empty tensor)."""
    from .kernels import swiglu as swiglu_kernels

    return swiglu_kernels.swiglu_backward(grad_out, gate, up)


@_swiglu_bwd.register_fake
def _(grad_out, gate, up):
    if up is None:
        return gate.new_empty(gate.shape), gate.new_empty(0)
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup_context(ctx, inputs, output):
    gate, up = inputs
    ctx.save_for_backward(gate, up)  # the inputs only: the backward recomputes the sigmoid


def _swiglu_backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    grad_gate, grad_up = _swiglu_bwd(grad_out, gate, up)
    return grad_gate, (None if up is None else grad_up)


_swiglu_fwd.register_autograd(_swiglu_backward, setup_context=_swiglu_setup_context)


def swiglu(gate: Tensor, up: Tensor | None = None) -> Tensor:
    """silu(gate) * up; with up=None, `gate` is the packed [..., 2H] projection [gate | up].

    Any leading shape; strided rows are read in place (a last dim with non-unit stride costs one copy).
    gate and up must have the same shape and dtype. The output is [..., H] in that dtype.
    """
    _check_float_tensor("gate", gate)
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(
                f"with up=None, gate must be the packed [..., 2H] tensor [gate | up] with an even last dim, "
                f"got shape {tuple(gate.shape)}"
            )
        width = gate.shape[-1] // 2
    else:
        _check_float_tensor("up", up)
        if up.shape != gate.shape:
            raise ValueError(f"up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
        if up.dtype != gate.dtype:
            raise TypeError(f"up must have gate's dtype {gate.dtype}, got {up.dtype}")
        _check_same_device(gate=gate, up=up)
        width = gate.shape[-1]
    if gate.numel() == 0 or backend(gate, up) == "reference":
        return reference.swiglu(gate, up)
    if up is None:
        out = _swiglu_fwd(_rows(gate, 2 * width), None)
    else:
        out = _swiglu_fwd(_rows(gate, width), _rows(up, width))
    return out.view(*gate.shape[:-1], width)


# ---------------------------------------------------------------------------------------------------------
# Cross-entropy (kernels: fastcenter.kernels.cross_entropy, where the design and its costs are written down):
# softmax cross-entropy of given logits, and the chunked linear_cross_entropy whose [N, V] logits never exist.
# ---------------------------------------------------------------------------------------------------------

_REDUCTIONS = ("mean", "sum", "none")


def _check_cross_entropy_options(weight, reduction, ignore_index, label_smoothing, z_loss, softcap) -> None:
    if weight is not None:
        raise NotImplementedError(
            "class weights (`weight`) are not supported by fastcenter's cross-entropy; pass weight=None"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not _is_int(ignore_index):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not (_is_real(label_smoothing) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not (_is_real(z_loss) and 0.0 <= z_loss < float("inf")):
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
    if softcap is not None and not (_is_real(softcap) and 0.0 < softcap < float("inf")):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")


def _check_target(target, shape, what: str) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be an int64 tensor of class ids, got {target.dtype}")
    if tuple(target.shape) != tuple(shape):
        raise ValueError(f"target must have shape {tuple(shape)} ({what}), got {tuple(target.shape)}")


def _check_target_values(target: Tensor, vocab: int, ignore_index: int) -> None:
    """FASTCENTER_CHECKS=1 only: raise instead of returning NaN for an out-of-range class id (a host sync)."""
    if not _checks_enabled():
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        raise ValueError(
            f"target holds class id {int(target[bad][0])}, outside [0, {vocab}) and not ignore_index={ignore_index}"
        )


def _options(reduction, ignore_index, label_smoothing, z_loss, softcap) -> dict:
    return dict(
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
    )


@torch.library.custom_op("fastcenter::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(
    logits: Tensor,
    target: Tensor,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
) -> tuple[Tensor, Tensor]:
    """logits [N, V] (unit column stride), target [N] int64. Returns (float32 loss, float32 lse [N]).

    The forward only reads the logits (pass 1); the backward recomputes the gradient from them and lse.
    """
    from .kernels import cross_entropy as ce

    return ce.cross_entropy_forward(
        logits, target, reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap,
    )  # fmt: skip


@_cross_entropy_fwd.register_fake
def _(logits, target, reduction, ignore_index, label_smoothing, z_loss, softcap):
    n_rows = logits.shape[0]
    loss = logits.new_empty((n_rows,) if reduction == "none" else (), dtype=torch.float32)
    return loss, logits.new_empty(n_rows, dtype=torch.float32)


@torch.library.custom_op("fastcenter::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
) -> Tensor:
    """Gradient w.r.t. the logits (a new [N, V] tensor in their dtype), grad_loss folded in."""
    from .kernels import cross_entropy as ce

    return ce.cross_entropy_backward(
        grad_loss, logits, target, lse, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
    )  # fmt: skip


@_cross_entropy_bwd.register_fake
def _(grad_loss, logits, target, lse, reduction, ignore_index, label_smoothing, z_loss, softcap):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _cross_entropy_setup_context(ctx, inputs, output):
    logits, target, reduction, ignore_index, label_smoothing, z_loss, softcap = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.options = _options(reduction, ignore_index, label_smoothing, z_loss, softcap)
    ctx.set_materialize_grads(False)


def _cross_entropy_backward(ctx, grad_loss, grad_lse):
    if grad_loss is None:
        return (None,) * 7
    logits, target, lse = ctx.saved_tensors
    grad_logits = _cross_entropy_bwd(grad_loss, logits, target, lse, **ctx.options)
    return (grad_logits,) + (None,) * 6


_cross_entropy_fwd.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup_context)


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
    """Fused softmax cross-entropy of logits [N, V]; drop-in for `F.cross_entropy` (+ z_loss, softcap).

    The loss is float32 whatever the logits' dtype (as autocast computes F.cross_entropy); the gradient is
    in the logits' dtype. Class weights raise NotImplementedError.
    """
    _check_float_tensor("input", input)
    if input.dim() != 2 or input.shape[1] == 0:
        raise ValueError(f"input must be 2-D logits [N, V] with V >= 1, got shape {tuple(input.shape)}")
    _check_target(target, input.shape[:1], "one class id per row of input")
    _check_cross_entropy_options(weight, reduction, ignore_index, label_smoothing, z_loss, softcap)
    _check_same_device(input=input, target=target)
    _check_target_values(target, input.shape[1], ignore_index)
    options = _options(reduction, ignore_index, label_smoothing, z_loss, softcap)
    if input.shape[0] == 0 or backend(input) == "reference":
        return reference.cross_entropy(input, target, weight, **options)
    logits = input if input.stride(-1) == 1 else input.contiguous()
    return _cross_entropy_fwd(logits, target.contiguous(), **options)[0]


@torch.library.custom_op("fastcenter::linear_cross_entropy_fwd", mutates_args=())
def _linear_cross_entropy_fwd(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    chunk_size: Optional[int],
    need_grad_input: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """input [N, D] (unit column stride, the compute dtype), linear_weight [V, D] and linear_bias [V] in that
    dtype or float32, target [N] int64.

    Returns (float32 loss, float32 lse [N], grad_input, float32 grad_weight, float32 grad_bias): for "mean"
    and "sum" the gradients asked for are finished here (for grad_output = 1); otherwise they are empty.
    """
    from .kernels import cross_entropy as ce

    with torch.autocast(input.device.type, enabled=False):  # the op picks its GEMM dtypes itself
        return ce.linear_cross_entropy_forward(
            input, linear_weight, linear_bias, target, reduction=reduction, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, chunk_size=chunk_size,
            need_grad_input=need_grad_input, need_grad_weight=need_grad_weight, need_grad_bias=need_grad_bias,
        )  # fmt: skip


@_linear_cross_entropy_fwd.register_fake
def _(input, linear_weight, linear_bias, target, reduction, ignore_index, label_smoothing, z_loss, softcap,
      chunk_size, need_grad_input, need_grad_weight, need_grad_bias):  # fmt: skip
    (n_rows, dim), vocab = input.shape, linear_weight.shape[0]
    grads_now = reduction != "none"
    float32 = dict(dtype=torch.float32)
    loss = input.new_empty((n_rows,) if reduction == "none" else (), **float32)
    lse = input.new_empty(n_rows, **float32)
    grad_input = input.new_empty((n_rows, dim) if grads_now and need_grad_input else 0)
    grad_weight = input.new_empty((vocab, dim) if grads_now and need_grad_weight else 0, **float32)
    grad_bias = input.new_empty(vocab if grads_now and need_grad_bias else 0, **float32)
    return loss, lse, grad_input, grad_weight, grad_bias


@torch.library.custom_op("fastcenter::linear_cross_entropy_bwd", mutates_args=())
def _linear_cross_entropy_bwd(
    grad_loss: Tensor,
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    lse: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    chunk_size: Optional[int],
    need_grad_input: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for reduction="none" (grad_loss [N] per token): the logits are recomputed chunk by chunk.

    Returns (grad_input, grad_weight, grad_bias) in the dtypes of input, linear_weight, linear_bias; empty
    where not asked for.
    """
    from .kernels import cross_entropy as ce

    with torch.autocast(input.device.type, enabled=False):
        return ce.linear_cross_entropy_backward(
            grad_loss, input, linear_weight, linear_bias, target, lse, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, chunk_size=chunk_size,
            need_grad_input=need_grad_input, need_grad_weight=need_grad_weight, need_grad_bias=need_grad_bias,
        )  # fmt: skip


@_linear_cross_entropy_bwd.register_fake
def _(grad_loss, input, linear_weight, linear_bias, target, lse, ignore_index, label_smoothing, z_loss, softcap,
      chunk_size, need_grad_input, need_grad_weight, need_grad_bias):  # fmt: skip
    (n_rows, dim), vocab = input.shape, linear_weight.shape[0]
    bias_dtype = torch.float32 if linear_bias is None else linear_bias.dtype
    grad_input = input.new_empty((n_rows, dim) if need_grad_input else 0)
    grad_weight = input.new_empty((vocab, dim) if need_grad_weight else 0, dtype=linear_weight.dtype)
    grad_bias = input.new_empty(vocab if need_grad_bias else 0, dtype=bias_dtype)
    return grad_input, grad_weight, grad_bias


def _linear_cross_entropy_setup_context(ctx, inputs, output):
    (input, linear_weight, linear_bias, target, reduction, ignore_index, label_smoothing, z_loss, softcap,
     chunk_size, need_grad_input, need_grad_weight, need_grad_bias) = inputs  # fmt: skip
    _, lse, grad_input, grad_weight, grad_bias = output
    ctx.reduction = reduction
    ctx.needs = dict(need_grad_input=need_grad_input, need_grad_weight=need_grad_weight, need_grad_bias=need_grad_bias)
    ctx.weight_dtype = linear_weight.dtype
    ctx.bias_dtype = None if linear_bias is None else linear_bias.dtype
    if reduction == "none":  # per-token grad_output: recompute in the backward from lse
        ctx.save_for_backward(input, linear_weight, linear_bias, target, lse)
        ctx.options = dict(
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            chunk_size=chunk_size,
        )  # fmt: skip
    else:  # finished in the forward: the backward scales them by the scalar grad_output
        ctx.save_for_backward(grad_input, grad_weight, grad_bias)
    ctx.set_materialize_grads(False)


def _linear_cross_entropy_backward(ctx, grad_loss, grad_lse, grad_grad_input, grad_grad_weight, grad_grad_bias):
    no_grads = (None,) * 13
    if grad_loss is None:
        return no_grads
    if ctx.reduction == "none":
        input, linear_weight, linear_bias, target, lse = ctx.saved_tensors
        grad_input, grad_weight, grad_bias = _linear_cross_entropy_bwd(
            grad_loss, input, linear_weight, linear_bias, target, lse, **ctx.options, **ctx.needs
        )
    else:
        grad_input, grad_weight, grad_bias = ctx.saved_tensors
        # One rounding each: input-dtype x float32 0-dim stays in the input dtype; the float32 accumulators are
        # scaled, then cast once to the parameters' dtypes.
        grad_input = grad_input * grad_loss
        grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        if ctx.bias_dtype is not None:
            grad_bias = (grad_bias * grad_loss).to(ctx.bias_dtype)
    return (
        grad_input if ctx.needs["need_grad_input"] else None,
        grad_weight if ctx.needs["need_grad_weight"] else None,
        grad_bias if ctx.needs["need_grad_bias"] else None,
    ) + no_grads[3:]


_linear_cross_entropy_fwd.register_autograd(
    _linear_cross_entropy_backward, setup_context=_linear_cross_entropy_setup_context
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
    """cross_entropy(input @ linear_weight.T + linear_bias, target, ...) without the full [N, V] logits.

    input [N, D] or [B, T, D], target [N] or [B, T] (int64); "none" returns the loss in target's shape. At
    most chunk_size x V logits exist at a time (default: about 128 MiB of them). The GEMMs run in input's
    dtype -- under torch.autocast, in the autocast dtype, as F.linear would. linear_weight (and linear_bias)
    may be float32 master weights with a bf16/fp16 input: they are cast once inside the op and their
    gradients come back in float32 straight from the float32 accumulator. The loss is float32.
    """
    _check_float_tensor("input", input)
    if input.dim() not in (2, 3):
        raise ValueError(f"input must be [N, D] or [B, T, D], got shape {tuple(input.shape)}")
    dim = input.shape[-1]
    _check_float_tensor("linear_weight", linear_weight)
    if linear_weight.dim() != 2 or linear_weight.shape[1] != dim or linear_weight.shape[0] == 0:
        raise ValueError(
            f"linear_weight must have shape [V, {dim}] (V >= 1) to match input's last dim, "
            f"got {tuple(linear_weight.shape)}"
        )
    vocab = linear_weight.shape[0]
    if linear_bias is not None:
        _check_float_tensor("linear_bias", linear_bias)
        if tuple(linear_bias.shape) != (vocab,):
            raise ValueError(f"linear_bias must have shape ({vocab},), got {tuple(linear_bias.shape)}")
    _check_target(target, input.shape[:-1], "input's leading dims")
    _check_cross_entropy_options(weight, reduction, ignore_index, label_smoothing, z_loss, softcap)
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    _check_same_device(input=input, linear_weight=linear_weight, linear_bias=linear_bias, target=target)
    _check_target_values(target, vocab, ignore_index)
    options = _options(reduction, ignore_index, label_smoothing, z_loss, softcap)
    if input.numel() == 0 or backend(input, linear_weight, linear_bias) == "reference":
        return reference.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight, chunk_size=chunk_size, **options
        )

    if torch.is_autocast_enabled(input.device.type):  # behave like F.linear: GEMMs in the autocast dtype
        compute_dtype = torch.get_autocast_dtype(input.device.type)
        input = input.to(compute_dtype)
        if linear_weight.dtype not in (compute_dtype, torch.float32):
            linear_weight = linear_weight.to(compute_dtype)
        if linear_bias is not None and linear_bias.dtype not in (compute_dtype, torch.float32):
            linear_bias = linear_bias.to(compute_dtype)
    for name, param in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if param is not None and param.dtype not in (input.dtype, torch.float32):
            raise TypeError(f"{name} must be float32 or input's dtype {input.dtype}, got {param.dtype}")

    x2d = _rows(input, dim)
    grad_on = torch.is_grad_enabled()
    loss = _linear_cross_entropy_fwd(
        x2d, linear_weight, linear_bias, target.reshape(-1).contiguous(), chunk_size=chunk_size,
        need_grad_input=grad_on and x2d.requires_grad,
        need_grad_weight=grad_on and linear_weight.requires_grad,
        need_grad_bias=grad_on and linear_bias is not None and linear_bias.requires_grad,
        **options,
    )[0]  # fmt: skip
    return loss.view(target.shape) if reduction == "none" else loss
