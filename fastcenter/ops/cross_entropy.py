"""cross_entropy and linear_cross_entropy: argument checks, dispatch, the custom ops around
kernels/cross_entropy.py (where the design, the math and the expected costs are written down), and the CPU
implementation.

cross_entropy takes given logits; the chunked linear_cross_entropy never forms the [N, V] logits in full.

The CPU implementation computes the same functions differently:

- **linear_cross_entropy** never forms the [N, V] logits either. Rows go in chunks of C (a [C, V] float32 buffer
  of about `CPU_CHUNK_BYTES`, allocated once per call and reused); per chunk, with "mean"/"sum":

      z   = x_c @ W.T (+ b)                        torch.mm(out=buffer)
      z  <- softcap * tanh(z / softcap)            (optional; tanh kept for the derivative)
      lse, loss_c                                  max, exp in place, sum
      z  <- dloss/dz                               in place: softmax * coef - onehot - smoothing (x cap')
      dx_c = z @ W;  dW += z.T @ x_c;  db += sum(z)

  so the gradients are finished in the forward (3 GEMMs, as the full-logits path has) and the backward only
  scales them by the scalar grad_output. The eager `F.linear` + `F.cross_entropy` instead allocates several
  fresh [N, V] tensors per step (logits, log-softmax, the gradients of both), which the kernel must map and zero
  page by page, and runs the log-softmax kernels over them (`python -m bench.compare_plain` compares the whole training
  step). reduction="none" has a per-token grad_output, unknown in the forward: the forward keeps lse only and the
  backward recomputes each chunk's logits (4 GEMMs).
- **cross_entropy** (given logits) saves the logits and lse, and its backward recomputes the softmax chunk by
  chunk into the gradient.

Both do their math in float32 (float64 for float64 inputs), also under torch.autocast (the bf16/fp16 GEMMs autocast
would pick are slower than float32 on most CPUs), with no host synchronisation (the chunk loops depend on shapes
only); a backward under create_graph=True differentiates the reference instead, as the Triton ops do.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ._dispatch import (
    TritonBackwardOp,
    TritonOp,
    as_rows,
    backend,
    check_float_tensor,
    check_same_device,
    checks_enabled,
    differentiable_backward,
    is_int,
    is_real,
    math_dtype,
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
    """Softmax cross-entropy of logits [N, V]; drop-in for `F.cross_entropy` (+ z_loss, softcap).

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
    if implementation == "triton" and input.shape[0] > 0:
        logits = input if input.stride(-1) == 1 else input.contiguous()
        return _cross_entropy_fwd(logits, target.contiguous(), **options)[0]
    if implementation == "cpu":
        return cpu_cross_entropy(input, target, **options)
    return reference.cross_entropy(input, target, **options)


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
    most chunk_size x V logits exist at a time (default: about 128 MiB of them on the Triton kernels, 256 MiB
    in the CPU implementation). On the Triton kernels the GEMMs run in input's dtype -- under torch.autocast, in
    the autocast dtype, as F.linear would; the CPU implementation computes in float32. linear_weight (and
    linear_bias) may be float32 master weights with a bf16/fp16 input: they are cast once inside the op and their
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
    if implementation == "triton" and input.numel() > 0:
        return _triton_linear_cross_entropy(input, linear_weight, target, linear_bias, chunk_size, options)
    if implementation == "cpu":
        return cpu_linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, chunk_size=chunk_size, **options
        )
    return reference.linear_cross_entropy(
        input, linear_weight, target, linear_bias=linear_bias, chunk_size=chunk_size, **options
    )


# ---------------------------------------------------------------------------------------------------------
# Triton: the custom ops around kernels/cross_entropy.py
# ---------------------------------------------------------------------------------------------------------


def _cross_entropy_fwd_impl(
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
        logits,
        target,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )


def _cross_entropy_bwd_impl(
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
        grad_loss,
        logits,
        target,
        lse,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )


_cross_entropy_bwd = TritonBackwardOp("fastcenter::cross_entropy_bwd", _cross_entropy_bwd_impl)


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


_cross_entropy_fwd = TritonOp(
    "fastcenter::cross_entropy_fwd",
    _cross_entropy_fwd_impl,
    setup_context=_cross_entropy_setup_context,
    backward=_cross_entropy_backward,
)


@_cross_entropy_fwd.register_fake
def _(logits, target, reduction, ignore_index, label_smoothing, z_loss, softcap):
    n_rows = logits.shape[0]
    loss = logits.new_empty((n_rows,) if reduction == "none" else (), dtype=torch.float32)
    return loss, logits.new_empty(n_rows, dtype=torch.float32)


def _linear_cross_entropy_fwd_impl(
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
            input,
            linear_weight,
            linear_bias,
            target,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            chunk_size=chunk_size,
            need_grad_input=need_grad_input,
            need_grad_weight=need_grad_weight,
            need_grad_bias=need_grad_bias,
        )


def _linear_cross_entropy_bwd_impl(
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
            grad_loss,
            input,
            linear_weight,
            linear_bias,
            target,
            lse,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            chunk_size=chunk_size,
            need_grad_input=need_grad_input,
            need_grad_weight=need_grad_weight,
            need_grad_bias=need_grad_bias,
        )


_linear_cross_entropy_bwd = TritonBackwardOp("fastcenter::linear_cross_entropy_bwd", _linear_cross_entropy_bwd_impl)


@_linear_cross_entropy_bwd.register_fake
def _(
    grad_loss,
    input,
    linear_weight,
    linear_bias,
    target,
    lse,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    chunk_size,
    need_grad_input,
    need_grad_weight,
    need_grad_bias,
):
    (n_rows, dim), vocab = input.shape, linear_weight.shape[0]
    bias_dtype = torch.float32 if linear_bias is None else linear_bias.dtype
    grad_input = input.new_empty((n_rows, dim) if need_grad_input else 0)
    grad_weight = input.new_empty((vocab, dim) if need_grad_weight else 0, dtype=linear_weight.dtype)
    grad_bias = input.new_empty(vocab if need_grad_bias else 0, dtype=bias_dtype)
    return grad_input, grad_weight, grad_bias


def _linear_cross_entropy_setup_context(ctx, inputs, output):
    (
        input,
        linear_weight,
        linear_bias,
        target,
        reduction,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        chunk_size,
        need_grad_input,
        need_grad_weight,
        need_grad_bias,
    ) = inputs
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
            grad_loss, input, linear_weight, linear_bias, target, lse, chunk_size=ctx.chunk_size, **options, **ctx.needs
        )
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


_linear_cross_entropy_fwd = TritonOp(
    "fastcenter::linear_cross_entropy_fwd",
    _linear_cross_entropy_fwd_impl,
    setup_context=_linear_cross_entropy_setup_context,
    backward=_linear_cross_entropy_backward,
)


@_linear_cross_entropy_fwd.register_fake
def _(
    input,
    linear_weight,
    linear_bias,
    target,
    reduction,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    chunk_size,
    need_grad_input,
    need_grad_weight,
    need_grad_bias,
):
    (n_rows, dim), vocab = input.shape, linear_weight.shape[0]
    grads_now = reduction != "none"
    float32 = dict(dtype=torch.float32)
    loss = input.new_empty((n_rows,) if reduction == "none" else (), **float32)
    lse = input.new_empty(n_rows, **float32)
    grad_input = input.new_empty((n_rows, dim) if grads_now and need_grad_input else 0)
    grad_weight = input.new_empty((vocab, dim) if grads_now and need_grad_weight else 0, **float32)
    grad_bias = input.new_empty(vocab if grads_now and need_grad_bias else 0, **float32)
    return loss, lse, grad_input, grad_weight, grad_bias


def _triton_linear_cross_entropy(input, linear_weight, target, linear_bias, chunk_size, options) -> Tensor:
    """The custom op on rows of `input`, its GEMMs in input's dtype or autocast's, as F.linear's would be."""
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

    x2d = as_rows(input, input.shape[-1])
    grad_on = torch.is_grad_enabled()
    loss = _linear_cross_entropy_fwd(
        x2d,
        linear_weight,
        linear_bias,
        target.reshape(-1).contiguous(),
        chunk_size=chunk_size,
        need_grad_input=grad_on and x2d.requires_grad,
        need_grad_weight=grad_on and linear_weight.requires_grad,
        need_grad_bias=grad_on and linear_bias is not None and linear_bias.requires_grad,
        **options,
    )[0]
    return loss.view(target.shape) if options["reduction"] == "none" else loss


# ---------------------------------------------------------------------------------------------------------
# CPU: eager PyTorch in chunks, the gradients formed in the forward
# ---------------------------------------------------------------------------------------------------------

# The [C, V] float32 chunk of logits. Each chunk re-reads W twice and the float32 dW accumulator once (read and
# written: 200 MB at the default shape, V = 50257 and D = 256), so chunks should be large; each row of the chunk
# costs V x 4 bytes, and 256 MiB is C = 1335 rows at V = 50257 (7 even chunks of 1171 rows for 8192 tokens).
CPU_CHUNK_BYTES = 256 * 2**20


def cpu_cross_entropy(
    input: Tensor,
    target: Tensor,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> Tensor:
    """Softmax cross-entropy of logits [N, V] (see fastcenter.reference.cross_entropy). The loss is float32."""
    o = _Options(reduction, ignore_index, float(label_smoothing), float(z_loss), softcap)
    return _CPUCrossEntropy.apply(input, target, o)[0]


def cpu_linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """cross_entropy(input @ linear_weight.T + linear_bias, target, ...) with at most chunk_size x V logits at a
    time (default: about CPU_CHUNK_BYTES of them). input [N, D] or [B, T, D], target [N] or [B, T]; "none" returns
    the loss in target's shape. The loss is float32."""
    o = _Options(reduction, ignore_index, float(label_smoothing), float(z_loss), softcap)
    x = input.reshape(target.numel(), input.shape[-1])  # (not -1: a [N, 0] input has no -1 to infer)
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and input.requires_grad,
        grad_on and linear_weight.requires_grad,
        grad_on and linear_bias is not None and linear_bias.requires_grad,
    )
    rows = _rows_per_chunk(linear_weight.shape[0], x.shape[0], chunk_size)
    loss = _CPULinearCrossEntropy.apply(x, linear_weight, linear_bias, target.reshape(-1), o, rows, needs)[0]
    return loss.view(target.shape) if reduction == "none" else loss


@dataclasses.dataclass(frozen=True)
class _Options:
    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None


@dataclasses.dataclass
class _Targets:
    """Per-row bookkeeping of the targets, all on the device (no sync): which rows count, and how much."""

    safe: Tensor  # the target where it is in [0, V), else 0: an index that is always valid for gather/scatter
    in_range: Tensor  # bool [N]
    valid: Tensor  # bool [N]: not ignore_index (an out-of-range target is valid: its loss is NaN)
    # [N]: d(total loss)/d(row loss) for grad_output = 1: 1 or 1/n_valid on counted rows, 0 on ignored ones, and
    # NaN on a row whose target is out of range (its gradient row is NaN, as its loss is: never a finite wrong number)
    weight: Tensor

    @classmethod
    def of(cls, target: Tensor, vocab: int, o: _Options, dtype: torch.dtype) -> "_Targets":
        in_range = (target >= 0) & (target < vocab)
        valid = target != o.ignore_index
        weight = torch.where(in_range, 1.0, math.nan).to(dtype).masked_fill_(~valid, 0.0)
        if o.reduction == "mean":
            weight = weight / valid.sum().clamp(min=1).to(dtype)
        return cls(torch.where(in_range, target, 0), in_range, valid, weight)

    def reduce(self, loss: Tensor, o: _Options) -> Tensor:
        """Per-row losses -> the loss asked for: NaN for an out-of-range target, 0 for an ignored one."""
        loss = torch.where(self.in_range, loss, torch.full_like(loss, math.nan))
        loss = torch.where(self.valid, loss, torch.zeros_like(loss))
        if o.reduction == "none":
            return loss
        if o.reduction == "sum":
            return loss.sum()
        return loss.sum() / self.valid.sum().clamp(min=1)


def _cap_(z: Tensor, tanh_buffer: Tensor | None, softcap: float | None) -> Tensor | None:
    """z <- softcap * tanh(z / softcap) in place; returns tanh(z / softcap) (kept for the derivative), or None."""
    if softcap is None:
        return None
    t = torch.div(z, softcap, out=tanh_buffer).tanh_()
    torch.mul(t, softcap, out=z)
    return t


def _loss_rows_(z: Tensor, target: Tensor, o: _Options) -> tuple[Tensor, Tensor, Tensor]:
    """Row losses of one chunk of (capped) logits z [C, V], consuming z: on return z holds exp(z - max(z)).

    Returns (loss [C], lse [C], sum of exp(z - max) [C, 1]); loss is computed for every row, ignored or not."""
    z_target = z.gather(1, target[:, None]).squeeze(1)
    z_mean = z.mean(1) if o.label_smoothing > 0 else None
    row_max = z.amax(1, keepdim=True)
    sum_exp = z.sub_(row_max).exp_().sum(1, keepdim=True)
    lse = (row_max + sum_exp.log()).squeeze(1)
    loss = lse - z_target
    if z_mean is not None:
        loss = (1 - o.label_smoothing) * loss + o.label_smoothing * (lse - z_mean)
    if o.z_loss > 0:
        loss = loss + o.z_loss * lse.square()
    return loss, lse, sum_exp


def _to_grad_(
    e: Tensor, norm: Tensor | None, lse: Tensor, t: Tensor | None, target: Tensor, row_grad: Tensor, o: _Options
) -> Tensor:
    """Turn e = exp(z - a) [C, V] in place into d(sum_r row_grad[r] * loss[r]) / d(logits before the cap).

    `norm` = exp(a - lse) as [C, 1] (None when a = lse already), so e * norm is the softmax p. With smoothing ls
    and z-loss zl: dz = row_grad * (p * (1 + 2 zl lse) - (1 - ls) * onehot(target) - ls / V); times
    1 - tanh**2 through the cap (t is consumed)."""
    g = row_grad[:, None]
    coef = g if norm is None else g * norm
    if o.z_loss > 0:
        coef = coef * (1 + 2 * o.z_loss * lse[:, None])
    e.mul_(coef)
    e.scatter_add_(1, target[:, None], g * -(1 - o.label_smoothing))
    if o.label_smoothing > 0:
        e.sub_(g * (o.label_smoothing / e.shape[1]))
    if t is not None:
        e.mul_(t.square_().neg_().add_(1))
    return e


def _rows_per_chunk(vocab: int, n_rows: int, chunk_size: int | None) -> int:
    """Rows per chunk: at most chunk_size (default: CPU_CHUNK_BYTES of float32 logits), and as even as the chunks
    can be (8192 rows at 1335 per chunk: 7 chunks of 1171, not 6 of 1335 and one of 182)."""
    limit = chunk_size if chunk_size is not None else CPU_CHUNK_BYTES // max(1, 4 * vocab)
    limit = max(1, min(limit, n_rows))
    n_chunks = -(-n_rows // limit)
    return max(1, -(-n_rows // max(1, n_chunks)))


def _chunks(n_rows: int, rows: int):
    return [(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


class _CPUCrossEntropy(torch.autograd.Function):
    """Loss from logits [N, V]; saves the logits and lse, the backward rebuilds the softmax chunk by chunk."""

    @staticmethod
    def forward(logits, target, o: _Options):
        N, V = logits.shape
        dtype = math_dtype(logits)
        rows = _rows_per_chunk(V, N, None)
        targets = _Targets.of(target, V, o, dtype)
        buffer = torch.empty(rows, V, dtype=dtype, device=logits.device)
        tanh_buffer = torch.empty_like(buffer) if o.softcap is not None else None
        loss, lse = torch.empty(N, dtype=dtype, device=logits.device), torch.empty(N, dtype=dtype, device=logits.device)
        for start, end in _chunks(N, rows):
            z = buffer[: end - start].copy_(logits[start:end])  # never touch the caller's logits
            _cap_(z, None if tanh_buffer is None else tanh_buffer[: end - start], o.softcap)
            loss[start:end], lse[start:end], _ = _loss_rows_(z, targets.safe[start:end], o)
        return targets.reduce(loss, o), lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, ctx.options = inputs
        ctx.save_for_backward(logits, target, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        logits, target, lse = ctx.saved_tensors
        o = ctx.options
        if grad_loss is None:
            return None, None, None
        if torch.is_grad_enabled():  # create_graph=True
            (grad,) = differentiable_backward(
                lambda z: reference.cross_entropy(z, target, **dataclasses.asdict(o)), [logits], [grad_loss]
            )
            return grad, None, None
        N, V = logits.shape
        dtype = math_dtype(logits)
        targets = _Targets.of(target, V, o, dtype)
        row_grad = targets.weight * grad_loss.to(dtype)  # a scalar, or per token for "none"
        grad = torch.empty(N, V, dtype=logits.dtype, device=logits.device)
        rows = _rows_per_chunk(V, N, None)
        buffer = torch.empty(rows, V, dtype=dtype, device=logits.device)
        tanh_buffer = torch.empty_like(buffer) if o.softcap is not None else None
        for start, end in _chunks(N, rows):
            z = buffer[: end - start].copy_(logits[start:end])
            t = _cap_(z, None if tanh_buffer is None else tanh_buffer[: end - start], o.softcap)
            e = z.sub_(lse[start:end, None]).exp_()  # the softmax itself: a = lse
            grad[start:end] = _to_grad_(e, None, lse[start:end], t, targets.safe[start:end], row_grad[start:end], o)
        return grad, None, None


def _lce_chunks(
    x, weight, bias, targets: _Targets, o: _Options, rows: int, *, lse=None, row_grad=None, grads=(None, None, None)
):
    """The chunk loop behind linear_cross_entropy; x, weight, bias are in the math dtype.

    Forward (lse None): returns (row losses, lse), and with row_grad given also finishes the gradients into
    grads = (grad_x [N, D] or None, grad_weight [V, D] or None, grad_bias [V] or None), each zero-initialised
    where it accumulates. Backward of "none" (lse given): recomputes each chunk from lse and fills grads.
    """
    N, V = x.shape[0], weight.shape[0]
    grad_x, grad_weight, grad_bias = grads
    want_grads = row_grad is not None and any([g is not None for g in grads])
    buffer = torch.empty(rows, V, dtype=x.dtype, device=x.device)
    tanh_buffer = torch.empty_like(buffer) if o.softcap is not None else None
    forward = lse is None
    if forward:
        loss, lse = torch.empty(N, dtype=x.dtype, device=x.device), torch.empty(N, dtype=x.dtype, device=x.device)
    for start, end in _chunks(N, rows):
        x_c, z = x[start:end], buffer[: end - start]
        torch.mm(x_c, weight.t(), out=z)
        if bias is not None:
            z.add_(bias)
        t = _cap_(z, None if tanh_buffer is None else tanh_buffer[: end - start], o.softcap)
        target = targets.safe[start:end]
        if forward:
            loss[start:end], lse[start:end], sum_exp = _loss_rows_(z, target, o)
            norm = sum_exp.reciprocal_()
        else:
            z.sub_(lse[start:end, None]).exp_()
            norm = None
        if not want_grads:
            continue
        dz = _to_grad_(z, norm, lse[start:end], t, target, row_grad[start:end], o)
        if grad_x is not None:
            torch.mm(dz, weight, out=grad_x[start:end])
        if grad_weight is not None:
            grad_weight.addmm_(dz.t(), x_c)
        if grad_bias is not None:
            grad_bias.add_(dz.sum(0))
    return (loss, lse) if forward else None


def _empty_grads(x, weight, bias, needs) -> tuple:
    need_x, need_w, need_b = needs
    return (
        x.new_empty(x.shape) if need_x else None,  # contiguous rows, whatever x's strides
        torch.zeros_like(weight) if need_w else None,
        torch.zeros_like(bias) if need_b and bias is not None else None,
    )


class _CPULinearCrossEntropy(torch.autograd.Function):
    """The loss of x [N, D] against W [V, D] (+ b) without the [N, V] logits; see the module docstring.

    Outputs (loss, lse, grad_x, grad_weight, grad_bias): the last three (gradients for grad_output = 1, finished
    in the forward for "mean"/"sum"; empty otherwise) are outputs only so that autograd keeps them for the
    backward; the public function returns the loss.
    """

    @staticmethod
    def forward(x, weight, bias, target, o: _Options, rows: int, needs: tuple[bool, bool, bool]):
        with torch.autocast("cpu", enabled=False):  # our GEMMs write into float32 buffers: keep them float32
            dtype = math_dtype(x, weight, bias)
            x_m, w_m, b_m = x.to(dtype), weight.to(dtype).contiguous(), None if bias is None else bias.to(dtype)
            targets = _Targets.of(target, weight.shape[0], o, dtype)
            finish = o.reduction != "none" and any(needs)
            grads = _empty_grads(x_m, w_m, b_m, needs) if finish else (None, None, None)
            loss, lse = _lce_chunks(
                x_m, w_m, b_m, targets, o, rows, row_grad=targets.weight if finish else None, grads=grads
            )
            empty = x.new_empty(0)
            return (targets.reduce(loss, o), lse, *[empty if g is None else g for g in grads])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, target, ctx.options, ctx.rows, ctx.needs = inputs
        _, lse, *finished = output
        ctx.mark_non_differentiable(*output[1:])
        # The inputs are saved whatever the reduction (references, no copies): "none" recomputes from them, and a
        # backward under create_graph=True differentiates the reference on them.
        ctx.save_for_backward(x, weight, bias, target, lse, *finished)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        x, weight, bias, target, lse, *finished = ctx.saved_tensors
        o = ctx.options
        if grad_loss is None:
            return (None,) * 7
        if torch.is_grad_enabled():
            # create_graph=True: the gradients finished in the forward are constants to autograd, and scaling
            # them would silently drop every second-order term. Differentiate the reference instead.
            grads = differentiable_backward(
                lambda x, w, b: reference.linear_cross_entropy(x, w, target, linear_bias=b, **dataclasses.asdict(o)),
                [x, weight, bias],
                [grad_loss],
            )
        elif o.reduction == "none":  # per-token grad_output: recompute chunk by chunk from lse
            with torch.autocast("cpu", enabled=False):
                dtype = math_dtype(x, weight, bias)
                x_m, w_m, b_m = x.to(dtype), weight.to(dtype).contiguous(), None if bias is None else bias.to(dtype)
                targets = _Targets.of(target, weight.shape[0], o, dtype)
                row_grad = targets.weight * grad_loss.reshape(-1).to(dtype)
                grads = _empty_grads(x_m, w_m, b_m, ctx.needs)
                _lce_chunks(x_m, w_m, b_m, targets, o, ctx.rows, lse=lse, row_grad=row_grad, grads=grads)
        else:  # one rounding each: the math-dtype gradients are scaled, then cast to each argument's dtype
            grads = [g * grad_loss if need else None for g, need in zip(finished, ctx.needs)]
        grads = [
            None if g is None or not need else g.to(t.dtype) for g, t, need in zip(grads, (x, weight, bias), ctx.needs)
        ]
        return (*grads, None, None, None, None)
