"""rms_norm and center_rms_norm: argument checks, dispatch, the custom ops around kernels/norm.py, and the CPU
implementation.

The math (forward and backward) is written once, in the docstring of `fastcenter.kernels.norm`. Both public
ops share one pair of custom ops: a forward (`fastcenter::norm_fwd`, returning what the backward needs) and a
backward (`fastcenter::norm_bwd`), each with a fake implementation for torch.compile, tied together by
`register_autograd`. The CPU implementation is two autograd Functions with the same analytic backward in eager
PyTorch; they save the input (or the `hidden` they return) and the weight.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ._dispatch import (
    FLOAT_DTYPES,
    TritonBackwardOp,
    TritonOp,
    as_output,
    as_rows,
    backend,
    check_eps,
    check_float_tensor,
    check_same_device,
    differentiable_backward,
    is_real,
    math_dtype,
)

# The Triton norm holds a whole row in registers; wider rows take the reference (documented in the README).
MAX_FUSED_NORM_DIM = 16384


def rms_norm(
    input: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    weight_offset: float = 0.0,
) -> Tensor:
    """Drop-in for `torch.nn.functional.rms_norm`. The Triton kernel normalises over the last dim only; other
    shapes take the CPU implementation on CPU tensors and the reference elsewhere.

    `out_dtype` (default: the input's dtype) is the output's dtype, written straight from the float32 math: e.g.
    bf16 under autocast for a norm that feeds a linear layer, which would otherwise cast it in a kernel of its own.
    weight_offset: the output is multiplied by (weight + weight_offset), formed in float32: 1.0 gives Gemma's
    RMSNorm, x * rsqrt(mean(x**2) + eps) * (1 + weight). It needs a weight.
    """
    check_float_tensor("input", input)
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
        check_float_tensor("weight", weight)
        if tuple(weight.shape) != normalized_shape:
            raise ValueError(f"weight must have shape {normalized_shape}, got {tuple(weight.shape)}")
    check_same_device(input=input, weight=weight)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    check_eps(eps)
    _check_out_dtype(out_dtype)
    weight_offset = _check_weight_offset(weight_offset, weight)
    implementation = backend(input, weight)
    fusable = len(normalized_shape) == 1 and normalized_shape[0] <= MAX_FUSED_NORM_DIM and input.numel() > 0
    if implementation == "triton" and fusable:
        return _triton_norm(input, weight, None, None, eps, out_dtype, weight_offset)[0]
    options = {"out_dtype": out_dtype, "weight_offset": weight_offset}
    if implementation == "cpu":
        return cpu_rms_norm(input, normalized_shape, weight, eps, **options)
    return reference.rms_norm(input, normalized_shape, weight, eps, **options)


def center_rms_norm(
    input: Tensor,
    weight: Tensor | None,
    *,
    center: Tensor | None = None,
    residual: Tensor | None = None,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    weight_offset: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Fused (residual add) + centering + RMSNorm over the last dim. Returns (normed, hidden).

    hidden = input (+ residual) (- center); normed = hidden * rsqrt(mean(hidden**2, -1) + eps) * (weight +
    weight_offset), weight_offset as in `rms_norm` (default 0).
    `center` broadcasts to `input`: a [D] vector or a per-token tensor. `hidden` is in input's dtype, `normed` in
    `out_dtype` (default: input's dtype; e.g. bf16 under autocast when it feeds a linear layer, with a float32
    residual stream); residual, center and weight may be any float dtype (read and computed in float32).
    """
    check_float_tensor("input", input)
    D = input.shape[-1]
    _check_norm_weight(weight, D)
    if residual is not None:
        check_float_tensor("residual", residual)
        if residual.shape != input.shape:
            raise ValueError(f"residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
    if center is not None:
        check_float_tensor("center", center)
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
    check_same_device(input=input, weight=weight, center=center, residual=residual)
    check_eps(eps)
    _check_out_dtype(out_dtype)
    weight_offset = _check_weight_offset(weight_offset, weight)
    implementation = backend(input, weight, center, residual)
    if implementation == "triton" and D <= MAX_FUSED_NORM_DIM and input.numel() > 0:
        return _triton_norm(input, weight, center, residual, eps, out_dtype, weight_offset)
    options = {
        "center": center,
        "residual": residual,
        "eps": eps,
        "out_dtype": out_dtype,
        "weight_offset": weight_offset,
    }
    if implementation == "cpu":
        return cpu_center_rms_norm(input, weight, **options)
    return reference.center_rms_norm(input, weight, **options)


def _check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {out_dtype!r}")


def _check_weight_offset(weight_offset, weight) -> float:
    if not is_real(weight_offset) or not math.isfinite(weight_offset):
        raise ValueError(f"weight_offset must be a finite float, got {weight_offset!r}")
    if weight_offset != 0 and weight is None:
        raise ValueError("weight_offset multiplies by (weight + weight_offset) and needs a weight, got weight=None")
    return float(weight_offset)


def _check_norm_weight(weight, width: int) -> None:
    if weight is None:
        return
    check_float_tensor("weight", weight)
    if tuple(weight.shape) != (width,):
        raise ValueError(f"weight must have shape ({width},) to match the last dim of input, got {tuple(weight.shape)}")


# ---------------------------------------------------------------------------------------------------------
# Triton: the custom ops around kernels/norm.py (called as _dispatch.TritonOp describes)
# ---------------------------------------------------------------------------------------------------------


def _norm_fwd_impl(
    x: Tensor,
    weight: Optional[Tensor],
    center: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
    out_dtype: Optional[torch.dtype],
    weight_offset: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """x, residual: [..., D] of one shape; center: a [D] vector or a tensor that broadcasts to x. Returns (normed in
    out_dtype or x's dtype, hidden, both contiguous in x's shape; rstd [rows]).

    `hidden` is empty when there is neither residual nor center (it would equal x). The rows are formed here, not
    by the caller: views made outside would each be an autograd node, twice the host cost of this call's own.
    """
    from ..kernels import norm

    D = x.shape[-1]
    if center is not None and center.dim() > 1:  # per token or broadcast: a stride-0 view where it can be
        center = center.expand(x.shape).reshape(-1, D)
    r2d = None if residual is None else as_rows(residual, D)
    normed, hidden, rstd = norm.norm_forward(as_rows(x, D), weight, center, r2d, eps, out_dtype, weight_offset)
    return normed.view(x.shape), hidden.view(x.shape) if hidden.numel() else hidden, rstd


def _norm_bwd_impl(
    grad_normed: Tensor,
    grad_hidden: Optional[Tensor],
    hidden: Tensor,
    weight: Optional[Tensor],
    rstd: Tensor,
    center_is_vector: bool,
    residual_grad_dtype: Optional[torch.dtype],
    weight_offset: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """grad_normed, grad_hidden, hidden: [..., D] of one shape. Returns (grad of hidden in total, grad of weight,
    float32 grad of a [D] centre = -column sums, and, when residual_grad_dtype is given, the residual's gradient:
    the same values in a tensor of its own, in that dtype), the first and the last in hidden's shape.

    Custom ops cannot return None: an absent weight, centre or residual gradient gives an empty tensor in its place.
    """
    from ..kernels import norm

    D, shape = hidden.shape[-1], hidden.shape
    grad_hidden = None if grad_hidden is None else as_rows(grad_hidden, D)
    grad_h, grad_weight, grad_center, grad_residual = norm.norm_backward(
        as_rows(grad_normed, D),
        grad_hidden,
        as_rows(hidden, D),
        weight,
        rstd,
        center_is_vector,
        residual_grad_dtype,
        weight_offset,
    )
    grad_residual = grad_residual if residual_grad_dtype is None else grad_residual.view(shape)
    return grad_h.view(shape), grad_weight, grad_center, grad_residual


_norm_bwd = TritonBackwardOp("fastcenter::norm_bwd", _norm_bwd_impl)


@_norm_bwd.register_fake
def _(grad_normed, grad_hidden, hidden, weight, rstd, center_is_vector, residual_grad_dtype, weight_offset):
    D = hidden.shape[-1]
    grad_weight = hidden.new_empty(0) if weight is None else torch.empty_like(weight)
    grad_center = hidden.new_empty(D if center_is_vector else 0, dtype=torch.float32)
    if residual_grad_dtype is None:
        grad_residual = hidden.new_empty(0)
    else:
        grad_residual = hidden.new_empty(hidden.shape, dtype=residual_grad_dtype)
    return hidden.new_empty(hidden.shape), grad_weight, grad_center, grad_residual


def _triton_setup_context(ctx, inputs, output):
    x, weight, center, residual, eps, out_dtype, weight_offset = inputs
    normed, hidden, rstd = output
    stored = hidden if hidden.numel() > 0 else x  # without residual/centre, hidden is x itself
    ctx.save_for_backward(stored, weight, rstd)
    ctx.eps, ctx.out_dtype, ctx.weight_offset = eps, out_dtype, weight_offset
    ctx.center_is_vector = center is not None and center.dim() == 1
    ctx.center_dtype = None if center is None else center.dtype
    ctx.center_shape = None if center is None else center.shape
    ctx.residual_dtype = None if residual is None else residual.dtype
    # Unused outputs (often `hidden`) then arrive as None instead of a tensor of zeros to add.
    ctx.set_materialize_grads(False)


def _triton_backward(ctx, grad_normed, grad_hidden, grad_rstd):
    hidden, weight, rstd = ctx.saved_tensors
    need_input, _, _, need_residual = ctx.needs_input_grad[:4]
    if grad_hidden is not None and grad_hidden.numel() == 0:
        grad_hidden = None
    # input and residual have the same gradient, but each gets a tensor of its own: autograd may keep a gradient
    # as a leaf's .grad (and add later micro-batches into it in place), so two inputs must never share storage.
    # The kernel writes the residual's copy in the same pass, in the residual's dtype.
    own_residual_grad = ctx.residual_dtype is not None and need_residual and need_input
    if torch.is_grad_enabled():  # create_graph=True: a backward that autograd can differentiate again
        # `hidden` is this op's own output where one was stored, so terms through it come back here as grad_hidden.
        grad_h, grad_weight = differentiable_backward(
            lambda h, w: reference.center_rms_norm(
                h, w, eps=ctx.eps, out_dtype=ctx.out_dtype, weight_offset=ctx.weight_offset
            ),
            [hidden, weight],
            [grad_normed, grad_hidden],
        )
        grad_center_vec = None if grad_h is None or not ctx.center_is_vector else -grad_h.sum(0, dtype=torch.float32)
        grad_residual = grad_h.clone() if own_residual_grad and grad_h is not None else grad_h
    else:
        if grad_normed is None:
            grad_normed = torch.zeros_like(hidden)
        residual_grad_dtype = ctx.residual_dtype if own_residual_grad else None
        grad_h, grad_weight, grad_center_vec, grad_residual = _norm_bwd(
            grad_normed, grad_hidden, hidden, weight, rstd, ctx.center_is_vector, residual_grad_dtype, ctx.weight_offset
        )
        if not own_residual_grad:
            grad_residual = grad_h
    grad_center = None
    if ctx.center_dtype is not None and grad_h is not None:
        grad_center = grad_center_vec if ctx.center_is_vector else (-grad_h).sum_to_size(ctx.center_shape)
        grad_center = grad_center.to(ctx.center_dtype)
    if ctx.residual_dtype is None:
        grad_residual = None
    if weight is None:
        grad_weight = None
    return grad_h, grad_weight, grad_center, grad_residual, None, None, None


_norm_fwd = TritonOp(
    "fastcenter::norm_fwd", _norm_fwd_impl, setup_context=_triton_setup_context, backward=_triton_backward
)


@_norm_fwd.register_fake
def _(x, weight, center, residual, eps, out_dtype, weight_offset):
    store_hidden = center is not None or residual is not None
    hidden = x.new_empty(x.shape) if store_hidden else x.new_empty(0)
    return x.new_empty(x.shape, dtype=out_dtype), hidden, x.new_empty(x.shape[:-1].numel(), dtype=torch.float32)


def _triton_norm(
    input: Tensor, weight, center, residual, eps: float, out_dtype, weight_offset: float
) -> tuple[Tensor, Tensor]:
    """Run the custom op. Returns (normed, hidden-or-input)."""
    D = input.shape[-1]
    if center is not None and center.dim() > 1 and center.shape[-1] == D and center.numel() == D:
        center = center.reshape(D)  # one [D] vector: the kernel reduces its gradient with the weight's
    normed, hidden, _ = _norm_fwd(input, weight, center, residual, float(eps), out_dtype, weight_offset)
    return normed, input if hidden.numel() == 0 else hidden


# ---------------------------------------------------------------------------------------------------------
# CPU: eager PyTorch with analytic backwards (math in float32, or float64 for float64 inputs)
# ---------------------------------------------------------------------------------------------------------


def cpu_rms_norm(
    input: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    weight_offset: float = 0.0,
) -> Tensor:
    """`torch.nn.functional.rms_norm` (see fastcenter.reference.rms_norm), over any trailing dims."""
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    weight = _offset_weight(weight, weight_offset, input)
    return _CPURMSNorm.apply(input, weight, dims, float(eps), out_dtype or input.dtype)


def cpu_center_rms_norm(
    input: Tensor,
    weight: Tensor | None,
    *,
    center: Tensor | None = None,
    residual: Tensor | None = None,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    weight_offset: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """(normed, hidden), hidden = input (+ residual) (- center) (see fastcenter.reference.center_rms_norm)."""
    out_dtype = out_dtype or input.dtype
    weight = _offset_weight(weight, weight_offset, input)
    if residual is None and center is None:  # hidden is the input itself: returned as it is (as the reference)
        return _CPURMSNorm.apply(input, weight, (-1,), float(eps), out_dtype), input
    return _CPUCenterRMSNorm.apply(input, weight, center, residual, float(eps), out_dtype)


def _offset_weight(weight: Tensor | None, weight_offset: float, input: Tensor) -> Tensor | None:
    """weight + weight_offset in the math dtype, through autograd (its gradient is the weight's): the CPU
    implementation's functions then see an ordinary weight."""
    if weight is None or weight_offset == 0:
        return weight
    return weight.to(math_dtype(input, weight)) + weight_offset


def _rstd(h: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    """rsqrt(mean(h**2) + eps) over `dims`, kept for broadcasting (a norm: one pass, no [N, D] temporary)."""
    count = math.prod([h.shape[d] for d in dims])  # (lists, not generators: torch.compile traces these)
    mean_square = torch.linalg.vector_norm(h, 2, dims, keepdim=True).square_().div_(max(count, 1))
    return mean_square.add_(eps).rsqrt_()


def _normalize(h: Tensor, weight: Tensor | None, dims: tuple[int, ...], eps: float) -> Tensor:
    """h * rsqrt(mean(h**2) + eps) * weight, in h's (math) dtype."""
    out = h * _rstd(h, dims, eps)
    if weight is not None:
        out.mul_(weight.to(h.dtype))
    return out


def _normalize_backward(grad_out: Tensor, h: Tensor, weight: Tensor | None, dims, eps: float):
    """(grad of h, grad of weight in the math dtype) for y = h * r * w, r = rsqrt(mean(h**2) + eps):

    dn = dy * w;  dh = r * (dn - h * r**2 * mean(dn * h));  dw = sum over rows of dy * h * r.
    """
    r = _rstd(h, dims, eps)
    dn = grad_out if weight is None else grad_out * weight.to(h.dtype)
    row_term = (dn * h).mean(dims, keepdim=True).mul_(r.square()).neg_()
    grad_h = torch.addcmul(dn, h, row_term).mul_(r)
    grad_weight = None if weight is None else (grad_out * (h * r)).sum_to_size(weight.shape)
    return grad_h, grad_weight


class _CPURMSNorm(torch.autograd.Function):
    """y = x * rsqrt(mean(x**2) + eps) * weight over the trailing `len(dims)` dims, in out_dtype; saves x and
    weight."""

    @staticmethod
    def forward(input, weight, dims, eps, out_dtype):
        dtype = math_dtype(input, weight)
        return as_output(_normalize(input.to(dtype), weight, dims, eps), out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, ctx.dims, ctx.eps, ctx.out_dtype = inputs
        ctx.save_for_backward(input, weight)

    @staticmethod
    def backward(ctx, grad_out):
        input, weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate again
            normalized_shape = input.shape[len(input.shape) - len(ctx.dims) :]
            grad_input, grad_weight = differentiable_backward(
                lambda x, w: reference.rms_norm(x, normalized_shape, w, ctx.eps, out_dtype=ctx.out_dtype),
                [input, weight],
                [grad_out],
            )
            return grad_input, grad_weight, None, None, None
        dtype = math_dtype(input, weight)
        grad_h, grad_weight = _normalize_backward(grad_out.to(dtype), input.to(dtype), weight, ctx.dims, ctx.eps)
        grad_weight = None if weight is None else grad_weight.to(weight.dtype)
        return grad_h.to(input.dtype), grad_weight, None, None, None


class _CPUCenterRMSNorm(torch.autograd.Function):
    """(normed, hidden) with hidden = input (+ residual) (- center); saves `hidden` (its own output) and weight.

    Used only when there is a residual or a centre: otherwise hidden is the input itself (see cpu_center_rms_norm).
    """

    @staticmethod
    def forward(input, weight, center, residual, eps, out_dtype):
        dtype = math_dtype(input, weight, center, residual)
        hidden = input.to(dtype)
        if residual is not None:
            hidden = hidden + residual.to(dtype)
        if center is not None:
            hidden = hidden - center.to(dtype)
        normed = _normalize(hidden, weight, (-1,), eps)
        return as_output(normed, out_dtype), as_output(hidden, input.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, center, residual, ctx.eps, ctx.out_dtype = inputs
        ctx.save_for_backward(output[1], weight)
        ctx.center_shape = None if center is None else center.shape
        ctx.dtypes = tuple([None if t is None else t.dtype for t in (input, center, residual)])
        ctx.set_materialize_grads(False)  # an unused output (often `hidden`) arrives as None, not zeros

    @staticmethod
    def backward(ctx, grad_normed, grad_hidden):
        hidden, weight = ctx.saved_tensors
        input_dtype, center_dtype, residual_dtype = ctx.dtypes
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference; terms through the saved
            # `hidden` (this op's own output) come back to this node as grad_hidden.
            grad_h, grad_weight = differentiable_backward(
                lambda h, w: reference.center_rms_norm(h, w, eps=ctx.eps, out_dtype=ctx.out_dtype),
                [hidden, weight],
                [grad_normed, grad_hidden],
            )
            if grad_h is None:
                grad_h = grad_hidden
        else:
            dtype = math_dtype(hidden, weight)
            grad_h, grad_weight = None, None
            if grad_normed is not None:
                h = hidden.to(dtype)
                grad_h, grad_weight = _normalize_backward(grad_normed.to(dtype), h, weight, (-1,), ctx.eps)
                grad_weight = None if weight is None else grad_weight.to(weight.dtype)
            if grad_hidden is not None:
                grad_h = grad_hidden.to(dtype) if grad_h is None else grad_h.add_(grad_hidden)
        if grad_h is None:  # neither output reached the loss
            return None, None, None, None, None, None
        grad_center = None if center_dtype is None else (-grad_h).sum_to_size(ctx.center_shape).to(center_dtype)
        grad_input = grad_h.to(input_dtype) if ctx.needs_input_grad[0] else None
        grad_residual = None if residual_dtype is None else grad_h.to(residual_dtype)
        if grad_residual is grad_input and grad_input is not None:
            # One gradient for two inputs: each gets a tensor of its own (see _triton_backward).
            grad_residual = grad_residual.clone()
        return grad_input, grad_weight, grad_center, grad_residual, None, None
