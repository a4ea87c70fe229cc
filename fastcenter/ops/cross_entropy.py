"""cross_entropy and linear_cross_entropy: argument checks, dispatch, and the custom ops around
kernels/cross_entropy.py, where the design, the math and the expected costs are written down.

cross_entropy takes given logits; the chunked linear_cross_entropy never forms the [N, V] logits in full.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ._dispatch import (
    as_rows,
    backend,
    check_float_tensor,
    check_same_device,
    checks_enabled,
    differentiable_backward,
    eager,
    is_int,
    is_real,
)

_REDUCTIONS = ("mean", "sum", "none")


def _check_cross_entropy_options(weight, reduction, ignore_index, label_smoothing, z_loss, softcap) -> None:
    if weight is not None:
        raise NotImplementedError(
            "class weights (`weight`) are not supported by fastcenter's cross-entropy; pass weight=None"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not is_int(ignore_index):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not (is_real(label_smoothing) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not (is_real(z_loss) and 0.0 <= z_loss < float("inf")):
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
    if softcap is not None and not (is_real(softcap) and 0.0 < softcap < float("inf")):
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
    if not checks_enabled():
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
    from ..kernels import cross_entropy as ce

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
    from ..kernels import cross_entropy as ce

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
    if torch.is_grad_enabled():  # create_graph=True: a backward that autograd can differentiate again
        (grad_logits,) = differentiable_backward(
            lambda z: reference.cross_entropy(z, target, **ctx.options), [logits], [grad_loss]
        )
    else:
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
    check_float_tensor("input", input)
    if input.dim() != 2 or input.shape[1] == 0:
        raise ValueError(f"input must be 2-D logits [N, V] with V >= 1, got shape {tuple(input.shape)}")
    _check_target(target, input.shape[:1], "one class id per row of input")
    _check_cross_entropy_options(weight, reduction, ignore_index, label_smoothing, z_loss, softcap)
    check_same_device(input=input, target=target)
    _check_target_values(target, input.shape[1], ignore_index)
    options = _options(reduction, ignore_index, label_smoothing, z_loss, softcap)
    implementation = backend(input, target)
    if implementation != "triton" or input.shape[0] == 0:
        return eager(implementation).cross_entropy(input, target, weight, **options)
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
    from ..kernels import cross_entropy as ce

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
    from ..kernels import cross_entropy as ce

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
    ctx.needs = dict(need_grad_input=need_grad_input, need_grad_weight=need_grad_weight, need_grad_bias=need_grad_bias)
    ctx.options = _options(reduction, ignore_index, label_smoothing, z_loss, softcap)
    ctx.chunk_size = chunk_size
    ctx.weight_dtype = linear_weight.dtype
    ctx.bias_dtype = None if linear_bias is None else linear_bias.dtype
    # The inputs are saved whatever the reduction (references, no copies): "none" recomputes its gradients from
    # them, and a backward under create_graph=True differentiates the reference on them. For "mean" and "sum"
    # the gradients finished in the forward are saved too: the ordinary backward only scales them.
    finished = (grad_input, grad_weight, grad_bias) if reduction != "none" else ()
    ctx.save_for_backward(input, linear_weight, linear_bias, target, lse, *finished)
    ctx.set_materialize_grads(False)


def _linear_cross_entropy_backward(ctx, grad_loss, grad_lse, grad_grad_input, grad_grad_weight, grad_grad_bias):
    no_grads = (None,) * 13
    if grad_loss is None:
        return no_grads
    input, linear_weight, linear_bias, target, lse, *finished = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: the gradients finished in the forward are constants to autograd, and scaling them
        # would silently drop every second-order term. Differentiate the reference instead.
        grad_input, grad_weight, grad_bias = differentiable_backward(
            lambda x, w, b: reference.linear_cross_entropy(x, w, target, linear_bias=b, **ctx.options),
            [input, linear_weight, linear_bias],
            [grad_loss],
        )
    elif not finished:  # reduction="none": per-token grad_output, recompute chunk by chunk from lse
        options = {k: v for k, v in ctx.options.items() if k != "reduction"}
        grad_input, grad_weight, grad_bias = _linear_cross_entropy_bwd(
            grad_loss, input, linear_weight, linear_bias, target, lse, chunk_size=ctx.chunk_size, **options,
            **ctx.needs,
        )  # fmt: skip
    else:
        grad_input, grad_weight, grad_bias = finished
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
    check_float_tensor("input", input)
    if input.dim() not in (2, 3):
        raise ValueError(f"input must be [N, D] or [B, T, D], got shape {tuple(input.shape)}")
    dim = input.shape[-1]
    check_float_tensor("linear_weight", linear_weight)
    if linear_weight.dim() != 2 or linear_weight.shape[1] != dim or linear_weight.shape[0] == 0:
        raise ValueError(
            f"linear_weight must have shape [V, {dim}] (V >= 1) to match input's last dim, "
            f"got {tuple(linear_weight.shape)}"
        )
    vocab = linear_weight.shape[0]
    if linear_bias is not None:
        check_float_tensor("linear_bias", linear_bias)
        if tuple(linear_bias.shape) != (vocab,):
            raise ValueError(f"linear_bias must have shape ({vocab},), got {tuple(linear_bias.shape)}")
    _check_target(target, input.shape[:-1], "input's leading dims")
    _check_cross_entropy_options(weight, reduction, ignore_index, label_smoothing, z_loss, softcap)
    if chunk_size is not None and (not is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    check_same_device(input=input, linear_weight=linear_weight, linear_bias=linear_bias, target=target)
    _check_target_values(target, vocab, ignore_index)
    options = _options(reduction, ignore_index, label_smoothing, z_loss, softcap)
    implementation = backend(input, linear_weight, linear_bias, target)
    if implementation != "triton" or input.numel() == 0:
        return eager(implementation).linear_cross_entropy(
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

    x2d = as_rows(input, dim)
    grad_on = torch.is_grad_enabled()
    loss = _linear_cross_entropy_fwd(
        x2d, linear_weight, linear_bias, target.reshape(-1).contiguous(), chunk_size=chunk_size,
        need_grad_input=grad_on and x2d.requires_grad,
        need_grad_weight=grad_on and linear_weight.requires_grad,
        need_grad_bias=grad_on and linear_bias is not None and linear_bias.requires_grad,
        **options,
    )[0]  # fmt: skip
    return loss.view(target.shape) if reduction == "none" else loss
